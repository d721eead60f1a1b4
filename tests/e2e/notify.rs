//! End-to-end test of instant triggers: a bare repository with jetci's `post-receive` hook
//! (deploy/hooks/post-receive), pushes from a clone, and an observer whose poll interval (10 min)
//! is far longer than the test, so only the hook's `jetci notify` can make it see a push.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

use crate::support::git::{git_command, passing_test, GitRepo};
use crate::support::jetstream::{names, stream_messages, wait_results};
use crate::support::nats::{free_port, NatsServer};
use crate::support::processes::bin_path;
use crate::support::system::{spawn_dispatcher, spawn_observer_at, spawn_runner};
use crate::support::waiting::BOUND;

/// A bare repository named `app.git` with the hook installed, as an operator would install it.
struct BareRepo {
    dir: tempfile::TempDir,
}

impl BareRepo {
    fn new() -> BareRepo {
        let dir = tempfile::Builder::new()
            .prefix("jetci-bare-")
            .tempdir()
            .expect("tempdir");
        let out = git(
            dir.path(),
            &["init", "-q", "--bare", "-b", "main", "app.git"],
            &[],
        );
        assert!(out.status.success(), "git init --bare: {}", stderr(&out));
        let repo = BareRepo { dir };
        let hook = repo.path().join("hooks").join("post-receive");
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/hooks/post-receive");
        fs::copy(&source, &hook).expect("cannot copy deploy/hooks/post-receive");
        fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).expect("chmod");
        repo
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("app.git")
    }
}

/// Runs git in `dir` with only the repository's own config (as `GitRepo` does) and `env`; the
/// hook's `jetci notify` logs nothing beyond what it prints.
fn git(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = git_command(dir);
    cmd.args(args).env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("cannot run git")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `git push origin REFSPEC` from the clone, with the environment the hook reads (the hook runs
/// in the pusher's environment for a local push). Asserts the push itself succeeded and returns
/// what git and the hook printed.
fn push(clone: &GitRepo, refspec: &str, nats_url: &str) -> String {
    let jetci = bin_path("jetci");
    let out = git(
        clone.path(),
        &["push", "origin", refspec],
        &[
            ("JETCI_BIN", jetci.to_str().expect("utf-8 path")),
            ("NATS_URL", nats_url),
            // A loaded test machine may take longer than the default 10 s to poll and publish.
            ("JETCI_NOTIFY_ARGS", "--timeout 60s"),
        ],
    );
    let text = stderr(&out);
    assert!(out.status.success(), "git push {refspec} failed:\n{text}");
    eprintln!("--- git push {refspec} ---\n{text}");
    text
}

async fn results(url: &str, count: usize) -> Vec<Value> {
    wait_results(url, count, BOUND).await
}

/// Waits a few seconds for anything extra to show up, then returns every stored result.
async fn settled_results(url: &str) -> Vec<Value> {
    tokio::time::sleep(Duration::from_secs(5)).await;
    let n = names();
    stream_messages(url, &n.results_stream(), &n.results_filter())
        .await
        .into_iter()
        .map(|(_, v)| v)
        .collect()
}

fn count_by_sha(results: &[Value]) -> HashMap<String, usize> {
    let mut map = HashMap::new();
    for r in results {
        *map.entry(r["sha"].as_str().expect("sha").to_string())
            .or_default() += 1;
    }
    map
}

#[tokio::test(flavor = "multi_thread")]
async fn a_push_is_tested_at_once_through_the_hook_and_only_once() {
    let nats = NatsServer::start();
    let url = nats.url();
    let bare = BareRepo::new();
    let bare_path = bare.path().to_str().expect("utf-8 path").to_string();
    let clone = GitRepo::new();
    clone.run_git(&["remote", "add", "origin", &bare_path]);

    // A push before any observer runs: the hook says nobody listens, and the push succeeds.
    let (name, body) = passing_test();
    let first = clone.commit("first", &[(name, body)]);
    let said = push(&clone, "main", &url);
    assert!(said.contains("no observer watches app"), "{said}");

    // The observer's first poll, at start, publishes the head; after that it would not poll
    // again for 10 minutes.
    let work = tempfile::tempdir().expect("tempdir");
    let observer = spawn_observer_at(&url, &bare.path(), &["--poll-interval", "10m"]);
    let _dispatcher = spawn_dispatcher(&url, &[]);
    let _runner = spawn_runner(&url, "r0", work.path(), &[]);
    let initial = results(&url, 1).await;
    assert_eq!(initial[0]["sha"], first.as_str(), "{:#}", initial[0]);
    assert_eq!(initial[0]["repo"], "app");

    // Two commits in one push: the hook's notify makes the observer poll now, and the push
    // returns once both are published.
    let c1 = clone.commit("c1", &[("a.txt", "1")]);
    let c2 = clone.commit("c2", &[("b.txt", "2")]);
    let said = push(&clone, "main", &url);
    assert!(said.contains("app: 2 new commits published"), "{said}");
    let got = results(&url, 3).await;
    let all = settled_results(&url).await;
    assert_eq!(
        all.len(),
        3,
        "exactly one result per commit: {all:#?} (saw {got:#?})"
    );
    let counts = count_by_sha(&all);
    for sha in [&first, &c1, &c2] {
        assert_eq!(counts.get(sha), Some(&1), "one result for {sha}: {all:#?}");
    }
    assert!(
        observer.log().contains("notified; polling now"),
        "{}",
        observer.log()
    );

    // The same refs again: git has nothing to update and runs no hook. A new branch at a known
    // commit runs the hook, the observer polls and finds nothing new.
    let said = push(&clone, "main", &url);
    assert!(said.contains("Everything up-to-date"), "{said}");
    let said = push(&clone, "main:refs/heads/copy", &url);
    assert!(said.contains("app: nothing new"), "{said}");
    // `jetci notify` by hand, naming the repository by its path, is the same request.
    let out = Command::new(bin_path("jetci"))
        .args(["-s", &url, "notify", &bare_path])
        .env_remove("RUST_LOG")
        .output()
        .expect("run jetci notify");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", stderr(&out));
    assert!(stdout.contains("app: nothing new"), "{stdout}");

    // A hook that cannot reach NATS reports it and still lets the push through.
    let dead = format!("nats://127.0.0.1:{}", free_port());
    let said = push(&clone, "main:refs/heads/other", &dead);
    assert!(
        said.contains("notifying the observer of app failed"),
        "{said}"
    );

    let all = settled_results(&url).await;
    assert_eq!(all.len(), 3, "no new results: {all:#?}");
}
