//! Following `CI_RESULTS`: the one-line format, the `test_results/<sha>` files and the printing
//! side of the follow that `jetci tail` and `jetci up` share.
//!
//! Reading the stream is `jetci::follow`'s resumable loop, the one jetci-web uses: each result
//! is handled once and none is skipped across NATS restarts, and "new only" never replays the
//! stream's history. Only the first consumer must succeed (no stream, no permission: `jetci
//! tail` says so and exits); later failures are logged and retried. A message that does not
//! decode is reported with its subject and skipped, never fatal (DESIGN.md, invariant I5).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use async_nats::jetstream::stream::Stream;
use jetci::connect::Nats;
use jetci::follow::{Event, Followed, Follower, Start};
use jetci::messages::ResultMsg;
use jetci::protocol::verdict::result_on;
pub use jetci::result_file::format_duration;
use jetci::result_file::{clean, first_line};
use jetci::shutdown::CancellationToken;
use jetci::subjects::Names;
use tokio::sync::mpsc;

/// What to follow and what to do with each result.
#[derive(Clone, Debug)]
pub struct FollowOptions {
    /// Where to start: `All`, `New` (the default of `jetci tail`), or `After` a sequence (`jetci
    /// up` takes the stream's last sequence before it starts any process, so not even the fastest
    /// result is missed).
    pub start: Start,
    /// Print the raw JSON of each result instead of the one-line summary.
    pub json: bool,
    /// Also write `<dir>/<sha>` for each result.
    pub write_dir: Option<PathBuf>,
}

/// How many followed results may wait for the terminal.
const BACKLOG: usize = 64;

/// Prints (and optionally writes) every result on `CI_RESULTS` until `stop` is cancelled or
/// stdout is closed.
///
/// Errors: only when the first consumer cannot be created (no permission, no stream); later
/// failures are logged and retried, because a tail should survive a NATS restart.
pub async fn follow(
    nats: &Nats,
    results: &Stream,
    opts: &FollowOptions,
    stop: &CancellationToken,
) -> Result<()> {
    let files = match &opts.write_dir {
        Some(dir) => Some(ResultFiles::new(dir)?),
        None => None,
    };
    let follower = Follower::open(
        results.clone(),
        Some(nats.names.results_filter()),
        opts.start,
    )
    .await?;
    let (tx, mut rx) = mpsc::channel(BACKLOG);
    // Cancelled by the printer when stdout is gone (`jetci tail | head`), so the follower does not
    // wait for one more result to notice.
    let follow_stop = stop.child_token();
    let printer = async {
        while let Some(event) = rx.recv().await {
            if let Event::Message(msg) = event {
                if !show(&nats.names, &msg, opts, files.as_ref()) {
                    break;
                }
            }
        }
        follow_stop.cancel();
    };
    tokio::join!(follower.run(tx, follow_stop.clone()), printer);
    Ok(())
}

/// Handles one message; false when stdout is closed. A message that is not a valid result of
/// the run its subject names is skipped with a warning ([`result_on`]: the subject is the truth).
fn show(names: &Names, msg: &Followed, opts: &FollowOptions, files: Option<&ResultFiles>) -> bool {
    let result = match result_on(names, &msg.subject, &msg.payload) {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "jetci: warning: skipped a message on {} (stream sequence {}) that is not a valid \
                 result: {}",
                msg.subject,
                msg.seq,
                one_line(&e.to_string())
            );
            return true;
        }
    };
    if let Some(files) = files {
        if let Err(e) = files.write(&result) {
            eprintln!("jetci: warning: {}", one_line(&format!("{e:#}")));
        }
    }
    let line = if opts.json {
        json_line(&msg.payload)
    } else {
        result_line(&result)
    };
    match writeln!(std::io::stdout(), "{line}") {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => false,
        Err(e) => {
            eprintln!("jetci: warning: cannot write to stdout: {e}");
            true
        }
    }
}

/// The payload as one line: as published (jetci publishes compact JSON), or re-serialized when
/// someone published it pretty-printed.
fn json_line(payload: &[u8]) -> String {
    if !payload.contains(&b'\n') {
        if let Ok(s) = std::str::from_utf8(payload) {
            return s.to_string();
        }
    }
    serde_json::from_slice::<serde_json::Value>(payload)
        .map(|v| v.to_string())
        .unwrap_or_else(|_| String::from_utf8_lossy(payload).replace('\n', " "))
}

/// One result as one line:
/// `passed  myrepo  main  1a2b3c4d  run 1  attempt 1  runner r1  1.2s  "first line of summary"`.
///
/// A pipeline's job result also names its job; a pipeline run's result lists its jobs below, one
/// per line. A result that did not pass also shows its exit code or signal and its reason. Free text from
/// the message (branch, runner, summary, reason) is cleaned of control characters so a hostile
/// commit message cannot drive the terminal.
pub fn result_line(r: &ResultMsg) -> String {
    let mut line = format!(
        "{}  {}  {}  {}  run {}  attempt {}  runner {}  {}",
        r.status,
        r.repo,
        clean(&r.branch, 80),
        short_sha(&r.sha),
        r.run,
        r.attempt,
        if r.runner.is_empty() {
            "-".to_string()
        } else {
            clean(&r.runner, 64)
        },
        format_duration(r.duration_ms),
    );
    if let Some(name) = &r.job_name {
        let _ = write!(line, "  job {:?}", clean(name, 80));
    }
    if r.status != jetci::messages::Status::Passed {
        if let Some(how) = exit_text(r) {
            let _ = write!(line, "  {how}");
        }
        if let Some(reason) = r.reason.as_deref().filter(|s| !s.trim().is_empty()) {
            let _ = write!(line, "  reason {:?}", clean(first_line(reason), 120));
        }
    }
    let _ = write!(line, "  {:?}", clean(first_line(&r.summary), 72));
    for j in &r.jobs {
        let allowed = if j.allow_failure { " (allowed)" } else { "" };
        let _ = write!(
            line,
            "\n    {}{allowed}  {}  attempt {}  runner {}  {}",
            j.status,
            clean(&j.name, 80),
            j.attempt,
            if j.runner.is_empty() {
                "-".to_string()
            } else {
                clean(&j.runner, 64)
            },
            format_duration(j.duration_ms),
        );
        if let Some(reason) = j
            .reason
            .as_deref()
            .filter(|_| j.status != jetci::messages::Status::Passed)
        {
            let _ = write!(line, "  reason {:?}", clean(first_line(reason), 120));
        }
    }
    line
}

/// `exit 1`, `signal 9`, or nothing when the command never ran.
fn exit_text(r: &ResultMsg) -> Option<String> {
    match (r.exit_code, r.signal) {
        (_, Some(sig)) => Some(format!("signal {sig}")),
        (Some(code), None) => Some(format!("exit {code}")),
        (None, None) => None,
    }
}

/// The first 8 hex digits, as `git log --oneline` shows a commit (give or take).
fn short_sha(sha: &str) -> &str {
    sha.get(..8).unwrap_or(sha)
}

/// Any text on one line: runs of whitespace, newlines included, become one space.
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Writes `<dir>/<sha>` files.
pub struct ResultFiles {
    dir: PathBuf,
}

impl ResultFiles {
    /// Creates `dir` if needed.
    ///
    /// Errors: the directory cannot be created.
    pub fn new(dir: &Path) -> Result<ResultFiles> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create results directory {}", dir.display()))?;
        Ok(ResultFiles {
            dir: dir.to_path_buf(),
        })
    }

    /// Writes the file for one result atomically (a temporary file in the same directory,
    /// renamed over the old one), so a reader never sees half a file.
    ///
    /// Errors: the file cannot be written.
    pub fn write(&self, r: &ResultMsg) -> Result<()> {
        jetci::result_file::write(&self.dir, r)
            .with_context(|| format!("cannot write {}", self.dir.join(&r.sha).display()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jetci::messages::{Status, VERSION};
    use jetci::result_file::render as result_file;
    use time::macros::datetime;

    fn result() -> ResultMsg {
        let sha = "1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d".to_string();
        ResultMsg {
            v: VERSION,
            repo: "myrepo".into(),
            url: "/srv/myrepo".into(),
            branch: "main".into(),
            sha: sha.clone(),
            run: 1,
            job_id: format!("myrepo.{sha}.1.1"),
            attempt: 1,
            runner: "r1".into(),
            status: Status::Passed,
            exit_code: Some(0),
            signal: None,
            reason: None,
            started_at: datetime!(2025-01-01 0:00 UTC),
            finished_at: datetime!(2025-01-01 0:00:01.2 UTC),
            duration_ms: 1234,
            output_tail: "Ran 3 tests\n\nOK".into(),
            log_subject: format!("ci.logs.myrepo.{sha}.1.1"),
            log_bytes: 15,
            commit_seq: 7,
            author: "A <a@x>".into(),
            summary: "first line of summary\n\nbody".into(),
            tests: None,
            job: None,
            job_name: None,
            jobs: vec![],
            fail_fast: false,
        }
    }

    #[test]
    fn passed_line() {
        assert_eq!(
            result_line(&result()),
            r#"passed  myrepo  main  1a2b3c4d  run 1  attempt 1  runner r1  1.2s  "first line of summary""#
        );
    }

    #[test]
    fn failed_and_error_lines_say_why() {
        let mut r = result();
        r.status = Status::Failed;
        r.exit_code = Some(1);
        assert!(
            result_line(&r).contains("1.2s  exit 1  \"first"),
            "{}",
            result_line(&r)
        );
        r.status = Status::TimedOut;
        r.exit_code = None;
        r.signal = Some(9);
        r.reason = Some("ran past its 10m timeout".into());
        assert!(result_line(&r).starts_with("timed_out  "));
        assert!(result_line(&r).contains("signal 9  reason \"ran past its 10m timeout\""));
        r.status = Status::Error;
        r.signal = None;
        r.runner = String::new();
        assert!(result_line(&r).contains("runner -  "));
    }

    #[test]
    fn line_is_safe_for_a_terminal() {
        let mut r = result();
        r.branch = "feat/\x1b[31mred".into();
        r.summary = "say \"hi\"\x07".into();
        let line = result_line(&r);
        assert!(!line.chars().any(|c| c.is_control()), "{line:?}");
        assert!(line.contains("feat/?[31mred"));
        assert!(line.ends_with(r#""say \"hi\"?""#), "{line}");
        r.summary = "x".repeat(200);
        assert!(result_line(&r).ends_with("…\""));
    }

    #[test]
    fn durations() {
        assert_eq!(format_duration(0), "0.0s");
        assert_eq!(format_duration(1234), "1.2s");
        assert_eq!(format_duration(59_949), "59.9s");
        assert_eq!(format_duration(125_000), "2m05s");
        assert_eq!(format_duration(3_720_000), "1h02m");
    }

    #[test]
    fn file_content() {
        let r = result();
        let text = result_file(&r);
        let expected = format!(
            "status: passed\nrepo: myrepo\nbranch: main\nsha: {sha}\nrun: 1\nattempt: 1\n\
             runner: r1\nduration: 1.2s (1234 ms)\nexit: exit code 0\nreason: -\n\
             log: ci.logs.myrepo.{sha}.1.1 (15 bytes)\n\nRan 3 tests\n\nOK\n",
            sha = r.sha
        );
        assert_eq!(text, expected);
        let mut r = result();
        r.status = Status::Error;
        r.exit_code = None;
        r.reason = Some("checkout failed: no such commit\nmore".into());
        r.output_tail = String::new();
        let text = result_file(&r);
        assert!(text.contains("\nexit: -\nreason: checkout failed: no such commit\n"));
        assert!(text.ends_with("bytes)\n\n"));
    }

    #[test]
    fn files_are_written_atomically_and_latest_run_wins() {
        let dir = tempfile::tempdir().unwrap();
        let files = ResultFiles::new(&dir.path().join("test_results")).unwrap();
        let mut r = result();
        r.run = 2;
        files.write(&r).unwrap();
        r.run = 1;
        r.status = Status::Failed;
        files.write(&r).unwrap();
        let path = dir.path().join("test_results").join(&r.sha);
        let text = std::fs::read_to_string(path).unwrap();
        assert!(text.starts_with("status: passed\n"), "{text}");
        let names: Vec<_> = std::fs::read_dir(dir.path().join("test_results"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temporary files left: {names:?}");
    }

    #[test]
    fn json_lines_stay_one_line() {
        assert_eq!(json_line(br#"{"a":1}"#), r#"{"a":1}"#);
        assert_eq!(json_line(b"{\n \"a\": 1\n}"), r#"{"a":1}"#);
        assert_eq!(json_line(b"not\njson"), "not json");
    }
}
