//! `jetci status`: what waits, who runs what, and how big the streams are — read from the
//! streams and buckets themselves, so it answers "why is my job not running?" from any machine.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use anyhow::{Context, Result};
use async_nats::jetstream::kv;
use futures::StreamExt;
use jetci::connect::Nats;
use jetci::messages::{decode, CommitMsg, JobPhase, JobState, RunnerInfo, Status};
use jetci::protocol::store::{self, age_of};
use jetci::streams::Streams;

use serde_json::{json, Value};

/// Commits listed from the stream at most (the count is always exact).
const LIST_LIMIT: usize = 50;

/// Gathers the status as JSON (the `--json` output; the text view is made from it).
///
/// `lease` is the dispatchers' `--ack-wait`: a runner or job not heard from for that long is
/// shown as gone.
pub async fn gather(nats: &Nats, streams: &Streams, lease: Duration) -> Result<Value> {
    // Runners.
    let mut runners = Vec::new();
    for entry in bucket_entries(&streams.runners).await? {
        let Ok(info) = decode::<RunnerInfo>(&entry.value) else {
            continue;
        };
        let age = age_of(entry.created);
        runners.push(json!({
            "id": info.id, "host": info.host, "labels": info.labels, "capacity": info.capacity,
            "busy": info.jobs.len(), "jobs": info.jobs, "accepting": info.accepting,
            "last_heartbeat_ms": age.as_millis() as u64, "alive": age < lease,
            "warnings": info.warnings,
        }));
    }

    // Jobs the dispatchers hold: waiting for a runner, or in flight.
    let mut waiting = Vec::new();
    let mut in_flight = Vec::new();
    let mut states = HashMap::new();
    for entry in bucket_entries(&streams.job_states).await? {
        let Ok(Some(v)) = store::from_entry(&entry) else {
            continue;
        };
        states.insert(entry.key.clone(), v.state.clone());
        let s = &v.state;
        let common = json!({
            "repo": s.repo, "branch": s.branch, "sha": s.sha, "run": s.run, "attempt": s.attempt,
            "labels": s.labels, "job": s.job,
        });
        match s.phase {
            // A cancel request on a job on no runner (it ends at once), or on a pipeline's whole
            // run (its own key): nothing waits for a runner there.
            JobPhase::Queued if s.cancel.is_some() => {}
            JobPhase::Queued => {
                let mut w = common;
                w["reason"] = json!(s
                    .reason
                    .clone()
                    .unwrap_or_else(|| "waiting for a runner".into()));
                waiting.push(w);
            }
            JobPhase::Assigned | JobPhase::Running => {
                let mut j = common;
                let age = v.age.as_millis() as u64;
                j["job_id"] = json!(s.job_ref().attempt_id(s.attempt));
                j["phase"] = json!(s.phase);
                j["runner"] = json!(s.runner);
                j["last_heartbeat_ms"] = json!(age);
                j["lease_left_ms"] = json!((lease.as_millis() as u64).saturating_sub(age));
                j["cancel_requested"] = json!(s.cancel.is_some());
                in_flight.push(j);
            }
            JobPhase::Final => {}
        }
    }

    // Commits not yet taken by any dispatcher (they wait in CI_COMMITS for a free runner).
    let mut commits_info = streams.commits.clone();
    let commits_state = commits_info
        .info()
        .await
        .context("cannot read CI_COMMITS")?
        .state
        .clone();
    let mut not_taken = Vec::new();
    let mut pipelines = Vec::new();
    let mut seq = commits_state.first_sequence.max(1);
    while not_taken.len() < LIST_LIMIT && pipelines.len() < LIST_LIMIT {
        let Ok(raw) = streams
            .commits
            .get_first_raw_message_by_subject(nats.names.commits_filter(), seq)
            .await
        else {
            break;
        };
        seq = raw.sequence + 1;
        if let Ok(c) = decode::<CommitMsg>(&raw.payload) {
            if !c.jobs.is_empty() {
                pipelines.push(pipeline_view(&c, &states));
                continue;
            }
            let held = waiting
                .iter()
                .chain(in_flight.iter())
                .any(|j| j["sha"] == c.sha.as_str() && j["run"] == c.run);
            if !held {
                not_taken.push(json!({
                    "repo": c.repo, "branch": c.branch, "sha": c.sha, "run": c.run, "labels": c.labels,
                    "seq": raw.sequence,
                }));
            }
        }
    }
    // Why a commit that needs labels waits: no live runner has them.
    let live_labels: Vec<Vec<String>> = runners
        .iter()
        .filter(|r| r["alive"] == true)
        .map(|r| serde_json::from_value(r["labels"].clone()).unwrap_or_default())
        .collect();
    for c in not_taken.iter_mut().chain(waiting.iter_mut()) {
        let needs: Vec<String> = serde_json::from_value(c["labels"].clone()).unwrap_or_default();
        if !needs.is_empty()
            && !live_labels
                .iter()
                .any(|have| needs.iter().all(|l| have.contains(l)))
        {
            c["reason"] = json!(format!("no live runner has labels [{}]", needs.join(", ")));
        } else if c.get("reason").is_none() {
            c["reason"] = json!("waiting for a free runner");
        }
    }

    let mut sizes = BTreeMap::new();
    for stream in [
        &streams.commits,
        &streams.jobs,
        &streams.results,
        &streams.logs,
    ] {
        let mut s = stream.clone();
        let info = s.info().await.context("cannot read stream info")?;
        sizes.insert(
            info.config.name.clone(),
            json!({"messages": info.state.messages, "bytes": info.state.bytes}),
        );
    }
    // Runs with a job on a runner: a pipeline's run counts once, however many of its jobs run.
    let running: HashSet<(String, String, u64)> = in_flight
        .iter()
        .map(|j| {
            let text = |k: &str| j[k].as_str().unwrap_or("").to_string();
            (text("repo"), text("sha"), j["run"].as_u64().unwrap_or(0))
        })
        .collect();
    Ok(json!({
        "queue": {
            // Every commit still in CI_COMMITS none of whose jobs is on a runner: held and
            // waiting, or not taken yet.
            "waiting": (commits_state.messages as usize).saturating_sub(running.len()),
            "not_taken": not_taken,
            "waiting_for_runner": waiting,
        },
        "runners": runners,
        "in_flight": in_flight,
        "pipelines": pipelines,
        "streams": sizes,
    }))
}

/// A pipeline's run in the queue: each job with where it is, and the jobs it still waits for.
/// A job carried over from an earlier run (`rerun --failed`) has its carried status, and its
/// dependents do not wait for it.
fn pipeline_view(c: &CommitMsg, states: &HashMap<String, JobState>) -> Value {
    let state_of = |token: &str| states.get(&c.job(token).key());
    let status_of = |token: &str| match c.jobs.iter().find(|j| j.job == token) {
        Some(j) if j.carried.is_some() => j.carried.as_ref().map(|s| s.status),
        _ => state_of(token).and_then(|s| s.status),
    };
    let jobs: Vec<Value> = c
        .jobs
        .iter()
        .map(|j| {
            let state = state_of(&j.job);
            let waits_for: Vec<&str> = j
                .needs
                .iter()
                .filter(|n| status_of(n) != Some(Status::Passed))
                .filter_map(|n| c.jobs.iter().find(|o| &o.job == n))
                .map(|o| o.name.as_str())
                .collect();
            json!({
                "name": j.name, "job": j.job, "labels": j.labels,
                "phase": state.map(|s| s.phase),
                "status": status_of(&j.job),
                "carried_from": j.carried.as_ref().and_then(|s| s.carried_from),
                "runner": state.and_then(|s| s.runner.clone()),
                "reason": state.and_then(|s| s.reason.clone()),
                "waits_for": waits_for,
            })
        })
        .collect();
    json!({"repo": c.repo, "branch": c.branch, "sha": c.sha, "run": c.run, "jobs": jobs})
}

async fn bucket_entries(store: &kv::Store) -> Result<Vec<kv::Entry>> {
    let mut keys = store.keys().await.context("cannot list a bucket")?;
    let mut out = Vec::new();
    while let Some(key) = keys.next().await {
        let Ok(key) = key else { continue };
        if let Ok(Some(entry)) = store.entry(&key).await {
            if entry.operation == kv::Operation::Put {
                out.push(entry);
            }
        }
    }
    Ok(out)
}

/// The human view of [`gather`]'s JSON.
pub fn render(v: &Value) -> String {
    let mut out = String::new();
    let short = |s: &Value| s.as_str().unwrap_or("").chars().take(8).collect::<String>();
    let list = |v: &Value| v.as_array().cloned().unwrap_or_default();
    let waiting = list(&v["queue"]["waiting_for_runner"]);
    let not_taken = list(&v["queue"]["not_taken"]);
    out.push_str(&format!(
        "Queue: {} commit(s) waiting\n",
        v["queue"]["waiting"]
    ));
    for c in waiting.iter().chain(not_taken.iter()) {
        out.push_str(&format!(
            "  {}  {}  {}  run {}  {}\n",
            c["repo"].as_str().unwrap_or(""),
            c["branch"].as_str().unwrap_or(""),
            short(&c["sha"]),
            c["run"],
            c["reason"].as_str().unwrap_or("")
        ));
    }
    let runners = list(&v["runners"]);
    out.push_str(&format!("Runners: {}\n", runners.len()));
    for r in &runners {
        out.push_str(&format!(
            "  {}  host {}  labels [{}]  busy {}/{}{}  heartbeat {}ms ago{}{}\n",
            r["id"].as_str().unwrap_or(""),
            r["host"].as_str().unwrap_or(""),
            list(&r["labels"])
                .iter()
                .filter_map(|l| l.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            r["busy"],
            r["capacity"],
            match list(&r["jobs"]).as_slice() {
                [] => String::new(),
                jobs => format!(
                    "  running {}",
                    jobs.iter()
                        .filter_map(|j| j.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            },
            r["last_heartbeat_ms"],
            if r["alive"] == true { "" } else { "  (gone)" },
            if r["accepting"] == true {
                ""
            } else {
                "  (draining)"
            },
        ));
        for w in list(&r["warnings"]) {
            out.push_str(&format!("    warning: {}\n", w.as_str().unwrap_or("")));
        }
    }
    let jobs = list(&v["in_flight"]);
    out.push_str(&format!("In flight: {}\n", jobs.len()));
    for j in &jobs {
        out.push_str(&format!(
            "  {}  {}  {}  run {} attempt {}  on {}  {}  lease left {}ms\n",
            j["repo"].as_str().unwrap_or(""),
            j["branch"].as_str().unwrap_or(""),
            short(&j["sha"]),
            j["run"],
            j["attempt"],
            j["runner"].as_str().unwrap_or(""),
            j["phase"].as_str().unwrap_or(""),
            j["lease_left_ms"],
        ));
    }
    let pipelines = list(&v["pipelines"]);
    if !pipelines.is_empty() {
        out.push_str(&format!("Pipelines: {}\n", pipelines.len()));
    }
    for p in &pipelines {
        out.push_str(&format!(
            "  {}  {}  {}  run {}\n",
            p["repo"].as_str().unwrap_or(""),
            p["branch"].as_str().unwrap_or(""),
            short(&p["sha"]),
            p["run"],
        ));
        for j in list(&p["jobs"]) {
            let waits: Vec<&str> = j["waits_for"]
                .as_array()
                .map(|w| w.iter().filter_map(|n| n.as_str()).collect())
                .unwrap_or_default();
            let place = match (j["status"].as_str(), j["phase"].as_str()) {
                (Some(status), _) => match j["carried_from"].as_u64() {
                    Some(run) => format!("{status} (carried from run {run})"),
                    None => status.to_string(),
                },
                (None, Some(phase @ ("assigned" | "running"))) => {
                    format!("{phase} on {}", j["runner"].as_str().unwrap_or(""))
                }
                (None, Some(_)) => j["reason"]
                    .as_str()
                    .unwrap_or("waiting for a runner")
                    .to_string(),
                (None, None) if !waits.is_empty() => format!("waits for {}", waits.join(", ")),
                (None, None) => "not started".to_string(),
            };
            out.push_str(&format!(
                "    {}: {place}\n",
                j["name"].as_str().unwrap_or("")
            ));
        }
    }
    out.push_str("Streams:\n");
    if let Some(m) = v["streams"].as_object() {
        for (name, s) in m {
            out.push_str(&format!(
                "  {name}: {} messages, {} bytes\n",
                s["messages"], s["bytes"]
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_section() {
        let v = json!({
            "queue": {"waiting": 1, "not_taken": [
                {"repo": "app", "branch": "main", "sha": "0123456789abcdef", "run": 1, "reason": "no live runner has labels [gpu]"}
            ], "waiting_for_runner": []},
            "runners": [{"id": "r1", "host": "h", "labels": ["linux"], "busy": 1, "capacity": 2,
                          "jobs": ["app.fedcba9876543210.1.2"],
                          "last_heartbeat_ms": 200, "alive": true, "accepting": true,
                          "warnings": ["jobs run without a sandbox"]}],
            "in_flight": [{"repo": "app", "branch": "main", "sha": "fedcba9876543210", "run": 1, "attempt": 2,
                            "runner": "r1", "phase": "running", "lease_left_ms": 2500}],
            "streams": {"CI_COMMITS": {"messages": 2, "bytes": 900}},
            "pipelines": [{"repo": "app", "branch": "main", "sha": "abcdef0123", "run": 1, "jobs": [
                {"name": "lint", "status": "passed", "phase": "final", "waits_for": []},
                {"name": "test (python=3.11, 1/2)", "status": null, "phase": "running", "runner": "r1", "waits_for": []},
                {"name": "docs", "status": null, "phase": null, "waits_for": ["test (python=3.11, 1/2)"]},
                {"name": "build", "status": "passed", "carried_from": 1, "phase": null, "waits_for": []},
            ]}],
        });
        let text = render(&v);
        assert!(text.contains("Queue: 1 commit(s) waiting"), "{text}");
        assert!(
            text.contains("01234567  run 1  no live runner has labels [gpu]"),
            "{text}"
        );
        assert!(
            text.contains(
                "r1  host h  labels [linux]  busy 1/2  running app.fedcba9876543210.1.2  heartbeat"
            ),
            "{text}"
        );
        assert!(
            text.contains("run 1 attempt 2  on r1  running  lease left 2500ms"),
            "{text}"
        );
        assert!(text.contains("CI_COMMITS: 2 messages, 900 bytes"), "{text}");
        assert!(
            text.contains("  app  main  abcdef01  run 1\n    lint: passed\n    test (python=3.11, 1/2): running on r1\n    docs: waits for test (python=3.11, 1/2)\n    build: passed (carried from run 1)\n"),
            "{text}"
        );
        assert!(
            text.contains("\n    warning: jobs run without a sandbox\n"),
            "{text}"
        );
    }

    #[test]
    fn a_carried_job_shows_its_status_and_its_dependents_do_not_wait_for_it() {
        let job = |token: &str, needs: &[&str]| jetci::messages::JobPlan {
            name: token.into(),
            job: token.into(),
            needs: needs.iter().map(|n| n.to_string()).collect(),
            labels: vec![],
            allow_failure: false,
            carried: None,
        };
        let mut lint = job("lint", &[]);
        lint.carried = Some(jetci::messages::JobSummary {
            name: "lint".into(),
            job: "lint".into(),
            needs: vec![],
            labels: vec![],
            status: Status::Passed,
            runner: "r1".into(),
            attempt: 1,
            duration_ms: 5,
            tests: None,
            allow_failure: false,
            reason: None,
            carried_from: Some(1),
        });
        let c = CommitMsg {
            v: jetci::messages::VERSION,
            repo: "app".into(),
            url: String::new(),
            branch: "main".into(),
            sha: "abcdef0123".into(),
            run: 2,
            labels: vec![],
            author: String::new(),
            summary: String::new(),
            published_at: jetci::messages::now(),
            jobs: vec![lint, job("test", &["lint"]), job("docs", &["test"])],
            fail_fast: false,
        };
        let v = pipeline_view(&c, &HashMap::new());
        assert_eq!(v["jobs"][0]["status"], "passed");
        assert_eq!(v["jobs"][0]["carried_from"], 1);
        assert_eq!(v["jobs"][1]["waits_for"], json!([]), "{v:#}");
        assert_eq!(v["jobs"][2]["waits_for"], json!(["test"]));
    }
}
