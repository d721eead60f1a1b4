//! Counting real executions of a test command, not log lines about them.
//!
//! The repository's command itself appends one line to a file of the test's each time a runner
//! runs it: [`Executions::record`] is that shell statement. Put first in the command it counts
//! executions that started; put last (before the exit) it counts executions that ran to the end.
//! Lines are appended with `>>` (`O_APPEND`, one short write), so runners writing at once do not
//! mix them.
//!
//! Jobs run in a sandbox that shows them nothing of the host but their own places, so the
//! runners that run such a command need [`Executions::runner_flags`]: the file's directory as
//! the runner's `--cache-dir` (the one writable place jobs share, bound at its own path), and
//! [`LIFE_VAR`] passed through, which tells a runner apart from its restarted self.

use std::collections::BTreeMap;
use std::path::PathBuf;

use tempfile::TempDir;

/// The file the test command writes, in a temp dir owned by the test.
pub struct Executions {
    dir: TempDir,
}

/// One line of the file: which attempt of which run, on which runner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Execution {
    pub sha: String,
    pub run: u32,
    pub attempt: u32,
    /// The runner's id (`JETCI_RUNNER`).
    pub runner: String,
    /// The life of the runner process that ran the command: [`LIFE_VAR`] in the runner's
    /// environment (0 when the test gave none), which tells a runner apart from its restarted
    /// self with the same id.
    pub runner_life: u32,
}

/// The runner's environment variable the record reads its life from (see [`Execution`]).
pub const LIFE_VAR: &str = "JETCI_TEST_LIFE";

impl Executions {
    pub fn new() -> Executions {
        let dir = tempfile::Builder::new()
            .prefix("jetci-executions-")
            .tempdir()
            .expect("cannot create a temp dir for the executions file");
        Executions { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("executions")
    }

    /// The flags a runner needs to run [`Executions::record`] in its jobs' sandbox: the file's
    /// directory as its `--cache-dir`, and `--pass-env` [`LIFE_VAR`].
    pub fn runner_flags(&self) -> [&str; 4] {
        let dir = self.dir.path().to_str().expect("utf-8 temp dir");
        ["--cache-dir", dir, "--pass-env", LIFE_VAR]
    }

    /// The shell statement that appends this execution's line (no trailing `;`).
    pub fn record(&self) -> String {
        format!(
            "echo \"$JETCI_COMMIT $JETCI_RUN $JETCI_ATTEMPT $JETCI_RUNNER ${{{LIFE_VAR}:-0}}\" >> '{}'",
            self.path().display()
        )
    }

    /// Every execution so far, in the order they wrote their lines.
    pub fn all(&self) -> Vec<Execution> {
        let text = std::fs::read_to_string(self.path()).unwrap_or_default();
        text.lines()
            .map(|line| {
                let fields: Vec<&str> = line.split(' ').collect();
                let number = |i: usize| -> u32 {
                    fields
                        .get(i)
                        .and_then(|f| f.parse().ok())
                        .unwrap_or_else(|| panic!("bad executions line {line:?}"))
                };
                Execution {
                    sha: fields[0].to_string(),
                    run: number(1),
                    attempt: number(2),
                    runner: fields.get(3).unwrap_or(&"").to_string(),
                    runner_life: number(4),
                }
            })
            .collect()
    }

    /// How many executions there were.
    pub fn count(&self) -> usize {
        self.all().len()
    }

    /// The executions of each commit.
    pub fn per_sha(&self) -> BTreeMap<String, Vec<Execution>> {
        let mut map: BTreeMap<String, Vec<Execution>> = BTreeMap::new();
        for e in self.all() {
            map.entry(e.sha.clone()).or_default().push(e);
        }
        map
    }
}

impl Default for Executions {
    fn default() -> Self {
        Executions::new()
    }
}
