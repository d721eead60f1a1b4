//! `jetci-runner`: runs jobs assigned to it and publishes their results.
//!
//! It registers in `ci-runners`, owns one durable pull consumer on its own subject
//! `ci.jobs.<id>`, and pulls one job per free slot (never more: a prefetched job ages past its
//! deadline and runs twice, JETSTREAM-NOTES section 0). Each job is handled in `job.rs`.

mod exec;
mod job;
mod logs;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::consumer::{pull, AckPolicy, PullConsumer};
use clap::Parser;
use futures::StreamExt;
use jetci::connect::{ConnectArgs, Nats};
use jetci::logging::LogArgs;
use jetci::messages::{self, RunnerInfo, VERSION};
use jetci::repo_config::DEFAULT_COMMAND;
use jetci::shutdown::Shutdown;
use jetci::streams::{self, Streams};
use jetci::subjects::{check_token, repo_slug};
use tokio::sync::Semaphore;

use crate::job::Runner;

/// jetci's test runner: checks out each commit it is given, runs the repository's test command
/// and publishes the result.
///
/// Start as many as you like, on any machine that reaches the NATS server; each needs its own
/// --id. A runner takes jobs only from its own subject `ci.jobs.<id>`; dispatchers decide which
/// runner gets what. The command comes from the repository's `.jetci.toml` (`command = "..."`)
/// or else --default-command, run with `sh -c` in a fresh checkout.
///
/// Example: jetci-runner -s nats://ci.example:4222 --id build-1 --work-dir /var/lib/jetci/build-1
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    #[command(flatten)]
    connect: ConnectArgs,
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    metrics: jetci::metrics::MetricsArgs,
    /// This runner's id: letters, digits, '-' and '_' (default: the host name).
    #[arg(long, env = "JETCI_RUNNER_ID")]
    id: Option<String>,
    /// Where mirrors, workspaces and unsent results live (default: ~/.cache/jetci/runner-<id>).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Test command for repositories without a `.jetci.toml` command.
    #[arg(long, default_value = DEFAULT_COMMAND)]
    default_command: String,
    /// Timeout for repositories whose `.jetci.toml` sets none (e.g. 90s, 10m, 1h).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
    timeout: Duration,
    /// Labels this runner offers (comma-separated); a job that asks for labels runs only on a
    /// runner that has them all.
    #[arg(long, value_delimiter = ',')]
    labels: Vec<String>,
    /// Jobs run at once.
    #[arg(long, default_value_t = 1)]
    jobs: u32,
    /// How often the runner proves it is alive while a job runs.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    heartbeat: Duration,
    /// Lease on the job message: a job not extended for this long counts as lost. Keep it about
    /// three heartbeats and equal to the dispatcher's --ack-wait.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "3s")]
    lease: Duration,
    /// Bytes of output stored per job in CI_LOGS; the rest is cut with a marker.
    #[arg(long, default_value_t = 10 * 1024 * 1024)]
    log_cap: u64,
    /// On SIGTERM, how long to let running jobs finish before handing them back to another
    /// runner (a second SIGTERM hands them back at once).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
    drain_timeout: Duration,
    /// Keep each job's workspace after it ends (for debugging).
    #[arg(long)]
    keep_workspaces: bool,
    /// A directory shared by all jobs (dependency caches and the like), given to them as
    /// JETCI_CACHE_DIR. Without it nothing survives from one job to the next.
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// More environment variables to pass from the runner to jobs (by name, repeatable).
    #[arg(long = "pass-env", value_name = "NAME")]
    pass_env: Vec<String>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    args.log.init();
    if let Err(e) = run(args).await {
        eprintln!("jetci-runner: error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let id = match &args.id {
        Some(id) => id.clone(),
        None => repo_slug(
            &hostname::get()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
        ),
    };
    check_token("runner id", &id)?;
    anyhow::ensure!(args.jobs >= 1, "--jobs must be at least 1");
    anyhow::ensure!(
        args.heartbeat < args.lease,
        "--heartbeat ({}) must be shorter than --lease ({})",
        humantime::format_duration(args.heartbeat),
        humantime::format_duration(args.lease)
    );
    for l in &args.labels {
        check_token("label", l)?;
    }
    let work_dir = match &args.work_dir {
        Some(d) => d.clone(),
        None => default_work_dir(&id),
    };
    std::fs::create_dir_all(&work_dir)
        .with_context(|| format!("cannot create work dir {}", work_dir.display()))?;
    // Workspaces of a previous life are garbage (earlier builds moved them to `trash` first);
    // kept results are not.
    let _ = std::fs::remove_dir_all(work_dir.join("jobs"));
    let _ = std::fs::remove_dir_all(work_dir.join("trash"));

    args.metrics.install()?;
    let shutdown = Shutdown::install()?;
    let nats = args.connect.connect(&format!("jetci-runner {id}")).await?;
    let streams = streams::setup(&nats).await?;
    ensure_id_free(&streams, &id, args.lease).await?;
    let consumer = job_consumer(&nats, &streams, &id, args.lease, args.jobs).await?;

    let mut runner = Runner::new(
        nats.clone(),
        streams.clone(),
        id.clone(),
        work_dir.clone(),
        args.default_command.clone(),
        args.timeout,
        args.heartbeat,
        args.log_cap,
        args.keep_workspaces,
        args.pass_env.clone(),
    );
    if let Some(dir) = &args.cache_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create cache dir {}", dir.display()))?;
        runner.cache_dir = Some(std::fs::canonicalize(dir).unwrap_or_else(|_| dir.clone()));
    }
    let runner = Arc::new(runner);
    let orphans = exec::kill_orphans(&runner.owner()).await;
    if orphans > 0 {
        tracing::warn!(
            processes = orphans,
            "killed test processes left by an earlier run of this runner"
        );
    }
    tokio::spawn(runner.clone().deliver_pending());
    let presence = tokio::spawn(register(
        runner.clone(),
        args.labels.clone(),
        args.jobs,
        shutdown.token.clone(),
    ));
    tokio::spawn(answer_probes(nats.clone(), id.clone()));
    tracing::info!(%id, work_dir = %work_dir.display(), jobs = args.jobs, labels = ?args.labels, "runner ready");

    // Jobs are handed back on a second signal, or when draining takes longer than allowed.
    let hurry = tokio_util::sync::CancellationToken::new();
    {
        let (again, hurry) = (shutdown.again.clone(), hurry.clone());
        tokio::spawn(async move {
            again.cancelled().await;
            hurry.cancel();
        });
    }

    // The loop: pull one job → wait for a free slot → handle it in its own task. The pull is
    // outstanding while every slot is busy, but the server delivers nothing until a job is acked
    // (`max_ack_pending` is the number of slots), so the next job arrives the moment the last
    // one's ack does, without a pull round trip, and never waits in this process.
    let slots = Arc::new(Semaphore::new(args.jobs as usize));
    let mut connections = nats.connections.clone();
    connections.borrow_and_update();
    loop {
        let next = tokio::select! {
            m = next_job(&consumer) => m,
            // A pull sent before a reconnect may have died with the old connection (a restarted
            // server forgets it, and the client would wait for it until it expires): send a new
            // one at once.
            Ok(()) = connections.changed() => continue,
            _ = shutdown.token.cancelled() => break,
        };
        let Some(msg) = next else {
            continue;
        };
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("semaphore is never closed"),
            _ = shutdown.token.cancelled() => {
                // Not started: back to the stream for this runner's next life or, after the
                // lease, another runner.
                let _ = msg.ack_with(async_nats::jetstream::AckKind::Nak(None)).await;
                break;
            }
        };
        let (runner, hurry) = (runner.clone(), hurry.clone());
        tokio::spawn(async move {
            runner.handle(msg, hurry).await;
            drop(permit);
        });
    }

    // Drain: finish running jobs (a second signal hands them back), then leave.
    let running = runner.active.lock().expect("lock").len();
    if running > 0 {
        tracing::info!(
            running,
            "waiting for running jobs to finish (signal again to hand them back)"
        );
    }
    tokio::select! {
        _ = slots.acquire_many(args.jobs) => {}
        _ = tokio::time::sleep(args.drain_timeout) => {
            tracing::warn!(drain_timeout = %humantime::format_duration(args.drain_timeout), "jobs still running after the drain timeout; handing them back");
            hurry.cancel();
            let _ = slots.acquire_many(args.jobs).await;
        }
    }
    presence.abort();
    let _ = streams.runners.delete(&id).await;
    let _ = nats.client.flush().await;
    tracing::info!("runner stopped");
    Ok(())
}

fn default_work_dir(id: &str) -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("jetci").join(format!("runner-{id}"))
}

/// Refuses to start while another runner with the same id is alive: two processes on one job
/// subject would steal each other's jobs.
async fn ensure_id_free(streams: &Streams, id: &str, lease: Duration) -> anyhow::Result<()> {
    // An entry refreshed within the lease is a live runner; wait out one lease in case it is the
    // previous life of this runner, killed a moment ago.
    let deadline = tokio::time::Instant::now() + lease * 2;
    loop {
        let live = match streams.runners.entry(id).await {
            Ok(Some(e)) if e.operation == async_nats::jetstream::kv::Operation::Put => {
                jetci::job_state::age_of(e.created) < lease
            }
            _ => false,
        };
        if !live {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "runner id {id:?} is in use by a live runner; give this one another --id"
            );
        }
        tokio::time::sleep(lease / 3).await;
    }
}

/// This runner's durable consumer on its own job subject.
///
/// Ack wait is the lease (heartbeats extend it); `max_ack_pending` is the number of slots, so
/// the server never hands out more jobs than the runner can start (JETSTREAM-NOTES 5.1).
async fn job_consumer(
    nats: &Nats,
    streams: &Streams,
    id: &str,
    lease: Duration,
    jobs: u32,
) -> anyhow::Result<PullConsumer> {
    let name = nats.names.runner_consumer(id);
    let config = pull::Config {
        durable_name: Some(name.clone()),
        filter_subject: nats.names.jobs_subject(id),
        ack_policy: AckPolicy::Explicit,
        ack_wait: lease,
        max_ack_pending: jobs as i64,
        // A runner id that never comes back should not leave its consumer forever.
        inactive_threshold: Duration::from_secs(7 * 24 * 3600),
        ..Default::default()
    };
    let consumer = match streams.jobs.get_consumer::<pull::Config>(&name).await {
        Ok(c)
            if c.cached_info().config.ack_wait == lease
                && c.cached_info().config.max_ack_pending == jobs as i64 =>
        {
            c
        }
        Ok(_) => streams
            .jobs
            .update_consumer(config)
            .await
            .with_context(|| format!("cannot update consumer {name}"))?,
        Err(_) => streams
            .jobs
            .create_consumer(config)
            .await
            .with_context(|| format!("cannot create consumer {name}"))?,
    };
    Ok(consumer)
}

/// Waits up to a few seconds for one job. Consumer errors are transient (JETSTREAM-NOTES
/// section 0, item 5): logged, then `None`.
async fn next_job(consumer: &PullConsumer) -> Option<async_nats::jetstream::Message> {
    let batch = consumer
        .batch()
        .max_messages(1)
        .expires(Duration::from_secs(5))
        .messages()
        .await;
    match batch {
        Ok(mut msgs) => match msgs.next().await {
            Some(Ok(m)) => Some(m),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "pulling a job failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                None
            }
            None => None,
        },
        Err(e) => {
            tracing::warn!(error = %e, "pulling a job failed; retrying");
            tokio::time::sleep(Duration::from_millis(500)).await;
            None
        }
    }
}

/// Keeps this runner's entry in `ci-runners` fresh every heartbeat; dispatchers treat an entry
/// older than the lease as a gone runner.
async fn register(
    runner: Arc<Runner>,
    labels: Vec<String>,
    capacity: u32,
    draining: tokio_util::sync::CancellationToken,
) {
    let started = messages::now();
    let host = hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut tick = tokio::time::interval(runner.heartbeat);
    let mut last_beat = std::time::Instant::now();
    loop {
        tick.tick().await;
        let info = RunnerInfo {
            v: VERSION,
            id: runner.id.clone(),
            host: host.clone(),
            labels: labels.clone(),
            capacity,
            jobs: runner
                .active
                .lock()
                .expect("lock")
                .iter()
                .cloned()
                .collect(),
            accepting: !draining.is_cancelled(),
            started_at: started,
            updated_at: messages::now(),
        };
        metrics::gauge!(jetci::metrics::names::JOBS_IN_FLIGHT).set(info.jobs.len() as f64);
        match runner
            .streams
            .runners
            .put(&runner.id, messages::encode(&info))
            .await
        {
            Ok(_) => last_beat = std::time::Instant::now(),
            Err(e) => tracing::warn!(error = %e, "cannot refresh runner presence; retrying"),
        }
        metrics::gauge!(jetci::metrics::names::HEARTBEAT_AGE)
            .set(last_beat.elapsed().as_secs_f64());
    }
}

/// Answers liveness probes on `ci.control.<id>`. A dispatcher whose heartbeat from this runner
/// is late asks here once; if this process is gone, NATS answers "no responders" at once
/// (DESIGN.md, "Deadlines instead of pings").
async fn answer_probes(nats: Nats, id: String) {
    let Ok(mut sub) = nats.client.subscribe(nats.names.control_subject(&id)).await else {
        tracing::warn!("cannot subscribe to liveness probes");
        return;
    };
    while let Some(msg) = sub.next().await {
        if let Some(reply) = msg.reply {
            let _ = nats.client.publish(reply, "alive".into()).await;
        }
    }
}
