//! End-to-end test of `jetci-manager`: a real nats-server, observer and dispatcher, and a
//! manager that owns every runner. A burst of slow commits makes it scale from `--min` to
//! `--max`; the queue drains with exactly one result per commit; the runners stop back down to
//! `--min` after the idle timeout; a killed runner is replaced; SIGTERM drains and exits cleanly.
//! All along, the manager's `/metrics` (`--metrics-addr`) is valid Prometheus text whose numbers
//! match what happened: runners running, started and stopped, the queue and the busy slots.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::support::git::GitRepo;
use crate::support::heavy;
use crate::support::jetstream::{names, stream_messages, wait_results};
use crate::support::nats::{free_addr, NatsServer};
use crate::support::processes::{process_table, Proc};
use crate::support::prom::{self, Samples};
use crate::support::system::{spawn_dispatcher, spawn_observer};
use crate::support::waiting::wait_until_async;

/// The manager's metrics (see `jetci::metrics::names`), spelled out: the test checks the names a
/// Prometheus scraper sees.
const RUNNERS: &str = "jetci_manager_runners";
const STARTED: &str = "jetci_manager_runners_started_total";
const STOPPED: &str = "jetci_manager_runners_stopped_total";
const QUEUE: &str = "jetci_queue_depth";
const BUSY: &str = "jetci_jobs_in_flight";

/// Generous bound for each step; the test waits on events, never for a fixed time.
const BOUND: Duration = Duration::from_secs(90);

/// Pids of the `jetci-runner` processes whose parent is `parent`, from the process table.
fn runner_children(parent: u32) -> Vec<u32> {
    let mut pids: Vec<u32> = process_table()
        .into_iter()
        // A zombie (state Z) has exited; the manager has not reaped it yet.
        .filter(|p| p.comm == "jetci-runner" && p.ppid == parent && p.state != 'Z')
        .map(|p| p.pid)
        .collect();
    pids.sort_unstable();
    pids
}

/// How many of the manager's own log lines (not its runners', which it forwards prefixed with
/// `[<id>]`) contain `needle`.
fn manager_lines(manager: &Proc, needle: &str) -> usize {
    manager
        .log()
        .lines()
        .filter(|l| !l.starts_with('[') && l.contains(needle))
        .count()
}

/// One value of a scrape; 0 for a series the manager has not written yet.
fn value(m: &Samples, name: &str) -> f64 {
    m.get(name).copied().unwrap_or(0.0)
}

/// Scrapes `addr` until `check` holds; panics after `bound` with `what`, the last scrape and the
/// manager's log. Returns the scrape that passed.
async fn wait_metrics(
    what: &str,
    addr: &str,
    manager: &Proc,
    bound: Duration,
    mut check: impl FnMut(&Samples) -> bool,
) -> Samples {
    let what = format!("metrics with {what}");
    wait_until_async(&what, bound, async || {
        let m = prom::scrape(addr);
        if check(&m) {
            Ok(m)
        } else {
            Err(format!("{m:#?}\nmanager log:\n{}", manager.log()))
        }
    })
    .await
}

/// Waits until the manager's runners (its `jetci-runner` children) satisfy `check`; panics
/// after `bound` with `what`, the runners and the manager's log.
async fn wait_runners(
    what: &str,
    manager: &Proc,
    bound: Duration,
    mut check: impl FnMut(&[u32]) -> bool,
) {
    let pid = manager.pid();
    wait_until_async(what, bound, async || {
        let runners = runner_children(pid);
        if check(&runners) {
            Ok(())
        } else {
            Err(format!(
                "runners {runners:?}\nmanager log:\n{}",
                manager.log()
            ))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn manager_scales_with_the_queue_and_replaces_a_killed_runner() {
    // Up to three runners and thirty commits: not beside another heavy test.
    let _heavy = heavy().await;
    let nats = NatsServer::start();
    let url = nats.url();
    let repo = GitRepo::new();
    let first = repo.commit("first", &[(".jetci.toml", "command = \"sleep 2\"\n")]);
    let work = tempfile::tempdir().expect("tempdir");
    let metrics = free_addr();
    let _observer = spawn_observer(&url, &repo, &[]);
    let _dispatcher = spawn_dispatcher(&url, &[]);
    let mut manager = Proc::spawn(
        "jetci-manager",
        &[
            "-s",
            &url,
            "--name",
            "m",
            "--min",
            "1",
            "--max",
            "3",
            "--idle-timeout",
            "3s",
            "--interval",
            "250ms",
            "--metrics-addr",
            &metrics,
            "--work-root",
            work.path().to_str().expect("utf-8 path"),
            "--",
            "--heartbeat",
            "1s",
        ],
        &[],
    );
    let pid = manager.pid();

    // --min 1: one runner, and the observer's first sight of the repository tests the head.
    wait_runners("the first runner", &manager, BOUND, |r| r.len() == 1).await;
    let initial = wait_results(&url, 1, BOUND).await;
    assert_eq!(initial[0]["sha"], first.as_str());
    wait_metrics(
        "one runner started and running",
        &metrics,
        &manager,
        BOUND,
        |m| value(m, RUNNERS) == 1.0 && value(m, STARTED) == 1.0 && value(m, STOPPED) == 0.0,
    )
    .await;

    // A burst of 30 slow commits: the manager scales to --max, never beyond.
    let mut shas = vec![first];
    for i in 0..30 {
        shas.push(repo.commit(&format!("c{i}"), &[]));
    }
    let mut most = 0;
    wait_runners("3 runners", &manager, BOUND, |r| {
        most = most.max(r.len());
        most >= 3
    })
    .await;
    assert!(
        manager.log().contains("scaling up"),
        "no decision logged:\n{}",
        manager.log()
    );

    // The queue drains while the pool stays at --max at most; the metrics say so too. Each
    // look samples the pool and the gauges.
    let (mut most_metric, mut most_queue, mut most_busy) = (0.0f64, 0.0f64, 0.0f64);
    let n = names();
    let (results_stream, results_filter) = (n.results_stream(), n.results_filter());
    wait_until_async("every commit's result", BOUND, async || {
        most = most.max(runner_children(pid).len());
        let m = prom::scrape(&metrics);
        most_metric = most_metric.max(value(&m, RUNNERS));
        most_queue = most_queue.max(value(&m, QUEUE));
        most_busy = most_busy.max(value(&m, BUSY));
        let done = stream_messages(&url, &results_stream, &results_filter).await;
        if done.len() >= shas.len() {
            Ok(())
        } else {
            Err(format!(
                "{} of {} results; manager log:\n{}",
                done.len(),
                shas.len(),
                manager.log()
            ))
        }
    })
    .await;
    assert_eq!(
        most, 3,
        "the manager ran {most} runners at once, --max is 3"
    );
    // The gauges are written at each decision: they saw the pool at --max, the 30 commits
    // waiting, and busy slots, but never more than the three runners have.
    assert_eq!(most_metric, 3.0, "{RUNNERS} peaked at {most_metric}");
    assert!(most_queue > 0.0, "{QUEUE} never showed the burst");
    assert!(
        most_busy > 0.0 && most_busy <= 3.0,
        "{BUSY} peaked at {most_busy}"
    );

    // Idle for --idle-timeout: back down to --min.
    wait_runners("the pool to shrink to 1", &manager, BOUND, |r| r.len() == 1).await;
    let log = manager.log();
    let decision = log
        .lines()
        .find(|l| l.contains("scaling down"))
        .unwrap_or_else(|| panic!("no scale-down decision logged:\n{log}"));
    for number in ["pending=", "waiting=", "busy=", "running=", "idle="] {
        assert!(decision.contains(number), "{decision}");
    }
    // Settled: one runner, nothing waits or runs, and the counters match the manager's own
    // account of each start and stop (reaped stops are logged a tick after the exit).
    let settled = wait_metrics("the pool back at --min", &metrics, &manager, BOUND, |m| {
        value(m, RUNNERS) == 1.0
            && value(m, QUEUE) == 0.0
            && value(m, BUSY) == 0.0
            && value(m, STARTED) == manager_lines(&manager, "runner started") as f64
            && value(m, STOPPED) == manager_lines(&manager, "runner stopped") as f64
    })
    .await;
    let started = value(&settled, STARTED);
    assert!(started >= 3.0, "{settled:#?}");
    assert!(value(&settled, STOPPED) >= 2.0, "{settled:#?}");
    assert_eq!(
        started - value(&settled, STOPPED),
        1.0,
        "no runner has crashed yet, so every start but the running one was a stop: {settled:#?}"
    );

    // Exactly one result per commit (the scale-down took over the idle timeout, time enough for
    // a duplicate to show), spread over all three runners.
    let results = stream_messages(&url, &results_stream, &results_filter).await;
    let mut per_sha: HashMap<String, usize> = HashMap::new();
    let mut runners = HashSet::new();
    for (_, r) in &results {
        *per_sha
            .entry(r["sha"].as_str().expect("sha").to_string())
            .or_default() += 1;
        runners.insert(r["runner"].as_str().unwrap_or("").to_string());
        assert_eq!(r["status"], "passed", "{r:#}");
    }
    assert_eq!(results.len(), shas.len(), "{results:#?}");
    for sha in &shas {
        assert_eq!(per_sha.get(sha), Some(&1), "commit {sha}: {results:#?}");
    }
    let expected: HashSet<String> = ["m-1", "m-2", "m-3"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(runners, expected);

    // A killed runner is replaced, and the replacement takes work.
    let victim = runner_children(pid)[0];
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).expect("kill the runner");
    wait_runners("a replacement runner", &manager, BOUND, |now| {
        now.len() == 1 && now[0] != victim
    })
    .await;
    assert!(
        manager.log().contains("exited unexpectedly"),
        "{}",
        manager.log()
    );
    // The replacement counts as a start (not a stop): one runner still runs.
    wait_metrics("the replacement counted", &metrics, &manager, BOUND, |m| {
        value(m, STARTED) == started + 1.0
            && value(m, STOPPED) == value(&settled, STOPPED)
            && value(m, RUNNERS) == 1.0
    })
    .await;
    let last = repo.commit("after the crash", &[]);
    let all = wait_results(&url, shas.len() + 1, BOUND).await;
    assert!(all.iter().any(|r| r["sha"] == last.as_str()), "{all:#?}");

    // SIGTERM drains: the runner exits, then the manager, cleanly.
    let replacement = runner_children(pid);
    let status = manager.stop();
    assert!(
        status.success(),
        "manager exited with {status}:\n{}",
        manager.log()
    );
    for p in replacement {
        assert!(
            !std::path::Path::new(&format!("/proc/{p}")).exists()
                || std::fs::read_to_string(format!("/proc/{p}/stat"))
                    .map(|s| s.contains(") Z "))
                    .unwrap_or(true),
            "runner {p} outlived its manager"
        );
    }
}
