//! Where a job's shard split and test timings live: two JetStream KV buckets.
//!
//! - `ci-shards`, key `<repo>.<sha>.<job>` (`job`: the `[jobs.<name>]` table): the [`Split`]
//!   of one commit's tests, created by the first of the job's shards to start (KV `create`:
//!   the server keeps the first and refuses the rest, which then read it). Every shard of every
//!   run of that commit, a `rerun --failed` included, takes its part of the same split.
//! - `ci-timings`, key `<repo>.<job>`: milliseconds by test file, merged by each shard after
//!   it ran from its JUnit testcase times ([`record`]), with compare-and-set on the entry's
//!   revision so that shards ending together do not lose each other's times.
//!
//! A matrix job's combinations share both: they run the same files.

use std::collections::{BTreeMap, HashMap};

use async_nats::jetstream::kv;

use super::shard::{record, Split, MAX_TIMINGS_BYTES};
use crate::test_report::CaseTime;

/// Attempts at merging timings when other shards write the same entry meanwhile.
const RECORD_ATTEMPTS: usize = 8;

/// The split of `tests` over `shards` for job `base` of commit `sha` of `repo`: the one stored
/// already, else one made now from the recorded timings and stored.
///
/// Errors: the server refused or did not answer (worth another attempt), or the stored split
/// does not fit the shard count.
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
    let durations: HashMap<String, u64> = read_timings(timings, repo, base)
        .await?
        .0
        .into_iter()
        .collect();
    let split = Split::new(tests, &durations, shards);
    let value = serde_json::to_vec(&split).expect("a split serializes");
    match splits.create(&key, value.into()).await {
        Ok(_) => Ok(split),
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => stored_split(splits, &key)
            .await?
            .ok_or_else(|| format!("the shard split {key} vanished")),
        Err(e) => Err(format!("cannot store the shard split {key}: {e}")),
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

/// The recorded timings of job `base` of `repo` and the entry's revision (`None`: none yet).
/// An entry that does not decode counts as empty.
async fn read_timings(
    timings: &kv::Store,
    repo: &str,
    base: &str,
) -> Result<(BTreeMap<String, u64>, Option<u64>), String> {
    let key = format!("{repo}.{base}");
    match timings.entry(&key).await {
        Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
            let map = serde_json::from_slice(&entry.value).unwrap_or_else(|e| {
                tracing::warn!(key, error = %e, "unreadable test timings; starting afresh");
                BTreeMap::new()
            });
            Ok((map, Some(entry.revision)))
        }
        Ok(Some(entry)) => Ok((BTreeMap::new(), Some(entry.revision))),
        Ok(None) => Ok((BTreeMap::new(), None)),
        Err(e) => Err(format!("cannot read the test timings {key}: {e}")),
    }
}

/// Merges a shard's testcase times into job `base`'s timings ([`record`]). Returns how many
/// test files got a time (0: nothing written).
///
/// Errors: the server refused or did not answer, or other writers kept winning for
/// [`RECORD_ATTEMPTS`] rounds.
pub async fn record_times(
    timings: &kv::Store,
    repo: &str,
    base: &str,
    tests: &[String],
    cases: &[CaseTime],
) -> Result<usize, String> {
    let key = format!("{repo}.{base}");
    for _ in 0..RECORD_ATTEMPTS {
        let (mut map, revision) = read_timings(timings, repo, base).await?;
        let measured = record(&mut map, tests, cases);
        if measured == 0 {
            return Ok(0);
        }
        let value = serde_json::to_vec(&map).expect("timings serialize");
        debug_assert!(value.len() <= MAX_TIMINGS_BYTES + 64 * 1024);
        let written = match revision {
            Some(r) => timings
                .update(&key, value.into(), r)
                .await
                .map(|_| ())
                .map_err(|e| {
                    (
                        e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                        e.to_string(),
                    )
                }),
            None => timings
                .create(&key, value.into())
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
            Ok(()) => return Ok(measured),
            Err((true, _)) => continue,
            Err((false, e)) => return Err(format!("cannot record the test timings {key}: {e}")),
        }
    }
    Err(format!(
        "cannot record the test timings {key}: other shards kept writing it"
    ))
}
