//! Faults the core pipeline must survive (DESIGN.md, invariants I3 and I4): a dispatcher killed
//! while a job runs, the NATS server killed and restarted mid-job, a test that finishes while
//! NATS is away, a runner that died between storing its result and marking its job final.

use std::time::{Duration, Instant};

use async_nats::jetstream::message::PublishMessage;
use jetci::messages::{self, CommitMsg, JobPhase, JobState, ResultMsg, Status};
use jetci::subjects::Names;
use jetci_e2e::{
    spawn_dispatcher, spawn_observer, spawn_runner, stream_messages, wait_job, wait_job_phase,
    wait_results, GitRepo, NatsServer, Proc, System,
};
use serde_json::Value;

const BOUND: Duration = Duration::from_secs(120);

/// A repository whose one commit runs `command`.
fn repo_running(command: &str) -> (GitRepo, String) {
    let repo = GitRepo::new();
    let toml = format!("command = {command:?}\n");
    let sha = repo.commit("job", &[(".jetci.toml", toml.as_str())]);
    (repo, sha)
}

/// Times the test command started, counted from every runner's log.
fn executions(runners: &[Proc]) -> usize {
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
    let (repo, sha) = repo_running("sleep 6; echo adopted");
    let mut sys = System::start(&nats, &repo, &["r0", "r1"]);

    let holder = wait_job_phase(&url, &format!("app.{sha}.1"), "running", BOUND).await;
    sys.dispatcher.kill();
    let _second = spawn_dispatcher(&url, &[]);

    let r = the_one_result(&url).await;
    assert_eq!(r["status"], "passed", "{r:#}");
    assert_eq!(
        r["attempt"], 1,
        "the running job was adopted, not restarted: {r:#}"
    );
    assert_eq!(r["runner"], holder.as_str());
    assert_eq!(executions(&sys.runners), 1, "the test ran once");
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
    let (repo, sha) = repo_running("sleep 6; echo survived");
    let sys = System::start(&nats, &repo, &["r0", "r1"]);

    wait_job_phase(&url, &format!("app.{sha}.1"), "running", BOUND).await;
    nats.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    nats.restart();

    let r = the_one_result(&url).await;
    assert_eq!(r["status"], "passed", "{r:#}");
    assert!(r["output_tail"].as_str().unwrap().contains("survived"));
    assert_eq!(executions(&sys.runners), 1, "the test ran once: {r:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_result_finished_during_a_nats_outage_is_published_when_nats_returns() {
    let mut nats = NatsServer::start();
    let url = nats.url();
    let (repo, sha) = repo_running("sleep 2; echo finished-offline");
    let sys = System::start(&nats, &repo, &["r0"]);
    let r0 = &sys.runners[0];

    wait_job_phase(&url, &format!("app.{sha}.1"), "running", BOUND).await;
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

#[tokio::test(flavor = "multi_thread")]
async fn a_partitioned_runners_late_result_is_fenced() {
    let nats = NatsServer::start();
    let url = nats.url();
    let (repo, sha) = repo_running("sleep 5; echo attempt-$JETCI_ATTEMPT");
    let sys = System::start(&nats, &repo, &["r0", "r1"]);
    let key = format!("app.{sha}.1");

    // A silent partition: the runner stops answering but its connection stays open.
    let holder = wait_job_phase(&url, &key, "running", BOUND).await;
    let stopped = &sys.runners[if holder == "r0" { 0 } else { 1 }];
    stopped.signal(nix::sys::signal::Signal::SIGSTOP);
    let state = wait_job(&url, &key, "running as attempt 2", BOUND, |v| {
        v["phase"] == "running" && v["attempt"] == 2
    })
    .await;
    let second = state["runner"].as_str().expect("runner").to_string();
    assert_ne!(second, holder);
    // It comes back while attempt 2 runs (its own test went on and ended meanwhile).
    stopped.signal(nix::sys::signal::Signal::SIGCONT);

    let r = the_one_result(&url).await;
    assert_eq!(
        r["attempt"], 2,
        "the verdict is the current attempt's: {r:#}"
    );
    assert_eq!(r["runner"], second.as_str());
    assert!(
        r["output_tail"].as_str().unwrap().contains("attempt-2"),
        "{r:#}"
    );
    // The late attempt 1 is kept for the record, apart from the verdicts.
    let deadline = Instant::now() + BOUND;
    loop {
        let fenced = stream_messages(&url, "CI_RESULTS", "ci.superseded.>").await;
        if let Some((_, late)) = fenced.first() {
            assert_eq!(late["attempt"], 1, "{late:#}");
            assert_eq!(late["runner"], holder.as_str());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the late result was never recorded"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_checkout_that_keeps_failing_is_retried_then_reported_as_error() {
    let nats = NatsServer::start();
    let url = nats.url();
    let work = tempfile::tempdir().expect("tempdir");
    let _dispatcher = spawn_dispatcher(&url, &[]);
    let _runners = [
        spawn_runner(&url, "r0", work.path(), &[]),
        spawn_runner(&url, "r1", work.path(), &[]),
    ];
    // Valid in shape, nonsense in content: a repository that does not exist.
    let client = async_nats::connect(url.as_str()).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    // Until a process has created the streams, the publish has nowhere to go.
    let sha = "0123456789abcdef0123456789abcdef01234567";
    let body = serde_json::json!({
        "v": 1, "repo": "ghost", "url": "/nonexistent/ghost.git", "branch": "main", "sha": sha,
        "run": 1, "published_at": "2026-11-30T00:00:00Z",
    });
    let deadline = Instant::now() + BOUND;
    loop {
        let sent = js
            .send_publish(
                "ci.commits.ghost",
                async_nats::jetstream::message::PublishMessage::build()
                    .payload(body.to_string().into())
                    .message_id(format!("ghost.{sha}.1")),
            )
            .await;
        if let Ok(ack) = sent {
            if ack.await.is_ok() {
                break;
            }
        }
        assert!(Instant::now() < deadline, "cannot publish the commit");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let r = the_one_result(&url).await;
    assert_eq!(r["status"], "error", "{r:#}");
    let reason = r["reason"].as_str().unwrap();
    assert!(
        reason.contains("attempt 3 of 3") && reason.contains("checkout failed"),
        "{reason}"
    );
}

/// A runner that stored its result and died before writing `final` leaves a run that is over:
/// the dispatcher, about to give the job to another runner, finds the result, marks the state
/// final with the result's status and closes the commit, and no runner runs it again.
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_attempts_stored_result_ends_the_run_without_running_it_again() {
    lost_attempt_with_a_stored_result(None).await;
}

/// The same when `jetci cancel` comes after the result was stored (the state still said
/// `running`): the run keeps its verdict, and the job's state says so, not `cancelled`.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_after_a_lost_attempts_stored_result_keeps_the_verdict() {
    lost_attempt_with_a_stored_result(Some("by the test")).await;
}

async fn lost_attempt_with_a_stored_result(cancel: Option<&str>) {
    let nats = NatsServer::start();
    let url = nats.url();
    let (repo, sha) = repo_running("true");
    let _observer = spawn_observer(&url, &repo, &[]);
    let deadline = Instant::now() + BOUND;
    let (seq, commit) = loop {
        let stored = jetci_e2e::stream_raw_messages(&url, "CI_COMMITS", ">").await;
        if let Some(m) = stored.first() {
            let commit: CommitMsg = messages::decode(&m.payload).expect("a commit message");
            break (m.sequence, commit);
        }
        assert!(Instant::now() < deadline, "the observer published nothing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(commit.sha, sha);

    // What the lost attempt left: `running` on a runner that is gone, and its stored result.
    let js = jetci_e2e::js(&url).await;
    let key = format!("app.{sha}.1");
    let mut running = JobState::queued(&commit, &commit.only_job());
    running.phase = JobPhase::Running;
    running.attempt = 1;
    running.runner = Some("ghost".into());
    running.cancel = cancel.map(str::to_string);
    js.get_key_value("ci-jobs")
        .await
        .expect("ci-jobs")
        .create(&key, messages::encode(&running))
        .await
        .expect("create");
    let names = Names::new("ci").expect("default prefix");
    let mut result = ResultMsg::without_run(
        &names,
        &commit,
        &commit.only_job(),
        seq,
        1,
        Status::Failed,
        "the test failed; then its runner died".into(),
    );
    result.runner = "ghost".into();
    js.send_publish(
        names.results_subject("app", &sha, 1),
        PublishMessage::build()
            .payload(messages::encode(&result))
            .message_id(&key),
    )
    .await
    .expect("publish")
    .await
    .expect("stored");

    let dispatcher = spawn_dispatcher(&url, &[]);
    let work = tempfile::tempdir().unwrap();
    let runner = spawn_runner(&url, "r1", work.path(), &[]);

    let state = wait_job(&url, &key, "final", BOUND, |v| v["phase"] == "final").await;
    assert_eq!(state["status"], "failed", "the verdict's status: {state:#}");
    let r = the_one_result(&url).await;
    assert_eq!(
        (r["attempt"].clone(), r["runner"].clone()),
        (1.into(), "ghost".into())
    );
    assert_eq!(executions(&[runner]), 0, "the run was not run again");
    let deadline = Instant::now() + BOUND;
    while !stream_messages(&url, "CI_COMMITS", ">").await.is_empty() {
        assert!(Instant::now() < deadline, "the commit was never acked");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        dispatcher
            .log()
            .contains("the lost attempt had stored its result"),
        "{}",
        dispatcher.log()
    );
}
