//! Publishing a final result: first writer wins (DESIGN.md, `CI_RESULTS`).
//!
//! A result goes to `ci.results.<repo>.<sha>.<run>` with `Nats-Msg-Id: <repo>.<sha>.<run>` and
//! `expected-last-subject-sequence: 0`, so the stream stores at most one message per run: the
//! first writer wins forever, not only within the duplicate window. A loser hears "duplicate"
//! (nats-server 2.9) or "wrong last sequence" (2.10 and later) and treats both alike as "already
//! published" (JETSTREAM-NOTES 5.2). This is what keeps invariant I1 ("exactly one final result
//! per run") true when a zombie runner, a restarted runner and a dispatcher race.

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;

use crate::connect::Nats;
use crate::messages::{decode, encode, MessageError, ResultMsg};
use crate::subjects::job_id;

/// What happened to a final result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Stored at this stream sequence: it is the verdict.
    Stored(u64),
    /// Another result for the run was there first; this one was not stored.
    AlreadyPublished,
}

/// Publishing failed for a reason other than "already published" (NATS unreachable, stream
/// missing); the caller keeps the result and tries again.
#[derive(Debug, thiserror::Error)]
#[error("cannot publish the result of {job}: {reason}")]
pub struct PublishError {
    pub job: String,
    pub reason: String,
}

/// Publishes `result` as its run's final result, first writer wins.
pub async fn publish_final(nats: &Nats, result: &ResultMsg) -> Result<Published, PublishError> {
    let subject = nats
        .names
        .results_subject(&result.repo, &result.sha, result.run);
    let msg = PublishMessage::build()
        .payload(encode(result))
        .message_id(result.key())
        .expected_last_subject_sequence(0)
        .header("Jetci-Status", result.status.as_str())
        .header("Jetci-Runner", result.runner.as_str());
    let err = |reason: String| PublishError {
        job: result.job_id.clone(),
        reason,
    };
    let ack = nats
        .js
        .send_publish(subject, msg)
        .await
        .map_err(|e| err(e.to_string()))?
        .await;
    match ack {
        Ok(ack) if ack.duplicate => Ok(Published::AlreadyPublished),
        Ok(ack) => Ok(Published::Stored(ack.sequence)),
        Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
            Ok(Published::AlreadyPublished)
        }
        Err(e) => Err(err(e.to_string())),
    }
}

/// Records the result of a superseded attempt under `ci.superseded.<repo>.<sha>.<run>.<attempt>`:
/// kept for the record, never the verdict.
pub async fn publish_superseded(nats: &Nats, result: &ResultMsg) -> Result<(), PublishError> {
    let subject =
        nats.names
            .superseded_subject(&result.repo, &result.sha, result.run, result.attempt);
    let msg = PublishMessage::build()
        .payload(encode(result))
        .message_id(format!(
            "superseded.{}",
            job_id(&result.repo, &result.sha, result.run, result.attempt)
        ));
    let err = |reason: String| PublishError {
        job: result.job_id.clone(),
        reason,
    };
    nats.js
        .send_publish(subject, msg)
        .await
        .map_err(|e| err(e.to_string()))?
        .await
        .map_err(|e| err(e.to_string()))?;
    Ok(())
}

/// The final result of a run, if one is stored.
///
/// Errors: the stored message does not decode (reported, not hidden), or the server did not
/// answer. "No message for that subject" is `Ok(None)`.
pub async fn final_result(
    nats: &Nats,
    results: &async_nats::jetstream::stream::Stream,
    repo: &str,
    sha: &str,
    run: u32,
) -> Result<Option<ResultMsg>, FinalResultError> {
    let subject = nats.names.results_subject(repo, sha, run);
    match results.get_last_raw_message_by_subject(&subject).await {
        Ok(raw) => Ok(Some(decode(&raw.payload)?)),
        Err(e)
            if e.kind()
                == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
        {
            Ok(None)
        }
        Err(e) => Err(FinalResultError::Server(e.to_string())),
    }
}

/// Why [`final_result`] could not answer.
#[derive(Debug, thiserror::Error)]
pub enum FinalResultError {
    #[error("stored result does not decode: {0}")]
    Bad(#[from] MessageError),
    #[error("cannot read results: {0}")]
    Server(String),
}
