//! `--metrics-addr`: the dispatcher and the runner serve Prometheus text whose counters match
//! what happened.
//!
//! Each process counts a result a moment after it is stored (the runner once the publish is
//! acked, the dispatcher once the job state says final, the web once its view has it), so each
//! scrape is waited for until it has counted all three results, and only then checked number by
//! number. The metric names are spelled out: the test checks what a Prometheus scraper sees.

use crate::support::git::{failing_test, passing_test, GitRepo};
use crate::support::jetstream::wait_results;
use crate::support::nats::{free_addr, NatsServer};
use crate::support::prom::{scrape, Samples};
use crate::support::system::{spawn_dispatcher, spawn_observer, spawn_runner, spawn_web};
use crate::support::waiting::{wait_until_async, BOUND};

// The dispatcher and the runner say which kind of result (`run`, or a pipeline's `job`).
const PASSED: &str = "jetci_results_total{status=\"passed\",kind=\"run\"}";
const FAILED: &str = "jetci_results_total{status=\"failed\",kind=\"run\"}";
const JOB_PASSED: &str = "jetci_results_total{status=\"passed\",kind=\"job\"}";
// jetci-web counts the results it shows, by status alone.
const WEB_PASSED: &str = "jetci_results_total{status=\"passed\"}";
const WEB_FAILED: &str = "jetci_results_total{status=\"failed\"}";

/// Scrapes `addr` until `counted` says every result is in; returns that scrape.
async fn scrape_when(what: &str, addr: &str, counted: impl Fn(&Samples) -> bool) -> Samples {
    wait_until_async(what, BOUND, async || {
        let m = scrape(addr);
        if counted(&m) {
            Ok(m)
        } else {
            Err(format!("{m:#?}"))
        }
    })
    .await
}

/// Results of either status counted so far.
fn results_counted(m: &Samples) -> f64 {
    m.get(PASSED).copied().unwrap_or(0.0) + m.get(FAILED).copied().unwrap_or(0.0)
}

/// [`results_counted`] for jetci-web.
fn web_results_counted(m: &Samples) -> f64 {
    m.get(WEB_PASSED).copied().unwrap_or(0.0) + m.get(WEB_FAILED).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_what_happened() {
    let nats = NatsServer::start();
    let url = nats.url();
    let work = tempfile::tempdir().unwrap();
    let repo = GitRepo::new();
    let (ok_name, ok_body) = passing_test();
    repo.commit("first", &[(ok_name, ok_body)]);
    let (d_addr, r_addr, w_addr) = (free_addr(), free_addr(), free_addr());
    let _procs = [
        spawn_observer(&url, &repo, &[]),
        spawn_dispatcher(&url, &["--metrics-addr", &d_addr]),
        spawn_web(&url, &free_addr(), &["--metrics-addr", &w_addr]),
        spawn_runner(&url, "r0", work.path(), &["--metrics-addr", &r_addr]),
    ];
    wait_results(&url, 1, BOUND).await;
    let (bad_name, bad_body) = failing_test();
    repo.commit("breaks", &[(bad_name, bad_body)]);
    repo.commit("still broken", &[("x.txt", "x")]);
    wait_results(&url, 3, BOUND).await;

    let d = scrape_when("the dispatcher to count 3 results", &d_addr, |m| {
        results_counted(m) >= 3.0
    })
    .await;
    assert_eq!(d[FAILED], 2.0, "{d:#?}");
    assert_eq!(d["jetci_commits_received_total"], 3.0, "{d:#?}");
    assert_eq!(d["jetci_jobs_assigned_total"], 3.0, "{d:#?}");
    assert_eq!(d[PASSED], 1.0, "{d:#?}");
    assert!(
        !d.contains_key("jetci_jobs_reassigned_total"),
        "nothing was reassigned: {d:#?}"
    );

    // The runner counts a result, then records its duration: wait for both.
    let r = scrape_when("the runner to count 3 results", &r_addr, |m| {
        results_counted(m) >= 3.0 && m.get("jetci_job_duration_seconds_count").copied() >= Some(3.0)
    })
    .await;
    assert_eq!(r[PASSED], 1.0, "{r:#?}");
    assert_eq!(r[FAILED], 2.0, "{r:#?}");
    assert_eq!(r["jetci_job_duration_seconds_count"], 3.0, "{r:#?}");
    assert!(r.contains_key("jetci_heartbeat_age_seconds"), "{r:#?}");

    // The dashboard counts the results it shows.
    let w = scrape_when("the web to count 3 results", &w_addr, |m| {
        web_results_counted(m) >= 3.0
    })
    .await;
    assert_eq!(w[WEB_FAILED], 2.0, "{w:#?}");
    assert_eq!(w[WEB_PASSED], 1.0, "{w:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pipelines_run_and_its_jobs_are_counted_apart() {
    let nats = NatsServer::start();
    let url = nats.url();
    let work = tempfile::tempdir().unwrap();
    let repo = GitRepo::new();
    let file = "[jobs.a]\ncommand = \"true\"\n\n[jobs.b]\ncommand = \"true\"\nneeds = [\"a\"]\n";
    repo.commit("pipeline", &[(".jetci.toml", file)]);
    let (d_addr, r_addr) = (free_addr(), free_addr());
    let _procs = [
        spawn_observer(&url, &repo, &[]),
        spawn_dispatcher(&url, &["--metrics-addr", &d_addr]),
        spawn_runner(&url, "r0", work.path(), &["--metrics-addr", &r_addr]),
    ];
    // a's, b's and the run's.
    wait_results(&url, 3, BOUND).await;
    let d = scrape_when("the dispatcher to count the run", &d_addr, |m| {
        m.get(PASSED).copied() >= Some(1.0) && m.get(JOB_PASSED).copied() >= Some(2.0)
    })
    .await;
    assert_eq!(d[PASSED], 1.0, "one run: {d:#?}");
    assert_eq!(d[JOB_PASSED], 2.0, "two jobs: {d:#?}");
    let r = scrape_when("the runner to count the jobs", &r_addr, |m| {
        m.get(JOB_PASSED).copied() >= Some(2.0)
    })
    .await;
    assert_eq!(r[JOB_PASSED], 2.0, "{r:#?}");
    assert!(
        !r.contains_key(PASSED),
        "the runner published no run's result: {r:#?}"
    );
}
