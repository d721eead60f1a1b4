//! The processes `jetci up` starts: finding their binaries, starting them with their output in a
//! log file, noticing when one exits, and stopping them.
//!
//! Stopping is SIGTERM, a grace period (the runner hands its job back, the others drain), then
//! SIGKILL. As a last resort, should `jetci up` itself be killed with SIGKILL, every child gets
//! SIGTERM from the kernel (Linux `PR_SET_PDEATHSIG`), so nothing it started keeps running.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

/// How long stopped processes get to exit before SIGKILL.
pub const GRACE: Duration = Duration::from_secs(10);
/// What is left of the grace period after a second Ctrl-C.
pub const HURRIED_GRACE: Duration = Duration::from_secs(1);

/// One started process.
pub struct Proc {
    /// Short name for messages: `observer`, `runner-1`, `nats-server`.
    pub name: String,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
    child: Child,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Starts `cmd` with stdin closed and stdout and stderr appended to a fresh `log`.
    ///
    /// Errors: the log cannot be created or the binary cannot be started.
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Result<Proc> {
        if let Some(dir) = log.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let out = std::fs::File::create(&log)
            .with_context(|| format!("cannot create log file {}", log.display()))?;
        let err = out
            .try_clone()
            .with_context(|| format!("cannot open log file {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // If this value is dropped without `stop` (a panic), do not leave the process behind.
            .kill_on_drop(true);
        #[cfg(target_os = "linux")]
        // SAFETY: the closure runs between fork and exec and only makes one prctl(2) system call,
        // which is async-signal-safe; it allocates nothing and takes no lock.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from)
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Proc {
            name: name.to_string(),
            log,
            child,
            status: None,
        })
    }

    /// Its exit status, once it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    fn signal(&mut self, sig: Signal) {
        if self.exited().is_some() {
            return;
        }
        if let Some(pid) = self.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), sig);
        }
    }

    /// Stops this one process at once (SIGTERM, a short grace, SIGKILL).
    pub async fn stop_now(mut self) {
        stop_all(
            std::slice::from_mut(&mut self),
            Duration::from_secs(2),
            None,
        )
        .await;
    }
}

/// Stops processes: SIGTERM to each, then waits up to `grace`, then SIGKILL to the ones still
/// running. When `hurry` is cancelled (a second Ctrl-C) the wait is cut to [`HURRIED_GRACE`]:
/// enough for a NATS server to close its store cleanly, short enough for an impatient user.
pub async fn stop_all(procs: &mut [Proc], grace: Duration, hurry: Option<&CancellationToken>) {
    for p in procs.iter_mut() {
        p.signal(Signal::SIGTERM);
    }
    let mut deadline = tokio::time::Instant::now() + grace;
    let mut hurried = false;
    for p in procs.iter_mut() {
        while p.status.is_none() {
            let hurry_now = async {
                match hurry {
                    Some(h) if !hurried => h.cancelled().await,
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                r = tokio::time::timeout_at(deadline, p.child.wait()) => {
                    if let Ok(Ok(status)) = r {
                        p.status = Some(status);
                    }
                    break;
                }
                _ = hurry_now => {
                    hurried = true;
                    deadline = deadline.min(tokio::time::Instant::now() + HURRIED_GRACE);
                }
            }
        }
    }
    for p in procs.iter_mut() {
        if p.exited().is_none() {
            let waited = if hurried {
                "when hurried".to_string()
            } else {
                format!("within {}s", grace.as_secs())
            };
            eprintln!(
                "jetci: warning: {} did not stop {waited}; killing it",
                p.name
            );
            p.signal(Signal::SIGKILL);
            if let Ok(status) = p.child.wait().await {
                p.status = Some(status);
            }
        }
    }
}

/// `name` in the directory of the running `jetci` (where cargo puts the whole workspace),
/// else on PATH.
///
/// Errors: found in neither place.
pub fn find_sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().ok();
    if let Some(dir) = exe.as_deref().and_then(Path::parent) {
        let candidate = dir.join(name);
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    find_on_path(name).with_context(|| {
        let here = exe
            .as_deref()
            .and_then(Path::parent)
            .map(|d| format!("{} or ", d.display()))
            .unwrap_or_default();
        format!(
            "cannot find {name} in {here}PATH; build every jetci binary with `cargo build --workspace`"
        )
    })
}

/// The first executable file called `name` in a PATH directory.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The id of runner `i` (from 1) on this machine: `<hostname-slug>-<i>`, a valid subject token.
pub fn runner_id(hostname: &str, i: usize) -> String {
    format!("{}-{i}", host_slug(hostname))
}

/// The first label of a host name, lowercased, with anything outside `[a-z0-9_-]` turned into
/// `-`: `Build-Box.example.com` → `build-box`. `local` when nothing is left.
pub fn host_slug(hostname: &str) -> String {
    let first = hostname.trim().split('.').next().unwrap_or("");
    let slug: String = first
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '_' | '-') => c,
            _ => '-',
        })
        .take(40)
        .collect();
    let slug = slug.trim_matches('-');
    if slug.is_empty() {
        "local".to_string()
    } else {
        slug.to_string()
    }
}

/// This machine's host name (empty when the OS will not say).
pub fn hostname() -> String {
    hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runner_ids_are_tokens() {
        assert_eq!(runner_id("buildbox", 1), "buildbox-1");
        assert_eq!(runner_id("Build-Box.example.com", 2), "build-box-2");
        assert_eq!(runner_id("my host!", 3), "my-host-3");
        assert_eq!(runner_id("", 1), "local-1");
        assert_eq!(runner_id("...", 1), "local-1");
        assert_eq!(runner_id("ünï", 1), "n-1");
        let long = "a".repeat(200);
        assert_eq!(runner_id(&long, 10).len(), 43);
        for h in ["x y", "a*b", "a>b", "tab\there", "Ü"] {
            assert!(jetci::subjects::is_token(&runner_id(h, 1)), "{h}");
        }
    }

    #[test]
    fn path_lookup() {
        assert!(find_on_path("sh").is_some());
        assert!(find_on_path("jetci-surely-no-such-binary").is_none());
        let err = find_sibling("jetci-surely-no-such-binary").unwrap_err();
        assert!(err.to_string().contains("cargo build --workspace"), "{err}");
    }
}
