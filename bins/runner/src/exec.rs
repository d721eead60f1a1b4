//! Running a job's command: `sh -c COMMAND`, output captured, with a timeout and cancellation
//! that stop everything it started.
//!
//! - In a sandbox ([`Spec::sandbox`], [`crate::sandbox`]) the runner starts bwrap, which runs the
//!   command in a PID namespace of its own: when the command exits, bwrap's init exits and the
//!   kernel kills every process left in the namespace, wherever it went (`setsid`, `env -i`,
//!   double forks). On timeout or cancel the job's processes (found under bwrap's pid) get
//!   SIGTERM, then after `grace` bwrap gets SIGKILL and takes them all with it. The number of
//!   processes is bounded (`RLIMIT_NPROC`, and a count every [`PID_SAMPLE_EVERY`] that ends the
//!   job with [`Ended::Bound`]).
//! - Without one, the command gets a new process group (`setpgid(0, 0)`), so a signal to `-pgid`
//!   reaches every process it started, forked children included; on timeout or cancel: SIGTERM to
//!   the group, `grace` to exit, then SIGKILL. A daemon that left the group (`setsid`, double
//!   fork) is still found: every process of the job carries `JETCI_JOB_TOKEN=<unique>` in its
//!   environment, and when the job ends every process whose `/proc/<pid>/environ` holds that
//!   entry is killed (the way Jenkins' ProcessTreeKiller finds a build's daemons by `BUILD_ID`).
//!   Only a process that clears its own environment escapes this: the reason for the sandbox.
//! - stdout and stderr share one pipe, so the log keeps their interleaving in arrival order.
//! - A job ends when its command exits, even if a background child still holds the pipe open:
//!   the group is killed then and the pipe is drained for at most [`DRAIN_AFTER_EXIT`].

use std::collections::VecDeque;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

/// How long the pipe is read after the command exited (and its group was killed).
pub const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

/// Bytes of output kept for the result's `output_tail`.
pub const TAIL_BYTES: usize = 4096;

/// What to run.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Shell command, given to `sh -c` as one argument (never spliced with repo data).
    pub command: String,
    /// Working directory: the checkout.
    pub dir: PathBuf,
    /// The whole environment; nothing is inherited.
    pub env: Vec<(String, String)>,
    pub timeout: Duration,
    /// Time between SIGTERM and SIGKILL.
    pub grace: Duration,
    /// Who runs it: the start of every job token, so a restarted runner can find what a killed
    /// one left running ([`kill_orphans`]).
    pub owner: String,
    /// How it is isolated: `None` runs `sh` directly in its own process group.
    pub sandbox: Option<Sandboxed>,
}

/// A command run in a sandbox ([`crate::sandbox`]): the sandbox program and its arguments up to
/// the `--` before `sh -c COMMAND`, and the job's bound on processes.
#[derive(Debug, Clone)]
pub struct Sandboxed {
    pub program: PathBuf,
    pub args: Vec<std::ffi::OsString>,
    /// At most this many processes (and threads) at once in the job: `RLIMIT_NPROC`, which the
    /// kernel counts in the job's own user namespace (for a runner that is not root), and a
    /// count of the sandbox's processes every [`PID_SAMPLE_EVERY`], which ends a job that
    /// reaches it with [`Ended::Bound`]; with `pids`, the job's own pids cgroup as well.
    pub max_procs: Option<u32>,
    /// Where the job's pids cgroup is made, when the kernel lets the runner make one: then the
    /// kernel refuses forks past `max_procs` whoever runs the runner ([`crate::cgroup`]).
    pub pids: Option<crate::cgroup::PidsParent>,
}

/// How the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// It exited with this code.
    Exited(i32),
    /// A signal it did not ask for ended it (9 is SIGKILL).
    Signaled(i32),
    /// It ran past the timeout; `signal` is the one that finally ended it.
    TimedOut { signal: Option<i32> },
    /// It was cancelled; `signal` is the one that finally ended it.
    Cancelled { signal: Option<i32> },
    /// It was killed for reaching a bound of its sandbox: this many processes at once.
    Bound { processes: u32 },
}

/// What a finished command left.
#[derive(Debug)]
pub struct Outcome {
    pub ended: Ended,
    /// Bytes it wrote to stdout and stderr.
    pub output_bytes: u64,
    /// The last [`TAIL_BYTES`] of that output.
    pub tail: Vec<u8>,
}

/// Where a command's output goes, piece by piece as it arrives. `write` may take its time: while
/// it waits the pipe is not read, so a test that prints faster than its log can be stored is
/// slowed down instead of having its output thrown away.
pub trait Output: Send {
    fn write<'a>(
        &'a mut self,
        bytes: &'a [u8],
    ) -> impl std::future::Future<Output = ()> + Send + 'a;
}

/// Runs `spec`, handing each piece of output to `sink` as it arrives.
///
/// Errors: only when the command cannot be started (`sh` missing, directory gone); everything
/// the command does is an [`Outcome`].
pub async fn run(
    spec: &Spec,
    sink: &mut impl Output,
    cancel: &CancellationToken,
) -> io::Result<Outcome> {
    let token = job_token(&spec.owner);
    let marker = format!("{TOKEN_VAR}={token}");
    let (reader, writer) = io::pipe()?;
    // An absolute path: with a relative one and PATH in the environment, std cannot use
    // posix_spawn (vfork) and forks the whole runner, page tables and all.
    let mut cgroup = None;
    let mut cmd = match &spec.sandbox {
        None => tokio::process::Command::new(SHELL),
        Some(sandbox) => {
            let mut cmd = tokio::process::Command::new(&sandbox.program);
            cmd.args(&sandbox.args).arg(SHELL);
            if let Some(n) = sandbox.max_procs {
                limit_processes(&mut cmd, n);
                // The token without the owner, which the cgroup's name has already.
                let name = token.strip_prefix(&spec.owner).unwrap_or(&token);
                cgroup = sandbox.pids.as_ref().and_then(|pids| {
                    pids.job(name.trim_start_matches('-'), n)
                        .inspect_err(|e| {
                            tracing::warn!(error = %e, "cannot make the job's pids cgroup; counting its processes instead")
                        })
                        .ok()
                });
            }
            if let Some(cgroup) = &cgroup {
                // SAFETY: `enter` only opens and writes a file (async-signal-safe calls, no
                // allocation).
                unsafe {
                    cmd.pre_exec(cgroup.enter());
                }
            }
            cmd
        }
    };
    cmd.arg("-c")
        .arg(&spec.command)
        .current_dir(&spec.dir)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::from(writer.try_clone()?))
        .stderr(Stdio::from(writer))
        .process_group(0)
        .kill_on_drop(true);
    if spec.sandbox.is_none() {
        cmd.env(TOKEN_VAR, &token);
    }
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            if let Some(cgroup) = cgroup {
                tokio::task::spawn_blocking(move || cgroup.remove());
            }
            return Err(e);
        }
    };
    // The parent's copies of the pipe's write end must close, or the reader never sees EOF.
    drop(cmd);
    let pgid = Pid::from_raw(child.id().map(|p| p as i32).unwrap_or(0));
    let job = Job {
        pgid,
        sandboxed: spec.sandbox.is_some(),
    };
    let max_procs = spec.sandbox.as_ref().and_then(|s| s.max_procs);
    let mut pids = PidClock::start(pgid.as_raw());
    // Where no kernel bound holds (root runs the runner, and no pids cgroup), the count is the
    // only bound: it is taken more often.
    let sample_every =
        if spec.sandbox.is_some() && cgroup.is_none() && nix::unistd::geteuid().is_root() {
            PID_SAMPLE_ONLY_BOUND
        } else {
            PID_SAMPLE_EVERY
        };
    let mut pid_sample = Instant::now() + sample_every;
    let mut pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(reader.into())?;

    let mut tail = Tail::default();
    let mut total = 0u64;
    let mut buf = vec![0u8; 32 * 1024];
    // Durations are bounded where users give them (`jetci::limits`); a deadline past what an
    // `Instant` holds is never, not a panic.
    let far = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
    let after = |d: Duration| Instant::now().checked_add(d).unwrap_or(far).min(far);
    let deadline = after(spec.timeout);
    let mut kill_at = far;
    let mut drain_until = far;
    let mut eof = false;
    let mut status = None;
    let mut stopped: Option<Stop> = None;

    loop {
        if eof && status.is_some() {
            break;
        }
        tokio::select! {
            read = pipe.read(&mut buf), if !eof => match read {
                Ok(0) | Err(_) => eof = true,
                Ok(n) => {
                    total += n as u64;
                    tail.push(&buf[..n]);
                    sink.write(&buf[..n]).await;
                }
            },
            exit = child.wait(), if status.is_none() => {
                status = Some(exit?);
                // Whatever the command left behind in its group goes with it.
                job.kill();
                drain_until = Instant::now() + DRAIN_AFTER_EXIT;
            }
            _ = sleep_until(deadline), if status.is_none() && stopped.is_none() => {
                stopped = Some(Stop::Timeout);
                job.terminate();
                kill_at = after(spec.grace);
            }
            _ = cancel.cancelled(), if status.is_none() && stopped.is_none() => {
                stopped = Some(Stop::Cancel);
                job.terminate();
                kill_at = after(spec.grace);
            }
            _ = sleep_until(kill_at), if status.is_none() => {
                job.kill();
                kill_at = far;
            }
            _ = sleep_until(drain_until), if status.is_some() => break,
            _ = sleep_until(pid_sample), if status.is_none() => {
                pid_sample = Instant::now() + sample_every;
                if !job.sandboxed {
                    pids.sample();
                } else if let Some(max) = max_procs.filter(|_| stopped.is_none()) {
                    let at_bound = match &cgroup {
                        Some(c) => c.refused() > 0 || c.current().unwrap_or(0) >= u64::from(max),
                        None => job.processes() >= max as usize,
                    };
                    if at_bound {
                        stopped = Some(Stop::Bound(max));
                        job.kill();
                    }
                }
            }
        }
    }
    let status = status.expect("the loop ends only after the command exited");
    if !job.sandboxed {
        // Every process of the job was created after its shell, so only newer pids are looked
        // at, unless the pid counter wrapped around meanwhile. (In a sandbox the kernel ended
        // them all with its PID namespace.)
        pids.sample();
        let escaped = kill_marked(marker.into_bytes(), true, pids.newer_than()).await;
        if escaped > 0 {
            tracing::info!(
                processes = escaped,
                "killed processes the job left outside its group"
            );
        }
    }
    // bwrap reports a command killed by signal N as exit code 128 + N, as a shell does; when the
    // runner stopped it, that is the runner's signal.
    let signal = match (job.sandboxed, status.code()) {
        (true, Some(code)) if code > 128 && stopped.is_some() => Some(code - 128),
        _ => status.signal(),
    };
    // A fork the kernel refused may end the command before the next count: it still ended
    // at its bound, unless it coped and passed.
    if let (Some(c), Some(max), None) = (&cgroup, max_procs, stopped) {
        if c.refused() > 0 && !status.success() {
            stopped = Some(Stop::Bound(max));
        }
    }
    // Removed before the result goes out: a runner stopped right after it leaves nothing.
    if let Some(cgroup) = cgroup {
        let _ = tokio::task::spawn_blocking(move || cgroup.remove()).await;
    }
    let ended = match (stopped, status.code(), signal) {
        (Some(Stop::Timeout), _, signal) => Ended::TimedOut { signal },
        (Some(Stop::Cancel), _, signal) => Ended::Cancelled { signal },
        (Some(Stop::Bound(processes)), _, _) => Ended::Bound { processes },
        (None, Some(code), _) => Ended::Exited(code),
        (None, None, Some(signal)) => Ended::Signaled(signal),
        (None, None, None) => Ended::Exited(-1),
    };
    Ok(Outcome {
        ended,
        output_bytes: total,
        tail: tail.into_vec(),
    })
}

/// Why the runner stopped a command before it exited.
#[derive(Debug, Clone, Copy)]
enum Stop {
    Timeout,
    Cancel,
    /// It reached its bound of processes.
    Bound(u32),
}

/// The processes of one running command, as the runner reaches them.
struct Job {
    /// The group of the process the runner started (`sh`, or bwrap's outer process).
    pgid: Pid,
    /// Whether that process is bwrap's.
    sandboxed: bool,
}

impl Job {
    /// Asks the command to stop (SIGTERM). In a sandbox the signal goes to the job's processes
    /// and not to bwrap, whose death would SIGKILL them all at once, without the grace.
    fn terminate(&self) {
        if self.sandboxed {
            for pid in sandbox_processes(self.pgid.as_raw()) {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        } else {
            let _ = killpg(self.pgid, Signal::SIGTERM);
        }
    }

    /// SIGKILLs the group; in a sandbox bwrap's death takes every process of the job with it
    /// (`--die-with-parent` and the PID namespace).
    fn kill(&self) {
        let _ = killpg(self.pgid, Signal::SIGKILL);
    }

    /// How many processes and threads run in the sandbox (bwrap's init included, as the kernel
    /// counts them against `RLIMIT_NPROC`).
    fn processes(&self) -> usize {
        let mut count = 0;
        let mut stack = children(self.pgid.as_raw());
        while let Some(pid) = stack.pop() {
            count += std::fs::read_dir(format!("/proc/{pid}/task"))
                .map(|d| d.count())
                .unwrap_or(1);
            stack.extend(children(pid));
        }
        count
    }
}

/// The processes of a sandbox whose bwrap has pid `bwrap`: every descendant but bwrap's init.
fn sandbox_processes(bwrap: i32) -> Vec<i32> {
    let mut found = Vec::new();
    let mut stack: Vec<i32> = children(bwrap).into_iter().flat_map(children).collect();
    while let Some(pid) = stack.pop() {
        found.push(pid);
        stack.extend(children(pid));
    }
    found
}

/// The children of `pid`'s threads (`/proc/<pid>/task/<tid>/children`).
fn children(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

/// Sets `RLIMIT_NPROC` to `n` in the process `cmd` starts (bwrap), before it makes the job's
/// user namespace; the job cannot raise it (that needs `CAP_SYS_RESOURCE` outside).
fn limit_processes(cmd: &mut tokio::process::Command, n: u32) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    // SAFETY: the closure only makes two system calls (getrlimit, setrlimit), which are
    // async-signal-safe, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            // Never above the runner's own hard limit, which only root could raise.
            let (_, hard) = getrlimit(Resource::RLIMIT_NPROC)?;
            let n = u64::from(n).min(hard);
            setrlimit(Resource::RLIMIT_NPROC, n, n).map_err(io::Error::from)
        });
    }
}

/// The environment variable that marks every process of one job.
pub const TOKEN_VAR: &str = "JETCI_JOB_TOKEN";

/// Kills what jobs of `owner` left running when the runner that ran them was killed (SIGKILL
/// gives a runner no chance to stop its jobs): every process whose job token starts with
/// `owner`. Returns how many.
pub async fn kill_orphans(owner: &str) -> usize {
    kill_marked(format!("{TOKEN_VAR}={owner}-").into_bytes(), false, None).await
}

/// The shell that runs a job's command.
const SHELL: &str = "/bin/sh";

/// How often a running job's [`PidClock`] is read: far more often than the kernel can hand out
/// `pid_max` pids (32768 by default: 327,680 processes or threads a second would be needed).
const PID_SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// How often a sandboxed job's processes are counted when that count is its only bound (a root
/// runner without a pids cgroup): a fork loop gets little time past the bound.
const PID_SAMPLE_ONLY_BOUND: Duration = Duration::from_millis(10);

/// Tells whether every process a job started has a higher pid than its shell.
///
/// Linux hands out pids in increasing order (`/proc/sys/kernel/ns_last_pid` is the last one) and
/// wraps around at `pid_max`. Sampled every [`PID_SAMPLE_EVERY`] while the job runs and once at
/// its end: as long as the last pid never went down and stayed above the shell's, no pid was
/// handed out twice, and the job's processes are exactly the marked ones above the shell's pid.
#[derive(Debug)]
struct PidClock {
    shell: i32,
    last: Option<i32>,
    wrapped: bool,
}

impl PidClock {
    fn start(shell: i32) -> PidClock {
        let mut clock = PidClock {
            shell,
            last: None,
            wrapped: shell <= 0,
        };
        clock.sample();
        clock
    }

    fn sample(&mut self) {
        self.see(last_pid());
    }

    /// Takes one reading of the last pid (`None`: it could not be read).
    fn see(&mut self, now: Option<i32>) {
        match (self.last, now) {
            (_, None) => self.wrapped = true,
            (Some(before), Some(now)) if now < before => self.wrapped = true,
            _ => {}
        }
        if now.is_some_and(|n| n < self.shell) {
            self.wrapped = true;
        }
        self.last = now;
    }

    /// The shell's pid when only newer pids can belong to the job, `None` when every process
    /// must be looked at.
    fn newer_than(&self) -> Option<i32> {
        (!self.wrapped).then_some(self.shell)
    }
}

/// A token no other job on this machine has: owner, pid, time and a counter.
fn job_token(owner: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{owner}-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// SIGKILLs every process whose environment holds `marker` (`NAME=value`; with `exact` false,
/// any entry starting with it), a few rounds in case one forks while being killed. With
/// `newer_than` (see [`PidClock`]), only pids above it are read. Returns how many were killed.
async fn kill_marked(marker: Vec<u8>, exact: bool, newer_than: Option<i32>) -> usize {
    tokio::task::spawn_blocking(move || {
        let mut killed = 0;
        for _ in 0..5 {
            let found = marked_pids(&marker, exact, newer_than.unwrap_or(0));
            if found.is_empty() {
                break;
            }
            for pid in found {
                if nix::sys::signal::kill(pid, Signal::SIGKILL).is_ok() {
                    killed += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        killed
    })
    .await
    .unwrap_or(0)
}

/// The last pid the kernel handed out in this pid namespace.
fn last_pid() -> Option<i32> {
    std::fs::read_to_string("/proc/sys/kernel/ns_last_pid")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Pids above `above` whose environment holds `marker`.
fn marked_pids(marker: &[u8], exact: bool, above: i32) -> Vec<Pid> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid > above)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .map(|env| {
                    env.split(|b| *b == 0).any(|e| {
                        if exact {
                            e == marker
                        } else {
                            e.starts_with(marker)
                        }
                    })
                })
                .unwrap_or(false)
        })
        .map(Pid::from_raw)
        .collect()
}

/// The last [`TAIL_BYTES`] of a byte stream.
#[derive(Default)]
struct Tail(VecDeque<u8>);

impl Tail {
    fn push(&mut self, bytes: &[u8]) {
        let bytes = &bytes[bytes.len().saturating_sub(TAIL_BYTES)..];
        let overflow = (self.0.len() + bytes.len()).saturating_sub(TAIL_BYTES);
        self.0.drain(..overflow);
        self.0.extend(bytes);
    }
    fn into_vec(self) -> Vec<u8> {
        self.0.into()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn pid_clock_notices_a_wrap_around() {
        use super::PidClock;
        let clock = |shell: i32, seen: &[Option<i32>]| {
            let mut c = PidClock {
                shell,
                last: Some(shell),
                wrapped: false,
            };
            for s in seen {
                c.see(*s);
            }
            c.newer_than()
        };
        assert_eq!(
            clock(7408, &[Some(7410), Some(9000), Some(9001)]),
            Some(7408)
        );
        // Wrapped and climbed back past the shell: one sample in between went down.
        assert_eq!(clock(7408, &[Some(30000), Some(359), Some(7500)]), None);
        // Below the shell's pid at the end.
        assert_eq!(clock(7408, &[Some(30000), Some(100)]), None);
        // Unreadable: look at everything.
        assert_eq!(clock(7408, &[None, Some(7500)]), None);
        assert_eq!(PidClock::start(0).newer_than(), None);
    }

    use super::*;

    fn spec(command: &str, timeout: Duration) -> Spec {
        Spec {
            command: command.into(),
            dir: std::env::temp_dir(),
            env: vec![("PATH".into(), std::env::var("PATH").unwrap_or_default())],
            timeout,
            grace: Duration::from_millis(500),
            owner: "test".into(),
            sandbox: None,
        }
    }

    struct Collect(Vec<u8>);

    impl Output for Collect {
        async fn write(&mut self, bytes: &[u8]) {
            self.0.extend_from_slice(bytes);
        }
    }

    async fn run_collect(s: &Spec, cancel: &CancellationToken) -> (Outcome, Vec<u8>) {
        let mut out = Collect(Vec::new());
        let o = run(s, &mut out, cancel).await.unwrap();
        (o, out.0)
    }

    #[tokio::test]
    async fn exit_codes_output_and_env() {
        let never = CancellationToken::new();
        let (o, out) = run_collect(
            &spec("echo out; echo err >&2; exit 3", Duration::from_secs(30)),
            &never,
        )
        .await;
        assert_eq!(o.ended, Ended::Exited(3));
        assert_eq!(out, b"out\nerr\n");
        assert_eq!(o.output_bytes, 8);
        let mut s = spec("test -z \"$HOME\" && echo $X", Duration::from_secs(30));
        s.env.push(("X".into(), "from-spec".into()));
        let (o, out) = run_collect(&s, &never).await;
        assert_eq!((o.ended, out), (Ended::Exited(0), b"from-spec\n".to_vec()));
        let (o, _) = run_collect(&spec("kill -9 $$", Duration::from_secs(30)), &never).await;
        assert_eq!(o.ended, Ended::Signaled(9));
    }

    #[tokio::test]
    async fn timeout_kills_the_group_and_background_children_do_not_hold_the_job() {
        let never = CancellationToken::new();
        let started = std::time::Instant::now();
        let (o, _) = run_collect(
            &spec("sleep 1000 & sleep 1000", Duration::from_millis(300)),
            &never,
        )
        .await;
        assert!(matches!(o.ended, Ended::TimedOut { .. }), "{:?}", o.ended);
        assert!(started.elapsed() < Duration::from_secs(20));
        // The command exits at once, its background child holds the pipe: the job still ends.
        let (o, out) = run_collect(
            &spec("sleep 1000 & echo done", Duration::from_secs(60)),
            &never,
        )
        .await;
        assert_eq!(o.ended, Ended::Exited(0));
        assert_eq!(out, b"done\n");
    }

    #[tokio::test]
    async fn a_daemon_that_left_the_group_is_killed_when_the_job_ends() {
        let never = CancellationToken::new();
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("daemon.pid");
        // setsid puts the daemon in its own session and group, out of reach of killpg.
        let command = format!(
            "setsid sh -c 'echo $$ > {p}; exec sleep 1000' < /dev/null > /dev/null 2>&1 & \
             while [ ! -s {p} ]; do sleep 0.05; done; echo started",
            p = pidfile.display()
        );
        let (o, out) = run_collect(&spec(&command, Duration::from_secs(30)), &never).await;
        assert_eq!((o.ended, out), (Ended::Exited(0), b"started\n".to_vec()));
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::path::Path::new(&format!("/proc/{pid}")).exists()
            && std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| !s.contains(") Z "))
                .unwrap_or(false)
        {
            assert!(
                std::time::Instant::now() < deadline,
                "daemon {pid} survived its job"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[tokio::test]
    async fn cancel_stops_it() {
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            c.cancel();
        });
        let (o, _) = run_collect(&spec("sleep 1000", Duration::from_secs(60)), &cancel).await;
        assert!(matches!(o.ended, Ended::Cancelled { .. }), "{:?}", o.ended);
    }

    /// A spec that runs `command` in a bwrap sandbox like a job's, in `dir`.
    fn sandboxed(command: &str, dir: &std::path::Path, max_procs: Option<u32>) -> Spec {
        use crate::sandbox::{JobDirs, Sandbox, BWRAP};
        let dirs = JobDirs {
            checkout: dir.join("src"),
            home: dir.join("home"),
            tmp: dir.join("tmp"),
            cache: None,
        };
        for d in [&dirs.checkout, &dirs.home, &dirs.tmp] {
            std::fs::create_dir_all(d).unwrap();
        }
        let sandbox = Sandbox {
            program: BWRAP.into(),
            work_dir: dir.to_path_buf(),
            ro_binds: Vec::new(),
            hidden_files: Vec::new(),
            network: true,
        };
        let mut s = spec(command, Duration::from_secs(30));
        s.dir = dirs.checkout.clone();
        s.sandbox = Some(Sandboxed {
            program: sandbox.program.clone(),
            args: sandbox.command(&dirs, true),
            max_procs,
            pids: None,
        });
        s
    }

    #[tokio::test]
    async fn in_a_sandbox_nothing_outlives_the_command() {
        let never = CancellationToken::new();
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path().canonicalize().unwrap();
        let command = "env -i setsid sh -c 'while :; do date >> f; sleep 0.1; done' \
                       < /dev/null > /dev/null 2>&1 & sleep 0.5; echo started";
        let (o, out) = run_collect(&sandboxed(command, &dir, None), &never).await;
        assert_eq!((o.ended, out), (Ended::Exited(0), b"started\n".to_vec()));
        let f = dir.join("src/f");
        let before = std::fs::read(&f).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(std::fs::read(&f).unwrap(), before, "the loop still runs");
    }

    #[tokio::test]
    async fn a_sandboxed_job_that_reaches_its_bound_of_processes_is_killed() {
        let never = CancellationToken::new();
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path().canonicalize().unwrap();
        let command = "for i in $(seq 100); do sleep 30 & done; wait";
        let (o, _) = run_collect(&sandboxed(command, &dir, Some(20)), &never).await;
        assert_eq!(o.ended, Ended::Bound { processes: 20 });
    }

    #[test]
    fn tail_keeps_the_end() {
        let mut t = Tail::default();
        t.push(&vec![b'a'; TAIL_BYTES]);
        t.push(b"xyz");
        let v = t.into_vec();
        assert_eq!(v.len(), TAIL_BYTES);
        assert!(v.ends_with(b"axyz"));
        let mut t = Tail::default();
        t.push(&vec![b'b'; TAIL_BYTES * 3]);
        assert_eq!(t.into_vec().len(), TAIL_BYTES);
    }
}
