//! The watched repository's own settings: `.jetci.toml` at its root (DESIGN.md, "The watched
//! repository's own settings").
//!
//! ```toml
//! command = "cargo test"          # run with `sh -c` in the checkout
//! timeout = "10m"                 # humantime duration
//! labels = ["linux", "python"]    # what a runner must have
//! junit = ["target/*.xml"]        # JUnit XML files to read counts from
//! network = false                 # no network but loopback in the job's sandbox
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
    /// `Some(false)`: the job's sandbox has no network but loopback (`None`: the runner's
    /// `--network` decides).
    pub network: Option<bool>,
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
    network: Option<bool>,
}

/// An invalid `.jetci.toml`; the message names the line where the parser knows it.
#[derive(Debug, thiserror::Error)]
#[error("invalid {FILE_NAME}: {0}")]
pub struct ConfigError(pub String);

impl RepoConfig {
    /// Parses the file's text.
    ///
    /// Errors: TOML syntax, unknown keys, wrong types (with line and column, as the `toml` crate
    /// reports them), an unparsable `timeout`, an empty `command`, a label that is not
    /// `[A-Za-z0-9_-]+`, an `env` name that is empty or holds `=`.
    pub fn parse(text: &str) -> Result<RepoConfig, ConfigError> {
        let raw: Raw = toml::from_str(text)
            .map_err(|e| ConfigError(e.to_string().trim().replace('\n', " ")))?;
        let timeout = match raw.timeout {
            None => None,
            Some(t) => Some(humantime::parse_duration(&t).map_err(|e| {
                ConfigError(format!(
                    "timeout {t:?} is not a duration such as \"90s\" or \"10m\": {e}"
                ))
            })?),
        };
        if timeout.is_some_and(|t| t.is_zero()) {
            return Err(ConfigError("timeout must be longer than zero".into()));
        }
        if let Some(c) = &raw.command {
            if c.trim().is_empty() {
                return Err(ConfigError("command is empty".into()));
            }
        }
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
            network: raw.network,
        })
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
}
