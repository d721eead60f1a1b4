//! Pipelines: a commit whose `.jetci.toml` names several jobs runs them as one run, spread over
//! the runners, with `needs`, `matrix`, `parallel`, `fail_fast` and `allow_failure`; each job has
//! its own result and the run one result listing them all.

use serde_json::Value;

use jetci::subjects::JobRef;

use crate::jobs::jetci;
use crate::support::git::GitRepo;
use crate::support::jetstream::{
    names, stream_messages, wait_commits_acked, wait_job_phase, wait_results,
};
use crate::support::nats::NatsServer;
use crate::support::system::System;
use crate::support::waiting::{wait_until_async, BOUND};

/// The run's result (`ci.results.app.<sha>.<run>`) and its jobs' results, by job name.
fn split(results: &[Value], sha: &str) -> (Value, Vec<Value>) {
    let runs: Vec<&Value> = results
        .iter()
        .filter(|r| r["sha"] == sha && r.get("job").is_none())
        .collect();
    assert_eq!(runs.len(), 1, "one run result: {results:#?}");
    let jobs = results
        .iter()
        .filter(|r| r["sha"] == sha && r.get("job").is_some())
        .cloned()
        .collect();
    (runs[0].clone(), jobs)
}

fn by_name<'a>(jobs: &'a [Value], name: &str) -> &'a Value {
    jobs.iter()
        .find(|j| j["job_name"] == name || j["name"] == name)
        .unwrap_or_else(|| panic!("no job {name:?} in {jobs:#?}"))
}

const PIPELINE: &str = r#"
[jobs.lint]
command = "echo linted"

[jobs.test]
command = "echo \"job=$JETCI_JOB python=$JETCI_MATRIX_PYTHON shard=$JETCI_SHARD/$JETCI_SHARDS\"; sleep 1"
needs = ["lint"]
matrix = { python = ["3.11", "3.12"] }
parallel = 2

[jobs.build]
command = "echo built"
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_pipeline_runs_every_job_with_its_own_result_and_one_run_result() {
    let nats = NatsServer::start();
    let repo = GitRepo::new();
    let sha = repo.commit("pipeline", &[(".jetci.toml", PIPELINE)]);
    let sys = System::start(&nats, &repo, &["r0", "r1", "r2"]);

    // 6 jobs and the run: 7 results, and nothing else.
    let results = wait_results(&sys.url, 7, BOUND).await;
    wait_commits_acked(&sys.url, BOUND).await;
    assert_eq!(
        stream_messages(
            &sys.url,
            &names().results_stream(),
            &names().results_filter()
        )
        .await
        .len(),
        7
    );
    let (run, jobs) = split(&results, &sha);
    assert_eq!(run["status"], "passed", "{run:#}");
    assert_eq!(run["runner"], "");
    let listed = run["jobs"].as_array().expect("the run lists its jobs");
    assert_eq!(listed.len(), 6, "{run:#}");
    assert!(listed.iter().all(|j| j["status"] == "passed"), "{run:#}");
    assert_eq!(jobs.len(), 6);

    // Each job's result is on its own subject, below the run's.
    let stored = stream_messages(
        &sys.url,
        &names().results_stream(),
        &format!("ci.results.app.{sha}.1.*"),
    )
    .await;
    assert_eq!(stored.len(), 6);
    for (subject, r) in &stored {
        assert_eq!(
            subject,
            &format!("ci.results.app.{sha}.1.{}", r["job"].as_str().unwrap())
        );
    }
    // Run results alone, with one filter.
    let runs_only = stream_messages(
        &sys.url,
        &names().results_stream(),
        &names().run_results_filter(),
    )
    .await;
    assert_eq!(runs_only.len(), 1);

    // The matrix and the shards reached each job's environment.
    for (python, shard) in [("3.11", 1), ("3.11", 2), ("3.12", 1), ("3.12", 2)] {
        let name = format!("test (python={python}, {shard}/2)");
        let job = by_name(&jobs, &name);
        let tail = job["output_tail"].as_str().unwrap();
        assert!(
            tail.contains(&format!("job={name} python={python} shard={}/2", shard - 1)),
            "{tail}"
        );
        // It started only once lint had passed.
        let lint = by_name(&jobs, "lint");
        assert!(
            job["started_at"].as_str() >= lint["finished_at"].as_str(),
            "{job:#} {lint:#}"
        );
    }
    // The four shards ran side by side on more than one runner.
    let runners: std::collections::BTreeSet<&str> = jobs
        .iter()
        .filter(|j| j["job_name"].as_str().unwrap().starts_with("test"))
        .map(|j| j["runner"].as_str().unwrap())
        .collect();
    assert!(runners.len() >= 2, "{runners:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_job_skips_what_needs_it_and_fails_the_run_unless_allowed() {
    let nats = NatsServer::start();
    let repo = GitRepo::new();
    let file = r#"
[jobs.lint]
command = "exit 3"

[jobs.test]
command = "echo tested"
needs = ["lint"]

[jobs.docs]
command = "exit 1"
allow_failure = true

[jobs.build]
command = "echo built"
"#;
    let sha = repo.commit("lint fails", &[(".jetci.toml", file)]);
    let sys = System::start(&nats, &repo, &["r0", "r1"]);
    // lint, docs, build ran; test did not (no result of its own).
    let results = wait_results(&sys.url, 4, BOUND).await;
    wait_commits_acked(&sys.url, BOUND).await;
    let (run, jobs) = split(&results, &sha);
    assert_eq!(jobs.len(), 3, "{jobs:#?}");
    assert_eq!(run["status"], "failed", "{run:#}");
    assert!(run["reason"].as_str().unwrap().contains("lint"), "{run:#}");
    let listed = run["jobs"].as_array().unwrap();
    assert_eq!(by_name(listed, "lint")["status"], "failed");
    assert_eq!(by_name(listed, "test")["status"], "skipped");
    assert_eq!(by_name(listed, "test")["reason"], "lint did not pass");
    assert_eq!(by_name(listed, "docs")["status"], "failed");
    assert_eq!(by_name(listed, "docs")["allow_failure"], true);
    assert_eq!(by_name(listed, "build")["status"], "passed");
}

#[tokio::test(flavor = "multi_thread")]
async fn fail_fast_cancels_the_running_siblings_of_a_failed_job() {
    let nats = NatsServer::start();
    let repo = GitRepo::new();
    let file = r#"
fail_fast = true

[jobs.quick]
command = "sleep 1; exit 1"

[jobs.slow]
command = "sleep 120"

[jobs.after]
command = "echo never"
needs = ["slow"]
"#;
    let sha = repo.commit("fail fast", &[(".jetci.toml", file)]);
    let sys = System::start(&nats, &repo, &["r0", "r1"]);
    // quick's, slow's (cancelled) and the run's.
    let results = wait_results(&sys.url, 3, BOUND).await;
    let (run, jobs) = split(&results, &sha);
    assert_eq!(run["status"], "failed", "{run:#}");
    assert_eq!(by_name(&jobs, "slow")["status"], "cancelled", "{jobs:#?}");
    let listed = run["jobs"].as_array().unwrap();
    assert_eq!(by_name(listed, "after")["status"], "skipped");
    assert!(
        by_name(listed, "after")["reason"]
            .as_str()
            .unwrap()
            .contains("fail_fast"),
        "{run:#}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_pipeline_is_the_runs_error_with_the_line_and_runs_nothing() {
    let nats = NatsServer::start();
    let repo = GitRepo::new();
    // Whether a job ran is told by its result: a job that runs has one of its own.
    let cycle =
        "[jobs.a]\ncommand = \"true\"\nneeds = [\"b\"]\n\n[jobs.b]\ncommand = \"true\"\nneeds = [\"a\"]\n";
    let values: Vec<String> = (0..1000).map(|i| format!("\"{i}\"")).collect();
    let huge = format!(
        "\n[jobs.t]\ncommand = \"true\"\nmatrix = {{ n = [{}] }}\n",
        values.join(", ")
    );
    let unknown = "[jobs.a]\ncommand = \"true\"\nneeds = [\"lnt\"]\n";
    let twice = "\n\n[jobs.t]\ncommand = \"true\"\nmatrix = { py = [\"3.12\", \"3.12\"] }\n";
    // The observer's first look publishes a branch's head only: start on a good commit.
    repo.commit("good", &[(".jetci.toml", "command = \"true\"\n")]);
    let sys = System::start(&nats, &repo, &["r0"]);
    wait_results(&sys.url, 1, BOUND).await;
    let cycle_sha = repo.commit("cycle", &[(".jetci.toml", cycle)]);
    let huge_sha = repo.commit("huge", &[(".jetci.toml", &huge)]);
    let unknown_sha = repo.commit("unknown", &[(".jetci.toml", unknown)]);
    let twice_sha = repo.commit("twice", &[(".jetci.toml", twice)]);
    let results = wait_results(&sys.url, 5, BOUND).await;
    let reason = |sha: &str| {
        let r = results.iter().find(|r| r["sha"] == sha).expect("a result");
        assert_eq!(r["status"], "error", "{r:#}");
        r["reason"].as_str().unwrap().to_string()
    };
    let r = reason(&cycle_sha);
    assert!(r.contains("line 1") && r.contains("cycle"), "{r}");
    let r = reason(&huge_sha);
    assert!(r.contains("line 2") && r.contains("more than 256"), "{r}");
    let r = reason(&unknown_sha);
    assert!(r.contains("line 1") && r.contains("\"lnt\""), "{r}");
    let r = reason(&twice_sha);
    assert!(r.contains("line 3") && r.contains("twice"), "{r}");
    // No job of a bad file ran: each commit has its one result, and no job result.
    for sha in [&cycle_sha, &huge_sha, &unknown_sha, &twice_sha] {
        let of_sha: Vec<&Value> = results
            .iter()
            .filter(|r| r["sha"] == sha.as_str())
            .collect();
        assert_eq!(of_sha.len(), 1, "{of_sha:#?}");
        assert!(of_sha[0].get("job").is_none(), "{of_sha:#?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn users_act_on_a_pipelines_run_and_on_one_of_its_jobs() {
    let nats = NatsServer::start();
    let repo = GitRepo::new();
    let file = r#"
[jobs.slow]
command = "echo from-slow; sleep 120"

[jobs.quick]
command = "echo from-quick"

[jobs.after]
command = "echo never"
needs = ["slow"]
"#;
    let sha = repo.commit("pipeline", &[(".jetci.toml", file)]);
    let sys = System::start(&nats, &repo, &["r0", "r1"]);
    let slow = JobRef::new("app", &sha, 1, Some("slow")).key();
    wait_job_phase(&sys.url, &slow, "running", BOUND).await;
    wait_results(&sys.url, 1, BOUND).await; // quick's

    // Logs name a job; without one, the command says which there are.
    let (ok, out, err) = jetci(&sys.url, &["logs", "app", &sha[..8], "--job", "quick"]);
    assert!(ok, "{err}");
    assert_eq!(String::from_utf8_lossy(&out), "from-quick\n");
    let (ok, _, err) = jetci(&sys.url, &["logs", "app", &sha[..8]]);
    assert!(
        !ok && err.contains("--job") && err.contains("\"slow\""),
        "{err}"
    );
    let (ok, _, err) = jetci(&sys.url, &["logs", "app", &sha[..8], "--job", "nope"]);
    assert!(!ok && err.contains("has no job \"nope\""), "{err}");

    // Status lists the run's jobs and what each waits for.
    let (ok, out, err) = jetci(&sys.url, &["status"]);
    assert!(ok, "{err}");
    let out = String::from_utf8_lossy(&out).into_owned();
    assert!(out.contains("    quick: passed\n"), "{out}");
    assert!(out.contains("    slow: running on r"), "{out}");
    assert!(out.contains("    after: waits for slow\n"), "{out}");

    // Cancelling the run stops what runs and skips what needs it.
    let (ok, out, err) = jetci(&sys.url, &["cancel", "app", &sha[..8]]);
    assert!(ok, "{err}");
    let out = String::from_utf8_lossy(&out).into_owned();
    assert!(out.contains("cancelled  app"), "{out}");
    let results = wait_results(&sys.url, 3, BOUND).await;
    let (run, jobs) = split(&results, &sha);
    assert_eq!(run["status"], "cancelled", "{run:#}");
    assert_eq!(by_name(&jobs, "slow")["status"], "cancelled");
    let listed = run["jobs"].as_array().unwrap();
    assert_eq!(by_name(listed, "after")["status"], "skipped");
    assert_eq!(by_name(listed, "quick")["status"], "passed");

    // A rerun runs the same jobs as run 2; cancelling one job leaves the others be.
    let (ok, _, err) = jetci(&sys.url, &["rerun", "app", &sha[..8], "--no-wait"]);
    assert!(ok, "{err}");
    let slow2 = JobRef::new("app", &sha, 2, Some("slow")).key();
    wait_job_phase(&sys.url, &slow2, "running", BOUND).await;
    let (ok, out, err) = jetci(
        &sys.url,
        &["cancel", "app", &sha[..8], "--run", "2", "--job", "slow"],
    );
    assert!(ok, "{err}");
    assert!(
        String::from_utf8_lossy(&out).contains("job \"slow\""),
        "{}",
        String::from_utf8_lossy(&out)
    );
    wait_commits_acked(&sys.url, BOUND).await;
    let all = stream_messages(
        &sys.url,
        &names().results_stream(),
        &names().run_results_filter(),
    )
    .await;
    let run2 = &all
        .iter()
        .find(|(_, r)| r["run"] == 2)
        .expect("run 2's result")
        .1;
    assert_eq!(run2["status"], "cancelled", "{run2:#}");
    let listed = run2["jobs"].as_array().unwrap();
    assert_eq!(by_name(listed, "quick")["status"], "passed");
    assert_eq!(by_name(listed, "after")["status"], "skipped");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_runner_killed_in_the_middle_of_one_job_moves_only_that_job() {
    let nats = NatsServer::start();
    let repo = GitRepo::new();
    let file = r#"
[jobs.x]
command = "sleep 3; echo x-done"

[jobs.y]
command = "sleep 3; echo y-done"
"#;
    let sha = repo.commit("two jobs", &[(".jetci.toml", file)]);
    let mut sys = System::start(&nats, &repo, &["r0", "r1"]);
    let x = JobRef::new("app", &sha, 1, Some("x")).key();
    let y = JobRef::new("app", &sha, 1, Some("y")).key();
    let x_runner = wait_job_phase(&sys.url, &x, "running", BOUND).await;
    let y_runner = wait_job_phase(&sys.url, &y, "running", BOUND).await;
    assert_ne!(x_runner, y_runner, "side by side");
    let victim = if x_runner == "r0" { 0 } else { 1 };
    sys.runners[victim].kill();

    let results = wait_results(&sys.url, 3, BOUND).await;
    let (run, jobs) = split(&results, &sha);
    assert_eq!(run["status"], "passed", "{run:#}");
    let (x, y) = (by_name(&jobs, "x"), by_name(&jobs, "y"));
    assert_eq!(x["attempt"], 2, "x moved: {x:#}");
    assert_eq!(x["runner"], y_runner.as_str());
    assert_eq!(y["attempt"], 1, "y stayed: {y:#}");
    assert_eq!(y["runner"], y_runner.as_str());
}

#[tokio::test(flavor = "multi_thread")]
async fn rerun_failed_runs_only_the_jobs_that_did_not_pass() {
    let nats = NatsServer::start();
    let repo = GitRepo::new();
    let file = r#"
[jobs.lint]
command = "echo linted"

[jobs.test]
command = "echo testing; exit 1"
needs = ["lint"]

[jobs.docs]
command = "echo docs"
needs = ["test"]
"#;
    let sha = repo.commit("red", &[(".jetci.toml", file)]);
    let sys = System::start(&nats, &repo, &["r0"]);
    // lint's, test's and the run's.
    wait_results(&sys.url, 3, BOUND).await;
    wait_commits_acked(&sys.url, BOUND).await;

    let (ok, out, err) = jetci(&sys.url, &["rerun", "app", &sha[..8], "--failed"]);
    assert!(ok, "{err}");
    let out = String::from_utf8_lossy(&out).into_owned();
    assert!(out.contains("queued run 2"), "{out}");
    let results = stream_messages(
        &sys.url,
        &names().results_stream(),
        &names().results_filter(),
    )
    .await;
    let run2: Vec<&Value> = results
        .iter()
        .map(|(_, r)| r)
        .filter(|r| r["run"] == 2)
        .collect();
    // Only test ran again (its own result), and the run's result.
    assert_eq!(run2.len(), 2, "{run2:#?}");
    let run = run2.iter().find(|r| r.get("job").is_none()).unwrap();
    assert_eq!(run["status"], "failed", "{run:#}");
    let listed = run["jobs"].as_array().unwrap();
    assert_eq!(by_name(listed, "lint")["status"], "passed");
    assert_eq!(by_name(listed, "lint")["carried_from"], 1);
    assert_eq!(by_name(listed, "test")["status"], "failed");
    assert!(by_name(listed, "test").get("carried_from").is_none());
    assert_eq!(by_name(listed, "docs")["status"], "skipped");
    assert!(
        run2.iter().any(|r| r["job_name"] == "test"),
        "test ran again: {run2:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_a_run_no_dispatcher_has_taken_ends_it_and_no_job_starts_after() {
    let nats = NatsServer::start();
    let repo = GitRepo::new();
    let sha = repo.commit("pipeline", &[(".jetci.toml", PIPELINE)]);
    // No runner: the dispatcher takes no commit, so the run waits in CI_COMMITS untaken.
    let mut sys = System::start(&nats, &repo, &[]);
    let commits = names().commits_stream();
    wait_until_async("the commit to be queued", BOUND, async || {
        let queued = stream_messages(&sys.url, &commits, ">").await;
        (queued.len() == 1).then_some(()).ok_or(queued.len())
    })
    .await;

    // First one job (the command waits for its result; its request is what matters here),
    // then the whole run.
    let lint = JobRef::new("app", &sha, 1, Some("lint")).key();
    let mut one = crate::support::processes::Proc::spawn(
        "jetci",
        &["-s", &sys.url, "cancel", "app", &sha[..8], "--job", "lint"],
        &[],
    );
    wait_job_phase(&sys.url, &lint, "queued", BOUND).await;
    let (ok, out, err) = jetci(&sys.url, &["cancel", "app", &sha[..8]]);
    assert!(ok, "{err}");
    let out = String::from_utf8_lossy(&out).into_owned();
    assert!(out.contains("before any dispatcher took it"), "{out}");
    assert!(out.contains("cancelled  app"), "{out}");
    one.kill();
    // The job's state agrees with the run's result instead of waiting for days (found by a
    // break-it review: a `queued` entry stayed, shown as waiting on the web).
    wait_job_phase(&sys.url, &lint, "final", BOUND).await;

    // A runner comes: the dispatcher takes the run, finds it cancelled, starts nothing.
    sys.add_runner("r0", &[], &[]);
    wait_commits_acked(&sys.url, BOUND).await;
    let results = stream_messages(
        &sys.url,
        &names().results_stream(),
        &names().results_filter(),
    )
    .await;
    assert_eq!(
        results.len(),
        1,
        "the run's one result, no job's: {results:#?}"
    );
    let run = &results[0].1;
    assert_eq!(run["status"], "cancelled", "{run:#}");
    let listed = run["jobs"].as_array().unwrap();
    assert_eq!(listed.len(), 6);
    assert!(listed.iter().all(|j| j["status"] == "skipped"), "{run:#}");
    let (ok, _, err) = jetci(&sys.url, &["cancel", "app", &sha[..8]]);
    assert!(!ok && err.contains("already finished"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_one_job_agrees_with_the_run_and_leaves_a_fail_fast_run_going() {
    let nats = NatsServer::start();
    let repo = GitRepo::new();
    let file = r#"
fail_fast = true

[jobs.lint]
command = "echo linted"

[jobs.slow]
command = "sleep 120"
needs = ["lint"]

[jobs.after]
command = "echo after"
needs = ["slow"]

[jobs.other]
command = "sleep 6; echo other"
needs = ["lint"]
"#;
    let sha = repo.commit("pipeline", &[(".jetci.toml", file)]);
    let sys = System::start(&nats, &repo, &["r0", "r1"]);
    // Run 1, cancelled as a whole while slow runs: lint passed, the rest did not.
    let slow1 = JobRef::new("app", &sha, 1, Some("slow")).key();
    wait_job_phase(&sys.url, &slow1, "running", BOUND).await;
    let (ok, _, err) = jetci(&sys.url, &["cancel", "app", &sha[..8]]);
    assert!(ok, "{err}");
    wait_commits_acked(&sys.url, BOUND).await;

    // Run 2 runs only what did not pass; lint is carried over.
    let (ok, _, err) = jetci(
        &sys.url,
        &["rerun", "app", &sha[..8], "--failed", "--no-wait"],
    );
    assert!(ok, "{err}");
    let slow2 = JobRef::new("app", &sha, 2, Some("slow")).key();
    let other2 = JobRef::new("app", &sha, 2, Some("other")).key();
    wait_job_phase(&sys.url, &slow2, "running", BOUND).await;
    wait_job_phase(&sys.url, &other2, "running", BOUND).await;

    // Status shows the carried job as such; nothing waits for it.
    let (ok, out, err) = jetci(&sys.url, &["status"]);
    assert!(ok, "{err}");
    let out = String::from_utf8_lossy(&out).into_owned();
    assert!(
        out.contains("    lint: passed (carried from run 1)\n"),
        "{out}"
    );
    assert!(!out.contains("waits for lint"), "{out}");

    // A carried job did not run in run 2: it cannot be cancelled.
    let run2 = ["--run", "2", "--job"];
    let args = |job: &'static str| -> Vec<&str> {
        let mut a = vec!["cancel", "app", &sha[..8]];
        a.extend(run2);
        a.push(job);
        a
    };
    let (ok, _, err) = jetci(&sys.url, &args("lint"));
    assert!(!ok && err.contains("carried over from run 1"), "{err}");
    // A job not started yet ends cancelled, with a result of its own.
    let (ok, out, err) = jetci(&sys.url, &args("after"));
    assert!(ok, "{err}");
    let out = String::from_utf8_lossy(&out).into_owned();
    assert!(out.contains("not started"), "{out}");
    assert!(
        out.contains("cancelled  app") && out.contains("job \"after\""),
        "{out}"
    );
    // Cancelling slow, in a fail_fast run, stops slow alone: other goes on and passes.
    let (ok, _, err) = jetci(&sys.url, &args("slow"));
    assert!(ok, "{err}");
    wait_commits_acked(&sys.url, BOUND).await;

    let results = stream_messages(
        &sys.url,
        &names().results_stream(),
        &names().results_filter(),
    )
    .await;
    let of_run2: Vec<Value> = results
        .into_iter()
        .map(|(_, r)| r)
        .filter(|r| r["run"] == 2)
        .collect();
    let (run, jobs) = split(&of_run2, &sha);
    assert_eq!(run["status"], "cancelled", "{run:#}");
    let listed = run["jobs"].as_array().unwrap();
    assert_eq!(by_name(listed, "lint")["status"], "passed");
    assert_eq!(by_name(listed, "lint")["carried_from"], 1);
    assert_eq!(by_name(listed, "other")["status"], "passed", "{run:#}");
    // Each job's own result and the run's list agree; lint has none in run 2.
    for job in &jobs {
        let name = job["job_name"].as_str().unwrap();
        assert_eq!(
            by_name(listed, name)["status"],
            job["status"],
            "{name}: {run:#}"
        );
    }
    let mut names_of: Vec<&str> = jobs
        .iter()
        .map(|j| j["job_name"].as_str().unwrap())
        .collect();
    names_of.sort();
    assert_eq!(names_of, ["after", "other", "slow"]);
    assert_eq!(by_name(&jobs, "after")["status"], "cancelled");
    assert_eq!(by_name(&jobs, "slow")["status"], "cancelled");
}

#[tokio::test(flavor = "multi_thread")]
async fn status_counts_a_pipeline_running_several_jobs_as_one_run() {
    let nats = NatsServer::start();
    let repo = GitRepo::new();
    let file = "[jobs.a]\ncommand = \"sleep 120\"\n\n[jobs.b]\ncommand = \"sleep 120\"\n";
    let sha = repo.commit("two jobs", &[(".jetci.toml", file)]);
    let sys = System::start(&nats, &repo, &["r0", "r1"]);
    for job in ["a", "b"] {
        let key = JobRef::new("app", &sha, 1, Some(job)).key();
        wait_job_phase(&sys.url, &key, "running", BOUND).await;
    }
    // A second commit waits: both runners are busy with the pipeline's two jobs.
    repo.commit("waits", &[(".jetci.toml", "command = \"true\"\n")]);
    let commits = names().commits_stream();
    wait_until_async("the second commit to be queued", BOUND, async || {
        let queued = stream_messages(&sys.url, &commits, ">").await;
        (queued.len() == 2).then_some(()).ok_or(queued.len())
    })
    .await;
    let (ok, out, err) = jetci(&sys.url, &["status", "--json"]);
    assert!(ok, "{err}");
    let status: Value = serde_json::from_slice(&out).expect("JSON");
    assert_eq!(status["queue"]["waiting"], 1, "{status:#}");
    assert_eq!(
        status["in_flight"].as_array().unwrap().len(),
        2,
        "{status:#}"
    );
}

/// A sharded job whose command writes a JUnit report of the files its shard was given (8 s for
/// `tests/test_big.py`, 1 s for each other one) and prints them.
const SHARDED: &str = r#"
[jobs.test]
parallel = 2
shard_tests = ["tests/test_*.py"]
junit = ["report.xml"]
command = '''
{ echo '<testsuite name="s">'
  while read -r f; do
    t=1.0; [ "$f" = tests/test_big.py ] && t=8.0
    echo "<testcase classname=\"$(echo "${f%.py}" | tr / .)\" name=\"t\" time=\"$t\"/>"
  done < "$JETCI_SHARD_TESTS"
  echo '</testsuite>'; } > report.xml
echo "tests: $(tr '\n' ' ' < "$JETCI_SHARD_TESTS")end"
'''
"#;

/// The test files each shard of `sha` was given, by shard (from 0).
fn shard_files(results: &[Value], sha: &str) -> Vec<Vec<String>> {
    let (run, jobs) = split(results, sha);
    assert_eq!(run["status"], "passed", "{run:#}");
    (1..=2)
        .map(|shard| {
            let job = by_name(&jobs, &format!("test ({shard}/2)"));
            let tail = job["output_tail"].as_str().unwrap();
            let listed = tail
                .split_once("tests: ")
                .and_then(|(_, rest)| rest.split_once("end"))
                .unwrap_or_else(|| panic!("no test list in {tail:?}"))
                .0;
            listed.split_whitespace().map(String::from).collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn shards_take_their_tests_round_robin_then_balanced_by_recorded_junit_times() {
    let nats = NatsServer::start();
    let repo = GitRepo::new();
    let mut files: Vec<(String, String)> = vec![
        (".jetci.toml".into(), SHARDED.into()),
        ("tests/test_big.py".into(), String::new()),
        ("tests/helper.py".into(), String::new()),
    ];
    files.extend((1..=8).map(|i| (format!("tests/test_s{i}.py"), String::new())));
    let files: Vec<(&str, &str)> = files
        .iter()
        .map(|(p, t)| (p.as_str(), t.as_str()))
        .collect();
    let first = repo.commit("sharded", &files);
    let sys = System::start(&nats, &repo, &["r0", "r1"]);
    let s =
        |n: &[u32]| -> Vec<String> { n.iter().map(|i| format!("tests/test_s{i}.py")).collect() };

    // Nothing recorded yet: the files, sorted, dealt in turn. helper.py is no test.
    let results = wait_results(&sys.url, 3, BOUND).await;
    let mut dealt = vec!["tests/test_big.py".to_string()];
    dealt.extend(s(&[2, 4, 6, 8]));
    assert_eq!(shard_files(&results, &first), [dealt, s(&[1, 3, 5, 7])]);

    // The next commit's shards are balanced by the times the first run's reports recorded:
    // the 8 s file alone, the eight 1 s files together.
    let second = repo.commit("more", &[("README", "x")]);
    let results = wait_results(&sys.url, 6, BOUND).await;
    assert_eq!(
        shard_files(&results, &second),
        [
            vec!["tests/test_big.py".to_string()],
            s(&[1, 2, 3, 4, 5, 6, 7, 8])
        ]
    );
}
