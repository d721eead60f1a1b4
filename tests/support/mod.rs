//! The one support module of jetci's end-to-end tests.
//!
//! Every test in `tests/` runs the real system: a real `nats-server` on a free port with its own
//! store directory ([`NatsServer`]), real git repositories made with the `git` command line
//! ([`GitRepo`]) and the real workspace binaries ([`Proc`], [`bin_path`]). There is no mock
//! broker: the invariants of DESIGN.md are about how JetStream behaves, so only JetStream can
//! check them.
//!
//! Two rules keep tests independent and debuggable:
//! - Each helper owns what it started and kills only that (by pid, on `Drop`), so parallel tests
//!   never touch each other's processes and a failing test leaves nothing running.
//! - Tests wait for events with a generous bound ([`wait_results`], [`Proc::wait_for_log`])
//!   instead of sleeping for a fixed time; on failure the helpers say what they saw.
//!
//! Panicking with a clear message is the error handling here: a test that cannot set up its world
//! should fail at once and say why.
//!
//! Beside this file: [`system`] starts jetci's processes with the flags the tests share
//! ([`spawn_observer`], [`spawn_dispatcher`], [`spawn_runner`], [`spawn_web`], or all but the
//! web at once with [`System`]); [`http`] speaks plain HTTP to jetci-web and `--metrics-addr`
//! ([`http_get`], [`wait_http`]); [`prom`] reads Prometheus text. The job-state waits
//! ([`wait_job`], [`wait_job_phase`]) are with the other JetStream helpers at the end of this file.

pub mod http;
pub mod prom;
pub mod system;

pub use http::{http_get, wait_http, Response};
pub use system::{
    spawn_dispatcher, spawn_observer, spawn_observer_at, spawn_runner, spawn_runner_with_env,
    spawn_web, System,
};

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::jetstream::message::StreamMessage;
use nix::sys::signal::{kill as send_signal, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;

/// How long a nats-server may take to answer JetStream requests after it is spawned. Recovering a
/// file store after SIGKILL is usually quick, but CI machines are slow and shared.
const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long [`NatsServer::restart`] keeps trying when the old port is not free yet.
const RESTART_BIND_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`Proc::stop`] and [`NatsServer::stop`] wait after SIGTERM before they use SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// How often polling helpers look again.
const POLL: Duration = Duration::from_millis(100);

// ---------------------------------------------------------------------------------------------
// Workspace binaries
// ---------------------------------------------------------------------------------------------

/// The outcome of the one `cargo build` per test process: `Err` holds cargo's output.
static BUILD: OnceLock<Result<(), String>> = OnceLock::new();

/// Returns the path of a workspace binary (`jetci`, `jetci-observer`, `jetci-dispatcher`,
/// `jetci-runner`, ...), building the workspace's binaries first.
///
/// `cargo test` builds the test executables but not the binaries of *other* packages, so the
/// first call runs `cargo build --workspace --bins` once per test process (later calls, from any
/// thread, wait for it and reuse the outcome). The binaries go to the directory the test
/// executable runs from (`.../target/debug/deps/pipeline-xxxx` means `.../target/debug`), so tests
/// always run the code of the same checkout and profile. Panics with cargo's output if the build
/// fails, or if the binary does not exist afterwards.
pub fn bin_path(name: &str) -> PathBuf {
    let profile_dir = profile_dir();
    let outcome = BUILD.get_or_init(|| build_binaries(&profile_dir));
    if let Err(output) = outcome {
        panic!("cargo build --workspace --bins failed, so `{name}` cannot run:\n{output}");
    }
    let path = profile_dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "binary `{name}` not found at {} after cargo build --workspace --bins; \
         is it a [[bin]] of a workspace member?",
        path.display()
    );
    path
}

/// The profile directory (`target/debug`, `target/release`, ...) the test executable lives in.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("cannot find the test executable's path");
    let deps = exe
        .parent()
        .expect("test executable has no parent directory");
    let dir = if deps.file_name() == Some(OsStr::new("deps")) {
        deps.parent().expect("deps directory has no parent")
    } else {
        deps
    };
    dir.to_path_buf()
}

/// Runs `cargo build --workspace --bins` for the profile the tests were built with, into the
/// target directory the tests run from.
fn build_binaries(profile_dir: &Path) -> Result<(), String> {
    let cargo = std::env::var_os("CARGO")
        .or_else(|| option_env!("CARGO").map(Into::into))
        .unwrap_or_else(|| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate has no parent directory")
        .to_path_buf();
    let profile = match profile_dir.file_name().and_then(OsStr::to_str) {
        Some("debug") | None => "dev".to_string(),
        Some(other) => other.to_string(),
    };
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&workspace)
        .args(["build", "--workspace", "--bins", "--profile", &profile])
        .stdin(Stdio::null());
    if let Some(target_dir) = profile_dir.parent() {
        cmd.arg("--target-dir").arg(target_dir);
    }
    let output = cmd
        .output()
        .map_err(|e| format!("cannot run {}: {e}", Path::new(&cargo).display()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// nats-server
// ---------------------------------------------------------------------------------------------

/// A `nats-server -js` of this test alone: a free port on 127.0.0.1 and its own file store.
///
/// The store lives in a temporary directory owned by this struct, so [`NatsServer::kill`]
/// followed by [`NatsServer::restart`] brings back the same streams and messages on the same
/// URL, which is how the tests check DESIGN.md's I4 (a NATS restart loses no commit). The server
/// is killed on `Drop`. Its output goes to `nats-server.log` beside the store, and the last lines
/// are printed if the test panics.
pub struct NatsServer {
    port: u16,
    child: Option<Child>,
    /// Holds `store/` and `nats-server.log`; removed when the struct is dropped.
    dir: TempDir,
    /// Set by [`NatsServer::start_with_config`]: the config file and the user that checks
    /// readiness.
    config: Option<ServerConfig>,
}

/// A config file of a [`NatsServer`] started with [`NatsServer::start_with_config`].
struct ServerConfig {
    path: PathBuf,
    user: String,
    password: String,
}

impl NatsServer {
    /// Starts a server on a free port and returns once JetStream answers requests.
    ///
    /// Panics if `nats-server` is not on PATH (run `deploy/install-nats-server.sh`) or if the
    /// server does not become ready within 30 s.
    pub fn start() -> NatsServer {
        Self::start_inner(None)
    }

    /// Starts a server with the configuration `conf` (the text of a nats-server config file,
    /// e.g. `include_str!("../deploy/auth/nats-server.conf")`) on a free port on 127.0.0.1,
    /// and returns once JetStream answers `user`/`password` (a user of that config allowed to
    /// call `$JS.API.INFO`).
    ///
    /// The port comes from `-a 127.0.0.1 -p PORT`, which override the config's `listen`. Any line
    /// setting `store_dir` is replaced by this server's own store directory (nats-server refuses
    /// `-sd` beside a config that sets it), so the config must enable JetStream with a
    /// `store_dir` line of its own. Otherwise like [`NatsServer::start`]; `restart` reuses the
    /// config.
    pub fn start_with_config(conf: &str, user: &str, password: &str) -> NatsServer {
        Self::start_inner(Some((conf, user, password)))
    }

    fn start_inner(conf: Option<(&str, &str, &str)>) -> NatsServer {
        let dir = tempfile::Builder::new()
            .prefix("jetci-nats-")
            .tempdir()
            .expect("cannot create a temp dir for nats-server");
        fs::create_dir_all(dir.path().join("store")).expect("cannot create the store dir");
        let config = conf.map(|(text, user, password)| {
            let store = dir.path().join("store");
            let text: String = text
                .lines()
                .map(|line| {
                    if line.trim_start().starts_with("store_dir") {
                        format!("  store_dir: {:?}\n", store.display().to_string())
                    } else {
                        format!("{line}\n")
                    }
                })
                .collect();
            let path = dir.path().join("nats-server.conf");
            fs::write(&path, text).expect("cannot write nats-server.conf");
            ServerConfig {
                path,
                user: user.to_string(),
                password: password.to_string(),
            }
        });
        let mut server = NatsServer {
            port: 0,
            child: None,
            dir,
            config,
        };
        // The free port is found by binding port 0 and closing it, so another process may grab
        // it before nats-server does; then the server exits at once and we try another port.
        let deadline = Instant::now() + SERVER_READY_TIMEOUT;
        loop {
            server.port = free_port();
            match server.spawn_and_wait(deadline) {
                Ok(()) => return server,
                Err(e) if Instant::now() < deadline => {
                    eprintln!(
                        "nats-server on port {} did not start ({e}); trying another port",
                        server.port
                    );
                }
                Err(e) => panic!("{e}\n{}", server.log_tail(50)),
            }
        }
    }

    /// The URL clients connect to: `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store directory (kept across [`NatsServer::restart`]).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// The path of the server's log file (all runs of this server append to it).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats-server.log")
    }

    /// Whether the server process is alive.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the server with SIGKILL, as a crash would, and waits for it to exit. The store
    /// keeps whatever the server had written.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server gracefully with SIGTERM (SIGKILL after 10 s) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child, STOP_GRACE);
        }
    }

    /// Starts the server again on the same port with the same store, and returns once JetStream
    /// answers. A server that is still running is killed first (SIGKILL).
    ///
    /// The old port may not be free at once, so spawning is retried for up to 10 s.
    pub fn restart(&mut self) {
        self.kill();
        let bind_deadline = Instant::now() + RESTART_BIND_TIMEOUT;
        loop {
            match self.spawn_and_wait(Instant::now() + SERVER_READY_TIMEOUT) {
                Ok(()) => return,
                Err(e) if Instant::now() < bind_deadline => {
                    eprintln!(
                        "nats-server restart on port {} failed ({e}); retrying",
                        self.port
                    );
                    std::thread::sleep(Duration::from_millis(250));
                }
                Err(e) => panic!("cannot restart nats-server: {e}\n{}", self.log_tail(50)),
            }
        }
    }

    /// Spawns nats-server on `self.port` and waits until JetStream answers or `deadline` passes.
    /// On failure the process is gone and the error says why.
    fn spawn_and_wait(&mut self, deadline: Instant) -> Result<(), String> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("cannot open nats-server.log");
        let log_err = log.try_clone().expect("cannot clone log file handle");
        let mut command = Command::new(nats_server_binary());
        match &self.config {
            None => command
                .args(["-js", "-a", "127.0.0.1", "-p"])
                .arg(self.port.to_string())
                .arg("-sd")
                .arg(self.store_dir()),
            Some(config) => command
                .arg("-c")
                .arg(&config.path)
                .args(["-a", "127.0.0.1", "-p"])
                .arg(self.port.to_string()),
        };
        let auth = self
            .config
            .as_ref()
            .map(|c| (c.user.clone(), c.password.clone()));
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn nats-server: {e}"));

        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("nats-server exited early with {status}"));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                && jetstream_ready_as(&self.url(), auth.clone())
            {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "nats-server on port {} did not answer $JS.API.INFO within {:?}",
                    self.port, SERVER_READY_TIMEOUT
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    fn log_tail(&self, lines: usize) -> String {
        format!(
            "--- last {lines} lines of {} ---\n{}",
            self.log_path().display(),
            tail(
                &fs::read_to_string(self.log_path()).unwrap_or_default(),
                lines
            )
        )
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let was_running = self.child.is_some();
        self.kill();
        if was_running && std::thread::panicking() {
            eprintln!("nats-server {}:\n{}", self.url(), self.log_tail(30));
        }
    }
}

/// The nats-server binary on PATH; panics with a pointer to the install script if there is none.
fn nats_server_binary() -> PathBuf {
    static FOUND: OnceLock<Option<PathBuf>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            let path = std::env::var_os("PATH")?;
            std::env::split_paths(&path)
                .map(|dir| dir.join("nats-server"))
                .find(|candidate| candidate.is_file())
        })
        .clone()
        .expect(
            "nats-server is not on PATH; run deploy/install-nats-server.sh and add the \
             directory it prints to PATH (jetci needs nats-server >= 2.10)",
        )
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("cannot bind 127.0.0.1:0 to find a free port")
}

/// `127.0.0.1:PORT` with a [`free_port`], for a process's `--listen` or `--metrics-addr`.
pub fn free_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// One attempt to ask JetStream for its account info: true when it answers without an error.
///
/// A server accepts TCP connections before JetStream has recovered its store, so the port alone
/// does not mean ready. This runs on its own thread and runtime, so `NatsServer::start` works the
/// same from a plain `#[test]` and from inside a `#[tokio::test]`.
fn jetstream_ready_as(url: &str, auth: Option<(String, String)>) -> bool {
    let url = url.to_string();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("cannot build a tokio runtime");
        rt.block_on(async move {
            let attempt = async {
                let mut options = async_nats::ConnectOptions::new();
                if let Some((user, password)) = auth {
                    options = options.user_and_password(user, password);
                }
                let client = options
                    .connection_timeout(Duration::from_secs(2))
                    .connect(url.as_str())
                    .await
                    .ok()?;
                let reply = client.request("$JS.API.INFO", "".into()).await.ok()?;
                let body: serde_json::Value = serde_json::from_slice(&reply.payload).ok()?;
                Some(body.get("error").is_none())
            };
            tokio::time::timeout(Duration::from_secs(3), attempt)
                .await
                .ok()
                .flatten()
                .unwrap_or(false)
        })
    })
    .join()
    .unwrap_or(false)
}

// ---------------------------------------------------------------------------------------------
// git repositories
// ---------------------------------------------------------------------------------------------

/// A real git repository in a temporary directory, made and changed with the `git` command line
/// so that the observer and runner read repositories exactly as users' tools write them.
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
        let output = Command::new("git")
            .args(args)
            .current_dir(self.path())
            // Only this repository's own config counts (see the struct's doc comment).
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_TERMINAL_PROMPT", "0")
            // The repository's identity, not one from the environment (CI exports one).
            .env_remove("GIT_AUTHOR_NAME")
            .env_remove("GIT_AUTHOR_EMAIL")
            .env_remove("GIT_COMMITTER_NAME")
            .env_remove("GIT_COMMITTER_EMAIL")
            .stdin(Stdio::null())
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

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// A spawned process (normally one of the workspace binaries) whose stdout and stderr go to a
/// log file, so a test can wait for a line and a failing test can show what the process said.
///
/// On `Drop` the process and everything it started is killed with SIGKILL (so a failing test
/// leaves no runner or test command behind); if the thread is panicking, the last 100 lines of
/// the log are printed to stderr and the log is kept on disk.
pub struct Proc {
    name: String,
    child: Child,
    log_path: PathBuf,
    dir: TempDir,
    /// Descendants seen when the process was killed or stopped: they outlive it (re-parented),
    /// and `Drop` still kills them so a test leaves nothing behind.
    orphans: Vec<ProcId>,
}

impl Proc {
    /// Spawns the workspace binary `name` (see [`bin_path`]) with `args` and extra `env`.
    /// `RUST_LOG=info` and `NO_COLOR=1` are set unless `env` sets them.
    pub fn spawn(name: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
        Proc::spawn_program(&bin_path(name), args, env)
    }

    /// Like [`Proc::spawn`] for any program, named by path or looked up on PATH.
    pub fn spawn_program(program: &Path, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let name = program
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| program.display().to_string());
        let dir = tempfile::Builder::new()
            .prefix(&format!("jetci-proc-{name}-"))
            .tempdir()
            .expect("cannot create a temp dir for a process log");
        let log_path = dir.path().join(format!("{name}.log"));
        let log = File::create(&log_path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log_path.display()));
        let log_err = log.try_clone().expect("cannot clone log file handle");

        let mut cmd = Command::new(program);
        cmd.args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        for (key, value) in env {
            cmd.env(key, value);
        }
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot spawn {} {}: {e}", program.display(), args.join(" "))
        });
        Proc {
            name,
            child,
            log_path,
            dir,
            orphans: Vec::new(),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The path of the log file holding the process's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Whether the process is still alive.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills the process with SIGKILL, as a crash would, and waits for it. Its children live on
    /// (as they would after a crash) until this `Proc` is dropped.
    pub fn kill(&mut self) -> ExitStatus {
        self.orphans.extend(descendants(self.child.id()));
        let _ = self.child.kill();
        self.child.wait().expect("cannot wait for a killed process")
    }

    /// Sends SIGTERM, waits up to 10 s for a clean exit, then SIGKILLs; returns the exit status
    /// so a test can check the process shut down cleanly.
    pub fn stop(&mut self) -> ExitStatus {
        self.orphans.extend(descendants(self.child.id()));
        terminate(&mut self.child, STOP_GRACE)
    }

    /// Sends `signal` to the process (e.g. SIGINT) without waiting.
    pub fn signal(&self, signal: Signal) {
        let _ = send_signal(Pid::from_raw(self.child.id() as i32), signal);
    }

    /// Waits for the process to exit by itself, up to `timeout`; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the process has written so far, with ANSI colour codes removed.
    pub fn log(&self) -> String {
        let bytes = fs::read(&self.log_path).unwrap_or_default();
        strip_ansi(&String::from_utf8_lossy(&bytes))
    }

    /// Polls the log until it contains `needle` (true) or `timeout` passes (false). Blocks the
    /// thread; inside async code prefer [`Proc::wait_for_log_async`].
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = self.log_verdict(needle, deadline) {
                return found;
            }
            std::thread::sleep(POLL);
        }
    }

    /// Like [`Proc::wait_for_log`], sleeping with tokio so other tasks of the test keep running.
    pub async fn wait_for_log_async(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = self.log_verdict(needle, deadline) {
                return found;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// One look for the `wait_for_log` functions: `Some(true)` when the log holds `needle`,
    /// `Some(false)` when `deadline` has passed, `None` to look again.
    fn log_verdict(&self, needle: &str, deadline: Instant) -> Option<bool> {
        if self.log().contains(needle) {
            Some(true)
        } else if Instant::now() >= deadline {
            Some(false)
        } else {
            None
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Collect the descendants first: once the parent is dead they are re-parented and can no
        // longer be told apart from other processes.
        let pid = self.child.id();
        let mut leftovers = descendants(pid);
        let _ = self.child.kill();
        let _ = self.child.wait();
        leftovers.append(&mut self.orphans);
        for process in leftovers {
            // Only if the pid still names the same process (same start time), not a reused pid.
            if process_start_time(process.pid) == Some(process.start_time) {
                let _ = send_signal(Pid::from_raw(process.pid as i32), Signal::SIGKILL);
            }
        }
        if std::thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!(
                "--- {} (pid {pid}): last 100 lines of {} ---\n{}\n--- end of {} ---",
                self.name,
                self.log_path.display(),
                tail(&self.log(), 100),
                self.name
            );
        }
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL; returns the exit status.
fn terminate(child: &mut Child, grace: Duration) -> ExitStatus {
    let _ = send_signal(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "pid {} ignored SIGTERM for {grace:?}; sending SIGKILL",
        child.id()
    );
    let _ = child.kill();
    child.wait().expect("cannot wait for a killed process")
}

/// A process named by pid and start time, so a reused pid is not mistaken for it.
#[derive(Clone, Copy, PartialEq, Eq)]
struct ProcId {
    pid: u32,
    start_time: u64,
}

/// The fields of `/proc/PID/stat` after the command name (which is in parentheses and may hold
/// spaces): state, ppid, ...
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    Some(after.split_whitespace().map(str::to_string).collect())
}

/// The start time (field 22 of `/proc/PID/stat`) of a live process.
fn process_start_time(pid: u32) -> Option<u64> {
    stat_fields(pid)?.get(19)?.parse().ok()
}

/// All live descendants of `root`, found from the parent pids in `/proc/*/stat`.
fn descendants(root: u32) -> Vec<ProcId> {
    let mut table: Vec<(ProcId, u32)> = Vec::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Some(fields) = stat_fields(pid) else {
                continue;
            };
            let ppid = fields.get(1).and_then(|s| s.parse().ok());
            let start_time = fields.get(19).and_then(|s| s.parse().ok());
            if let (Some(ppid), Some(start_time)) = (ppid, start_time) {
                table.push((ProcId { pid, start_time }, ppid));
            }
        }
    }
    let mut found: Vec<ProcId> = Vec::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for &(process, ppid) in &table {
            if ppid == parent && !found.contains(&process) {
                found.push(process);
                frontier.push(process.pid);
            }
        }
    }
    found
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Removes ANSI escape sequences (`ESC [ ... letter`), so log matching does not depend on
/// whether a binary colours its output.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// JetStream
// ---------------------------------------------------------------------------------------------

/// Connects to `url` and returns a JetStream context; panics if the server cannot be reached.
pub async fn js(url: &str) -> jetstream::Context {
    let client = async_nats::connect(url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    jetstream::new(client)
}

/// Waits until stream `stream` holds at least `count` messages on subjects matching `filter`
/// (e.g. `"CI_RESULTS"`, `"ci.results.>"`) and returns all of them, parsed as JSON, in stream
/// order.
///
/// Reads what is *stored*, not what arrives, so a result published before the call counts, and
/// the caller can assert on the exact number (I1: exactly one result per run). The stream may
/// not exist yet, and the server may be down for a while (I4 tests restart it): both count as
/// "nothing yet" and polling goes on. Panics after `timeout`, listing what it did see.
pub async fn wait_results(
    url: &str,
    stream: &str,
    filter: &str,
    count: usize,
    timeout: Duration,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + timeout;
    let mut client: Option<async_nats::Client> = None;
    let mut seen: Vec<StreamMessage> = Vec::new();
    let mut last_error = String::from("none");
    loop {
        if client.is_none() {
            match async_nats::ConnectOptions::new()
                .connection_timeout(Duration::from_secs(2))
                .connect(url)
                .await
            {
                Ok(c) => client = Some(c),
                Err(e) => last_error = format!("cannot connect to {url}: {e}"),
            }
        }
        if let Some(c) = &client {
            match read_stream(&jetstream::new(c.clone()), stream, filter).await {
                Ok(messages) => {
                    seen = messages;
                    if seen.len() >= count {
                        return seen.iter().map(|m| parse_json(m, true)).collect();
                    }
                }
                Err(e) => last_error = e,
            }
        }
        if Instant::now() >= deadline {
            let listing: Vec<String> = seen
                .iter()
                .map(|m| {
                    format!(
                        "  #{} {}: {}",
                        m.sequence,
                        m.subject,
                        String::from_utf8_lossy(&m.payload)
                    )
                })
                .collect();
            panic!(
                "timed out after {timeout:?} waiting for {count} message(s) on {filter} in stream \
                 {stream} at {url}; got {}:\n{}\nlast error: {last_error}",
                seen.len(),
                listing.join("\n")
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// What stream `stream` holds right now on subjects matching `filter`, in stream order, as
/// `(subject, body)`. A body that is not JSON is returned as a JSON string of its (lossy UTF-8)
/// text, so tests can still see it. A missing stream gives an empty list. Panics on other errors.
pub async fn stream_messages(
    url: &str,
    stream: &str,
    filter: &str,
) -> Vec<(String, serde_json::Value)> {
    stream_raw_messages(url, stream, filter)
        .await
        .iter()
        .map(|m| (m.subject.to_string(), parse_json(m, false)))
        .collect()
}

/// Like [`stream_messages`] but with the whole stored messages (sequence, headers such as
/// `Nats-Msg-Id`, raw payload).
pub async fn stream_raw_messages(url: &str, stream: &str, filter: &str) -> Vec<StreamMessage> {
    let context = js(url).await;
    read_stream(&context, stream, filter)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Waits until the state of job `key` (`REPO.SHA.RUN`) in the `ci-jobs` bucket satisfies `done`,
/// and returns that state (`{"phase": ..., "runner": ..., "attempt": ...}`).
///
/// Polls every 50 ms, because some states last only a moment (a short job is `running` for less
/// than a second). The bucket and the key may not exist yet: both count as "not yet". Panics
/// after `bound`, saying that the job never reached `what`, with the last state seen.
pub async fn wait_job(
    url: &str,
    key: &str,
    what: &str,
    bound: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let context = js(url).await;
    let deadline = Instant::now() + bound;
    let mut last = serde_json::Value::Null;
    loop {
        if let Ok(kv) = context.get_key_value("ci-jobs").await {
            if let Ok(Some(value)) = kv.get(key).await {
                last = serde_json::from_slice(&value).expect("job state is JSON");
                if done(&last) {
                    return last;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "job {key} never reached {what} within {bound:?}; last state: {last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until job `key` is in `phase` (`queued`, `assigned`, `running` or `final`) and returns
/// the id of the runner of its current attempt (empty when there is none, as while queued). See
/// [`wait_job`].
pub async fn wait_job_phase(url: &str, key: &str, phase: &str, bound: Duration) -> String {
    let state = wait_job(url, key, phase, bound, |v| v["phase"] == phase).await;
    state["runner"].as_str().unwrap_or_default().to_string()
}

/// Reads every stored message of `stream` matching `filter`, oldest first, with "get next message
/// on subject from sequence" requests (wildcards allowed). This needs no consumer, so it cannot
/// disturb the consumers under test, and it works on work-queue streams too. A stream that does
/// not exist yet reads as empty.
async fn read_stream(
    context: &jetstream::Context,
    stream: &str,
    filter: &str,
) -> Result<Vec<StreamMessage>, String> {
    /// JetStream's "stream not found" error code.
    const STREAM_NOT_FOUND: u64 = 10059;

    let handle = match context.get_stream(stream).await {
        Ok(handle) => handle,
        Err(e) => {
            if let jetstream::context::GetStreamErrorKind::JetStream(js_err) = e.kind() {
                if js_err.error_code().0 == STREAM_NOT_FOUND {
                    return Ok(Vec::new());
                }
            }
            return Err(format!("cannot get stream {stream}: {e}"));
        }
    };
    let mut messages = Vec::new();
    let mut next_seq = 1;
    loop {
        match handle
            .get_first_raw_message_by_subject(filter, next_seq)
            .await
        {
            Ok(message) => {
                next_seq = message.sequence + 1;
                messages.push(message);
            }
            Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {
                return Ok(messages);
            }
            Err(e) => {
                return Err(format!(
                    "cannot read stream {stream} ({filter}) from sequence {next_seq}: {e}"
                ))
            }
        }
    }
}

/// The JSON body of a stored message; when `strict`, a body that is not JSON panics, otherwise it
/// becomes a JSON string.
fn parse_json(message: &StreamMessage, strict: bool) -> serde_json::Value {
    match serde_json::from_slice(&message.payload) {
        Ok(value) => value,
        Err(e) if strict => panic!(
            "message #{} on {} is not JSON ({e}): {}",
            message.sequence,
            message.subject,
            String::from_utf8_lossy(&message.payload)
        ),
        Err(_) => serde_json::Value::String(String::from_utf8_lossy(&message.payload).into_owned()),
    }
}
