//! The watched repository's own settings: `.jetci.toml` at its root (DESIGN.md, "The watched
//! repository's own settings").
//!
//! ```toml
//! command = "cargo test"          # run with `sh -c` in the checkout
//! timeout = "10m"                 # humantime duration
//! labels = ["linux", "python"]    # what a runner must have
//! junit = ["target/*.xml"]        # JUnit XML files to read counts from
//! [env]
//! RUST_BACKTRACE = "1"
//! ```
//!
//! The observer reads it for the labels; the runner parses it again from its checkout and turns
//! an invalid file into the commit's `error` result, quoting the line and the problem.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::subjects::is_token;

/// The file name at the repository root.
pub const FILE_NAME: &str = ".jetci.toml";

/// The command when a repository has no `.jetci.toml` (the original design's test command).
pub const DEFAULT_COMMAND: &str = "python3 -m unittest discover";

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
        check_labels_bounds(&raw.labels)?;
        for l in &raw.labels {
            if !is_token(l) {
                return Err(ConfigError(format!(
                    "label {l:?} must use only letters, digits, '-' and '_'"
                )));
            }
        }
        for k in raw.env.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(ConfigError(format!(
                    "env name {k:?} is not a valid variable name"
                )));
            }
        }
        Ok(RepoConfig {
            command: raw.command,
            timeout,
            env: raw.env,
            labels: raw.labels,
            junit: raw.junit,
        })
    }
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
}
