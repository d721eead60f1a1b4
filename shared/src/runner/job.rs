//! One job on a runner, from its message to its acked result:
//!
//! claim (fenced by `ci-jobs`) → heartbeat → execute → fence → publish result → mark final → ack.
//!
//! Ordering matters for DESIGN.md's invariants: the result is published *before* the job state
//! says `final` and before the job message is acked, so a crash at any point leaves either no
//! result (the dispatcher reassigns after the lease) or a stored one (the dispatcher sees it and
//! closes the commit); never a closed commit without a result (I1).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use tokio_util::sync::CancellationToken;

use super::{Execution, Executor, Runner};
use crate::messages::{self, decode, JobMsg, ResultMsg, Status};
use crate::metrics::names as m;
use crate::protocol::attempt::{self, Attempt, Renewal, Written};
use crate::protocol::verdict::{publish_final, publish_superseded, Published};
use crate::subjects::JobRef;

/// Why a running job was stopped before it finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Another attempt owns the job now: run nothing more, publish no verdict.
    Superseded,
    /// The runner is shutting down in a hurry: hand the job back (no result, no ack).
    HandBack,
    /// A user cancelled it (`jetci cancel`): stop the command, report `cancelled`.
    Cancel,
}

/// Why the job's work is being stopped, shared by the tasks that may stop it; the first reason
/// wins.
#[derive(Clone, Default)]
struct Stopping {
    token: CancellationToken,
    why: Arc<Mutex<Option<Stop>>>,
}

impl Stopping {
    fn stop(&self, why: Stop) {
        self.why.lock().expect("lock").get_or_insert(why);
        self.token.cancel();
    }
    fn why(&self) -> Option<Stop> {
        *self.why.lock().expect("lock")
    }
}

impl<E: Executor> Runner<E> {
    /// Handles one delivered job message; never panics on its content (I5).
    pub(super) async fn handle(self: Arc<Self>, msg: jetstream::Message, hurry: CancellationToken) {
        let Some((job, claimed)) = self.take(&msg).await else {
            return;
        };
        let attempt_id = job.attempt_id();
        let msg = Arc::new(msg);
        let stopping = Stopping::default();
        let written = Arc::new(Mutex::new(claimed));
        let leaving = hurry.clone();
        let heartbeat = tokio::spawn(self.clone().heartbeat(
            job.clone(),
            msg.clone(),
            written.clone(),
            stopping.clone(),
        ));
        {
            let stopping = stopping.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = hurry.cancelled() => stopping.stop(Stop::HandBack),
                    _ = stopping.token.cancelled() => {}
                }
            });
        }
        let cancelled = written.lock().expect("lock").state.cancel.clone();
        let execution = self.execute(&job, cancelled, &stopping.token).await;
        let why = stopping.why();
        self.conclude(&job, &msg, execution, why, &written, heartbeat, &leaving)
            .await;
        stopping.token.cancel();
        self.active.lock().expect("lock").remove(&attempt_id);
        self.executor.release(&job);
    }

    /// Decodes a delivered job and claims it ([`Attempt::claim`]); `None` when it is not this
    /// runner's to run (terminated when malformed or addressed elsewhere, acked when superseded
    /// or final, left for the lease when the claim cannot be made).
    async fn take(&self, msg: &jetstream::Message) -> Option<(JobMsg, Written)> {
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        let job = match decode::<JobMsg>(&msg.payload) {
            Ok(job) if job.runner == self.config.id => job,
            Ok(job) => {
                tracing::warn!(subject = %msg.subject, seq, runner = %job.runner, "terminating a job addressed to another runner");
                let _ = msg.ack_with(AckKind::Term).await;
                return None;
            }
            Err(e) => {
                tracing::warn!(subject = %msg.subject, seq, error = %e, "terminating a job message that does not parse");
                let _ = msg.ack_with(AckKind::Term).await;
                return None;
            }
        };
        // The same attempt delivered again while it runs here (after a NATS restart the server
        // redelivers a job whose ack it lost track of): the running one goes on, its heartbeats
        // extend this delivery too and its ack ends it; running it twice would break I3.
        let attempt_id = job.attempt_id();
        if !self.active.lock().expect("lock").insert(attempt_id.clone()) {
            tracing::info!(job = %attempt_id, "the job was delivered again while it runs here; ignoring the copy");
            return None;
        }
        let taken = self.claim(msg, &job, seq).await;
        if taken.is_none() {
            self.active.lock().expect("lock").remove(&attempt_id);
        }
        taken.map(|written| (job, written))
    }

    /// Claims the job ([`Attempt::claim`]); `None` when it is not this runner's to run.
    async fn claim(&self, msg: &jetstream::Message, job: &JobMsg, seq: u64) -> Option<Written> {
        let assigned = attempt::assigned_in(msg.headers.as_ref());
        match self.attempt(job).claim(seq, assigned, self.epoch()).await {
            Ok(Some(written)) => {
                if written.state.cancel.is_none() {
                    tracing::info!(job = %job.attempt_id(), branch = ?job.branch, "running job");
                }
                Some(written)
            }
            Ok(None) => {
                tracing::info!(job = %job.attempt_id(), "job was superseded or is already final; skipping it");
                let _ = msg.double_ack().await;
                None
            }
            Err(e) => {
                // The dispatcher reassigns when the lease passes; leave the message for then.
                tracing::warn!(job = %job.attempt_id(), error = %e, "cannot claim the job; leaving it");
                None
            }
        }
    }

    /// Runs the job with the executor, unless a cancel request (`cancelled`: by whom) came
    /// between the assignment and the claim: then nothing starts and the verdict is `cancelled`.
    async fn execute(
        &self,
        job: &JobMsg,
        cancelled: Option<String>,
        stop: &CancellationToken,
    ) -> Execution {
        let result = ResultMsg::for_attempt(&self.nats.names, job, &self.config.id);
        let Some(who) = cancelled else {
            // A panic in the executor must not leave the job `running` with its heartbeat
            // going on forever: it becomes another attempt, with the panic as the reason.
            let run = std::panic::AssertUnwindSafe(self.executor.execute(job, result, stop));
            return match futures::FutureExt::catch_unwind(run).await {
                Ok(execution) => execution,
                Err(panic) => {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    tracing::error!(job = %job.attempt_id(), panic = %what, "the runner failed while running the job");
                    Execution::Retry(format!(
                        "runner {} failed while running the job: {}",
                        self.config.id,
                        crate::limits::clip(&what, 200)
                    ))
                }
            };
        };
        tracing::info!(job = %job.attempt_id(), who = %who, "job cancelled before it started; not running it");
        let reason = format!("cancelled {who}");
        Execution::Done(ResultMsg {
            status: Status::Cancelled,
            output_tail: format!("jetci: {reason}\n"),
            reason: Some(reason),
            ..result
        })
    }

    /// What the attempt comes to, by why it stopped (`why`) and what the executor returned:
    /// handed back, recorded as superseded, or fenced and delivered as the verdict; then the job
    /// message is acked (except for a hand-back, which the next attempt replaces). `leaving` is
    /// cancelled when the runner must stop now: a verdict NATS does not take by then stays on
    /// disk.
    #[allow(clippy::too_many_arguments)]
    async fn conclude(
        &self,
        job: &JobMsg,
        msg: &jetstream::Message,
        execution: Execution,
        why: Option<Stop>,
        written: &Mutex<Written>,
        heartbeat: tokio::task::JoinHandle<()>,
        leaving: &CancellationToken,
    ) {
        let id = &self.config.id;
        match (why, execution) {
            (Some(Stop::HandBack), _) => {
                heartbeat.abort();
                let reason = format!("handed back by runner {id} (shutting down)");
                self.hand_back(job, reason).await;
            }
            (Some(Stop::Superseded), execution) => {
                heartbeat.abort();
                if let Execution::Done(result) = execution {
                    self.record_superseded(job, &result).await;
                }
                let _ = msg.double_ack().await;
            }
            (None | Some(Stop::Cancel), Execution::Retry(reason)) => {
                // Not the test's fault (the checkout failed): another attempt, maybe elsewhere.
                tracing::warn!(job = %job.attempt_id(), %reason, "cannot run the job; handing it back for another attempt");
                heartbeat.abort();
                self.hand_back(job, reason).await;
                let _ = msg.double_ack().await;
            }
            (None | Some(Stop::Cancel), Execution::Done(result)) => {
                match self.fence(job, written).await {
                    Renewal::Held(fenced) => {
                        self.deliver(job, &result, Some(fenced), heartbeat, leaving)
                            .await
                    }
                    Renewal::Unreachable => {
                        self.deliver(job, &result, None, heartbeat, leaving).await
                    }
                    Renewal::Lost => {
                        heartbeat.abort();
                        self.record_superseded(job, &result).await;
                    }
                }
                // The job state says final already: a lost ack only brings the message back,
                // and its claim then skips it. A plain ack goes out before this connection's
                // next pull, so the server frees the slot first (JETSTREAM-NOTES 5.1).
                let _ = msg.ack().await;
            }
        }
    }

    fn attempt<'a>(&'a self, job: &'a JobMsg) -> Attempt<'a> {
        Attempt::new(&self.streams.job_states, job, &self.config.id)
    }

    /// Every heartbeat: extend the job message's deadline and renew the job state (the
    /// dispatcher's proof of life). A state that names another attempt stops the job as
    /// superseded; a cancel request stops it as cancelled. The task runs until the caller aborts
    /// it after the result is out, so the lease holds while the result is on its way.
    async fn heartbeat(
        self: Arc<Self>,
        job: JobMsg,
        msg: Arc<jetstream::Message>,
        written: Arc<Mutex<Written>>,
        stopping: Stopping,
    ) {
        let every = self.config.heartbeat;
        // The claim was the first beat.
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let _ = msg.ack_with(AckKind::Progress).await;
            let known = written.lock().expect("lock").clone();
            let renewal = self.attempt(&job).renew(&known, self.epoch()).await;
            match remember(&written, renewal) {
                Renewal::Held(w) => {
                    if let Some(who) = &w.state.cancel {
                        if !stopping.token.is_cancelled() {
                            tracing::info!(job = %job.attempt_id(), who = %who, "job cancelled; stopping it");
                            stopping.stop(Stop::Cancel);
                        }
                    }
                }
                Renewal::Unreachable => {
                    tracing::warn!(job = %job.attempt_id(), "heartbeat failed (NATS unreachable); the test goes on");
                }
                Renewal::Lost => {
                    tracing::warn!(job = %job.attempt_id(), "the job was given to another attempt; stopping it");
                    stopping.stop(Stop::Superseded);
                    return;
                }
            }
        }
    }

    /// The fence before a verdict ([`Attempt::fence`]); `written` is updated when it renews.
    async fn fence(&self, job: &JobMsg, written: &Mutex<Written>) -> Renewal {
        let known = written.lock().expect("lock").clone();
        let connected =
            self.nats.client.connection_state() == async_nats::connection::State::Connected;
        let renewal = self
            .attempt(job)
            .fence(&known, self.config.heartbeat, self.epoch(), connected)
            .await;
        remember(written, renewal)
    }

    /// Gives the job back without a verdict ([`Attempt::hand_back`]).
    async fn hand_back(&self, job: &JobMsg, reason: String) {
        self.attempt(job).hand_back(reason).await;
        tracing::info!(job = %job.attempt_id(), "handed the job back; another runner takes it");
    }

    /// How many times this runner has connected to NATS so far.
    fn epoch(&self) -> u64 {
        *self.nats.connections.borrow()
    }

    /// Publishes the verdict, marks the job final, and stops the heartbeat only then, so the
    /// lease holds while the result is on its way. A result larger than a message may be is
    /// clipped first ([`ResultMsg::fitted`]). A result NATS does not take at once (an outage) is
    /// kept on disk until it does, and published again by a restarted runner; one still not
    /// taken when the runner must stop (`leaving`) stays there for the next start.
    async fn deliver(
        &self,
        job: &JobMsg,
        result: &ResultMsg,
        fenced: Option<Written>,
        heartbeat: tokio::task::JoinHandle<()>,
        leaving: &CancellationToken,
    ) {
        let fitted = result.fitted(self.nats.message_limit());
        let result = fitted.as_ref().unwrap_or(result);
        let store = &self.streams.job_states;
        let connected =
            self.nats.client.connection_state() == async_nats::connection::State::Connected;
        let stored = connected && self.publish_once(&job.job_ref(), result).await.is_ok();
        if !stored {
            let pending = self.pending_path(result);
            if let Err(e) = save(&pending, result).await {
                tracing::warn!(job = %result.job_id, error = %e, "cannot keep the result on disk; publishing it from memory only");
            }
            let stored = self
                .publish_until_stored(&job.job_ref(), result, leaving)
                .await;
            heartbeat.abort();
            let Some(stored) = stored else {
                tracing::warn!(job = %result.job_id, file = %pending.display(), "stopping with the result not published; it is kept and published at the next start");
                return;
            };
            attempt::mark_final(store, &job.job_ref(), &stored, None).await;
            let _ = tokio::fs::remove_file(&pending).await;
            return;
        }
        heartbeat.abort();
        attempt::mark_final(store, &job.job_ref(), result, fenced).await;
    }

    /// One attempt to publish a result of `job`; `Ok` when CI_RESULTS holds a result for the run
    /// (this one, or an earlier one that is the verdict: then this one is kept as superseded, so
    /// what the test really did is on record whoever published first).
    async fn publish_once(
        &self,
        job: &JobRef,
        result: &ResultMsg,
    ) -> Result<(), crate::protocol::verdict::PublishError> {
        match publish_final(&self.nats, result).await? {
            Published::Stored(seq) => {
                let kind = crate::metrics::result_kind(result.job.is_some());
                metrics::counter!(m::RESULTS, "status" => result.status.as_str(), "kind" => kind)
                    .increment(1);
                metrics::histogram!(m::JOB_DURATION).record(result.duration_ms as f64 / 1000.0);
                tracing::info!(job = %result.job_id, status = %result.status, seq, "result published");
            }
            Published::AlreadyPublished => {
                tracing::info!(job = %result.job_id, "a result for this run was already published; ours is not the verdict");
                if let Err(e) = publish_superseded(&self.nats, job, result).await {
                    tracing::warn!(job = %result.job_id, error = %e, "cannot record our result as superseded");
                }
            }
        }
        Ok(())
    }

    /// Publishes a result, retrying with backoff while NATS is unreachable (the test's work is
    /// never thrown away because the network was down when it ended), until `leaving` is
    /// cancelled (then `None`). A result the server refuses for its size is replaced once by a
    /// small `error` result ([`ResultMsg::unstorable`]); if even that is refused, it is given
    /// up (`None`, logged) rather than tried forever. Returns the result stored (or found
    /// superseded by an earlier one).
    async fn publish_until_stored(
        &self,
        job: &JobRef,
        result: &ResultMsg,
        leaving: &CancellationToken,
    ) -> Option<ResultMsg> {
        let mut result = result.clone();
        let mut replaced = false;
        let mut delay = Duration::from_millis(200);
        let mut connections = self.nats.connections.clone();
        connections.mark_unchanged();
        loop {
            match self.publish_once(job, &result).await {
                Ok(()) => return Some(result),
                Err(e) if e.too_large && !replaced => {
                    tracing::warn!(job = %result.job_id, error = %e, "the server refuses the result for its size; publishing a small error result instead");
                    result = result.unstorable(&e.reason);
                    replaced = true;
                    continue;
                }
                Err(e) if e.too_large => {
                    tracing::error!(job = %result.job_id, error = %e, "the server refuses even a small error result for its size; giving the result up");
                    return None;
                }
                Err(e) => {
                    tracing::warn!(job = %result.job_id, error = %e, retry_in = ?delay, "cannot publish the result yet; keeping it");
                }
            }
            // Backoff, but at once when the connection comes back: the result is out as soon
            // as NATS can take it, before the dispatcher's restarted lease clocks run.
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = connections.changed() => delay = Duration::from_millis(200),
                _ = leaving.cancelled() => return None,
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    async fn record_superseded(&self, job: &JobMsg, result: &ResultMsg) {
        tracing::warn!(job = %result.job_id, status = %result.status, "recording the result of a superseded attempt (not the verdict)");
        if let Err(e) = publish_superseded(&self.nats, &job.job_ref(), result).await {
            tracing::warn!(job = %result.job_id, error = %e, "cannot record the superseded result");
        }
    }

    fn pending_path(&self, result: &ResultMsg) -> PathBuf {
        self.config
            .work_dir
            .join("pending")
            .join(format!("{}.json", result.job_id))
    }

    /// Publishes results that were kept on disk by an earlier run of this runner (it stopped or
    /// lost NATS before they were stored).
    pub(super) async fn deliver_pending(self: Arc<Self>) {
        let dir = self.config.work_dir.join("pending");
        let Ok(mut entries) = tokio::fs::read_dir(&dir).await else {
            return;
        };
        while let Ok(Some(entry)) = entries.next_entry().await {
            let path = entry.path();
            let result = match tokio::fs::read(&path)
                .await
                .map_err(|e| e.to_string())
                .and_then(|b| decode::<ResultMsg>(&b).map_err(|e| e.to_string()))
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "dropping an unreadable kept result");
                    let _ = tokio::fs::remove_file(&path).await;
                    continue;
                }
            };
            tracing::info!(job = %result.job_id, "publishing a result kept from an earlier run");
            // A kept result is of a run's only job (its `job_id` has no job token).
            let job = JobRef::only(&result.repo, &result.sha, result.run);
            let forever = CancellationToken::new();
            if let Some(stored) = self.publish_until_stored(&job, &result, &forever).await {
                attempt::mark_final(&self.streams.job_states, &job, &stored, None).await;
            }
            let _ = tokio::fs::remove_file(&path).await;
        }
    }
}

/// Keeps what a renewal wrote as the job's last write, and passes the renewal on.
fn remember(written: &Mutex<Written>, renewal: Renewal) -> Renewal {
    if let Renewal::Held(fresh) = &renewal {
        *written.lock().expect("lock") = fresh.clone();
    }
    renewal
}

async fn save(path: &Path, result: &ResultMsg) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    let tmp = path.with_extension("tmp");
    tokio::fs::write(&tmp, messages::encode(result)).await?;
    tokio::fs::rename(&tmp, path).await
}
