//! Server-sent events: `/events` announces every change of the view (so a page updates within a
//! second of a result), `/events/log/…` streams one running job's output.
//!
//! Each log event carries its `CI_LOGS` stream sequence as the SSE id; a browser that reconnects
//! sends it back as `Last-Event-ID` and the stream resumes right after it, so output is neither
//! lost nor repeated. Log text travels as a JSON string: SSE cannot carry a carriage return in
//! `data`, and JSON also keeps any byte of the output inert until the script puts it in a text
//! node.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{stream, Stream, StreamExt};
use jetci::follow::{self, Start};
use jetci::subjects::JobRef;
use tokio::sync::{broadcast, mpsc};

use crate::server::{job_ref, App};

const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Live log streams (`/events/log/...`) open at once: each holds a consumer on `CI_LOGS`, so
/// anyone reaching the page could otherwise pile them up. Past it: 503, try again.
pub const MAX_LOG_FOLLOWERS: usize = 64;

/// `GET /events`: one `change` event (JSON, see `feed::Change`) per change of the view; a
/// `lagged` event when this client fell behind (the page should refresh).
pub async fn changes(State(app): State<App>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let rx = app.shared.changes.subscribe();
    let events = stream::unfold(rx, |mut rx| async move {
        let data = match rx.recv().await {
            Ok(change) => serde_json::to_string(&change).unwrap_or_default(),
            Err(broadcast::error::RecvError::Lagged(_)) => r#"{"kind":"lagged"}"#.to_string(),
            Err(broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok(Event::default().event("change").data(data)), rx))
    });
    let stop = app.stop.clone();
    Sse::new(events.take_until(stop.cancelled_owned()))
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
}

/// `GET /events/log/{repo}/{sha}/{run}/{attempt}`: the job's output from the start (or after
/// `Last-Event-ID`), live, as `log` events.
pub async fn log(
    State(app): State<App>,
    Path((repo, sha, run, attempt)): Path<(String, String, u32, u32)>,
    headers: HeaderMap,
) -> Response {
    match job_ref(&repo, &sha, run, None, attempt) {
        Some(job) => follow_log(app, &job, attempt, &headers),
        None => (StatusCode::BAD_REQUEST, "bad job name\n").into_response(),
    }
}

/// `GET /events/log/{repo}/{sha}/{run}/{job}/{attempt}`: the same for a pipeline's job.
pub async fn job_log(
    State(app): State<App>,
    Path((repo, sha, run, job, attempt)): Path<(String, String, u32, String, u32)>,
    headers: HeaderMap,
) -> Response {
    match job_ref(&repo, &sha, run, Some(&job), attempt) {
        Some(job) => follow_log(app, &job, attempt, &headers),
        None => (StatusCode::BAD_REQUEST, "bad job name\n").into_response(),
    }
}

fn follow_log(app: App, job: &JobRef, attempt: u32, headers: &HeaderMap) -> Response {
    // A log may be followed before its job starts (its output then streams from the start), so
    // a name is not checked against the view; the number of followers is bounded instead.
    let Ok(permit) = app.log_followers.clone().try_acquire_owned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("too many live logs open ({MAX_LOG_FOLLOWERS}); try again later\n"),
        )
            .into_response();
    };
    let subject = app.nats.names.logs_subject(job, attempt);
    let start = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Start::After)
        .unwrap_or(Start::All);
    let (tx, rx) = mpsc::channel(64);
    // The follower ends when this response's stream is dropped (the guard cancels it) or at
    // shutdown.
    let token = app.stop.child_token();
    tokio::spawn(follow::follow(
        app.logs.clone(),
        Some(subject),
        start,
        tx,
        token.clone(),
    ));
    let guard = (token.drop_guard(), permit);
    let events = stream::unfold((rx, guard), |(mut rx, guard)| async move {
        loop {
            match rx.recv().await? {
                follow::Event::CaughtUp => continue,
                follow::Event::Message(m) => {
                    let text = String::from_utf8_lossy(&m.payload);
                    let data = serde_json::to_string(&text).unwrap_or_default();
                    let event = Event::default()
                        .event("log")
                        .id(m.seq.to_string())
                        .data(data);
                    return Some((Ok::<_, Infallible>(event), (rx, guard)));
                }
            }
        }
    });
    let stop = app.stop.clone();
    Sse::new(events.take_until(stop.cancelled_owned()))
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}
