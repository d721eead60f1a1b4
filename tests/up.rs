//! The newcomer's path: `jetci up` on a repository starts its own nats-server and the whole
//! system, prints each result, writes `test_results/<sha>`, and Ctrl-C stops everything.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use jetci_e2e::{failing_test, free_port, passing_test, wait_http, GitRepo, Proc};
use nix::sys::signal::Signal;

const BOUND: Duration = Duration::from_secs(120);

#[test]
fn jetci_up_runs_everything_and_stops_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let web_port = free_port();
    let web = format!("127.0.0.1:{web_port}");
    let store = dir.path().join(".jetci");
    let results_dir = dir.path().join("test_results");
    let repo = GitRepo::new();
    let (ok_name, ok_body) = passing_test();
    let first = repo.commit("first", &[(ok_name, ok_body)]);

    let mut up = Proc::spawn(
        "jetci",
        &[
            "-s",
            &url,
            "up",
            "--runners",
            "1",
            "--poll-interval",
            "200ms",
            "--store",
            store.to_str().unwrap(),
            "--results-dir",
            results_dir.to_str().unwrap(),
            "--web",
            &web,
            repo.path().to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        up.wait_for_log(&format!("passed  {}", repo_name(&repo)), BOUND),
        "{}",
        up.log()
    );
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_ok(),
        "jetci up started a nats-server on {url}"
    );
    assert!(
        up.log().contains(&format!("dashboard http://{web}/")),
        "{}",
        up.log()
    );
    // The dashboard rebuilds its view from the streams right after it starts: wait until it
    // names something.
    let page = wait_http(&web, "/api/repos", BOUND, |r| !r.body.ends_with("[]")).body;
    assert!(
        page.contains(&repo_name(&repo)),
        "the dashboard knows the repository: {page}"
    );

    let (bad_name, bad_body) = failing_test();
    let second = repo.commit("breaks", &[(bad_name, bad_body)]);
    assert!(
        up.wait_for_log(&format!("failed  {}", repo_name(&repo)), BOUND),
        "{}",
        up.log()
    );

    for (sha, status) in [(&first, "passed"), (&second, "failed")] {
        let file = results_dir.join(sha);
        let text =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(text.contains(status), "{}:\n{text}", file.display());
    }
    let failed = std::fs::read_to_string(results_dir.join(&second)).unwrap();
    assert!(
        failed.contains("FAILED"),
        "the file holds the output tail:\n{failed}"
    );

    // Ctrl-C: everything it started stops, the nats-server too.
    up.signal(Signal::SIGINT);
    let status = up.wait_exit(BOUND).expect("jetci up exits after Ctrl-C");
    assert!(status.success(), "{status:?}\n{}", up.log());
    let deadline = Instant::now() + BOUND;
    while TcpStream::connect(("127.0.0.1", port)).is_ok()
        || TcpStream::connect(("127.0.0.1", web_port)).is_ok()
    {
        assert!(
            Instant::now() < deadline,
            "the nats-server or the dashboard it started is still running"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn repo_name(repo: &GitRepo) -> String {
    jetci::subjects::repo_slug(repo.path().to_str().unwrap())
}
