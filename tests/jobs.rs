//! Users acting on jobs: `jetci cancel` (running and queued), `jetci rerun`, `jetci logs`.

use std::process::Command;
use std::time::{Duration, Instant};

use jetci_e2e::{
    bin_path, stream_messages, wait_job_phase, wait_results, GitRepo, NatsServer, System,
};

const BOUND: Duration = Duration::from_secs(120);

/// Runs the `jetci` CLI to completion; returns (success, stdout, stderr).
fn jetci(url: &str, args: &[&str]) -> (bool, Vec<u8>, String) {
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

/// Processes whose command line contains `needle`.
fn processes_with(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) {
                found.push(format!("{}: {cmd}", entry.file_name().to_string_lossy()));
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_stops_a_running_job_and_everything_it_started() {
    let nats = NatsServer::start();
    let repo = GitRepo::new();
    // A marker no other test's process has, to find leftovers in /proc.
    let marker = "61.4321";
    let sha = repo.commit(
        "slow",
        &[(
            ".jetci.toml",
            &format!("command = \"sleep {marker} & sleep {marker}\"\n"),
        )],
    );
    let sys = System::start(&nats, &repo, &["r0"]);
    wait_job_phase(&sys.url, &format!("app.{sha}.1"), "running", BOUND).await;
    let deadline = Instant::now() + BOUND;
    while processes_with(marker).len() < 2 {
        assert!(Instant::now() < deadline, "the test command never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (ok, stdout, stderr) = jetci(&sys.url, &["cancel", "app", &sha[..10]]);
    assert!(ok, "{stderr}");
    assert!(
        String::from_utf8_lossy(&stdout).contains("cancelled"),
        "{}",
        String::from_utf8_lossy(&stdout)
    );
    let r = &wait_results(&sys.url, "CI_RESULTS", "ci.results.>", 1, BOUND).await[0];
    assert_eq!(r["status"], "cancelled", "{r:#}");
    assert_eq!(r["runner"], "r0");
    assert!(
        processes_with(marker).is_empty(),
        "left behind: {:?}",
        processes_with(marker)
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
    let deadline = Instant::now() + BOUND;
    while stream_messages(&sys.url, "CI_COMMITS", ">")
        .await
        .is_empty()
    {
        assert!(Instant::now() < deadline, "never published");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (ok, _, stderr) = jetci(&sys.url, &["cancel", "app", &sha[..7]]);
    assert!(ok, "{stderr}");
    let r = &wait_results(&sys.url, "CI_RESULTS", "ci.results.>", 1, BOUND).await[0];
    assert_eq!(r["status"], "cancelled", "{r:#}");
    assert_eq!(r["runner"], "");

    // A runner that arrives later does not run it, and the commit is closed.
    sys.add_runner("late", &[], &[]);
    let deadline = Instant::now() + BOUND;
    while !stream_messages(&sys.url, "CI_COMMITS", ">")
        .await
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "the cancelled commit was never closed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(stream_messages(&sys.url, "CI_RESULTS", ">").await.len(), 1);
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
    wait_results(&sys.url, "CI_RESULTS", "ci.results.>", 1, BOUND).await;

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
    let all = wait_results(&sys.url, "CI_RESULTS", "ci.results.>", 2, BOUND).await;
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
