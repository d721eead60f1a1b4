//! Step one of the protocol: a commit to test enters `CI_COMMITS` (DESIGN.md, "One commit's
//! life", 1 and 2). The observer publishes every new commit this way, `jetci rerun` publishes a
//! new run of an old one, and the benchmark fills a backlog; a dispatcher accepts what it pulls
//! with [`accept`].

use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::context::PublishError;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::publish::PublishAck;

use crate::connect::Nats;
use crate::messages::{decode, encode, CommitMsg, MessageError};
use crate::subjects::Names;

/// Publishes `commit` on `ci.commits.<repo>` and waits for the stream's acknowledgement.
///
/// The `Nats-Msg-Id` `<repo>.<sha>.<run>` makes a re-publish (an observer that crashed between
/// the ack and its mark, a rerun asked for twice) a duplicate the stream drops within its
/// duplicate window; the ack then says `duplicate`, which is as good as stored for the observer
/// and "already queued" for a rerun. Errors: async-nats' [`PublishError`] (no stream, timeout,
/// payload over the server's max_payload).
pub async fn publish_commit(nats: &Nats, commit: &CommitMsg) -> Result<PublishAck, PublishError> {
    send_commit(nats, commit).await?.await
}

/// [`publish_commit`] without waiting for the ack: returns once the message is sent, with the
/// ack to await, so a publisher of many commits (the benchmark's backlog) keeps several in
/// flight and in order.
pub async fn send_commit(
    nats: &Nats,
    commit: &CommitMsg,
) -> Result<PublishAckFuture, PublishError> {
    let publish = PublishMessage::build()
        .payload(encode(commit))
        .message_id(commit.key());
    nats.js
        .send_publish(nats.names.commits_subject(&commit.repo), publish)
        .await
}

/// Why a delivered commit message is refused (and terminated: redelivering it cannot help).
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error(transparent)]
    Malformed(#[from] MessageError),
    /// A commit of one repository on another's subject: whoever may publish on one repository's
    /// subject must not make another repository's commit run.
    #[error("a commit of repository {repo} published on {subject}")]
    WrongSubject { repo: String, subject: String },
}

/// Decodes a commit message delivered on `subject` and checks that it belongs there.
pub fn accept(names: &Names, subject: &str, payload: &[u8]) -> Result<CommitMsg, Refused> {
    let commit: CommitMsg = decode(payload)?;
    if names.commits_subject(&commit.repo) != subject {
        return Err(Refused::WrongSubject {
            repo: commit.repo,
            subject: subject.to_string(),
        });
    }
    Ok(commit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{now, VERSION};

    #[test]
    fn a_commit_is_accepted_only_on_its_own_repository_subject() {
        let names = Names::default();
        let commit = CommitMsg {
            v: VERSION,
            repo: "app".into(),
            url: "/srv/app".into(),
            branch: "main".into(),
            sha: "b".repeat(40),
            run: 1,
            labels: vec![],
            author: String::new(),
            summary: String::new(),
            published_at: now(),
            jobs: vec![],
            fail_fast: false,
        };
        let bytes = encode(&commit);
        assert_eq!(accept(&names, "ci.commits.app", &bytes).unwrap(), commit);
        assert!(matches!(
            accept(&names, "ci.commits.other", &bytes),
            Err(Refused::WrongSubject { .. })
        ));
        assert!(matches!(
            accept(&names, "ci.commits.app", b"{"),
            Err(Refused::Malformed(_))
        ));
    }
}
