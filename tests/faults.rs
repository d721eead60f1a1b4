//! Faults the core pipeline must survive (DESIGN.md, invariants I3 and I4): a dispatcher killed
//! while a job runs, the NATS server killed and restarted mid-job, a test that finishes while
//! NATS is away.

use std::time::{Duration, Instant};

use jetci_e2e::{stream_messages, wait_results, GitRepo, NatsServer, Proc};
use serde_json::Value;

const BOUND: Duration = Duration::from_secs(120);

fn observer(url: &str, repo: &GitRepo) -> Proc {
    let path = repo.path().to_str().expect("utf-8 path").to_string();
    Proc::spawn(
        "jetci-observer",
        &[
            "-s",
            url,
            "--poll-interval",
            "200ms",
            "--name",
            "app",
            &path,
        ],
        &[],
    )
}

fn runner(url: &str, id: &str, work: &std::path::Path) -> Proc {
    let dir = work.join(id);
    Proc::spawn(
        "jetci-runner",
        &[
            "-s",
            url,
            "--id",
            id,
            "--work-dir",
            dir.to_str().expect("utf-8 path"),
        ],
        &[],
    )
}

fn dispatcher(url: &str) -> Proc {
    Proc::spawn("jetci-dispatcher", &["-s", url], &[])
}

/// A repository whose one commit runs `command`.
fn repo_running(command: &str) -> (GitRepo, String) {
    let repo = GitRepo::new();
    let toml = format!("command = {command:?}\n");
    let sha = repo.commit("job", &[(".jetci.toml", toml.as_str())]);
    (repo, sha)
}

/// Waits until job `key` is running; returns its runner.
async fn wait_running(url: &str, key: &str) -> String {
    let js = jetci_e2e::js(url).await;
    let deadline = Instant::now() + BOUND;
    loop {
        if let Ok(kv) = js.get_key_value("ci-jobs").await {
            if let Ok(Some(value)) = kv.get(key).await {
                let v: Value = serde_json::from_slice(&value).expect("job state is JSON");
                if v["phase"] == "running" {
                    return v["runner"].as_str().expect("runner").to_string();
                }
            }
        }
        assert!(Instant::now() < deadline, "job {key} never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Times the test command started, counted from every runner's log.
fn executions(runners: &[&Proc]) -> usize {
    runners
        .iter()
        .map(|r| r.log().matches("running job").count())
        .sum()
}

/// Exactly one final result for the run, after giving a duplicate time to appear.
async fn the_one_result(url: &str) -> Value {
    let got = wait_results(url, "CI_RESULTS", "ci.results.>", 1, BOUND).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let all = stream_messages(url, "CI_RESULTS", "ci.results.>").await;
    assert_eq!(all.len(), 1, "exactly one final result: {all:#?}");
    got[0].clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_dispatcher_adopts_a_running_job_instead_of_running_it_again() {
    let nats = NatsServer::start();
    let url = nats.url();
    let work = tempfile::tempdir().expect("tempdir");
    let (repo, sha) = repo_running("sleep 6; echo adopted");
    let _observer = observer(&url, &repo);
    let mut first = dispatcher(&url);
    let r0 = runner(&url, "r0", work.path());
    let r1 = runner(&url, "r1", work.path());

    let holder = wait_running(&url, &format!("app.{sha}.1")).await;
    first.kill();
    let _second = dispatcher(&url);

    let r = the_one_result(&url).await;
    assert_eq!(r["status"], "passed", "{r:#}");
    assert_eq!(
        r["attempt"], 1,
        "the running job was adopted, not restarted: {r:#}"
    );
    assert_eq!(r["runner"], holder.as_str());
    assert_eq!(executions(&[&r0, &r1]), 1, "the test ran once");
    // The commit is closed: nothing is left in the work queue.
    let deadline = Instant::now() + BOUND;
    while !stream_messages(&url, "CI_COMMITS", ">").await.is_empty() {
        assert!(Instant::now() < deadline, "the commit was never acked");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_nats_restart_mid_job_loses_nothing_and_runs_nothing_twice() {
    let mut nats = NatsServer::start();
    let url = nats.url();
    let work = tempfile::tempdir().expect("tempdir");
    let (repo, sha) = repo_running("sleep 6; echo survived");
    let _observer = observer(&url, &repo);
    let _dispatcher = dispatcher(&url);
    let r0 = runner(&url, "r0", work.path());
    let r1 = runner(&url, "r1", work.path());

    wait_running(&url, &format!("app.{sha}.1")).await;
    nats.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    nats.restart();

    let r = the_one_result(&url).await;
    assert_eq!(r["status"], "passed", "{r:#}");
    assert!(r["output_tail"].as_str().unwrap().contains("survived"));
    assert_eq!(executions(&[&r0, &r1]), 1, "the test ran once: {r:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_result_finished_during_a_nats_outage_is_published_when_nats_returns() {
    let mut nats = NatsServer::start();
    let url = nats.url();
    let work = tempfile::tempdir().expect("tempdir");
    let (repo, sha) = repo_running("sleep 2; echo finished-offline");
    let _observer = observer(&url, &repo);
    let _dispatcher = dispatcher(&url);
    let r0 = runner(&url, "r0", work.path());

    wait_running(&url, &format!("app.{sha}.1")).await;
    nats.kill();
    // The test ends while the server is down; the runner keeps the result.
    assert!(
        r0.wait_for_log("cannot publish the result yet", BOUND),
        "{}",
        r0.log()
    );
    nats.restart();

    let r = the_one_result(&url).await;
    assert_eq!(r["status"], "passed", "{r:#}");
    assert_eq!(r["attempt"], 1, "{r:#}");
    assert!(r["output_tail"]
        .as_str()
        .unwrap()
        .contains("finished-offline"));
}
