//! Input that wedges or floods (issue 17): each test gives the real processes what a careless
//! user or an attacker could, and checks that it gets a clear error and stops nothing.
//!
//! - a duration past what a clock holds, in `.jetci.toml` or in any binary's flags;
//! - a command whose error would quote megabytes; a runner that cannot publish and is told to
//!   stop;
//! - a commit too large to send to a runner; a branch name too long to send at all;
//! - a `.jetci.toml` of several MiB.

use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use jetci::messages::{self, CommitMsg, VERSION};
use nix::sys::signal::Signal;
use serde_json::Value;

use crate::support::git::GitRepo;
use crate::support::jetstream::{js, names, stream_messages, wait_job_phase};
use crate::support::nats::NatsServer;
use crate::support::processes::Proc;
use crate::support::system::{app_job, spawn_dispatcher, spawn_runner, System, REPO};
use crate::support::waiting::{wait_until_async, BOUND};

/// The `.jetci.toml` of a commit that runs `command`, with `extra` lines.
fn toml(command: &str, extra: &str) -> String {
    format!("command = {command:?}\n{extra}")
}

/// The stored result of `sha`'s first run, waiting for it.
async fn result_of(url: &str, sha: &str) -> Value {
    let subject = names().results_subject(REPO, sha, 1);
    wait_until_async(&format!("a result on {subject}"), BOUND, async || {
        let all = stream_messages(url, &names().results_stream(), &subject).await;
        all.into_iter().next().map(|(_, v)| v).ok_or("none yet")
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_timeout_past_what_a_clock_holds_is_the_commits_error_and_the_runner_goes_on() {
    let nats = NatsServer::start();
    let url = nats.url();
    let repo = GitRepo::new();
    let huge = "timeout = \"9223372036854775807s\"\n";
    let first = repo.commit("absurd timeout", &[(".jetci.toml", &toml("true", huge))]);
    let _sys = System::start(&nats, &repo, &["r0"]);
    let r = result_of(&url, &first).await;
    assert_eq!(r["status"], "error", "{r:#}");
    let reason = r["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("timeout"), "{r:#}");
    assert!(reason.contains("longer than the limit of 7days"), "{r:#}");

    // The runner takes the next job.
    let next = repo.commit("fine", &[(".jetci.toml", &toml("true", ""))]);
    let r = result_of(&url, &next).await;
    assert_eq!(
        (&r["status"], &r["runner"]),
        (&"passed".into(), &"r0".into()),
        "{r:#}"
    );
}

#[test]
fn every_duration_flag_is_bounded_with_a_clear_error() {
    let repo = GitRepo::new();
    let path = repo.path().to_str().expect("utf-8 path");
    let store = tempfile::tempdir().expect("a store dir for jetci up");
    let store = store.path().to_str().expect("utf-8 path");
    let absurd = "9223372036854775807s";
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        ("jetci-runner", vec!["--timeout", absurd], "--timeout"),
        (
            "jetci-runner",
            vec!["--drain-timeout", absurd],
            "--drain-timeout",
        ),
        ("jetci-runner", vec!["--heartbeat", absurd], "--heartbeat"),
        ("jetci-runner", vec!["--lease", absurd], "--lease"),
        ("jetci-dispatcher", vec!["--ack-wait", absurd], "--ack-wait"),
        (
            "jetci-observer",
            vec!["--poll-interval", absurd, path],
            "--poll-interval",
        ),
        (
            "jetci-manager",
            vec!["--max", "1", "--idle-timeout", absurd],
            "--idle-timeout",
        ),
        (
            "jetci-manager",
            vec!["--max", "1", "--interval", absurd],
            "--interval",
        ),
        ("jetci", vec!["status", "--lease", absurd], "--lease"),
        (
            "jetci",
            vec!["notify", "--timeout", absurd, "app"],
            "--timeout",
        ),
        (
            "jetci",
            vec!["up", "--store", store, "--poll-interval", absurd, path],
            "--poll-interval",
        ),
    ];
    for (bin, args, flag) in cases {
        // A server nobody listens on: a binary that took the value fails later, and differently.
        let all = [&["-s", "nats://127.0.0.1:1"][..], &args].concat();
        let mut process = Proc::spawn(bin, &all, &[]);
        let status = process.wait_exit(Duration::from_secs(60));
        let said = format!("{bin} {}: {}", args.join(" "), process.log());
        assert!(!status.success(), "{said}");
        assert!(said.contains(flag), "{said}");
        assert!(said.contains("longer than the limit of"), "{said}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_too_long_to_start_gets_a_small_error_result() {
    let nats = NatsServer::start();
    let url = nats.url();
    let repo = GitRepo::new();
    // 600 KiB of `"` in a TOML literal string: more than a process argument may be (128 KiB),
    // and twice that as JSON, more than a NATS message may be.
    let command = "\"".repeat(600 * 1024);
    let sha = repo.commit(
        "a long command",
        &[(".jetci.toml", &format!("command = '{command}'\n"))],
    );
    let _sys = System::start(&nats, &repo, &["r0"]);
    let r = result_of(&url, &sha).await;
    assert_eq!(r["status"], "error", "{}", &r.to_string()[..2000]);
    let reason = r["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("cannot start `sh -c \"\"\""),
        "{reason:.300}"
    );
    assert!(reason.contains("bytes in all]"), "{reason:.300}");
    assert!(r.to_string().len() < 64 * 1024, "{}", r.to_string().len());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_runner_that_cannot_publish_stops_on_a_second_sigterm_and_publishes_when_restarted() {
    let mut nats = NatsServer::start();
    let url = nats.url();
    let repo = GitRepo::new();
    let sha = repo.commit("slow", &[(".jetci.toml", &toml("sleep 2", ""))]);
    let mut sys = System::start(&nats, &repo, &["r0"]);
    wait_job_phase(&url, &app_job(&sha).key(), "running", BOUND).await;

    // The job ends while NATS is down: the runner keeps its result and retries.
    nats.kill();
    sys.runners[0]
        .wait_for_log_async("cannot publish the result yet", BOUND)
        .await;
    sys.runners[0].signal(Signal::SIGTERM);
    sys.runners[0]
        .wait_for_log_async("signal again to hurry", BOUND)
        .await;
    sys.runners[0].signal(Signal::SIGTERM);
    let status = sys.runners[0].wait_exit(BOUND);
    assert!(status.success(), "{status:?}\n{}", sys.runners[0].log());

    // Back with NATS, the same runner publishes what it kept.
    nats.restart();
    sys.runners[0] = spawn_runner(&url, "r0", sys.work.path(), &[]);
    sys.runners[0]
        .wait_for_log_async("publishing a result kept from an earlier run", BOUND)
        .await;
    let r = result_of(&url, &sha).await;
    assert_eq!(r["status"], "passed", "{r:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_commit_too_large_to_send_to_a_runner_ends_with_an_error_and_the_next_is_tested() {
    let nats = NatsServer::start();
    let url = nats.url();
    let repo = GitRepo::new();
    let big = repo.commit("big", &[(".jetci.toml", &toml("true", ""))]);
    let next = repo.commit("next", &[(".jetci.toml", &toml("true", ""))]);
    let work = tempfile::tempdir().expect("a work dir");
    let _dispatcher = spawn_dispatcher(&url, &[]);
    let _runner = spawn_runner(&url, "r0", work.path(), &[]);

    // A publisher with commit rights sends a commit near the server's max_payload (1 MiB): it
    // fits, the job built from it (its headers too) does not.
    let commit = |sha: &str, summary: String| CommitMsg {
        v: VERSION,
        repo: REPO.into(),
        url: repo.path().to_str().expect("utf-8 path").into(),
        branch: "main".into(),
        sha: sha.into(),
        run: 1,
        labels: vec![],
        author: "a <a@x>".into(),
        summary,
        published_at: messages::now(),
        jobs: vec![],
        fail_fast: false,
    };
    let mut huge = commit(&big, String::new());
    let bare = messages::encode(&huge).len();
    huge.summary = "s".repeat(1024 * 1024 - 200 - bare);
    let js = js(&url).await;
    for msg in [huge, commit(&next, "next".into())] {
        wait_until_async("the commit stored", BOUND, async || {
            let publish = PublishMessage::build()
                .payload(messages::encode(&msg))
                .message_id(msg.key());
            match js
                .send_publish(names().commits_subject(REPO), publish)
                .await
            {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        })
        .await;
    }

    let r = result_of(&url, &big).await;
    assert_eq!(r["status"], "error", "{:.2000}", r.to_string());
    let reason = r["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("cannot be sent to a runner"),
        "{reason:.500}"
    );
    assert!(r.to_string().len() < 64 * 1024, "{}", r.to_string().len());
    let r = result_of(&url, &next).await;
    assert_eq!(
        (&r["status"], &r["runner"]),
        (&"passed".into(), &"r0".into()),
        "{r:#}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_branch_name_too_long_to_send_is_not_watched_and_said_once() {
    let nats = NatsServer::start();
    let url = nats.url();
    let repo = GitRepo::new();
    repo.commit("first", &[(".jetci.toml", &toml("true", ""))]);
    // git takes any length in packed refs: a branch whose name is 900 KiB.
    let long_branch = format!("long/{}", "n".repeat(900 * 1024));
    let on_long = repo.run_git(&["commit-tree", "HEAD^{tree}", "-p", "HEAD", "-m", "long"]);
    let packed = format!(
        "# pack-refs with: peeled fully-peeled sorted \n{on_long} refs/heads/{long_branch}\n"
    );
    std::fs::write(repo.path().join(".git/packed-refs"), packed).expect("packed-refs");
    let listed = repo.run_git(&["for-each-ref", "--format=%(objectname)", "refs/heads/long/"]);
    assert_eq!(listed, on_long, "git lists the branch");
    // No runner: libgit2 cannot write such a ref, so a runner's fetch of this repository fails
    // (RELIABILITY.md, known limits). What matters here is what the observer sends.
    let sys = System::start(&nats, &repo, &[]);

    let warning = "not watching a branch whose name is longer than 1024 bytes";
    sys.observer.wait_for_log_async(warning, BOUND).await;
    // Polls go on (every 200 ms) and say it no more; a new commit on main is published.
    let main = repo.commit("second", &[(".jetci.toml", &toml("true", ""))]);
    let filter = names().commits_filter();
    let commits = wait_until_async("the commit on main published", BOUND, async || {
        let commits = stream_messages(&url, &names().commits_stream(), &filter).await;
        let shas: Vec<String> = commits.iter().map(|(_, c)| c["sha"].to_string()).collect();
        match shas.iter().any(|s| s.contains(&main)) {
            true => Ok(shas),
            false => Err(format!("{shas:?}")),
        }
    })
    .await;
    assert!(
        commits.iter().all(|s| !s.contains(&on_long)),
        "the long branch's commit was published: {commits:?}"
    );
    assert_eq!(sys.observer.log().matches(warning).count(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_jetci_toml_of_several_mib_is_the_commits_error_and_nobody_reads_it() {
    let nats = NatsServer::start();
    let url = nats.url();
    let repo = GitRepo::new();
    // 4 MiB that compress to almost nothing, valid TOML all the way (labels first: an observer
    // that read it would ask for a runner labelled `big`, which no runner has).
    let padding = "# padding\n".repeat(4 * 1024 * 1024 / 10);
    let text = format!("labels = [\"big\"]\ncommand = \"true\"\n{padding}");
    let sha = repo.commit("huge config", &[(".jetci.toml", &text)]);
    let _sys = System::start(&nats, &repo, &["r0"]);
    let r = result_of(&url, &sha).await;
    assert_eq!(r["status"], "error", "{r:#}");
    let reason = r["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&format!(
            "{} bytes, more than the limit of 1048576",
            text.len()
        )),
        "{r:#}"
    );
}
