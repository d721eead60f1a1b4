//! An instant runner: speaks jetci-runner's protocol (bins/runner/src/main.rs and job.rs) with
//! the jetci library but runs nothing, so a benchmark can drive the real jetci-dispatcher as fast
//! as the protocol allows (issue 7 D, "assignments/s with runners that answer at once").
//!
//! Per job it does what a real runner does, minus checkout, command and log: pull one job at a
//! time from its own durable consumer on `ci.jobs.<id>` (the next pull outstanding while the
//! slots are busy), claim it, fence, publish a `passed` result with
//! [`jetci::results::publish_final`], mark the state `final`, then ack the job; claim, fence and
//! final go through [`jetci::attempt`], the code jetci-runner uses. It registers in `ci-runners`
//! every second like `register` and answers liveness probes on `ci.control.<id>` like
//! `answer_probes`, so the dispatcher treats it as a live runner. It sends no job heartbeat: a
//! job lives for a few round trips, far less than the lease.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::consumer::{pull, AckPolicy, PullConsumer};
use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use jetci::attempt::{self, Attempt, Renewal};
use jetci::connect::{ConnectArgs, Nats};
use jetci::messages::{self, decode, JobMsg, ResultMsg, RunnerInfo, Status, VERSION};
use jetci::results::{publish_final, Published};
use jetci::shutdown::CancellationToken;
use jetci::streams::{self, Streams};
use tokio::sync::Semaphore;

/// The runner's lease on a job message (jetci-runner's `--lease` default).
const LEASE: Duration = Duration::from_secs(3);
/// How often presence is refreshed (jetci-runner's `--heartbeat` default).
const HEARTBEAT: Duration = Duration::from_secs(1);

/// Connects to `url` as jetci's binaries do (server version and JetStream checked), with the
/// connection name `name` (what `/connz` shows).
pub async fn connect(url: &str, name: &str) -> anyhow::Result<Nats> {
    let args = ConnectArgs {
        server: url.to_string(),
        creds: None,
        user: None,
        password: None,
        token: None,
        nkey: None,
        tlscert: None,
        tlskey: None,
        tlsca: None,
        inbox_prefix: None,
        prefix: "ci".into(),
        replicas: 1,
    };
    Ok(args.connect(name).await?)
}

/// A running instant runner; it stops when `stop` is cancelled.
pub struct InstantRunner {
    /// Final results it stored (not counting "already published").
    stored: Arc<AtomicU64>,
}

/// The state every task of one instant runner shares.
struct Shared {
    nats: Nats,
    streams: Streams,
    id: String,
    /// Job ids in hand, reported in `ci-runners` as the real runner does.
    active: Mutex<BTreeSet<String>>,
    stored: Arc<AtomicU64>,
}

impl InstantRunner {
    /// Connects as `jetci-bench instant <id>`, registers with `slots` job slots and starts
    /// taking jobs; returns once the presence entry is written.
    pub async fn start(
        url: &str,
        id: &str,
        slots: u32,
        stop: CancellationToken,
    ) -> anyhow::Result<InstantRunner> {
        let nats = connect(url, &format!("jetci-bench instant {id}")).await?;
        let streams = streams::setup(&nats).await?;
        let consumer = job_consumer(&nats, &streams, id, slots).await?;
        let stored = Arc::new(AtomicU64::new(0));
        let shared = Arc::new(Shared {
            nats,
            streams,
            id: id.to_string(),
            active: Mutex::new(BTreeSet::new()),
            stored: stored.clone(),
        });
        shared.put_presence(slots).await?;
        tokio::spawn(shared.clone().register(slots, stop.clone()));
        tokio::spawn(shared.clone().answer_probes(stop.clone()));
        tokio::spawn(shared.clone().take_jobs(consumer, slots, stop));
        Ok(InstantRunner { stored })
    }

    /// Final results stored so far.
    pub fn stored(&self) -> u64 {
        self.stored.load(Ordering::Relaxed)
    }
}

/// The runner's durable consumer on its own job subject, configured as jetci-runner's
/// `job_consumer` (ack wait = lease, `max_ack_pending` = slots).
async fn job_consumer(
    nats: &Nats,
    streams: &Streams,
    id: &str,
    slots: u32,
) -> anyhow::Result<PullConsumer> {
    let name = nats.names.runner_consumer(id);
    let config = pull::Config {
        durable_name: Some(name.clone()),
        filter_subject: nats.names.jobs_subject(id),
        ack_policy: AckPolicy::Explicit,
        ack_wait: LEASE,
        max_ack_pending: slots as i64,
        inactive_threshold: Duration::from_secs(3600),
        ..Default::default()
    };
    streams
        .jobs
        .create_consumer(config)
        .await
        .with_context(|| format!("cannot create consumer {name}"))
}

impl Shared {
    async fn put_presence(&self, slots: u32) -> anyhow::Result<()> {
        let now = messages::now();
        let info = RunnerInfo {
            v: VERSION,
            id: self.id.clone(),
            host: "jetci-bench".into(),
            labels: vec![],
            capacity: slots,
            jobs: self.active.lock().expect("lock").iter().cloned().collect(),
            accepting: true,
            started_at: now,
            updated_at: now,
        };
        self.streams
            .runners
            .put(&self.id, messages::encode(&info))
            .await
            .context("cannot write presence")?;
        Ok(())
    }

    /// Refreshes the presence entry every heartbeat; deletes it at the stop.
    async fn register(self: Arc<Self>, slots: u32, stop: CancellationToken) {
        let mut tick = tokio::time::interval(HEARTBEAT);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => break,
            }
            let _ = self.put_presence(slots).await;
        }
        let _ = self.streams.runners.delete(&self.id).await;
    }

    /// Answers the dispatcher's liveness probes, so a late probe never reads "gone".
    async fn answer_probes(self: Arc<Self>, stop: CancellationToken) {
        let subject = self.nats.names.control_subject(&self.id);
        let Ok(mut sub) = self.nats.client.subscribe(subject).await else {
            return;
        };
        loop {
            let msg = tokio::select! {
                m = sub.next() => match m { Some(m) => m, None => return },
                _ = stop.cancelled() => return,
            };
            if let Some(reply) = msg.reply {
                let _ = self.nats.client.publish(reply, "alive".into()).await;
            }
        }
    }

    /// jetci-runner's loop: pull one job → wait for a free slot → handle it in its own task (the
    /// pull stays outstanding while every slot is busy; `max_ack_pending` keeps the server from
    /// delivering more than the slots).
    async fn take_jobs(
        self: Arc<Self>,
        consumer: PullConsumer,
        slots: u32,
        stop: CancellationToken,
    ) {
        let free = Arc::new(Semaphore::new(slots as usize));
        loop {
            let next = tokio::select! {
                m = next_job(&consumer) => m,
                _ = stop.cancelled() => return,
            };
            let Some(msg) = next else {
                continue;
            };
            let permit = tokio::select! {
                p = free.clone().acquire_owned() => p.expect("semaphore is never closed"),
                _ = stop.cancelled() => return,
            };
            let me = self.clone();
            tokio::spawn(async move {
                me.handle(msg).await;
                drop(permit);
            });
        }
    }

    /// One job: claim → fence → publish `passed` → mark final → ack, through
    /// [`jetci::attempt`] as `Runner::handle` does.
    async fn handle(&self, msg: jetstream::Message) {
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        let job = match decode::<JobMsg>(&msg.payload) {
            Ok(job) if job.runner == self.id => job,
            _ => {
                let _ = msg.ack_with(AckKind::Term).await;
                return;
            }
        };
        let attempt = Attempt::new(&self.streams.job_states, &job, &self.id);
        let epoch = *self.nats.connections.borrow();
        let assigned = attempt::assigned_in(msg.headers.as_ref());
        let claimed = match attempt.claim(seq, assigned, epoch).await {
            Ok(Some(written)) => written,
            Ok(None) => {
                let _ = msg.double_ack().await;
                return;
            }
            // Left for the dispatcher's lease, as the real runner does.
            Err(_) => return,
        };
        let job_id = job.job_id();
        self.active.lock().expect("lock").insert(job_id.clone());
        let result = passed(&self.nats, &job);
        let connected =
            self.nats.client.connection_state() == async_nats::connection::State::Connected;
        let epoch = *self.nats.connections.borrow();
        match attempt.fence(&claimed, HEARTBEAT, epoch, connected).await {
            Renewal::Held(fenced) => {
                self.publish(&result).await;
                attempt::mark_final(&self.streams.job_states, &result, Some(fenced)).await;
            }
            Renewal::Unreachable => {
                self.publish(&result).await;
                attempt::mark_final(&self.streams.job_states, &result, None).await;
            }
            Renewal::Lost => {}
        }
        // As `Runner::handle`: the state says final already, so a plain ack will do.
        let _ = msg.ack().await;
        self.active.lock().expect("lock").remove(&job_id);
    }

    /// `Runner::deliver`'s publish: first writer wins; retried while NATS refuses.
    async fn publish(&self, result: &ResultMsg) {
        let mut delay = Duration::from_millis(50);
        loop {
            match publish_final(&self.nats, result).await {
                Ok(Published::Stored(_)) => {
                    self.stored.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Ok(Published::AlreadyPublished) => return,
                Err(_) => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

/// jetci-runner's `next_job`: one message, waiting up to 5 s.
async fn next_job(consumer: &PullConsumer) -> Option<jetstream::Message> {
    let batch = consumer
        .batch()
        .max_messages(1)
        .expires(Duration::from_secs(5))
        .messages()
        .await;
    match batch {
        Ok(mut msgs) => match msgs.next().await {
            Some(Ok(m)) => Some(m),
            Some(Err(_)) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                None
            }
            None => None,
        },
        Err(_) => {
            tokio::time::sleep(Duration::from_millis(100)).await;
            None
        }
    }
}

/// The `passed` result of a job that ran nothing: exit code 0, no output, zero duration.
fn passed(nats: &Nats, job: &JobMsg) -> ResultMsg {
    let now = messages::now();
    ResultMsg {
        v: VERSION,
        repo: job.repo.clone(),
        url: job.url.clone(),
        branch: job.branch.clone(),
        sha: job.sha.clone(),
        run: job.run,
        job_id: job.job_id(),
        attempt: job.attempt,
        runner: job.runner.clone(),
        status: Status::Passed,
        exit_code: Some(0),
        signal: None,
        reason: None,
        started_at: now,
        finished_at: now,
        duration_ms: 0,
        output_tail: String::new(),
        log_subject: nats
            .names
            .logs_subject(&job.repo, &job.sha, job.run, job.attempt),
        log_bytes: 0,
        commit_seq: job.commit_seq,
        author: job.author.clone(),
        summary: job.summary.clone(),
        tests: None,
    }
}
