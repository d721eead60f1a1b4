//! `test_results/<sha>` files, as the original "500 lines" CI wrote them (the test output in
//! `test_results/<commit>`), now with the result's facts on top: one `key: value` line each, a
//! blank line, then the output tail. `jetci up`, `jetci tail --write-dir` and `jetci-web
//! --results-dir` write the same files through [`write()`].

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use crate::messages::ResultMsg;

/// The file's text for one result.
pub fn render(r: &ResultMsg) -> String {
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
        format_duration(r.duration_ms),
        r.duration_ms
    );
    let _ = writeln!(s, "exit: {exit}");
    let reason = r.reason.as_deref().map(first_line).unwrap_or("");
    let reason = if reason.is_empty() {
        "-".to_string()
    } else {
        clean(reason, 400)
    };
    let _ = writeln!(s, "reason: {reason}");
    if r.log_subject.is_empty() {
        // A pipeline's run: each of its jobs has its own log.
        let _ = writeln!(s, "log: -");
    } else {
        let _ = writeln!(s, "log: {} ({} bytes)", r.log_subject, r.log_bytes);
    }
    for j in &r.jobs {
        let runner = if j.runner.is_empty() { "-" } else { &j.runner };
        let allowed = if j.allow_failure {
            " (allowed to fail)"
        } else {
            ""
        };
        let _ = writeln!(
            s,
            "job: {}{allowed}  {}  runner {}  {}",
            j.status,
            clean(&j.name, 200),
            clean(runner, 64),
            format_duration(j.duration_ms)
        );
    }
    s.push('\n');
    s.push_str(&r.output_tail);
    if !r.output_tail.is_empty() && !r.output_tail.ends_with('\n') {
        s.push('\n');
    }
    s
}

/// Writes `dir/<sha>` for `r` atomically (a temporary file in `dir`, renamed over the old one, so
/// a reader never sees half a file), unless the file holds a newer run of the commit or the same
/// text already. Returns whether it wrote.
///
/// Errors: the file cannot be written (`dir` must exist).
pub fn write(dir: &Path, r: &ResultMsg) -> std::io::Result<bool> {
    if r.job.is_some() {
        // A pipeline's job: its run's result lists it, and the file is the run's.
        return Ok(false);
    }
    // `decode` checked that the sha is 40 hex digits, so it is a safe file name.
    let path = dir.join(&r.sha);
    let text = render(r);
    if let Ok(existing) = std::fs::read_to_string(&path) {
        if existing == text || !replaces(&existing, &r.repo, r.run) {
            return Ok(false);
        }
    }
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
    tmp.write_all(text.as_bytes())?;
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    tmp.persist(&path).map_err(|e| e.error)?;
    Ok(true)
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

/// True when a result of `repo`/`run` should replace the file whose text is `existing`: the
/// latest run of a commit wins, so replaying an old run never hides a newer one.
fn replaces(existing: &str, repo: &str, run: u32) -> bool {
    match file_repo_and_run(existing) {
        (Some(r), Some(old)) if r == repo => run >= old,
        _ => true,
    }
}

/// The first non-empty line, trimmed.
pub fn first_line(s: &str) -> &str {
    s.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
}

/// Replaces control characters with `?` and cuts to `max` characters (marking the cut with `…`),
/// so repository text is safe on a terminal and in a one-line field.
pub fn clean(s: &str, max: usize) -> String {
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

/// A human duration: `0.3s`, `12.0s`, `2m05s`, `1h02m`.
pub fn format_duration(ms: u64) -> String {
    let secs = ms / 1000;
    if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if secs < 3600 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{now, Status, VERSION};

    fn result(run: u32, status: Status) -> ResultMsg {
        let sha = "1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d".to_string();
        ResultMsg {
            v: VERSION,
            repo: "app".into(),
            url: "/srv/app".into(),
            branch: "feat\u{1b}[31m".into(),
            sha: sha.clone(),
            run,
            job_id: format!("app.{sha}.{run}.1"),
            attempt: 1,
            runner: "r1".into(),
            status,
            exit_code: Some(1),
            signal: None,
            reason: None,
            started_at: now(),
            finished_at: now(),
            duration_ms: 61_000,
            output_tail: "FAILED (failures=1)".into(),
            log_subject: format!("ci.logs.app.{sha}.{run}.1"),
            log_bytes: 20,
            commit_seq: 1,
            author: String::new(),
            summary: String::new(),
            tests: None,
            job: None,
            job_name: None,
            jobs: vec![],
            fail_fast: false,
        }
    }

    #[test]
    fn renders_facts_then_output() {
        let text = render(&result(1, Status::Failed));
        assert!(
            text.starts_with("status: failed\nrepo: app\nbranch: feat?[31m\n"),
            "{text}"
        );
        assert!(
            text.contains("duration: 1m01s (61000 ms)\nexit: exit code 1\nreason: -\n"),
            "{text}"
        );
        assert!(text.ends_with("\n\nFAILED (failures=1)\n"), "{text}");
    }

    #[test]
    fn latest_run_wins_and_writes_are_whole() {
        let dir = tempfile::tempdir().unwrap();
        assert!(write(dir.path(), &result(2, Status::Passed)).unwrap());
        assert!(
            !write(dir.path(), &result(1, Status::Failed)).unwrap(),
            "an older run never hides a newer one"
        );
        assert!(
            !write(dir.path(), &result(2, Status::Passed)).unwrap(),
            "same text: nothing to do"
        );
        assert!(write(dir.path(), &result(3, Status::Failed)).unwrap());
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
    }
}
