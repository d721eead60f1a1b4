//! `--metrics-addr`: the dispatcher and the runner serve Prometheus text whose counters match
//! what happened.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use jetci_e2e::{failing_test, free_port, passing_test, wait_results, GitRepo, NatsServer, Proc};

const BOUND: Duration = Duration::from_secs(120);

/// `/metrics` parsed: every sample line `name{labels} value` → value. Panics on a line that is
/// not a comment and not a sample, so the test also checks the format.
fn scrape(addr: &str) -> HashMap<String, f64> {
    let deadline = Instant::now() + BOUND;
    let body = loop {
        if let Ok(mut s) = TcpStream::connect(addr) {
            let _ = write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n");
            let mut out = String::new();
            if s.read_to_string(&mut out).is_ok() && out.contains(" 200 ") {
                break out
                    .split_once("\r\n\r\n")
                    .map(|x| x.1.to_string())
                    .unwrap_or_default();
            }
        }
        assert!(Instant::now() < deadline, "no metrics at {addr}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut samples = HashMap::new();
    for line in body
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample: {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("not a number in {line:?}"));
        samples.insert(name.to_string(), value);
    }
    samples
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_what_happened() {
    let nats = NatsServer::start();
    let url = nats.url();
    let work = tempfile::tempdir().unwrap();
    let repo = GitRepo::new();
    let (ok_name, ok_body) = passing_test();
    repo.commit("first", &[(ok_name, ok_body)]);
    let w_addr = format!("127.0.0.1:{}", free_port());
    let w_listen = format!("127.0.0.1:{}", free_port());
    let (d_addr, r_addr) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let path = repo.path().to_str().unwrap().to_string();
    let dir = work.path().join("r0");
    let _procs = [
        Proc::spawn(
            "jetci-observer",
            &[
                "-s",
                &url,
                "--poll-interval",
                "200ms",
                "--name",
                "app",
                &path,
            ],
            &[],
        ),
        Proc::spawn(
            "jetci-dispatcher",
            &["-s", &url, "--metrics-addr", &d_addr],
            &[],
        ),
        Proc::spawn(
            "jetci-web",
            &["-s", &url, "--listen", &w_listen, "--metrics-addr", &w_addr],
            &[],
        ),
        Proc::spawn(
            "jetci-runner",
            &[
                "-s",
                &url,
                "--id",
                "r0",
                "--work-dir",
                dir.to_str().unwrap(),
                "--metrics-addr",
                &r_addr,
            ],
            &[],
        ),
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
