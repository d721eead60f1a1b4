//! The watched repository's own settings: `.jetci.toml` at its root (DESIGN.md, "The watched
//! repository's own settings").
//!
//! ```toml
//! command = "cargo test"          # run with `sh -c` in the checkout
//! timeout = "10m"                 # humantime duration
//! labels = ["linux", "python"]    # what a runner must have
//! junit = ["target/*.xml"]        # JUnit XML files to read counts from
//! network = false                 # no network but loopback in the job's sandbox
//! history = "first-parent"        # which new commits the observer publishes (default "all")
//! [env]
//! RUST_BACKTRACE = "1"
//! ```
//!
//! A pipeline names its jobs instead of one `command` (the top-level `timeout`, `labels`, `junit`
//! and `env` are then every job's defaults):
//!
//! ```toml
//! fail_fast = false                 # true: the first failed job cancels the rest of the run
//! [jobs.lint]
//! command = "ruff check ."
//! [jobs.test]
//! command = "pytest -q"
//! needs = ["lint"]                  # starts once lint passed; otherwise `skipped`
//! matrix = { python = ["3.11", "3.12"] }   # one job per value (several keys: the cross product)
//! parallel = 4                      # each split into 4 shards
//! shard_tests = ["tests/**/test_*.py"]  # test files shared among the shards: JETCI_SHARD_TESTS
//! junit = ["report.xml"]            # its testcase times balance the next commits' shards
//! labels = ["python"]
//! timeout = "20m"
//! env = { PYTHONHASHSEED = "0" }
//! [jobs.docs]
//! command = "make docs"
//! branches = ["main", "release/*"]  # only on these branches (globs)
//! allow_failure = true              # its failure shows but does not fail the run
//! ```
//!
//! [`crate::pipeline`] expands the jobs for a branch. The observer reads the file for the labels
//! and the pipeline; the runner parses it again from its checkout and turns an invalid file into
//! the commit's `error` result, quoting the line and the problem.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::subjects::is_token;

/// The file name at the repository root.
pub const FILE_NAME: &str = ".jetci.toml";

/// The command when a repository has no `.jetci.toml` (the original design's test command).
pub const DEFAULT_COMMAND: &str = "python3 -m unittest discover";

/// Jobs a pipeline may have once its matrices and shards are expanded.
pub const MAX_JOBS: usize = 256;

/// Longest job name in the file, matrix key and matrix value, in bytes.
pub const MAX_NAME: usize = 64;

/// Most keys in one job's matrix (a job's name holds every key and value).
pub const MAX_MATRIX_KEYS: usize = 8;

/// A parsed `.jetci.toml`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RepoConfig {
    /// Shell command, run with `sh -c`; `None` means the runner's default.
    pub command: Option<String>,
    /// Wall-clock limit for the command.
    pub timeout: Option<Duration>,
    /// Extra environment variables for the command.
    pub env: BTreeMap<String, String>,
    /// Runner labels the job needs.
    pub labels: Vec<String>,
    /// Globs of JUnit XML files, relative to the checkout.
    pub junit: Vec<String>,
    /// The first failed job cancels the rest of the run (pipelines only).
    pub fail_fast: bool,
    /// The pipeline's jobs as the file names them, by name; empty for a file with one `command`
    /// (or none), which is a run of one job.
    pub jobs: Vec<JobSpec>,
    /// `Some(false)`: the job's sandbox has no network but loopback (`None`: the runner's
    /// `--network` decides).
    pub network: Option<bool>,
    /// Which of a branch's new commits the observer publishes (the observer reads it at the
    /// head of the branch it plans; the runner ignores it).
    pub history: HistoryMode,
}

/// `history`: which commits of a branch's new history are tested.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HistoryMode {
    /// `"all"`: every new commit the head reaches, the commits a merge brought in included.
    #[default]
    All,
    /// `"first-parent"`: only the commits reached from the head by following first parents (the
    /// commits the branch itself moved through: a merge commit, not the side branch's commits).
    FirstParent,
}

/// One `[jobs.<name>]` table, before its matrix and shards are expanded
/// ([`crate::pipeline::plan()`]). Defaults from the top level are already applied.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobSpec {
    /// The table's name: `[A-Za-z0-9_-]+`, at most [`MAX_NAME`] bytes, not all digits.
    pub name: String,
    /// The line of its `[jobs.<name>]` header (1-based), for errors.
    pub line: usize,
    pub command: String,
    /// Names of jobs (as in the file) that must pass before this one starts.
    pub needs: Vec<String>,
    /// Matrix keys with their values, keys in sorted order: one job per combination.
    pub matrix: Vec<(String, Vec<String>)>,
    /// Shards per matrix combination (1: not split).
    pub parallel: u32,
    pub labels: Vec<String>,
    pub timeout: Option<Duration>,
    pub env: BTreeMap<String, String>,
    /// Branch globs it runs on (empty: every branch).
    pub branches: Vec<String>,
    pub allow_failure: bool,
    pub junit: Vec<String>,
    /// Globs of its test files, to split among its shards ([`crate::pipeline::shard`]): each
    /// shard gets its part in the file `JETCI_SHARD_TESTS` names.
    pub shard_tests: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    command: Option<String>,
    timeout: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    labels: Vec<String>,
    #[serde(default)]
    junit: Vec<String>,
    #[serde(default)]
    fail_fast: bool,
    jobs: Option<BTreeMap<String, toml::Spanned<RawJob>>>,
    network: Option<bool>,
    #[serde(default)]
    history: HistoryMode,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    command: Option<String>,
    #[serde(default)]
    needs: Vec<String>,
    matrix: Option<BTreeMap<String, Vec<String>>>,
    parallel: Option<u32>,
    #[serde(default)]
    labels: Vec<String>,
    timeout: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    branches: Vec<String>,
    #[serde(default)]
    allow_failure: bool,
    junit: Option<Vec<String>>,
    #[serde(default)]
    shard_tests: Vec<String>,
}

/// An invalid `.jetci.toml`; the message names the line where the parser knows it.
#[derive(Debug, thiserror::Error)]
#[error("invalid {FILE_NAME}: {0}")]
pub struct ConfigError(pub String);

impl RepoConfig {
    /// Parses the file's text.
    ///
    /// Errors: TOML syntax, unknown keys, wrong types (with line and column, as the `toml` crate
    /// reports them), a `timeout` that is not a duration of up to a week, an empty `command`, a
    /// label that is not `[A-Za-z0-9_-]+`, more than [`MAX_LABELS`] labels or a longer one than
    /// [`MAX_LABEL_BYTES`], an `env` name that is empty or holds `=`. The caller checks the
    /// file's size first ([`check_size`]).
    pub fn parse(text: &str) -> Result<RepoConfig, ConfigError> {
        let raw: Raw = toml::from_str(text)
            .map_err(|e| ConfigError(e.to_string().trim().replace('\n', " ")))?;
        let timeout = raw.timeout.as_deref().map(parse_timeout).transpose()?;
        if let Some(c) = &raw.command {
            if c.trim().is_empty() {
                return Err(ConfigError("command is empty".into()));
            }
        }
        check_labels(&raw.labels)?;
        check_env(&raw.env)?;
        let mut config = RepoConfig {
            command: raw.command,
            timeout,
            env: raw.env,
            labels: raw.labels,
            junit: raw.junit,
            fail_fast: raw.fail_fast,
            jobs: vec![],
            network: raw.network,
            history: raw.history,
        };
        if let Some(jobs) = raw.jobs {
            if config.command.is_some() {
                return Err(ConfigError(
                    "give either a top-level `command` or `[jobs.<name>]` tables, not both".into(),
                ));
            }
            if jobs.is_empty() {
                return Err(ConfigError("`jobs` names no job".into()));
            }
            if jobs.len() > MAX_JOBS {
                return Err(ConfigError(format!(
                    "{} jobs, more than the limit of {MAX_JOBS}",
                    jobs.len()
                )));
            }
            let lines = LineStarts::of(text);
            for (name, job) in jobs {
                let line = lines.line(job.span().start);
                let spec = job_spec(&config, name, line, job.into_inner())
                    .map_err(|e| ConfigError(format!("line {line}: {e}")))?;
                config.jobs.push(spec);
            }
            check_pipeline(&config.jobs)?;
        }
        Ok(config)
    }

    /// Whether the file names a pipeline's jobs (rather than one `command`).
    pub fn is_pipeline(&self) -> bool {
        !self.jobs.is_empty()
    }
}

/// Where each line of a text starts, to name the line of a byte offset (one pass over the text).
struct LineStarts(Vec<usize>);

impl LineStarts {
    fn of(text: &str) -> LineStarts {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        LineStarts(starts)
    }

    /// The 1-based line of byte `offset`.
    fn line(&self, offset: usize) -> usize {
        self.0.partition_point(|&start| start <= offset).max(1)
    }
}

fn check_labels(labels: &[String]) -> Result<(), ConfigError> {
    check_labels_bounds(labels)?;
    match labels.iter().find(|l| !is_token(l)) {
        Some(l) => Err(ConfigError(format!(
            "label {l:?} must use only letters, digits, '-' and '_'"
        ))),
        None => Ok(()),
    }
}

fn check_env(env: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    match env
        .keys()
        .find(|k| k.is_empty() || k.contains('=') || k.contains('\0'))
    {
        Some(k) => Err(ConfigError(format!(
            "env name {k:?} is not a valid variable name"
        ))),
        None => Ok(()),
    }
}

/// A job name, matrix key or value: short, and printable.
fn check_text(what: &str, value: &str) -> Result<(), ConfigError> {
    if value.is_empty() || value.len() > MAX_NAME || value.chars().any(char::is_control) {
        return Err(ConfigError(format!(
            "{what} {value:?} must be 1 to {MAX_NAME} bytes without control characters"
        )));
    }
    Ok(())
}

/// One job's table, checked, with the top level's defaults applied.
fn job_spec(
    top: &RepoConfig,
    name: String,
    line: usize,
    raw: RawJob,
) -> Result<JobSpec, ConfigError> {
    check_text("job name", &name)?;
    if !is_token(&name) || name.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ConfigError(format!(
            "job name {name:?} must use only letters, digits, '-' and '_', and not only digits"
        )));
    }
    let command = raw
        .command
        .filter(|c| !c.trim().is_empty())
        .ok_or_else(|| ConfigError(format!("job {name:?} has no command")))?;
    let mut matrix = vec![];
    let keys = raw.matrix.as_ref().map_or(0, |m| m.len());
    if keys > MAX_MATRIX_KEYS {
        return Err(ConfigError(format!(
            "job {name:?}: a matrix of {keys} keys (at most {MAX_MATRIX_KEYS})"
        )));
    }
    for (key, values) in raw.matrix.into_iter().flatten() {
        check_text("matrix key", &key)?;
        if !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(ConfigError(format!(
                "matrix key {key:?} must use only letters, digits and '_' (it names JETCI_MATRIX_{})",
                key.to_ascii_uppercase()
            )));
        }
        if values.is_empty() {
            return Err(ConfigError(format!(
                "job {name:?}: matrix key {key:?} has no values"
            )));
        }
        for (i, v) in values.iter().enumerate() {
            check_text("matrix value", v)?;
            if values[..i].contains(v) {
                return Err(ConfigError(format!(
                    "job {name:?}: matrix key {key:?} lists {v:?} twice"
                )));
            }
        }
        matrix.push((key, values));
    }
    let parallel = raw.parallel.unwrap_or(1);
    if parallel == 0 || parallel as usize > MAX_JOBS {
        return Err(ConfigError(format!(
            "job {name:?}: parallel must be 1 to {MAX_JOBS}, not {parallel}"
        )));
    }
    check_labels(&raw.labels)?;
    check_env(&raw.env)?;
    for (i, n) in raw.needs.iter().enumerate() {
        if raw.needs[..i].contains(n) {
            return Err(ConfigError(format!(
                "job {name:?} lists {n:?} twice in `needs`"
            )));
        }
    }
    for b in &raw.branches {
        glob::Pattern::new(b)
            .map_err(|e| ConfigError(format!("job {name:?}: branch glob {b:?}: {e}")))?;
    }
    crate::pipeline::shard::globs(&raw.shard_tests)
        .map_err(|e| ConfigError(format!("job {name:?}: {e}")))?;
    let mut labels = top.labels.clone();
    labels.extend(raw.labels.into_iter().filter(|l| !top.labels.contains(l)));
    let mut env = top.env.clone();
    env.extend(raw.env);
    Ok(JobSpec {
        line,
        command,
        needs: raw.needs,
        matrix,
        parallel,
        labels,
        timeout: raw
            .timeout
            .as_deref()
            .map(parse_timeout)
            .transpose()?
            .or(top.timeout),
        env,
        branches: raw.branches,
        allow_failure: raw.allow_failure,
        junit: raw.junit.unwrap_or_else(|| top.junit.clone()),
        shard_tests: raw.shard_tests,
        name,
    })
}

/// The pipeline as a whole: every `needs` names a job, `needs` has no cycle, and at most
/// [`MAX_JOBS`] jobs once matrices and shards are expanded.
fn check_pipeline(jobs: &[JobSpec]) -> Result<(), ConfigError> {
    let index: BTreeMap<&str, usize> = jobs
        .iter()
        .enumerate()
        .map(|(i, j)| (j.name.as_str(), i))
        .collect();
    for job in jobs {
        if let Some(n) = job.needs.iter().find(|n| !index.contains_key(n.as_str())) {
            return Err(ConfigError(format!(
                "line {}: job {:?} needs {n:?}, which is not a job of this file",
                job.line, job.name
            )));
        }
    }
    let mut total: usize = 0;
    for job in jobs {
        let count = job
            .matrix
            .iter()
            .fold(job.parallel as usize, |n, (_, values)| {
                n.saturating_mul(values.len())
            });
        total = total.saturating_add(count);
        if total > MAX_JOBS {
            return Err(ConfigError(format!(
                "line {}: job {:?} brings the pipeline to more than {MAX_JOBS} jobs once its matrix and shards are expanded",
                job.line, job.name
            )));
        }
    }
    // Kahn's algorithm over adjacency lists (linear): what is left once every job without unmet
    // needs is taken is a cycle.
    let mut needed_by: Vec<Vec<usize>> = vec![Vec::new(); jobs.len()];
    for (k, job) in jobs.iter().enumerate() {
        for n in &job.needs {
            needed_by[index[n.as_str()]].push(k);
        }
    }
    let mut unmet: Vec<usize> = jobs.iter().map(|j| j.needs.len()).collect();
    let mut ready: Vec<usize> = (0..jobs.len()).filter(|&i| unmet[i] == 0).collect();
    let mut taken = 0;
    while let Some(i) = ready.pop() {
        taken += 1;
        for &k in &needed_by[i] {
            unmet[k] -= 1;
            if unmet[k] == 0 {
                ready.push(k);
            }
        }
    }
    if taken < jobs.len() {
        let cycle: Vec<&JobSpec> = jobs
            .iter()
            .filter(|j| unmet[index[j.name.as_str()]] > 0)
            .collect();
        let names: Vec<&str> = cycle.iter().map(|j| j.name.as_str()).collect();
        return Err(ConfigError(format!(
            "line {}: `needs` form a cycle among jobs {}",
            cycle[0].line,
            names.join(", ")
        )));
    }
    Ok(())
}

/// The largest `.jetci.toml` read, in bytes (1 MiB): observers and runners check a file's size
/// before they read it, so a huge one costs nothing but an `error` result.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// The most labels a job may ask for: they travel in every commit, job and state message.
pub const MAX_LABELS: usize = 32;

/// The most bytes of one label.
pub const MAX_LABEL_BYTES: usize = 64;

/// Refuses a `.jetci.toml` of `len` bytes when it is larger than [`MAX_FILE_BYTES`].
pub fn check_size(len: u64) -> Result<(), ConfigError> {
    if len > MAX_FILE_BYTES {
        return Err(ConfigError(format!(
            "the file is {len} bytes, more than the limit of {MAX_FILE_BYTES} bytes (1 MiB)"
        )));
    }
    Ok(())
}

/// `timeout`: a duration of more than zero and at most [`crate::limits::MAX_JOB_TIME`].
fn parse_timeout(text: &str) -> Result<Duration, ConfigError> {
    crate::limits::job_time(text).map_err(|e| ConfigError(format!("timeout {e}")))
}

/// At most [`MAX_LABELS`] labels of at most [`MAX_LABEL_BYTES`] each.
fn check_labels_bounds(labels: &[String]) -> Result<(), ConfigError> {
    if labels.len() > MAX_LABELS {
        return Err(ConfigError(format!(
            "{} labels are more than the limit of {MAX_LABELS}",
            labels.len()
        )));
    }
    match labels.iter().find(|l| l.len() > MAX_LABEL_BYTES) {
        Some(l) => Err(ConfigError(format!(
            "label {} is longer than {MAX_LABEL_BYTES} bytes",
            crate::limits::clip(l, MAX_LABEL_BYTES)
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_file() {
        let c = RepoConfig::parse(
            "command = \"make test\"\ntimeout = \"90s\"\nlabels = [\"linux\"]\njunit = [\"out/*.xml\"]\n[env]\nA = \"1\"\n",
        )
        .unwrap();
        assert_eq!(c.command.as_deref(), Some("make test"));
        assert_eq!(c.timeout, Some(Duration::from_secs(90)));
        assert_eq!(c.labels, vec!["linux"]);
        assert_eq!(c.env["A"], "1");
        assert_eq!(RepoConfig::parse("").unwrap(), RepoConfig::default());
        assert_eq!(
            RepoConfig::parse("network = false").unwrap().network,
            Some(false)
        );
        let history = |text: &str| RepoConfig::parse(text).map(|c| c.history);
        assert_eq!(history("").unwrap(), HistoryMode::All);
        assert_eq!(history("history = \"all\"").unwrap(), HistoryMode::All);
        assert_eq!(
            history("history = \"first-parent\"").unwrap(),
            HistoryMode::FirstParent
        );
        let e = history("command = \"x\"\nhistory = \"linear\"\n").unwrap_err();
        assert!(
            e.to_string().contains("line 2") && e.to_string().contains("first-parent"),
            "{e}"
        );
    }

    #[test]
    fn errors_point_at_the_problem() {
        let e = RepoConfig::parse("command = \"x\"\ntimeout = 5\n").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        let e = RepoConfig::parse("comand = \"x\"\n").unwrap_err();
        assert!(e.to_string().contains("comand"), "{e}");
        let e = RepoConfig::parse("timeout = \"soon\"\n").unwrap_err();
        assert!(e.to_string().contains("soon"), "{e}");
        assert!(RepoConfig::parse("labels = [\"a b\"]").is_err());
        assert!(RepoConfig::parse("timeout = \"0s\"").is_err());
        assert!(RepoConfig::parse("command = \"  \"").is_err());
        assert!(RepoConfig::parse("command = ").is_err());
    }

    const PIPELINE: &str = r#"fail_fast = true
timeout = "5m"
labels = ["linux"]

[jobs.lint]
command = "ruff check ."

[jobs.test]
command = "pytest"
needs = ["lint"]
matrix = { python = ["3.11", "3.12"] }
parallel = 2
labels = ["python"]
env = { A = "1" }

[jobs.docs]
command = "make docs"
branches = ["main", "release/*"]
allow_failure = true
timeout = "1m"
"#;

    #[test]
    fn a_pipeline_file() {
        let c = RepoConfig::parse(PIPELINE).unwrap();
        assert!(c.fail_fast && c.is_pipeline());
        let names: Vec<&str> = c.jobs.iter().map(|j| j.name.as_str()).collect();
        assert_eq!(names, ["docs", "lint", "test"]);
        let test = &c.jobs[2];
        assert_eq!(test.line, 8);
        assert_eq!(test.needs, ["lint"]);
        assert_eq!(
            test.matrix,
            vec![(
                "python".to_string(),
                vec!["3.11".to_string(), "3.12".to_string()]
            )]
        );
        assert_eq!(test.parallel, 2);
        assert_eq!(test.labels, ["linux", "python"]);
        assert_eq!(test.timeout, Some(Duration::from_secs(300)));
        assert_eq!(c.jobs[0].timeout, Some(Duration::from_secs(60)));
        assert!(c.jobs[0].allow_failure);
        assert_eq!(c.jobs[0].branches, ["main", "release/*"]);
    }

    #[test]
    fn bad_pipelines_say_which_line() {
        let err = |text: &str| RepoConfig::parse(text).unwrap_err().to_string();
        let e = err("[jobs.a]\ncommand = \"x\"\nneeds = [\"b\"]\n\n[jobs.b]\ncommand = \"y\"\nneeds = [\"a\"]\n");
        assert!(
            e.contains("cycle") && e.contains("line 1") && e.contains("a, b"),
            "{e}"
        );
        let e = err("[jobs.a]\ncommand = \"x\"\nneeds = [\"lnt\"]\n");
        assert!(e.contains("line 1") && e.contains("\"lnt\""), "{e}");
        let e = err("\n[jobs.a]\ncommand = \"x\"\nmatrix = { a = [\"1\",\"2\",\"3\",\"4\",\"5\",\"6\",\"7\",\"8\",\"9\",\"10\"], b = [\"1\",\"2\",\"3\",\"4\",\"5\",\"6\",\"7\",\"8\",\"9\",\"10\"] }\nparallel = 10\n");
        assert!(e.contains("line 2") && e.contains("more than 256"), "{e}");
        let e = err("[jobs.a]\ncommand = \"x\"\nmatrix = { py = [] }\n");
        assert!(e.contains("no values"), "{e}");
        let e = err("[jobs.a]\ncommand = \"x\"\ncolour = 1\n");
        assert!(e.contains("colour") && e.contains("line 3"), "{e}");
        assert!(err("command = \"x\"\n[jobs.a]\ncommand = \"y\"\n").contains("not both"));
        assert!(err("[jobs.a]\n").contains("no command"));
        assert!(err("[jobs.123]\ncommand = \"x\"\n").contains("not only digits"));
        assert!(err("[jobs.a]\ncommand = \"x\"\nparallel = 0\n").contains("parallel"));
        assert!(err("[jobs.a]\ncommand = \"x\"\nbranches = [\"[\"]\n").contains("glob"));
        assert!(err("[jobs]\n").contains("no job"));
        assert!(err(
            "[jobs.a]\ncommand = \"x\"\n[jobs.b]\ncommand = \"y\"\nneeds = [\"a\", \"a\"]\n"
        )
        .contains("twice"));
        assert!(
            err("[jobs.a]\ncommand = \"x\"\nmatrix = { p = [\"1\", \"1\"] }\n").contains("twice")
        );
        let many: String = (0..300)
            .map(|i| format!("[jobs.j{i}]\ncommand = \"x\"\n"))
            .collect();
        assert!(err(&many).contains("300 jobs"));
    }

    #[test]
    fn bounds() {
        let e = RepoConfig::parse("timeout = \"9223372036854775807s\"").unwrap_err();
        assert!(
            e.to_string().contains("longer than the limit of 7days"),
            "{e}"
        );
        assert!(RepoConfig::parse("timeout = \"7days\"").is_ok());
        let many = format!("labels = [{}]", vec!["\"a\""; MAX_LABELS + 1].join(","));
        assert!(RepoConfig::parse(&many)
            .unwrap_err()
            .to_string()
            .contains("limit of 32"));
        let long = format!("labels = [\"{}\"]", "a".repeat(MAX_LABEL_BYTES + 1));
        assert!(RepoConfig::parse(&long).is_err());
        assert!(check_size(MAX_FILE_BYTES).is_ok());
        let e = check_size(MAX_FILE_BYTES + 1).unwrap_err();
        assert!(
            e.to_string()
                .contains("more than the limit of 1048576 bytes"),
            "{e}"
        );
    }

    #[test]
    fn shard_tests_globs_are_checked_with_the_job() {
        let ok = RepoConfig::parse(
            "[jobs.t]\ncommand = \"x\"\nparallel = 2\nshard_tests = [\"tests/**/test_*.py\"]\n",
        )
        .expect("parses");
        assert_eq!(ok.jobs[0].shard_tests, ["tests/**/test_*.py"]);
        let e = RepoConfig::parse("[jobs.t]\ncommand = \"x\"\nshard_tests = [\"../x/*.py\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("job \"t\"") && e.contains("stay inside"), "{e}");
    }
}
