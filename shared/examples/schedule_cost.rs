//! What the fair-share schedule costs with a large backlog:
//! `cargo run --release -p jetci --example schedule_cost -- 100000:10 100000:1000 100000:10000`.
//!
//! For each `JOBS:REPOS` it fills a [`jetci::schedule::Schedule`] with JOBS waiting single-job
//! commits spread over REPOS repositories (two branches each, a tenth of the jobs needing a
//! `gpu` label no runner has), then measures: the memory it holds (the process's resident set
//! before and after, from /proc/self/statm), and the time of one assignment (pick for a free
//! runner, take, and the job's end) as the median of 10,000, with the repositories busy in turn.

use std::time::Instant;

use jetci::schedule::{Ready, Schedule, Verdict};

/// The process's resident set in KiB (Linux).
fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4
}

fn main() {
    let cases: Vec<(usize, usize)> = std::env::args()
        .skip(1)
        .filter_map(|a| {
            let (j, r) = a.split_once(':')?;
            Some((j.parse().ok()?, r.parse().ok()?))
        })
        .collect();
    let cases = if cases.is_empty() {
        vec![(100_000, 10), (100_000, 1_000), (100_000, 10_000)]
    } else {
        cases
    };
    println!("| waiting jobs | repositories | memory held | per waiting job | one assignment (median) | p95 |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (jobs, repos) in cases {
        let before = rss_kib();
        let mut s = Schedule::new();
        for i in 0..jobs {
            let repo = format!("repository-{:05}", i % repos);
            let branch = if i % 7 == 0 { "feature/x" } else { "main" };
            let position = s.commit(&repo, branch, Some(Verdict::Passed));
            let labels = if i % 10 == 0 {
                vec!["gpu".to_string()]
            } else {
                vec![]
            };
            s.add(Ready {
                key: format!("{repo}.{:040x}.1.test", i),
                repo,
                branch: branch.to_string(),
                position,
                labels,
                since: i as u64,
            });
        }
        let held = rss_kib().saturating_sub(before);
        let runner = vec!["linux".to_string()];
        let mut times = Vec::with_capacity(10_000);
        for _ in 0..10_000 {
            let t = Instant::now();
            let Some(pick) = s.pick(&runner) else { break };
            s.take(&pick);
            s.running(&pick.repo, &pick.branch, -1);
            s.ended(
                &pick.repo,
                &pick.branch,
                pick.position,
                Some(Verdict::Passed),
            );
            times.push(t.elapsed());
        }
        times.sort();
        let median = times[times.len() / 2];
        let p95 = times[times.len() * 95 / 100];
        println!(
            "| {jobs} | {repos} | {:.1} MiB | {} B | {:.1} µs | {:.1} µs |",
            held as f64 / 1024.0,
            held * 1024 / jobs as u64,
            median.as_secs_f64() * 1e6,
            p95.as_secs_f64() * 1e6,
        );
        drop(s);
    }
}
