//! The verdict: a run's one final result, first writer wins (DESIGN.md, `CI_RESULTS`), and
//! finishing a run without a runner (given up, or cancelled while on no runner), which the
//! dispatcher and `jetci cancel` share.
//!
//! A result goes to `ci.results.<repo>.<sha>.<run>` with `Nats-Msg-Id: <repo>.<sha>.<run>` and
//! `expected-last-subject-sequence: 0`, so the stream stores at most one message per run: the
//! first writer wins forever, not only within the duplicate window. A loser hears "duplicate"
//! (nats-server 2.9) or "wrong last sequence" (2.10 and later) and treats both alike as "already
//! published" (JETSTREAM-NOTES 5.2). This is what keeps invariant I1 ("exactly one final result
//! per run") true when a zombie runner, a restarted runner and a dispatcher race.

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::kv;
use async_nats::jetstream::message::PublishMessage;

use super::store::{self, StateError};
use crate::connect::Nats;
use crate::limits::{clip, clip_start};
use crate::messages::{
    decode, encode, now, CommitMsg, JobMsg, JobState, MessageError, ResultMsg, Status, VERSION,
};
use crate::subjects::{JobRef, Names};

/// What happened to a final result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Stored at this stream sequence: it is the verdict.
    Stored(u64),
    /// Another result for the run was there first; this one was not stored.
    AlreadyPublished,
}

/// Publishing failed for a reason other than "already published": NATS unreachable or the
/// stream missing (the caller keeps the result and tries again), or the message too large for
/// the server (`too_large`: trying again cannot help, [`ResultMsg::unstorable`] can).
#[derive(Debug, thiserror::Error)]
#[error("cannot publish the result of {job}: {reason}")]
pub struct PublishError {
    pub job: String,
    pub reason: String,
    pub too_large: bool,
}

impl PublishError {
    fn new(result: &ResultMsg, error: &async_nats::jetstream::context::PublishError) -> Self {
        PublishError {
            job: result.job_id.clone(),
            reason: error.to_string(),
            too_large: error.kind() == PublishErrorKind::MaxPayloadExceeded
                // nats-server's 10054, a stream's max_msg_size.
                || error.to_string().contains("message size exceeds maximum"),
        }
    }
}

/// Publishes `result` as its run's final result, first writer wins. A result larger than
/// [`Nats::message_limit`] is clipped first ([`ResultMsg::fitted`]).
pub async fn publish_final(nats: &Nats, result: &ResultMsg) -> Result<Published, PublishError> {
    let fitted = result.fitted(nats.message_limit());
    let result = fitted.as_ref().unwrap_or(result);
    let job = result.job_ref();
    let subject = nats.names.job_results_subject(&job);
    let msg = PublishMessage::build()
        .payload(encode(result))
        .message_id(job.key())
        .expected_last_subject_sequence(0)
        .header("Jetci-Status", result.status.as_str())
        .header("Jetci-Runner", result.runner.as_str());
    let ack = nats
        .js
        .send_publish(subject, msg)
        .await
        .map_err(|e| PublishError::new(result, &e))?
        .await;
    match ack {
        Ok(ack) if ack.duplicate => Ok(Published::AlreadyPublished),
        Ok(ack) => Ok(Published::Stored(ack.sequence)),
        Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
            Ok(Published::AlreadyPublished)
        }
        Err(e) if refused_per_subject(&e.to_string()) => Ok(Published::AlreadyPublished),
        Err(e) => Err(PublishError::new(result, &e)),
    }
}

/// Whether a publish error is the server refusing a second message on a subject of a stream
/// with one message per subject and discard-new per subject (nats-server's error 10077,
/// "maximum messages per subject exceeded"; `CI_RESULTS`, [`crate::streams`]).
fn refused_per_subject(error: &str) -> bool {
    error.contains("maximum messages per subject exceeded")
}

/// Decodes a message read from `subject` of `CI_RESULTS` and checks that the payload names the
/// run the subject names: `ci.results.<repo>.<sha>.<run>` for a final result,
/// `ci.superseded.<repo>.<sha>.<run>.<attempt>` for a superseded one. The subject is the truth:
/// whoever may publish on one run's subject must not make another run's verdict (every reader,
/// the dispatcher, jetci-web and `jetci tail`, goes through this).
///
/// Errors: the payload does not decode ([`MessageError`]), or it names another run or attempt
/// than its subject ([`MessageError::Invalid`]).
pub fn result_on(names: &Names, subject: &str, payload: &[u8]) -> Result<ResultMsg, MessageError> {
    let result: ResultMsg = decode(payload)?;
    let job = result.job_ref();
    let expected = [
        names.job_results_subject(&job),
        names.superseded_subject(&job, result.attempt),
    ];
    if !expected.iter().any(|e| e == subject) {
        return Err(MessageError::Invalid(format!(
            "a result of {job} attempt {} on subject {subject}",
            result.attempt
        )));
    }
    if job.job.is_some() && !result.jobs.is_empty() {
        return Err(MessageError::Invalid(format!(
            "a result of job {job} that lists jobs"
        )));
    }
    Ok(result)
}

/// Records the result of a superseded attempt of `job` under
/// `ci.superseded.<repo>.<sha>.<run>.<attempt>`: kept for the record, never the verdict.
pub async fn publish_superseded(
    nats: &Nats,
    job: &JobRef,
    result: &ResultMsg,
) -> Result<(), PublishError> {
    let fitted = result.fitted(nats.message_limit());
    let result = fitted.as_ref().unwrap_or(result);
    let subject = nats.names.superseded_subject(job, result.attempt);
    let msg = PublishMessage::build()
        .payload(encode(result))
        .message_id(format!("superseded.{}", job.attempt_id(result.attempt)));
    nats.js
        .send_publish(subject, msg)
        .await
        .map_err(|e| PublishError::new(result, &e))?
        .await
        .map_err(|e| PublishError::new(result, &e))?;
    Ok(())
}

/// The final result of `job` (of a run's only job: the run's result), if one is stored.
///
/// Errors: the stored message does not decode (reported, not hidden), or the server did not
/// answer. "No message for that subject" is `Ok(None)`.
pub async fn final_result(
    nats: &Nats,
    results: &async_nats::jetstream::stream::Stream,
    job: &JobRef,
) -> Result<Option<ResultMsg>, FinalResultError> {
    let subject = nats.names.job_results_subject(job);
    match results.get_last_raw_message_by_subject(&subject).await {
        Ok(raw) => Ok(Some(result_on(&nats.names, &subject, &raw.payload)?)),
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

/// What [`finish_without_runner`] did.
#[derive(Debug)]
pub struct Finished {
    /// Whether the result given is the verdict, or another was there first.
    pub published: Published,
    /// The `final` state's write (compare-and-set on the revision given). A conflict means
    /// someone moved the job since it was read (a dispatcher assigned it, a runner claimed it).
    pub state: Result<u64, StateError>,
}

/// Gives a run its final result without running anything (a dispatcher giving up after lost
/// runners, a cancel of a job on no runner): the result first, first writer wins, then `final`
/// into `store` (compare-and-set on `revision`). In that order a crash in between leaves a
/// result and never a closed run without one (I1).
///
/// `state` is the job's state to finish (as read, or [`JobState::queued`] when there was none).
/// When another result was there first, the state is finished with *that* result's status and
/// reason (read back; ours when it cannot be read): a run closed without a `final` state would
/// leave its job `running` on a lost runner in every dispatcher's count of busy slots.
///
/// Errors: the result could not be published (NATS unreachable); nothing was written.
pub async fn finish_without_runner(
    nats: &Nats,
    store: &kv::Store,
    result: &ResultMsg,
    state: JobState,
    revision: Option<u64>,
) -> Result<Finished, PublishError> {
    let published = publish_final(nats, result).await?;
    let (status, reason) = match published {
        Published::Stored(_) => (result.status, result.reason.clone()),
        Published::AlreadyPublished => {
            let results = nats.js.get_stream(nats.names.results_stream()).await;
            let stored = match results {
                Ok(results) => final_result(nats, &results, &result.job_ref())
                    .await
                    .ok()
                    .flatten(),
                Err(_) => None,
            };
            match stored {
                Some(verdict) => (verdict.status, verdict.reason),
                None => (result.status, result.reason.clone()),
            }
        }
    };
    let done = state.finish(status, reason);
    let state = store::write(store, &done.job_ref().key(), &done, revision).await;
    Ok(Finished { published, state })
}

/// How a result is clipped to fit a message, from gentle to drastic: the most characters of
/// each text field taken from the commit or the test (reason, branch, author, summary, URL),
/// the most bytes of the output's tail, and the most failing tests named.
const FITS: [(usize, usize, usize); 2] = [(2000, 4096, 100), (100, 0, 0)];

impl ResultMsg {
    /// This result clipped to at most `max_bytes` encoded, or `None` when it fits already. Each
    /// clipped text says it was (`… [N bytes in all]`); the status, the counts and the ids stay.
    /// A result that cannot be made that small is returned as small as it gets (publishing it
    /// then fails with `too_large`).
    pub fn fitted(&self, max_bytes: usize) -> Option<ResultMsg> {
        if encode(self).len() <= max_bytes {
            return None;
        }
        let mut fitted = self.clone();
        for (chars, tail, failures) in FITS {
            fitted.reason = fitted.reason.map(|r| clip(&r, chars));
            fitted.branch = clip(&fitted.branch, chars);
            fitted.author = clip(&fitted.author, chars);
            fitted.summary = clip(&fitted.summary, chars);
            fitted.url = clip(&fitted.url, chars);
            fitted.output_tail = clip_start(&fitted.output_tail, tail);
            if let Some(tests) = &mut fitted.tests {
                tests.failures.truncate(failures);
                for name in &mut tests.failures {
                    *name = clip(name, chars);
                }
            }
            if encode(&fitted).len() <= max_bytes {
                break;
            }
        }
        Some(fitted)
    }

    /// A small `error` result of the same attempt in place of this one, which the server
    /// refuses (`why`): what the test did is lost, but the run gets a verdict instead of a
    /// result tried again forever.
    pub fn unstorable(&self, why: &str) -> ResultMsg {
        let reason = format!(
            "the attempt's {} result could not be stored: {why}",
            self.status
        );
        ResultMsg {
            status: Status::Error,
            exit_code: None,
            signal: None,
            reason: Some(clip(&reason, 300)),
            output_tail: String::new(),
            tests: None,
            branch: clip(&self.branch, 100),
            author: clip(&self.author, 100),
            summary: clip(&self.summary, 100),
            url: clip(&self.url, 300),
            ..self.clone()
        }
    }

    /// The result of attempt `job` on `runner` before anything ran: status `error`, no reason,
    /// no output, the current time as start and finish. The runner fills it in as the attempt
    /// goes on.
    pub fn for_attempt(names: &Names, job: &JobMsg, runner: &str) -> ResultMsg {
        let at = now();
        ResultMsg {
            v: VERSION,
            repo: job.repo.clone(),
            url: job.url.clone(),
            branch: job.branch.clone(),
            sha: job.sha.clone(),
            run: job.run,
            job_id: job.attempt_id(),
            attempt: job.attempt,
            runner: runner.to_string(),
            status: Status::Error,
            exit_code: None,
            signal: None,
            reason: None,
            started_at: at,
            finished_at: at,
            duration_ms: 0,
            output_tail: String::new(),
            log_subject: names.logs_subject(&job.job_ref(), job.attempt),
            log_bytes: 0,
            commit_seq: job.commit_seq,
            author: job.author.clone(),
            summary: job.summary.clone(),
            tests: None,
            job: job.job.clone(),
            job_name: job.job_name.clone(),
            jobs: vec![],
            fail_fast: false,
        }
    }

    /// A final result given without running the command (cancelled before it started, or given
    /// up after lost runners): no runner, no output, zero duration.
    pub fn without_run(
        names: &Names,
        commit: &CommitMsg,
        job: &JobRef,
        commit_seq: u64,
        attempt: u32,
        status: Status,
        reason: String,
    ) -> ResultMsg {
        let at = now();
        ResultMsg {
            v: VERSION,
            repo: commit.repo.clone(),
            url: commit.url.clone(),
            branch: commit.branch.clone(),
            sha: commit.sha.clone(),
            run: commit.run,
            job_id: job.attempt_id(attempt),
            attempt,
            runner: String::new(),
            status,
            exit_code: None,
            signal: None,
            reason: Some(reason),
            started_at: at,
            finished_at: at,
            duration_ms: 0,
            output_tail: String::new(),
            log_subject: names.logs_subject(job, attempt),
            log_bytes: 0,
            commit_seq,
            author: commit.author.clone(),
            summary: commit.summary.clone(),
            tests: None,
            job: job.job.clone(),
            job_name: job.job.as_deref().and_then(|t| commit.job_name(t)),
            jobs: vec![],
            fail_fast: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::TestCounts;

    fn huge() -> ResultMsg {
        let commit = crate::protocol::job::tests::commit();
        let job = commit.only_job();
        let mut r = ResultMsg::without_run(
            &Names::default(),
            &commit,
            &job,
            1,
            1,
            Status::Failed,
            format!("cannot start `sh -c {}`", "\"".repeat(700_000)),
        );
        r.branch = "b".repeat(300_000);
        r.output_tail = "o".repeat(4096);
        r.tests = Some(TestCounts {
            tests: 5000,
            failed: 5000,
            failures: vec!["t".repeat(300); 5000],
            ..Default::default()
        });
        r
    }

    #[test]
    fn a_result_is_clipped_to_fit_and_says_so() {
        let small = crate::protocol::job::tests::commit();
        let ok = ResultMsg::without_run(
            &Names::default(),
            &small,
            &small.only_job(),
            1,
            1,
            Status::Passed,
            "fine".into(),
        );
        assert_eq!(
            ok.fitted(64 * 1024),
            None,
            "a result that fits is left alone"
        );

        let big = huge();
        let fitted = big.fitted(64 * 1024).expect("clipped");
        let bytes = encode(&fitted);
        assert!(bytes.len() <= 64 * 1024, "{}", bytes.len());
        assert_eq!(fitted.status, Status::Failed);
        assert_eq!(fitted.tests.as_ref().map(|t| t.failed), Some(5000));
        let reason = fitted.reason.as_deref().unwrap_or_default();
        assert!(reason.starts_with("cannot start `sh -c \"\"\""), "{reason}");
        assert!(reason.ends_with(" bytes in all]"), "{reason}");
        assert!(fitted.branch.ends_with("[300000 bytes in all]"));
        // Decodes as every reader decodes it.
        let back: ResultMsg = crate::messages::decode(&bytes).unwrap();
        assert_eq!(back, fitted);

        // A tiny limit gets the drastic cut.
        let tiny = big.fitted(2000).expect("clipped");
        assert!(encode(&tiny).len() <= 2000, "{}", encode(&tiny).len());
    }

    #[test]
    fn an_unstorable_result_becomes_a_small_error() {
        let small = huge().unstorable("max payload size exceeded");
        assert_eq!(small.status, Status::Error);
        assert!(encode(&small).len() < 4096, "{}", encode(&small).len());
        let reason = small.reason.unwrap_or_default();
        assert!(
            reason.contains("failed result could not be stored: max payload"),
            "{reason}"
        );
        assert_eq!(small.job_id, huge().job_id);
    }
}
