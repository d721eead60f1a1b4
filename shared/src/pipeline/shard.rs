//! Splitting a job's tests over its `parallel` shards so that the shards take about equally long.
//!
//! Longest-processing-time first (Graham, "Bounds on multiprocessing timing anomalies", 1969):
//! the tests with a recorded duration go, longest first, each to the shard with the least total
//! so far, which keeps the longest shard within 4/3 of the best possible split; tests never seen
//! before are dealt round-robin after them, starting from the least loaded shard. The split
//! depends only on its inputs, so every shard of a run computes the same one and takes its own
//! part.
//!
//! The pieces around it, all pure:
//! - [`list_tests`]: the job's test files, the checkout's files that its `shard_tests` globs
//!   match (symlinks not followed, bounded);
//! - [`Split`]: one commit's split of one job, stored once so that shards starting at different
//!   times (timings change meanwhile) and a later `rerun --failed` take the same parts;
//! - [`record`]: a shard's JUnit testcase times, summed per test file, into the job's timings.
//!
//! [`super::timings`] keeps splits and timings in JetStream.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};

use crate::git::text_hash;
use crate::test_report::CaseTime;

/// Most `shard_tests` globs per job.
pub const MAX_GLOBS: usize = 16;
/// Longest `shard_tests` glob, in bytes.
pub const MAX_GLOB_BYTES: usize = 256;
/// Most test files one job may list; more is the job's `error`.
pub const MAX_TESTS: usize = 10_000;
/// Longest test file path kept, in bytes (relative to the checkout); longer ones are the job's
/// `error`.
pub const MAX_TEST_PATH: usize = 512;
/// Most directory entries looked at while listing the tests; more is the job's `error`.
pub const MAX_VISITED: usize = 200_000;
/// Most bytes of a repository's recorded timings, all its jobs together (paths and numbers as
/// JSON): far below NATS' default `max_payload` of 1 MiB.
pub const MAX_TIMINGS_BYTES: usize = 512 * 1024;

/// Compiles `shard_tests` globs: relative to the checkout, `/`-separated, `*` within one
/// directory, `**` across any number (the `globset` crate's syntax with `literal_separator`).
///
/// Errors: more than [`MAX_GLOBS`], an empty, absolute or longer than [`MAX_GLOB_BYTES`] glob,
/// one with a `..` part, one `globset` cannot parse.
pub fn globs(patterns: &[String]) -> Result<GlobSet, String> {
    if patterns.len() > MAX_GLOBS {
        return Err(format!(
            "shard_tests lists {} globs, more than {MAX_GLOBS}",
            patterns.len()
        ));
    }
    let mut set = GlobSetBuilder::new();
    for p in patterns {
        if p.is_empty() || p.len() > MAX_GLOB_BYTES {
            return Err(format!(
                "shard_tests glob {:?} must be 1 to {MAX_GLOB_BYTES} bytes",
                crate::limits::clip(p, 64)
            ));
        }
        if p.starts_with('/') || p.split('/').any(|part| part == "..") {
            return Err(format!(
                "shard_tests glob {p:?} must be relative to the checkout and stay inside it"
            ));
        }
        let glob = GlobBuilder::new(p)
            .literal_separator(true)
            .build()
            .map_err(|e| format!("shard_tests glob {p:?}: {e}"))?;
        set.add(glob);
    }
    set.build().map_err(|e| format!("shard_tests: {e}"))
}

/// The checkout's regular files that `patterns` match, as `/`-separated paths relative to
/// `checkout`, sorted. `.git` is skipped, symlinks are not followed (nor listed), names that are
/// not UTF-8 are skipped.
///
/// Errors: bad globs ([`globs`]), more than [`MAX_VISITED`] entries to look at, more than
/// [`MAX_TESTS`] matches, a match longer than [`MAX_TEST_PATH`], an unreadable directory.
pub fn list_tests(checkout: &Path, patterns: &[String]) -> Result<Vec<String>, String> {
    let set = globs(patterns)?;
    let mut tests = Vec::new();
    let walk = walkdir::WalkDir::new(checkout)
        .follow_links(false)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| e.depth() == 0 || e.file_name() != ".git");
    for (visited, entry) in walk.enumerate() {
        if visited >= MAX_VISITED {
            return Err(format!(
                "listing the tests for shard_tests looked at {MAX_VISITED} files and directories \
                 without finishing: narrow the globs or the checkout"
            ));
        }
        let entry = entry.map_err(|e| format!("cannot list the tests for shard_tests: {e}"))?;
        if !entry.file_type().is_file() {
            continue;
        }
        let Ok(rel) = entry.path().strip_prefix(checkout) else {
            continue;
        };
        let Some(rel) = rel.to_str() else {
            if set.is_match(rel) {
                return Err(format!(
                    "shard_tests matches a file whose name is not UTF-8 ({}): rename it, or it \
                     would run in no shard",
                    rel.display()
                ));
            }
            continue;
        };
        if !set.is_match(rel) {
            continue;
        }
        if rel.chars().any(char::is_control) {
            return Err(format!(
                "shard_tests matches a file whose name holds a control character ({rel:?}): \
                 a list of one path per line cannot name it"
            ));
        }
        if rel.len() > MAX_TEST_PATH {
            return Err(format!(
                "shard_tests matches a path longer than {MAX_TEST_PATH} bytes: {}",
                crate::limits::clip(rel, 80)
            ));
        }
        if tests.len() == MAX_TESTS {
            return Err(format!(
                "shard_tests matches more than {MAX_TESTS} files: narrow the globs"
            ));
        }
        tests.push(rel.to_string());
    }
    tests.sort();
    Ok(tests)
}

/// One commit's split of one job's tests: which shard takes each test, for the test list it
/// was made from. Stored as JSON (about 2 bytes per test).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Split {
    /// How many shards it splits into.
    pub shards: u32,
    /// A hash of the test list ([`text_hash`] of the paths, one per line).
    pub tests_hash: String,
    /// The shard of each test, in the list's order; empty when no test had a time (the split
    /// is then round-robin over the list, and stored in a few bytes).
    pub shard_of: Vec<u32>,
    /// Tests that had a recorded time when it was made.
    pub timed: usize,
}

impl Split {
    /// The split of `tests` over `shards` by `durations` ([`split`]'s rule).
    pub fn new(tests: &[String], durations: &HashMap<String, u64>, shards: u32) -> Split {
        let shards = shards.max(1);
        let parts = split(tests, durations, shards);
        let mut owner: HashMap<&str, u32> = HashMap::with_capacity(tests.len());
        for (i, part) in parts.iter().enumerate() {
            for t in part {
                owner.insert(t.as_str(), i as u32);
            }
        }
        let timed = tests.iter().filter(|t| durations.contains_key(*t)).count();
        Split {
            shards,
            tests_hash: list_hash(tests),
            shard_of: if timed == 0 {
                vec![]
            } else {
                tests.iter().map(|t| owner[t.as_str()]).collect()
            },
            timed,
        }
    }

    /// The tests of shard `index` (from 0), in the list's order.
    ///
    /// Errors: `tests` is not the list the split was made from, or the split has another
    /// number of shards (the commit's file changed between its shards: it cannot).
    pub fn part(&self, tests: &[String], index: u32, shards: u32) -> Result<Vec<String>, String> {
        let round_robin = self.timed == 0 && self.shard_of.is_empty();
        if self.shards != shards.max(1)
            || (!round_robin && self.shard_of.len() != tests.len())
            || self.tests_hash != list_hash(tests)
        {
            return Err(format!(
                "this shard lists other tests ({} in {} shards) than the split the run's first \
                 shard stored ({} in {} shards)",
                tests.len(),
                shards,
                self.shard_of.len(),
                self.shards
            ));
        }
        if round_robin {
            let mut parts = split(tests, &HashMap::new(), self.shards);
            return Ok(if index < self.shards {
                parts.swap_remove(index as usize)
            } else {
                vec![]
            });
        }
        Ok(tests
            .iter()
            .zip(&self.shard_of)
            .filter(|(_, s)| **s == index)
            .map(|(t, _)| t.clone())
            .collect())
    }
}

fn list_hash(tests: &[String]) -> String {
    text_hash(&tests.join("\n"))
}

/// Where a job's recorded times live: one entry per repository in `ci-timings`, every job's
/// times in it (milliseconds by test file, by job), at most [`MAX_TIMINGS_BYTES`] as JSON: a
/// repository's share of the bucket is bounded whatever its jobs and files.
pub type Timings = BTreeMap<String, BTreeMap<String, u64>>;

/// Adds `measured` (milliseconds by test file, from one shard's reports: [`FileIndex::measure`])
/// to job `job`'s times in `timings`: a file measured now replaces its earlier time. Then
/// `timings` is cut to [`MAX_TIMINGS_BYTES`] as JSON: first other jobs' times (whole jobs),
/// then this job's files not in `tests`, then the last of `tests`. Returns how many files got
/// a time.
pub fn record(
    timings: &mut Timings,
    job: &str,
    tests: &[String],
    measured: &BTreeMap<String, u64>,
) -> usize {
    if measured.is_empty() {
        return 0;
    }
    let mine = timings.entry(job.to_string()).or_default();
    for (file, ms) in measured {
        mine.insert(file.clone(), *ms);
    }
    // What each entry takes as JSON: its escaped key, a colon, a number, a comma.
    let cost = |k: &str| serde_json::to_string(k).map_or(k.len() * 6, |s| s.len()) + 22;
    let job_cost = |times: &BTreeMap<String, u64>, name: &str| -> usize {
        times.keys().map(|k| cost(k)).sum::<usize>() + cost(name) + 4
    };
    let mut bytes: usize = timings.iter().map(|(j, t)| job_cost(t, j)).sum::<usize>() + 2;
    let others: Vec<String> = timings.keys().filter(|j| *j != job).cloned().collect();
    for other in others {
        if bytes <= MAX_TIMINGS_BYTES {
            break;
        }
        if let Some(t) = timings.remove(&other) {
            bytes -= job_cost(&t, &other);
        }
    }
    if bytes > MAX_TIMINGS_BYTES {
        let mine = timings.get_mut(job).expect("inserted above");
        let listed: std::collections::HashSet<&str> = tests.iter().map(String::as_str).collect();
        let mut dropped: Vec<String> = mine
            .keys()
            .filter(|k| !listed.contains(k.as_str()))
            .cloned()
            .collect();
        dropped.extend(tests.iter().rev().cloned());
        for k in dropped {
            if bytes <= MAX_TIMINGS_BYTES {
                break;
            }
            if mine.remove(&k).is_some() {
                bytes -= cost(&k);
            }
        }
    }
    measured.len()
}

/// The longest `classname` looked at, in bytes; a longer one belongs to no file.
const MAX_CLASS: usize = 1024;
/// Most dotted heads of a `classname` looked up, longest first.
const MAX_HEADS: usize = 16;
/// Most dotted tails of a file's module name indexed, shortest first (`test_x`, `unit.test_x`,
/// ...): enough for Java packages, bounded for hostile paths.
const MAX_TAILS: usize = 16;

/// Finds the test file of a JUnit testcase among a job's test files.
#[derive(Debug)]
pub struct FileIndex {
    /// Each file by its path.
    paths: HashMap<String, usize>,
    /// Each file by its module name (`tests/unit/test_x.py`: `tests.unit.test_x`) and by its
    /// last dotted tails (`unit.test_x`, `test_x`); a full name wins over another file's tail.
    modules: HashMap<String, usize>,
    tests: Vec<String>,
}

impl FileIndex {
    /// The index of `tests` (at most [`MAX_TESTS`] paths of at most [`MAX_TEST_PATH`] bytes:
    /// at most `MAX_TAILS` (16) + 1 keys each).
    pub fn new(tests: &[String]) -> FileIndex {
        let module = |t: &str| -> String {
            let stem = match t.rfind('.') {
                Some(dot) if dot > t.rfind('/').map_or(0, |s| s + 1) => &t[..dot],
                _ => t,
            };
            stem.replace('/', ".")
        };
        let mut modules = HashMap::new();
        for (i, t) in tests.iter().enumerate() {
            modules.entry(module(t)).or_insert(i);
        }
        for (i, t) in tests.iter().enumerate() {
            let m = module(t);
            for (dot, _) in m.rmatch_indices('.').take(MAX_TAILS) {
                modules.entry(m[dot + 1..].to_string()).or_insert(i);
            }
        }
        FileIndex {
            paths: tests
                .iter()
                .enumerate()
                .map(|(i, t)| (t.clone(), i))
                .collect(),
            modules,
            tests: tests.to_vec(),
        }
    }

    /// A case's file: its `file` attribute when that names a listed file (pytest's `xunit1`),
    /// else the file whose module name (or a dotted tail of it) is the longest dotted head of
    /// its `classname` (pytest `tests.test_x.TestY` → `tests/test_x.py`; Surefire
    /// `com.x.YTest$Inner` → `src/test/java/com/x/YTest.java`).
    pub fn file_of(&self, case: &CaseTime) -> Option<&str> {
        if !case.file.is_empty() {
            if let Some(&i) = self.paths.get(case.file.trim_start_matches("./")) {
                return Some(&self.tests[i]);
            }
        }
        if case.class.len() > MAX_CLASS {
            return None;
        }
        let class = case.class.split('$').next().unwrap_or_default();
        let mut end = class.len();
        for _ in 0..MAX_HEADS {
            if let Some(&i) = self.modules.get(&class[..end]) {
                return Some(&self.tests[i]);
            }
            end = class[..end].rfind('.')?;
        }
        None
    }

    /// Adds one case's time to its file's total in `measured` (cases of no listed file are
    /// ignored); at most one entry per listed file.
    pub fn measure(&self, case: &CaseTime, measured: &mut BTreeMap<String, u64>) {
        if let Some(file) = self.file_of(case) {
            let total = measured.entry(file.to_string()).or_default();
            *total = total.saturating_add(case.ms);
        }
    }
}

/// Splits `tests` (file paths or test ids, in a stable order) over `shards` shards, using
/// `durations` (milliseconds, by test) where known. Returns one list per shard, each in the
/// order of `tests`. `shards` of 0 counts as 1.
pub fn split(tests: &[String], durations: &HashMap<String, u64>, shards: u32) -> Vec<Vec<String>> {
    let n = shards.max(1) as usize;
    let mut load = vec![0u64; n];
    let mut owner: HashMap<&str, usize> = HashMap::with_capacity(tests.len());
    let mut known: Vec<(&str, u64)> = tests
        .iter()
        .filter_map(|t| durations.get(t).map(|d| (t.as_str(), *d)))
        .collect();
    // Longest first; ties in the tests' own order (a stable sort keeps it).
    known.sort_by_key(|k| std::cmp::Reverse(k.1));
    for (test, ms) in known {
        let least = least_loaded(&load);
        // A test recorded at 0 ms (no `time`, under a millisecond) still weighs something, or
        // every such test would go to one shard.
        load[least] += ms.max(1);
        owner.insert(test, least);
    }
    let mut next = least_loaded(&load);
    for t in tests.iter().filter(|t| !durations.contains_key(*t)) {
        owner.insert(t.as_str(), next);
        next = (next + 1) % n;
    }
    let mut out = vec![Vec::new(); n];
    for t in tests {
        if let Some(&shard) = owner.get(t.as_str()) {
            out[shard].push(t.clone());
        }
    }
    out
}

/// The first shard with the least total.
fn least_loaded(load: &[u64]) -> usize {
    load.iter()
        .enumerate()
        .min_by_key(|(i, l)| (**l, *i))
        .map_or(0, |(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("tests/test_{i:02}.py")).collect()
    }

    fn total(part: &[String], d: &HashMap<String, u64>) -> u64 {
        part.iter().map(|t| d.get(t).copied().unwrap_or(0)).sum()
    }

    #[test]
    fn skewed_durations_balance_within_lpts_bound() {
        let tests = names(12);
        // One long test, a few medium ones, many short ones: 100 s in all.
        let ms = [
            30_000, 12_000, 10_000, 9_000, 8_000, 7_000, 6_000, 6_000, 5_000, 3_000, 2_000, 2_000,
        ];
        let d: HashMap<String, u64> = tests.iter().cloned().zip(ms).collect();
        let parts = split(&tests, &d, 4);
        let longest = parts.iter().map(|p| total(p, &d)).max().unwrap();
        // The ideal is 25 s, but no split beats the 30 s test.
        assert_eq!(longest, 30_000, "{parts:?}");
        let all: usize = parts.iter().map(Vec::len).sum();
        assert_eq!(all, 12, "every test in exactly one shard");
        // A naive split in file order would put 52 s in the first shard.
        let naive: u64 = ms[..3].iter().sum();
        assert!(longest < naive);
    }

    #[test]
    fn unseen_tests_are_dealt_round_robin_and_every_shard_agrees() {
        let tests = names(7);
        let d: HashMap<String, u64> = [(tests[0].clone(), 5_000)].into_iter().collect();
        let parts = split(&tests, &d, 3);
        assert_eq!(
            parts[0],
            vec![tests[0].clone(), tests[3].clone(), tests[6].clone()]
        );
        assert_eq!(parts[1], vec![tests[1].clone(), tests[4].clone()]);
        assert_eq!(parts[2], vec![tests[2].clone(), tests[5].clone()]);
        assert_eq!(parts.iter().map(Vec::len).sum::<usize>(), 7);
        assert_eq!(
            split(&tests, &d, 3),
            parts,
            "the same inputs give the same split"
        );
        assert_eq!(split(&tests, &d, 0).len(), 1);
    }

    fn case<'a>(class: &'a str, file: &'a str, ms: u64) -> CaseTime<'a> {
        CaseTime { class, file, ms }
    }

    fn touch(root: &Path, rel: &str) {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, "").unwrap();
    }

    #[test]
    fn tests_are_listed_sorted_without_following_links_or_entering_git() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for f in [
            "tests/test_b.py",
            "tests/test_a.py",
            "tests/unit/test_c.py",
            "tests/helper.py",
            ".git/test_x.py",
            "test_top.py",
        ] {
            touch(root, f);
        }
        // A loop of directories and a link to a test file: neither followed nor listed.
        std::os::unix::fs::symlink(root, root.join("tests/loop")).unwrap();
        std::os::unix::fs::symlink(root.join("tests/test_a.py"), root.join("tests/test_l.py"))
            .unwrap();
        let tests = list_tests(root, &["tests/**/test_*.py".into()]).unwrap();
        assert_eq!(
            tests,
            ["tests/test_a.py", "tests/test_b.py", "tests/unit/test_c.py"]
        );
        // `*` stays within a directory.
        let top = list_tests(root, &["*.py".into()]).unwrap();
        assert_eq!(top, ["test_top.py"]);
    }

    #[test]
    fn bad_globs_and_too_many_tests_are_errors() {
        for bad in ["/abs/*.py", "../x/*.py", "a/../../b", "", "[z-a"] {
            assert!(globs(&[bad.to_string()]).is_err(), "{bad:?} accepted");
        }
        assert!(globs(&vec!["a".to_string(); MAX_GLOBS + 1]).is_err());
        assert!(globs(&["x".repeat(MAX_GLOB_BYTES + 1)]).is_err());
        let dir = tempfile::tempdir().unwrap();
        for i in 0..=MAX_TESTS {
            std::fs::write(dir.path().join(format!("t{i}")), "").unwrap();
        }
        let e = list_tests(dir.path(), &["t*".into()]).unwrap_err();
        assert!(e.contains("more than 10000 files"), "{e}");
    }

    #[test]
    fn a_stored_split_gives_each_shard_its_part_and_refuses_another_list() {
        let tests = names(5);
        let d: HashMap<String, u64> = [(tests[4].clone(), 9_000)].into_iter().collect();
        let s = Split::new(&tests, &d, 2);
        let parts: Vec<Vec<String>> = (0..2).map(|i| s.part(&tests, i, 2).unwrap()).collect();
        assert_eq!(parts, split(&tests, &d, 2));
        assert_eq!(s.timed, 1);
        // A split stored, read back, then used by a shard that started later.
        let back: Split = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
        assert_eq!(back.part(&tests, 1, 2).unwrap(), parts[1]);
        assert!(s.part(&tests[..4], 0, 2).is_err(), "another test list");
        assert!(s.part(&tests, 0, 3).is_err(), "another shard count");
        let mut renamed = tests.clone();
        renamed[0] = "tests/other.py".into();
        assert!(s.part(&renamed, 0, 2).is_err(), "same length, other names");
    }

    #[test]
    fn testcase_times_are_summed_per_file_by_file_or_class() {
        let tests: Vec<String> = [
            "tests/test_a.py",
            "tests/unit/test_b.py",
            "src/test/java/com/x/YTest.java",
        ]
        .map(String::from)
        .to_vec();
        let index = FileIndex::new(&tests);
        let long = "x.".repeat(600);
        let cases = [
            // pytest (xunit2): module and class in `classname`.
            case("tests.test_a.TestX", "", 1_000),
            case("tests.test_a", "", 500),
            // pytest (xunit1): the file attribute.
            case("whatever", "tests/unit/test_b.py", 250),
            case("unit.test_b", "", 250),
            // Surefire: a class name that is the tail of the file's path, an inner class.
            case("com.x.YTest", "", 3_000),
            case("com.x.YTest$Inner", "", 1_000),
            // Nobody's; a class too long to look at.
            case("other.module.T", "", 7_000),
            case(&long, "", 7_000),
        ];
        let mut measured = BTreeMap::new();
        for c in &cases {
            index.measure(c, &mut measured);
        }
        let mut timings = Timings::from([
            (
                "test".to_string(),
                BTreeMap::from([("tests/test_a.py".to_string(), 99_999)]),
            ),
            (
                "lint".to_string(),
                BTreeMap::from([("gone.py".to_string(), 5)]),
            ),
        ]);
        assert_eq!(record(&mut timings, "test", &tests, &measured), 3);
        assert_eq!(
            timings["test"],
            BTreeMap::from([
                ("tests/test_a.py".to_string(), 1_500),
                ("tests/unit/test_b.py".to_string(), 500),
                ("src/test/java/com/x/YTest.java".to_string(), 4_000),
            ])
        );
        assert_eq!(timings["lint"]["gone.py"], 5, "other jobs' times kept");
        assert_eq!(record(&mut timings, "test", &tests, &BTreeMap::new()), 0);
    }

    #[test]
    fn a_class_with_many_dots_costs_a_bounded_number_of_lookups() {
        // Paths of 250 directories: the index keeps a few tails of each, not every one.
        let deep: Vec<String> = (0..50)
            .map(|i| format!("{}{i}.py", "a/".repeat(250)))
            .collect();
        let index = FileIndex::new(&deep);
        assert!(index.modules.len() <= deep.len() * (MAX_TAILS + 1));
        let dotted = "a.".repeat(400) + "x";
        assert_eq!(index.file_of(&case(&dotted, "", 1)), None);
    }

    #[test]
    fn timings_are_cut_to_their_byte_bound_other_jobs_first() {
        let old: BTreeMap<String, u64> = (0..20_000)
            .map(|i| (format!("old/{i:0>40}.py"), 1))
            .collect();
        let escaped: BTreeMap<String, u64> = (0..5_000)
            .map(|i| (format!("{}{i}", "\"".repeat(30)), 1))
            .collect();
        let mut timings = Timings::from([
            ("other".to_string(), old.clone()),
            ("quotes".to_string(), escaped),
            ("test".to_string(), old),
        ]);
        let tests = names(3);
        let measured: BTreeMap<String, u64> = tests.iter().map(|t| (t.clone(), 10)).collect();
        assert_eq!(record(&mut timings, "test", &tests, &measured), 3);
        let bytes = serde_json::to_vec(&timings).unwrap().len();
        assert!(bytes <= MAX_TIMINGS_BYTES, "{bytes} bytes");
        for t in &tests {
            assert_eq!(timings["test"].get(t), Some(&10), "{t} kept");
        }
        assert!(!timings.contains_key("other") || !timings.contains_key("quotes"));
    }

    #[test]
    fn tests_recorded_at_zero_ms_still_spread_over_the_shards() {
        let tests = names(9);
        let d: HashMap<String, u64> = tests.iter().map(|t| (t.clone(), 0)).collect();
        let parts = split(&tests, &d, 3);
        assert!(parts.iter().all(|p| p.len() == 3), "{parts:?}");
    }

    #[test]
    fn a_split_without_times_is_stored_small_and_dealt_round_robin() {
        let tests = names(5);
        let s = Split::new(&tests, &HashMap::new(), 2);
        assert!(s.shard_of.is_empty());
        assert_eq!(
            s.part(&tests, 0, 2).unwrap(),
            split(&tests, &HashMap::new(), 2)[0]
        );
        assert_eq!(
            s.part(&tests, 1, 2).unwrap(),
            split(&tests, &HashMap::new(), 2)[1]
        );
        assert!(s.part(&tests[..4], 0, 2).is_err());
    }

    #[test]
    fn names_a_list_cannot_carry_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        touch(dir.path(), "t/a.py\nt/b.py");
        let e = list_tests(dir.path(), &["t/**".into()]).unwrap_err();
        assert!(e.contains("control character"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        use std::os::unix::ffi::OsStrExt;
        let name = std::ffi::OsStr::from_bytes(b"test_\xff.py");
        std::fs::write(dir.path().join(name), "").unwrap();
        let e = list_tests(dir.path(), &["*.py".into()]).unwrap_err();
        assert!(e.contains("not UTF-8"), "{e}");
    }
}
