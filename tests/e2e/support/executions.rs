//! Counting real executions of a test command, not log lines about them.
//!
//! The repository's command itself appends one line to a file of the test's each time a runner
//! runs it: [`Executions::record`] is that shell statement. Put first in the command it counts
//! executions that started; put last (before the exit) it counts executions that ran to the end.
//! Lines are appended with `>>` (`O_APPEND`, one short write), so runners writing at once do not
//! mix them.

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
    /// The pid of the runner process that ran the command (the shell's parent), which tells a
    /// runner apart from its restarted self with the same id.
    pub runner_pid: u32,
}

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

    /// The shell statement that appends this execution's line (no trailing `;`).
    pub fn record(&self) -> String {
        format!(
            "echo \"$JETCI_COMMIT $JETCI_RUN $JETCI_ATTEMPT $JETCI_RUNNER $PPID\" >> '{}'",
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
                    runner_pid: number(4),
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
