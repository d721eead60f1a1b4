//! Following a limits stream (`CI_RESULTS`, `CI_LOGS`) in order, once per message, across NATS
//! restarts.
//!
//! This is the follow loop of `jetci tail` (bins/jetci/src/results.rs) made generic, for readers
//! that keep a view of a stream (jetci-web) or stream one job's log to a browser. It reads with an
//! ephemeral pull consumer (no acks, in memory, one replica) and remembers the stream sequence of
//! the last message it forwarded. When anything goes wrong (a missed heartbeat, a pull error, the
//! consumer lost in a NATS restart, a gap in the consumer sequence) it drops the consumer and
//! creates a new one that starts right after that sequence, so each message is forwarded once
//! and none is skipped. async-nats' ordered consumer would restart from the *first* message when
//! it is recreated before delivering anything (0.51 maps sequence 0 to `DeliverPolicy::All`).
//! Both streams have limits retention, so an ephemeral consumer takes nothing away from anyone
//! (JETSTREAM-NOTES 4). Errors are logged and the loop goes on (JETSTREAM-NOTES 0.5): a reader
//! of results should survive anything short of being asked to stop.

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::stream::Stream;
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
/// How long the server keeps the consumer of a reader that went away without deleting it.
const INACTIVE: Duration = Duration::from_secs(60);

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
    // The stream sequence up to which everything has been forwarded; `None` until the first
    // consumer exists (for `All` and `New`).
    let mut done: Option<u64> = match start {
        Start::After(seq) => Some(seq),
        Start::All | Start::New => None,
    };
    let mut caught_up = false;
    let mut retry = Duration::from_millis(250);
    loop {
        let deliver_policy = match done {
            Some(seq) => DeliverPolicy::ByStartSequence {
                start_sequence: seq + 1,
            },
            None if start == Start::New => DeliverPolicy::New,
            None => DeliverPolicy::All,
        };
        let config = pull::Config {
            filter_subject: filter.clone().unwrap_or_default(),
            deliver_policy,
            ack_policy: AckPolicy::None,
            inactive_threshold: INACTIVE,
            memory_storage: true,
            num_replicas: 1,
            ..Default::default()
        };
        let created = tokio::select! {
            _ = stop.cancelled() => return,
            c = stream.create_consumer(config) => c,
        };
        let consumer = match created {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(stream = %stream_name(&stream), error = %e, "cannot create a consumer to follow the stream; retrying");
                if sleep_or_stop(retry, &stop).await {
                    return;
                }
                retry = (retry * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        retry = Duration::from_millis(250);
        let info = consumer.cached_info();
        // "New only" starts after whatever the stream held when the consumer was created.
        let mut last = *done.get_or_insert(info.delivered.stream_sequence);
        if !caught_up && info.num_pending == 0 {
            caught_up = true;
            if tx.send(Event::CaughtUp).await.is_err() {
                return;
            }
        }
        let outcome = read(&consumer, &tx, &mut last, &mut caught_up, &stop).await;
        done = Some(last);
        // Tidy up (the server would drop it after INACTIVE anyway); bounded, so a stop while NATS
        // is away still returns at once.
        let name = consumer.cached_info().name.clone();
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.delete_consumer(&name)).await;
        match outcome {
            Read::Stop => return,
            Read::Broken(why) => {
                tracing::warn!(stream = %stream_name(&stream), error = %why, "stream consumer failed; recreating it");
            }
        }
        if sleep_or_stop(retry, &stop).await {
            return;
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
    let config = pull::Config {
        filter_subject: filter.to_string(),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::None,
        inactive_threshold: INACTIVE,
        memory_storage: true,
        num_replicas: 1,
        ..Default::default()
    };
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
        let name = consumer.cached_info().name.clone();
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.delete_consumer(&name)).await;
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
