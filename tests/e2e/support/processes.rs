//! Processes: the workspace's binaries built once ([`bin_path`]), a spawned process that logs to a
//! file and is killed with everything it started ([`Proc`]), and the machine's process table
//! (`/proc`) for tests that check what is left running.
//!
//! Each [`Proc`] owns what it started and kills only that (by pid, on `Drop`), so tests running on
//! parallel threads never touch each other's processes, and a failing test leaves nothing behind.
//! A test that looks for its own processes in the machine's table names them with a
//! [`marker_seconds`], unique to this test process and call.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill as send_signal, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;

use super::waiting::{wait_until, wait_until_async};

/// How long [`Proc::stop`] waits after SIGTERM before it uses SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Workspace binaries
// ---------------------------------------------------------------------------------------------

/// The outcome of the one `cargo build` of the test process: `Err` holds cargo's output.
static BUILD: OnceLock<Result<(), String>> = OnceLock::new();

/// Returns the path of a workspace binary (`jetci`, `jetci-observer`, `jetci-dispatcher`,
/// `jetci-runner`, ...), building the workspace's binaries first.
///
/// `cargo test` builds the test executable but not the binaries of *other* packages, so the
/// first call runs `cargo build --workspace --bins` once for the whole suite (later calls, from
/// any thread, wait for it and reuse the outcome). The binaries go to the directory the test
/// executable runs from (`.../target/debug/deps/e2e-xxxx` means `.../target/debug`), so tests
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
// Proc
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

    /// Whether the process is still alive.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// How the process ended, if it has (by itself or killed); `None` while it runs.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
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

    /// Waits for the process to exit by itself and returns its status; panics with the end of
    /// its log if it is still running after `bound`.
    pub fn wait_exit(&mut self, bound: Duration) -> ExitStatus {
        let what = format!("{} (pid {}) to exit", self.name, self.child.id());
        let log_path = self.log_path.clone();
        let child = &mut self.child;
        wait_until(&what, bound, || match child.try_wait() {
            Ok(Some(status)) => Ok(status),
            _ => Err(log_tail(&log_path)),
        })
    }

    /// Everything the process has written so far, with ANSI colour codes removed.
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    /// Waits until the log contains `needle`; panics with the end of the log after `bound`.
    /// Blocks the thread; inside async code use [`Proc::wait_for_log_async`].
    pub fn wait_for_log(&self, needle: &str, bound: Duration) {
        let what = format!("{needle:?} in the log of {}", self.name);
        wait_until(&what, bound, || self.log_has(needle));
    }

    /// Like [`Proc::wait_for_log`], sleeping with tokio so other tasks of the test keep running.
    pub async fn wait_for_log_async(&self, needle: &str, bound: Duration) {
        let what = format!("{needle:?} in the log of {}", self.name);
        wait_until_async(&what, bound, async || self.log_has(needle)).await;
    }

    /// One look for the `wait_for_log` functions: `Err` with the end of the log if `needle` is
    /// not in it yet.
    fn log_has(&self, needle: &str) -> Result<(), String> {
        let log = self.log();
        if log.contains(needle) {
            Ok(())
        } else {
            Err(format!("--- end of the log ---\n{}", tail(&log, 50)))
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

/// SIGTERM, wait up to `grace`, then SIGKILL; returns the exit status. Not a wait that fails:
/// a process that ignores SIGTERM is killed, and the caller judges the status.
pub fn terminate(child: &mut Child, grace: Duration) -> ExitStatus {
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

/// A log file's text with ANSI colour codes removed (empty if it cannot be read).
fn read_log(path: &Path) -> String {
    let bytes = fs::read(path).unwrap_or_default();
    strip_ansi(&String::from_utf8_lossy(&bytes))
}

/// The last 50 lines of a log file, for a wait's "last saw".
fn log_tail(path: &Path) -> String {
    format!("--- end of the log ---\n{}", tail(&read_log(path), 50))
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
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
// The machine's process table
// ---------------------------------------------------------------------------------------------

/// One process as `/proc/PID/stat` and `/proc/PID/cmdline` show it.
#[derive(Clone, Debug)]
pub struct ProcessEntry {
    pub pid: u32,
    pub ppid: u32,
    /// `R`, `S`, `Z` (a zombie: exited, not reaped yet), ...
    pub state: char,
    /// Clock ticks since boot; with the pid, names the process even if the pid is reused.
    start_time: u64,
    /// The executable's name (`comm`, at most 15 bytes).
    pub comm: String,
    /// The command line, arguments joined by spaces (empty for a zombie).
    pub cmdline: String,
}

/// Every process of the machine now.
pub fn process_table() -> Vec<ProcessEntry> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(process_entry)
        .collect()
}

/// The process `pid`, if it exists.
fn process_entry(pid: u32) -> Option<ProcessEntry> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: the fields follow the last `)`.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    Some(ProcessEntry {
        pid,
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
        comm: stat[open + 1..close].to_string(),
        cmdline: String::from_utf8_lossy(&cmdline)
            .replace('\0', " ")
            .trim_end()
            .to_string(),
    })
}

/// Live (not zombie) processes whose command line contains `needle`, as `PID: COMMAND LINE`.
/// `needle` should be a [`marker_seconds`], so that only the calling test's processes match.
pub fn processes_with(needle: &str) -> Vec<String> {
    process_table()
        .into_iter()
        .filter(|p| p.state != 'Z' && p.cmdline.contains(needle))
        .map(|p| format!("{}: {}", p.pid, p.cmdline))
        .collect()
}

/// A duration for `sleep` that no other process on the machine has on its command line:
/// `whole` seconds and a fraction made of this test process's pid and a counter, such as
/// `33.0012345007`. A test command that sleeps this long can be found in `/proc` with
/// [`processes_with`] while other tests (in this process or in another run of the suite on the
/// same machine) run their own.
pub fn marker_seconds(whole: u32) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{whole}.{:07}{:03}", std::process::id(), n % 1000)
}

/// A process named by pid and start time, so a reused pid is not mistaken for it.
#[derive(Clone, Copy, PartialEq, Eq)]
struct ProcId {
    pid: u32,
    start_time: u64,
}

/// The start time of a live process.
fn process_start_time(pid: u32) -> Option<u64> {
    process_entry(pid).map(|p| p.start_time)
}

/// All live descendants of `root`, found from the parent pids in the process table.
fn descendants(root: u32) -> Vec<ProcId> {
    let table = process_table();
    let mut found: Vec<ProcId> = Vec::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for process in &table {
            let id = ProcId {
                pid: process.pid,
                start_time: process.start_time,
            };
            if process.ppid == parent && !found.contains(&id) {
                found.push(id);
                frontier.push(process.pid);
            }
        }
    }
    found
}

/// Where a tool a test needs is missing: fail under CI (`CI` set; `.ci/run` must install it: a
/// test that skips has not run), skip with a message elsewhere.
pub fn missing_tool(tool: &str, install: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{tool} is missing; CI must provide it ({install})");
    }
    eprintln!("SKIPPED: {tool} is missing ({install})");
}
