//! Where a job's shard split and test timings live: two JetStream KV buckets.
//!
//! - `ci-shards`, key `<repo>.<sha>.<job>` (`job`: the `[jobs.<name>]` table): the [`Split`]
//!   of one commit's tests, created by the first of the job's shards to start (KV `create`:
//!   the server keeps the first and refuses the rest, which then read it). Every shard of every
//!   run of that commit, a `rerun --failed` included, takes its part of the same split. A split
//!   made without recorded times is round-robin and takes a few bytes.
//! - `ci-timings`, key `<repo>`: [`Timings`], every job's milliseconds by test file, merged by
//!   each shard after it ran ([`record`]), with compare-and-set on the entry's revision so that
//!   shards ending together do not lose each other's times. One bounded entry per repository.
//!
//! A matrix job's combinations share both: they run the same files.

use std::collections::{BTreeMap, HashMap};

use async_nats::jetstream::kv;

use super::shard::{record, Split, Timings};

/// Attempts at merging timings when other shards write the same entry meanwhile.
const RECORD_ATTEMPTS: usize = 8;

/// The split of `tests` over `shards` for job `base` of commit `sha` of `repo`: the one stored
/// already, else one made now from the recorded timings and stored. When the split cannot be
/// stored and none is there after all (the bucket is full), the round-robin split, which every
/// shard computes alike, is used without storing it (logged).
///
/// Errors: the server did not answer a read (worth another attempt).
pub async fn split_for(
    timings: &kv::Store,
    splits: &kv::Store,
    repo: &str,
    sha: &str,
    base: &str,
    tests: &[String],
    shards: u32,
) -> Result<Split, String> {
    let key = format!("{repo}.{sha}.{base}");
    if let Some(split) = stored_split(splits, &key).await? {
        return Ok(split);
    }
    let durations: HashMap<String, u64> = read_timings(timings, repo)
        .await?
        .0
        .remove(base)
        .unwrap_or_default()
        .into_iter()
        .collect();
    let split = Split::new(tests, &durations, shards);
    let value = serde_json::to_vec(&split).expect("a split serializes");
    match splits.create(&key, value.into()).await {
        Ok(_) => Ok(split),
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => stored_split(splits, &key)
            .await?
            .ok_or_else(|| format!("the shard split {key} vanished")),
        // A create that timed out may have been stored, or another shard's may be: take what
        // is there. Only with none at all (a full bucket) does every shard fall back alike.
        Err(e) => match stored_split(splits, &key).await? {
            Some(split) => Ok(split),
            None => {
                tracing::warn!(key, error = %e, "cannot store the shard split; splitting round-robin");
                Ok(Split::new(tests, &HashMap::new(), shards))
            }
        },
    }
}

async fn stored_split(splits: &kv::Store, key: &str) -> Result<Option<Split>, String> {
    match splits.get(key).await {
        Ok(Some(bytes)) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("the stored shard split {key} is unreadable: {e}")),
        Ok(None) => Ok(None),
        Err(e) => Err(format!("cannot read the shard split {key}: {e}")),
    }
}

/// The recorded timings of `repo` and the entry's revision (`None`: none yet). An entry that
/// does not decode counts as empty.
async fn read_timings(timings: &kv::Store, repo: &str) -> Result<(Timings, Option<u64>), String> {
    match timings.entry(repo).await {
        Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
            let map = serde_json::from_slice(&entry.value).unwrap_or_else(|e| {
                tracing::warn!(repo, error = %e, "unreadable test timings; starting afresh");
                Timings::new()
            });
            Ok((map, Some(entry.revision)))
        }
        Ok(Some(entry)) => Ok((Timings::new(), Some(entry.revision))),
        Ok(None) => Ok((Timings::new(), None)),
        Err(e) => Err(format!("cannot read the test timings of {repo}: {e}")),
    }
}

/// Merges a shard's `measured` times (milliseconds by test file) into job `base`'s timings
/// ([`record`]). Returns how many test files got a time (0: nothing written).
///
/// Errors: the server refused or did not answer, or other writers kept winning for
/// `RECORD_ATTEMPTS` (8) rounds.
pub async fn record_times(
    timings: &kv::Store,
    repo: &str,
    base: &str,
    tests: &[String],
    measured: &BTreeMap<String, u64>,
) -> Result<usize, String> {
    if measured.is_empty() {
        return Ok(0);
    }
    for _ in 0..RECORD_ATTEMPTS {
        let (mut map, revision) = read_timings(timings, repo).await?;
        let files = record(&mut map, base, tests, measured);
        let value = serde_json::to_vec(&map).expect("timings serialize");
        let written = match revision {
            Some(r) => timings
                .update(repo, value.into(), r)
                .await
                .map(|_| ())
                .map_err(|e| {
                    (
                        e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                        e.to_string(),
                    )
                }),
            None => timings
                .create(repo, value.into())
                .await
                .map(|_| ())
                .map_err(|e| {
                    (
                        e.kind() == kv::CreateErrorKind::AlreadyExists,
                        e.to_string(),
                    )
                }),
        };
        match written {
            Ok(()) => return Ok(files),
            Err((true, _)) => continue,
            Err((false, e)) => {
                return Err(format!("cannot record the test timings of {repo}: {e}"))
            }
        }
    }
    Err(format!(
        "cannot record the test timings of {repo}: other shards kept writing them"
    ))
}
