//! Streaming a job's output to `CI_LOGS` while it runs, in bounded memory.
//!
//! The command's reader hands chunks to [`LogSink::write`], which never blocks the test: chunks
//! go through a small bounded channel to a publisher task, and when NATS is slow or away the
//! overflow is counted and dropped with a marker in the log, so neither the test nor the runner's
//! memory waits on the network. The stored log is capped per job (`--log-cap`) with a
//! truncation marker. Chunks are raw bytes: output that is not UTF-8 is carried as it is.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use jetci::connect::Nats;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Chunks waiting to be published, at most; with [`MAX_CHUNK`] this bounds a job's log memory.
const QUEUE: usize = 32;
/// The largest log message, in bytes.
const MAX_CHUNK: usize = 64 * 1024;

/// The writing end, owned by the job.
pub struct LogSink {
    tx: Option<mpsc::Sender<Bytes>>,
    cap: u64,
    stored: u64,
    dropped: u64,
    truncated: bool,
    task: JoinHandle<()>,
}

impl LogSink {
    /// Starts publishing to `subject`, storing at most `cap` bytes of output.
    pub fn start(nats: &Nats, subject: String, cap: u64) -> LogSink {
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(publish(nats.clone(), subject, rx));
        LogSink {
            tx: Some(tx),
            cap,
            stored: 0,
            dropped: 0,
            truncated: false,
            task,
        }
    }

    /// Hands one piece of output over; never waits.
    pub fn write(&mut self, bytes: &[u8]) {
        if self.truncated {
            return;
        }
        let room = self.cap.saturating_sub(self.stored) as usize;
        if bytes.len() > room {
            self.send(&bytes[..room]);
            let marker = format!(
                "\n[jetci: log truncated at {} bytes (--log-cap); the rest is not stored]\n",
                self.cap
            );
            self.truncated = true;
            self.force(marker.into());
            return;
        }
        self.send(bytes);
    }

    fn send(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if self.dropped > 0 {
            let marker = format!(
                "\n[jetci: {} bytes of output lost: NATS was too slow or away]\n",
                self.dropped
            );
            if self.try_send(Bytes::from(marker)) {
                self.dropped = 0;
            }
        }
        if self.try_send(Bytes::copy_from_slice(bytes)) {
            self.stored += bytes.len() as u64;
        } else {
            self.dropped += bytes.len() as u64;
        }
    }

    fn try_send(&self, chunk: Bytes) -> bool {
        self.tx
            .as_ref()
            .is_some_and(|tx| tx.try_send(chunk).is_ok())
    }

    /// Sends a marker, waiting briefly for room.
    fn force(&mut self, chunk: Bytes) {
        if let Some(tx) = &self.tx {
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), tx.send(chunk)).await;
            });
        }
    }

    /// Closes the log and waits (at most `within`) until what was queued is published, so the
    /// log is complete before the result says so.
    pub async fn finish(mut self, within: Duration) {
        self.tx.take();
        let _ = tokio::time::timeout(within, &mut self.task).await;
    }
}

/// The publisher task: coalesces queued chunks up to [`MAX_CHUNK`] and publishes them in order,
/// each with its byte offset in a `Jetci-Offset` header.
async fn publish(nats: Nats, subject: String, mut rx: mpsc::Receiver<Bytes>) {
    let mut offset = 0u64;
    while let Some(first) = rx.recv().await {
        let mut chunk = BytesMut::from(&first[..]);
        while chunk.len() < MAX_CHUNK {
            match rx.try_recv() {
                Ok(more) => chunk.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        let len = chunk.len() as u64;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Jetci-Offset", offset.to_string().as_str());
        let sent = async {
            nats.js
                .publish_with_headers(subject.clone(), headers, chunk.freeze())
                .await?
                .await
                .map_err(async_nats::Error::from)
        };
        if let Err(e) = tokio::time::timeout(Duration::from_secs(5), sent)
            .await
            .map_err(|_| "timed out".to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
        {
            tracing::warn!(%subject, offset, error = %e, "cannot store a log chunk; it is lost");
        }
        offset += len;
    }
}
