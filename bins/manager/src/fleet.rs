//! The `jetci-runner` processes one manager owns: starting them, following their `ci-runners`
//! entries, stopping idle ones, restarting crashed ones, and draining them all at shutdown.
//!
//! Runner ids are `<name>-<n>` with the smallest free `n`, so the ids (and their durable consumers
//! on `CI_JOBS`) stay as few as `--max`. A crashed runner is restarted under the same id: the new
//! process waits out the old one's presence entry (the runner's own id check), and takes over its
//! consumer, as a runner restarted by systemd would.
//!
//! Processes are reaped by this module only (`try_wait` from the manager's loop), so a pid is
//! never signalled after it was reaped and possibly reused.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use async_nats::jetstream::kv;
use jetci::messages::{decode, RunnerInfo};
use jetci::scaling::{lowest_free_number, runner_id, RunnerLoad, RunnerView};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use time::OffsetDateTime;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A runner that crashed sooner than this after its start counts as crashing in a loop (bad
/// RUNNER-ARGS, NATS refusing it): its restarts back off.
const QUICK_CRASH: Duration = Duration::from_secs(10);
/// The longest pause between restarts of a runner that keeps crashing.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// A presence entry of one of our ids, written by a process that is not ours (a runner left by
/// an earlier life of this manager), counts as in use for this long after its last refresh.
const FOREIGN_FRESH: Duration = Duration::from_secs(10);

/// How to start a runner.
pub struct Spec {
    pub program: PathBuf,
    pub labels: Vec<String>,
    /// `--work-dir` is `<work_root>/<id>`; without it the runner's default (per id).
    pub work_root: Option<PathBuf>,
    /// Environment for the runner: the manager's connection settings.
    pub env: Vec<(String, String)>,
    /// Flags before RUNNER-ARGS (`--log-format`).
    pub leading: Vec<String>,
    /// RUNNER-ARGS, after `--`.
    pub args: Vec<String>,
    /// Forward the runners' log lines as they are (JSON) instead of prefixed with the id.
    pub raw_logs: bool,
}

/// One runner slot: a process, or the pause before restarting one.
struct Runner {
    id: String,
    child: Option<Child>,
    /// When the current process started, on this host's clock (the runner writes its
    /// `started_at` with the same clock, so an entry of an earlier life is told apart).
    spawned_at: OffsetDateTime,
    started: Instant,
    presence: Option<Presence>,
    /// SIGTERM sent by the manager: its exit is expected.
    stopping: bool,
    /// Crashed; started again at this time.
    restart_at: Option<Instant>,
    quick_crashes: u32,
    logs: Vec<JoinHandle<()>>,
}

/// What the runner's current `ci-runners` entry says.
struct Presence {
    capacity: u32,
    busy: u32,
    /// Last time its entry listed a job (or it registered).
    last_busy: Instant,
}

/// The manager's runners.
pub struct Fleet {
    name: String,
    spec: Spec,
    runners: BTreeMap<u32, Runner>,
    /// Entries of ids that look like ours but are not a current runner of this process.
    foreign: HashMap<String, Instant>,
}

impl Fleet {
    pub fn new(name: String, spec: Spec) -> Fleet {
        Fleet {
            name,
            spec,
            runners: BTreeMap::new(),
            foreign: HashMap::new(),
        }
    }

    /// Follows one `ci-runners` entry (from a bucket watch: latest state).
    pub fn on_runner_entry(&mut self, e: &kv::Entry) {
        let Some((_, r)) = self.runners.iter_mut().find(|(_, r)| r.id == e.key) else {
            if e.key.starts_with(&format!("{}-", self.name)) {
                if e.operation == kv::Operation::Put {
                    self.foreign.insert(e.key.clone(), Instant::now());
                } else {
                    self.foreign.remove(&e.key);
                }
            }
            return;
        };
        if e.operation != kv::Operation::Put {
            // Drained and gone; its exit is reaped next.
            r.presence = None;
            return;
        }
        let Ok(info) = decode::<RunnerInfo>(&e.value) else {
            return;
        };
        if info.started_at < r.spawned_at - Duration::from_secs(1) {
            // The entry of an earlier process under this id.
            return;
        }
        let now = Instant::now();
        let busy = info.jobs.len() as u32;
        match &mut r.presence {
            Some(p) => {
                p.capacity = info.capacity;
                p.busy = busy;
                if busy > 0 {
                    p.last_busy = now;
                }
            }
            None => {
                tracing::info!(runner = %r.id, capacity = info.capacity, "runner registered");
                r.presence = Some(Presence {
                    capacity: info.capacity,
                    busy,
                    last_busy: now,
                });
            }
        }
    }

    /// The runners as the scaling policy sees them; runners being stopped are left out.
    pub fn views(&self) -> Vec<RunnerView> {
        let now = Instant::now();
        self.runners
            .values()
            .filter(|r| !r.stopping)
            .map(|r| RunnerView {
                id: r.id.clone(),
                load: match &r.presence {
                    Some(p) if r.child.is_some() => RunnerLoad::Up {
                        capacity: p.capacity,
                        busy: p.busy,
                        idle_for: if p.busy == 0 {
                            now - p.last_busy
                        } else {
                            Duration::ZERO
                        },
                    },
                    _ => RunnerLoad::Starting,
                },
            })
            .collect()
    }

    /// Starts `count` new runners.
    pub fn start(&mut self, count: u32) {
        for _ in 0..count {
            let fresh = |seen: &Instant| seen.elapsed() < FOREIGN_FRESH;
            let taken: Vec<u32> = self
                .runners
                .keys()
                .copied()
                .chain(
                    self.foreign
                        .iter()
                        .filter(|(_, t)| fresh(t))
                        .filter_map(|(id, _)| {
                            id.strip_prefix(&format!("{}-", self.name))
                                .and_then(|n| n.parse().ok())
                        }),
                )
                .collect();
            let n = lowest_free_number(taken);
            let mut runner = Runner {
                id: runner_id(&self.name, n),
                child: None,
                spawned_at: OffsetDateTime::now_utc(),
                started: Instant::now(),
                presence: None,
                stopping: false,
                restart_at: None,
                quick_crashes: 0,
                logs: Vec::new(),
            };
            self.spawn(&mut runner);
            self.runners.insert(n, runner);
        }
    }

    /// Starts (or restarts) the process of `r`; a failure is handled like a crash.
    fn spawn(&self, r: &mut Runner) {
        let mut cmd = Command::new(&self.spec.program);
        cmd.arg("--id").arg(&r.id);
        if let Some(root) = &self.spec.work_root {
            cmd.arg("--work-dir").arg(root.join(&r.id));
        }
        if !self.spec.labels.is_empty() {
            cmd.arg("--labels").arg(self.spec.labels.join(","));
        }
        cmd.args(&self.spec.leading).args(&self.spec.args);
        cmd.envs(self.spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a Ctrl-C in the manager's terminal reaches the manager only,
            // which drains the runners with one SIGTERM each (a second would hurry them).
            .process_group(0)
            .kill_on_drop(false);
        #[cfg(target_os = "linux")]
        // SAFETY: the closure runs between fork and exec and makes one prctl(2) system call,
        // which is async-signal-safe; it allocates nothing and takes no lock.
        unsafe {
            // Should the manager die without draining (SIGKILL), its runners drain by themselves
            // instead of running on unmanaged.
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from)
            });
        }
        r.spawned_at = OffsetDateTime::now_utc();
        r.started = Instant::now();
        r.presence = None;
        r.restart_at = None;
        match cmd.spawn() {
            Ok(mut child) => {
                // Counted here, not where the policy decides, so a crashed runner's replacement
                // counts too.
                metrics::counter!(jetci::metrics::names::MANAGER_STARTED).increment(1);
                tracing::info!(runner = %r.id, pid = child.id().unwrap_or(0), "runner started");
                r.logs.retain(|h| !h.is_finished());
                if let Some(out) = child.stdout.take() {
                    r.logs.push(forward(out, r.id.clone(), self.spec.raw_logs));
                }
                if let Some(err) = child.stderr.take() {
                    r.logs.push(forward(err, r.id.clone(), self.spec.raw_logs));
                }
                r.child = Some(child);
            }
            Err(e) => {
                tracing::error!(runner = %r.id, program = %self.spec.program.display(), error = %e, "cannot start runner");
                schedule_restart(r);
            }
        }
    }

    /// SIGTERM to each runner in `ids`: an idle runner deregisters and exits at once.
    pub fn stop(&mut self, ids: &[String]) {
        for r in self.runners.values_mut() {
            if ids.contains(&r.id) && !r.stopping {
                r.stopping = true;
                if r.child.is_none() {
                    continue;
                }
                signal(r, Signal::SIGTERM);
            }
        }
    }

    /// Reaps runners that exited: a stopped one is forgotten, any other crashed and is restarted
    /// (after a pause when it keeps crashing). Restarts that are due are made.
    pub fn reap_and_restart(&mut self, shutting_down: bool) {
        let mut gone = Vec::new();
        for (n, r) in self.runners.iter_mut() {
            let Some(child) = r.child.as_mut() else {
                continue;
            };
            let status = match child.try_wait() {
                Ok(Some(status)) => status,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(runner = %r.id, error = %e, "cannot check the runner's process");
                    continue;
                }
            };
            r.child = None;
            r.presence = None;
            if r.stopping || shutting_down {
                tracing::info!(runner = %r.id, status = %describe(status), "runner stopped");
                gone.push(*n);
            } else {
                tracing::warn!(runner = %r.id, status = %describe(status), ran_for = %humantime::format_duration(round(r.started.elapsed())), "runner exited unexpectedly; restarting it");
                schedule_restart(r);
            }
        }
        for n in gone {
            self.runners.remove(&n);
        }
        if shutting_down {
            self.runners.retain(|_, r| r.child.is_some());
            return;
        }
        let due: Vec<u32> = self
            .runners
            .iter()
            .filter(|(_, r)| r.child.is_none() && r.restart_at.is_some_and(|t| t <= Instant::now()))
            .map(|(n, _)| *n)
            .collect();
        for n in due {
            let mut r = self.runners.remove(&n).expect("listed");
            if r.stopping {
                continue;
            }
            self.spawn(&mut r);
            self.runners.insert(n, r);
        }
    }

    /// Drains every runner: one SIGTERM each (a runner finishes its jobs, up to its
    /// `--drain-timeout`), a second one when `again` is cancelled (runners hand their jobs back at
    /// once), and waits until all have exited.
    pub async fn drain(&mut self, again: &CancellationToken) {
        self.runners.retain(|_, r| r.child.is_some());
        for r in self.runners.values_mut() {
            if !r.stopping {
                r.stopping = true;
                signal(r, Signal::SIGTERM);
            }
        }
        if !self.runners.is_empty() {
            tracing::info!(
                runners = self.runners.len(),
                "draining runners: each finishes its jobs (signal again to hand them back)"
            );
        }
        let mut hurried = false;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        while !self.runners.is_empty() {
            tokio::select! {
                _ = again.cancelled(), if !hurried => {
                    hurried = true;
                    tracing::info!("handing the runners' jobs back");
                    for r in self.runners.values_mut() {
                        signal(r, Signal::SIGTERM);
                    }
                }
                _ = tick.tick() => self.reap_and_restart(true),
            }
        }
        // Let the last log lines through (a test command's leftover could hold a pipe open:
        // do not wait for it).
        let logs: Vec<JoinHandle<()>> = std::mem::take(&mut self.runners)
            .into_values()
            .flat_map(|r| r.logs)
            .collect();
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            for h in logs {
                let _ = h.await;
            }
        })
        .await;
    }
}

fn schedule_restart(r: &mut Runner) {
    let delay = if r.started.elapsed() < QUICK_CRASH {
        r.quick_crashes += 1;
        (Duration::from_secs(1) * 2u32.saturating_pow(r.quick_crashes - 1)).min(MAX_BACKOFF)
    } else {
        r.quick_crashes = 0;
        Duration::ZERO
    };
    if !delay.is_zero() {
        tracing::warn!(runner = %r.id, crashes = r.quick_crashes, delay = %humantime::format_duration(delay), "runner keeps crashing; waiting before the restart");
    }
    r.restart_at = Some(Instant::now() + delay);
}

fn signal(r: &Runner, sig: Signal) {
    if let Some(pid) = r.child.as_ref().and_then(|c| c.id()) {
        let _ = kill(Pid::from_raw(pid as i32), sig);
    }
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(s) => format!("killed by {s}"),
            Err(_) => format!("killed by signal {sig}"),
        },
        _ => status.to_string(),
    }
}

fn round(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64 / 100 * 100)
}

/// Copies a runner's output to the manager's stderr line by line, each line prefixed with the
/// runner's id (or as it is, for JSON logs), so the journal of the manager shows its runners.
fn forward(out: impl AsyncRead + Unpin + Send + 'static, id: String, raw: bool) -> JoinHandle<()> {
    tokio::spawn(async move {
        use std::io::Write;
        let mut lines = BufReader::new(out).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            // A closed stderr must not stop the manager: the line is lost, nothing else.
            let mut err = std::io::stderr().lock();
            let _ = if raw {
                writeln!(err, "{line}")
            } else {
                writeln!(err, "[{id}] {line}")
            };
        }
    })
}
