//! A runner's side of one attempt's state in `ci-jobs` (DESIGN.md, "One commit's life"): claim
//! it, renew it (heartbeats and the fence before a verdict), mark it final, or hand it back.
//! The runner's loop ([`crate::runner`]) speaks the protocol through this module.
//!
//! Every write is a compare-and-set ([`store::write`]) of a state built by the transitions of
//! [`super::job`], on the revision this runner last wrote
//! or read, so a runner never writes over a state it has not seen: a dispatcher that reassigned
//! the job, or `jetci cancel`, moved the revision, and the write fails with a conflict. A claim or
//! renewal then reads the key and goes on only while it still names this attempt on this runner;
//! [`mark_final`], once the run's result is stored, writes `final` over whatever it reads that is
//! not final yet (the run has its verdict, whichever attempt it came from).
//!
//! **The claim is one write.** The dispatcher publishes a job right after its `assigned` write
//! and sends that state and the revision it got along in the job message's headers
//! ([`ASSIGNED_STATE`], [`ASSIGNED_REVISION`]; see [`assigned_headers`]). The claim writes
//! `running` with compare-and-set on that revision without reading the key: the write succeeds
//! only if nothing wrote the key since the assignment, so what it replaces is exactly the state
//! the headers carry. A job without the headers (from a dispatcher of an earlier version), with
//! headers that do not name this attempt on this runner, or a conflict (a cancel, a newer
//! attempt) falls back to reading the key. Headers are ignored by runners that do not know them,
//! so the job message itself is unchanged.

use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use async_nats::HeaderMap;

use super::store::{self, StateError};
use crate::messages::{decode, encode, JobMsg, JobPhase, JobState, ResultMsg, VERSION};
use crate::subjects::JobRef;

/// Job message header: the job's `assigned` state as the dispatcher wrote it (the JSON of
/// [`JobState`], one line).
pub const ASSIGNED_STATE: &str = "Jetci-Assigned-State";

/// Job message header: the `ci-jobs` revision the dispatcher's `assigned` write got (decimal).
pub const ASSIGNED_REVISION: &str = "Jetci-Assigned-Revision";

/// How many times a claim or renewal re-reads the key after a conflict before giving up.
const CONFLICTS: usize = 10;

/// The largest `assigned` state sent in headers, in bytes of JSON. nats-server refuses a message
/// whose headers exceed 64 KiB (error 10097, "header size exceeds maximum allowed of 64k"); a
/// bigger state (a branch name tens of KiB long) goes without, and the runner reads the key.
pub const MAX_STATE_HEADER: usize = 16 * 1024;

/// The headers a dispatcher sends with a job: its `assigned` state and that write's revision, or
/// `None` when the state is over [`MAX_STATE_HEADER`].
pub fn assigned_headers(state: &JobState, revision: u64) -> Option<HeaderMap> {
    let json = encode(state);
    if json.len() > MAX_STATE_HEADER {
        return None;
    }
    let mut headers = HeaderMap::new();
    // serde_json writes one line (no raw `\r` or `\n`), which is all a header value must be.
    headers.insert(ASSIGNED_STATE, String::from_utf8_lossy(&json).as_ref());
    headers.insert(ASSIGNED_REVISION, revision.to_string().as_str());
    Some(headers)
}

/// The `assigned` state and revision a job message carries, or `None` when it carries none or
/// they do not decode (the claim then reads the key).
pub fn assigned_in(headers: Option<&HeaderMap>) -> Option<(JobState, u64)> {
    let headers = headers?;
    let revision = headers.get(ASSIGNED_REVISION)?.as_str().parse().ok()?;
    let state = decode(headers.get(ASSIGNED_STATE)?.as_str().as_bytes()).ok()?;
    Some((state, revision))
}

/// The last job state a runner wrote for its attempt, and the revision the write got.
#[derive(Debug, Clone)]
pub struct Written {
    pub state: JobState,
    pub revision: u64,
    /// When the write was sent (this host's monotonic clock).
    pub sent: Instant,
    /// The caller's NATS connection count when it was sent (`Nats::connections`): a renewal
    /// sent on an earlier connection proves nothing about this one.
    pub epoch: u64,
}

/// What a renewal found.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per renewal, moved once: a box would buy nothing
pub enum Renewal {
    /// The job is still this attempt's; the state as renewed.
    Held(Written),
    /// NATS cannot be reached from this runner. A verdict goes out anyway (kept until NATS
    /// takes it); if a dispatcher reassigned the job meanwhile, the first result stored is the
    /// run's (`jetci::results`).
    Unreachable,
    /// Another attempt owns the job, or it is final.
    Lost,
}

/// One attempt of a job on one runner.
pub struct Attempt<'a> {
    store: &'a kv::Store,
    job: &'a JobMsg,
    runner: &'a str,
    job_ref: JobRef,
    key: String,
}

impl<'a> Attempt<'a> {
    /// `job` on `runner`, whose state is in `store` (`ci-jobs`).
    pub fn new(store: &'a kv::Store, job: &'a JobMsg, runner: &'a str) -> Attempt<'a> {
        let job_ref = job.job_ref();
        Attempt {
            store,
            job,
            runner,
            key: job_ref.key(),
            job_ref,
        }
    }

    /// Whether `state` names this attempt on this runner.
    fn ours(&self, state: &JobState) -> bool {
        state.names_attempt(&self.job_ref, self.job.attempt, self.runner)
    }

    /// Takes the job: its state must name this attempt on this runner and be `assigned` or
    /// `running`; it becomes `running` with the job message's stream sequence `seq`. `assigned`
    /// is the state and revision the job message carried ([`assigned_in`]): one write then,
    /// else (or on a conflict) read and write. `epoch`: the caller's connection count now.
    ///
    /// Returns what was written, or `None` when the job is not this runner's to run: the state
    /// names another attempt or runner (the job moved on, or its state was reset), is `queued`
    /// (handed back) or `final`, or is gone. A state with a cancel request is claimed all the
    /// same; the caller reports the job `cancelled` without running it. Errors: NATS cannot be
    /// reached, or the key kept changing underneath ([`StateError::Conflict`]).
    pub async fn claim(
        &self,
        seq: u64,
        assigned: Option<(JobState, u64)>,
        epoch: u64,
    ) -> Result<Option<Written>, StateError> {
        let mut base = assigned.filter(|(s, _)| self.ours(s) && s.phase == JobPhase::Assigned);
        for _ in 0..CONFLICTS {
            let (state, revision) = match base.take() {
                Some(known) => known,
                None => match store::read(self.store, &self.key).await? {
                    Some(current) => (current.state, current.revision),
                    None => return Ok(None),
                },
            };
            if !self.ours(&state) || !matches!(state.phase, JobPhase::Assigned | JobPhase::Running)
            {
                return Ok(None);
            }
            let next = state.claim(seq);
            let sent = Instant::now();
            match store::write(self.store, &self.key, &next, Some(revision)).await {
                Ok(revision) => {
                    return Ok(Some(Written {
                        state: next,
                        revision,
                        sent,
                        epoch,
                    }))
                }
                Err(StateError::Conflict) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StateError::Conflict)
    }

    /// Renews the state ([`JobState::renew`]: a heartbeat) with compare-and-set on the revision
    /// of `known`, the last write; on a conflict, reads the key and renews what is there while it
    /// is still this attempt's and not final (a cancel request is kept, and shows in the state
    /// returned). `epoch`: the caller's connection count.
    pub async fn renew(&self, known: &Written, epoch: u64) -> Renewal {
        let mut base = (known.state.clone(), known.revision);
        for _ in 0..CONFLICTS {
            let next = base.0.renew();
            let sent = Instant::now();
            match store::write(self.store, &self.key, &next, Some(base.1)).await {
                Ok(revision) => {
                    return Renewal::Held(Written {
                        state: next,
                        revision,
                        sent,
                        epoch,
                    })
                }
                Err(StateError::Conflict) => {}
                Err(_) => return Renewal::Unreachable,
            }
            let current = match store::read(self.store, &self.key).await {
                Ok(Some(c)) => c,
                Ok(None) => return Renewal::Lost,
                Err(_) => return Renewal::Unreachable,
            };
            if !self.ours(&current.state) || current.state.phase == JobPhase::Final {
                return Renewal::Lost;
            }
            base = (current.state, current.revision);
        }
        Renewal::Lost
    }

    /// The fence before a verdict: renews the state with compare-and-set, which succeeds only
    /// while it still names this attempt. After it, no dispatcher reassigns the job for a whole
    /// lease, so the result published next cannot race a newer attempt's (a runner that was
    /// stopped or cut off past its lease finds itself superseded here).
    ///
    /// `known`, the last write, is that fence already when it was sent less than half a
    /// `heartbeat` ago on the same connection (`epoch`) and the runner is `connected` (a short
    /// job's claim, a long job's last heartbeat): no dispatcher can have reassigned the job
    /// since without this connection dropping (a liveness probe gets "no responders" only then)
    /// or a whole lease passing. A runner that was stopped (SIGSTOP) or cut off comes back with
    /// an old write or a new connection, and renews here.
    pub async fn fence(
        &self,
        known: &Written,
        heartbeat: Duration,
        epoch: u64,
        connected: bool,
    ) -> Renewal {
        if connected && known.epoch == epoch && known.sent.elapsed() < heartbeat / 2 {
            return Renewal::Held(known.clone());
        }
        self.renew(known, epoch).await
    }

    /// Gives the job back without a verdict: the state goes back to `queued` with no runner and
    /// `reason`, so the dispatcher holding the commit assigns the next attempt at its next beat
    /// instead of waiting out the lease. If the write fails the lease does the same, only later.
    pub async fn hand_back(&self, reason: String) {
        let Ok(Some(current)) = store::read(self.store, &self.key).await else {
            return;
        };
        if self.ours(&current.state) && current.state.phase != JobPhase::Final {
            let next = current.state.hand_back(reason);
            let _ = store::write(self.store, &self.key, &next, Some(current.revision)).await;
        }
    }
}

/// Writes `final` for `job` with the result's status and reason into `store` once the result is
/// stored: one compare-and-set on the revision of `fenced` (the fence's write), else read and
/// write until the state says `final` (a missing state is created). Gives up after 20 tries a
/// quarter of a second apart (each write itself may wait out a leader election, see
/// [`store`]); the dispatcher then finds the stored result when the heartbeats stop.
pub async fn mark_final(
    store: &kv::Store,
    job: &JobRef,
    result: &ResultMsg,
    fenced: Option<Written>,
) {
    let key = job.key();
    let finish = |state: JobState| state.finish(result.status, result.reason.clone());
    if let Some(known) = fenced {
        let done = finish(known.state);
        if store::write(store, &key, &done, Some(known.revision))
            .await
            .is_ok()
        {
            return;
        }
    }
    for _ in 0..20 {
        match store::read(store, &key).await {
            Ok(Some(cur)) if cur.state.phase == JobPhase::Final => return,
            Ok(cur) => {
                let revision = cur.as_ref().map(|c| c.revision);
                let next = finish(
                    cur.map(|c| c.state)
                        .unwrap_or_else(|| state_of(job, result)),
                );
                match store::write(store, &key, &next, revision).await {
                    Ok(_) => return,
                    Err(StateError::Conflict) => continue,
                    Err(e) => {
                        tracing::warn!(job = %result.job_id, error = %e, "cannot mark the job final yet")
                    }
                }
            }
            Err(e) => {
                tracing::warn!(job = %result.job_id, error = %e, "cannot read the job state")
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A job state for a result whose state is gone (deleted by hand, or a bucket that lost it).
fn state_of(job: &JobRef, result: &ResultMsg) -> JobState {
    JobState {
        v: VERSION,
        repo: job.repo.clone(),
        branch: result.branch.clone(),
        sha: job.sha.clone(),
        run: job.run,
        job: job.job.clone(),
        phase: JobPhase::Running,
        attempt: result.attempt,
        runner: Some(result.runner.clone()),
        job_seq: None,
        labels: vec![],
        status: None,
        reason: None,
        cancel: None,
        updated_at: crate::messages::now(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assigned() -> JobState {
        JobState {
            v: VERSION,
            repo: "app".into(),
            branch: "feature/ünïcode: \"quoted\"\\".into(),
            sha: "a".repeat(40),
            run: 1,
            job: None,
            phase: JobPhase::Assigned,
            attempt: 2,
            runner: Some("r1".into()),
            job_seq: None,
            labels: vec!["linux".into(), "gpu".into()],
            status: None,
            reason: Some("line one\nline two".into()),
            cancel: None,
            updated_at: crate::messages::now(),
        }
    }

    #[test]
    fn the_assigned_state_travels_in_headers_and_back() {
        let state = assigned();
        let headers = assigned_headers(&state, 4711).unwrap();
        let value = headers.get(ASSIGNED_STATE).unwrap().as_str();
        assert!(!value.contains(['\r', '\n']), "{value}");
        assert_eq!(assigned_in(Some(&headers)), Some((state, 4711)));
    }

    #[test]
    fn missing_or_bad_headers_mean_read_the_key() {
        assert_eq!(assigned_in(None), None);
        assert_eq!(assigned_in(Some(&HeaderMap::new())), None);
        let mut only_state = assigned_headers(&assigned(), 1).unwrap();
        only_state.insert(ASSIGNED_REVISION, "not a number");
        assert_eq!(assigned_in(Some(&only_state)), None);
        let mut bad_state = assigned_headers(&assigned(), 1).unwrap();
        bad_state.insert(ASSIGNED_STATE, "{\"v\":1}");
        assert_eq!(assigned_in(Some(&bad_state)), None);
    }

    #[test]
    fn a_state_too_big_for_headers_goes_without() {
        let mut state = assigned();
        // Each `"` is two bytes of JSON.
        state.branch = format!("x/{}", "\"".repeat(MAX_STATE_HEADER / 2));
        assert_eq!(assigned_headers(&state, 1), None);
    }
}
