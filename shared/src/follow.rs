//! Following a limits stream (`CI_RESULTS`, `CI_LOGS`) in order, once per message, across NATS
//! restarts.
//!
//! One loop serves every reader: `jetci tail` and `jetci up` print results with it
//! (bins/jetci/src/results.rs), jetci-web keeps its view of `CI_RESULTS` with it and streams one
//! job's log to a browser. It reads with an
//! ephemeral pull consumer (no acks, in memory, one replica) and remembers the stream sequence of
//! the last message it forwarded. When anything goes wrong (a missed heartbeat, a pull error, the
//! consumer lost in a NATS restart, a gap in the consumer sequence) it drops the consumer and
//! creates a new one that starts right after that sequence, so each message is forwarded once
//! and none is skipped. A dropped consumer is left to the server, which removes it once no pull
//! has waited on it for [`READER_INACTIVE`]: readers never delete consumers, so a read-only user
//! needs no right to delete any (one who had it could delete jetci-web's). async-nats' ordered consumer would restart from the *first* message when
//! it is recreated before delivering anything (0.51 maps sequence 0 to `DeliverPolicy::All`).
//! Both streams have limits retention, so an ephemeral consumer takes nothing away from anyone
//! (JETSTREAM-NOTES 4). Errors are logged and the loop goes on (JETSTREAM-NOTES 0.5): a reader
//! of results should survive anything short of being asked to stop. The one exception is the
//! very first consumer of a [`Follower::open`]: a command line tool (`jetci tail`) would rather
//! say at once that it may not read the stream than wait forever.

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::stream::{ConsumerError, Stream};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Where following starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Start {
    /// With the oldest stored message.
    #[default]
    All,
    /// With the first message stored after the consumer is created.
    New,
    /// With the first message after this stream sequence.
    After(u64),
}

/// One message of the followed stream.
#[derive(Clone, Debug)]
pub struct Followed {
    /// Its stream sequence.
    pub seq: u64,
    pub subject: String,
    pub payload: Bytes,
    /// Messages the server still holds for this reader after this one (0: caught up).
    pub pending: u64,
}

/// What the follower tells its reader.
#[derive(Clone, Debug)]
pub enum Event {
    /// The next message, in stream order.
    Message(Followed),
    /// Everything stored when following started has been forwarded (sent once, also for an empty
    /// stream), so a view rebuilt from the stream is complete.
    CaughtUp,
}

/// How often the server sends an idle heartbeat on an open pull; two missed ones mean the
/// consumer or the connection is gone, and the consumer is recreated.
const HEARTBEAT: Duration = Duration::from_secs(5);
/// How long one pull request waits for messages before it is renewed.
const PULL_EXPIRES: Duration = Duration::from_secs(30);
/// How long the server keeps a reader's consumer once no pull waits on it: the consumer of a
/// reader that went away, or that a follower dropped to make a new one. A pull waiting on it
/// (`PULL_EXPIRES`, renewed as it ends) keeps it, so a reader at rest keeps its consumer. Short,
/// because these consumers count towards the streams' bound
/// ([`crate::streams::READERS_MAX_CONSUMERS`]).
pub const READER_INACTIVE: Duration = Duration::from_secs(10);

/// Following could not start.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    /// The first consumer could not be created: no such stream, no permission, no server.
    #[error("cannot follow stream {stream}")]
    Consumer {
        stream: String,
        #[source]
        source: ConsumerError,
    },
}

/// Forwards every message of `stream` matching `filter` (all subjects when `None`) to `tx`, in
/// stream order and once each, from `start` on, until `stop` is cancelled or the receiver is
/// dropped. Never fails: a consumer that cannot be created or breaks is logged and created again,
/// after a pause growing to 5 s, so the follower rides out NATS restarts.
pub async fn follow(
    stream: Stream,
    filter: Option<String>,
    start: Start,
    tx: mpsc::Sender<Event>,
    stop: CancellationToken,
) {
    Follower {
        stream,
        filter,
        start,
        first: None,
    }
    .run(tx, stop)
    .await
}

/// A [`follow`] whose first consumer already exists, for a caller that must know at once whether
/// it may read the stream at all.
pub struct Follower {
    stream: Stream,
    filter: Option<String>,
    start: Start,
    /// The consumer made by [`Follower::open`], used by the first round of [`Follower::run`].
    first: Option<PullConsumer>,
}

impl Follower {
    /// Creates the consumer that starts following `stream` (`filter`, `start` as in [`follow`]).
    /// With [`Start::New`], "new" means after what the stream holds now.
    ///
    /// Errors: the consumer cannot be created (the only failure; once open, [`Follower::run`]
    /// rides out everything).
    pub async fn open(
        stream: Stream,
        filter: Option<String>,
        start: Start,
    ) -> Result<Follower, FollowError> {
        let config = consumer_config(filter.as_deref(), deliver_policy(start, None));
        match stream.create_consumer(config).await {
            Ok(consumer) => Ok(Follower {
                stream,
                filter,
                start,
                first: Some(consumer),
            }),
            Err(source) => Err(FollowError::Consumer {
                stream: stream_name(&stream),
                source,
            }),
        }
    }

    /// Forwards messages to `tx` as [`follow`] does, until `stop` is cancelled or the receiver is
    /// dropped.
    pub async fn run(self, tx: mpsc::Sender<Event>, stop: CancellationToken) {
        let Follower {
            stream,
            filter,
            start,
            mut first,
        } = self;
        // The stream sequence up to which everything has been forwarded; `None` until the first
        // consumer exists (for `All` and `New`).
        let mut done: Option<u64> = match start {
            Start::After(seq) => Some(seq),
            Start::All | Start::New => None,
        };
        let mut caught_up = false;
        let mut retry = Duration::from_millis(250);
        loop {
            let consumer = match first.take() {
                Some(consumer) => consumer,
                None => {
                    let config = consumer_config(filter.as_deref(), deliver_policy(start, done));
                    let created = tokio::select! {
                        _ = stop.cancelled() => return,
                        c = stream.create_consumer(config) => c,
                    };
                    match created {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::warn!(stream = %stream_name(&stream), error = %e, "cannot create a consumer to follow the stream; retrying");
                            if sleep_or_stop(retry, &stop).await {
                                return;
                            }
                            retry = (retry * 2).min(Duration::from_secs(5));
                            continue;
                        }
                    }
                }
            };
            retry = Duration::from_millis(250);
            if !follow_one(&stream, consumer, &tx, &mut done, &mut caught_up, &stop).await {
                return;
            }
            if sleep_or_stop(retry, &stop).await {
                return;
            }
        }
    }
}

/// Where a new consumer starts: right after `done` (the sequence up to which everything has
/// been forwarded) once there is one, else where the caller asked.
fn deliver_policy(start: Start, done: Option<u64>) -> DeliverPolicy {
    match (done, start) {
        (Some(seq), _) | (None, Start::After(seq)) => DeliverPolicy::ByStartSequence {
            start_sequence: seq + 1,
        },
        (None, Start::New) => DeliverPolicy::New,
        (None, Start::All) => DeliverPolicy::All,
    }
}

/// An ephemeral reader's consumer: no acks, in memory, one replica, gone [`READER_INACTIVE`]
/// after its last pull.
fn consumer_config(filter: Option<&str>, deliver_policy: DeliverPolicy) -> pull::Config {
    pull::Config {
        filter_subject: filter.unwrap_or_default().to_string(),
        deliver_policy,
        ack_policy: AckPolicy::None,
        inactive_threshold: READER_INACTIVE,
        memory_storage: true,
        num_replicas: 1,
        ..Default::default()
    }
}

/// Reads `consumer` until it breaks (false: stop, or the receiver is gone), then leaves it to
/// lapse ([`READER_INACTIVE`]). `done` advances past every message forwarded.
async fn follow_one(
    stream: &Stream,
    consumer: PullConsumer,
    tx: &mpsc::Sender<Event>,
    done: &mut Option<u64>,
    caught_up: &mut bool,
    stop: &CancellationToken,
) -> bool {
    let info = consumer.cached_info();
    // "New only" starts after whatever the stream held when the consumer was created.
    let mut last = *done.get_or_insert(info.delivered.stream_sequence);
    if !*caught_up && info.num_pending == 0 {
        *caught_up = true;
        if tx.send(Event::CaughtUp).await.is_err() {
            return false;
        }
    }
    let outcome = read(&consumer, tx, &mut last, caught_up, stop).await;
    *done = Some(last);
    match outcome {
        Read::Stop => false,
        Read::Broken(why) => {
            tracing::warn!(stream = %stream_name(stream), error = %why, "stream consumer failed; recreating it");
            true
        }
    }
}

/// Every stored message of `stream` matching `filter` (oldest first), at most `max_bytes` of
/// payload in all (the rest is left out and reported by `true` in the second field).
///
/// A one-shot read for a finished job's log: an ephemeral consumer from the first message, read
/// until the server says nothing is pending. Errors: the server did not answer, or the read took
/// longer than `timeout`.
pub async fn read_stored(
    stream: &Stream,
    filter: &str,
    max_bytes: usize,
    timeout: Duration,
) -> Result<(Vec<Followed>, bool), String> {
    let config = consumer_config(Some(filter), DeliverPolicy::All);
    let work = async {
        let consumer = stream
            .create_consumer(config)
            .await
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        let mut truncated = false;
        if consumer.cached_info().num_pending > 0 {
            let mut messages = consumer
                .stream()
                .heartbeat(HEARTBEAT)
                .expires(PULL_EXPIRES)
                .messages()
                .await
                .map_err(|e| e.to_string())?;
            let mut bytes = 0usize;
            while let Some(next) = messages.next().await {
                let msg = next.map_err(|e| e.to_string())?;
                let info = msg.info().map_err(|e| e.to_string())?;
                let (seq, pending) = (info.stream_sequence, info.pending);
                bytes += msg.payload.len();
                if bytes > max_bytes {
                    truncated = true;
                    break;
                }
                out.push(Followed {
                    seq,
                    subject: msg.subject.to_string(),
                    payload: msg.payload.clone(),
                    pending,
                });
                if pending == 0 {
                    break;
                }
            }
        }
        // The consumer lapses by itself (READER_INACTIVE).
        Ok((out, truncated))
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| format!("reading {filter} took longer than {timeout:?}"))?
}

/// Why [`read`] returned.
enum Read {
    /// Stop requested, or the receiver is gone.
    Stop,
    /// The consumer must be recreated.
    Broken(String),
}

/// Reads one consumer until it fails, advancing `last` past every message forwarded.
async fn read(
    consumer: &PullConsumer,
    tx: &mpsc::Sender<Event>,
    last: &mut u64,
    caught_up: &mut bool,
    stop: &CancellationToken,
) -> Read {
    let messages = consumer
        .stream()
        .heartbeat(HEARTBEAT)
        .expires(PULL_EXPIRES)
        .messages()
        .await;
    let mut messages = match messages {
        Ok(m) => m,
        Err(e) => return Read::Broken(e.to_string()),
    };
    let mut expected = 1u64; // consumer sequences start at 1 on a new consumer
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => return Read::Stop,
            next = messages.next() => next,
        };
        let msg = match next {
            Some(Ok(msg)) => msg,
            Some(Err(e)) => return Read::Broken(e.to_string()),
            None => return Read::Broken("the message stream ended".into()),
        };
        let (seq, pending) = match msg.info() {
            Ok(info) if info.consumer_sequence == expected => (info.stream_sequence, info.pending),
            Ok(info) => {
                return Read::Broken(format!(
                    "gap in the consumer sequence (expected {expected}, got {})",
                    info.consumer_sequence
                ))
            }
            Err(e) => return Read::Broken(format!("message without JetStream metadata: {e}")),
        };
        expected += 1;
        *last = seq;
        let followed = Followed {
            seq,
            subject: msg.subject.to_string(),
            payload: msg.payload.clone(),
            pending,
        };
        if tx.send(Event::Message(followed)).await.is_err() {
            return Read::Stop;
        }
        if !*caught_up && pending == 0 {
            *caught_up = true;
            if tx.send(Event::CaughtUp).await.is_err() {
                return Read::Stop;
            }
        }
    }
}

fn stream_name(stream: &Stream) -> String {
    stream.cached_info().config.name.clone()
}

/// Sleeps, or returns true at once when `stop` is cancelled.
async fn sleep_or_stop(d: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_first_consumer_starts_where_asked() {
        assert_eq!(deliver_policy(Start::All, None), DeliverPolicy::All);
        assert_eq!(deliver_policy(Start::New, None), DeliverPolicy::New);
        assert_eq!(
            deliver_policy(Start::After(41), None),
            DeliverPolicy::ByStartSequence { start_sequence: 42 }
        );
    }

    #[test]
    fn a_recreated_consumer_resumes_after_the_last_message_forwarded() {
        // Whatever the start, once something is done the next consumer neither repeats it nor
        // skips what follows (for `New`, not even when nothing had arrived yet).
        for start in [Start::All, Start::New, Start::After(3)] {
            assert_eq!(
                deliver_policy(start, Some(7)),
                DeliverPolicy::ByStartSequence { start_sequence: 8 },
                "{start:?}"
            );
        }
        assert_eq!(
            deliver_policy(Start::New, Some(0)),
            DeliverPolicy::ByStartSequence { start_sequence: 1 }
        );
    }

    #[test]
    fn consumers_are_ephemeral_and_take_nothing_away() {
        let config = consumer_config(Some("ci.results.>"), DeliverPolicy::New);
        assert_eq!(config.filter_subject, "ci.results.>");
        assert_eq!(config.deliver_policy, DeliverPolicy::New);
        assert_eq!(config.ack_policy, AckPolicy::None);
        assert!(config.durable_name.is_none() && config.memory_storage);
        assert_eq!(config.num_replicas, 1);
        assert_eq!(config.inactive_threshold, READER_INACTIVE);
        assert_eq!(consumer_config(None, DeliverPolicy::All).filter_subject, "");
    }
}
