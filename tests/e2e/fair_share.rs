//! The fair share of runners across repositories (issue 15): a big push to one repository does
//! not hold back another repository's commit. Two repositories, two runners; a backlog of
//! commits pushed to `a`, then one commit to `b`: `b`'s commit starts as soon as a slot frees,
//! not after `a`'s backlog. Asserted on the order results are stored in, not on times.

use serde_json::Value;

use crate::support::git::GitRepo;
use crate::support::jetstream::{names, stream_messages, wait_results};
use crate::support::nats::NatsServer;
use crate::support::processes::Proc;
use crate::support::system::{spawn_dispatcher, spawn_observer_at, spawn_runner};
use crate::support::waiting::{wait_until_async, BOUND};

/// Commits pushed to `a` at once.
const BACKLOG: usize = 24;

/// A repository whose every commit runs a short job.
fn repository() -> GitRepo {
    let repo = GitRepo::new();
    repo.commit("first", &[(".jetci.toml", "command = \"sleep 0.3\"\n")]);
    repo
}

fn observer(url: &str, repo: &GitRepo, name: &str) -> Proc {
    spawn_observer_at(
        url,
        repo.path(),
        &["--poll-interval", "200ms", "--name", name],
    )
}

/// The repositories of the results stored so far, in stream order.
async fn stored(url: &str) -> Vec<String> {
    let n = names();
    stream_messages(url, &n.results_stream(), &n.results_filter())
        .await
        .into_iter()
        .map(|(_, r)| r["repo"].as_str().unwrap_or("").to_string())
        .collect()
}

/// Runs the scenario with `dispatchers` dispatchers; returns how many of `a`'s backlog results
/// were stored between `b`'s commit and `b`'s result.
async fn a_results_while_b_waits(dispatchers: usize) -> usize {
    let nats = NatsServer::start();
    let url = nats.url();
    let work = tempfile::tempdir().unwrap();
    let (a, b) = (repository(), repository());
    let _observers = [observer(&url, &a, "a"), observer(&url, &b, "b")];
    let _dispatchers: Vec<Proc> = (0..dispatchers)
        .map(|_| spawn_dispatcher(&url, &[]))
        .collect();
    let _runners = [
        spawn_runner(&url, "r0", work.path(), &[]),
        spawn_runner(&url, "r1", work.path(), &[]),
    ];
    // Each repository's first head.
    wait_results(&url, 2, BOUND).await;

    for i in 0..BACKLOG {
        a.commit(&format!("a {i}"), &[("n", &i.to_string())]);
    }
    // Wait until a's backlog is being tested (so it is queued ahead of b's commit).
    wait_until_async("a's backlog started", BOUND, async || {
        let got = stored(&url).await;
        let a_done = got.iter().filter(|r| *r == "a").count();
        if a_done >= 3 {
            Ok(())
        } else {
            Err(format!("{got:?}"))
        }
    })
    .await;
    let b_sha = b.commit("b 1", &[("n", "1")]);
    let before = stored(&url).await.iter().filter(|r| *r == "a").count();

    let all: Vec<Value> = wait_results(&url, 2 + BACKLOG + 1, BOUND).await;
    let b_at = all
        .iter()
        .position(|r| r["sha"] == b_sha.as_str())
        .expect("b's result");
    let a_before_b = all[..b_at].iter().filter(|r| r["repo"] == "a").count();
    assert!(
        a_before_b >= before,
        "a's results stored before b's commit: {before}, before b's result: {a_before_b}"
    );
    a_before_b - before
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repositorys_commit_starts_beside_another_repositorys_backlog() {
    let waited = a_results_while_b_waits(1).await;
    // Two slots: what ran or started when b's commit came, then b. Arrival order would
    // have run the rest of a's backlog first (about 20).
    assert!(
        waited <= 6,
        "{waited} of a's commits finished while b's commit waited"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_share_holds_with_two_dispatchers() {
    let waited = a_results_while_b_waits(2).await;
    assert!(
        waited <= 8,
        "{waited} of a's commits finished while b's commit waited"
    );
}
