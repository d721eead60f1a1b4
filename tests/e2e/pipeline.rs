//! End-to-end tests of the core pipeline: a real nats-server, real git repositories, the real
//! observer, dispatcher and runners as processes; assertions on what lands in `CI_RESULTS`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::git::{failing_test, passing_test, GitRepo};
use crate::support::jetstream::{
    names, stream_messages, wait_commits_acked, wait_job_phase, wait_mark, wait_results,
};
use crate::support::nats::NatsServer;
use crate::support::system::{app_job, spawn_observer, System, REPO};
use crate::support::waiting::{wait_until_async, BOUND};

async fn results(url: &str, count: usize) -> Vec<Value> {
    wait_results(url, count, BOUND).await
}

fn by_sha(results: &[Value]) -> HashMap<String, Vec<Value>> {
    let mut map: HashMap<String, Vec<Value>> = HashMap::new();
    for r in results {
        map.entry(r["sha"].as_str().expect("sha").to_string())
            .or_default()
            .push(r.clone());
    }
    map
}

/// Waits until the system settles and asserts nothing more arrives: exactly `count` results.
async fn assert_exactly(url: &str, count: usize) -> Vec<Value> {
    let got = results(url, count).await;
    // Give a duplicate every chance to show up: the lease is 3 s, so 5 s covers a reassignment.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let n = names();
    let all = stream_messages(url, &n.results_stream(), &n.results_filter()).await;
    assert_eq!(
        all.len(),
        count,
        "expected exactly {count} results, got {all:#?}"
    );
    got
}

#[tokio::test(flavor = "multi_thread")]
async fn every_new_commit_is_tested_once_with_its_branch_and_status() {
    let nats = NatsServer::start();
    let repo = GitRepo::new();
    let (ok_name, ok_body) = passing_test();
    let first = repo.commit("first", &[(ok_name, ok_body)]);
    let sys = System::start(&nats, &repo, &["r0", "r1"]);

    // A repository the observer has never seen: only the head is tested.
    let initial = results(&sys.url, 1).await;
    assert_eq!(initial[0]["sha"], first);
    assert_eq!(initial[0]["status"], "passed", "{:#}", initial[0]);

    // Three commits at once on main, one failing, and one on a branch with '/' and '.'.
    let (bad_name, bad_body) = failing_test();
    let c1 = repo.commit("c1", &[("a.txt", "1")]);
    let c2 = repo.commit("c2 breaks", &[(bad_name, bad_body)]);
    let c3 = repo.commit("c3", &[("b.txt", "3")]);
    repo.checkout_new_branch("feature/a.b");
    let f1 = repo.commit("f1", &[("f.txt", "f")]);

    let all = assert_exactly(&sys.url, 5).await;
    let map = by_sha(&all);
    for (sha, branch, status) in [
        (&c1, "main", "passed"),
        (&c2, "main", "failed"),
        (&c3, "main", "failed"),
        (&f1, "feature/a.b", "failed"),
    ] {
        let r = &map
            .get(sha)
            .unwrap_or_else(|| panic!("no result for {sha}: {all:#?}"))[0];
        assert_eq!(r["branch"], branch, "{r:#}");
        assert_eq!(r["status"], status, "{r:#}");
        assert_eq!(r["run"], 1);
        assert_eq!(r["attempt"], 1);
        assert_eq!(r["repo"], "app");
        assert!(r["duration_ms"].is_u64());
        // Attempt 1 of the run's only job logged on its own subject.
        let log_subject = names().logs_subject(&app_job(sha), 1);
        assert_eq!(r["log_subject"], log_subject.as_str(), "{r:#}");
    }
    let failed = &map[&c2][0];
    assert_eq!(failed["exit_code"], 1, "{failed:#}");
    assert!(
        failed["output_tail"].as_str().unwrap().contains("FAILED"),
        "the output tail shows the failure: {failed:#}"
    );
    // Oldest first on main: the commits were published (and queued) in history order.
    let seq = |sha: &String| map[sha][0]["commit_seq"].as_u64().expect("commit_seq");
    assert!(seq(&c1) < seq(&c2) && seq(&c2) < seq(&c3), "{all:#?}");
    drop(sys);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_observer_neither_misses_nor_repeats_a_commit() {
    let nats = NatsServer::start();
    let repo = GitRepo::new();
    let (name, body) = passing_test();
    let a = repo.commit("a", &[(name, body)]);
    let mut sys = System::start(&nats, &repo, &["r0"]);
    results(&sys.url, 1).await;

    sys.observer.kill();
    let b = repo.commit("b", &[("b.txt", "b")]);
    let c = repo.commit("c", &[("c.txt", "c")]);
    sys.observer = spawn_observer(&sys.url, &repo, &[]);

    let all = assert_exactly(&sys.url, 3).await;
    let map = by_sha(&all);
    for sha in [&a, &b, &c] {
        assert_eq!(
            map.get(sha).map(Vec::len),
            Some(1),
            "one result for {sha}: {all:#?}"
        );
    }
    // A second restart with nothing new publishes nothing.
    sys.observer.kill();
    sys.observer = spawn_observer(&sys.url, &repo, &[]);
    sys.observer.wait_for_log_async("observing", BOUND).await;
    assert_exactly(&sys.url, 3).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_runners_job_finishes_on_another_runner_with_one_result() {
    let nats = NatsServer::start();
    let repo = GitRepo::new();
    let sha = repo.commit(
        "slow",
        &[(".jetci.toml", "command = \"sleep 4; echo slow-done\"\n")],
    );
    let mut sys = System::start(&nats, &repo, &["r0", "r1"]);

    // Find the runner that runs the job, from the job's state, and kill it mid-test.
    let holder = wait_job_phase(&sys.url, &app_job(&sha).key(), "running", BOUND).await;
    let index: usize = holder
        .trim_start_matches('r')
        .parse()
        .expect("runner id r<N>");
    let killed_at = Instant::now();
    sys.runners[index].kill();

    let all = assert_exactly(&sys.url, 1).await;
    let r = &all[0];
    assert_eq!(r["status"], "passed", "{r:#}");
    assert_eq!(r["attempt"], 2, "the job ran again as attempt 2: {r:#}");
    assert_ne!(r["runner"], holder.as_str(), "{r:#}");
    assert!(r["output_tail"].as_str().unwrap().contains("slow-done"));
    eprintln!(
        "job moved and finished {:?} after the kill",
        killed_at.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_messages_are_terminated_and_nothing_stops() {
    let nats = NatsServer::start();
    let repo = GitRepo::new();
    let (name, body) = passing_test();
    repo.commit("a", &[(name, body)]);
    let sys = System::start(&nats, &repo, &["r0"]);
    results(&sys.url, 1).await;

    let client = async_nats::connect(sys.url.as_str())
        .await
        .expect("connect");
    let js = async_nats::jetstream::new(client);
    let n = names();
    let (commits, jobs) = (n.commits_subject(REPO), n.jobs_subject("r0"));
    for (subject, body) in [
        (&commits, &b"{not json"[..]),
        (&commits, br#"{"v":2,"repo":"app"}"#),
        (&commits, br#"{"v":1,"repo":"app","url":"/x","branch":"main","sha":"HEAD","run":1,"published_at":"2026-01-01T00:00:00Z"}"#),
        (&jobs, b"\xff\xfe garbage"),
        (&jobs, br#"{"v":1,"surprise":true}"#),
    ] {
        js.publish(subject.clone(), body.to_vec().into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }
    // The processes say why they dropped each one, and the work queues are empty again.
    let terminated = |p: &crate::support::processes::Proc, what: &str, n: usize| {
        let log = p.log();
        let count = log.matches(what).count();
        (count >= n)
            .then_some(())
            .ok_or_else(|| format!("{count} {what:?} lines in:\n{log}"))
    };
    wait_until_async("3 terminated commits", BOUND, async || {
        terminated(&sys.dispatcher, "terminating a commit", 3)
    })
    .await;
    wait_until_async("2 terminated jobs", BOUND, async || {
        terminated(&sys.runners[0], "terminating a job", 2)
    })
    .await;
    for stream in [n.commits_stream(), n.jobs_stream()] {
        let left = stream_messages(&sys.url, &stream, ">").await;
        assert!(left.is_empty(), "{stream} still holds {left:#?}");
    }

    // And the pipeline still works.
    let b = repo.commit("b", &[("b.txt", "b")]);
    let all = assert_exactly(&sys.url, 2).await;
    assert!(
        all.iter()
            .any(|r| r["sha"] == b.as_str() && r["status"] == "passed"),
        "{all:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn commits_wait_for_a_runner_and_start_when_one_registers() {
    let nats = NatsServer::start();
    let repo = GitRepo::new();
    let (name, body) = passing_test();
    let sha = repo.commit("a", &[(name, body)]);
    let mut sys = System::start(&nats, &repo, &[]);

    // No runner: the commit is taken by nobody and waits in CI_COMMITS; no result appears.
    sys.observer
        .wait_for_log_async("published commit", BOUND)
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let n = names();
    assert!(stream_messages(&sys.url, &n.results_stream(), ">")
        .await
        .is_empty());
    assert_eq!(
        stream_messages(&sys.url, &n.commits_stream(), ">")
            .await
            .len(),
        1
    );

    sys.add_runner("late", &[], &[]);
    let all = assert_exactly(&sys.url, 1).await;
    assert_eq!(all[0]["sha"], sha.as_str());
    assert_eq!(all[0]["runner"], "late");
    assert_eq!(all[0]["status"], "passed");
}

/// With the observer stopped, makes on `repo`'s `main`: m1, a side branch of three commits from
/// m1, m2, `git merge --no-ff side` (main is the merge's first parent), then m3, and deletes
/// the side branch (so only `main`'s history brings its commits in). Returns main's new
/// commits, oldest first, and the side branch's.
fn merge_a_side_branch(repo: &GitRepo) -> (Vec<String>, Vec<String>) {
    let m1 = repo.commit("m1", &[("m.txt", "1")]);
    repo.checkout_new_branch("side");
    let side: Vec<String> = (1..=3)
        .map(|i| repo.commit(&format!("s{i}"), &[("s.txt", &i.to_string())]))
        .collect();
    repo.checkout("main");
    let m2 = repo.commit("m2", &[("m.txt", "2")]);
    repo.run_git(&["merge", "-q", "--no-ff", "-m", "merge side", "side"]);
    let merge = repo.head();
    repo.run_git(&["branch", "-q", "-D", "side"]);
    let m3 = repo.commit("m3", &[("m.txt", "3")]);
    (vec![m1, m2, merge, m3], side)
}

/// Runs the merged-side-branch history of [`merge_a_side_branch`] through the system, with
/// `config` as the repository's `.jetci.toml`; returns main's new commits, the side commits and
/// every commit that got a result (each with its status), once everything main's new head
/// brought in is published and tested.
async fn tested_after_a_merge(config: &str) -> (Vec<String>, Vec<String>, Vec<(String, String)>) {
    let nats = NatsServer::start();
    let repo = GitRepo::new();
    let first = repo.commit("first", &[(".jetci.toml", config)]);
    let mut sys = System::start(&nats, &repo, &["r0"]);
    results(&sys.url, 1).await;

    sys.observer.kill();
    let (main_line, side) = merge_a_side_branch(&repo);
    sys.observer = spawn_observer(&sys.url, &repo, &[]);
    // Main's mark moves to m3 only after everything its poll publishes before it; then every
    // published commit has its result once the work queue is empty.
    let head = main_line.last().expect("main's new head");
    wait_mark(&sys.url, b"main", head, BOUND).await;
    wait_commits_acked(&sys.url, BOUND).await;
    let n = names();
    let tested = stream_messages(&sys.url, &n.results_stream(), &n.results_filter())
        .await
        .into_iter()
        .map(|(_, r)| {
            (
                r["sha"].as_str().unwrap_or("").to_string(),
                r["status"].as_str().unwrap_or("").to_string(),
            )
        })
        .filter(|(sha, _)| *sha != first)
        .collect();
    (main_line, side, tested)
}

/// `history = "first-parent"`: of a side branch merged with `--no-ff`, the merge commit is
/// tested and the side branch's own commits are not. Failed before the change: the key was
/// refused (each commit's result an `error`) and all seven commits were tested.
#[tokio::test(flavor = "multi_thread")]
async fn first_parent_history_tests_only_the_main_lines_commits() {
    let config = "history = \"first-parent\"\ncommand = \"true\"\n";
    let (main_line, side, mut tested) = tested_after_a_merge(config).await;
    let mut passed: Vec<(String, String)> = main_line
        .iter()
        .map(|sha| (sha.clone(), "passed".to_string()))
        .collect();
    passed.sort();
    tested.sort();
    assert_eq!(tested, passed, "main's commits, each once (side: {side:?})");
}

/// The default, `history = "all"`: the side branch's commits are tested too, each once.
#[tokio::test(flavor = "multi_thread")]
async fn all_history_tests_a_merged_branchs_commits_too() {
    let (main_line, side, tested) = tested_after_a_merge("command = \"true\"\n").await;
    let mut want: Vec<&String> = main_line.iter().chain(&side).collect();
    want.sort();
    let mut got: Vec<&String> = tested.iter().map(|(sha, _)| sha).collect();
    got.sort();
    assert_eq!(got, want, "main's and the side branch's commits, each once");
    assert!(
        tested.iter().all(|(_, status)| status == "passed"),
        "{tested:?}"
    );
}
