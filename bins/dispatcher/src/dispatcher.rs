//! The dispatch protocol (DESIGN.md, "One commit's life" and "Deadlines instead of pings"):
//!
//! pull commit → pick runner → publish job → watch its heartbeats → ack on result.
//!
//! The dispatcher keeps every commit it holds unacked and extends its deadline every lease/3
//! while it is alive; if the dispatcher dies, the deadline lapses and JetStream redelivers the
//! commit to another dispatcher, which reads `ci-jobs` and adopts a job whose runner is alive
//! (I4). A runner's liveness is the age of its last write to the job's state: a job whose state
//! is older than the lease goes to another runner as attempt n+1 (I2). When a heartbeat is late
//! the dispatcher asks the runner's control subject once: "no responders" means the runner's
//! connection is gone, and the job moves at once instead of after the whole lease.
//!
//! In-memory state is a cache of the buckets (rebuilt by watching them) plus the commit messages
//! this process holds; losing it loses nothing.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::consumer::{pull, AckPolicy, PullConsumer};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{kv, AckKind, Message};
use futures::StreamExt;
use jetci::attempt;
use jetci::connect::Nats;
use jetci::dispatch::{decide, nobody_has_labels, pick_runner, Candidate, Decision};
use jetci::job_state::{self, StateError, Versioned};
use jetci::messages::{
    self, decode, encode, CommitMsg, JobMsg, JobPhase, JobState, ResultMsg, RunnerInfo, Status,
    VERSION,
};
use jetci::metrics::names as m;
use jetci::results::{final_result, publish_final};
use jetci::streams::{watch_bucket, Streams};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often held jobs are checked for late heartbeats (in memory, cheap); commits are extended
/// only every lease/3.
const CHECK_EVERY: Duration = Duration::from_millis(250);

/// The most commits one pull request asks for.
const MAX_PULL: usize = 256;

/// Tunables from the command line.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Ack wait of commits and the liveness bound of a job's heartbeats.
    pub lease: Duration,
    pub max_attempts: u32,
}

/// A runner as seen in `ci-runners`.
struct Presence {
    info: RunnerInfo,
    /// When it last wrote its entry, on this host's clock.
    written: Instant,
    revision: u64,
}

/// A job that is assigned or running, as seen in `ci-jobs`.
struct Active {
    runner: String,
    written: Instant,
}

/// A commit message this dispatcher holds.
struct Held {
    msg: Message,
    commit: CommitMsg,
    seq: u64,
    /// Why it waits for a runner, while it does.
    waiting: Option<String>,
    /// The job's state as this dispatcher last wrote or watched it go by, with its revision.
    /// While the commit waits, the next assignment compare-and-sets on it without reading the
    /// key first; a conflict drops it and the key is read again.
    known: Option<(JobState, u64)>,
    /// Where the current attempt's job message is in `CI_JOBS` (the runner also records it in
    /// the job state when it claims the job), so a lost attempt's message can be deleted.
    job_seq: Option<u64>,
    /// Delivered for the first time and nothing written for it yet: its job state almost surely
    /// does not exist, so the first write creates it without a read (a create fails if it does
    /// exist, and then the state is read).
    fresh: bool,
    /// Since when it waits for a runner, while it does.
    waiting_since: Option<Instant>,
    /// Its `queued` state with the current reason is in `ci-jobs`.
    recorded: bool,
}

/// How long a new commit waits for a runner before its `queued` state (with the reason) is
/// written for `jetci status`: commits held ready for a busy runner usually start within
/// milliseconds, and skipping the write for them saves a bucket write per job.
const RECORD_WAIT_AFTER: Duration = Duration::from_millis(500);

pub struct Dispatcher {
    nats: Nats,
    streams: Streams,
    settings: Settings,
    consumer: PullConsumer,
    runners: HashMap<String, Presence>,
    /// Runners a probe found gone, with the presence revision they had then.
    gone: HashMap<String, u64>,
    active: HashMap<String, Active>,
    held: HashMap<String, Held>,
    picks: HashMap<String, u64>,
    pick_count: u64,
    /// When held commits were last extended.
    extended: Instant,
    /// When each runner was last probed.
    probed: HashMap<String, Instant>,
    /// When the connection to NATS last came back: no heartbeat can be older than that for a
    /// runner's fault, so ages count from it at most.
    reconnected: Option<Instant>,
    /// Where published jobs report their acks (see [`JobAck`]); the receiver is taken by `run`.
    job_acks: mpsc::Sender<JobAck>,
    job_acks_rx: Option<mpsc::Receiver<JobAck>>,
}

/// The server's answer to a published job message, awaited off the main loop so the next
/// assignment does not wait for it.
struct JobAck {
    key: String,
    runner: String,
    /// The job message's sequence in `CI_JOBS`, or why it was not stored.
    stored: Result<u64, String>,
}

/// What a liveness probe found.
struct ProbeResult {
    runner: String,
    gone: bool,
}

impl Dispatcher {
    /// Creates (or finds) the shared durable consumer on `CI_COMMITS`.
    ///
    /// Its ack wait is the lease; `max_deliver` is unlimited because a commit is never dropped
    /// for being redelivered (a dead dispatcher is not the commit's fault); attempts are counted
    /// in `ci-jobs` instead.
    pub async fn start(
        nats: Nats,
        streams: Streams,
        settings: Settings,
    ) -> anyhow::Result<Dispatcher> {
        let name = nats.names.dispatcher_consumer();
        let config = pull::Config {
            durable_name: Some(name.clone()),
            filter_subject: nats.names.commits_filter(),
            ack_policy: AckPolicy::Explicit,
            ack_wait: settings.lease,
            max_ack_pending: 100_000,
            ..Default::default()
        };
        let consumer = match streams.commits.get_consumer::<pull::Config>(&name).await {
            Ok(c) if c.cached_info().config.ack_wait == settings.lease => c,
            Ok(_) => streams
                .commits
                .update_consumer(config)
                .await
                .with_context(|| format!("cannot update consumer {name}"))?,
            Err(_) => streams
                .commits
                .create_consumer(config)
                .await
                .with_context(|| format!("cannot create consumer {name}"))?,
        };
        let (job_acks, job_acks_rx) = mpsc::channel(1024);
        Ok(Dispatcher {
            nats,
            streams,
            settings,
            consumer,
            runners: HashMap::new(),
            gone: HashMap::new(),
            active: HashMap::new(),
            held: HashMap::new(),
            picks: HashMap::new(),
            pick_count: 0,
            extended: Instant::now(),
            probed: HashMap::new(),
            reconnected: None,
            job_acks,
            job_acks_rx: Some(job_acks_rx),
        })
    }

    fn beat(&self) -> Duration {
        self.settings.lease / 3
    }

    /// The main loop, until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut runner_entries = watch_bucket(self.streams.runners.clone(), "runners");
        let mut job_entries = watch_bucket(self.streams.job_states.clone(), "jobs");
        let (want_tx, want_rx) = mpsc::channel::<usize>(1);
        let (got_tx, mut got_rx) = mpsc::channel::<Pulled>(64);
        tokio::spawn(pull_commits(self.consumer.clone(), want_rx, got_tx));
        let (probe_tx, mut probe_rx) = mpsc::channel::<ProbeResult>(64);
        let mut job_acks = self.job_acks_rx.take().expect("run is called once");
        let mut tick = tokio::time::interval(CHECK_EVERY.min(self.beat()));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pulling = false;
        let mut connections = self.nats.connections.clone();
        tracing::info!(lease = ?self.settings.lease, max_attempts = self.settings.max_attempts, "dispatcher ready");

        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(e) = runner_entries.recv() => self.on_runner_entry(e).await,
                Some(e) = job_entries.recv() => self.on_job_entry(e).await,
                Some(pulled) = got_rx.recv() => match pulled {
                    Pulled::Commit(msg) => self.take_commit(msg).await,
                    Pulled::Done => pulling = false,
                },
                Some(p) = probe_rx.recv() => self.on_probe(p).await,
                Some(ack) = job_acks.recv() => self.on_job_ack(ack),
                // The first connection is not a comeback; every later one is.
                Ok(()) = connections.changed() => if *connections.borrow_and_update() > 1 {
                    self.on_reconnect()
                },
                _ = tick.tick() => self.on_tick(&probe_tx).await,
            }
            // Pull a commit only when a runner could start it now, or soon: one commit per
            // runner slot is held ready, so a slot that frees is filled without a round trip to
            // the stream. The rest of the queue stays in the stream (in order, visible as the
            // consumer's pending count).
            let ready = self.free_slots() + self.capacity();
            if !pulling && ready > self.waiting() {
                let wanted = (ready - self.waiting()) as usize;
                pulling = want_tx.try_send(wanted).is_ok();
            }
        }

        // Hand held commits straight to another dispatcher instead of letting them lapse;
        // running jobs go on and are adopted.
        for held in self.held.values() {
            let _ = held.msg.ack_with(AckKind::Nak(None)).await;
        }
        let _ = self.nats.client.flush().await;
        tracing::info!(released = self.held.len(), "dispatcher stopped");
    }

    async fn on_runner_entry(&mut self, e: kv::Entry) {
        if e.operation != kv::Operation::Put {
            self.runners.remove(&e.key);
            return;
        }
        match decode::<RunnerInfo>(&e.value) {
            Ok(info) => {
                let written = self.since(job_state::age_of(e.created));
                let new = !self.runners.contains_key(&e.key);
                if new {
                    tracing::info!(runner = %info.id, labels = ?info.labels, capacity = info.capacity, "runner joined");
                }
                self.runners.insert(
                    e.key.clone(),
                    Presence {
                        info,
                        written,
                        revision: e.revision,
                    },
                );
                if new {
                    self.assign_waiting().await;
                }
            }
            Err(err) => {
                tracing::warn!(key = %e.key, error = %err, "ignoring a runner entry that does not parse")
            }
        }
    }

    async fn on_job_entry(&mut self, e: kv::Entry) {
        let key = e.key.clone();
        let state = match job_state::from_entry(&e) {
            Ok(Some(v)) => v,
            Ok(None) => {
                self.active.remove(&key);
                return;
            }
            Err(err) => {
                tracing::warn!(%key, error = %err, "ignoring a job state that does not parse");
                return;
            }
        };
        if let Some(held) = self.held.get_mut(&key) {
            held.fresh = false;
            if held
                .known
                .as_ref()
                .is_none_or(|(_, rev)| *rev < state.revision)
            {
                held.known = Some((state.state.clone(), state.revision));
            }
        }
        let cancel_held = state.state.cancel.is_some() && self.held.contains_key(&key);
        match state.state.phase {
            JobPhase::Assigned | JobPhase::Running => {
                if let Some(runner) = state.state.runner.clone() {
                    self.active.insert(
                        key.clone(),
                        Active {
                            runner,
                            written: self.since(state.age),
                        },
                    );
                }
            }
            JobPhase::Final => {
                let freed = self.active.remove(&key).is_some();
                if freed || self.held.contains_key(&key) {
                    let status = state.state.status.map(|s| s.as_str()).unwrap_or("unknown");
                    metrics::counter!(m::RESULTS, "status" => status).increment(1);
                }
                if let Some(held) = self.held.remove(&key) {
                    self.close(&key, held).await;
                }
                if freed {
                    self.assign_waiting().await;
                }
            }
            JobPhase::Queued => {
                self.active.remove(&key);
            }
        }
        if cancel_held {
            // A cancel request for a commit this dispatcher holds: a waiting job ends now.
            self.advance(&key).await;
        }
    }

    /// A new (or redelivered) commit message.
    async fn take_commit(&mut self, msg: Message) {
        metrics::counter!(m::COMMITS_RECEIVED).increment(1);
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        let commit: CommitMsg = match decode(&msg.payload) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(subject = %msg.subject, seq, error = %e, "terminating a commit message that does not parse");
                let _ = msg.ack_with(AckKind::Term).await;
                return;
            }
        };
        let key = commit.key();
        if self.nats.names.commits_subject(&commit.repo) != msg.subject.as_str() {
            tracing::warn!(subject = %msg.subject, seq, repo = %commit.repo, "terminating a commit published on another repository's subject");
            let _ = msg.ack_with(AckKind::Term).await;
            return;
        }
        // A commit delivered for the first time cannot have a result yet, short of a re-published
        // commit (whose job state says final anyway): the check is for redeliveries.
        let redelivered = held_before(&msg);
        if redelivered && self.stored_result(&commit).await.is_some() {
            tracing::debug!(%key, "commit already has its result");
            let _ = msg.double_ack().await;
            return;
        }
        self.held.insert(
            key.clone(),
            Held {
                msg,
                commit,
                seq,
                waiting: None,
                known: None,
                job_seq: None,
                fresh: !redelivered,
                waiting_since: None,
                recorded: false,
            },
        );
        self.advance(&key).await;
    }

    /// Reads the job's state and acts on it: close, adopt, assign, or give up.
    async fn advance(&mut self, key: &str) {
        let fresh = self.held.get_mut(key).is_some_and(|h| h.fresh);
        let known = self
            .held
            .get(key)
            .filter(|h| h.waiting.is_some())
            .and_then(|h| h.known.clone())
            .filter(|(s, _)| s.phase == JobPhase::Queued && s.cancel.is_none());
        let read = match known {
            _ if fresh => Ok(None),
            Some((state, revision)) => Ok(Some(Versioned {
                state,
                revision,
                age: Duration::ZERO,
            })),
            None => job_state::read(&self.streams.job_states, key).await,
        };
        let current = match read {
            Ok(c) => c,
            Err(StateError::Bad {
                reason, revision, ..
            }) => {
                // Replace it (compare-and-set on its revision), then decide on the fresh state.
                tracing::warn!(%key, %reason, "job state does not parse; starting the run afresh");
                if let Some(held) = self.held.get(key) {
                    let fresh = JobState::queued(&held.commit);
                    match job_state::write(&self.streams.job_states, key, &fresh, Some(revision))
                        .await
                    {
                        Ok(_) => {}
                        Err(e) => tracing::warn!(%key, error = %e, "cannot replace the job state"),
                    }
                }
                return;
            }
            Err(e) => {
                tracing::warn!(%key, error = %e, "cannot read job state; trying again next beat");
                return;
            }
        };
        let mut age = current
            .as_ref()
            .map(|c| match self.reconnected {
                Some(at) => c.age.min(at.elapsed()),
                None => c.age,
            })
            .unwrap_or_default();
        if let Some(runner) = current.as_ref().and_then(|c| c.state.runner.as_deref()) {
            if !self.runner_alive(runner) && self.gone.contains_key(runner) {
                // The probe found its connection gone: no need to wait out the lease.
                age = age.max(self.settings.lease);
            }
        }
        let decision = decide(
            current.as_ref().map(|c| &c.state),
            age,
            self.settings.lease,
            self.settings.max_attempts,
        );
        // Before another attempt, giving up or cancelling a job whose runner is lost: that runner
        // may have stored its result and died before writing `final`. The run is over then;
        // running it again would waste a runner, and any of the three would leave the job's state
        // saying something other than the verdict. (A `queued` state, handed back or already
        // decided on, has no result to find.)
        let lost_runner = current
            .as_ref()
            .is_some_and(|c| matches!(c.state.phase, JobPhase::Assigned | JobPhase::Running));
        let after_a_loss = lost_runner
            && match decision {
                Decision::Assign { attempt } => attempt > 1,
                Decision::GiveUp { .. } | Decision::Cancel => true,
                Decision::Done | Decision::Adopt => false,
            };
        let lost_commit = after_a_loss
            .then(|| self.held.get(key).map(|h| h.commit.clone()))
            .flatten();
        if let Some(commit) = lost_commit {
            if let Some(result) = self.stored_result(&commit).await {
                self.record_final(key, current, &result).await;
                return;
            }
        }
        match decision {
            Decision::Done => {
                if let Some(held) = self.held.remove(key) {
                    self.close(key, held).await;
                }
            }
            Decision::Adopt => {
                if let Some(held) = self.held.get_mut(key) {
                    held.waiting = None;
                }
            }
            Decision::Assign { attempt } => {
                let conflicted = self.assign(key, current, attempt).await;
                if conflicted && fresh {
                    if let Some(held) = self.held.get_mut(key) {
                        held.fresh = false;
                    }
                    // The state existed after all (a commit published again, a cancel request
                    // written early): decide again on what is there.
                    Box::pin(self.advance(key)).await;
                }
            }
            Decision::GiveUp { attempts } => self.give_up(key, current, attempts).await,
            Decision::Cancel => {
                let attempt = current.as_ref().map(|c| c.state.attempt).unwrap_or(0);
                let who = current
                    .as_ref()
                    .and_then(|c| c.state.cancel.clone())
                    .unwrap_or_default();
                self.finish_without_run(
                    key,
                    current,
                    attempt,
                    Status::Cancelled,
                    format!("cancelled {who}"),
                )
                .await;
            }
        }
    }

    /// The stored result of `commit`'s run, if any. A read that fails counts as none (the worst
    /// that follows is a run the verdict ignores: first writer wins).
    async fn stored_result(&self, commit: &CommitMsg) -> Option<ResultMsg> {
        let results = &self.streams.results;
        match final_result(&self.nats, results, &commit.repo, &commit.sha, commit.run).await {
            Ok(result) => result,
            Err(e) => {
                tracing::warn!(key = %commit.key(), error = %e, "cannot check for a stored result; going on");
                None
            }
        }
    }

    /// The run has its result but its state is not final: writes `final` with the result's
    /// status and reason (compare-and-set on `current`); the watched entry then closes the commit
    /// ([`Dispatcher::on_job_entry`]). A failed write is tried again at the next beat.
    async fn record_final(&mut self, key: &str, current: Option<Versioned>, result: &ResultMsg) {
        let Some(held) = self.held.get_mut(key) else {
            return;
        };
        held.known = None;
        let mut state = state_for(&held.commit, current.as_ref().map(|c| &c.state));
        state.phase = JobPhase::Final;
        state.status = Some(result.status);
        state.reason = result.reason.clone();
        let revision = current.as_ref().map(|c| c.revision);
        match job_state::write(&self.streams.job_states, key, &state, revision).await {
            Ok(_) => {
                tracing::info!(%key, attempt = result.attempt, runner = %result.runner, status = %result.status, "the lost attempt had stored its result; the run is over")
            }
            Err(e) => {
                tracing::warn!(%key, error = %e, "cannot mark the run final; trying again next beat")
            }
        }
    }

    /// Starts `attempt` on a free runner, or leaves the commit waiting with the reason. Returns
    /// true when the job state changed underneath (a compare-and-set conflict).
    async fn assign(&mut self, key: &str, current: Option<Versioned>, attempt: u32) -> bool {
        let Some(held) = self.held.get(key) else {
            return false;
        };
        let labels = held.commit.labels.clone();
        let candidates: Vec<Candidate> = self.candidates();
        let picked = pick_runner(&candidates, &labels, &self.picks).map(str::to_string);
        let nobody = nobody_has_labels(&candidates, &labels);
        drop(candidates);
        let revision = current.as_ref().map(|c| c.revision);
        let previous = current.as_ref().map(|c| c.state.clone());

        let Some(runner) = picked else {
            let reason = if nobody && !labels.is_empty() {
                format!("waiting for a runner with labels [{}]", labels.join(", "))
            } else {
                "waiting for a free runner".to_string()
            };
            let held = self.held.get_mut(key).expect("held");
            if held.waiting.as_deref() != Some(reason.as_str()) {
                tracing::info!(%key, %reason, "commit waits");
                held.waiting = Some(reason.clone());
                held.waiting_since = Some(Instant::now());
                held.recorded = false;
            }
            // Record it, so `jetci status` can say why (a new commit only once it has waited a
            // moment); a stale attempt's runner is cleared at once, so that runner, if it comes
            // back, finds itself superseded.
            if !held.recorded && (previous.is_some() || record_due(held)) {
                held.recorded = true;
                let commit = held.commit.clone();
                let mut state = state_for(&commit, previous.as_ref());
                state.phase = JobPhase::Queued;
                state.attempt = attempt - 1;
                state.runner = None;
                state.reason = Some(reason);
                match job_state::write(&self.streams.job_states, key, &state, revision).await {
                    Ok(rev) => {
                        let stale = self.stale_job_seq(key, previous.as_ref());
                        if let Some(held) = self.held.get_mut(key) {
                            held.known = Some((state, rev));
                            held.fresh = false;
                        }
                        self.delete_stale_job(stale).await;
                    }
                    Err(e) => {
                        if let Some(held) = self.held.get_mut(key) {
                            held.known = None;
                            held.waiting = None;
                        }
                        return matches!(e, StateError::Conflict);
                    }
                }
            }
            return false;
        };

        let held = self.held.get(key).expect("held");
        let commit = held.commit.clone();
        let commit_seq = held.seq;
        let mut state = state_for(&commit, previous.as_ref());
        state.phase = JobPhase::Assigned;
        state.attempt = attempt;
        state.runner = Some(runner.clone());
        state.job_seq = None;
        state.reason = None;
        // Claim the attempt first: of two dispatchers racing here, one write fails.
        let written = job_state::write(&self.streams.job_states, key, &state, revision).await;
        if written.is_err() {
            if let Some(held) = self.held.get_mut(key) {
                held.known = None;
            }
        }
        let revision = match written {
            Ok(revision) => revision,
            Err(StateError::Conflict) => {
                tracing::debug!(%key, "another dispatcher moved the job first; re-reading");
                return true;
            }
            Err(e) => {
                tracing::warn!(%key, error = %e, "cannot record the assignment; trying again next beat");
                return false;
            }
        };
        let stale = self.stale_job_seq(key, previous.as_ref());
        self.delete_stale_job(stale).await;
        self.active.insert(
            key.to_string(),
            Active {
                runner: runner.clone(),
                written: Instant::now(),
            },
        );
        self.pick_count += 1;
        self.picks.insert(runner.clone(), self.pick_count);
        if let Some(held) = self.held.get_mut(key) {
            held.waiting = None;
            held.waiting_since = None;
            held.recorded = false;
            held.fresh = false;
        }

        let job = JobMsg {
            v: VERSION,
            repo: commit.repo.clone(),
            url: commit.url.clone(),
            branch: commit.branch.clone(),
            sha: commit.sha.clone(),
            run: commit.run,
            attempt,
            runner: runner.clone(),
            author: commit.author.clone(),
            summary: commit.summary.clone(),
            commit_seq,
            assigned_at: messages::now(),
        };
        // The runner claims with one compare-and-set on this write (jetci::attempt).
        let mut publish = PublishMessage::build().payload(encode(&job));
        if let Some(headers) = attempt::assigned_headers(&state, revision) {
            publish = publish.headers(headers);
        }
        let publish = publish.message_id(job.job_id());
        match self
            .nats
            .js
            .send_publish(self.nats.names.jobs_subject(&runner), publish)
            .await
        {
            Ok(ack) => {
                tracing::info!(%key, %runner, attempt, branch = ?commit.branch, "job assigned");
                metrics::counter!(m::JOBS_ASSIGNED).increment(1);
                if attempt > 1 {
                    metrics::counter!(m::JOBS_REASSIGNED).increment(1);
                }
                let report = self.job_acks.clone();
                let (key, runner) = (key.to_string(), runner.clone());
                tokio::spawn(async move {
                    let stored = ack.await.map(|a| a.sequence).map_err(|e| e.to_string());
                    let _ = report
                        .send(JobAck {
                            key,
                            runner,
                            stored,
                        })
                        .await;
                });
            }
            Err(e) => {
                // The state says `assigned`; with no heartbeat it goes stale after the lease and
                // the job is assigned again.
                tracing::warn!(%key, %runner, error = %e, "cannot publish the job; it is retried after the lease");
            }
        }
        false
    }

    /// A published job's ack: remember where the job message is, so it can be deleted if the
    /// runner is lost before taking it (the runner records it in the state when it claims the
    /// job). A later attempt's message has a higher sequence, so a late ack never hides it.
    fn on_job_ack(&mut self, ack: JobAck) {
        match ack.stored {
            Ok(seq) => {
                if let Some(held) = self.held.get_mut(&ack.key) {
                    held.job_seq = held.job_seq.max(Some(seq));
                }
            }
            Err(e) => {
                // The state says `assigned`; with no heartbeat it goes stale after the lease and
                // the job is assigned again.
                tracing::warn!(key = %ack.key, runner = %ack.runner, error = %e, "the job was not stored; it is retried after the lease");
            }
        }
    }

    /// After `attempts` lost runners: the run's final result is `error`.
    async fn give_up(&mut self, key: &str, current: Option<Versioned>, attempts: u32) {
        let state = current.as_ref().map(|c| &c.state);
        let why = match (
            state.and_then(|s| s.reason.clone()),
            state.and_then(|s| s.runner.clone()),
        ) {
            (Some(reason), _) => reason,
            (None, Some(runner)) => format!("runner {runner} stopped heartbeating"),
            (None, None) => "the runner was lost".to_string(),
        };
        let reason = format!(
            "attempt {attempts} of {} failed: {why}; giving up",
            self.settings.max_attempts
        );
        self.finish_without_run(key, current, attempts, Status::Error, reason)
            .await;
    }

    /// Gives the run a final result without a runner (given up, or cancelled while not
    /// running): the result first, then the state, then the commit's ack, so a crash in between
    /// leaves a result and never a closed commit without one (I1).
    async fn finish_without_run(
        &mut self,
        key: &str,
        current: Option<Versioned>,
        attempt: u32,
        status: Status,
        reason: String,
    ) {
        let Some(held) = self.held.get(key) else {
            return;
        };
        let commit = held.commit.clone();
        let result = ResultMsg::without_run(
            &self.nats.names,
            &commit,
            held.seq,
            attempt,
            status,
            reason.clone(),
        );
        if let Err(e) = publish_final(&self.nats, &result).await {
            tracing::warn!(%key, error = %e, "cannot publish the final result; trying again next beat");
            return;
        }
        tracing::warn!(%key, %status, %reason, "run finished without a runner");
        let previous = current.as_ref().map(|c| c.state.clone());
        let mut state = state_for(&commit, previous.as_ref());
        state.phase = JobPhase::Final;
        state.status = Some(status);
        state.reason = Some(reason);
        let _ = job_state::write(
            &self.streams.job_states,
            key,
            &state,
            current.as_ref().map(|c| c.revision),
        )
        .await;
        let stale = self.stale_job_seq(key, previous.as_ref());
        self.delete_stale_job(stale).await;
        self.active.remove(key);
        if let Some(held) = self.held.remove(key) {
            self.close(key, held).await;
        }
    }

    /// Where the previous attempt's job message is: recorded in its state by the runner that
    /// claimed it, or remembered by this dispatcher from publishing it.
    fn stale_job_seq(&self, key: &str, previous: Option<&JobState>) -> Option<u64> {
        previous
            .and_then(|s| s.job_seq)
            .or_else(|| self.held.get(key).and_then(|h| h.job_seq))
    }

    /// Removes a lost attempt's job message from its runner's subject, so a runner that comes
    /// back does not find it (it would see itself superseded anyway).
    async fn delete_stale_job(&self, seq: Option<u64>) {
        if let Some(seq) = seq {
            let _ = self.streams.jobs.delete_message(seq).await;
        }
    }

    /// The run has its final result: ack the commit for good. The ack waits for the server's
    /// confirmation in its own task, so the next assignment does not wait for it.
    async fn close(&self, key: &str, held: Held) {
        let key = key.to_string();
        tokio::spawn(async move {
            match held.msg.double_ack().await {
                Ok(()) => tracing::info!(%key, "commit done"),
                Err(e) => {
                    tracing::warn!(%key, error = %e, "cannot ack the commit; it comes back and is closed then")
                }
            }
        });
    }

    /// Every 250 ms: extend held commits (each lease/3), probe late runners, move stale jobs, retry waiting
    /// commits.
    async fn on_tick(&mut self, probes: &mpsc::Sender<ProbeResult>) {
        if self.extended.elapsed() >= self.beat() {
            self.extended = Instant::now();
            for held in self.held.values() {
                let _ = held.msg.ack_with(AckKind::Progress).await;
            }
            self.record_gauges().await;
        }
        let beat = self.beat();
        let mut recheck = Vec::new();
        for (key, held) in self.held.iter_mut() {
            if held.waiting.is_some() {
                recheck.push(key.clone());
                continue;
            }
            let Some(active) = self.active.get(key) else {
                recheck.push(key.clone());
                continue;
            };
            let age = active.written.elapsed();
            if age >= self.settings.lease {
                recheck.push(key.clone());
            } else if age > beat / 2 {
                // The next heartbeat is due: probe the runner (at most every CHECK_EVERY); NATS
                // answers "no responders" at once if the runner's connection is gone, so a
                // crashed runner's job moves well before its lease ends.
                let due = self
                    .probed
                    .get(&active.runner)
                    .is_none_or(|at| at.elapsed() >= CHECK_EVERY);
                if due {
                    self.probed.insert(active.runner.clone(), Instant::now());
                    tokio::spawn(probe(
                        self.nats.clone(),
                        active.runner.clone(),
                        probes.clone(),
                    ));
                }
            }
        }
        // Forget runners that stopped refreshing long ago.
        let lease = self.settings.lease;
        self.runners.retain(|_, p| p.written.elapsed() < lease * 20);
        for key in recheck {
            let idle_wait = self
                .held
                .get(&key)
                .is_some_and(|h| h.waiting.is_some() && (h.recorded || !record_due(h)));
            if self.free_slots() == 0 && idle_wait {
                continue;
            }
            self.advance(&key).await;
        }
    }

    /// Queue depth, jobs in flight and the oldest heartbeat, for `--metrics-addr`.
    async fn record_gauges(&mut self) {
        let not_taken = match self.consumer.info().await {
            Ok(info) => info.num_pending,
            Err(_) => 0,
        };
        metrics::gauge!(m::QUEUE_DEPTH).set((not_taken + u64::from(self.waiting())) as f64);
        metrics::gauge!(m::JOBS_IN_FLIGHT).set(self.active.len() as f64);
        let oldest = self
            .active
            .values()
            .map(|a| a.written.elapsed())
            .max()
            .unwrap_or_default();
        metrics::gauge!(m::HEARTBEAT_AGE).set(oldest.as_secs_f64());
    }

    /// Back from an outage: every job and runner gets a full lease from now to show it is alive.
    fn on_reconnect(&mut self) {
        let now = Instant::now();
        tracing::info!(
            jobs = self.active.len(),
            "connected to NATS; lease clocks restart"
        );
        self.reconnected = Some(now);
        for a in self.active.values_mut() {
            a.written = a.written.max(now);
        }
        for p in self.runners.values_mut() {
            p.written = p.written.max(now);
        }
        self.gone.clear();
    }

    /// The time a state or presence written `age` ago counts as, after an outage.
    fn since(&self, age: Duration) -> Instant {
        let written = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
        match self.reconnected {
            Some(at) => written.max(at),
            None => written,
        }
    }

    async fn on_probe(&mut self, p: ProbeResult) {
        // Right after a reconnect the runners are reconnecting too: their silence proves nothing.
        if !p.gone
            || self
                .reconnected
                .is_some_and(|at| at.elapsed() < self.settings.lease)
        {
            return;
        }
        let Some(presence) = self.runners.get(&p.runner) else {
            return;
        };
        tracing::warn!(runner = %p.runner, "runner's connection is gone; moving its jobs now");
        self.gone.insert(p.runner.clone(), presence.revision);
        let keys: Vec<String> = self
            .active
            .iter()
            .filter(|(k, a)| a.runner == p.runner && self.held.contains_key(*k))
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            self.advance(&key).await;
        }
    }

    /// Retries commits that wait for a runner, oldest first, while runners are free.
    async fn assign_waiting(&mut self) {
        let mut waiting: Vec<(u64, String)> = self
            .held
            .iter()
            .filter(|(_, h)| h.waiting.is_some())
            .map(|(k, h)| (h.seq, k.clone()))
            .collect();
        waiting.sort();
        for (_, key) in waiting {
            if self.free_slots() == 0 {
                break;
            }
            self.advance(&key).await;
        }
    }

    /// A runner is alive while its presence entry is younger than the lease and no probe found
    /// it gone since its last refresh.
    fn runner_alive(&self, id: &str) -> bool {
        let Some(p) = self.runners.get(id) else {
            return false;
        };
        p.written.elapsed() < self.settings.lease && self.gone.get(id) != Some(&p.revision)
    }

    fn candidates(&self) -> Vec<Candidate<'_>> {
        let mut busy: HashMap<&str, u32> = HashMap::new();
        for a in self.active.values() {
            *busy.entry(a.runner.as_str()).or_default() += 1;
        }
        self.runners
            .values()
            .map(|p| Candidate {
                id: p.info.id.as_str(),
                labels: &p.info.labels,
                capacity: p.info.capacity,
                busy: busy.get(p.info.id.as_str()).copied().unwrap_or(0),
                available: p.info.accepting && self.runner_alive(&p.info.id),
            })
            .collect()
    }

    fn free_slots(&self) -> u32 {
        self.candidates()
            .iter()
            .filter(|c| c.available)
            .map(|c| c.capacity.saturating_sub(c.busy))
            .sum()
    }

    /// Slots of all available runners, busy or not.
    fn capacity(&self) -> u32 {
        self.candidates()
            .iter()
            .filter(|c| c.available)
            .map(|c| c.capacity)
            .sum()
    }

    fn waiting(&self) -> u32 {
        self.held.values().filter(|h| h.waiting.is_some()).count() as u32
    }
}

/// True when a waiting commit has waited long enough to be recorded as waiting.
fn record_due(held: &Held) -> bool {
    held.waiting_since
        .is_some_and(|since| since.elapsed() >= RECORD_WAIT_AFTER)
}

/// True when JetStream delivered the message before (to this or another dispatcher).
fn held_before(msg: &Message) -> bool {
    msg.info().map(|i| i.delivered > 1).unwrap_or(true)
}

/// A job state for `commit`, carried over from `previous` where there is one.
fn state_for(commit: &CommitMsg, previous: Option<&JobState>) -> JobState {
    let mut s = previous
        .cloned()
        .unwrap_or_else(|| JobState::queued(commit));
    s.updated_at = messages::now();
    s
}

/// What the commit puller hands the main loop.
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

/// Asks a runner whether it is there. NATS answers "no responders" at once when no connection
/// subscribes to the runner's control subject, that is when the runner process is gone; a
/// stopped or partitioned runner just does not answer, and the lease decides.
async fn probe(nats: Nats, runner: String, out: mpsc::Sender<ProbeResult>) {
    let subject = nats.names.control_subject(&runner);
    let reply = tokio::time::timeout(
        Duration::from_secs(1),
        nats.client.request(subject, "".into()),
    )
    .await;
    let gone =
        matches!(reply, Ok(Err(ref e)) if e.kind() == async_nats::RequestErrorKind::NoResponders);
    let _ = out.send(ProbeResult { runner, gone }).await;
}
