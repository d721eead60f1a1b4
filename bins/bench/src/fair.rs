//! F: the fair share (issue 15). Two repositories on two runners, jobs of 200 ms: a backlog of
//! 500 commits pushed to `a`, then commits to `b` one at a time; how much longer `b`'s commit
//! takes from its push to its result than the same commit on the same idle system. The goal is
//! at most one job's duration plus 50 ms: `b` waits for one of `a`'s jobs to end, not for the
//! backlog.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::sys::Repo;
use crate::{fms, median, ms, pct, verdict, Opts, Report, Row, Stack};

const JOB: &str = "command = \"sleep 0.2\"\n";
const JOB_MS: f64 = 200.0;

/// Push → result of one new commit of `b`, in ms.
fn sample(st: &Stack, b: &Repo, i: usize) -> Result<f64> {
    let t0 = Instant::now();
    let sha = b.commit(&format!("b {i}"))?;
    st.notify("b")?;
    let a = st.wait_sha(&sha)?;
    if a.status != "passed" {
        bail!("{sha}: status {} (expected passed)", a.status);
    }
    Ok(ms(a.at - t0))
}

pub fn bench_fair(rt: &tokio::runtime::Runtime, o: &Opts, rep: &mut Report) -> Result<()> {
    let n = if o.quick { 1 } else { 7 };
    let backlog = if o.quick { 20 } else { 500 };
    let mut st = Stack::new(rt)?;
    let a = Repo::new(&[(".jetci.toml", JOB)])?;
    let b = Repo::new(&[(".jetci.toml", JOB)])?;
    st.dispatcher()?;
    st.runner()?;
    st.runner()?;
    st.observer(&a, "a", "10m")?;
    st.observer(&b, "b", "10m")?;
    st.notify("a")?;
    st.notify("b")?;
    st.wait_sha(&a.head()?)?;
    st.wait_sha(&b.head()?)?;

    let mut idle = Vec::with_capacity(n);
    for i in 0..n {
        idle.push(sample(&st, &b, i)?);
        std::thread::sleep(Duration::from_millis(100));
    }

    a.fast_commits("main", backlog)?;
    st.notify("a")?;
    // The backlog is being tested: a's first results after its head.
    st.listener.wait_count("a", 3, Duration::from_secs(60))?;
    let mut busy = Vec::with_capacity(n);
    for i in 0..n {
        busy.push(sample(&st, &b, n + i)?);
        std::thread::sleep(Duration::from_millis(100));
    }
    let left = backlog + 1 - st.listener.count("a");
    if left == 0 {
        bail!("a's backlog was done before b's samples: nothing was measured against it");
    }
    let waited: Vec<f64> = busy.iter().map(|x| x - median(&idle)).collect();
    let w = median(&waited);
    rep.rows.push(Row {
        id: "F",
        what: format!(
            "b's commit while a has a backlog of {backlog} (2 runners, jobs of 200 ms): push → result, beyond b's idle push → result"
        ),
        n: n.to_string(),
        median: fms(w),
        p95: fms(pct(&waited, 95.0)),
        floor: format!(
            "b idle: {} (push → result, median); busy: {}",
            fms(median(&idle)),
            fms(median(&busy))
        ),
        ratio: format!("{:.2}× one job", w / JOB_MS),
        goal: "≤ one job + 50 ms (250 ms)".into(),
        verdict: verdict(w <= JOB_MS + 50.0),
    });
    rep.notes.push(format!(
        "F: b's commits were measured while {left} of a's {backlog} commits were still to be tested."
    ));
    Ok(())
}
