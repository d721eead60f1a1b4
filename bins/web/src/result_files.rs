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

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
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
    // `decode` checked that the sha is 40 hex digits, so it is a safe file name.
    let path: PathBuf = dir.join(&r.sha);
    let text = result_file(r);
    if let Ok(existing) = std::fs::read_to_string(&path) {
        if existing == text || !replaces(&existing, &r.repo, r.run) {
            return Ok(());
        }
    }
    let context = || format!("cannot write {}", path.display());
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .with_context(context)?;
    tmp.write_all(text.as_bytes()).with_context(context)?;
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .with_context(context)?;
    }
    tmp.persist(&path)
        .map_err(|e| e.error)
        .with_context(context)?;
    Ok(())
}

/// The content of a `test_results/<sha>` file (the same as bins/jetci's `result_file`).
pub fn result_file(r: &ResultMsg) -> String {
    let exit = match (r.exit_code, r.signal) {
        (_, Some(sig)) => format!("signal {sig}"),
        (Some(code), None) => format!("exit code {code}"),
        (None, None) => "-".to_string(),
    };
    let mut s = String::new();
    let _ = writeln!(s, "status: {}", r.status);
    let _ = writeln!(s, "repo: {}", r.repo);
    let _ = writeln!(s, "branch: {}", clean(&r.branch, 200));
    let _ = writeln!(s, "sha: {}", r.sha);
    let _ = writeln!(s, "run: {}", r.run);
    let _ = writeln!(s, "attempt: {}", r.attempt);
    let runner = if r.runner.is_empty() { "-" } else { &r.runner };
    let _ = writeln!(s, "runner: {}", clean(runner, 64));
    let _ = writeln!(
        s,
        "duration: {} ({} ms)",
        crate::pages::duration_ms(r.duration_ms),
        r.duration_ms
    );
    let _ = writeln!(s, "exit: {exit}");
    let reason = r.reason.as_deref().map(first_line).unwrap_or("");
    let _ = writeln!(
        s,
        "reason: {}",
        if reason.is_empty() {
            "-".to_string()
        } else {
            clean(reason, 400)
        }
    );
    let _ = writeln!(s, "log: {} ({} bytes)", r.log_subject, r.log_bytes);
    s.push('\n');
    s.push_str(&r.output_tail);
    if !r.output_tail.is_empty() && !r.output_tail.ends_with('\n') {
        s.push('\n');
    }
    s
}

/// Reads `repo` and `run` back from the head of a result file.
fn file_repo_and_run(text: &str) -> (Option<&str>, Option<u32>) {
    let mut repo = None;
    let mut run = None;
    for line in text.lines().take_while(|l| !l.is_empty()) {
        if let Some(v) = line.strip_prefix("repo: ") {
            repo = Some(v);
        } else if let Some(v) = line.strip_prefix("run: ") {
            run = v.trim().parse().ok();
        }
    }
    (repo, run)
}

/// True when a result of `repo`/`run` should replace the file whose text is `existing`.
fn replaces(existing: &str, repo: &str, run: u32) -> bool {
    match file_repo_and_run(existing) {
        (Some(r), Some(old)) if r == repo => run >= old,
        _ => true,
    }
}

fn first_line(s: &str) -> &str {
    s.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
}

/// Replaces control characters with `?` and cuts to `max` characters (marking the cut with `…`).
fn clean(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .take(max)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if s.chars().count() > max {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::tests::result;
    use jetci::messages::Status;

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
