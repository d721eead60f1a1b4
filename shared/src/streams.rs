//! Idempotent set-up of every stream and bucket (DESIGN.md, "Streams, subjects, buckets").
//!
//! Whichever process starts first creates them; the others find them. A stream that exists with
//! settings jetci cannot work with (another retention, other subjects) is reported as a
//! [`SetupError::Conflict`] and never silently recreated, because recreating a stream deletes its
//! messages.

use std::time::Duration;

use async_nats::jetstream::{
    self, kv,
    stream::{Config, DiscardPolicy, RetentionPolicy, StorageType, Stream},
};

use crate::connect::Nats;

/// How long a published commit, job or result id is remembered for de-duplication. An observer
/// restarted within this window cannot publish a commit twice even if it lost its mark
/// (JETSTREAM-NOTES 2, "Dedupe": the default is only 120 s).
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(3600);

/// Most bytes of recorded test timings (`ci-timings`), all repositories together. Small on
/// purpose: JetStream reserves a stream's `max_bytes` from the server's storage when the stream
/// is made, so every bound here is disk a small server must have free at start.
pub const TIMINGS_MAX_BYTES: i64 = 64 * 1024 * 1024;
/// How long a repository's test timings are kept without a run that records some.
pub const TIMINGS_MAX_AGE: Duration = Duration::from_secs(90 * 24 * 3600);
/// Most bytes of stored shard splits (`ci-shards`), all repositories together; splits are kept
/// as long as results. A split without recorded times takes about 100 bytes; when the bucket
/// is full, shards split round-robin ([`crate::pipeline::timings::split_for`]).
pub const SHARDS_MAX_BYTES: i64 = 64 * 1024 * 1024;

/// How long results are kept.
pub const RESULTS_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);
/// How long logs are kept.
pub const LOGS_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// Bytes of logs kept in all (oldest dropped first).
pub const LOGS_MAX_BYTES: i64 = 4 * 1024 * 1024 * 1024;
/// Most consumers `CI_RESULTS` and `CI_LOGS` each hold at once. Their readers (jetci-web's
/// results feed and at most 64 live logs, `jetci tail`, `jetci logs`) make short-lived
/// ephemeral consumers; any user allowed to make them (the `viewer` role of deploy/auth) could
/// otherwise pile up as many as it likes. Past this the server refuses a new one (error 10026,
/// "maximum consumers limit reached") until old ones lapse ([`crate::follow::READER_INACTIVE`]).
/// No process of the dispatch protocol reads these two streams through a consumer, so a full
/// stream delays readers only, never a test or its result.
pub const READERS_MAX_CONSUMERS: i32 = 256;
/// How long a job's state is kept in `ci-jobs` after its last change.
pub const JOBS_KV_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long a runner's presence entry outlives its last refresh. Liveness itself is judged by the
/// lease, from the entry's age; this only cleans up.
pub const RUNNERS_KV_MAX_AGE: Duration = Duration::from_secs(60);

/// Stream or bucket set-up failed.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A stream exists with settings jetci cannot use.
    #[error("stream {stream} exists with {field} {found}, but jetci needs {wanted}; fix or delete it by hand (`nats stream info {stream}`)")]
    Conflict {
        stream: String,
        field: &'static str,
        found: String,
        wanted: String,
    },
    /// The server refused or did not answer.
    #[error("cannot set up {what}: {reason}")]
    Server { what: String, reason: String },
}

/// Handles to every stream and bucket.
#[derive(Clone)]
pub struct Streams {
    pub commits: Stream,
    pub jobs: Stream,
    pub results: Stream,
    pub logs: Stream,
    /// `ci-observer`: last head per branch.
    pub marks: kv::Store,
    /// `ci-jobs`: job state.
    pub job_states: kv::Store,
    /// `ci-runners`: runner presence.
    pub runners: kv::Store,
    /// `ci-timings`: test file durations per repository and job.
    pub timings: kv::Store,
    /// `ci-shards`: a job's split of its tests per commit.
    pub shards: kv::Store,
}

/// The stream configurations, for one installation's names and replica count.
pub fn stream_configs(nats: &Nats) -> Vec<Config> {
    let n = &nats.names;
    let base = Config {
        storage: StorageType::File,
        num_replicas: nats.replicas,
        duplicate_window: DUPLICATE_WINDOW,
        ..Default::default()
    };
    vec![
        Config {
            name: n.commits_stream(),
            description: Some("jetci: commits to test (work queue)".into()),
            subjects: vec![n.commits_filter()],
            retention: RetentionPolicy::WorkQueue,
            ..base.clone()
        },
        Config {
            name: n.jobs_stream(),
            description: Some("jetci: jobs assigned to runners (work queue)".into()),
            subjects: vec![n.jobs_filter()],
            retention: RetentionPolicy::WorkQueue,
            // A job left on the subject of a runner that never came back goes eventually.
            max_age: JOBS_KV_MAX_AGE,
            ..base.clone()
        },
        Config {
            name: n.results_stream(),
            description: Some("jetci: final results, one per run".into()),
            subjects: vec![n.results_filter(), n.superseded_filter()],
            retention: RetentionPolicy::Limits,
            max_age: RESULTS_MAX_AGE,
            allow_direct: true,
            // One message per subject, and the server refuses a second one: the first result
            // of a run is its verdict whoever publishes after it, with or without the headers
            // jetci's publishers send (nats-server >= 2.10, error 10077).
            max_messages_per_subject: 1,
            discard: DiscardPolicy::New,
            discard_new_per_subject: true,
            max_consumers: READERS_MAX_CONSUMERS,
            ..base.clone()
        },
        Config {
            name: n.logs_stream(),
            description: Some("jetci: job output in ordered chunks".into()),
            subjects: vec![n.logs_filter()],
            retention: RetentionPolicy::Limits,
            max_age: LOGS_MAX_AGE,
            max_bytes: LOGS_MAX_BYTES,
            discard: DiscardPolicy::Old,
            allow_direct: true,
            max_consumers: READERS_MAX_CONSUMERS,
            ..base
        },
    ]
}

/// Creates or finds every stream and bucket, checking the settings that matter.
///
/// Errors: [`SetupError::Conflict`] for an incompatible existing stream, [`SetupError::Server`]
/// when the server refuses or does not answer.
pub async fn setup(nats: &Nats) -> Result<Streams, SetupError> {
    let mut streams = Vec::new();
    for config in stream_configs(nats) {
        streams.push(ensure_stream(&nats.js, config, nats.replicas).await?);
    }
    let logs = streams.pop().expect("four streams");
    let results = streams.pop().expect("four streams");
    let jobs = streams.pop().expect("four streams");
    let commits = streams.pop().expect("four streams");
    let n = &nats.names;
    let marks = ensure_bucket(nats, n.observer_bucket(), Duration::ZERO).await?;
    let job_states = ensure_bucket(nats, n.jobs_bucket(), JOBS_KV_MAX_AGE).await?;
    let runners = ensure_bucket(nats, n.runners_bucket(), RUNNERS_KV_MAX_AGE).await?;
    let timings =
        ensure_bounded_bucket(nats, n.timings_bucket(), TIMINGS_MAX_AGE, TIMINGS_MAX_BYTES).await?;
    let shards =
        ensure_bounded_bucket(nats, n.shards_bucket(), RESULTS_MAX_AGE, SHARDS_MAX_BYTES).await?;
    Ok(Streams {
        commits,
        jobs,
        results,
        logs,
        marks,
        job_states,
        runners,
        timings,
        shards,
    })
}

/// Finds or creates one stream and checks its settings.
///
/// The look-up, the creation and the read-back are retried together: on a cluster, a stream that
/// another process has just created can answer "stream not found" for a moment while its
/// replicas are placed, and that is no reason to exit.
async fn ensure_stream(
    js: &jetstream::Context,
    config: Config,
    replicas: usize,
) -> Result<Stream, SetupError> {
    let name = config.name.clone();
    let wanted = &config;
    let (stream, found) = retry_setup(&name, move || async move {
        let mut stream = js.get_or_create_stream(wanted.clone()).await?;
        let found = stream.info().await?.config.clone();
        Ok::<_, async_nats::Error>((stream, found))
    })
    .await?;
    check_compatible(&config, &found)?;
    warn_replicas(&name, found.num_replicas, replicas);
    match enforced_update(&config, &found) {
        Some(update) => upgrade(js, update).await,
        None => Ok(stream),
    }
}

/// The settings jetci has the server enforce that an older jetci did not set, and that can be
/// changed in place: the per-subject limit of `CI_RESULTS` (one result per run, a second one
/// refused), and a bound on the consumers of `CI_RESULTS` and `CI_LOGS` where the stream has
/// none (a bound the operator chose is kept). `None` when `found` has them already; else
/// `found` with them set.
///
/// A stream that already holds a second message on a subject (stored before the limit) keeps
/// only the newest once the limit applies: nats-server trims each subject to it. Consumers
/// beyond a new bound stay until they go; only new ones are refused.
fn enforced_update(wanted: &Config, found: &Config) -> Option<Config> {
    let per_subject = wanted.max_messages_per_subject > 0
        && (found.max_messages_per_subject != wanted.max_messages_per_subject
            || found.discard != wanted.discard
            || found.discard_new_per_subject != wanted.discard_new_per_subject);
    // nats-server stores "no limit" as -1 (0 when sent means the same).
    let consumers = wanted.max_consumers > 0 && found.max_consumers <= 0;
    if !per_subject && !consumers {
        return None;
    }
    let mut update = found.clone();
    if per_subject {
        update.max_messages_per_subject = wanted.max_messages_per_subject;
        update.discard = wanted.discard;
        update.discard_new_per_subject = wanted.discard_new_per_subject;
    }
    if consumers {
        update.max_consumers = wanted.max_consumers;
    }
    Some(update)
}

/// Updates a stream to `config` (created by an earlier jetci), saying so.
async fn upgrade(js: &jetstream::Context, config: Config) -> Result<Stream, SetupError> {
    let name = config.name.clone();
    retry_setup(&name, || js.update_stream(config.clone())).await?;
    tracing::info!(
        stream = %name,
        max_messages_per_subject = config.max_messages_per_subject,
        max_consumers = config.max_consumers,
        "upgraded the stream to the limits this jetci has the server enforce"
    );
    retry_setup(&name, || js.get_stream(name.clone())).await
}

/// Says so when a stream or bucket has fewer or more replicas than `--replicas` asks for: it was
/// created that way (by an earlier run, or by hand), and jetci never changes a stream it finds.
fn warn_replicas(name: &str, found: usize, wanted: usize) {
    if found.max(1) != wanted {
        tracing::warn!(
            stream = name,
            replicas = found,
            wanted,
            "stream has another replica count than --replicas; change it with `nats stream edit {name} --replicas {wanted}`"
        );
    }
}

/// The settings jetci relies on: retention (work queue vs limits) and the subjects.
fn check_compatible(wanted: &Config, found: &Config) -> Result<(), SetupError> {
    if wanted.retention != found.retention {
        return Err(SetupError::Conflict {
            stream: wanted.name.clone(),
            field: "retention",
            found: format!("{:?}", found.retention),
            wanted: format!("{:?}", wanted.retention),
        });
    }
    let mut a = wanted.subjects.clone();
    let mut b = found.subjects.clone();
    a.sort();
    b.sort();
    if a != b {
        return Err(SetupError::Conflict {
            stream: wanted.name.clone(),
            field: "subjects",
            found: b.join(","),
            wanted: a.join(","),
        });
    }
    Ok(())
}

async fn ensure_bucket(
    nats: &Nats,
    bucket: String,
    max_age: Duration,
) -> Result<kv::Store, SetupError> {
    ensure_bounded_bucket(nats, bucket, max_age, -1).await
}

/// [`ensure_bucket`] with a size bound (`-1`: none). A full bucket refuses new values
/// (JetStream KV buckets discard new).
async fn ensure_bounded_bucket(
    nats: &Nats,
    bucket: String,
    max_age: Duration,
    max_bytes: i64,
) -> Result<kv::Store, SetupError> {
    if let Ok(store) = nats.js.get_key_value(bucket.clone()).await {
        warn_replicas(
            &store.stream_name,
            store.stream.cached_info().config.num_replicas,
            nats.replicas,
        );
        return Ok(store);
    }
    let config = kv::Config {
        bucket: bucket.clone(),
        history: 1,
        max_age,
        max_bytes,
        storage: StorageType::File,
        num_replicas: nats.replicas,
        ..Default::default()
    };
    retry_setup(&bucket, || nats.js.create_key_value(config.clone())).await
}

/// Retries a set-up call for a few seconds: right after a server start or a cluster leader
/// change the JetStream API answers "no responders" or times out for a moment
/// (JETSTREAM-NOTES 5.4: meta-leader election took 0.5-1.2 s).
async fn retry_setup<T, E, F, Fut>(what: &str, mut call: F) -> Result<T, SetupError>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut last = String::new();
    for attempt in 0..20 {
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) => {
                last = e.to_string();
                tracing::debug!(what, attempt, error = %last, "set-up failed; retrying");
            }
        }
        tokio::time::sleep(Duration::from_millis(250 * (attempt + 1).min(4))).await;
    }
    Err(SetupError::Server {
        what: what.to_string(),
        reason: last,
    })
}

/// Follows every key of a bucket: current values first, then each change, forwarded to the
/// returned channel (capacity 1024). The watch is an ordered consumer; when it ends or fails
/// (a server restart, or on a cluster the loss of the node that held it) it is created again
/// after a short pause, resuming after the last revision it delivered, so no change made in
/// between is missed. A reader must still treat entries as "latest state", not as events to
/// count: a key changed twice meanwhile comes back once, with its last value. The task ends
/// when the receiver is dropped.
///
/// async-nats' `watch_all` delivers only changes made after it starts; a watch recreated that
/// way lost every change made while the old one was dead, and on a cluster that lost a node a
/// dispatcher missed the `final` states of jobs that ended meanwhile, counted their runners busy
/// forever and never assigned its waiting commits again.
pub fn watch_bucket(
    store: kv::Store,
    name: &'static str,
) -> tokio::sync::mpsc::Receiver<kv::Entry> {
    use futures::StreamExt;
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(async move {
        // The highest revision (stream sequence) delivered so far.
        let mut seen = 0;
        loop {
            let watch = match seen {
                0 => store.watch_with_history(ALL_KEYS).await,
                _ => store.watch_all_from_revision(seen + 1).await,
            };
            match watch {
                Ok(mut watch) => {
                    while let Some(entry) = watch.next().await {
                        match entry {
                            Ok(e) => {
                                seen = seen.max(e.revision);
                                if tx.send(e).await.is_err() {
                                    return;
                                }
                            }
                            Err(e) => {
                                tracing::warn!(bucket = name, error = %e, "bucket watch failed; watching again");
                                break;
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(bucket = name, error = %e, "cannot watch bucket; retrying")
                }
            }
            if tx.is_closed() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    rx
}

/// Every key of a bucket, for [`watch_bucket`].
const ALL_KEYS: &str = ">";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_results_stream_without_the_per_subject_limit_is_upgraded_in_place() {
        let wanted = Config {
            name: "CI_RESULTS".into(),
            max_messages_per_subject: 1,
            discard: DiscardPolicy::New,
            discard_new_per_subject: true,
            max_age: Duration::from_secs(60),
            ..Default::default()
        };
        let old = Config {
            max_messages_per_subject: -1,
            discard: DiscardPolicy::Old,
            discard_new_per_subject: false,
            max_age: Duration::from_secs(99),
            ..wanted.clone()
        };
        let update = enforced_update(&wanted, &old).expect("an update");
        assert_eq!(update.max_messages_per_subject, 1);
        assert!(update.discard_new_per_subject);
        assert_eq!(update.discard, DiscardPolicy::New);
        // Only those fields change: the rest stays as the operator has it.
        assert_eq!(update.max_age, Duration::from_secs(99));
        assert!(enforced_update(&wanted, &wanted).is_none());
        let commits = Config {
            name: "CI_COMMITS".into(),
            ..Default::default()
        };
        assert!(enforced_update(&commits, &old).is_none());
    }

    #[test]
    fn a_readers_stream_without_a_consumer_bound_gets_one_and_an_operators_bound_stays() {
        let wanted = Config {
            name: "CI_LOGS".into(),
            max_consumers: READERS_MAX_CONSUMERS,
            ..Default::default()
        };
        for unbounded in [-1, 0] {
            let old = Config {
                max_consumers: unbounded,
                max_age: Duration::from_secs(99),
                ..wanted.clone()
            };
            let update = enforced_update(&wanted, &old).expect("an update");
            assert_eq!(update.max_consumers, READERS_MAX_CONSUMERS);
            assert_eq!(update.max_age, Duration::from_secs(99));
            assert_eq!(
                update.max_messages_per_subject,
                old.max_messages_per_subject
            );
        }
        let chosen = Config {
            max_consumers: 1000,
            ..wanted.clone()
        };
        assert!(enforced_update(&wanted, &chosen).is_none());
        assert!(enforced_update(&wanted, &wanted).is_none());
    }

    #[test]
    fn conflicts_are_detected() {
        let wanted = Config {
            name: "CI_COMMITS".into(),
            subjects: vec!["ci.commits.>".into()],
            retention: RetentionPolicy::WorkQueue,
            ..Default::default()
        };
        assert!(check_compatible(&wanted, &wanted.clone()).is_ok());
        let limits = Config {
            retention: RetentionPolicy::Limits,
            ..wanted.clone()
        };
        let err = check_compatible(&wanted, &limits).unwrap_err();
        assert!(err.to_string().contains("retention"), "{err}");
        let other = Config {
            subjects: vec!["x.>".into()],
            ..wanted.clone()
        };
        assert!(check_compatible(&wanted, &other).is_err());
    }
}
