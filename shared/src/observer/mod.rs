//! The observer process as a library: step one of the protocol, where work enters jetci.
//! `jetci-observer` parses its flags into a [`Config`] and calls [`run`].
//!
//! The loop: every poll interval, read the branches (fetching first when the repository is a
//! URL), plan what is new since the marks in the `ci-observer` bucket ([`plan`]), and for each new
//! commit, oldest first, publish it to `ci.commits.<repo>`
//! ([`crate::protocol::commit::publish_commit`]), wait for the stream's ack, and only then move
//! the branch's mark ([`marks`], [`poll`]). A failed poll (git error, NATS down) is logged and
//! tried again on the next tick; nothing it did not finish is marked, so a restart or an outage
//! loses no commit and publishes none twice (DESIGN.md, invariants I1 and I4).
//!
//! Between ticks it also listens on `ci.notify.<repo>`: a git hook's `jetci notify` makes it poll
//! at once and answers when that poll has published ([`notify`]). The poll stays the safety net
//! for every notify that is lost.

pub mod commit;
pub mod marks;
pub mod notify;
pub mod plan;
pub mod poll;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use glob::Pattern;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::connect::Nats;
use crate::git::Watched;
use crate::streams::Streams;

use self::marks::Marks;
use self::notify::Notices;
use self::poll::{Observer, Trouble};

/// What an observer watches, and how often.
pub struct Config {
    /// The repository's name: the subject token and key prefix (`--name`).
    pub repo: String,
    /// The repository, opened (a local path, or a mirror of a URL).
    pub watched: Watched,
    /// Which branches to watch (`--branches`).
    pub branches: Pattern,
    /// How long after a poll ends the next one starts, without a notify.
    pub poll_interval: Duration,
}

/// Why the observer could not start, or why one poll stopped early: what it was doing and why,
/// as one line (the sources of the underlying error joined with `: `).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ObserveError(String);

impl ObserveError {
    /// `what` failed because of `why` (and its sources).
    pub fn new(what: impl std::fmt::Display, why: &(dyn std::error::Error + 'static)) -> Self {
        let mut text = format!("{what}: {why}");
        let mut next = why.source();
        while let Some(cause) = next {
            let said = cause.to_string();
            if !text.ends_with(&said) {
                text.push_str(": ");
                text.push_str(&said);
            }
            next = cause.source();
        }
        ObserveError(text.replace('\n', " "))
    }
}

/// Runs an observer until `shutdown`: polls every `poll_interval` after the last poll ended, and
/// at once when notified.
///
/// Errors: the marks cannot be read (or the name belongs to another repository), or the notify
/// subject cannot be subscribed to. A failing poll is not an error: it is logged and retried.
pub async fn run(
    nats: Nats,
    streams: Streams,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), ObserveError> {
    let Config {
        repo,
        watched,
        branches,
        poll_interval,
    } = config;
    let mut marks = Marks::load(streams.marks, &repo, &watched.url).await?;
    info!(
        repo,
        url = watched.url,
        branches = %branches,
        every = %humantime::format_duration(poll_interval),
        marks = marks.heads().len(),
        first_sight = !marks.ever_polled(),
        "observing"
    );
    let observer = Observer {
        repo,
        watched: Arc::new(Mutex::new(watched)),
        branches,
        nats,
        refused: Default::default(),
    };
    let mut notices = Notices::subscribe(&observer.nats, &observer.repo).await?;
    let mut trouble = Trouble::default();
    while !shutdown.is_cancelled() {
        // The notifies heard so far arrived before this poll starts, so it answers them.
        let answering = notices.take();
        let polled = observer.poll(&mut marks, &shutdown).await;
        notices
            .answer(answering, polled.published, &polled.outcome)
            .await;
        trouble.note(polled.outcome, poll_interval);
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(poll_interval) => {}
            () = notices.heard() => {}
        }
    }
    info!("stopped");
    Ok(())
}
