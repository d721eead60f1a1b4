//! Test counts for a result: from the summary a test tool printed, or from JUnit XML files.
//!
//! Two sources, and the runner prefers the second when the repository names one:
//!
//! - [`OutputScanner`] reads the job's output as it streams past and recognises the summaries of
//!   Python's `unittest` (`Ran 3 tests in 0.001s` / `FAILED (failures=1)`) and of `pytest`
//!   (`== 1 failed, 2 passed in 0.05s ==`), with the failing tests' names. It keeps only the line
//!   being read (at most [`MAX_LINE`] bytes), so a test that prints gigabytes costs no memory.
//! - [`read_junit`] reads the files that `.jetci.toml`'s `junit` globs match, in the JUnit XML
//!   format as written by Maven Surefire and read by Jenkins' JUnit plugin
//!   (<https://maven.apache.org/surefire/maven-surefire-plugin/xsd/surefire-test-report.xsd>,
//!   <https://github.com/jenkinsci/junit-plugin>); pytest's `--junitxml`, Gradle, gotestsum and
//!   cargo-nextest write the same shape.
//!
//! How each tool's categories map onto [`TestCounts`] (`tests = passed + failed + skipped`):
//!
//! | tool     | failed                                    | skipped                          | passed              |
//! |----------|-------------------------------------------|----------------------------------|---------------------|
//! | unittest | failures + errors + unexpected successes  | skipped + expected failures      | the rest of `Ran N` |
//! | pytest   | failed + error(s)                         | skipped + xfailed                | passed + xpassed    |
//! | JUnit    | a `<testcase>` with `<failure>`/`<error>` | a `<testcase>` with `<skipped>`  | any other testcase  |
//!
//! An expected failure is counted as skipped because that is what pytest writes to JUnit XML for
//! an `xfail` (and an `xpass` is written as a plain pass), so the three sources agree. Two quirks
//! of the tools remain visible: unittest counts each failing `subTest` as a failure of its one
//! test, so `failed` is capped at `Ran N` while `failures` names every failing subtest; pytest
//! counts a test that fails and then errors in teardown once in each category.
//!
//! Several summaries in one output (a script that runs unittest twice) are added up. At most
//! [`MAX_FAILURES`] names are kept, each cut to [`MAX_NAME`] characters, so the result stays far
//! below the message size limit.

use std::collections::BTreeSet;
use std::io::BufReader;
use std::path::{Component, Path};

use quick_xml::events::{BytesStart, Event};

use crate::messages::TestCounts;

/// The longest output line the scanner looks at, in bytes; the rest of a longer line is ignored.
pub const MAX_LINE: usize = 8 * 1024;

/// The most failing-test names a result carries.
pub const MAX_FAILURES: usize = 100;

/// The longest failing-test name kept, in characters.
pub const MAX_NAME: usize = 300;

/// The largest JUnit XML file read, in bytes.
pub const MAX_JUNIT_FILE: u64 = 50 * 1024 * 1024;

/// The most bytes of JUnit XML read for one job, all files together.
pub const MAX_JUNIT_BYTES: u64 = 256 * 1024 * 1024;

/// The most JUnit XML files read for one job.
pub const MAX_JUNIT_FILES: usize = 1000;

/// The most files and directories of a checkout looked at while matching a job's junit globs.
pub const MAX_JUNIT_ENTRIES: usize = 100_000;

/// How many lines after unittest's `Ran N tests` its verdict (`OK`, `FAILED (...)`) may come; an
/// interleaved line from stderr or stdout can land in between.
const VERDICT_WITHIN: u8 = 3;

/// Finds unittest and pytest summaries in a job's output, fed in chunks split anywhere.
#[derive(Debug, Default)]
pub struct OutputScanner {
    /// The line being read (never more than [`MAX_LINE`] bytes).
    line: Vec<u8>,
    /// The previous non-empty line was unittest's `=====` rule (before `FAIL: name`).
    after_rule: bool,
    /// unittest printed `Ran N tests`; its verdict should follow within a few lines.
    ran: Option<(u64, u8)>,
    /// Inside pytest's "short test summary info" (the `FAILED node - reason` lines).
    in_short_summary: bool,
    /// A summary was seen; without one there are no counts, whatever names were seen.
    found: bool,
    counts: TestCounts,
}

impl OutputScanner {
    pub fn new() -> OutputScanner {
        OutputScanner::default()
    }

    /// Reads more output. Lines end at `\n` or `\r`; bytes that are not UTF-8 are replaced.
    pub fn feed(&mut self, bytes: &[u8]) {
        for piece in bytes.split_inclusive(|&b| b == b'\n' || b == b'\r') {
            let (text, ends_line) = match piece.split_last() {
                Some((b'\n' | b'\r', text)) => (text, true),
                _ => (piece, false),
            };
            let room = MAX_LINE.saturating_sub(self.line.len());
            self.line.extend_from_slice(&text[..text.len().min(room)]);
            if ends_line {
                self.end_line();
            }
        }
    }

    /// The counts of every summary seen, or `None` when the output had none.
    pub fn finish(mut self) -> Option<TestCounts> {
        self.end_line();
        self.found.then_some(self.counts)
    }

    fn end_line(&mut self) {
        if self.line.is_empty() {
            return;
        }
        let text = strip_ansi(&String::from_utf8_lossy(&self.line));
        self.line.clear();
        self.scan(text.trim_end());
    }

    fn scan(&mut self, line: &str) {
        if line.is_empty() {
            return;
        }
        if let Some((ran, left)) = self.ran.take() {
            if let Some(verdict) = unittest_verdict(line) {
                self.add_unittest(ran, verdict);
                self.after_rule = false;
                return;
            }
            if left > 1 {
                self.ran = Some((ran, left - 1));
            }
        }
        if let Some(ran) = unittest_ran(line) {
            self.ran = Some((ran, VERDICT_WITHIN));
        } else if self.after_rule {
            let name = ["FAIL: ", "ERROR: ", "UNEXPECTED SUCCESS: "]
                .iter()
                .find_map(|p| line.strip_prefix(p));
            if let Some(name) = name {
                self.add_name(name);
            }
        }

        if line.starts_with('=') && line.contains(" short test summary info ") {
            self.in_short_summary = true;
        } else if let Some(counts) = pytest_summary(line) {
            self.in_short_summary = false;
            self.add_pytest(counts);
        } else if self.in_short_summary {
            let node = ["FAILED ", "ERROR "]
                .iter()
                .find_map(|p| line.strip_prefix(p));
            if let Some(node) = node {
                let name = node.split_once(" - ").map_or(node, |(name, _)| name);
                self.add_name(name);
            }
        }
        self.after_rule = line.len() >= 20 && line.bytes().all(|b| b == b'=');
    }

    fn add_unittest(&mut self, ran: u64, v: UnittestVerdict) {
        let skipped = (v.skipped + v.expected_failures).min(ran);
        let failed = (v.failures + v.errors + v.unexpected_successes).min(ran - skipped);
        self.add(ran, ran - skipped - failed, failed, skipped);
    }

    fn add_pytest(&mut self, c: PytestCounts) {
        let (passed, failed, skipped) = (
            c.passed + c.xpassed,
            c.failed + c.errors,
            c.skipped + c.xfailed,
        );
        self.add(passed + failed + skipped, passed, failed, skipped);
    }

    fn add(&mut self, tests: u64, passed: u64, failed: u64, skipped: u64) {
        self.found = true;
        let c = &mut self.counts;
        c.tests += tests;
        c.passed += passed;
        c.failed += failed;
        c.skipped += skipped;
    }

    fn add_name(&mut self, name: &str) {
        push_name(&mut self.counts.failures, name);
    }
}

fn push_name(names: &mut Vec<String>, name: &str) {
    let name = name.trim();
    if names.len() < MAX_FAILURES && !name.is_empty() {
        names.push(name.chars().take(MAX_NAME).collect());
    }
}

/// Removes terminal colour codes (`ESC [ ... m` and other CSI sequences): pytest colours its
/// summary when `--color=yes` or `PY_COLORS=1`.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        if chars.clone().next() == Some('[') {
            chars.next();
            for c in chars.by_ref() {
                if ('\x40'..='\x7e').contains(&c) {
                    break;
                }
            }
        }
    }
    out
}

/// `Ran 3 tests in 0.001s` / `Ran 1 test in 0.000s` → 3 / 1.
fn unittest_ran(line: &str) -> Option<u64> {
    let rest = line.strip_prefix("Ran ")?;
    let (n, rest) = rest.split_once(' ')?;
    let time = rest
        .strip_prefix("tests in ")
        .or_else(|| rest.strip_prefix("test in "))?;
    seconds(time)?;
    n.parse().ok()
}

#[derive(Debug, Default, PartialEq)]
struct UnittestVerdict {
    failures: u64,
    errors: u64,
    skipped: u64,
    expected_failures: u64,
    unexpected_successes: u64,
}

/// `OK`, `OK (skipped=2)`, `FAILED (failures=1, errors=2)`, `NO TESTS RAN` (Python ≥ 3.12).
fn unittest_verdict(line: &str) -> Option<UnittestVerdict> {
    let (head, details) = match line.split_once(" (") {
        Some((head, rest)) => (head, Some(rest.strip_suffix(')')?)),
        None => (line, None),
    };
    if !matches!(head, "OK" | "FAILED" | "NO TESTS RAN") {
        return None;
    }
    let mut v = UnittestVerdict::default();
    for item in details.into_iter().flat_map(|d| d.split(", ")) {
        let (key, n) = item.split_once('=')?;
        let n: u64 = n.parse().ok()?;
        match key {
            "failures" => v.failures += n,
            "errors" => v.errors += n,
            "skipped" => v.skipped += n,
            "expected failures" => v.expected_failures += n,
            "unexpected successes" => v.unexpected_successes += n,
            _ => return None,
        }
    }
    Some(v)
}

#[derive(Debug, Default, PartialEq)]
struct PytestCounts {
    passed: u64,
    failed: u64,
    errors: u64,
    skipped: u64,
    xfailed: u64,
    xpassed: u64,
}

/// pytest's last line: `==== 2 failed, 3 passed, 1 skipped, 2 warnings in 0.12s ====`, with or
/// without the `=`s (`-q`), or `no tests ran in 0.01s`. Categories pytest's plugins add
/// (`3 subtests passed`, `1 rerun`) and `deselected`/`warnings` do not count as tests.
fn pytest_summary(line: &str) -> Option<PytestCounts> {
    let line = line.trim_matches('=').trim();
    let (items, time) = line.rsplit_once(" in ")?;
    // `in 61.23s (0:01:01)` past a minute.
    let time = match time.split_once(' ') {
        Some((t, clock)) if clock.starts_with('(') && clock.ends_with(')') => t,
        Some(_) => return None,
        None => time,
    };
    seconds(time)?;
    let mut c = PytestCounts::default();
    for item in items.split(", ") {
        if item == "no tests ran" {
            continue;
        }
        let (n, what) = item.split_once(' ')?;
        let n: u64 = n.parse().ok()?;
        match what {
            "passed" => c.passed += n,
            "failed" => c.failed += n,
            "error" | "errors" => c.errors += n,
            "skipped" => c.skipped += n,
            "xfailed" => c.xfailed += n,
            "xpassed" => c.xpassed += n,
            _ => {}
        }
    }
    Some(c)
}

/// `0.012s` → Some(()).
fn seconds(s: &str) -> Option<()> {
    let n = s.strip_suffix('s')?;
    (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit() || b == b'.')).then_some(())
}

/// A JUnit report that could not be used. The runner logs it and falls back to the output's
/// counts; it never changes the job's status.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {reason}")]
pub struct JunitError {
    /// The file or glob, relative to the checkout.
    pub file: String,
    pub reason: String,
}

fn junit_err(file: impl Into<String>, reason: impl Into<String>) -> JunitError {
    JunitError {
        file: file.into(),
        reason: reason.into(),
    }
}

/// Adds up the JUnit XML files that `globs` (relative to `dir`) match; `Ok(None)` when none match.
///
/// Counts come from the `<testcase>` elements, not from the `tests=`/`failures=` attributes of
/// the suites, which tools fill inconsistently (pytest counts an xfail in `skipped`, Surefire
/// counts reruns, nested suites repeat their children's totals). A testcase with a `<failure>`
/// or `<error>` child failed (named `classname.name`); one with `<skipped>` was skipped; any other
/// passed. Surefire's `<flakyFailure>`/`<rerunFailure>` mark a test that passed on a retry.
///
/// The checkout is the job's, so hostile: the walk (walkdir, matched with globset; `*` stays
/// within a directory, `**` crosses them) starts at each glob's literal directory prefix, never
/// follows a symlinked directory (a link loop cannot make it endless), looks at no more than
/// [`MAX_JUNIT_ENTRIES`] entries and reads at most [`MAX_JUNIT_FILES`] files of
/// [`MAX_JUNIT_BYTES`] in all. A matching symlink to a file inside the checkout is read.
///
/// Errors: a glob that is absolute, climbs out of `dir` with `..` or is not a valid glob; a match
/// that is a link to outside `dir`; a cap above reached (the error says which); a file over
/// [`MAX_JUNIT_FILE`] bytes, one that is not well-formed XML or has no
/// `<testsuites>`/`<testsuite>` root.
pub fn read_junit(dir: &Path, globs: &[String]) -> Result<Option<TestCounts>, JunitError> {
    read_junit_within(dir, globs, &Caps::DEFAULT, None)
}

/// One `<testcase>`'s time, handed to [`read_junit_report`]'s callback as it is read (nothing
/// is kept: a report may hold millions).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CaseTime<'a> {
    /// Its `classname` attribute (pytest: `tests.test_x.TestY`; Surefire: `com.x.YTest`).
    pub class: &'a str,
    /// Its `file` attribute, where the tool writes one (pytest's `xunit1` family, jest-junit
    /// with `addFileAttribute`); empty when absent.
    pub file: &'a str,
    /// Its `time` attribute (seconds in the schema), in milliseconds; 0 when absent, negative
    /// or not a number, at most a day.
    pub ms: u64,
}

/// [`read_junit`], calling `on_case` with each testcase's time as well when given.
///
/// Errors: as [`read_junit`].
pub fn read_junit_report(
    dir: &Path,
    globs: &[String],
    on_case: Option<&mut dyn FnMut(CaseTime)>,
) -> Result<Option<TestCounts>, JunitError> {
    read_junit_within(dir, globs, &Caps::DEFAULT, on_case)
}

/// The bounds of [`read_junit`]; smaller ones in tests.
struct Caps {
    entries: usize,
    files: usize,
    bytes: u64,
}

impl Caps {
    const DEFAULT: Caps = Caps {
        entries: MAX_JUNIT_ENTRIES,
        files: MAX_JUNIT_FILES,
        bytes: MAX_JUNIT_BYTES,
    };
}

/// [`read_junit_report`] within `caps`.
fn read_junit_within(
    dir: &Path,
    globs: &[String],
    caps: &Caps,
    on_case: Option<&mut dyn FnMut(CaseTime)>,
) -> Result<Option<TestCounts>, JunitError> {
    let root = dir
        .canonicalize()
        .map_err(|e| junit_err(dir.display().to_string(), e.to_string()))?;
    let mut files = BTreeSet::new();
    let mut visited = 0usize;
    for pattern in globs {
        let rel = Path::new(pattern);
        if rel.is_absolute() || rel.components().any(|c| c == Component::ParentDir) {
            return Err(junit_err(
                pattern,
                "a junit glob must be relative to the checkout and stay inside it",
            ));
        }
        let matcher = globset::GlobBuilder::new(pattern)
            .literal_separator(true)
            .build()
            .map_err(|e| junit_err(pattern, e.kind().to_string()))?
            .compile_matcher();
        let (base, depth) = walk_plan(pattern);
        // Every directory of the literal prefix must be a real one: a symlinked directory is
        // never followed.
        let mut start = root.clone();
        let mut real_dirs = true;
        for part in &base {
            start.push(part);
            real_dirs &= std::fs::symlink_metadata(&start).is_ok_and(|m| m.is_dir());
        }
        if !real_dirs {
            continue;
        }
        let walk = walkdir::WalkDir::new(&start)
            .follow_links(false)
            .follow_root_links(false)
            .min_depth(1)
            .max_depth(depth);
        for entry in walk {
            visited += 1;
            if visited > caps.entries {
                return Err(junit_err(
                    pattern,
                    format!(
                        "looked at more than {} files and directories of the \
                         checkout without finishing; name the reports' directory in the glob",
                        caps.entries
                    ),
                ));
            }
            let Ok(entry) = entry else { continue };
            let shown = relative(&root, entry.path());
            if entry.file_type().is_dir() || !matcher.is_match(&shown) {
                continue;
            }
            let real = if entry.path_is_symlink() {
                let Ok(real) = entry.path().canonicalize() else {
                    continue;
                };
                if !real.starts_with(&root) {
                    return Err(junit_err(shown, "leads outside the checkout"));
                }
                if !real.is_file() {
                    continue;
                }
                real
            } else if entry.file_type().is_file() {
                entry.path().to_path_buf()
            } else {
                continue;
            };
            files.insert((shown, real));
            if files.len() > caps.files {
                return Err(junit_err(
                    pattern,
                    format!("the junit globs match more than {} files", caps.files),
                ));
            }
        }
    }
    if files.is_empty() {
        return Ok(None);
    }
    let mut total = TestCounts::default();
    let wanted = on_case.is_some();
    let mut ignore = |_: CaseTime| {};
    let on_case: &mut dyn FnMut(CaseTime) = match on_case {
        Some(f) => f,
        None => &mut ignore,
    };
    let mut budget = caps.bytes;
    for (shown, path) in files {
        let c = read_junit_file(
            &path,
            &mut budget,
            caps.bytes,
            wanted.then_some(&mut *on_case),
        )
        .map_err(|reason| junit_err(shown, reason))?;
        let Some(c) = c else { continue };
        total.tests += c.tests;
        total.passed += c.passed;
        total.failed += c.failed;
        total.skipped += c.skipped;
        for name in &c.failures {
            push_name(&mut total.failures, name);
        }
    }
    Ok(Some(total))
}

/// Where the walk for `pattern` starts and how deep it goes: the leading directories that hold
/// no glob syntax (never the last part, the file's), and the number of parts left, unbounded
/// with `**`.
fn walk_plan(pattern: &str) -> (Vec<&str>, usize) {
    let parts: Vec<&str> = pattern
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    let literal = parts
        .iter()
        .take(parts.len().saturating_sub(1))
        .take_while(|p| !p.contains(['*', '?', '[', '{', '\\']))
        .count();
    let rest = &parts[literal..];
    let depth = if rest.iter().any(|p| p.contains("**")) {
        usize::MAX
    } else {
        rest.len()
    };
    (parts[..literal].to_vec(), depth)
}

fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .display()
        .to_string()
}

#[derive(Clone, Copy, PartialEq)]
enum Outcome {
    Passed,
    Failed,
    Skipped,
}

/// One file, read as a stream of events (a report can be tens of megabytes of stack traces);
/// `None` when it is not a regular file (a directory, or a FIFO that would block the read).
/// Its size is taken from `budget`, the bytes the job's reports may still have (of `cap`).
/// Each testcase's time goes to `on_case` when given.
fn read_junit_file(
    path: &Path,
    budget: &mut u64,
    cap: u64,
    mut on_case: Option<&mut dyn FnMut(CaseTime)>,
) -> Result<Option<TestCounts>, String> {
    use std::os::unix::fs::OpenOptionsExt;
    // Opened without blocking, then checked: a FIFO is never waited on.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)
        .map_err(|e| e.to_string())?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Ok(None);
    }
    let len = meta.len();
    if len > MAX_JUNIT_FILE {
        return Err(format!(
            "{len} bytes is more than the {MAX_JUNIT_FILE} byte limit"
        ));
    }
    *budget = budget.checked_sub(len).ok_or_else(|| {
        format!("with the reports before it, more than the {cap} bytes read for a job")
    })?;
    let mut reader = quick_xml::Reader::from_reader(BufReader::new(file));
    reader.config_mut().expand_empty_elements = true;

    let mut counts = TestCounts::default();
    let mut buf = Vec::new();
    let mut depth = 0usize;
    let mut saw_root = false;
    // The open testcase: its depth, name and what its children said so far.
    let mut case: Option<(usize, String, Outcome)> = None;
    loop {
        let event = reader.read_event_into(&mut buf).map_err(|e| {
            format!(
                "not well-formed XML at byte {}: {e}",
                reader.error_position()
            )
        })?;
        match event {
            Event::Start(e) => {
                depth += 1;
                let tag = e.name();
                let tag = tag.as_ref();
                saw_root = true;
                if depth == 1 && tag != "testsuites" && tag != "testsuite" {
                    return Err(format!(
                        "not a JUnit report: the root element is <{}>, not <testsuites> or <testsuite>",
                        tag
                    ));
                }
                match (&mut case, tag) {
                    (None, "testcase") => {
                        if let Some(on_case) = on_case.as_deref_mut() {
                            let (class, file) = (attr(&e, "classname"), attr(&e, "file"));
                            on_case(CaseTime {
                                class: &class,
                                file: &file,
                                ms: case_ms(&attr(&e, "time")),
                            });
                        }
                        case = Some((depth, case_name(&e), Outcome::Passed))
                    }
                    (Some((d, _, outcome)), "failure" | "error") if depth == *d + 1 => {
                        *outcome = Outcome::Failed
                    }
                    (Some((d, _, outcome)), "skipped")
                        if depth == *d + 1 && *outcome == Outcome::Passed =>
                    {
                        *outcome = Outcome::Skipped
                    }
                    _ => {}
                }
            }
            Event::End(_) => {
                if let Some((_, name, outcome)) = case.take_if(|(d, _, _)| *d == depth) {
                    counts.tests += 1;
                    match outcome {
                        Outcome::Passed => counts.passed += 1,
                        Outcome::Skipped => counts.skipped += 1,
                        Outcome::Failed => {
                            counts.failed += 1;
                            push_name(&mut counts.failures, &name);
                        }
                    }
                }
                depth = depth.saturating_sub(1);
            }
            Event::Eof if depth > 0 => return Err("the file ends inside an element".into()),
            Event::Eof if !saw_root => {
                return Err("not a JUnit report: no <testsuites> or <testsuite> element".into())
            }
            Event::Eof => break,
            _ => {}
        }
        buf.clear();
    }
    Ok(Some(counts))
}

/// An attribute's value, unescaped where it can be ("" when absent).
fn attr(e: &BytesStart, key: &str) -> String {
    e.attributes()
        .flatten()
        .find(|a| a.key.as_ref() == key)
        .map(
            |a| match a.normalized_value(quick_xml::XmlVersion::Implicit1_0) {
                Ok(v) => v.into_owned(),
                Err(_) => a.value.into_owned(),
            },
        )
        .unwrap_or_default()
}

/// A testcase's `time="1.25"` (seconds) in milliseconds: 1250; a bad or negative time counts
/// as 0, one over a day as a day.
fn case_ms(time: &str) -> u64 {
    let seconds: f64 = time.trim().parse().unwrap_or(0.0);
    if seconds.is_finite() && seconds > 0.0 {
        (seconds * 1000.0).min(86_400_000.0) as u64
    } else {
        0
    }
}

/// `classname.name`, or `name` alone when the tool wrote no class.
fn case_name(e: &BytesStart) -> String {
    let (class, name) = (attr(e, "classname"), attr(e, "name"));
    if class.is_empty() {
        name
    } else {
        format!("{class}.{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `python3 -m unittest discover` (Python 3.11.7) on one file with a pass, a failure, an
    /// error, a skip, an expected failure and an unexpected success.
    const UNITTEST_MIXED: &str = r#"FE.sux
======================================================================
ERROR: test_err (test_x.T.test_err)
----------------------------------------------------------------------
Traceback (most recent call last):
  File "/tmp/tcs/ut/test_x.py", line 5, in test_err
    def test_err(self): raise ValueError("boom")
                        ^^^^^^^^^^^^^^^^^^^^^^^^
ValueError: boom

======================================================================
FAIL: test_bad (test_x.T.test_bad)
----------------------------------------------------------------------
Traceback (most recent call last):
  File "/tmp/tcs/ut/test_x.py", line 4, in test_bad
    def test_bad(self): self.assertEqual(1, 2)
                        ^^^^^^^^^^^^^^^^^^^^^^
AssertionError: 1 != 2

======================================================================
UNEXPECTED SUCCESS: test_us (test_x.T.test_us)
----------------------------------------------------------------------
Ran 6 tests in 0.001s

FAILED (failures=1, errors=1, skipped=1, expected failures=1, unexpected successes=1)
"#;

    const UNITTEST_OK_SKIPPED: &str = ".s
----------------------------------------------------------------------
Ran 2 tests in 0.000s

OK (skipped=1)
";

    /// `python3 -m unittest -v` with one test.
    const UNITTEST_ONE_VERBOSE: &str = "test_ok (test_o.T.test_ok) ... ok

----------------------------------------------------------------------
Ran 1 test in 0.000s

OK
";

    /// Two failing subtests of one test.
    const UNITTEST_SUBTESTS: &str = "FF
======================================================================
FAIL: test_sub (test_s.T.test_sub) (i=1)
----------------------------------------------------------------------
Traceback (most recent call last):
AssertionError: 1 != 0

======================================================================
FAIL: test_sub (test_s.T.test_sub) (i=2)
----------------------------------------------------------------------
Traceback (most recent call last):
AssertionError: 2 != 0

----------------------------------------------------------------------
Ran 1 test in 0.000s

FAILED (failures=2)
";

    /// A test module that does not import.
    const UNITTEST_IMPORT_ERROR: &str = "E
======================================================================
ERROR: test_i (unittest.loader._FailedTest.test_i)
----------------------------------------------------------------------
ImportError: Failed to import test module: test_i
Traceback (most recent call last):
ModuleNotFoundError: No module named 'nosuchmod'


----------------------------------------------------------------------
Ran 1 test in 0.000s

FAILED (errors=1)
";

    /// `python3 -m pytest` (pytest 9.2.0): 4 passed, 2 failed, 1 skipped, 1 xfailed, 1 xpassed,
    /// 1 error in a fixture, 1 warning.
    const PYTEST_MIXED: &str = r#"============================= test session starts ==============================
platform linux -- Python 3.11.7, pytest-9.2.0, pluggy-1.7.0
rootdir: /tmp/tcs/pt
collected 10 items

tests/test_p.py ...FsxXE.F                                               [100%]

==================================== ERRORS ====================================
__________________________ ERROR at setup of test_err __________________________

    @pytest.fixture
>   def broken(): raise RuntimeError("fixture broke")
                  ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
E   RuntimeError: fixture broke

tests/test_p.py:13: RuntimeError
=================================== FAILURES ===================================
___________________________________ test_bad ___________________________________

>   def test_bad(): assert 1 == 2
                    ^^^^^^^^^^^^^
E   assert 1 == 2

tests/test_p.py:5: AssertionError
________________________________ test_param[2] _________________________________

x = 2

    @pytest.mark.parametrize("x", [1, 2])
>   def test_param(x): assert x == 1
                       ^^^^^^^^^^^^^
E   assert 2 == 1

tests/test_p.py:16: AssertionError
=============================== warnings summary ===============================
tests/test_p.py::test_ok2
  /tmp/tcs/pt/tests/test_p.py:3: UserWarning: careful
    def test_ok2(): warnings.warn("careful")

-- Docs: https://docs.pytest.org/en/stable/how-to/capture-warnings.html
=========================== short test summary info ============================
FAILED tests/test_p.py::test_bad - assert 1 == 2
FAILED tests/test_p.py::test_param[2] - assert 2 == 1
ERROR tests/test_p.py::test_err - RuntimeError: fixture broke
= 2 failed, 4 passed, 1 skipped, 1 xfailed, 1 xpassed, 1 warning, 1 error in 0.04s =
"#;

    /// The end of the same run with `-q`.
    const PYTEST_QUIET_TAIL: &str =
        "-- Docs: https://docs.pytest.org/en/stable/how-to/capture-warnings.html
=========================== short test summary info ============================
FAILED tests/test_p.py::test_bad - assert 1 == 2
FAILED tests/test_p.py::test_param[2] - assert 2 == 1
ERROR tests/test_p.py::test_err - RuntimeError: fixture broke
2 failed, 4 passed, 1 skipped, 1 xfailed, 1 xpassed, 1 warning, 1 error in 0.04s
";

    /// The end of the same run with `-q --color=yes`.
    const PYTEST_COLOR_TAIL: &str = "\x1b[36m\x1b[1m=========================== short test summary info ============================\x1b[0m\n\x1b[31mFAILED\x1b[0m tests/test_p.py::\x1b[1mtest_bad\x1b[0m - assert 1 == 2\n\x1b[31mFAILED\x1b[0m tests/test_p.py::\x1b[1mtest_param[2]\x1b[0m - assert 2 == 1\n\x1b[31mERROR\x1b[0m tests/test_p.py::\x1b[1mtest_err\x1b[0m - RuntimeError: fixture broke\n\x1b[31m\x1b[31m\x1b[1m2 failed\x1b[0m, \x1b[32m4 passed\x1b[0m, \x1b[33m1 skipped\x1b[0m, \x1b[33m1 xfailed\x1b[0m, \x1b[33m1 xpassed\x1b[0m, \x1b[33m1 warning\x1b[0m, \x1b[31m\x1b[1m1 error\x1b[0m\x1b[31m in 0.05s\x1b[0m\x1b[0m\n";

    /// A test file that does not import: pytest stops after collection.
    const PYTEST_COLLECTION_ERROR: &str = "tests/test_c.py:1: in <module>
    import nosuchmod
E   ModuleNotFoundError: No module named 'nosuchmod'
=========================== short test summary info ============================
ERROR tests/test_c.py
!!!!!!!!!!!!!!!!!!!! Interrupted: 1 error during collection !!!!!!!!!!!!!!!!!!!!
=============================== 1 error in 0.10s ===============================
";

    fn scan(output: &str) -> Option<TestCounts> {
        let mut s = OutputScanner::new();
        s.feed(output.as_bytes());
        s.finish()
    }

    fn counts(tests: u64, passed: u64, failed: u64, skipped: u64, failures: &[&str]) -> TestCounts {
        TestCounts {
            tests,
            passed,
            failed,
            skipped,
            failures: failures.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn unittest_mixed_outcomes() {
        // failed = 1 failure + 1 error + 1 unexpected success; skipped = 1 skip + 1 xfail.
        assert_eq!(
            scan(UNITTEST_MIXED),
            Some(counts(
                6,
                1,
                3,
                2,
                &[
                    "test_err (test_x.T.test_err)",
                    "test_bad (test_x.T.test_bad)",
                    "test_us (test_x.T.test_us)"
                ]
            ))
        );
    }

    #[test]
    fn unittest_passing_runs() {
        assert_eq!(scan(UNITTEST_OK_SKIPPED), Some(counts(2, 1, 0, 1, &[])));
        assert_eq!(scan(UNITTEST_ONE_VERBOSE), Some(counts(1, 1, 0, 0, &[])));
        assert_eq!(
            scan("\n----\nRan 0 tests in 0.000s\n\nOK\n"),
            Some(counts(0, 0, 0, 0, &[]))
        );
        // Python 3.12 and later.
        assert_eq!(
            scan("Ran 0 tests in 0.000s\n\nNO TESTS RAN\n"),
            Some(counts(0, 0, 0, 0, &[]))
        );
        assert_eq!(
            scan("Ran 2 tests in 0.000s\n\nNO TESTS RAN (skipped=2)\n"),
            Some(counts(2, 0, 0, 2, &[]))
        );
    }

    #[test]
    fn unittest_subtests_and_import_errors() {
        assert_eq!(
            scan(UNITTEST_SUBTESTS),
            Some(counts(
                1,
                0,
                1,
                0,
                &[
                    "test_sub (test_s.T.test_sub) (i=1)",
                    "test_sub (test_s.T.test_sub) (i=2)"
                ]
            ))
        );
        assert_eq!(
            scan(UNITTEST_IMPORT_ERROR),
            Some(counts(
                1,
                0,
                1,
                0,
                &["test_i (unittest.loader._FailedTest.test_i)"]
            ))
        );
        // Older Pythons name the class only.
        let old = "======================================================================\n\
                   FAIL: test_bad (test_x.T)\n---\nRan 1 test in 0.001s\n\nFAILED (failures=1)\n";
        assert_eq!(
            scan(old),
            Some(counts(1, 0, 1, 0, &["test_bad (test_x.T)"]))
        );
    }

    #[test]
    fn several_summaries_add_up() {
        let two = format!("{UNITTEST_MIXED}{UNITTEST_OK_SKIPPED}{PYTEST_QUIET_TAIL}");
        let c = scan(&two).expect("counts");
        assert_eq!((c.tests, c.passed, c.failed, c.skipped), (18, 7, 6, 5));
        assert_eq!(c.failures.len(), 6);
    }

    #[test]
    fn pytest_summaries() {
        let names = [
            "tests/test_p.py::test_bad",
            "tests/test_p.py::test_param[2]",
            "tests/test_p.py::test_err",
        ];
        // failed = 2 failed + 1 error; passed = 4 + 1 xpassed; skipped = 1 + 1 xfailed. The
        // same run's --junitxml file has tests="10" and the same split (see `junit_from_pytest`).
        let expected = Some(counts(10, 5, 3, 2, &names));
        assert_eq!(scan(PYTEST_MIXED), expected);
        assert_eq!(scan(PYTEST_QUIET_TAIL), expected);
        assert_eq!(scan(PYTEST_COLOR_TAIL), expected);
        assert_eq!(
            scan(PYTEST_COLLECTION_ERROR),
            Some(counts(1, 0, 1, 0, &["tests/test_c.py"]))
        );
    }

    #[test]
    fn pytest_summary_shapes() {
        let one = Some(counts(1, 1, 0, 0, &[]));
        assert_eq!(scan("1 passed in 0.01s\n"), one);
        assert_eq!(scan("============================== 1 passed in 0.01s ===============================\n"), one);
        assert_eq!(scan("==== 1 passed in 61.23s (0:01:01) ====\n"), one);
        assert_eq!(
            scan("3 passed, 1 failed in 0.05s"),
            Some(counts(4, 3, 1, 0, &[]))
        );
        assert_eq!(scan("2 errors in 0.3s\n"), Some(counts(2, 0, 2, 0, &[])));
        assert_eq!(
            scan("==== 10 deselected in 0.01s ====\n"),
            Some(counts(0, 0, 0, 0, &[]))
        );
        assert_eq!(
            scan("no tests ran in 0.01s\n"),
            Some(counts(0, 0, 0, 0, &[]))
        );
        // A plugin's category is not a test.
        assert_eq!(
            scan("1 failed, 3 subtests passed in 0.1s\n"),
            Some(counts(1, 0, 1, 0, &[]))
        );
    }

    #[test]
    fn lookalikes_are_not_summaries() {
        for text in [
            "",
            "hello\nworld\n",
            "OK\n",
            "FAILED (failures=1)\n",
            "Ran 3 tests in a loop\nOK\n",
            "Ran 3 tests in 0.1s\n\nOK, moving on\n",
            "Ran 3 tests in 0.1s\na\nb\nc\nOK\n",
            "3 passed in review\n",
            "we passed in 0.1s\n",
            "1 passed, and then in 0.1s\n",
            "======================================================================\nFAIL: x\n",
        ] {
            assert_eq!(scan(text), None, "{text:?}");
        }
    }

    #[test]
    fn names_only_from_their_sections() {
        // A log line that starts with ERROR is not a failing test; unittest's names need the
        // rule above them, pytest's the short summary section.
        let text = "ERROR something broke\nFAIL: not a test\n1 failed in 0.1s\n";
        assert_eq!(scan(text), Some(counts(1, 0, 1, 0, &[])));
    }

    #[test]
    fn the_summary_line_may_come_a_little_late() {
        let text = "Ran 2 tests in 0.1s\nsome stray print\n\nOK\n";
        assert_eq!(scan(text), Some(counts(2, 2, 0, 0, &[])));
    }

    #[test]
    fn chunks_split_anywhere() {
        let all = format!(
            "{UNITTEST_MIXED}{UNITTEST_SUBTESTS}{PYTEST_MIXED}{PYTEST_COLOR_TAIL}{PYTEST_COLLECTION_ERROR}"
        );
        let whole = scan(&all);
        assert!(whole.is_some());

        let mut bytewise = OutputScanner::new();
        for b in all.as_bytes() {
            bytewise.feed(std::slice::from_ref(b));
        }
        assert_eq!(bytewise.finish(), whole);

        for size in [2, 3, 7, 64, 1000] {
            let mut s = OutputScanner::new();
            for chunk in all.as_bytes().chunks(size) {
                s.feed(chunk);
            }
            assert_eq!(s.finish(), whole, "chunks of {size}");
        }

        let crlf = all.replace('\n', "\r\n");
        assert_eq!(scan(&crlf), whole);
    }

    #[test]
    fn last_line_without_newline() {
        let mut s = OutputScanner::new();
        s.feed(b"Ran 1 test in 0.0s\n\nFAIL");
        s.feed(b"ED (errors=1)");
        assert_eq!(s.finish(), Some(counts(1, 0, 1, 0, &[])));
    }

    #[test]
    fn invalid_utf8_and_huge_lines_are_harmless() {
        let mut s = OutputScanner::new();
        s.feed(b"\xff\xfe garbage \xc3\n");
        let junk = vec![b'x'; 1024 * 1024];
        for _ in 0..8 {
            s.feed(&junk);
            assert!(s.line.len() <= MAX_LINE);
        }
        s.feed(b"\n======================================================================\n");
        s.feed(b"FAIL: test_\xe9t\xe9 (t.T.test_\xe9t\xe9)\n");
        s.feed(b"Ran 1 test in 0.1s\n\nFAILED (failures=1)\n");
        assert_eq!(
            s.finish(),
            Some(counts(
                1,
                0,
                1,
                0,
                &["test_\u{fffd}t\u{fffd} (t.T.test_\u{fffd}t\u{fffd})"]
            ))
        );
    }

    #[test]
    fn names_are_capped() {
        let mut text = String::from("=== short test summary info ===\n");
        for i in 0..150 {
            text.push_str(&format!(
                "FAILED t.py::test_{i}_{} - boom\n",
                "x".repeat(400)
            ));
        }
        text.push_str("150 failed in 1.0s\n");
        let c = scan(&text).expect("counts");
        assert_eq!(c.failed, 150);
        assert_eq!(c.failures.len(), MAX_FAILURES);
        assert!(c.failures.iter().all(|n| n.chars().count() == MAX_NAME));
        assert!(c.failures[0].starts_with("t.py::test_0_xxx"));
    }

    // ---- JUnit XML ----

    /// `python3 -m pytest --junitxml=junit.xml` on the same tests as `PYTEST_MIXED`.
    const JUNIT_PYTEST: &str = r#"<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests"><testsuite name="pytest" errors="1" failures="2" skipped="2" tests="10" time="0.052" timestamp="2026-11-30T02:09:34.430993+00:00" hostname="vm"><testcase classname="tests.test_p" name="test_ok" time="0.000" /><testcase classname="tests.test_p" name="test_ok2" time="0.000" /><testcase classname="tests.test_p" name="test_ok3" time="0.000" /><testcase classname="tests.test_p" name="test_bad" time="0.000"><failure message="assert 1 == 2">&gt;   def test_bad(): assert 1 == 2
                    ^^^^^^^^^^^^^
E   assert 1 == 2

tests/test_p.py:5: AssertionError</failure></testcase><testcase classname="tests.test_p" name="test_skip" time="0.000"><skipped type="pytest.skip" message="no">/tmp/tcs/pt/tests/test_p.py:6: no</skipped></testcase><testcase classname="tests.test_p" name="test_xf" time="0.000"><skipped type="pytest.xfail" message="" /></testcase><testcase classname="tests.test_p" name="test_xp" time="0.000" /><testcase classname="tests.test_p" name="test_err" time="0.000"><error message="failed on setup with &quot;RuntimeError: fixture broke&quot;">@pytest.fixture
&gt;   def broken(): raise RuntimeError("fixture broke")
                  ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
E   RuntimeError: fixture broke

tests/test_p.py:13: RuntimeError</error></testcase><testcase classname="tests.test_p" name="test_param[1]" time="0.000" /><testcase classname="tests.test_p" name="test_param[2]" time="0.000"><failure message="assert 2 == 1">x = 2

    @pytest.mark.parametrize("x", [1, 2])
&gt;   def test_param(x): assert x == 1
                       ^^^^^^^^^^^^^
E   assert 2 == 1

tests/test_p.py:16: AssertionError</failure></testcase></testsuite></testsuites>"#;

    /// Surefire-style: nested suites whose attributes are wrong on purpose, a flaky test that
    /// passed on rerun, an error, a skip, an escaped name, and a testcase without a class.
    const JUNIT_NESTED: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<!-- written by hand after Surefire's report -->
<testsuites tests="99" failures="0">
  <testsuite name="outer" tests="1">
    <properties><property name="java.version" value="21"/></properties>
    <testsuite name="com.example.AppTest" tests="5" failures="7">
      <testcase name="adds" classname="com.example.AppTest" time="0.01"/>
      <testcase name="divides" classname="com.example.AppTest" time="0.02">
        <failure message="expected 2" type="org.opentest4j.AssertionFailedError"><![CDATA[at com.example.AppTest.divides(AppTest.java:12) <not a tag>]]></failure>
        <system-out>hello</system-out>
      </testcase>
      <testcase name="opens &lt;file&gt;" classname="com.example.AppTest">
        <error type="java.io.IOException">no such file</error>
      </testcase>
      <testcase name="later" classname="com.example.AppTest"><skipped message="@Disabled"/></testcase>
      <testcase name="flaky" classname="com.example.AppTest">
        <flakyFailure message="first try"><stackTrace>...</stackTrace></flakyFailure>
      </testcase>
    </testsuite>
  </testsuite>
  <testsuite name="go">
    <testcase name="TestLoose"><failure>boom</failure><skipped/></testcase>
  </testsuite>
</testsuites>
"#;

    fn checkout(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for (path, text) in files {
            let path = dir.path().join(path);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, text).expect("write");
        }
        dir
    }

    fn globs(g: &[&str]) -> Vec<String> {
        g.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn junit_from_pytest() {
        let dir = checkout(&[("junit.xml", JUNIT_PYTEST)]);
        let c = read_junit(dir.path(), &globs(&["junit.xml"])).expect("reads");
        assert_eq!(
            c,
            Some(counts(
                10,
                5,
                3,
                2,
                &[
                    "tests.test_p.test_bad",
                    "tests.test_p.test_err",
                    "tests.test_p.test_param[2]"
                ]
            ))
        );
    }

    #[test]
    fn junit_report_gives_each_testcases_class_file_and_time() {
        let xml = r#"<testsuite name="s">
  <testcase classname="tests.test_a.T" name="one" time="1.25"/>
  <testcase classname="tests.test_a" name="two" file="tests/test_a.py" time="0.5"><failure/></testcase>
  <testcase classname="c" name="bad" time="-3"/>
  <testcase classname="c" name="huge" time="1e12"/>
  <testcase classname="c&amp;d" name="none"/>
</testsuite>"#;
        let dir = checkout(&[("r.xml", xml)]);
        let mut times: Vec<(String, String, u64)> = vec![];
        let mut on_case = |c: CaseTime| times.push((c.class.into(), c.file.into(), c.ms));
        let counts = read_junit_report(dir.path(), &globs(&["r.xml"]), Some(&mut on_case))
            .expect("reads")
            .expect("matches");
        assert_eq!(counts.tests, 5);
        let s = |a: &str| a.to_string();
        assert_eq!(
            times,
            [
                (s("tests.test_a.T"), s(""), 1250),
                (s("tests.test_a"), s("tests/test_a.py"), 500),
                (s("c"), s(""), 0),
                (s("c"), s(""), 86_400_000),
                (s("c&d"), s(""), 0),
            ]
        );
        assert_eq!(
            read_junit(dir.path(), &globs(&["r.xml"])).unwrap(),
            Some(counts)
        );
    }

    #[test]
    fn junit_nested_suites_count_testcases() {
        let dir = checkout(&[("target/surefire-reports/TEST-App.xml", JUNIT_NESTED)]);
        let c = read_junit(dir.path(), &globs(&["target/surefire-reports/*.xml"])).expect("reads");
        assert_eq!(
            c,
            Some(counts(
                6,
                2,
                3,
                1,
                &[
                    "com.example.AppTest.divides",
                    "com.example.AppTest.opens <file>",
                    "TestLoose"
                ]
            ))
        );
    }

    #[test]
    fn junit_files_add_up_once_each() {
        let dir = checkout(&[
            ("a/one.xml", JUNIT_PYTEST),
            ("b/two.xml", JUNIT_NESTED),
            ("b/notes.txt", "not xml"),
        ]);
        let c = read_junit(dir.path(), &globs(&["a/*.xml", "**/*.xml", "none/*.xml"]))
            .expect("reads")
            .expect("counts");
        assert_eq!((c.tests, c.passed, c.failed, c.skipped), (16, 7, 6, 3));
        assert_eq!(c.failures.len(), 6);
    }

    #[test]
    fn junit_without_matches_is_none() {
        let dir = checkout(&[("x.xml", JUNIT_PYTEST)]);
        assert_eq!(read_junit(dir.path(), &[]).expect("reads"), None);
        assert_eq!(
            read_junit(dir.path(), &globs(&["out/*.xml"])).expect("reads"),
            None
        );
        // A directory is not a report.
        std::fs::create_dir(dir.path().join("dir.xml")).expect("mkdir");
        assert_eq!(
            read_junit(dir.path(), &globs(&["dir.xml"])).expect("reads"),
            None
        );
    }

    #[test]
    fn junit_globs_stay_in_the_checkout() {
        let outside = checkout(&[("secret.xml", JUNIT_PYTEST)]);
        let dir = checkout(&[("x.xml", JUNIT_PYTEST)]);
        let abs = outside.path().join("secret.xml").display().to_string();
        for bad in [abs.as_str(), "../secret.xml", "a/../../secret.xml"] {
            let e = read_junit(dir.path(), &globs(&[bad])).expect_err(bad);
            assert!(e.reason.contains("relative"), "{e}");
        }
        // A symlinked directory is not followed; a symlinked file is, inside the checkout only.
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).expect("symlink");
        for pattern in ["link/*.xml", "**/*.xml", "*/*.xml"] {
            let c = read_junit(dir.path(), &globs(&[pattern])).expect(pattern);
            assert_eq!(c.map(|c| c.tests), (pattern == "**/*.xml").then_some(10));
        }
        std::os::unix::fs::symlink(outside.path().join("secret.xml"), dir.path().join("s.xml"))
            .expect("symlink");
        let e = read_junit(dir.path(), &globs(&["s.xml"])).expect_err("outside");
        assert_eq!(e.to_string(), "s.xml: leads outside the checkout");
        std::fs::remove_file(dir.path().join("s.xml")).expect("rm");
        std::os::unix::fs::symlink("x.xml", dir.path().join("y.xml")).expect("symlink");
        let c = read_junit(dir.path(), &globs(&["y.xml"])).expect("inside");
        assert_eq!(c.map(|c| c.tests), Some(10));
        let e = read_junit(dir.path(), &globs(&["[x.xml"])).expect_err("bad pattern");
        assert_eq!(e.file, "[x.xml");
    }

    #[test]
    fn malformed_junit_is_an_error_naming_the_file() {
        for (text, why) in [
            (
                "<testsuite><testcase name='a'></testsuite>",
                "not well-formed",
            ),
            ("<testsuite><testcase name='a'>", "ends inside"),
            ("<html><body/></html>", "root element is <html>"),
            ("", "no <testsuites>"),
            ("just text", "no <testsuites>"),
            ("<testsuite><testcase name='a' name='b'/></testsuite>", ""),
        ] {
            let dir = checkout(&[("out/report.xml", text)]);
            match read_junit(dir.path(), &globs(&["out/*.xml"])) {
                Err(e) => {
                    assert_eq!(e.file, "out/report.xml");
                    assert!(e.reason.contains(why), "{text:?}: {e}");
                }
                // quick-xml does not check duplicate attributes by default: still a testcase.
                Ok(c) => assert_eq!(why, "", "{text:?}: {c:?}"),
            }
        }
    }

    #[test]
    fn oversized_junit_is_refused_unread() {
        let dir = checkout(&[]);
        let f = std::fs::File::create(dir.path().join("big.xml")).expect("create");
        f.set_len(MAX_JUNIT_FILE + 1).expect("sparse file");
        let e = read_junit(dir.path(), &globs(&["big.xml"])).expect_err("too big");
        assert!(e.reason.contains("limit"), "{e}");
    }

    #[test]
    fn symlink_loops_and_fifos_end_the_walk_promptly() {
        let dir = checkout(&[("out/r.xml", JUNIT_PYTEST)]);
        // Each directory links to its parent and to the root: following them never ends.
        let mut d = dir.path().to_path_buf();
        for i in 0..6 {
            d = d.join(format!("d{i}"));
            std::fs::create_dir(&d).expect("mkdir");
            std::os::unix::fs::symlink("..", d.join("up")).expect("symlink");
            std::os::unix::fs::symlink(dir.path(), d.join("root")).expect("symlink");
        }
        nix::unistd::mkfifo(
            &dir.path().join("out/fifo.xml"),
            nix::sys::stat::Mode::S_IRWXU,
        )
        .expect("mkfifo");
        let c = read_junit(dir.path(), &globs(&["**/*.xml", "d0/*/up/*/up/*.xml"]))
            .expect("reads")
            .expect("counts");
        assert_eq!(c.tests, 10);
    }

    #[test]
    fn the_walk_and_the_reads_are_capped() {
        let dir = checkout(&[("r.xml", JUNIT_PYTEST)]);
        let many = dir.path().join("many");
        std::fs::create_dir(&many).expect("mkdir");
        for i in 0..MAX_JUNIT_FILES + 1 {
            std::fs::write(many.join(format!("{i}.xml")), JUNIT_PYTEST).expect("write");
        }
        let e = read_junit(dir.path(), &globs(&["many/*.xml"])).expect_err("too many files");
        assert!(e.reason.contains("more than 1000 files"), "{e}");
        // A glob with a directory prefix walks only that directory.
        let c = read_junit(dir.path(), &globs(&["r.xml"])).expect("reads");
        assert_eq!(c.map(|c| c.tests), Some(10));
        assert_eq!(
            walk_plan("target/surefire-reports/*.xml"),
            (vec!["target", "surefire-reports"], 1)
        );
        assert_eq!(walk_plan("a/**/b/*.xml"), (vec!["a"], usize::MAX));
        assert_eq!(walk_plan("junit.xml"), (vec![], 1));
        assert_eq!(walk_plan("./out/x*/r.xml"), (vec!["out"], 2));
    }

    #[test]
    fn every_cap_ends_the_reading_with_an_error_saying_so() {
        let dir = checkout(&[("a/r.xml", JUNIT_PYTEST), ("b/r.xml", JUNIT_PYTEST)]);
        for i in 0..20 {
            std::fs::create_dir(dir.path().join(format!("a/d{i}"))).expect("mkdir");
        }
        let caps = |entries, files, bytes| Caps {
            entries,
            files,
            bytes,
        };
        let all = globs(&["**/*.xml"]);
        let read = |c: &Caps| read_junit_within(dir.path(), &all, c, None);
        assert_eq!(
            read(&caps(100, 10, 1 << 20))
                .expect("reads")
                .map(|c| c.tests),
            Some(20)
        );
        let e = read(&caps(10, 10, 1 << 20)).expect_err("entries");
        assert!(e.reason.contains("looked at more than 10 files"), "{e}");
        let e = read(&caps(100, 1, 1 << 20)).expect_err("files");
        assert!(e.reason.contains("more than 1 files"), "{e}");
        let one = JUNIT_PYTEST.len() as u64;
        let e = read(&caps(100, 10, one + 1)).expect_err("bytes");
        assert!(
            e.reason
                .contains(&format!("more than the {} bytes", one + 1)),
            "{e}"
        );
        assert_eq!(e.file, "b/r.xml");
    }
}
