//! The tasks that keep the view current: one follows `CI_RESULTS`, two watch the `ci-jobs` and
//! `ci-runners` buckets. Each change is applied to the view and announced on the broadcast
//! channel that the live pages listen to (`/events`).
//!
//! Following starts at the stream's newest `--max-results` messages rather than its first: the
//! view keeps only the newest ones anyway (eviction is by stream sequence), so reading older ones
//! would only be thrown away. A message that does not decode is logged with its subject and
//! sequence and skipped (invariant I5); a NATS restart is ridden out by `jetci::follow` (results)
//! and `jetci::streams::watch_bucket` (buckets), which resume where they were.

use std::sync::{Arc, RwLock};

use jetci::connect::Nats;
use jetci::follow::{self, Event, Start};
use jetci::messages::{decode, RunnerInfo};
use jetci::protocol::store;
use jetci::protocol::verdict::result_on;
use jetci::shutdown::CancellationToken;
use jetci::streams::Streams;
use serde::Serialize;
use tokio::sync::{broadcast, mpsc};

use crate::report::Reporter;
use crate::view::View;

/// A change of the view, as sent to browsers on `/events` (JSON).
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    /// A new final (or superseded) result.
    Result {
        repo: String,
        branch: String,
        sha: String,
        run: u32,
        status: String,
    },
    /// The result of one job of a pipeline run (its commit page redraws the run's graph).
    JobResult {
        repo: String,
        sha: String,
        run: u32,
        job: String,
        status: String,
    },
    /// A job changed (queued, assigned, running, heartbeat, final).
    Job {
        repo: String,
        sha: String,
        phase: String,
    },
    /// A runner came, went or heartbeat.
    Runners,
}

/// The view and the channel its changes are announced on.
#[derive(Clone)]
pub struct Shared {
    pub view: Arc<RwLock<View>>,
    pub changes: broadcast::Sender<Change>,
}

impl Shared {
    /// A view of at most `max_results` results holding at most `max_bytes` of text.
    pub fn new(max_results: usize, max_bytes: usize) -> Shared {
        Shared {
            view: Arc::new(RwLock::new(View::bounded(max_results, max_bytes))),
            changes: broadcast::channel(1024).0,
        }
    }

    /// Runs `f` on the view under the write lock; a lock poisoned by a panic elsewhere is taken
    /// over (the view holds no invariant a half-done update could break badly).
    pub fn write<T>(&self, f: impl FnOnce(&mut View) -> T) -> T {
        let mut guard = self.view.write().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    /// Runs `f` on the view under the read lock.
    pub fn read<T>(&self, f: impl FnOnce(&View) -> T) -> T {
        let guard = self.view.read().unwrap_or_else(|e| e.into_inner());
        f(&guard)
    }

    fn announce(&self, change: Change) {
        let _ = self.changes.send(change); // nobody listening is fine
    }
}

/// Starts the three feeding tasks; they end when `stop` is cancelled. Every new final result
/// also goes to `reporter` (result files, alerts).
pub async fn start(
    nats: &Nats,
    streams: &Streams,
    shared: &Shared,
    max_results: usize,
    reporter: Reporter,
    stop: &CancellationToken,
) {
    let start = start_of(streams, max_results).await;
    tracing::info!(?start, "reading results");
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(follow::follow(
        streams.results.clone(),
        None,
        start,
        tx,
        stop.clone(),
    ));
    tokio::spawn(apply_results(nats.clone(), shared.clone(), rx, reporter));

    let jobs = jetci::streams::watch_bucket(streams.job_states.clone(), "ci-jobs");
    tokio::spawn(apply_jobs(shared.clone(), jobs, stop.clone()));
    let runners = jetci::streams::watch_bucket(streams.runners.clone(), "ci-runners");
    tokio::spawn(apply_runners(shared.clone(), runners, stop.clone()));
}

/// Where to start reading `CI_RESULTS`: just before its newest `max_results` messages.
async fn start_of(streams: &Streams, max_results: usize) -> Start {
    let mut results = streams.results.clone();
    match results.info().await {
        Ok(info) => {
            let first = info.state.first_sequence.max(1);
            let from = info
                .state
                .last_sequence
                .saturating_sub(max_results as u64)
                .saturating_add(1)
                .max(first);
            Start::After(from - 1)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the results stream's state; reading it all");
            Start::All
        }
    }
}

async fn apply_results(
    nats: Nats,
    shared: Shared,
    mut rx: mpsc::Receiver<Event>,
    mut reporter: Reporter,
) {
    let finals = format!("{}.results.", nats.names.prefix());
    let superseded = format!("{}.superseded.", nats.names.prefix());
    while let Some(event) = rx.recv().await {
        let msg = match event {
            Event::CaughtUp => {
                let n = shared.write(|v| {
                    v.caught_up = true;
                    reporter.caught_up(v);
                    v.len()
                });
                tracing::info!(results = n, "view rebuilt from the results stream");
                continue;
            }
            Event::Message(m) => m,
        };
        let is_superseded = if msg.subject.starts_with(&finals) {
            false
        } else if msg.subject.starts_with(&superseded) {
            true
        } else {
            shared.write(|v| v.last_seq = v.last_seq.max(msg.seq));
            continue;
        };
        // The subject is the truth: a payload that names another run is not that run's result.
        let result = match result_on(&nats.names, &msg.subject, &msg.payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(subject = %msg.subject, seq = msg.seq, error = %e, "skipped a result that does not decode or does not match its subject");
                shared.write(|v| {
                    v.skipped += 1;
                    v.last_seq = v.last_seq.max(msg.seq);
                });
                continue;
            }
        };
        let change = match &result.job {
            // A pipeline's job: for its commit page only; result files, alerts and the result
            // metric count runs (the run's result lists its jobs).
            Some(job) => Change::JobResult {
                repo: result.repo.clone(),
                sha: result.sha.clone(),
                run: result.run,
                job: job.clone(),
                status: result.status.to_string(),
            },
            None => Change::Result {
                repo: result.repo.clone(),
                branch: result.branch.clone(),
                sha: result.sha.clone(),
                run: result.run,
                status: result.status.to_string(),
            },
        };
        // The branch's newest verdict is read under the same lock, so it is the state this very
        // result left the branch in.
        let added = shared.write(|v| {
            let stored = v.add_result(msg.seq, is_superseded, result)?;
            let head = v.branch_head(&stored.result.repo, &stored.result.branch);
            Some((stored, head))
        });
        if let Some((stored, head)) = added {
            shared.announce(change);
            if stored.is_run_result() {
                let status = stored.result.status.as_str();
                metrics::counter!(jetci::metrics::names::RESULTS, "status" => status).increment(1);
                reporter.result(stored, head).await;
            }
        }
    }
}

async fn apply_jobs(
    shared: Shared,
    mut rx: mpsc::Receiver<async_nats::jetstream::kv::Entry>,
    stop: CancellationToken,
) {
    loop {
        let entry = tokio::select! {
            _ = stop.cancelled() => return,
            e = rx.recv() => match e { Some(e) => e, None => return },
        };
        match store::from_entry(&entry) {
            Ok(Some(versioned)) => {
                let state = versioned.state;
                let change = Change::Job {
                    repo: state.repo.clone(),
                    sha: state.sha.clone(),
                    phase: serde_json::to_value(state.phase)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default(),
                };
                if shared.write(|v| v.set_job(&entry.key, Some(state), entry.created)) {
                    shared.announce(change);
                }
            }
            Ok(None) => {
                shared.write(|v| v.set_job(&entry.key, None, entry.created));
            }
            Err(e) => {
                tracing::warn!(bucket = %entry.bucket, key = %entry.key, revision = entry.revision, error = %e, "skipped a job state that does not decode");
            }
        }
    }
}

async fn apply_runners(
    shared: Shared,
    mut rx: mpsc::Receiver<async_nats::jetstream::kv::Entry>,
    stop: CancellationToken,
) {
    use async_nats::jetstream::kv::Operation;
    loop {
        let entry = tokio::select! {
            _ = stop.cancelled() => return,
            e = rx.recv() => match e { Some(e) => e, None => return },
        };
        if entry.operation != Operation::Put {
            shared.write(|v| v.set_runner(&entry.key, None, entry.created));
            shared.announce(Change::Runners);
            continue;
        }
        match decode::<RunnerInfo>(&entry.value) {
            Ok(info) => {
                shared.write(|v| v.set_runner(&entry.key, Some(info), entry.created));
                shared.announce(Change::Runners);
            }
            Err(e) => {
                tracing::warn!(bucket = %entry.bucket, key = %entry.key, revision = entry.revision, error = %e, "skipped a runner entry that does not decode");
            }
        }
    }
}
