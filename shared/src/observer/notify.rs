//! Instant triggers: `ci.notify.<repo>` requests that make the observer poll now.
//!
//! A git `post-receive` hook runs `jetci notify` after a push, which sends a core-NATS request on
//! the repository's notify subject. Core NATS stores nothing, so a notify sent while the observer
//! is down or cut off is simply lost; that costs only latency, because the regular poll finds the
//! same commits, and the marks keep a commit from being published twice however many polls see it
//! (DESIGN.md, I1 and I4). So a notify is a hint: its payload is only logged, and a malformed one
//! still triggers a poll.
//!
//! Two rules make the answer mean something:
//! - A notify is answered after a poll that *started after it arrived*. The hook runs once git has
//!   moved the refs, so such a poll sees the push; one already running may have read git before.
//!   A notify that arrives during a poll therefore waits for the next one.
//! - Notifies heard while waiting are coalesced: a push of ten refs (ten requests) costs one poll,
//!   and polls never overlap, because the observer's one loop runs them.

use crate::connect::Nats;
use crate::messages::{decode, encode, NotifyMsg, NotifyReply, VERSION};
use async_nats::{Message, Subject, Subscriber};
use futures::{FutureExt, StreamExt};

use super::ObserveError;
use tracing::{debug, info, warn};

/// The notify subscription of one repository and the requests waiting for a poll.
pub struct Notices {
    repo: String,
    nats: Nats,
    subscriber: Subscriber,
    /// Set when the subscription ended (the client is closing): stop listening, keep polling.
    closed: bool,
    /// Reply subjects of the notifies heard since the last poll started.
    waiting: Vec<Option<Subject>>,
}

impl Notices {
    /// Subscribes to `ci.notify.<repo>`. Done before the first poll, so no notify sent after the
    /// observer said "observing" goes unanswered.
    pub async fn subscribe(nats: &Nats, repo: &str) -> Result<Notices, ObserveError> {
        let subject = nats.names.notify_subject(repo);
        let subscriber = nats
            .client
            .subscribe(subject.clone())
            .await
            .map_err(|e| ObserveError::new(format!("cannot subscribe to {subject}"), &e))?;
        Ok(Notices {
            repo: repo.to_string(),
            nats: nats.clone(),
            subscriber,
            closed: false,
            waiting: Vec::new(),
        })
    }

    /// Waits for a notify, then takes every other one already queued: the burst gets one poll.
    /// Cancel-safe (the only await is the subscriber's `next`), so it can race the poll timer.
    pub async fn heard(&mut self) {
        if self.closed {
            return std::future::pending().await;
        }
        match self.subscriber.next().await {
            Some(message) => self.hear(message),
            None => {
                warn!(
                    repo = self.repo,
                    "the notify subscription ended; polling on the interval only"
                );
                self.closed = true;
                return std::future::pending().await;
            }
        }
        while let Some(Some(message)) = self.subscriber.next().now_or_never() {
            self.hear(message);
        }
        info!(
            repo = self.repo,
            notifies = self.waiting.len(),
            "notified; polling now"
        );
    }

    fn hear(&mut self, message: Message) {
        match read_notify(&message.payload) {
            Ok(Some(n)) => debug!(
                repo = self.repo,
                git_ref = n.git_ref.as_deref().unwrap_or(""),
                old = n.old.as_deref().unwrap_or(""),
                new = n.new.as_deref().unwrap_or(""),
                "notify"
            ),
            Ok(None) => debug!(repo = self.repo, "notify without details"),
            Err(why) => warn!(
                repo = self.repo,
                subject = %message.subject,
                "a notify that does not parse ({why}); polling anyway"
            ),
        }
        self.waiting.push(message.reply);
    }

    /// The notifies the poll about to start will answer: all heard so far.
    pub fn take(&mut self) -> Vec<Option<Subject>> {
        std::mem::take(&mut self.waiting)
    }

    /// Answers `waiting` with what the poll did. A reply that cannot be sent is only logged: the
    /// requester times out and says so, and its commits are published anyway.
    pub async fn answer(
        &self,
        waiting: Vec<Option<Subject>>,
        published: u32,
        outcome: &Result<(), ObserveError>,
    ) {
        if waiting.is_empty() {
            return;
        }
        let reply = NotifyReply {
            v: VERSION,
            repo: self.repo.clone(),
            published,
            error: outcome.as_ref().err().map(|e| e.to_string()),
        };
        let payload = encode(&reply);
        for subject in waiting.into_iter().flatten() {
            if let Err(e) = self.nats.client.publish(subject, payload.clone()).await {
                debug!(repo = self.repo, "cannot answer a notify: {e}");
            }
        }
    }
}

/// Reads a notify's payload: `None` when it is empty (`nats req ci.notify.app ''` is a notify
/// too), the message when it parses, why not otherwise.
pub fn read_notify(payload: &[u8]) -> Result<Option<NotifyMsg>, String> {
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    decode::<NotifyMsg>(payload)
        .map(Some)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifies_parse_leniently() {
        assert_eq!(read_notify(b""), Ok(None));
        assert_eq!(read_notify(b" \n"), Ok(None));
        let n = read_notify(br#"{"v":1,"repo":"app","ref":"refs/heads/main"}"#)
            .unwrap()
            .unwrap();
        assert_eq!(n.repo, "app");
        assert_eq!(n.git_ref.as_deref(), Some("refs/heads/main"));
        assert!(read_notify(b"{not json").is_err());
        assert!(read_notify(br#"{"v":2,"repo":"app"}"#).is_err());
    }
}
