//! The dispatcher's driver: the NATS work around the [`Core`]. It turns what arrives (pulled
//! commits, the `ci-jobs` and `ci-runners` watches, probe answers, publish acks, reconnects,
//! ticks) into [`Event`]s and carries out the [`Effect`]s the core returns, feeding every
//! answer back before it takes the next event, so the core decides on one thing at a time.
//!
//! It holds the commit messages (the core knows their runs, not the messages): acking,
//! extending and, at shutdown, releasing them is the driver's.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, AckPolicy, PullConsumer};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{kv, AckKind, Message};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::core::{Config, Core, Effect, Event, CHECK_EVERY};
use crate::connect::Nats;
use crate::messages::{decode, encode, JobMsg, JobState, RunnerInfo};
use crate::metrics::{names as m, result_kind};
use crate::protocol::attempt::assigned_headers;
use crate::protocol::commit::accept;
use crate::protocol::store::{self, age_of};
use crate::protocol::verdict::{final_result, finish_without_runner, publish_final};
use crate::streams::{watch_bucket, Streams};
use crate::subjects::JobRef;

/// The most commits one pull request asks for.
const MAX_PULL: usize = 256;

/// The dispatcher could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up consumer {name} on the commits stream: {reason}")]
pub struct StartError {
    pub name: String,
    pub reason: String,
}

/// Runs a dispatcher until `shutdown`: takes commits from the shared durable consumer on
/// `CI_COMMITS` and gives each job to a runner (DESIGN.md, "One commit's life").
///
/// At shutdown it hands every commit it holds straight to another dispatcher (a nak) instead of
/// letting it lapse; running jobs go on and are adopted. Errors: the consumer cannot be created
/// or updated.
pub async fn run(
    nats: Nats,
    streams: Streams,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    let consumer = commit_consumer(&nats, &streams, config.lease).await?;
    let (job_acks, job_acks_rx) = mpsc::channel(1024);
    let (probes, probes_rx) = mpsc::channel(64);
    let mut driver = Driver {
        core: Core::new(config, Instant::now()),
        connects: connects(&nats),
        nats,
        streams,
        consumer,
        held: HashMap::new(),
        job_acks,
        probes,
    };
    driver.run(job_acks_rx, probes_rx, shutdown).await;
    Ok(())
}

/// The shared durable consumer on `CI_COMMITS`, created or found.
///
/// Its ack wait is the lease; `max_deliver` is unlimited because a commit is never dropped for
/// being redelivered (a dead dispatcher is not the commit's fault); attempts are counted in
/// `ci-jobs` instead.
async fn commit_consumer(
    nats: &Nats,
    streams: &Streams,
    lease: Duration,
) -> Result<PullConsumer, StartError> {
    let name = nats.names.dispatcher_consumer();
    let config = pull::Config {
        durable_name: Some(name.clone()),
        filter_subject: nats.names.commits_filter(),
        ack_policy: AckPolicy::Explicit,
        ack_wait: lease,
        max_ack_pending: 100_000,
        ..Default::default()
    };
    let err = |e: &dyn std::fmt::Display| StartError {
        name: name.clone(),
        reason: e.to_string(),
    };
    match streams.commits.get_consumer::<pull::Config>(&name).await {
        Ok(c) if c.cached_info().config.ack_wait == lease => Ok(c),
        Ok(_) => streams
            .commits
            .update_consumer(config)
            .await
            .map_err(|e| err(&e)),
        Err(_) => streams
            .commits
            .create_consumer(config)
            .await
            .map_err(|e| err(&e)),
    }
}

struct Driver {
    core: Core,
    /// Connections to NATS the core has been told of (the first one included): see
    /// [`Driver::tell_comeback`].
    connects: u64,
    nats: Nats,
    streams: Streams,
    consumer: PullConsumer,
    /// The commit messages of the runs the core holds, by run key.
    held: HashMap<String, Message>,
    job_acks: mpsc::Sender<Event>,
    probes: mpsc::Sender<Event>,
}

impl Driver {
    /// The loop: pull commit → (core) pick runner → publish job → extend while heartbeats come
    /// → ack on the final state.
    async fn run(
        &mut self,
        mut job_acks: mpsc::Receiver<Event>,
        mut probes: mpsc::Receiver<Event>,
        shutdown: CancellationToken,
    ) {
        let mut runner_entries = watch_bucket(self.streams.runners.clone(), "runners");
        let mut job_entries = watch_bucket(self.streams.job_states.clone(), "jobs");
        let (want_tx, want_rx) = mpsc::channel::<usize>(1);
        let (got_tx, mut got_rx) = mpsc::channel::<Pulled>(64);
        tokio::spawn(pull_commits(self.consumer.clone(), want_rx, got_tx));
        let mut tick = tokio::time::interval(CHECK_EVERY.min(self.core.beat()));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pulling = false;
        let mut connections = self.nats.connections.clone();
        tracing::info!("dispatcher ready");

        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(e) = runner_entries.recv() => runner_event(e),
                Some(e) = job_entries.recv() => job_event(e),
                Some(pulled) = got_rx.recv() => match pulled {
                    Pulled::Commit(msg) => self.take_commit(msg).await,
                    Pulled::Done => {
                        pulling = false;
                        None
                    }
                },
                Some(answer) = probes.recv() => Some(answer),
                Some(ack) = job_acks.recv() => Some(ack),
                // Wakes the loop; the comeback itself is told below, before any event.
                Ok(()) = connections.changed() => {
                    connections.borrow_and_update();
                    None
                }
                _ = tick.tick() => Some(Event::Tick),
            };
            self.tell_comeback().await;
            if let Some(event) = event {
                self.handle(event).await;
            }
            let wanted = self.core.wanted(Instant::now());
            if !pulling && wanted > 0 {
                pulling = want_tx.try_send(wanted).is_ok();
            }
        }

        for msg in self.held.values() {
            let _ = msg.ack_with(AckKind::Nak(None)).await;
        }
        let _ = self.nats.client.flush().await;
        tracing::info!(released = self.held.len(), "dispatcher stopped");
    }

    /// Tells the core that the connection came back, if it did since the core was last told,
    /// so that the core judges what came after the outage as an outage's (I3).
    ///
    /// Called before every event, not only when the connection callback's count changes:
    /// async-nats counts a connection ([`async_nats::Statistics::connects`]) before it reads
    /// anything from it and before its callback runs, so an answer that came over the new
    /// connection always finds it counted here. A probe's "no responders" from a runner that had
    /// not reconnected yet (it came back 8 ms after this dispatcher) was once taken before the
    /// reconnect, which the select had left waiting behind other events: the runner's job went
    /// to another runner while the first finished it, and the job ran to the end twice (found by
    /// the chaos test).
    async fn tell_comeback(&mut self) {
        let now = connects(&self.nats);
        if now > self.connects {
            self.connects = now;
            self.handle(Event::Reconnected).await;
        }
    }

    /// A pulled commit message: refused ones are terminated (redelivering cannot help, I5),
    /// accepted ones are held and handed to the core.
    async fn take_commit(&mut self, msg: Message) -> Option<Event> {
        metrics::counter!(m::COMMITS_RECEIVED).increment(1);
        let info = msg.info().ok();
        let seq = info.as_ref().map(|i| i.stream_sequence).unwrap_or(0);
        // Unknown counts as delivered before: the core then looks for a result first.
        let redelivered = info.is_none_or(|i| i.delivered > 1);
        match accept(&self.nats.names, msg.subject.as_str(), &msg.payload) {
            Ok(commit) => {
                self.held.insert(commit.key(), msg);
                Some(Event::CommitDelivered {
                    commit,
                    seq,
                    redelivered,
                })
            }
            Err(e) => {
                tracing::warn!(subject = %msg.subject, seq, error = %e, "terminating a commit message");
                let _ = msg.ack_with(AckKind::Term).await;
                None
            }
        }
    }

    /// Feeds `event` to the core and carries out what it returns; an effect's answer is fed
    /// back at once and its effects run before the rest.
    async fn handle(&mut self, event: Event) {
        let mut todo: VecDeque<Effect> = self.core.handle(event, Instant::now()).into();
        while let Some(effect) = todo.pop_front() {
            if let Some(answer) = self.execute(effect).await {
                let more = self.core.handle(answer, Instant::now());
                for e in more.into_iter().rev() {
                    todo.push_front(e);
                }
            }
        }
    }

    /// Carries out one effect; returns the answer of an effect that asks a question.
    async fn execute(&mut self, effect: Effect) -> Option<Event> {
        let store = &self.streams.job_states;
        match effect {
            Effect::LookUpResult { key, job } => Some(self.look_up_result(key, &job).await),
            Effect::ReadState { key } => {
                let read = store::read(store, &key).await;
                Some(Event::StateRead { key, read })
            }
            Effect::WriteState {
                key,
                state,
                revision,
            } => {
                let written = store::write(store, &key, &state, revision).await;
                Some(Event::StateWritten { key, written })
            }
            Effect::FinishWithoutRunner {
                key,
                result,
                state,
                revision,
            } => {
                let finished = finish_without_runner(&self.nats, store, &result, state, revision);
                let stored = match finished.await {
                    Ok(_) => true,
                    Err(e) => {
                        tracing::warn!(%key, error = %e, "cannot publish the final result; trying again next beat");
                        false
                    }
                };
                Some(Event::FinishedWithoutRunner { key, stored })
            }
            Effect::PublishJob {
                key,
                job,
                assigned,
                revision,
            } => self.publish_job(key, job, assigned, revision).await,
            Effect::DeleteJobMessage { seq } => {
                let _ = self.streams.jobs.delete_message(seq).await;
                None
            }
            Effect::AckCommit { run } => {
                self.ack(run);
                None
            }
            Effect::Release { run, delay } => {
                self.release(run, delay).await;
                None
            }
            Effect::ExtendCommits => {
                self.extend().await;
                None
            }
            Effect::Probe { runner } => {
                tokio::spawn(probe(self.nats.clone(), runner, self.probes.clone()));
                None
            }
            Effect::CancelJob { key, queued, by } => {
                // Off the loop: a bucket electing its leader could hold each request for seconds,
                // and the watch brings the cancelled state back anyway.
                let store = store.clone();
                tokio::spawn(async move {
                    if let Err(e) = store::request_cancel(&store, &key, &queued, &by).await {
                        tracing::warn!(%key, error = %e, "cannot ask a job of a stopped run to stop");
                    }
                });
                None
            }
            Effect::PublishRunResult { key, result } => {
                let stored = match publish_final(&self.nats, &result).await {
                    Ok(_) => {
                        let kind = result_kind(false);
                        metrics::counter!(m::RESULTS, "status" => result.status.as_str(), "kind" => kind)
                            .increment(1);
                        true
                    }
                    Err(e) => {
                        tracing::warn!(%key, error = %e, "cannot publish the run's result; trying again next beat");
                        false
                    }
                };
                Some(Event::RunResultPublished { key, stored })
            }
            Effect::CountResult { status, job } => {
                let status = status.map(|s| s.as_str()).unwrap_or("unknown");
                let kind = result_kind(job);
                metrics::counter!(m::RESULTS, "status" => status, "kind" => kind).increment(1);
                None
            }
        }
    }

    /// The stored result of `job`'s run, if any. A read that fails counts as none (the worst
    /// that follows is a run the verdict ignores: first writer wins).
    async fn look_up_result(&self, key: String, job: &JobRef) -> Event {
        let results = &self.streams.results;
        let result = match final_result(&self.nats, results, job).await {
            Ok(result) => result,
            Err(e) => {
                tracing::warn!(%key, error = %e, "cannot check for a stored result; going on");
                None
            }
        };
        Event::ResultLookedUp { key, result }
    }

    /// Extends every held commit's deadline (an in-progress ack), and records the gauges.
    async fn extend(&mut self) {
        for msg in self.held.values() {
            let _ = msg.ack_with(AckKind::Progress).await;
        }
        self.record_gauges().await;
    }

    /// Publishes a job on its runner's subject with the `assigned` state in its headers (the
    /// runner claims with one compare-and-set on it, [`crate::protocol::attempt`]); the server's
    /// ack is awaited in its own task, so the next assignment does not wait for it. A job too
    /// large for the server is answered at once with [`Event::JobRefused`].
    async fn publish_job(
        &self,
        key: String,
        job: JobMsg,
        assigned: JobState,
        revision: u64,
    ) -> Option<Event> {
        let mut publish = PublishMessage::build().payload(encode(&job));
        if let Some(headers) = assigned_headers(&assigned, revision) {
            publish = publish.headers(headers);
        }
        let publish = publish.message_id(job.attempt_id());
        let subject = self.nats.names.jobs_subject(&job.runner);
        match self.nats.js.send_publish(subject, publish).await {
            Ok(ack) => {
                tracing::info!(%key, runner = %job.runner, attempt = job.attempt, branch = ?job.branch, "job assigned");
                metrics::counter!(m::JOBS_ASSIGNED).increment(1);
                if job.attempt > 1 {
                    metrics::counter!(m::JOBS_REASSIGNED).increment(1);
                }
                let report = self.job_acks.clone();
                tokio::spawn(async move {
                    let stored = ack.await.map(|a| a.sequence).map_err(|e| e.to_string());
                    let _ = report.send(Event::JobStored { key, stored }).await;
                });
                None
            }
            Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                tracing::warn!(%key, runner = %job.runner, error = %e, "the job is too large to publish; ending its run with an error result");
                Some(Event::JobRefused {
                    key,
                    reason: e.to_string(),
                })
            }
            Err(e) => {
                // The state says `assigned`; with no heartbeat it goes stale after the lease and
                // the job is assigned again.
                tracing::warn!(%key, runner = %job.runner, error = %e, "cannot publish the job; it is retried after the lease");
                None
            }
        }
    }

    /// The run has its final result: ack the commit for good. The ack waits for the server's
    /// confirmation in its own task, so the next assignment does not wait for it.
    fn ack(&mut self, run: String) {
        let Some(msg) = self.held.remove(&run) else {
            return;
        };
        tokio::spawn(async move {
            match msg.double_ack().await {
                Ok(()) => tracing::info!(key = %run, "commit done"),
                Err(e) => {
                    tracing::warn!(key = %run, error = %e, "cannot ack the commit; it comes back and is closed then")
                }
            }
        });
    }

    /// The core gave run `run` back (no live runner has the labels it needs, and it holds as
    /// many such runs as it may): a delayed nak, so JetStream delivers the commit again after
    /// `delay` (to any dispatcher; `max_deliver` is unlimited, so it is never dropped for it).
    async fn release(&mut self, run: String, delay: Duration) {
        let Some(msg) = self.held.remove(&run) else {
            return;
        };
        if let Err(e) = msg.ack_with(AckKind::Nak(Some(delay))).await {
            tracing::warn!(key = %run, error = %e, "cannot give the commit back; it comes back after the lease");
        }
    }

    /// Queue depth, jobs in flight and the oldest heartbeat, for `--metrics-addr`.
    async fn record_gauges(&mut self) {
        let not_taken = match self.consumer.info().await {
            Ok(info) => info.num_pending,
            Err(_) => 0,
        };
        let gauges = self.core.gauges(Instant::now());
        metrics::gauge!(m::QUEUE_DEPTH).set((not_taken + u64::from(gauges.waiting)) as f64);
        metrics::gauge!(m::JOBS_IN_FLIGHT).set(gauges.in_flight as f64);
        metrics::gauge!(m::HEARTBEAT_AGE).set(gauges.oldest_heartbeat.as_secs_f64());
    }
}

/// A `ci-runners` entry as an event; one that does not parse is logged and skipped.
fn runner_event(e: kv::Entry) -> Option<Event> {
    if e.operation != kv::Operation::Put {
        return Some(Event::RunnerGone { key: e.key });
    }
    match decode::<RunnerInfo>(&e.value) {
        Ok(info) => Some(Event::RunnerSeen {
            age: age_of(e.created),
            revision: e.revision,
            key: e.key,
            info,
        }),
        Err(err) => {
            tracing::warn!(key = %e.key, error = %err, "ignoring a runner entry that does not parse");
            None
        }
    }
}

/// A `ci-jobs` entry as an event; one that does not parse is logged and skipped (a decision
/// reads it again and replaces it).
fn job_event(e: kv::Entry) -> Option<Event> {
    match store::from_entry(&e) {
        Ok(state) => Some(Event::JobStateChanged { key: e.key, state }),
        Err(err) => {
            tracing::warn!(key = %e.key, error = %err, "ignoring a job state that does not parse");
            None
        }
    }
}

/// What the commit puller hands the loop.
#[allow(clippy::large_enum_variant)] // one per pulled commit, moved once through a channel
enum Pulled {
    Commit(Message),
    /// The pull request is over (filled, expired or failed); the loop may ask again.
    Done,
}

/// Pulls up to the number of commits asked for per request from the shared consumer, handing
/// each on as it arrives. Waiting pulls are answered the moment a commit arrives; consumer
/// errors are transient (JETSTREAM-NOTES section 0, item 5).
async fn pull_commits(
    consumer: PullConsumer,
    mut want: mpsc::Receiver<usize>,
    got: mpsc::Sender<Pulled>,
) {
    while let Some(wanted) = want.recv().await {
        match consumer
            .batch()
            .max_messages(wanted.clamp(1, MAX_PULL))
            .expires(Duration::from_secs(1))
            .messages()
            .await
        {
            Ok(mut batch) => {
                while let Some(next) = batch.next().await {
                    match next {
                        Ok(m) => {
                            if got.send(Pulled::Commit(m)).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "pulling a commit failed; retrying");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "pulling a commit failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        if got.send(Pulled::Done).await.is_err() {
            return;
        }
    }
}

/// How many times the client has connected to NATS, the first time included.
fn connects(nats: &Nats) -> u64 {
    nats.client
        .statistics()
        .connects
        .load(std::sync::atomic::Ordering::Relaxed)
}

/// Asks a runner whether it is there. NATS answers "no responders" at once when no connection
/// subscribes to the runner's control subject, that is when the runner process is gone; a
/// stopped or partitioned runner just does not answer, and the lease decides.
async fn probe(nats: Nats, runner: String, out: mpsc::Sender<Event>) {
    let subject = nats.names.control_subject(&runner);
    let reply = tokio::time::timeout(
        Duration::from_secs(1),
        nats.client.request(subject, "".into()),
    )
    .await;
    let gone =
        matches!(reply, Ok(Err(ref e)) if e.kind() == async_nats::RequestErrorKind::NoResponders);
    let _ = out.send(Event::ProbeAnswered { runner, gone }).await;
}
