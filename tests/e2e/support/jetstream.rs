//! What jetci stored in JetStream, read the way a test needs it: every message of a stream
//! (without a consumer, so nothing under test is disturbed), the final results as they arrive,
//! and job states in the `ci-jobs` bucket.
//!
//! Every subject, stream and bucket name comes from the library ([`names`]), never retyped: a
//! test checks jetci's names by using them.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::message::StreamMessage;
use jetci::git::BranchName;
use jetci::observer::marks::mark_key;
use jetci::subjects::Names;
use serde_json::Value;

use super::system::REPO;
use super::waiting::wait_until_async;

/// The names of a default installation (prefix `ci`), which is what every test runs.
pub fn names() -> Names {
    Names::default()
}

/// Every stream jetci makes, buckets included (a bucket `b` is the stream `KV_b`).
pub fn all_streams(names: &Names) -> Vec<String> {
    vec![
        names.commits_stream(),
        names.jobs_stream(),
        names.results_stream(),
        names.logs_stream(),
        format!("KV_{}", names.observer_bucket()),
        format!("KV_{}", names.jobs_bucket()),
        format!("KV_{}", names.runners_bucket()),
    ]
}

/// Connects to `url` and returns a JetStream context; panics if the server cannot be reached.
pub async fn js(url: &str) -> jetstream::Context {
    let client = async_nats::connect(url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    jetstream::new(client)
}

/// Waits until `CI_RESULTS` holds at least `count` final results (`ci.results.>`) and returns
/// all of them, parsed as JSON, in stream order.
///
/// Reads what is *stored*, not what arrives, so a result published before the call counts, and
/// the caller can assert on the exact number (I1: exactly one result per run). See
/// [`StoredResults`]. Panics after `bound`, listing what it did see.
pub async fn wait_results(url: &str, count: usize, bound: Duration) -> Vec<Value> {
    let mut results = StoredResults::new(url);
    let what = format!("{count} result(s) on {} at {url}", results.filter);
    wait_until_async(&what, bound, async || {
        let error = results.look().await.err();
        if results.len() >= count {
            Ok(results.values())
        } else {
            Err(listing(&results.seen, error.as_deref().unwrap_or("none")))
        }
    })
    .await
}

/// The final results stored in `CI_RESULTS` (`ci.results.>`), read a look at a time: each
/// [`StoredResults::look`] reads only what was stored since the last one (the stream keeps every
/// result for far longer than a test). For a wait of its own, such as one that also watches the
/// processes under test; [`wait_results`] is the usual one.
pub struct StoredResults {
    url: String,
    stream: String,
    filter: String,
    client: Option<async_nats::Client>,
    seen: Vec<StreamMessage>,
}

impl StoredResults {
    /// Nothing read yet; the first [`StoredResults::look`] connects.
    pub fn new(url: &str) -> StoredResults {
        let names = names();
        StoredResults {
            url: url.to_string(),
            stream: names.results_stream(),
            filter: names.results_filter(),
            client: None,
            seen: Vec::new(),
        }
    }

    /// Reads the results stored since the last look. The stream may not exist yet (nothing
    /// new), and the server may be down for a while (I4 tests restart it): `Err` says what
    /// failed, for the caller to look again.
    pub async fn look(&mut self) -> Result<(), String> {
        if self.client.is_none() {
            let connected = async_nats::ConnectOptions::new()
                .connection_timeout(Duration::from_secs(2))
                .connect(&self.url)
                .await
                .map_err(|e| format!("cannot connect to {}: {e}", self.url))?;
            self.client = Some(connected);
        }
        let context = jetstream::new(self.client.clone().expect("connected above"));
        let from = self.seen.last().map_or(1, |m| m.sequence + 1);
        let new = read_stream(&context, &self.stream, &self.filter, from).await?;
        self.seen.extend(new);
        Ok(())
    }

    /// How many results were read so far.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// When the server stored the last result read (its clock), if any.
    pub fn last_stored_at(&self) -> Option<time::OffsetDateTime> {
        self.seen.last().map(|m| m.time)
    }

    /// The results read so far, parsed as JSON, in stream order; panics on one that is not JSON.
    pub fn values(&self) -> Vec<Value> {
        self.seen.iter().map(|m| parse_json(m, true)).collect()
    }

    /// How many results were read, and the last `n` of them one a line (`#SEQ SUBJECT: BODY`),
    /// for a wait's "last saw".
    pub fn summary(&self, n: usize) -> String {
        let from = self.seen.len().saturating_sub(n);
        let lines: Vec<String> = self.seen[from..].iter().map(line).collect();
        format!(
            "{} result(s), the last {}:\n{}",
            self.seen.len(),
            lines.len(),
            lines.join("\n")
        )
    }
}

/// What a wait for results saw: the messages, one a line, and the last error.
fn listing(seen: &[StreamMessage], error: &str) -> String {
    let lines: Vec<String> = seen.iter().map(line).collect();
    format!(
        "{} message(s):\n{}\nlast error: {error}",
        seen.len(),
        lines.join("\n")
    )
}

/// One stored message on a line: `  #SEQ SUBJECT: BODY`.
fn line(m: &StreamMessage) -> String {
    let body = String::from_utf8_lossy(&m.payload);
    format!("  #{} {}: {body}", m.sequence, m.subject)
}

/// What stream `stream` holds right now on subjects matching `filter`, in stream order, as
/// `(subject, body)`. A body that is not JSON is returned as a JSON string of its (lossy UTF-8)
/// text, so tests can still see it. A missing stream gives an empty list. Panics on other errors.
pub async fn stream_messages(url: &str, stream: &str, filter: &str) -> Vec<(String, Value)> {
    stream_raw_messages(url, stream, filter)
        .await
        .iter()
        .map(|m| (m.subject.to_string(), parse_json(m, false)))
        .collect()
}

/// Like [`stream_messages`] but with the whole stored messages (sequence, headers such as
/// `Nats-Msg-Id`, raw payload).
pub async fn stream_raw_messages(url: &str, stream: &str, filter: &str) -> Vec<StreamMessage> {
    let context = js(url).await;
    read_stream(&context, stream, filter, 1)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Waits until `CI_COMMITS` is empty: every commit was acked (its run is final).
pub async fn wait_commits_acked(url: &str, bound: Duration) {
    let stream = names().commits_stream();
    wait_until_async(
        &format!("every commit in {stream} acked"),
        bound,
        async || {
            let left = stream_messages(url, &stream, ">").await;
            left.is_empty()
                .then_some(())
                .ok_or_else(|| format!("{left:#?}"))
        },
    )
    .await
}

/// Waits until the state of job `key` ([`jetci::subjects::JobRef::key`]) in the `ci-jobs`
/// bucket satisfies `done`, and returns that state (`{"phase": ..., "runner": ...,
/// "attempt": ...}`).
///
/// Some states last only a moment (a short job is `running` for less than a second); the wait
/// looks often enough to see them. The bucket and the key may not exist yet: both count as "not
/// yet". Panics after `bound`, saying that the job never reached `what`, with the last state
/// seen.
pub async fn wait_job(
    url: &str,
    key: &str,
    what: &str,
    bound: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let context = js(url).await;
    let bucket = names().jobs_bucket();
    let mut last = Value::Null;
    wait_until_async(&format!("job {key} to be {what}"), bound, async || {
        if let Ok(kv) = context.get_key_value(&bucket).await {
            if let Ok(Some(value)) = kv.get(key).await {
                last = serde_json::from_slice(&value).expect("job state is JSON");
                if done(&last) {
                    return Ok(last.clone());
                }
            }
        }
        Err(last.clone())
    })
    .await
}

/// Waits until job `key` is in `phase` (`queued`, `assigned`, `running` or `final`) and returns
/// the id of the runner of its current attempt (empty when there is none, as while queued). See
/// [`wait_job`].
pub async fn wait_job_phase(url: &str, key: &str, phase: &str, bound: Duration) -> String {
    let state = wait_job(url, key, phase, bound, |v| v["phase"] == phase).await;
    state["runner"].as_str().unwrap_or_default().to_string()
}

/// Reads the stored messages of `stream` matching `filter` from sequence `from` on, oldest
/// first, with "get next message on subject from sequence" requests (wildcards allowed). This
/// needs no consumer, so it cannot disturb the consumers under test, and it works on work-queue
/// streams too. A stream that does not exist yet reads as empty. `Err` says what failed (a
/// leader election, a server going away), for the caller to look again.
pub async fn read_stream(
    context: &jetstream::Context,
    stream: &str,
    filter: &str,
    from: u64,
) -> Result<Vec<StreamMessage>, String> {
    /// JetStream's "stream not found" error code.
    const STREAM_NOT_FOUND: u64 = 10059;

    let handle = match context.get_stream(stream).await {
        Ok(handle) => handle,
        Err(e) => {
            if let jetstream::context::GetStreamErrorKind::JetStream(js_err) = e.kind() {
                if js_err.error_code().0 == STREAM_NOT_FOUND {
                    return Ok(Vec::new());
                }
            }
            return Err(format!("cannot get stream {stream}: {e}"));
        }
    };
    let mut messages = Vec::new();
    let mut next_seq = from;
    loop {
        match handle
            .get_first_raw_message_by_subject(filter, next_seq)
            .await
        {
            Ok(message) => {
                next_seq = message.sequence + 1;
                messages.push(message);
            }
            Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {
                return Ok(messages);
            }
            Err(e) => {
                return Err(format!(
                    "cannot read stream {stream} ({filter}) from sequence {next_seq}: {e}"
                ))
            }
        }
    }
}

/// The JSON body of a stored message; when `strict`, a body that is not JSON panics, otherwise it
/// becomes a JSON string.
fn parse_json(message: &StreamMessage, strict: bool) -> Value {
    match serde_json::from_slice(&message.payload) {
        Ok(value) => value,
        Err(e) if strict => panic!(
            "message #{} on {} is not JSON ({e}): {}",
            message.sequence,
            message.subject,
            String::from_utf8_lossy(&message.payload)
        ),
        Err(_) => Value::String(String::from_utf8_lossy(&message.payload).into_owned()),
    }
}

/// The `ci-observer` mark of branch `branch` (raw bytes) of [`REPO`], if any: `{"sha": ...}`.
pub async fn mark(url: &str, branch: &[u8]) -> Option<Value> {
    let kv = js(url)
        .await
        .get_key_value(names().observer_bucket())
        .await
        .ok()?;
    let key = mark_key(REPO, &BranchName::from_bytes(branch));
    let value = kv.get(&key).await.ok()??;
    serde_json::from_slice(&value).ok()
}

/// Waits until the mark of `branch` names `sha`: the observer published it and got its ack.
pub async fn wait_mark(url: &str, branch: &[u8], sha: &str, bound: Duration) {
    let what = format!(
        "the mark of branch {:?} at {sha}",
        String::from_utf8_lossy(branch)
    );
    wait_until_async(&what, bound, async || match mark(url, branch).await {
        Some(m) if m["sha"] == sha => Ok(()),
        other => Err(format!("{other:?}")),
    })
    .await;
}
