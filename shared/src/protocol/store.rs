//! Reading and writing a job's state in the `ci-jobs` bucket with compare-and-set (the states
//! themselves are built by the transitions in [`super::job`]).
//!
//! Every write names the revision it read. Two dispatchers that both try to reassign a job, or a
//! superseded runner that heartbeats after its job moved, lose the race with
//! [`StateError::Conflict`] instead of overwriting the winner: this is the fencing of DESIGN.md
//! ("a result from a superseded attempt is fenced").
//!
//! On a cluster the bucket is a replicated stream, and when the node leading it dies the bucket
//! takes no writes until the survivors elect a new leader, which takes a raft election timeout
//! (about 6 s in `tests/e2e/cluster.rs`); every write meanwhile fails at once with "no stream found"
//! (no responders). Reads go on, served by the followers. Left alone, that outage would break I3 in
//! two ways, so this module hides it:
//!
//! - Runners' writes (a heartbeat, a claim, a final state: phases `running` and `final`) record
//!   what already happened, so they wait the election out ([`ELECTION_WAIT`]) and land the moment
//!   a leader is back. A final state that is not written leaves the job `running` with no
//!   heartbeat, and it would run again.
//! - Decisions (a dispatcher's `assigned` or `queued`) are never retried: one based on heartbeats
//!   that the outage held back would take a healthy job from its runner. Instead the outage is
//!   remembered per bucket (`Outage`): every age this module reports is at most the time since
//!   the bucket was last seen without a leader, and the first decision after such a sighting asks
//!   the stream when its leader was elected and is refused, so the next one counts the job's age
//!   from the election at most. Runners' heartbeats land within [`ELECTION_RETRY`] of it.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::kv::{self, CreateErrorKind, UpdateErrorKind};
use time::OffsetDateTime;

use crate::messages::{decode, encode, JobPhase, JobState};

/// How long a runner's write waits for a bucket without a leader to elect one: well beyond the
/// few seconds an election takes, with room for a slow machine.
pub const ELECTION_WAIT: Duration = Duration::from_secs(15);

/// How often a waiting write tries again; a heartbeat lands this soon after an election.
pub const ELECTION_RETRY: Duration = Duration::from_millis(50);

/// A job state with the revision it was read at and its age.
#[derive(Debug, Clone)]
pub struct Versioned {
    pub state: JobState,
    pub revision: u64,
    /// Time since the entry was written (server timestamp of the write vs this host's clock).
    pub age: Duration,
}

/// A compare-and-set write failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Someone wrote the key since it was read: read again and decide again.
    #[error("job state changed underneath (someone else wrote it)")]
    Conflict,
    /// The stored value does not decode.
    #[error("job state of {key} does not decode: {reason}")]
    Bad {
        key: String,
        reason: String,
        /// The entry's revision, so the caller can overwrite it with compare-and-set.
        revision: u64,
    },
    /// NATS did not answer.
    #[error("cannot reach the job state bucket: {0}")]
    Server(String),
}

/// Age of a KV entry written at `created`, never negative.
pub fn age_of(created: OffsetDateTime) -> Duration {
    let d = OffsetDateTime::now_utc() - created;
    d.try_into().unwrap_or(Duration::ZERO)
}

/// Decodes one watched or read entry; `None` for a delete or purge marker.
pub fn from_entry(entry: &kv::Entry) -> Result<Option<Versioned>, StateError> {
    if entry.operation != kv::Operation::Put {
        return Ok(None);
    }
    let state: JobState = decode(&entry.value).map_err(|e| StateError::Bad {
        key: entry.key.clone(),
        reason: e.to_string(),
        revision: entry.revision,
    })?;
    Ok(Some(Versioned {
        state,
        revision: entry.revision,
        age: Outage::clamp(&entry.bucket, age_of(entry.created)),
    }))
}

/// Reads the current state of `key`.
pub async fn read(store: &kv::Store, key: &str) -> Result<Option<Versioned>, StateError> {
    match store.entry(key).await {
        Ok(Some(e)) => from_entry(&e),
        Ok(None) => Ok(None),
        Err(e) => Err(StateError::Server(e.to_string())),
    }
}

/// Asks job `key` to stop: writes a cancel request (`who`, for the record) into its state, or
/// into `queued` when it has none, with compare-and-set, reading again after a conflict (a few
/// times). A final job is left alone. Its runner stops the command and reports `cancelled`; a
/// dispatcher holding a job on no runner gives it a `cancelled` result.
///
/// Errors: the bucket cannot be read or written, or the key kept moving.
pub async fn request_cancel(
    store: &kv::Store,
    key: &str,
    queued: &JobState,
    who: &str,
) -> Result<(), StateError> {
    let mut last = StateError::Conflict;
    for _ in 0..8 {
        let (state, revision) = match read(store, key).await? {
            Some(c) if c.state.phase == JobPhase::Final || c.state.cancel.is_some() => {
                return Ok(())
            }
            Some(c) => (c.state, Some(c.revision)),
            None => (queued.clone(), None),
        };
        match write(store, key, &state.request_cancel(who.to_string()), revision).await {
            Ok(_) => return Ok(()),
            Err(StateError::Conflict) => last = StateError::Conflict,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

/// Writes `state` if the key is still at `revision` (`None`: only if the key does not exist).
/// Returns the new revision.
///
/// While the bucket has no leader (see the module doc), a write of phase `running` or `final`
/// tries again every [`ELECTION_RETRY`] for up to [`ELECTION_WAIT`]; any other write fails at
/// once, and the first one after the bucket was seen without a leader is refused after asking
/// when its leader was elected, so that the caller decides again on ages counted from then.
pub async fn write(
    store: &kv::Store,
    key: &str,
    state: &JobState,
    revision: Option<u64>,
) -> Result<u64, StateError> {
    let patient = matches!(state.phase, JobPhase::Running | JobPhase::Final);
    if !patient && Outage::unconfirmed(&store.name) {
        return Err(confirm_leader(store).await);
    }
    let value = encode(state);
    let deadline = Instant::now() + ELECTION_WAIT;
    loop {
        let mut leaderless = false;
        let mut server = |e: &(dyn std::error::Error + 'static)| {
            leaderless = is_leaderless(e);
            StateError::Server(e.to_string())
        };
        let attempt = match revision {
            None => store
                .create(key, value.clone())
                .await
                .map_err(|e| match e.kind() {
                    CreateErrorKind::AlreadyExists => StateError::Conflict,
                    _ => server(&e),
                }),
            Some(rev) => store
                .update(key, value.clone(), rev)
                .await
                .map_err(|e| match e.kind() {
                    UpdateErrorKind::WrongLastRevision => StateError::Conflict,
                    _ => server(&e),
                }),
        };
        if attempt.is_ok() || !leaderless {
            return attempt;
        }
        Outage::seen(&store.name);
        if !patient || Instant::now() >= deadline {
            return attempt;
        }
        tokio::time::sleep(ELECTION_RETRY).await;
    }
}

/// True when `e`, or an error it wraps, says that no server took a publish: the stream has no
/// leader (an election is on), or no longer exists.
fn is_leaderless(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(p) = err.downcast_ref::<PublishError>() {
            if p.kind() == PublishErrorKind::StreamNotFound {
                return true;
            }
        }
        next = err.source();
    }
    false
}

/// After the bucket was seen without a leader: asks its stream whether it has one again and since
/// when, records that, and returns the error that refuses the decision at hand. A stream that
/// cannot be asked (the request is refused or times out) counts as re-elected now: that delays
/// decisions by a lease at most, and if the bucket still has no leader the next decision's write
/// fails and sees the outage again.
async fn confirm_leader(store: &kv::Store) -> StateError {
    let since = match store.stream.get_info().await {
        Ok(info) => match info.cluster {
            Some(c) if c.leader.is_none() => {
                Outage::seen(&store.name);
                return StateError::Server(format!("bucket {} has no leader yet", store.name));
            }
            // A server outside a cluster reports no election time: count from now.
            Some(c) => c.leader_since.map(age_of).unwrap_or_default(),
            None => Duration::ZERO,
        },
        Err(_) => Duration::ZERO,
    };
    Outage::elected(&store.name, since);
    StateError::Server(format!(
        "bucket {} elected a leader {since:?} ago; deciding again on heartbeats counted from then",
        store.name
    ))
}

/// The last loss of a bucket's leader seen by this process: all handles to the bucket share it,
/// hence one table per process, keyed by bucket name.
#[derive(Debug, Clone, Copy)]
struct Outage {
    /// When the bucket was last seen without a leader, or when its new leader was elected.
    at: Instant,
    /// Whether the bucket has been seen with a leader again since.
    confirmed: bool,
}

impl Outage {
    fn table() -> std::sync::MutexGuard<'static, HashMap<String, Outage>> {
        static TABLE: OnceLock<Mutex<HashMap<String, Outage>>> = OnceLock::new();
        TABLE
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The bucket has no leader now.
    fn seen(bucket: &str) {
        Self::table().insert(
            bucket.to_string(),
            Outage {
                at: Instant::now(),
                confirmed: false,
            },
        );
    }

    /// The bucket's leader was elected `ago`.
    fn elected(bucket: &str, ago: Duration) {
        let elected = Instant::now().checked_sub(ago).unwrap_or_else(Instant::now);
        let mut table = Self::table();
        let at = table.get(bucket).map_or(elected, |o| o.at.max(elected));
        table.insert(
            bucket.to_string(),
            Outage {
                at,
                confirmed: true,
            },
        );
    }

    /// Whether the bucket was seen without a leader and not yet with one again.
    fn unconfirmed(bucket: &str) -> bool {
        Self::table().get(bucket).is_some_and(|o| !o.confirmed)
    }

    /// `age`, but no more than the time since the bucket's last outage: a heartbeat could not be
    /// written before then, for no fault of its runner.
    fn clamp(bucket: &str, age: Duration) -> Duration {
        match Self::table().get(bucket) {
            Some(o) => age.min(o.at.elapsed()),
            None => age,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publish_without_responders_is_an_election_wherever_it_is_wrapped() {
        let lost = || PublishError::new(PublishErrorKind::StreamNotFound);
        assert!(is_leaderless(&lost()));
        let update = kv::UpdateError::from(lost());
        assert!(is_leaderless(&update));
        assert!(is_leaderless(&kv::CreateError::from(update)));
        let conflict =
            kv::UpdateError::from(PublishError::new(PublishErrorKind::WrongLastSequence));
        assert!(!is_leaderless(&conflict));
        assert!(!is_leaderless(&PublishError::new(
            PublishErrorKind::TimedOut
        )));
    }

    #[test]
    fn ages_count_from_the_last_outage_and_from_the_election_after_it() {
        let hour = Duration::from_secs(3600);
        assert_eq!(Outage::clamp("never-lost", hour), hour);
        assert!(!Outage::unconfirmed("never-lost"));

        Outage::seen("lost");
        assert!(Outage::unconfirmed("lost"));
        assert!(Outage::clamp("lost", hour) < Duration::from_secs(1));

        // The leader came back 2 s ago, but the outage was seen since: the later time counts.
        Outage::elected("lost", Duration::from_secs(2));
        assert!(!Outage::unconfirmed("lost"));
        assert!(Outage::clamp("lost", hour) < Duration::from_secs(1));

        Outage::seen("old");
        Outage::elected("old", Duration::ZERO);
        std::thread::sleep(Duration::from_millis(20));
        let clamped = Outage::clamp("old", hour);
        assert!(clamped >= Duration::from_millis(20) && clamped < hour);
    }
}
