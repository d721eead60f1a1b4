//! The runner as users must be able to trust it: repo config, labels, timeouts that kill
//! everything, daemons that do not outlive their job, bounded logs and memory, clean workspaces,
//! a built environment.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use async_nats::jetstream::kv;
use async_nats::jetstream::message::PublishMessage;
use jetci::messages::{self, JobMsg, JobPhase, JobState, Status, VERSION};
use jetci::protocol::attempt;
use serde_json::Value;

use crate::support::git::GitRepo;
use crate::support::jetstream::{js, names, stream_raw_messages, wait_job, wait_results};
use crate::support::nats::NatsServer;
use crate::support::processes::{bin_path, marker_seconds, processes_with};
use crate::support::system::{spawn_runner, System, REPO};
use crate::support::waiting::{wait_until_async, BOUND};

/// Waits for the first `n` results of the system.
async fn results(sys: &System, n: usize) -> Vec<Value> {
    wait_results(&sys.url, n, BOUND).await
}

fn toml(command: &str, extra: &str) -> String {
    format!("command = {command:?}\n{extra}")
}

/// Waits until no process has `marker` (a [`marker_seconds`]) on its command line.
async fn none_left(marker: &str) {
    wait_until_async(
        "no process left behind",
        Duration::from_secs(10),
        async || {
            let left = processes_with(marker);
            left.is_empty()
                .then_some(())
                .ok_or_else(|| format!("left behind: {left:?}"))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_waits_for_a_runner_with_its_labels() {
    let nats = NatsServer::start();
    let repo = GitRepo::new();
    let sha = repo.commit(
        "gpu",
        &[(".jetci.toml", &toml("echo on-gpu", "labels = [\"gpu\"]\n"))],
    );
    let mut sys = System::start(&nats, &repo, &[]);
    sys.add_runner("plain", &[], &[]);

    // `jetci status` says it waits, and for which labels.
    let what = "the commit shown as waiting, and the runner present";
    let (v, waiting) = wait_until_async(what, BOUND, async || {
        let out = std::process::Command::new(bin_path("jetci"))
            .args(["-s", &sys.url, "status", "--json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let queued: Vec<&Value> = v["queue"]["not_taken"]
            .as_array()
            .unwrap()
            .iter()
            .chain(v["queue"]["waiting_for_runner"].as_array().unwrap())
            .filter(|c| c["sha"] == sha.as_str())
            .collect();
        // Two things to wait for: the commit shown as waiting, and the runner's presence (which
        // may appear after it).
        let plain_seen = v["runners"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["id"] == "plain");
        match (queued.first(), plain_seen) {
            (Some(&c), true) => Ok((v.clone(), c.clone())),
            _ => Err(v.clone()),
        }
    })
    .await;
    assert!(waiting["reason"].as_str().unwrap().contains("gpu"), "{v:#}");
    assert_eq!(v["runners"][0]["id"], "plain", "{v:#}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        stream_raw_messages(&sys.url, &names().results_stream(), ">")
            .await
            .is_empty(),
        "no runner has gpu yet"
    );

    sys.add_runner("gpu-1", &["--labels", "linux,gpu"], &[]);
    let r = &results(&sys, 1).await[0];
    assert_eq!(r["runner"], "gpu-1", "{r:#}");
    assert_eq!(r["status"], "passed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_timeout_kills_the_whole_test_and_a_daemon_does_not_outlive_its_job() {
    let nats = NatsServer::start();
    let repo = GitRepo::new();
    // Markers no other process has, to find leftovers in /proc.
    let slow = marker_seconds(33);
    let daemon = marker_seconds(44);
    let a = repo.commit(
        "forks and hangs",
        &[(
            ".jetci.toml",
            &toml(
                &format!("sleep {slow} & sleep {slow}"),
                "timeout = \"1s\"\n",
            ),
        )],
    );
    let mut sys = System::start(&nats, &repo, &[]);
    sys.add_runner("r0", &[], &[]);
    let r = &results(&sys, 1).await[0];
    assert_eq!(r["sha"], a.as_str());
    assert_eq!(r["status"], "timed_out", "{r:#}");
    assert_eq!(
        r["signal"], 15,
        "SIGTERM ended it within the grace period: {r:#}"
    );
    none_left(&slow).await;

    // A double-forked daemon in its own session, and a command that exits at once.
    repo.commit(
        "daemonizes",
        &[(
            ".jetci.toml",
            &toml(
                &format!(
                    "setsid sh -c 'sleep {daemon}' < /dev/null > /dev/null 2>&1 & echo spawned"
                ),
                "",
            ),
        )],
    );
    let all = results(&sys, 2).await;
    assert_eq!(all[1]["status"], "passed", "{:#}", all[1]);
    none_left(&daemon).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_output_keeps_the_runner_small_and_the_log_capped() {
    let nats = NatsServer::start();
    let repo = GitRepo::new();
    // 200 MiB of output, in lines.
    repo.commit("floods", &[(".jetci.toml", &toml("yes 0123456789012345678901234567890123456789 | head -c 209715200; echo; echo the-end", ""))]);
    let mut sys = System::start(&nats, &repo, &[]);
    let pid = sys.add_runner("r0", &[], &[]).pid();

    let rss = PeakRss::watch(pid);
    let r = &results(&sys, 1).await[0];
    let peak_kib = rss.stop();
    assert_eq!(r["status"], "passed", "{r:#}");
    assert_eq!(
        r["log_bytes"],
        209_715_200u64 + 1 + 8,
        "every byte was counted"
    );
    assert!(r["output_tail"].as_str().unwrap().ends_with("the-end\n"));
    assert!(
        peak_kib < 150 * 1024,
        "runner RSS peaked at {peak_kib} KiB while the test printed 200 MiB"
    );

    let logs = stream_raw_messages(&sys.url, &names().logs_stream(), ">").await;
    let stored: usize = logs.iter().map(|m| m.payload.len()).sum();
    let text = String::from_utf8_lossy(&logs.last().unwrap().payload).into_owned();
    assert!(
        stored <= 10 * 1024 * 1024 + 1024,
        "stored {stored} bytes of log"
    );
    assert!(stored >= 10 * 1024 * 1024, "the cap is filled: {stored}");
    assert!(
        text.contains("log truncated"),
        "the log ends with the marker: {text:?}"
    );
}

/// The peak resident memory of a process, sampled every 20 ms on a thread of its own while the
/// test waits for something else. The sampling ends with [`PeakRss::stop`], or when a failing
/// test drops it.
struct PeakRss {
    stop: Arc<AtomicBool>,
    sampler: Option<JoinHandle<u64>>,
}

impl PeakRss {
    fn watch(pid: u32) -> PeakRss {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let sampler = std::thread::spawn(move || {
            let mut peak_kib = 0;
            while !stopped.load(Ordering::Relaxed) {
                peak_kib = rss_kib(pid).max(peak_kib);
                std::thread::sleep(Duration::from_millis(20));
            }
            peak_kib
        });
        PeakRss {
            stop,
            sampler: Some(sampler),
        }
    }

    /// The highest sample, in KiB.
    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let sampler = self.sampler.take().expect("stopped once");
        sampler.join().expect("the RSS sampler panicked")
    }
}

impl Drop for PeakRss {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_job_starts_clean_with_a_built_environment() {
    let nats = NatsServer::start();
    let repo = GitRepo::new();
    // Fails if an earlier build's files, or an earlier job's HOME, are visible; prints the
    // environment so the test can check what reached it.
    let check = "test ! -e build.out && test ! -e \"$HOME/.seen\" && echo built > build.out \
                 && touch \"$HOME/.seen\" && echo changed >> tracked.txt && env | sort";
    let a = repo.commit(
        "one",
        &[
            (".jetci.toml", &toml(check, "[env]\nFROM_REPO = \"yes\"\n")),
            ("tracked.txt", "v1\n"),
        ],
    );
    let mut sys = System::start(&nats, &repo, &[]);
    sys.add_runner(
        "r0",
        &[],
        &[
            ("SECRET_TOKEN", "hunter2"),
            ("AWS_SECRET_ACCESS_KEY", "also-secret"),
        ],
    );
    results(&sys, 1).await;
    let b = repo.commit("two", &[("other.txt", "x")]);
    let all = results(&sys, 2).await;
    for (r, sha) in all.iter().zip([&a, &b]) {
        assert_eq!(r["status"], "passed", "{r:#}");
        let out = r["output_tail"].as_str().unwrap();
        assert!(out.contains(&format!("JETCI_COMMIT={sha}")), "{out}");
        assert!(
            out.contains("JETCI_BRANCH=main") && out.contains("JETCI_REPO=app"),
            "{out}"
        );
        assert!(
            out.contains("JETCI_RUN=1") && out.contains("JETCI_ATTEMPT=1"),
            "{out}"
        );
        assert!(out.contains("FROM_REPO=yes"), "{out}");
        assert!(
            !out.contains("hunter2") && !out.contains("also-secret") && !out.contains("NATS_"),
            "{out}"
        );
    }

    // And no workspace outlives its job (deleted in the background once the job is acked).
    let jobs = sys.work.path().join("r0").join("jobs");
    assert!(
        jobs.is_dir(),
        "the runner's jobs directory {jobs:?} is missing"
    );
    wait_until_async("every workspace deleted", BOUND, async || {
        let left: Vec<_> = std::fs::read_dir(&jobs)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        left.is_empty()
            .then_some(())
            .ok_or_else(|| format!("workspaces left in {jobs:?}: {left:?}"))
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_jetci_toml_is_the_commits_error_with_the_line() {
    let nats = NatsServer::start();
    let repo = GitRepo::new();
    repo.commit(
        "bad config",
        &[(".jetci.toml", "command = \"true\"\ntimeout = 5\n")],
    );
    let mut sys = System::start(&nats, &repo, &[]);
    sys.add_runner("r0", &[], &[]);
    let r = &results(&sys, 1).await[0];
    assert_eq!(r["status"], "error", "{r:#}");
    let reason = r["reason"].as_str().unwrap();
    assert!(
        reason.contains(".jetci.toml") && reason.contains("line 2"),
        "{reason}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn junit_counts_and_a_shared_cache_dir() {
    let nats = NatsServer::start();
    let repo = GitRepo::new();
    let script = r#"mkdir -p out
cat > out/junit.xml <<'XML'
<testsuites><testsuite name="m">
  <testcase classname="m" name="ok"/>
  <testcase classname="m" name="bad"><failure message="1 != 2"/></testcase>
  <testcase classname="m" name="later"><skipped/></testcase>
</testsuite></testsuites>
XML
echo hit >> "$JETCI_CACHE_DIR/hits"
echo "cache hits: $(wc -l < "$JETCI_CACHE_DIR/hits")"
"#;
    repo.commit(
        "junit",
        &[
            ("ci.sh", script),
            (
                ".jetci.toml",
                &toml("sh ci.sh", "junit = [\"out/*.xml\"]\n"),
            ),
        ],
    );
    let mut sys = System::start(&nats, &repo, &[]);
    let cache = sys.work.path().join("cache");
    sys.add_runner("r0", &["--cache-dir", cache.to_str().unwrap()], &[]);
    let r = &results(&sys, 1).await[0];
    assert_eq!(r["status"], "passed", "{r:#}");
    let t = &r["tests"];
    assert_eq!(
        (t["tests"].as_u64(), t["passed"].as_u64()),
        (Some(3), Some(1)),
        "{r:#}"
    );
    assert_eq!(
        (t["failed"].as_u64(), t["skipped"].as_u64()),
        (Some(1), Some(1)),
        "{r:#}"
    );
    assert_eq!(t["failures"][0], "m.bad", "{r:#}");
    assert!(
        r["output_tail"].as_str().unwrap().contains("cache hits: 1"),
        "{r:#}"
    );

    // The next job sees the cache (and only the cache) of the one before.
    repo.commit("again", &[("x.txt", "x")]);
    let all = results(&sys, 2).await;
    assert!(
        all[1]["output_tail"]
            .as_str()
            .unwrap()
            .contains("cache hits: 2"),
        "{:#}",
        all[1]
    );
}

/// The job state `ci-jobs` holds for `job`'s key, `assigned` to its runner, with `labels`.
fn assigned_state(job: &JobMsg, labels: &[&str]) -> JobState {
    JobState {
        v: VERSION,
        repo: job.repo.clone(),
        branch: job.branch.clone(),
        sha: job.sha.clone(),
        run: job.run,
        job: None,
        phase: JobPhase::Assigned,
        attempt: job.attempt,
        runner: Some(job.runner.clone()),
        job_seq: None,
        labels: labels.iter().map(|l| l.to_string()).collect(),
        status: None,
        reason: None,
        cancel: None,
        updated_at: messages::now(),
    }
}

/// Writes `job`'s `assigned` state (labels `from-key`), then, unless `later` leaves it as it is,
/// the state `later` makes of it (another writer), and publishes the job on runner `r1`'s subject
/// with the assignment's state (labels `from-headers`) and revision in its headers, as a
/// dispatcher does.
async fn assign_and_send(
    js: &async_nats::jetstream::Context,
    kv: &kv::Store,
    job: &JobMsg,
    later: impl Fn(&mut JobState),
) {
    let assigned = assigned_state(job, &["from-key"]);
    let revision = kv
        .create(job.key(), messages::encode(&assigned))
        .await
        .expect("create");
    let mut moved = assigned.clone();
    later(&mut moved);
    if moved != assigned {
        kv.update(job.key(), messages::encode(&moved), revision)
            .await
            .expect("update");
    }
    let carried = assigned_state(job, &["from-headers"]);
    let publish = PublishMessage::build()
        .payload(messages::encode(job))
        .headers(attempt::assigned_headers(&carried, revision).expect("small state"));
    js.send_publish(names().jobs_subject("r1"), publish)
        .await
        .expect("publish")
        .await
        .expect("stored");
}

/// The state `ci-jobs` holds for `key` now.
async fn state_now(kv: &kv::Store, key: &str) -> JobState {
    let value = kv.get(key).await.expect("get").expect("a state");
    messages::decode(&value).expect("state")
}

/// The dispatcher sends its `assigned` state and that write's revision in the job's headers, and
/// the runner claims with one compare-and-set on that revision, without reading the key. The
/// test tells the two paths apart by what the runner writes: the state from the headers (its
/// labels differ from the stored one's on purpose), or, when the key moved since that revision,
/// the stored state, read. A cancel request in that state ends the job without running it.
#[tokio::test(flavor = "multi_thread")]
async fn a_runner_claims_in_one_write_from_the_state_its_job_carries() {
    let nats = NatsServer::start();
    let repo = GitRepo::new();
    let work = tempfile::tempdir().unwrap();
    let ran = work.path().join("ran");
    let shas = [
        repo.commit("one", &[(".jetci.toml", &toml("true", ""))]),
        repo.commit("two", &[("f", "2")]),
        repo.commit(
            "three",
            &[(
                ".jetci.toml",
                &toml(&format!("touch {}", ran.display()), ""),
            )],
        ),
    ];
    let runner = spawn_runner(&nats.url(), "r1", work.path(), &[]);
    runner.wait_for_log_async("runner ready", BOUND).await;
    let js = js(&nats.url()).await;
    let kv = js
        .get_key_value(names().jobs_bucket())
        .await
        .expect("the jobs bucket");

    let job = |sha: &str| JobMsg {
        v: VERSION,
        repo: REPO.into(),
        url: repo.path().to_string_lossy().into_owned(),
        branch: "main".into(),
        sha: sha.to_string(),
        run: 1,
        job: None,
        attempt: 1,
        runner: "r1".into(),
        author: String::new(),
        summary: String::new(),
        commit_seq: 1,
        assigned_at: messages::now(),
        job_name: None,
    };
    // The key is where the headers say: the claim writes the headers' state over it.
    let first = job(&shas[0]);
    assign_and_send(&js, &kv, &first, |_| {}).await;

    // The key moved on since (someone wrote it): the claim reads it and writes over that.
    let second = job(&shas[1]);
    assign_and_send(&js, &kv, &second, |s| {
        s.reason = Some("written after the assignment".into())
    })
    .await;

    // `jetci cancel` between the assignment and the claim: the claim reads the key, and the
    // command never starts.
    let third = job(&shas[2]);
    assign_and_send(&js, &kv, &third, |s| s.cancel = Some("by the test".into())).await;

    let results = wait_results(&nats.url(), 3, BOUND).await;
    let status = |sha: &str| {
        let r = results.iter().find(|r| r["sha"] == sha).expect("a result");
        (r["status"].clone(), r["reason"].clone())
    };
    for sha in &shas[..2] {
        assert_eq!(status(sha).0, "passed", "{results:#?}\n{}", runner.log());
    }
    assert_eq!(
        status(&shas[2]),
        ("cancelled".into(), "cancelled by the test".into()),
        "{results:#?}\n{}",
        runner.log()
    );
    assert!(!ran.exists(), "the cancelled job's command ran");

    // The bucket keeps one revision per key, so the claim is seen through the final state,
    // which the runner writes over its claim (compare-and-set on the claim's revision), after it
    // stored the result: wait for each.
    for job in [&first, &second, &third] {
        let key = job.key();
        wait_job(&nats.url(), &key, "final", BOUND, |v| v["phase"] == "final").await;
    }
    let done = state_now(&kv, &first.key()).await;
    assert_eq!(done.phase, JobPhase::Final, "{done:?}");
    assert_eq!(
        done.labels,
        ["from-headers"],
        "claimed from the headers: {done:?}"
    );
    let done = state_now(&kv, &second.key()).await;
    assert_eq!(done.phase, JobPhase::Final, "{done:?}");
    assert_eq!(done.labels, ["from-key"], "claimed from the key: {done:?}");
    let done = state_now(&kv, &third.key()).await;
    assert_eq!(
        (done.phase, done.status),
        (JobPhase::Final, Some(Status::Cancelled)),
        "{done:?}"
    );
}
