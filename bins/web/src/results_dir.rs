//! `--results-dir DIR`: one `DIR/<sha>` file per commit, as the original design's dispatcher wrote
//! `test_results/<commit>`.
//!
//! The content is exactly what `jetci up` and `jetci tail --write-dir` write (bins/jetci's
//! `results.rs`): `key: value` lines, a blank line, then the output tail. The latest run of a
//! commit wins, so the history read at start never hides a newer rerun, and a file whose content
//! would not change is not written again (a restart rewrites nothing). Each file is written to a
//! temporary file in the same directory and renamed over the old one, so a reader never sees half
//! a file.
//!
//! Writing happens on a thread of its own fed by a bounded channel: a slow disk holds up the
//! results feed only when the channel is full, and never an async worker thread.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use jetci::messages::ResultMsg;
use tokio::sync::mpsc;

use crate::view::Stored;

/// Results waiting to be written.
const QUEUE: usize = 1024;

/// The sending end of the writer thread.
#[derive(Clone)]
pub struct ResultFiles {
    tx: mpsc::Sender<Arc<Stored>>,
}

impl ResultFiles {
    /// Creates `dir` if needed and starts the writer thread (it ends when every sender is gone).
    ///
    /// Errors: the directory cannot be created.
    pub fn start(dir: &Path) -> anyhow::Result<ResultFiles> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create results directory {}", dir.display()))?;
        let (tx, mut rx) = mpsc::channel::<Arc<Stored>>(QUEUE);
        let dir = dir.to_path_buf();
        std::thread::Builder::new()
            .name("result-files".into())
            .spawn(move || {
                while let Some(stored) = rx.blocking_recv() {
                    if let Err(e) = write(&dir, &stored.result) {
                        tracing::warn!(error = %format!("{e:#}"), "cannot write a result file");
                    }
                }
            })
            .context("cannot start the result-file writer")?;
        Ok(ResultFiles { tx })
    }

    /// Queues the file of a final result (waits while the queue is full).
    pub async fn write(&self, stored: Arc<Stored>) {
        let _ = self.tx.send(stored).await; // the thread only ends with the process
    }
}

/// Writes `dir/<sha>` for `r` unless a newer run's file is there or nothing would change.
fn write(dir: &Path, r: &ResultMsg) -> anyhow::Result<()> {
    jetci::result_file::write(dir, r)
        .with_context(|| format!("cannot write {}", dir.join(&r.sha).display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::tests::result;
    use jetci::messages::Status;
    use jetci::result_file::render as result_file;

    #[test]
    fn content_matches_jetci_up() {
        let mut r = result("app", "main", 1, 1, 1, Status::Passed);
        r.output_tail = "Ran 3 tests\n\nOK".into();
        let sha = &r.sha;
        assert_eq!(
            result_file(&r),
            format!(
                "status: passed\nrepo: app\nbranch: main\nsha: {sha}\nrun: 1\nattempt: 1\n\
                 runner: r1\nduration: 1.2s (1200 ms)\nexit: exit code 0\nreason: -\n\
                 log: ci.logs.app.{sha}.1.1 (2 bytes)\n\nRan 3 tests\n\nOK\n"
            )
        );
    }

    #[test]
    fn files_are_atomic_and_the_latest_run_wins() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = result("app", "main", 1, 2, 1, Status::Passed);
        write(dir.path(), &r).unwrap();
        r.run = 1;
        r.status = Status::Failed;
        write(dir.path(), &r).unwrap();
        let text = std::fs::read_to_string(dir.path().join(&r.sha)).unwrap();
        assert!(text.starts_with("status: passed\n"), "{text}");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temporary files left: {names:?}");
    }

    #[tokio::test]
    async fn the_writer_thread_writes() {
        let dir = tempfile::tempdir().unwrap();
        let files = ResultFiles::start(&dir.path().join("test_results")).unwrap();
        let r = result("app", "main", 2, 1, 1, Status::Failed);
        let path = dir.path().join("test_results").join(&r.sha);
        files
            .write(Arc::new(Stored {
                seq: 1,
                superseded: false,
                result: r,
            }))
            .await;
        for _ in 0..100 {
            if path.exists() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("status: failed\n"), "{text}");
    }
}
