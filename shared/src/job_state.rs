//! Reading and writing a job's state in the `ci-jobs` bucket with compare-and-set.
//!
//! Every write names the revision it read. Two dispatchers that both try to reassign a job, or a
//! superseded runner that heartbeats after its job moved, lose the race with
//! [`StateError::Conflict`] instead of overwriting the winner: this is the fencing of DESIGN.md
//! ("a result from a superseded attempt is fenced").

use std::time::Duration;

use async_nats::jetstream::kv::{self, CreateErrorKind, UpdateErrorKind};
use time::OffsetDateTime;

use crate::messages::{decode, encode, JobState};

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
        age: age_of(entry.created),
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

/// Writes `state` if the key is still at `revision` (`None`: only if the key does not exist).
/// Returns the new revision.
pub async fn write(
    store: &kv::Store,
    key: &str,
    state: &JobState,
    revision: Option<u64>,
) -> Result<u64, StateError> {
    let value = encode(state);
    match revision {
        None => store.create(key, value).await.map_err(|e| match e.kind() {
            CreateErrorKind::AlreadyExists => StateError::Conflict,
            _ => StateError::Server(e.to_string()),
        }),
        Some(rev) => store
            .update(key, value, rev)
            .await
            .map_err(|e| match e.kind() {
                UpdateErrorKind::WrongLastRevision => StateError::Conflict,
                _ => StateError::Server(e.to_string()),
            }),
    }
}
