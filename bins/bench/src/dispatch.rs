//! D: the dispatch rate (issue 7 D).
//!
//! The real jetci-dispatcher against instant runners: the real runner loop ([`jetci::runner`],
//! the one jetci-runner runs) with an [`Instant`] executor that runs nothing, so the rate is the
//! protocol's and the dispatcher's, not git's or a test's. A backlog
//! of commits is published straight into `CI_COMMITS` as the observer would (`CommitMsg`,
//! `Nats-Msg-Id: <repo>.<sha>.<run>`, 256 publishes in flight); the clock runs from the first
//! publish to the arrival of the N-th final result. CPU time of each process and the messages
//! each connection exchanged with the server (nats-server `/connz`) are read around the run, so
//! the table says where the time goes. The ceiling is raw JetStream publish+ack on the same
//! kind of server.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use jetci::connect::Nats;
use jetci::messages::{now, CommitMsg, JobMsg, ResultMsg, Status, VERSION};
use jetci::protocol::commit::send_commit;
use jetci::runner::{Execution, Executor};
use jetci::shutdown::{CancellationToken, Shutdown};

use crate::sys::{connect, cpu_seconds, MsgCounts, Server};
use crate::{bytes_of, Opts, Report, Row, Stack, WAIT};

/// The goal of issue 7 D, in assignments per second.
const GOAL: f64 = 5_000.0;

/// Raw JetStream publish+ack rates: (one at a time, 256 in flight), in messages per second.
fn ceiling(rt: &tokio::runtime::Runtime, n: usize) -> Result<(f64, f64)> {
    let server = Server::start(rt)?;
    let url = server.url();
    rt.block_on(async move {
        let js = async_nats::jetstream::new(async_nats::connect(&url).await?);
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "BENCH".into(),
            subjects: vec!["bench.>".into()],
            retention: async_nats::jetstream::stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await?;
        let payload = bytes_of(300);
        // One publish, one ack at a time: what a loop that awaits each publish can reach.
        let t = Instant::now();
        for i in 0..n / 4 {
            js.publish(format!("bench.s.{}", i % 64), payload.clone())
                .await?
                .await?;
        }
        let seq = (n / 4) as f64 / t.elapsed().as_secs_f64();
        // Up to 256 acks outstanding.
        let t = Instant::now();
        let mut pending = VecDeque::new();
        for i in 0..n {
            pending.push_back(
                js.publish(format!("bench.p.{}", i % 64), payload.clone())
                    .await?,
            );
            if pending.len() >= 256 {
                pending.pop_front().unwrap().await?;
            }
        }
        for p in pending {
            p.await?;
        }
        let pipe = n as f64 / t.elapsed().as_secs_f64();
        anyhow::Ok((seq, pipe))
    })
}

/// Publishes commits `range` of `repo` (fake, distinct shas) as the observer does
/// ([`send_commit`]), up to 256 acks outstanding; returns when every publish is acked.
async fn publish_commits(nats: &Nats, repo: &str, range: std::ops::Range<usize>) -> Result<()> {
    let mut pending = VecDeque::new();
    for i in range {
        let commit = CommitMsg {
            v: VERSION,
            repo: repo.to_string(),
            url: format!("/srv/git/{repo}"),
            branch: "main".into(),
            sha: format!("{i:040x}"),
            run: 1,
            labels: vec![],
            author: "jetci bench <bench@jetci.invalid>".into(),
            summary: format!("commit {i}"),
            published_at: now(),
            jobs: vec![],
            fail_fast: false,
        };
        pending.push_back(send_commit(nats, &commit).await?);
        if pending.len() >= 256 {
            pending.pop_front().unwrap().await?;
        }
    }
    for p in pending {
        p.await?;
    }
    Ok(())
}

/// The executor of an instant runner: every job passes at once, having run nothing (exit code
/// 0, no output, zero duration). It counts what it was given, so the bench can tell that no job
/// ran twice.
struct Instant0 {
    executed: Arc<AtomicU64>,
}

impl Executor for Instant0 {
    async fn execute(&self, _job: &JobMsg, result: ResultMsg, _: &CancellationToken) -> Execution {
        self.executed.fetch_add(1, Ordering::Relaxed);
        Execution::Done(ResultMsg {
            status: Status::Passed,
            exit_code: Some(0),
            ..result
        })
    }
}

/// Starts an instant runner `id` with `slots` slots on its own connection (named `jetci-bench
/// instant <id>`, what `/connz` shows): the library's runner loop with [`Instant0`], working in
/// `work_dir`. Returns once its presence is in `ci-runners`.
async fn start_instant(
    url: &str,
    id: &str,
    slots: u32,
    work_dir: std::path::PathBuf,
    executed: Arc<AtomicU64>,
    stop: CancellationToken,
) -> Result<()> {
    let nats = connect(url, &format!("jetci-bench instant {id}")).await?;
    let streams = jetci::streams::setup(&nats).await?;
    let config = jetci::runner::Config {
        id: id.to_string(),
        host: "jetci-bench".into(),
        labels: vec![],
        slots,
        heartbeat: Duration::from_secs(1),
        lease: Duration::from_secs(3),
        drain_timeout: Duration::from_secs(5),
        work_dir,
        consumer_inactive: Duration::from_secs(3600),
        warnings: Vec::new(),
    };
    let shutdown = Shutdown {
        token: stop,
        again: CancellationToken::new(),
    };
    let runners = streams.runners.clone();
    tokio::spawn(jetci::runner::run(
        nats,
        streams,
        config,
        Arc::new(Instant0 { executed }),
        shutdown,
    ));
    let t = Instant::now();
    while runners.get(id).await.ok().flatten().is_none() {
        if t.elapsed() > WAIT {
            bail!("instant runner {id} did not register");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// What one dispatch run measured.
struct Run {
    rate: f64,
    secs: f64,
    publish_secs: f64,
    reassigned: usize,
    /// CPU seconds per job: dispatcher, nats-server, this process (instant runners, publisher,
    /// listener).
    cpu: [f64; 3],
    /// Share of one core the dispatcher used over the run.
    dispatcher_core: f64,
    /// Messages per job: dispatcher sent, dispatcher received, all instant runners sent and
    /// received.
    msgs: [f64; 4],
}

fn counts_delta(
    before: &std::collections::HashMap<String, MsgCounts>,
    after: &std::collections::HashMap<String, MsgCounts>,
    name: impl Fn(&str) -> bool,
) -> MsgCounts {
    let mut d = MsgCounts::default();
    for (k, a) in after.iter().filter(|(k, _)| name(k)) {
        let b = before.get(k).copied().unwrap_or_default();
        d.msgs_in += a.msgs_in.saturating_sub(b.msgs_in);
        d.msgs_out += a.msgs_out.saturating_sub(b.msgs_out);
    }
    d
}

/// One dispatcher, `runners` instant runners with `slots` slots each, a backlog of `n` commits.
fn run_dispatch(rt: &tokio::runtime::Runtime, runners: usize, slots: u32, n: usize) -> Result<Run> {
    let mut st = Stack::new(rt)?;
    let repo = format!("disp{runners}x{slots}");
    st.dispatcher()?;
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let url = st.url.clone();
    let executed = Arc::new(AtomicU64::new(0));
    let work = tempfile::tempdir()?;
    let nats = rt.block_on(async {
        let nats = connect(&url, "jetci-bench publisher").await?;
        for i in 0..runners {
            let dir = work.path().join(format!("i{i}"));
            start_instant(
                &url,
                &format!("i{i}"),
                slots,
                dir,
                executed.clone(),
                stop.clone(),
            )
            .await?;
        }
        anyhow::Ok(nats)
    })?;
    // One commit through the whole path first: the dispatcher's consumer exists and it knows
    // every runner.
    rt.block_on(publish_commits(&nats, &repo, 0..1))?;
    st.listener
        .wait_count(&repo, 1, WAIT)
        .map_err(|e| anyhow::anyhow!("{e}\n{}", st.logs()))?;
    std::thread::sleep(Duration::from_millis(1500));

    let pids = [
        st.dispatchers[0].pid(),
        st.server.proc.pid(),
        std::process::id(),
    ];
    let cpu0 = pids.map(cpu_seconds);
    let msgs0 = st.server.connection_counts()?;
    let t0 = Instant::now();
    rt.block_on(publish_commits(&nats, &repo, 1..n + 1))?;
    let publish_secs = t0.elapsed().as_secs_f64();
    let last = st
        .listener
        .wait_count(&repo, n + 1, Duration::from_secs(900))
        .map_err(|e| anyhow::anyhow!("{e}\n{}", st.logs()))?;
    let secs = (last.at - t0).as_secs_f64();
    let cpu1 = pids.map(cpu_seconds);
    let msgs1 = st.server.connection_counts()?;
    let arrivals: Vec<_> = st
        .listener
        .all()
        .into_iter()
        .filter(|a| a.repo == repo)
        .collect();
    if arrivals.iter().any(|a| a.status != "passed") {
        bail!("a dispatch result was not `passed`\n{}", st.logs());
    }
    let executed = executed.load(Ordering::Relaxed);
    if executed != (n + 1) as u64 {
        bail!(
            "the instant runners executed {executed} jobs for {} commits\n{}",
            n + 1,
            st.logs()
        );
    }
    let per_job = |x: u64| x as f64 / n as f64;
    let d = counts_delta(&msgs0, &msgs1, |k| k == "jetci-dispatcher");
    let r = counts_delta(&msgs0, &msgs1, |k| k.starts_with("jetci-bench instant"));
    stop.cancel();
    Ok(Run {
        rate: n as f64 / secs,
        secs,
        publish_secs,
        reassigned: arrivals.iter().filter(|a| a.attempt > 1).count(),
        cpu: [0, 1, 2].map(|i| (cpu1[i] - cpu0[i]) / n as f64),
        dispatcher_core: (cpu1[0] - cpu0[0]) / secs,
        msgs: [d.msgs_in, d.msgs_out, r.msgs_in, r.msgs_out].map(per_job),
    })
}

/// The D benchmark; see the module comment.
pub fn bench_dispatch(rt: &tokio::runtime::Runtime, o: &Opts, rep: &mut Report) -> Result<()> {
    let n_ceiling = if o.quick { 500 } else { 20_000 };
    let (seq_rate, pipe_rate) = ceiling(rt, n_ceiling)?;
    let configs: &[(usize, u32, usize)] = if o.quick {
        &[(1, 1, 30), (2, 4, 100)]
    } else {
        &[(1, 1, 1_000), (4, 8, 5_000)]
    };
    for &(runners, slots, n) in configs {
        let r = run_dispatch(rt, runners, slots, n)?;
        let what = format!(
            "assignments/s: backlog of {n} commits, {runners} instant runner(s) × {slots} slot(s)"
        );
        rep.rows.push(Row {
            id: "D",
            what,
            n: format!("{n} jobs"),
            median: format!("{:.0} jobs/s", r.rate),
            p95: format!("({:.2} s total)", r.secs),
            floor: format!("{pipe_rate:.0} msg/s ceiling"),
            ratio: format!("{:.1} % of ceiling", r.rate / pipe_rate * 100.0),
            goal: "≥ 5,000/s".into(),
            verdict: verdict_rate(r.rate, r.reassigned),
        });
        rep.rows.push(Row {
            id: "D",
            what: format!(
                "per job, {runners} × {slots}: dispatcher CPU / NATS messages the dispatcher sent + received"
            ),
            n: format!("{n} jobs"),
            median: format!(
                "{:.2} ms CPU ({:.0} % of a core)",
                r.cpu[0] * 1000.0,
                r.dispatcher_core * 100.0
            ),
            p95: format!("{:.1} sent + {:.1} received", r.msgs[0], r.msgs[1]),
            floor: format!("nats-server {:.2} ms CPU", r.cpu[1] * 1000.0),
            ratio: format!(
                "runners {:.1} sent + {:.1} received, {:.2} ms CPU",
                r.msgs[2],
                r.msgs[3],
                r.cpu[2] * 1000.0
            ),
            goal: "–".into(),
            verdict: "–".into(),
        });
        rep.notes.push(format!(
            "D {runners} × {slots}: the {n} commits were published in {:.2} s ({:.0}/s) of the {:.2} s \
             run; {} of {n} results came from a reassigned attempt.",
            r.publish_secs,
            n as f64 / r.publish_secs,
            r.secs,
            r.reassigned
        ));
    }
    rep.rows.push(Row {
        id: "D",
        what: "ceiling: raw JetStream publish+ack of 300 B (same server, file store)".into(),
        n: format!("{n_ceiling}"),
        median: format!("{pipe_rate:.0} msg/s (256 in flight)"),
        p95: format!("{seq_rate:.0} msg/s (1 in flight)"),
        floor: "–".into(),
        ratio: "–".into(),
        goal: "–".into(),
        verdict: "–".into(),
    });
    rep.notes.push(
        "D: one jetci-dispatcher (defaults) and instant runners: jetci-runner's own loop \
         (jetci::runner::run) with an executor that runs nothing, in the harness process: \
         presence in ci-runners, a durable consumer on its own job subject pulled one job at a \
         time, claim (one compare-and-set on the revision the job's headers carry, \
         jetci::protocol::attempt), a heartbeat task, fence (skipped: the claim is fresh), \
         `publish_final` of a `passed` result, `final` state by compare-and-set, ack; no \
         checkout, no command, no log. After one warm-up \
         commit, N commits are published straight into CI_COMMITS as the observer does (CommitMsg, \
         `Nats-Msg-Id`, 256 in flight); the rate is N over the time from the first publish to the \
         N-th result's arrival on `ci.results.>`. The per-job row divides CPU time \
         (/proc/PID/stat, 10 ms ticks) and message counts (nats-server `/connz`: in_msgs = \
         messages the client sent, i.e. publishes, acks, KV writes, API and direct-get requests; \
         out_msgs = messages delivered to it: replies, pulled jobs/commits, KV watch updates) by N. \
         The ceiling row is raw publish+ack of 300 B on a fresh server."
            .into(),
    );
    Ok(())
}

fn verdict_rate(rate: f64, reassigned: usize) -> String {
    let mut v = crate::verdict(rate >= GOAL);
    if reassigned > 0 {
        v.push_str(&format!(" ({reassigned} reassigned)"));
    }
    v
}
