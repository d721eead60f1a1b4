//! How much work waits for the manager's runners, from the consumers' and buckets' own numbers.
//!
//! Two places hold waiting commits (DESIGN.md, "One commit's life"):
//! - `CI_COMMITS` itself: a dispatcher pulls a commit only when a runner could start it now, so
//!   while every runner is busy the queue stays in the stream, in order, as the shared
//!   `dispatcher` consumer's pending count;
//! - `ci-jobs`: a commit a dispatcher holds but cannot place (no free runner with its labels) is
//!   recorded there in phase `queued`.
//!
//! Only commits whose labels the manager's runners have count: a manager of `linux` runners must
//! not start runners for a `gpu` backlog. A commit's labels are in its message; the stream's
//! pending messages are read once each (by sequence, with "get next message on subject" requests,
//! which disturb no consumer) and remembered, since a stored message never changes.

use std::collections::{BTreeMap, HashMap};

use anyhow::Context;
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::kv;
use async_nats::jetstream::stream::RawMessageErrorKind;
use jetci::connect::Nats;
use jetci::messages::{decode, CommitMsg, JobPhase};
use jetci::protocol::store;
use jetci::scaling::{covers, Demand};
use jetci::streams::Streams;

/// Pending commits read per measurement at most; beyond them the same share is assumed to need
/// the manager's labels. A manager never needs to see more than a few `--max`es ahead.
const SCAN_LIMIT: u64 = 256;

/// The manager's view of the queue.
pub struct Queue {
    /// Labels the manager's runners offer.
    labels: Vec<String>,
    /// `ci-jobs` entries in phase `queued`: key → labels the job needs.
    queued: HashMap<String, Vec<String>>,
    /// Pending commits already read: stream sequence → whether the manager's runners can take it.
    seen: BTreeMap<u64, bool>,
    /// Every commit up to this sequence (from the consumer's delivered one) is in `seen`.
    seen_upto: u64,
    /// Said once that no dispatcher consumer exists yet.
    warned_no_dispatcher: bool,
}

impl Queue {
    pub fn new(labels: Vec<String>) -> Queue {
        Queue {
            labels,
            queued: HashMap::new(),
            seen: BTreeMap::new(),
            seen_upto: 0,
            warned_no_dispatcher: false,
        }
    }

    /// Follows one `ci-jobs` entry (from a bucket watch: latest state, not an event).
    pub fn on_job_entry(&mut self, e: &kv::Entry) {
        match store::from_entry(e) {
            Ok(Some(v)) if v.state.phase == JobPhase::Queued => {
                self.queued.insert(e.key.clone(), v.state.labels);
            }
            _ => {
                self.queued.remove(&e.key);
            }
        }
    }

    /// Measures the work that waits for the manager's labels now.
    ///
    /// Errors: NATS did not answer (the caller skips this round).
    pub async fn measure(&mut self, nats: &Nats, streams: &Streams) -> anyhow::Result<Demand> {
        let consumer = nats.names.dispatcher_consumer();
        let info = match streams.commits.consumer_info(&consumer).await {
            Ok(info) => info,
            Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => {
                // No dispatcher has ever run: nothing can be dispatched, so nothing is pending
                // for runners yet.
                if !self.warned_no_dispatcher {
                    tracing::warn!("no jetci-dispatcher has started yet (no consumer {consumer} on the commits stream); keeping --min runners");
                    self.warned_no_dispatcher = true;
                }
                return Ok(Demand::default());
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read consumer {consumer}"));
            }
        };
        self.warned_no_dispatcher = false;
        let pending = self
            .pending_covered(
                nats,
                streams,
                info.delivered.stream_sequence,
                info.num_pending,
            )
            .await?;
        // A commit is held by a dispatcher only while unacked: never count more queued jobs than
        // that (a `queued` state left behind by a purged stream is not work).
        let waiting = self
            .queued
            .values()
            .filter(|needs| covers(&self.labels, needs))
            .count()
            .min(info.num_ack_pending) as u32;
        Ok(Demand { pending, waiting })
    }

    /// Of the `num_pending` commits after sequence `delivered`, how many the manager's runners
    /// can take.
    async fn pending_covered(
        &mut self,
        nats: &Nats,
        streams: &Streams,
        delivered: u64,
        num_pending: u64,
    ) -> anyhow::Result<u32> {
        let first = delivered + 1;
        // Forget what dispatchers have taken.
        self.seen = self.seen.split_off(&first);
        self.seen_upto = self.seen_upto.max(delivered);
        let want = num_pending.min(SCAN_LIMIT);
        let mut scanned = self.seen.len() as u64;
        while scanned < want {
            let raw = match streams
                .commits
                .get_first_raw_message_by_subject(nats.names.commits_filter(), self.seen_upto + 1)
                .await
            {
                Ok(raw) => raw,
                Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => break,
                Err(e) => return Err(e).context("cannot read the commits stream"),
            };
            // A commit that does not parse is terminated by the dispatcher: not work.
            let covered = decode::<CommitMsg>(&raw.payload)
                .map(|c| covers(&self.labels, &c.labels))
                .unwrap_or(false);
            self.seen.insert(raw.sequence, covered);
            self.seen_upto = raw.sequence;
            scanned += 1;
        }
        let scanned = (self.seen.len() as u64).min(num_pending);
        let covered = (self.seen.values().filter(|c| **c).count() as u64).min(scanned);
        // Beyond the scan, assume the same share.
        let total = covered
            + ((num_pending - scanned) * covered)
                .checked_div(scanned)
                .unwrap_or(0);
        Ok(total.min(u32::MAX as u64) as u32)
    }
}
