//! P: pipelines. A suite split in shards over several runners against the same suite as one job,
//! and what a job within a pipeline's run costs the dispatch against a run of one job.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::sys::{floor_once, Repo};
use crate::{fms, median, ms, pct, verdict, Opts, Report, Row, Stack};

/// One suite of 8 s: as one job, and as 4 shards of 2 s (`JETCI_SHARD` picks nothing here: each
/// shard sleeps its share).
const ONE_JOB: &str = "command = \"sleep 8\"\n";
const SHARDED: &str = "[jobs.suite]\ncommand = \"sleep 2\"\nparallel = 4\n";

/// A suite of 12 test files of skewed lengths (10 s in all; each file holds its seconds), in 4
/// shards that take their files from `JETCI_SHARD_TESTS`, sleep each file's time and write a
/// JUnit report of it.
const SKEWED_SECONDS: [&str; 12] = [
    "2.4", "1.6", "1.2", "1.0", "0.8", "0.8", "0.6", "0.4", "0.4", "0.4", "0.2", "0.2",
];
const SKEWED_SHARDS: u32 = 4;
const BALANCED: &str = r#"[jobs.suite]
parallel = 4
shard_tests = ["tests/t*.txt"]
junit = ["report.xml"]
command = '''
{ echo '<testsuite name="s">'
  while read -r f; do
    t=$(cat "$f"); sleep "$t"
    echo "<testcase classname=\"$(echo "${f%.txt}" | tr / .)\" name=\"t\" time=\"$t\"/>"
  done < "$JETCI_SHARD_TESTS"
  echo '</testsuite>'; } > report.xml
'''
"#;

/// `n` jobs of `true`, all side by side (no needs).
fn trivial_pipeline(n: usize) -> String {
    (0..n)
        .map(|i| format!("[jobs.j{i}]\ncommand = \"true\"\n"))
        .collect()
}

/// Commit → the run's result (`ci.results.*.*.*`), `n` times; the medians and p95 in ms.
fn run_latency(st: &Stack, repo: &Repo, n: usize) -> Result<Vec<f64>> {
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let t0 = Instant::now();
        let sha = repo.commit(&format!("sample {i}"))?;
        let a = st.wait_sha(&sha)?;
        if a.status != "passed" {
            bail!("{sha}: status {} (expected passed)", a.status);
        }
        lat.push(ms(a.at - t0));
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(lat)
}

/// A stack of one dispatcher, `runners` runners and an observer polling every 50 ms on a fresh
/// repository holding `toml` as its `.jetci.toml`; waits for the first commit's result.
fn stack(rt: &tokio::runtime::Runtime, toml: &str, runners: usize) -> Result<(Stack, Repo)> {
    let mut st = Stack::new(rt)?;
    let repo = Repo::new(&[(".jetci.toml", toml), ("README.md", "bench\n")])?;
    st.dispatcher()?;
    for _ in 0..runners {
        st.runner()?;
    }
    st.observer(&repo, "pipe", "50ms")?;
    st.wait_sha(&repo.head()?)?;
    Ok((st, repo))
}

pub fn bench_pipelines(rt: &tokio::runtime::Runtime, o: &Opts, rep: &mut Report) -> Result<()> {
    let n = if o.quick { 1 } else { 5 };
    // 4 × 2 s shards on 4 runners against the same 8 s as one job.
    let (st, repo) = stack(rt, ONE_JOB, 4)?;
    let one = run_latency(&st, &repo, n)?;
    drop(st);
    let (st, repo) = stack(rt, SHARDED, 4)?;
    let sharded = run_latency(&st, &repo, n)?;
    let floor = ms(floor_once(repo.path(), &repo.head()?, "sleep 8")?);
    drop(st);
    let speedup = median(&one) / median(&sharded);
    rep.rows.push(Row {
        id: "P",
        what: "an 8 s suite as 4 shards of 2 s on 4 runners (commit → run result)".into(),
        n: n.to_string(),
        median: fms(median(&sharded)),
        p95: fms(pct(&sharded, 95.0)),
        floor: format!("{} (one job: {})", fms(floor), fms(median(&one))),
        ratio: format!("{speedup:.2}× faster than one job"),
        goal: "≥ 3.5× faster".into(),
        verdict: verdict(speedup >= 3.5),
    });

    // Dispatch overhead per job: a run of 8 `true` jobs on one runner against a run of one.
    let jobs = 8;
    let (st, repo) = stack(rt, "command = \"true\"\n", 1)?;
    let single = run_latency(&st, &repo, n * 2)?;
    drop(st);
    let (st, repo) = stack(rt, &trivial_pipeline(jobs), 1)?;
    let many = run_latency(&st, &repo, n * 2)?;
    drop(st);
    let per_job = median(&many) / jobs as f64;
    rep.rows.push(Row {
        id: "P",
        what: format!(
            "per job of a {jobs}-job pipeline of `true` on 1 runner (run latency / {jobs})"
        ),
        n: (n * 2).to_string(),
        median: fms(per_job),
        p95: fms(pct(&many, 95.0) / jobs as f64),
        floor: format!("{} (a run of one job)", fms(median(&single))),
        ratio: format!("{:.2}×", per_job / median(&single)),
        goal: "≤ a run of one job".into(),
        verdict: verdict(per_job <= median(&single)),
    });
    bench_balance(rt, n, rep)?;
    rep.notes.push(format!(
        "P: one dispatcher, an observer polling every 50 ms, runners of one slot; a sample is timed \
         from just before `git commit` to the run's result on `ci.results.*.*.*` (a pipeline's job \
         results are one token deeper and not counted). The sharded suite is `[jobs.suite]` `sleep 2` \
         with `parallel = 4` on 4 runners; the one-job suite is `sleep 8` on the same 4 runners; the \
         floor is `sleep 8` in a fresh checkout. The overhead row divides a run of {jobs} `true` jobs \
         (no needs) on one runner by {jobs}, against a run of one `true` job. The balance row: \
         12 files of 2.4, 1.6, 1.2, 1.0, 0.8, 0.8, 0.6, 0.4, 0.4, 0.4, 0.2 and 0.2 s (10 s) in \
         `parallel = 4` shards on 4 runners, each shard sleeping its files' times from \
         `JETCI_SHARD_TESTS` and writing their JUnit times; its figure is the longest shard's \
         `duration_ms` in the run's `jobs`, against the ideal 10 s / 4; the first run, before any \
         time is recorded, deals the files round-robin."
    ));
    Ok(())
}
/// The longest shard of a skewed suite split by recorded JUnit times, against total / N.
fn bench_balance(rt: &tokio::runtime::Runtime, n: usize, rep: &mut Report) -> Result<()> {
    let files: Vec<(String, &str)> = SKEWED_SECONDS
        .iter()
        .enumerate()
        .map(|(i, s)| (format!("tests/t{i:02}.txt"), *s))
        .collect();
    let mut st = Stack::new(rt)?;
    let mut all: Vec<(&str, &str)> = vec![(".jetci.toml", BALANCED), ("README.md", "bench\n")];
    all.extend(files.iter().map(|(p, s)| (p.as_str(), *s)));
    let repo = Repo::new(&all)?;
    st.dispatcher()?;
    for _ in 0..SKEWED_SHARDS {
        st.runner()?;
    }
    st.observer(&repo, "balance", "50ms")?;
    let longest = |a: &crate::sys::Arrival| -> Result<f64> {
        if a.status != "passed" || a.jobs_ms.len() != SKEWED_SHARDS as usize {
            bail!("balance run: status {}, {} jobs", a.status, a.jobs_ms.len());
        }
        Ok(a.jobs_ms.iter().copied().max().unwrap_or(0) as f64)
    };
    let first = longest(&st.wait_sha(&repo.head()?)?)?;
    let mut balanced = Vec::with_capacity(n);
    for i in 0..n {
        let sha = repo.commit(&format!("sample {i}"))?;
        balanced.push(longest(&st.wait_sha(&sha)?)?);
    }
    drop(st);
    let total: f64 = SKEWED_SECONDS
        .iter()
        .map(|s| s.parse::<f64>().unwrap_or(0.0) * 1000.0)
        .sum();
    let ideal = total / SKEWED_SHARDS as f64;
    let ratio = median(&balanced) / ideal;
    rep.rows.push(Row {
        id: "P",
        what: format!(
            "longest of {SKEWED_SHARDS} shards of a skewed 10 s suite, split by recorded JUnit times"
        ),
        n: n.to_string(),
        median: fms(median(&balanced)),
        p95: fms(pct(&balanced, 95.0)),
        floor: format!(
            "{} (ideal: total / {SKEWED_SHARDS}; first run, round-robin: {})",
            fms(ideal),
            fms(first)
        ),
        ratio: format!("{ratio:.2}× the ideal"),
        goal: "≤ 1.2× the ideal".into(),
        verdict: verdict(ratio <= 1.2),
    });
    Ok(())
}
