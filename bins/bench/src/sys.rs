//! The world a benchmark runs in: a nats-server with its own store, the real jetci binaries as
//! processes, git repositories made with the git CLI, a listener that timestamps every result, and
//! readings of /proc.

use std::fs::{self, File};
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;

/// A port on 127.0.0.1 that was free a moment ago.
/// Connects to `url` as jetci's binaries do (server version and JetStream checked), with the
/// connection name `name` (what `/connz` shows).
pub async fn connect(url: &str, name: &str) -> Result<jetci::connect::Nats> {
    let args = jetci::connect::ConnectArgs {
        server: url.to_string(),
        creds: None,
        user: None,
        password: None,
        token: None,
        nkey: None,
        tlscert: None,
        tlskey: None,
        tlsca: None,
        inbox_prefix: None,
        prefix: "ci".into(),
        replicas: 1,
    };
    Ok(args.connect(name).await?)
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("cannot bind 127.0.0.1:0")
}

/// The directory of this executable: the product binaries of the same build are beside it.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent().expect("exe dir").to_path_buf()
}

pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

// -------------------------------------------------------------------------------------------
// nats-server
// -------------------------------------------------------------------------------------------

/// `nats-server -js` on a free port with a temp store and its HTTP monitoring on another;
/// killed on drop.
pub struct Server {
    pub port: u16,
    /// The monitoring port (`/varz`, `/connz`), for per-connection message counts.
    pub monitor_port: u16,
    pub proc: Proc,
    _dir: TempDir,
}

impl Server {
    pub fn start(rt: &tokio::runtime::Runtime) -> Result<Server> {
        for _ in 0..5 {
            let dir = tempfile::Builder::new()
                .prefix("jetci-bench-nats-")
                .tempdir()?;
            let port = free_port();
            let monitor_port = free_port();
            let store = dir.path().join("store");
            fs::create_dir_all(&store)?;
            let proc = Proc::spawn_program(
                Path::new("nats-server"),
                &[
                    "-js",
                    "-a",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                    "-m",
                    &monitor_port.to_string(),
                    "-sd",
                    store.to_str().unwrap(),
                ],
                dir.path(),
                "nats-server",
            )?;
            let url = format!("nats://127.0.0.1:{port}");
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    let ok = rt.block_on(async {
                        let Ok(c) = async_nats::connect(&url).await else {
                            return false;
                        };
                        match c.request("$JS.API.INFO", "".into()).await {
                            Ok(m) => !String::from_utf8_lossy(&m.payload).contains("\"error\""),
                            Err(_) => false,
                        }
                    });
                    if ok {
                        return Ok(Server {
                            port,
                            monitor_port,
                            proc,
                            _dir: dir,
                        });
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        bail!("nats-server did not start (is it on PATH? deploy/install-nats-server.sh)")
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Messages each client connection sent to the server (`in`) and received from it (`out`)
    /// so far, summed by connection name (from the monitoring endpoint `/connz`). Every
    /// publish, ack, KV operation and JetStream API request a client makes is one message in.
    pub fn connection_counts(&self) -> Result<std::collections::HashMap<String, MsgCounts>> {
        let body = http_get(self.monitor_port, "/connz?limit=4096")?;
        let v: serde_json::Value = serde_json::from_str(&body).context("/connz is not JSON")?;
        let mut out: std::collections::HashMap<String, MsgCounts> = Default::default();
        for c in v["connections"].as_array().into_iter().flatten() {
            let name = c["name"].as_str().unwrap_or("").to_string();
            let e = out.entry(name).or_default();
            e.msgs_in += c["in_msgs"].as_u64().unwrap_or(0);
            e.msgs_out += c["out_msgs"].as_u64().unwrap_or(0);
        }
        Ok(out)
    }
}

/// Message counts of a client connection, as the server sees them.
#[derive(Clone, Copy, Debug, Default)]
pub struct MsgCounts {
    /// Messages the client sent (publishes, requests, acks).
    pub msgs_in: u64,
    /// Messages the server delivered to the client (replies, pulled and watched messages).
    pub msgs_out: u64,
}

/// A plain HTTP/1.0 GET on 127.0.0.1 (the monitoring endpoint); the body.
fn http_get(port: u16, path: &str) -> Result<String> {
    use std::io::Read;
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    match text.split_once("\r\n\r\n") {
        Some((_, body)) => Ok(body.to_string()),
        None => bail!("no HTTP body from 127.0.0.1:{port}{path}"),
    }
}

// -------------------------------------------------------------------------------------------
// Processes
// -------------------------------------------------------------------------------------------

/// A spawned process, output to a log file, SIGKILLed on drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// A jetci binary from beside this executable, logging into `dir`.
    pub fn spawn(name: &str, args: &[&str], dir: &Path) -> Result<Proc> {
        Proc::spawn_program(&bin(name), args, dir, name)
    }

    pub fn spawn_program(program: &Path, args: &[&str], dir: &Path, label: &str) -> Result<Proc> {
        let log = dir.join(format!("{label}-{}.log", free_port()));
        let out = File::create(&log)?;
        let err = out.try_clone()?;
        let child = Command::new(program)
            .args(args)
            .env("NO_COLOR", "1")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot spawn {}", program.display()))?;
        Ok(Proc {
            name: label.to_string(),
            child,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, s: Signal) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), s);
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Fields of /proc/PID/stat after the command name.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    Some(after.split_whitespace().map(str::to_string).collect())
}

/// utime + stime of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let ticks = clock_ticks();
    stat_fields(pid)
        .map(|f| {
            let u: f64 = f.get(11).and_then(|s| s.parse().ok()).unwrap_or(0.0);
            let s: f64 = f.get(12).and_then(|s| s.parse().ok()).unwrap_or(0.0);
            (u + s) / ticks
        })
        .unwrap_or(0.0)
}

fn clock_ticks() -> f64 {
    static T: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *T.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// A `Vm*` field of /proc/PID/status in KiB (VmRSS, VmHWM).
pub fn vm_kib(pid: u32, field: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(&format!("{field}:")))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

// -------------------------------------------------------------------------------------------
// git
// -------------------------------------------------------------------------------------------

/// A git repository in a temp dir, changed with the git CLI.
pub struct Repo {
    dir: TempDir,
}

impl Repo {
    pub fn new(files: &[(&str, &str)]) -> Result<Repo> {
        let dir = tempfile::Builder::new()
            .prefix("jetci-bench-repo-")
            .tempdir()?;
        let r = Repo { dir };
        r.git(&["init", "-q", "-b", "main"])?;
        r.git(&["config", "user.name", "jetci bench"])?;
        r.git(&["config", "user.email", "bench@jetci.invalid"])?;
        r.git(&["config", "commit.gpgsign", "false"])?;
        r.git(&["config", "gc.auto", "0"])?;
        for (name, body) in files {
            let path = r.path().join(name);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::write(path, body)?;
        }
        r.git(&["add", "-A"])?;
        // Dated in the past (2023-11-14), so that the history `fast_commits` adds above it, a
        // second per commit, stays older than the commits a benchmark makes now with
        // `git commit`: dates rise along every history, as in a real repository.
        let old = [
            ("GIT_AUTHOR_DATE", "1700000000 +0000"),
            ("GIT_COMMITTER_DATE", "1700000000 +0000"),
        ];
        r.git_with(&["commit", "-q", "--allow-empty", "-m", "initial"], &old)?;
        Ok(r)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn path_str(&self) -> String {
        self.path().to_str().expect("utf-8 temp path").to_string()
    }

    pub fn git(&self, args: &[&str]) -> Result<String> {
        self.git_with(args, &[])
    }

    /// `git ARGS` with more environment variables.
    pub fn git_with(&self, args: &[&str], env: &[(&str, &str)]) -> Result<String> {
        let out = Command::new("git")
            .args(args)
            .envs(env.iter().copied())
            .current_dir(self.path())
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!(
                "git {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// One empty commit on the checked-out branch (git commit), returning its sha.
    pub fn commit(&self, msg: &str) -> Result<String> {
        self.git(&["commit", "-q", "--allow-empty", "-m", msg])?;
        self.git(&["rev-parse", "HEAD"])
    }

    pub fn head(&self) -> Result<String> {
        self.git(&["rev-parse", "HEAD"])
    }

    /// `n` empty commits on top of `branch` with git fast-import (fast: 50,000 in a second or
    /// two), then the shas oldest first. Their committer dates go up one second per commit from
    /// the branch head's, as a real history's mostly do (git's and libgit2's history walks order
    /// by date, and dates older than the history below them would send a walk through all of it;
    /// [`Repo::new`] dates the first commit in 2023, so 50,000 of them still end in the past).
    pub fn fast_commits(&self, branch: &str, n: usize) -> Result<Vec<String>> {
        let parent = self.git(&["rev-parse", branch])?;
        let parent_time: u64 = self
            .git(&["log", "-1", "--format=%ct", &parent])?
            .trim()
            .parse()
            .context("the branch head's commit time")?;
        let mut stream = String::with_capacity(n * 160);
        let t = parent_time + 1;
        for i in 0..n {
            let msg = format!("bulk {i}\n");
            stream.push_str(&format!(
                "commit refs/heads/{branch}\nmark :{m}\ncommitter bench <b@x> {ts} +0000\ndata {len}\n{msg}",
                m = i + 1,
                ts = t + i as u64,
                len = msg.len()
            ));
            if i == 0 {
                stream.push_str(&format!("from {parent}\n"));
            }
            stream.push('\n');
        }
        let mut child = Command::new("git")
            .args(["fast-import", "--quiet", "--force"])
            .current_dir(self.path())
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()?;
        child.stdin.take().unwrap().write_all(stream.as_bytes())?;
        if !child.wait()?.success() {
            bail!("git fast-import failed");
        }
        // Keep the work tree's index in step with the moved branch (same tree, empty commits).
        let list = self.git(&["rev-list", "--reverse", &format!("{parent}..{branch}")])?;
        Ok(list.lines().map(str::to_string).collect())
    }
}

/// The floor: check the commit out with git2 into a fresh directory and run `sh -c CMD` there.
pub fn floor_once(repo: &Path, sha: &str, cmd: &str) -> Result<Duration> {
    let t0 = Instant::now();
    let dest = tempfile::Builder::new()
        .prefix("jetci-bench-floor-")
        .tempdir()?;
    let r = git2::Repository::open(repo)?;
    let commit = r.find_commit(git2::Oid::from_str(sha)?)?;
    let tree = commit.tree()?;
    let mut cb = git2::build::CheckoutBuilder::new();
    cb.target_dir(dest.path())
        .force()
        .recreate_missing(true)
        .update_index(false);
    r.checkout_tree(tree.as_object(), Some(&mut cb))?;
    let st = Command::new("sh")
        .args(["-c", cmd])
        .current_dir(dest.path())
        .status()?;
    if !st.success() {
        bail!("floor command failed");
    }
    Ok(t0.elapsed())
}

// -------------------------------------------------------------------------------------------
// Results, timestamped on arrival
// -------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct Arrival {
    pub at: Instant,
    pub repo: String,
    pub sha: String,
    pub status: String,
    pub attempt: u64,
    /// A pipeline run's jobs' `duration_ms`, in the run's order (empty for a run of one job).
    pub jobs_ms: Vec<u64>,
}

/// Subscribes to `ci.results.>` with core NATS on its own thread and runtime, so arrival times
/// are taken at once even while the main thread runs git.
pub struct Listener {
    state: Arc<(Mutex<Vec<Arrival>>, Condvar)>,
}

impl Listener {
    pub fn start(url: &str) -> Result<Listener> {
        let state: Arc<(Mutex<Vec<Arrival>>, Condvar)> = Arc::default();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (st, url) = (state.clone(), url.to_string());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let client = match async_nats::connect(&url).await {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                // Run results only: a pipeline's job results are one token deeper.
                let mut sub = match client.subscribe("ci.results.*.*.*").await {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = client.flush().await;
                let _ = ready_tx.send(Ok(()));
                while let Some(m) = sub.next().await {
                    let at = Instant::now();
                    let v: serde_json::Value =
                        serde_json::from_slice(&m.payload).unwrap_or_default();
                    let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
                    let a = Arrival {
                        at,
                        repo: s("repo"),
                        sha: s("sha"),
                        status: s("status"),
                        attempt: v["attempt"].as_u64().unwrap_or(0),
                        jobs_ms: v["jobs"]
                            .as_array()
                            .map(|jobs| {
                                jobs.iter()
                                    .map(|j| j["duration_ms"].as_u64().unwrap_or(0))
                                    .collect()
                            })
                            .unwrap_or_default(),
                    };
                    let (lock, cv) = &*st;
                    lock.lock().unwrap().push(a);
                    cv.notify_all();
                }
            });
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .context("listener did not start")?
            .map_err(anyhow::Error::msg)?;
        Ok(Listener { state })
    }

    /// Waits for the result of `sha`; its arrival.
    pub fn wait_sha(&self, sha: &str, timeout: Duration) -> Result<Arrival> {
        self.wait(timeout, |all| all.iter().find(|a| a.sha == sha).cloned())
            .with_context(|| format!("no result for {sha} within {timeout:?}"))
    }

    /// Waits until `n` results of `repo` arrived; the n-th arrival.
    pub fn wait_count(&self, repo: &str, n: usize, timeout: Duration) -> Result<Arrival> {
        self.wait(timeout, |all| {
            all.iter().filter(|a| a.repo == repo).nth(n - 1).cloned()
        })
        .with_context(|| {
            format!(
                "fewer than {n} results of {repo} within {timeout:?} (got {})",
                self.count(repo)
            )
        })
    }

    pub fn count(&self, repo: &str) -> usize {
        self.state
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.repo == repo)
            .count()
    }

    pub fn all(&self) -> Vec<Arrival> {
        self.state.0.lock().unwrap().clone()
    }

    fn wait<T>(&self, timeout: Duration, f: impl Fn(&[Arrival]) -> Option<T>) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.state;
        let mut guard = lock.lock().unwrap();
        loop {
            if let Some(x) = f(&guard) {
                return Some(x);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            guard = cv.wait_timeout(guard, deadline - now).unwrap().0;
        }
    }
}
