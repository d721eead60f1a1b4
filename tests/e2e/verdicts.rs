//! A verdict nobody can forge (issue 17, "Verdicts"): each test plays the attacker on loopback
//! with the real processes and a real nats-server, and checks that the run's one result is still
//! the one its test produced.
//!
//! - the server itself refuses a second message on a results subject (JetStream's per-subject
//!   limit with discard-new per subject), also on a `CI_RESULTS` made by an earlier jetci;
//! - a job state forged to `final` does not close its commit: a run closes on a stored result;
//! - a result whose payload names another run than its subject is ignored by every reader;
//! - a runner entry whose id is not its key gets no job.

use std::time::Duration;

use async_nats::jetstream::stream::{Config, RetentionPolicy, StorageType};
use jetci::messages::{self, JobState, ResultMsg, RunnerInfo, VERSION};
use serde_json::Value;

use crate::support::executions::Executions;
use crate::support::git::GitRepo;
use crate::support::http::http_get;
use crate::support::jetstream::{js, names, stream_messages, wait_job_phase, wait_results};
use crate::support::nats::{free_addr, NatsServer};
use crate::support::system::{app_job, spawn_web, System};
use crate::support::waiting::{wait_until, wait_until_async, BOUND};

/// A repository whose one commit runs `command`.
fn repo_running(command: &str) -> (GitRepo, String) {
    let repo = GitRepo::new();
    let toml = format!("command = {command:?}\n");
    let sha = repo.commit("job", &[(".jetci.toml", toml.as_str())]);
    (repo, sha)
}

/// Every message stored on the results subjects, as JSON.
async fn stored_results(url: &str) -> Vec<Value> {
    let n = names();
    stream_messages(url, &n.results_stream(), &n.results_filter())
        .await
        .into_iter()
        .map(|(_, v)| v)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_result_on_a_results_subject_is_refused_by_the_server() {
    let nats = NatsServer::start();
    let url = nats.url();
    let (repo, sha) = repo_running("exit 1");
    let _sys = System::start(&nats, &repo, &["r0"]);
    let first = wait_results(&url, 1, BOUND).await.remove(0);
    assert_eq!(first["status"], "failed", "{first:#}");

    // A forger publishes "passed" on the same subject, without any header.
    let mut forged: ResultMsg = serde_json::from_value(first.clone()).expect("a result");
    forged.status = jetci::messages::Status::Passed;
    let subject = names().results_subject("app", &sha, 1);
    let js = js(&url).await;
    let refused = match js.publish(subject, messages::encode(&forged)).await {
        Ok(ack) => ack.await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "the server stored a second result for the run");
    let all = stored_results(&url).await;
    assert_eq!(all.len(), 1, "{all:#?}");
    assert_eq!(all[0]["status"], "failed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_results_stream_made_by_an_earlier_jetci_is_upgraded_to_refuse_a_second_result() {
    let nats = NatsServer::start();
    let url = nats.url();
    let n = names();
    // CI_RESULTS as jetci created it before the server enforced one result per subject.
    let js = js(&url).await;
    js.create_stream(Config {
        name: n.results_stream(),
        subjects: vec![n.results_filter(), n.superseded_filter()],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        max_age: Duration::from_secs(30 * 24 * 3600),
        duplicate_window: Duration::from_secs(3600),
        allow_direct: true,
        ..Default::default()
    })
    .await
    .expect("the old results stream");
    let (repo, _sha) = repo_running("true");
    let _sys = System::start(&nats, &repo, &["r0"]);
    wait_results(&url, 1, BOUND).await;

    let mut stream = js.get_stream(n.results_stream()).await.expect("CI_RESULTS");
    let config = stream.info().await.expect("stream info").config.clone();
    assert_eq!(config.max_messages_per_subject, 1, "{config:#?}");
    assert!(config.discard_new_per_subject, "{config:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_state_forged_final_does_not_close_its_commit() {
    let nats = NatsServer::start();
    let url = nats.url();
    let executions = Executions::new();
    let (repo, sha) = repo_running(&format!("{}; sleep 4; exit 1", executions.record()));
    let _sys = System::start_with(&nats, &repo, &["r0"], &executions.runner_flags());
    let key = app_job(&sha).key();
    wait_job_phase(&url, &key, "running", BOUND).await;

    // The forger writes `final`/`passed` over the running job (compare-and-set, as jetci would).
    let kv = js(&url)
        .await
        .get_key_value(names().jobs_bucket())
        .await
        .expect("ci-jobs");
    let entry = kv
        .entry(&key)
        .await
        .expect("read")
        .expect("the job's state");
    let state: JobState = messages::decode(&entry.value).expect("a job state");
    let forged = state.finish(jetci::messages::Status::Passed, None);
    kv.update(&key, messages::encode(&forged), entry.revision)
        .await
        .expect("the forged write");

    // The commit still gets a real result: the test fails, as it does.
    let results = wait_results(&url, 1, BOUND).await;
    assert_eq!(results[0]["status"], "failed", "{:#}", results[0]);
    assert!(executions.count() >= 1, "the test ran");
    let all = stored_results(&url).await;
    assert_eq!(all.len(), 1, "{all:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_result_whose_payload_disagrees_with_its_subject_is_ignored() {
    let nats = NatsServer::start();
    let url = nats.url();
    let (repo, sha) = repo_running("exit 1");
    let sys = System::start(&nats, &repo, &["r0"]);
    let addr = free_addr();
    let _web = spawn_web(&sys.url, &addr, &[]);
    let real = wait_results(&url, 1, BOUND).await.remove(0);
    assert_eq!(real["status"], "failed");

    // On another repository's subject (and another run), a payload that says it is app's.
    let mut forged: ResultMsg = serde_json::from_value(real.clone()).expect("a result");
    forged.status = jetci::messages::Status::Passed;
    forged.run = 9;
    let other_sha = "0".repeat(40);
    let js = js(&url).await;
    js.publish(
        names().results_subject("zzz", &other_sha, 9),
        messages::encode(&forged),
    )
    .await
    .expect("publish")
    .await
    .expect("stored: the subject is free");
    // A marker result after it, so the web has read past the forged one when it shows up.
    let marker = ResultMsg {
        repo: "zzz".into(),
        sha: "1".repeat(40),
        run: 1,
        ..forged.clone()
    };
    js.publish(
        names().results_subject("zzz", &marker.sha, 1),
        messages::encode(&marker),
    )
    .await
    .expect("publish")
    .await
    .expect("stored");

    let shown = |path: &str| -> Value {
        wait_until(&format!("GET {path}"), BOUND, || {
            match http_get(&addr, path) {
                Ok(r) if r.status == 200 => Ok(r.json()),
                Ok(r) => Err(format!("{} {}", r.status, r.body)),
                Err(e) => Err(e),
            }
        })
    };
    wait_until("the web to show the marker result", BOUND, || {
        let v = shown("/api/results?repo=zzz");
        (v.as_array().map(Vec::len) == Some(1))
            .then_some(())
            .ok_or(v)
    });
    let app = shown("/api/results?repo=app");
    let app = app.as_array().expect("a list");
    assert_eq!(app.len(), 1, "{app:#?}");
    assert_eq!(app[0]["status"], "failed", "{app:#?}");
    assert_eq!(app[0]["sha"], sha.as_str());

    // `jetci tail --all --json` skips it too (it follows forever: stopped after a few seconds,
    // by which time it has printed every stored result it keeps, the marker included).
    let out = std::process::Command::new("timeout")
        .arg("5")
        .arg(crate::support::processes::bin_path("jetci"))
        .args(["-s", &url, "tail", "--all", "--json"])
        .output()
        .expect("jetci tail");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&marker.sha), "the marker was printed: {text}");
    assert!(!text.contains("\"run\":9"), "{text}");
}

/// A forged entry under key `ghost` that claims to be runner `r0` with eight free slots: trusted,
/// it sends every job to r0's subject, where they wait past their lease behind r0's one slot and
/// run again as later attempts.
#[tokio::test(flavor = "multi_thread")]
async fn a_runner_entry_whose_id_is_not_its_key_gets_no_job() {
    let nats = NatsServer::start();
    let url = nats.url();
    let repo = GitRepo::new();
    let toml = "command = \"sleep 3\"\n";
    repo.commit("c0", &[(".jetci.toml", toml)]);
    let kv = js(&url)
        .await
        .create_key_value(async_nats::jetstream::kv::Config {
            bucket: names().runners_bucket(),
            max_age: Duration::from_secs(60),
            ..Default::default()
        })
        .await
        .expect("ci-runners");
    let forge = {
        let kv = kv.clone();
        tokio::spawn(async move {
            loop {
                let info = RunnerInfo {
                    v: VERSION,
                    id: "r0".into(),
                    host: "nowhere".into(),
                    labels: vec![],
                    capacity: 8,
                    jobs: vec![],
                    accepting: true,
                    started_at: messages::now(),
                    updated_at: messages::now(),
                    warnings: Vec::new(),
                };
                let _ = kv.put("ghost", messages::encode(&info)).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    let _sys = System::start(&nats, &repo, &["r0", "r1"]);
    wait_results(&url, 1, BOUND).await;
    for i in 1..4 {
        let name = format!("c{i}");
        repo.commit(&name, &[(&name, "x")]);
    }
    let results = wait_until_async("four results", BOUND, async || {
        let all = stored_results(&url).await;
        if all.len() >= 4 {
            Ok(all)
        } else {
            Err(format!("{} so far", all.len()))
        }
    })
    .await;
    forge.abort();
    for r in &results {
        assert_eq!(r["status"], "passed", "{r:#}");
        assert_eq!(r["attempt"], 1, "no job waited past its lease: {r:#}");
    }
}
