//! The newcomer's path: `jetci up` on a repository starts its own nats-server and the whole
//! system, prints each result, writes `test_results/<sha>`, and Ctrl-C stops everything.

use std::net::TcpStream;

use nix::sys::signal::Signal;

use crate::support::git::{failing_test, passing_test, GitRepo};
use crate::support::http::wait_http;
use crate::support::nats::free_port;
use crate::support::processes::Proc;
use crate::support::waiting::{wait_until, BOUND};

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
    up.wait_for_log(&format!("passed  {}", repo_name(&repo)), BOUND);
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
    up.wait_for_log(&format!("failed  {}", repo_name(&repo)), BOUND);

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
    let status = up.wait_exit(BOUND);
    assert!(status.success(), "{status:?}\n{}", up.log());
    wait_until(
        "the nats-server and the dashboard it started to stop",
        BOUND,
        || {
            let listening: Vec<u16> = [port, web_port]
                .into_iter()
                .filter(|p| TcpStream::connect(("127.0.0.1", *p)).is_ok())
                .collect();
            listening
                .is_empty()
                .then_some(())
                .ok_or_else(|| format!("still listening on {listening:?}"))
        },
    );
}

fn repo_name(repo: &GitRepo) -> String {
    jetci::subjects::repo_slug(repo.path().to_str().unwrap())
}
