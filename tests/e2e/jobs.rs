//! Users acting on jobs: `jetci cancel` (running and queued), `jetci rerun`, `jetci logs`.

use std::process::Command;

use crate::support::git::GitRepo;
use crate::support::jetstream::{
    names, stream_messages, wait_commits_acked, wait_job_phase, wait_results,
};
use crate::support::nats::NatsServer;
use crate::support::processes::{bin_path, marker_seconds, processes_with};
use crate::support::system::{app_job, System};
use crate::support::waiting::{wait_until_async, BOUND};

/// Runs the `jetci` CLI to completion; returns (success, stdout, stderr).
pub(crate) fn jetci(url: &str, args: &[&str]) -> (bool, Vec<u8>, String) {
    let out = Command::new(bin_path("jetci"))
        .args(["-s", url])
        .args(args)
        .output()
        .expect("run jetci");
    (
        out.status.success(),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_stops_a_running_job_and_everything_it_started() {
    let nats = NatsServer::start();
    let repo = GitRepo::new();
    // A marker no other process has, to find leftovers in /proc.
    let marker = marker_seconds(61);
    let sha = repo.commit(
        "slow",
        &[(
            ".jetci.toml",
            &format!("command = \"sleep {marker} & sleep {marker}\"\n"),
        )],
    );
    let sys = System::start(&nats, &repo, &["r0"]);
    wait_job_phase(&sys.url, &app_job(&sha).key(), "running", BOUND).await;
    wait_until_async("the test command to start", BOUND, async || {
        let found = processes_with(&marker);
        (found.len() >= 2).then_some(()).ok_or(format!("{found:?}"))
    })
    .await;

    let (ok, stdout, stderr) = jetci(&sys.url, &["cancel", "app", &sha[..10]]);
    assert!(ok, "{stderr}");
    assert!(
        String::from_utf8_lossy(&stdout).contains("cancelled"),
        "{}",
        String::from_utf8_lossy(&stdout)
    );
    let r = &wait_results(&sys.url, 1, BOUND).await[0];
    assert_eq!(r["status"], "cancelled", "{r:#}");
    assert_eq!(r["runner"], "r0");
    // The runner kills the job's whole process group before it reports the cancel.
    assert!(
        processes_with(&marker).is_empty(),
        "left behind: {:?}",
        processes_with(&marker)
    );

    // Cancelling it again says there is nothing to cancel.
    let (ok, _, stderr) = jetci(&sys.url, &["cancel", "app", &sha]);
    assert!(!ok);
    assert!(stderr.contains("already finished"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_of_a_queued_job_gives_it_a_cancelled_result_without_a_runner() {
    let nats = NatsServer::start();
    let repo = GitRepo::new();
    let sha = repo.commit("a", &[("a.txt", "a")]);
    let mut sys = System::start(&nats, &repo, &[]);
    let n = names();
    let commits = n.commits_stream();
    wait_until_async("the commit to be published", BOUND, async || {
        let stored = stream_messages(&sys.url, &commits, ">").await;
        (!stored.is_empty()).then_some(()).ok_or("nothing stored")
    })
    .await;
    let (ok, _, stderr) = jetci(&sys.url, &["cancel", "app", &sha[..7]]);
    assert!(ok, "{stderr}");
    let r = &wait_results(&sys.url, 1, BOUND).await[0];
    assert_eq!(r["status"], "cancelled", "{r:#}");
    assert_eq!(r["runner"], "");

    // A runner that arrives later does not run it, and the commit is closed.
    sys.add_runner("late", &[], &[]);
    wait_commits_acked(&sys.url, BOUND).await;
    assert_eq!(
        stream_messages(&sys.url, &n.results_stream(), ">")
            .await
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rerun_makes_a_new_run_and_logs_print_the_output() {
    let nats = NatsServer::start();
    let repo = GitRepo::new();
    let sha = repo.commit(
        "prints",
        &[(
            ".jetci.toml",
            "command = \"echo line-one; printf 'raw \\\\377 byte\\\\n'; echo run=$JETCI_RUN\"\n",
        )],
    );
    let sys = System::start(&nats, &repo, &["r0"]);
    wait_results(&sys.url, 1, BOUND).await;

    let (ok, stdout, stderr) = jetci(&sys.url, &["logs", "app", &sha]);
    assert!(ok, "{stderr}");
    assert_eq!(
        stdout,
        b"line-one\nraw \xff byte\nrun=1\n",
        "{}",
        String::from_utf8_lossy(&stdout)
    );

    let (ok, stdout, stderr) = jetci(&sys.url, &["rerun", "app", &sha[..8]]);
    assert!(ok, "{stderr}");
    assert!(
        String::from_utf8_lossy(&stdout).contains("run 2"),
        "{}",
        String::from_utf8_lossy(&stdout)
    );
    let all = wait_results(&sys.url, 2, BOUND).await;
    assert_eq!(all[1]["run"], 2, "{all:#?}");
    assert_eq!(all[1]["status"], "passed");
    let (ok, stdout, _) = jetci(&sys.url, &["logs", "app", &sha]);
    assert!(ok);
    assert!(
        stdout.ends_with(b"run=2\n"),
        "the latest run's log: {}",
        String::from_utf8_lossy(&stdout)
    );
    let (ok, stdout, _) = jetci(&sys.url, &["logs", "app", &sha, "--run", "1"]);
    assert!(ok && stdout.ends_with(b"run=1\n"));

    let (ok, _, stderr) = jetci(&sys.url, &["logs", "app", "0000000"]);
    assert!(!ok && stderr.contains("no commit"), "{stderr}");
}
