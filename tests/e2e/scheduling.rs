//! Scheduling under backlog (issue 15): what cannot be placed holds back nothing that can.

use std::time::Duration;

use jetci::subjects::JobRef;
use serde_json::Value;

use crate::support::git::GitRepo;
use crate::support::jetstream::{wait_job, wait_results};
use crate::support::nats::NatsServer;
use crate::support::system::{spawn_dispatcher, spawn_observer_at, spawn_runner};
use crate::support::waiting::BOUND;

/// The observer flags for repository `name`, polled every 200 ms.
fn observer_flags(name: &str) -> [&str; 4] {
    ["--poll-interval", "200ms", "--name", name]
}

/// The results of repository `repo` among `all`.
fn of_repo<'a>(all: &'a [Value], repo: &str) -> Vec<&'a Value> {
    all.iter().filter(|r| r["repo"] == repo).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn commits_no_runner_can_take_hold_back_no_other_repository_and_start_when_one_joins() {
    let nats = NatsServer::start();
    let url = nats.url();
    let work = tempfile::tempdir().expect("a work dir for the runners");
    let _dispatcher = spawn_dispatcher(&url, &[]);
    // Two runners of one slot each, neither with a gpu.
    let _r1 = spawn_runner(&url, "r1", work.path(), &[]);
    let _r2 = spawn_runner(&url, "r2", work.path(), &[]);

    // Repository x: six commits that need a gpu (its head first, which a new observer tests,
    // then five more at once). With two slots the dispatcher used to hold four of them and
    // pull nothing more.
    let x = GitRepo::new();
    let gpu_toml = "command = \"true\"\nlabels = [\"gpu\"]\n";
    let mut gpu = vec![x.commit("gpu 0", &[(".jetci.toml", gpu_toml)])];
    let _x_observer = spawn_observer_at(&url, x.path(), &observer_flags("x"));
    let key = |repo: &str, sha: &str| JobRef::only(repo, sha, 1).key();
    let waits = |v: &Value| {
        v["phase"] == "queued" && v["reason"] == "waiting for a runner with labels [gpu]"
    };
    wait_job(&url, &key("x", &gpu[0]), "waiting for a gpu", BOUND, waits).await;
    for i in 1..6 {
        gpu.push(x.commit(&format!("gpu {i}"), &[("n", &i.to_string())]));
    }
    // Four of them wait for a runner with a gpu, recorded (the rest may be in the stream).
    for sha in &gpu[1..4] {
        wait_job(&url, &key("x", sha), "waiting for a gpu", BOUND, waits).await;
    }

    // Repository y, after them: every commit runs on the idle runners.
    let y = GitRepo::new();
    let toml = "command = \"true\"\n";
    let mut plain = vec![y.commit("y 0", &[(".jetci.toml", toml)])];
    let _y_observer = spawn_observer_at(&url, y.path(), &observer_flags("y"));
    let bound = Duration::from_secs(60);
    wait_results(&url, 1, bound).await;
    for i in 1..4 {
        plain.push(y.commit(&format!("y {i}"), &[("n", &i.to_string())]));
    }
    let all = wait_results(&url, plain.len(), bound).await;
    let ys = of_repo(&all, "y");
    assert_eq!(ys.len(), plain.len(), "{all:#?}");
    for r in &ys {
        assert_eq!(r["status"], "passed", "{r:#}");
        assert!(r["runner"] == "r1" || r["runner"] == "r2", "{r:#}");
    }
    assert!(
        of_repo(&all, "x").is_empty(),
        "no runner has a gpu: {all:#?}"
    );

    // A runner with a gpu joins: every one of x's commits runs on it.
    let _g1 = spawn_runner(&url, "g1", work.path(), &["--labels", "gpu"]);
    let all = wait_results(&url, plain.len() + gpu.len(), BOUND).await;
    let xs = of_repo(&all, "x");
    assert_eq!(xs.len(), gpu.len(), "{all:#?}");
    for sha in &gpu {
        let r = xs
            .iter()
            .find(|r| r["sha"] == sha.as_str())
            .unwrap_or_else(|| panic!("no result for x's {sha}: {all:#?}"));
        assert_eq!(r["status"], "passed", "{r:#}");
        assert_eq!(r["runner"], "g1", "{r:#}");
    }
}
