//! Streaming a job's output to `CI_LOGS` while it runs, in bounded memory.
//!
//! The command's reader hands chunks to [`LogSink::write`], which puts them on a small bounded
//! channel to a publisher task. While the publisher keeps up, a full channel makes `write` wait,
//! and with it the reader and, through the pipe, the test: the first `--log-cap` bytes are stored
//! whole, however fast the test prints. When NATS is away and the channel stays full for
//! [`STALL`], output is dropped instead (counted, with a marker in the log) so a network outage
//! never stalls the test. Either way the runner's memory stays bounded. Chunks are raw bytes:
//! output that is not UTF-8 is carried as it is.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use jetci::connect::Nats;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Chunks waiting to be published, at most; with the reader's 32 KiB reads this bounds a job's
/// log memory to about 1 MiB.
const QUEUE: usize = 32;
/// The largest log message, in bytes.
const MAX_CHUNK: usize = 64 * 1024;
/// How long `write` waits for room before it decides NATS is away and starts dropping.
const STALL: Duration = Duration::from_secs(2);

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

    /// Hands one piece of output over, waiting for room while the publisher keeps up.
    pub async fn write(&mut self, bytes: &[u8]) {
        if self.truncated {
            return;
        }
        let room = self.cap.saturating_sub(self.stored) as usize;
        if bytes.len() > room {
            self.send(&bytes[..room]).await;
            self.truncated = true;
            let marker = format!(
                "\n[jetci: log truncated at {} bytes (--log-cap); the rest is not stored]\n",
                self.cap
            );
            self.send_marker(marker).await;
            return;
        }
        self.send(bytes).await;
    }

    async fn send(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let Some(tx) = &self.tx else { return };
        if self.dropped > 0 {
            // Dropping since NATS stalled: resume only once there is room again.
            let marker = format!(
                "\n[jetci: {} bytes of output lost: NATS was away]\n",
                self.dropped
            );
            if tx.try_send(Bytes::from(marker)).is_err() {
                self.dropped += bytes.len() as u64;
                return;
            }
            self.dropped = 0;
        }
        match tx.send_timeout(Bytes::copy_from_slice(bytes), STALL).await {
            Ok(()) => self.stored += bytes.len() as u64,
            Err(_) => {
                tracing::warn!("log publishing stalled; dropping output until NATS keeps up");
                self.dropped += bytes.len() as u64;
            }
        }
    }

    async fn send_marker(&mut self, marker: String) {
        if let Some(tx) = &self.tx {
            let _ = tx.send_timeout(Bytes::from(marker), STALL).await;
        }
    }

    /// Closes the log and waits (at most `within`) until what was queued is published, so the
    /// log is complete before the result says so; but not while NATS is away: a result never
    /// waits on its log's chunks through an outage (each would wait for an ack that cannot
    /// come). The chunks left are still published, in order, by the publisher task, once NATS
    /// is back.
    pub async fn finish(mut self, nats: &Nats, within: Duration) {
        self.tx.take();
        let deadline = tokio::time::Instant::now() + within;
        let connected =
            || nats.client.connection_state() == async_nats::connection::State::Connected;
        while connected() {
            let step = tokio::time::sleep_until(
                deadline.min(tokio::time::Instant::now() + CONNECTION_CHECK),
            );
            tokio::select! {
                _ = &mut self.task => return,
                _ = step => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return;
            }
        }
        tracing::warn!("NATS is away: the result goes ahead of its log's last chunks");
    }
}

/// How often [`LogSink::finish`] looks at the connection while it waits.
const CONNECTION_CHECK: Duration = Duration::from_millis(100);

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
