//! Real git repositories, made and changed with the `git` command line so that the observer and
//! runner read repositories exactly as users' tools write them, and the test files the tests
//! commit into them.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

use tempfile::TempDir;

/// A real git repository in a temporary directory.
///
/// The repository has branch `main` (unborn until the first commit) and its own user.name and
/// user.email; the machine's global and system git config are ignored, so a developer's hooks or
/// signing settings cannot change what a test does. Removed on `Drop`.
pub struct GitRepo {
    dir: TempDir,
}

impl GitRepo {
    /// `git init -b main` in a new temp dir, with a local identity and no commits.
    pub fn new() -> GitRepo {
        let dir = tempfile::Builder::new()
            .prefix("jetci-repo-")
            .tempdir()
            .expect("cannot create a temp dir for a git repository");
        let repo = GitRepo { dir };
        repo.run_git(&["init", "-q", "-b", "main"]);
        repo.run_git(&["config", "user.name", "jetci test"]);
        repo.run_git(&["config", "user.email", "test@jetci.invalid"]);
        repo.run_git(&["config", "commit.gpgsign", "false"]);
        repo
    }

    /// The repository's working directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `files` (path relative to the repository, content), stages everything and commits;
    /// returns the new commit's full sha. Parent directories are created. With no files (or no
    /// change) it still makes an (empty) commit, so tests can make commits cheaply.
    pub fn commit(&self, msg: &str, files: &[(&str, &str)]) -> String {
        for (rel, content) in files {
            let path = self.path().join(rel);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)
                    .unwrap_or_else(|e| panic!("cannot create {}: {e}", parent.display()));
            }
            fs::write(&path, content)
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        }
        self.run_git(&["add", "-A"]);
        self.run_git(&["commit", "-q", "--allow-empty", "-m", msg]);
        self.head()
    }

    /// Creates branch `name` at HEAD and switches to it.
    pub fn checkout_new_branch(&self, name: &str) {
        self.run_git(&["checkout", "-q", "-b", name]);
    }

    /// Switches to an existing branch (or commit).
    pub fn checkout(&self, name: &str) {
        self.run_git(&["checkout", "-q", name]);
    }

    /// The full sha of HEAD.
    pub fn head(&self) -> String {
        self.run_git(&["rev-parse", "HEAD"])
    }

    /// Runs `git ARGS` in the repository and returns its stdout, trimmed. Panics with git's
    /// stderr if it fails.
    pub fn run_git(&self, args: &[&str]) -> String {
        let output = git_command(self.path())
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run git (is it installed?): {e}"));
        assert!(
            output.status.success(),
            "git {} failed in {} ({}):\n{}",
            args.join(" "),
            self.path().display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }
}

impl Default for GitRepo {
    fn default() -> Self {
        GitRepo::new()
    }
}

/// `git` run in `dir` with only the repository's own config: not the machine's system or global
/// config, not an identity from the environment (CI exports one), and no prompt.
pub fn git_command(dir: &Path) -> Command {
    let mut command = Command::new("git");
    command
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env_remove("GIT_AUTHOR_NAME")
        .env_remove("GIT_AUTHOR_EMAIL")
        .env_remove("GIT_COMMITTER_NAME")
        .env_remove("GIT_COMMITTER_EMAIL")
        .stdin(Stdio::null());
    command
}

/// The text of a Python unittest file with one test case `$class` whose one test `$test` runs
/// the statement `$check`, as a `&'static str`.
macro_rules! unittest_file {
    ($class:literal, $test:literal, $check:literal) => {
        concat!(
            "import unittest\n\n\nclass ",
            $class,
            "(unittest.TestCase):\n    def ",
            $test,
            "(self):\n        ",
            $check,
            "\n\n\nif __name__ == \"__main__\":\n    unittest.main()\n",
        )
    };
}

/// A Python unittest file that passes under the runner's default command
/// (`python3 -m unittest discover`): `("test_ok.py", content)`.
pub fn passing_test() -> (&'static str, &'static str) {
    (
        "test_ok.py",
        unittest_file!("OkTest", "test_ok", "self.assertEqual(1 + 1, 2)"),
    )
}

/// A Python unittest file that fails under `python3 -m unittest discover`:
/// `("test_fail.py", content)`. Add it next to [`passing_test`] to turn a commit red.
pub fn failing_test() -> (&'static str, &'static str) {
    (
        "test_fail.py",
        unittest_file!("FailTest", "test_fails", "self.assertEqual(1 + 1, 3)"),
    )
}
