//! `--metrics-addr`: the dispatcher and the runner serve Prometheus text whose counters match
//! what happened.

use std::time::{Duration, Instant};

use jetci_e2e::prom::scrape;
use jetci_e2e::{
    failing_test, free_addr, passing_test, spawn_dispatcher, spawn_observer, spawn_runner,
    spawn_web, wait_results, GitRepo, NatsServer,
};

const BOUND: Duration = Duration::from_secs(120);

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
    wait_results(&url, "CI_RESULTS", "ci.results.>", 1, BOUND).await;
    let (bad_name, bad_body) = failing_test();
    repo.commit("breaks", &[(bad_name, bad_body)]);
    repo.commit("still broken", &[("x.txt", "x")]);
    wait_results(&url, "CI_RESULTS", "ci.results.>", 3, BOUND).await;

    // The dispatcher counts a result once the job state says final: wait for that.
    let deadline = Instant::now() + BOUND;
    let d = loop {
        let d = scrape(&d_addr);
        if d.get("jetci_results_total{status=\"failed\"}") == Some(&2.0) {
            break d;
        }
        assert!(
            Instant::now() < deadline,
            "dispatcher metrics never counted the results: {d:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(d["jetci_commits_received_total"], 3.0, "{d:#?}");
    assert_eq!(d["jetci_jobs_assigned_total"], 3.0, "{d:#?}");
    assert_eq!(d["jetci_results_total{status=\"passed\"}"], 1.0, "{d:#?}");
    assert!(
        !d.contains_key("jetci_jobs_reassigned_total"),
        "nothing was reassigned: {d:#?}"
    );

    let r = scrape(&r_addr);
    assert_eq!(r["jetci_results_total{status=\"passed\"}"], 1.0, "{r:#?}");
    assert_eq!(r["jetci_results_total{status=\"failed\"}"], 2.0, "{r:#?}");
    assert_eq!(r["jetci_job_duration_seconds_count"], 3.0, "{r:#?}");
    assert!(r.contains_key("jetci_heartbeat_age_seconds"), "{r:#?}");

    // The dashboard counts the results it shows.
    let deadline = Instant::now() + BOUND;
    loop {
        let w = scrape(&w_addr);
        if w.get("jetci_results_total{status=\"failed\"}") == Some(&2.0) {
            assert_eq!(w["jetci_results_total{status=\"passed\"}"], 1.0, "{w:#?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "web metrics never counted the results: {w:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
