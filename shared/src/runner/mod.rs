//! The runner process as a library: its loop, presence and liveness answers, with the work of
//! a job injected as an [`Executor`] (as mini-redis' `server::run` takes its listener).
//! `jetci-runner` passes the executor that checks a commit out and runs its command; the
//! benchmark passes one that runs nothing, so it measures the real protocol and nothing else.
//!
//! A runner registers in `ci-runners`, owns one durable pull consumer on its own subject
//! `ci.jobs.<id>`, and pulls one job per free slot (never more: a prefetched job ages past its
//! deadline and runs twice, JETSTREAM-NOTES section 0). Each job goes through `job.rs`: claim,
//! heartbeat, execute, fence, publish the verdict, mark final, ack.

mod job;

use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, PullConsumer};
use async_nats::jetstream::kv;
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::connect::Nats;
use crate::messages::{self, JobMsg, ResultMsg, RunnerInfo, VERSION};
use crate::metrics::names as m;
use crate::protocol::store::age_of;
use crate::shutdown::Shutdown;
use crate::streams::Streams;

/// How long a stopping runner tries to delete its presence and flush what it sent.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(2);

/// What a runner is, and how it keeps its leases.
#[derive(Debug, Clone)]
pub struct Config {
    /// Its id: a subject token, unique among live runners.
    pub id: String,
    /// The host name shown in its presence.
    pub host: String,
    /// Labels it offers; a job that asks for labels runs only on a runner that has them all.
    pub labels: Vec<String>,
    /// Jobs it runs at once.
    pub slots: u32,
    /// How often it proves a running job (and itself) alive.
    pub heartbeat: Duration,
    /// The ack wait of its job messages; about three heartbeats, the dispatcher's lease.
    pub lease: Duration,
    /// On shutdown, how long running jobs may finish before they are handed back.
    pub drain_timeout: Duration,
    /// Where results NATS did not take yet are kept (`<dir>/pending`), and published from at
    /// the next start.
    pub work_dir: PathBuf,
    /// How long the job consumer of a runner id that never comes back outlives it.
    pub consumer_inactive: Duration,
    /// What an operator should know about this runner (jobs without a sandbox, say): shown in
    /// its presence entry.
    pub warnings: Vec<String>,
}

/// What running a job came to.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per job, moved once: a box buys nothing
pub enum Execution {
    /// A verdict, whatever its status.
    Done(ResultMsg),
    /// No verdict, and not the test's fault (the checkout failed): another attempt should run
    /// it, maybe on another runner. The reason goes into the job's state.
    Retry(String),
}

/// The work of a job: everything between the claim and the verdict.
pub trait Executor: Send + Sync + 'static {
    /// Called once, after the runner made sure no live runner has its id and before it takes
    /// its first job: the place to clear what an earlier life of this runner left (workspaces,
    /// processes). Never before that check: a second process started with a live runner's id
    /// must not touch that runner's jobs.
    fn prepare(&self) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Runs `job`. `result` is the attempt's result as the runner starts it (status `error`, no
    /// output, started now); the executor fills it in. When `stop` is cancelled (a cancel, a lost
    /// lease, a hurried shutdown) it ends whatever it started and returns soon; the runner knows
    /// why and decides what the result is worth.
    fn execute(
        &self,
        job: &JobMsg,
        result: ResultMsg,
        stop: &CancellationToken,
    ) -> impl Future<Output = Execution> + Send;

    /// The job's slot is free again (whatever happened to it): what it left may go.
    fn release(&self, _job: &JobMsg) {}
}

/// The runner could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("runner id {0:?} is in use by a live runner; give this one another --id")]
    IdInUse(String),
    #[error("cannot set up consumer {name}: {reason}")]
    Consumer { name: String, reason: String },
    #[error("cannot create {dir}: {reason}")]
    WorkDir { dir: String, reason: String },
}

/// The runner's shared state: its settings, its connection and what it runs now.
pub(crate) struct Runner<E> {
    pub nats: Nats,
    pub streams: Streams,
    pub config: Config,
    pub executor: Arc<E>,
    /// Attempt ids running now (reported in `ci-runners`).
    pub active: Mutex<BTreeSet<String>>,
}

/// Runs a runner until `shutdown`, then drains: running jobs finish and publish their results
/// (up to `drain_timeout`; a second signal hands them back at once), and its presence goes.
///
/// Errors: another live runner has the same id, the work dir cannot be made, or its consumer
/// cannot be set up.
pub async fn run<E: Executor>(
    nats: Nats,
    streams: Streams,
    config: Config,
    executor: Arc<E>,
    shutdown: Shutdown,
) -> Result<(), StartError> {
    let pending = config.work_dir.join("pending");
    std::fs::create_dir_all(&pending).map_err(|e| StartError::WorkDir {
        dir: pending.display().to_string(),
        reason: e.to_string(),
    })?;
    ensure_id_free(&streams.runners, &config.id, config.lease).await?;
    executor.prepare().await;
    let consumer = job_consumer(&nats, &streams, &config).await?;
    let slots = config.slots;
    let runner = Arc::new(Runner {
        nats: nats.clone(),
        streams,
        config,
        executor,
        active: Mutex::new(BTreeSet::new()),
    });
    tokio::spawn(runner.clone().deliver_pending());
    let presence = tokio::spawn(register(runner.clone(), shutdown.token.clone()));
    let probes = tokio::spawn(answer_probes(nats.clone(), runner.config.id.clone()));
    tracing::info!(id = %runner.config.id, jobs = slots, labels = ?runner.config.labels, "runner ready");

    // Jobs are handed back on a second signal, or when draining takes longer than allowed.
    let hurry = shutdown.again.child_token();
    let free = Arc::new(Semaphore::new(slots as usize));
    take_jobs(&runner, &consumer, &free, &hurry, &shutdown.token).await;

    // Drain: finish running jobs (a second signal hands them back), then leave.
    let running = runner.active.lock().expect("lock").len();
    if running > 0 {
        tracing::info!(
            running,
            "waiting for running jobs to finish (signal again to hand them back)"
        );
    }
    let drain_timeout = runner.config.drain_timeout;
    tokio::select! {
        _ = free.acquire_many(slots) => {}
        _ = tokio::time::sleep(drain_timeout) => {
            tracing::warn!(drain_timeout = %humantime::format_duration(drain_timeout), "jobs still running after the drain timeout; handing them back");
            hurry.cancel();
            let _ = free.acquire_many(slots).await;
        }
    }
    presence.abort();
    probes.abort();
    // With NATS away these would wait for it: a stopping runner does not (its entry ages out).
    let goodbye = async {
        let _ = runner.streams.runners.delete(&runner.config.id).await;
        let _ = nats.client.flush().await;
    };
    let _ = tokio::time::timeout(GOODBYE_TIMEOUT, goodbye).await;
    tracing::info!("runner stopped");
    Ok(())
}

/// The loop: pull one job → wait for a free slot → handle it in its own task. The pull is
/// outstanding while every slot is busy, but the server delivers nothing until a job is acked
/// (`max_ack_pending` is the number of slots), so the next job arrives the moment the last one's
/// ack does, without a pull round trip, and never waits in this process.
async fn take_jobs<E: Executor>(
    runner: &Arc<Runner<E>>,
    consumer: &PullConsumer,
    free: &Arc<Semaphore>,
    hurry: &CancellationToken,
    stop: &CancellationToken,
) {
    let mut connections = runner.nats.connections.clone();
    connections.borrow_and_update();
    loop {
        let next = tokio::select! {
            m = next_job(consumer) => m,
            // A pull sent before a reconnect may have died with the old connection (a restarted
            // server forgets it, and the client would wait for it until it expires): send a new
            // one at once.
            Ok(()) = connections.changed() => continue,
            _ = stop.cancelled() => return,
        };
        let Some(msg) = next else {
            continue;
        };
        let permit = tokio::select! {
            p = free.clone().acquire_owned() => p.expect("semaphore is never closed"),
            _ = stop.cancelled() => {
                // Not started: back to the stream for this runner's next life or, after the
                // lease, another runner.
                let _ = msg.ack_with(async_nats::jetstream::AckKind::Nak(None)).await;
                return;
            }
        };
        let (runner, hurry) = (runner.clone(), hurry.clone());
        tokio::spawn(async move {
            runner.handle(msg, hurry).await;
            drop(permit);
        });
    }
}

/// Refuses to start while another runner with the same id is alive: two processes on one job
/// subject would steal each other's jobs. An entry refreshed within the lease is a live runner;
/// this waits out two leases in case it is the previous life of this runner, killed a moment ago.
async fn ensure_id_free(runners: &kv::Store, id: &str, lease: Duration) -> Result<(), StartError> {
    let deadline = tokio::time::Instant::now() + lease * 2;
    loop {
        let live = match runners.entry(id).await {
            Ok(Some(e)) if e.operation == kv::Operation::Put => age_of(e.created) < lease,
            _ => false,
        };
        if !live {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(StartError::IdInUse(id.to_string()));
        }
        tokio::time::sleep(lease / 3).await;
    }
}

/// The runner's durable consumer on its own job subject.
///
/// Ack wait is the lease (heartbeats extend it); `max_ack_pending` is the number of slots, so
/// the server never hands out more jobs than the runner can start (JETSTREAM-NOTES 5.1).
async fn job_consumer(
    nats: &Nats,
    streams: &Streams,
    config: &Config,
) -> Result<PullConsumer, StartError> {
    let name = nats.names.runner_consumer(&config.id);
    let slots = i64::from(config.slots);
    let consumer_config = pull::Config {
        durable_name: Some(name.clone()),
        filter_subject: nats.names.jobs_subject(&config.id),
        ack_policy: AckPolicy::Explicit,
        ack_wait: config.lease,
        max_ack_pending: slots,
        inactive_threshold: config.consumer_inactive,
        ..Default::default()
    };
    let err = |e: &dyn std::fmt::Display| StartError::Consumer {
        name: name.clone(),
        reason: e.to_string(),
    };
    match streams.jobs.get_consumer::<pull::Config>(&name).await {
        Ok(c)
            if c.cached_info().config.ack_wait == config.lease
                && c.cached_info().config.max_ack_pending == slots =>
        {
            Ok(c)
        }
        Ok(_) => streams
            .jobs
            .update_consumer(consumer_config)
            .await
            .map_err(|e| err(&e)),
        Err(_) => streams
            .jobs
            .create_consumer(consumer_config)
            .await
            .map_err(|e| err(&e)),
    }
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

/// Keeps this runner's entry in `ci-runners` fresh every heartbeat (the first at once);
/// dispatchers treat an entry older than the lease as a gone runner. `draining`: cancelled once
/// the runner takes no new job.
async fn register<E: Executor>(runner: Arc<Runner<E>>, draining: CancellationToken) {
    let started = messages::now();
    let mut tick = tokio::time::interval(runner.config.heartbeat);
    let mut last_beat = std::time::Instant::now();
    let mut connections = runner.nats.connections.clone();
    connections.borrow_and_update();
    loop {
        // Every heartbeat, and at once when the connection comes back: dispatchers give a
        // runner no new job after an outage until its presence is written again.
        tokio::select! {
            _ = tick.tick() => {}
            Ok(()) = connections.changed() => {}
        }
        let info = RunnerInfo {
            v: VERSION,
            id: runner.config.id.clone(),
            host: runner.config.host.clone(),
            labels: runner.config.labels.clone(),
            capacity: runner.config.slots,
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
            warnings: runner.config.warnings.clone(),
        };
        metrics::gauge!(m::JOBS_IN_FLIGHT).set(info.jobs.len() as f64);
        match runner
            .streams
            .runners
            .put(&runner.config.id, messages::encode(&info))
            .await
        {
            Ok(_) => last_beat = std::time::Instant::now(),
            Err(e) => tracing::warn!(error = %e, "cannot refresh runner presence; retrying"),
        }
        metrics::gauge!(m::HEARTBEAT_AGE).set(last_beat.elapsed().as_secs_f64());
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
