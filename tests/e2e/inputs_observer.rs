//! Input that wedges or floods the observer and jetci-web (issue 17): what a repository, its
//! refs and its URL control is hostile, and none of it may stall a process or leak a secret.
//! Each test failed on the code before its fix.

use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

use crate::support::git::{git_command, GitRepo};
use crate::support::jetstream::{
    all_streams, js, mark, names, stream_messages, stream_raw_messages, wait_mark, wait_results,
};
use crate::support::nats::NatsServer;
use crate::support::processes::Proc;
use crate::support::system::{spawn_dispatcher, spawn_observer, spawn_runner, REPO};
use crate::support::waiting::{wait_until_async, BOUND};

/// Every commit message in `CI_COMMITS`, in order.
async fn commits(url: &str) -> Vec<Value> {
    let n = names();
    stream_messages(url, &n.commits_stream(), &n.commits_filter())
        .await
        .into_iter()
        .map(|(_, v)| v)
        .collect()
}

/// Makes a commit on top of `parent` without touching the working tree or any ref.
fn commit_on(repo: &GitRepo, parent: &str, message: &str) -> String {
    let tree = repo.run_git(&["rev-parse", &format!("{parent}^{{tree}}")]);
    repo.run_git(&["commit-tree", &tree, "-p", parent, "-m", message])
}

/// Points `refs/heads/<name>` (any bytes) at `sha`.
fn set_branch(repo: &GitRepo, name: &[u8], sha: &str) {
    let mut full = b"refs/heads/".to_vec();
    full.extend_from_slice(name);
    let out = git_command(repo.path())
        .arg("update-ref")
        .arg(OsStr::from_bytes(&full))
        .arg(sha)
        .output()
        .expect("cannot run git");
    assert!(
        out.status.success(),
        "git update-ref: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Adds `count` branches `many/<i>`, each one commit of its own on top of `base`, in one
/// `git fast-import` (seconds, where one `git` call per branch would take minutes).
fn add_branches(repo: &GitRepo, count: usize, base: &str) {
    let mut script = String::new();
    for i in 0..count {
        let msg = format!("branch {i}");
        script.push_str(&format!(
            "commit refs/heads/many/{i}\ncommitter t <t@t> {} +0000\ndata {}\n{msg}\nfrom {base}\n\n",
            1_700_000_000 + i,
            msg.len()
        ));
    }
    let mut child = git_command(repo.path())
        .args(["fast-import", "--quiet"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("cannot run git fast-import");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .expect("cannot feed git fast-import");
    assert!(child.wait().expect("git fast-import").success());
}

/// 10,000 new branches used to take the observer's planning minutes (a history walk per branch,
/// each hiding every other branch's mark): a commit pushed to `main` meanwhile waited for all of
/// it. Planning is now one walk, linear in the new commits and branches, and `main` goes first.
#[tokio::test(flavor = "multi_thread")]
async fn a_push_to_main_is_published_soon_beside_ten_thousand_new_branches() {
    let nats = NatsServer::start();
    let url = nats.url();
    let repo = GitRepo::new();
    let first = repo.commit("first", &[]);
    let mut observer = spawn_observer(&url, &repo, &[]);
    wait_mark(&url, b"main", &first, BOUND).await;

    // All of it lands between two polls: the observer is away while the refs are written.
    observer.kill();
    add_branches(&repo, 10_000, &first);
    let pushed = repo.commit("pushed", &[]);
    let _observer = spawn_observer(&url, &repo, &[]);
    // Generous for a loaded machine, and far below what planning took before (over 10 minutes).
    wait_mark(&url, b"main", &pushed, Duration::from_secs(90)).await;
    let published = commits(&url).await;
    let main: Vec<_> = published
        .iter()
        .filter(|c| c["branch"] == "main")
        .map(|c| c["sha"].clone())
        .collect();
    assert_eq!(main, vec![first.clone(), pushed.clone()], "main's commits");
}

/// A branch whose name is not UTF-8 (git accepts `refs/heads/lat\xe9n1`) used to be skipped
/// without a word. It is tested, shown with U+FFFD for the bad bytes, and marked by its bytes, so
/// two names that read the same keep two marks.
#[tokio::test(flavor = "multi_thread")]
async fn branches_whose_names_are_not_utf8_are_tested_and_marked_apart() {
    let nats = NatsServer::start();
    let url = nats.url();
    let repo = GitRepo::new();
    let first = repo.commit("first", &[]);
    let _observer = spawn_observer(&url, &repo, &[]);
    wait_mark(&url, b"main", &first, BOUND).await;

    let (e9, e8) = (&b"lat\xe9n1"[..], &b"lat\xe8n1"[..]);
    let a = commit_on(&repo, &first, "on e9");
    let b = commit_on(&repo, &first, "on e8");
    set_branch(&repo, e9, &a);
    set_branch(&repo, e8, &b);
    wait_mark(&url, e9, &a, BOUND).await;
    wait_mark(&url, e8, &b, BOUND).await;

    // One more commit on one of them: only it is new.
    let a2 = commit_on(&repo, &a, "again on e9");
    set_branch(&repo, e9, &a2);
    wait_mark(&url, e9, &a2, BOUND).await;

    let published: Vec<(String, String)> = commits(&url)
        .await
        .iter()
        .map(|c| {
            let text = |k: &str| c[k].as_str().expect("a string").to_string();
            (text("branch"), text("sha"))
        })
        .collect();
    let shown = "lat\u{fffd}n1".to_string();
    let mut expected = vec![
        ("main".to_string(), first),
        (shown.clone(), b),
        (shown.clone(), a),
        (shown, a2),
    ];
    let mut sorted = published.clone();
    sorted.sort();
    expected.sort();
    assert_eq!(sorted, expected, "each commit once, in {published:?}");
    let e8_mark = mark(&url, e8).await.expect("the mark of lat\\xe8n1");
    assert_eq!(e8_mark["branch_hex"], "6c6174e86e31", "{e8_mark}");
}

/// A git server over HTTP that wants a user and password: `git http-backend` (CGI) behind a tiny
/// Python HTTP server, serving the bare repositories under a directory. Test-only.
const GIT_HTTP_SERVER: &str = r#"
import base64, os, subprocess, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
root, port, login = sys.argv[1], int(sys.argv[2]), sys.argv[3]
expected = "Basic " + base64.b64encode(login.encode()).decode()
class Git(BaseHTTPRequestHandler):
    def serve(self):
        if self.headers.get("Authorization") != expected:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path, _, query = self.path.partition("?")
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        env = dict(os.environ, GIT_PROJECT_ROOT=root, GIT_HTTP_EXPORT_ALL="1", PATH_INFO=path,
                   QUERY_STRING=query, REQUEST_METHOD=self.command, REMOTE_USER="ci",
                   CONTENT_TYPE=self.headers.get("Content-Type") or "",
                   CONTENT_LENGTH=str(len(body)), GIT_CONFIG_NOSYSTEM="1")
        out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True).stdout
        head, _, rest = out.partition(b"\r\n\r\n")
        status, headers = 200, []
        for line in head.decode().split("\r\n"):
            name, _, value = line.partition(": ")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers.append((name, value))
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(rest)))
        self.end_headers()
        self.wfile.write(rest)
    do_GET = serve
    do_POST = serve
    def log_message(self, *args):
        pass
ThreadingHTTPServer(("127.0.0.1", port), Git).serve_forever()
"#;

/// A URL with a user and token used to appear in the observer's log, in every result's `url` and
/// in the `ci-observer` bucket. The observer fetches with them and publishes the URL without
/// them; the runner fetches with its own `--git-credentials` file; and the token is found in no
/// stream, no bucket and no process log.
#[tokio::test(flavor = "multi_thread")]
async fn credentials_in_the_repository_url_are_used_but_never_written() {
    let nats = NatsServer::start();
    let url = nats.url();
    let token = "tok3n-SECRET-4f1c";
    let repo = GitRepo::new();
    let (name, body) = crate::support::git::passing_test();
    let sha = repo.commit("first", &[(name, body)]);
    let served = tempfile::tempdir().expect("tempdir");
    let bare = served.path().join("app.git");
    let out = git_command(served.path())
        .args(["clone", "-q", "--bare"])
        .arg(repo.path())
        .arg(&bare)
        .output()
        .expect("git clone");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = crate::support::nats::free_port().to_string();
    let root = served.path().to_str().expect("utf-8");
    let _server = Proc::spawn_program(
        std::path::Path::new("python3"),
        &["-c", GIT_HTTP_SERVER, root, &port, &format!("ci:{token}")],
        &[],
    );
    let plain = format!("http://127.0.0.1:{port}/app.git");
    wait_until_async("the git server to answer", BOUND, async || {
        std::net::TcpStream::connect(format!("127.0.0.1:{port}")).map(|_| ())
    })
    .await;

    let with_token = format!("http://ci:{token}@127.0.0.1:{port}/app.git");
    let work = tempfile::tempdir().expect("tempdir");
    let mirrors = work.path().join("mirrors");
    let observer = Proc::spawn(
        "jetci-observer",
        &[
            "-s",
            &url,
            "--poll-interval",
            "200ms",
            "--name",
            REPO,
            "--mirror-dir",
            mirrors.to_str().expect("utf-8"),
            &with_token,
        ],
        &[],
    );
    let credentials = work.path().join("git-credentials");
    std::fs::write(
        &credentials,
        format!("# the runner's logins\nhttp://ci:{token}@127.0.0.1:{port}\n"),
    )
    .expect("write the credentials file");
    let dispatcher = spawn_dispatcher(&url, &[]);
    let runner = spawn_runner(
        &url,
        "r0",
        work.path(),
        &["--git-credentials", credentials.to_str().expect("utf-8")],
    );
    let results = wait_results(&url, 1, BOUND).await;
    assert_eq!(results[0]["sha"], sha, "{:#}", results[0]);
    assert_eq!(results[0]["status"], "passed", "{:#}", results[0]);
    assert_eq!(results[0]["url"], plain, "{:#}", results[0]);

    for stream in all_streams(&names()) {
        for m in stream_raw_messages(&url, &stream, ">").await {
            let text = String::from_utf8_lossy(&m.payload);
            assert!(!text.contains(token), "{stream} {}: {text}", m.subject);
            let headers = format!("{:?}", m.headers);
            assert!(
                !headers.contains(token),
                "{stream} {}: {headers}",
                m.subject
            );
        }
    }
    for (who, log) in [
        ("observer", observer.log()),
        ("dispatcher", dispatcher.log()),
        ("runner", runner.log()),
    ] {
        assert!(!log.contains(token), "the {who} logged the token:\n{log}");
    }
}

/// A result of run 1 of `sha` in `repo` on `main`, as a runner would publish it.
fn result_of(repo: &str, sha: &str, status: &str, output: &str) -> Value {
    serde_json::json!({
        "v": jetci::messages::VERSION, "repo": repo, "url": "/srv/git/x", "branch": "main",
        "sha": sha, "run": 1, "job_id": format!("{repo}.{sha}.1.1"), "attempt": 1,
        "runner": "r0", "status": status, "exit_code": 0, "signal": null,
        "started_at": "2026-01-01T00:00:00Z", "finished_at": "2026-01-01T00:00:01Z",
        "duration_ms": 1000, "output_tail": output,
        "log_subject": format!("ci.logs.{repo}.{sha}.1.1"), "log_bytes": 0, "commit_seq": 1,
    })
}

/// 10,000 junk results used to evict every real one from jetci-web's view (the repository's
/// badge said `unknown`). Now the repository holding the most results loses its oldest first, so
/// every other repository keeps its latest.
#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_junk_results_leave_every_repositorys_latest_in_jetci_web() {
    let nats = NatsServer::start();
    let url = nats.url();
    let addr = crate::support::nats::free_addr();
    let _web = crate::support::system::spawn_web(&url, &addr, &[]);
    crate::support::http::wait_http(&addr, "/healthz", BOUND, |r| r.status == 200);

    let js = js(&url).await;
    let n = names();
    let real = "a".repeat(40);
    js.publish(
        n.results_subject(REPO, &real, 1),
        serde_json::to_vec(&result_of(REPO, &real, "passed", "ok"))
            .expect("json")
            .into(),
    )
    .await
    .expect("publish")
    .await
    .expect("stored");
    let count = 10_000;
    // In batches: the client lets only so many acks wait at once.
    for batch in (0..count).collect::<Vec<_>>().chunks(500) {
        let mut acks = Vec::new();
        for i in batch {
            let sha = format!("{i:040x}");
            let junk =
                serde_json::to_vec(&result_of("junk", &sha, "failed", "junk")).expect("json");
            acks.push(
                js.publish(n.results_subject("junk", &sha, 1), junk.into())
                    .await
                    .expect("publish"),
            );
        }
        for ack in acks {
            ack.await.expect("stored");
        }
    }
    let last = (count + 1) as u64;
    wait_until_async("jetci-web to read every result", BOUND, async || {
        let health = crate::support::http::http_get(&addr, "/healthz")?.json();
        (health["last_seq"] == last).then_some(()).ok_or(health)
    })
    .await;
    let badge = crate::support::http::http_get(&addr, "/badge/app.svg").expect("the badge");
    assert!(badge.body.contains("passing"), "{}", badge.body);
    let listed = crate::support::http::http_get(&addr, "/api/results?repo=app")
        .expect("results")
        .json();
    assert_eq!(listed[0]["sha"], real.as_str(), "{listed:#}");
}
