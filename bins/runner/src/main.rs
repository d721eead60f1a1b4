//! `jetci-runner`: runs jobs assigned to it and publishes their results.
//!
//! The runner's loop and its side of the protocol are the library's ([`jetci::runner`]); this
//! binary parses its flags into a [`jetci::runner::Config`] and the settings of its executor,
//! which checks each commit out and runs its command ([`executor`], [`exec`], [`logs`]).

// The doc comments on the flags are `--help` text, written as plain text (`<id>`, `[:PORT]`),
// not as rustdoc markdown.
#![allow(rustdoc::invalid_html_tags, rustdoc::broken_intra_doc_links)]

mod cgroup;
mod exec;
mod executor;
mod logs;
mod sandbox;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use jetci::connect::ConnectArgs;
use jetci::logging::LogArgs;
use jetci::repo_config::DEFAULT_COMMAND;
use jetci::shutdown::Shutdown;
use jetci::subjects::{check_token, repo_slug};

use crate::executor::{Settings, ShellExecutor};
use crate::sandbox::{Mode, ProbeError, Sandbox};

/// jetci's test runner: checks out each commit it is given, runs the repository's test command
/// and publishes the result.
///
/// Start as many as you like, on any machine that reaches the NATS server; each needs its own
/// --id. A runner takes jobs only from its own subject `ci.jobs.<id>`; dispatchers decide which
/// runner gets what. The command comes from the repository's `.jetci.toml` (`command = "..."`)
/// or else --default-command, run with `sh -c` in a fresh checkout.
///
/// Example: jetci-runner -s nats://ci.example:4222 --id build-1 --work-dir /var/lib/jetci/build-1
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    #[command(flatten)]
    connect: ConnectArgs,
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    metrics: jetci::metrics::MetricsArgs,
    /// This runner's id: letters, digits, '-' and '_' (default: the host name).
    #[arg(long, env = "JETCI_RUNNER_ID")]
    id: Option<String>,
    /// Where mirrors, workspaces and unsent results live (default: ~/.cache/jetci/runner-<id>).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Test command for repositories without a `.jetci.toml` command.
    #[arg(long, default_value = DEFAULT_COMMAND)]
    default_command: String,
    /// Timeout for repositories whose `.jetci.toml` sets none (e.g. 90s, 10m, 1h; at most 7days).
    #[arg(long, value_parser = jetci::limits::job_time, default_value = "1h")]
    timeout: Duration,
    /// Labels this runner offers (comma-separated); a job that asks for labels runs only on a
    /// runner that has them all.
    #[arg(long, value_delimiter = ',')]
    labels: Vec<String>,
    /// Jobs run at once.
    #[arg(long, default_value_t = 1)]
    jobs: u32,
    /// How often the runner proves it is alive while a job runs.
    #[arg(long, value_parser = jetci::limits::interval, default_value = "1s")]
    heartbeat: Duration,
    /// Lease on the job message: a job not extended for this long counts as lost. Keep it about
    /// three heartbeats and equal to the dispatcher's --ack-wait.
    #[arg(long, value_parser = jetci::limits::interval, default_value = "3s")]
    lease: Duration,
    /// Bytes of output stored per job in CI_LOGS; the rest is cut with a marker.
    #[arg(long, default_value_t = 10 * 1024 * 1024)]
    log_cap: u64,
    /// On SIGTERM, how long to let running jobs finish before handing them back to another
    /// runner (a second SIGTERM hands them back at once).
    #[arg(long, value_parser = jetci::limits::drain_time, default_value = "5m")]
    drain_timeout: Duration,
    /// Keep each job's workspace after it ends (for debugging).
    #[arg(long)]
    keep_workspaces: bool,
    /// A directory shared by all jobs (dependency caches and the like), given to them as
    /// JETCI_CACHE_DIR and writable in their sandbox; it must not hold the work dir. Without it
    /// nothing survives from one job to the next.
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// More environment variables to pass from the runner to jobs (by name, repeatable).
    #[arg(long = "pass-env", value_name = "NAME")]
    pass_env: Vec<String>,
    /// How jobs are isolated: bwrap runs each in a sandbox of its own (bubblewrap, /usr/bin/bwrap:
    /// own PID, mount and user namespaces; only its checkout, HOME, TMPDIR and --cache-dir
    /// writable; nothing of the runner visible); auto is bwrap where it works here, else none
    /// with a warning; none runs jobs as plain processes of the runner's user.
    #[arg(long, value_enum, default_value = "auto")]
    sandbox: Mode,
    /// Whether jobs have the network: off leaves them loopback only (in a sandbox). A repository
    /// can turn it off for its own jobs with `network = false` in .jetci.toml.
    #[arg(long, value_enum, default_value = "on")]
    network: Network,
    /// A host directory jobs may read (a toolchain, say), at DEST or its own path inside the
    /// sandbox; absolute paths, repeatable.
    #[arg(long = "ro-bind", value_name = "SRC[:DEST]", value_parser = sandbox::parse_ro_bind)]
    ro_bind: Vec<(PathBuf, PathBuf)>,
    /// At most this many processes (threads included) at once per job, in a sandbox; a job that
    /// reaches it is killed with an `error` result saying so.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(16..))]
    max_procs: u32,
    /// Logins for repositories that need them, in the format of git's credential store: one
    /// `https://user:token@host[/path]` a line. Commits never carry credentials (the observer
    /// strips them from its URL), so a runner fetches a private repository with these.
    #[arg(long, value_name = "FILE", env = "JETCI_GIT_CREDENTIALS")]
    git_credentials: Option<PathBuf>,
}

/// `--network`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Network {
    On,
    Off,
}

/// Marks every file descriptor the runner inherited (beyond stdin, stdout and stderr) close-on-exec,
/// so none reaches a job: a shell or service manager may start the runner holding files a job
/// must not read. The runner's own descriptors are close-on-exec already (Rust opens them so).
fn close_inherited_fds() {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    use std::os::fd::BorrowedFd;
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: called first thing in `main`, before any thread: the descriptor was listed
        // open a moment ago and nothing can close it meanwhile (the directory's own, closed
        // since, makes fcntl fail harmlessly).
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let _ = fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    }
}

fn main() {
    close_inherited_fds();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("cannot start the runtime")
        .block_on(start());
}

async fn start() {
    let args = Args::parse();
    args.log.init();
    if let Err(e) = run(args).await {
        eprintln!("jetci-runner: error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let host = hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let id = match &args.id {
        Some(id) => id.clone(),
        None => repo_slug(&host),
    };
    check_token("runner id", &id)?;
    anyhow::ensure!(args.jobs >= 1, "--jobs must be at least 1");
    anyhow::ensure!(
        args.jobs <= jetci::limits::MAX_RUNNER_SLOTS,
        "--jobs must be at most {}",
        jetci::limits::MAX_RUNNER_SLOTS
    );
    anyhow::ensure!(
        args.heartbeat < args.lease,
        "--heartbeat ({}) must be shorter than --lease ({})",
        humantime::format_duration(args.heartbeat),
        humantime::format_duration(args.lease)
    );
    for l in &args.labels {
        check_token("label", l)?;
    }
    if let Some(path) = &args.git_credentials {
        jetci::git::use_credentials(jetci::git::CredentialStore::load(path)?);
    }
    let work_dir = prepare_work_dir(&args, &id)?;
    let cache_dir = match &args.cache_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create cache dir {}", dir.display()))?;
            let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.clone());
            // Jobs may write all of it: it must not hold the runner's own files.
            anyhow::ensure!(
                !work_dir.starts_with(&dir),
                "--cache-dir {} holds the work dir {}; give jobs a directory of their own",
                dir.display(),
                work_dir.display()
            );
            Some(dir)
        }
        None => None,
    };

    for (src, dest) in &args.ro_bind {
        let src = std::fs::canonicalize(src).unwrap_or_else(|_| src.clone());
        let dest = std::fs::canonicalize(dest).unwrap_or_else(|_| dest.clone());
        sandbox::check_ro_bind(
            &src,
            &dest,
            &work_dir,
            cache_dir.as_deref(),
            &secrets(&args),
        )
        .map_err(anyhow::Error::msg)?;
    }
    let (sandbox, warnings) = choose_sandbox(&args, &work_dir).await?;
    let pids = match &sandbox {
        Some(_) => pids_cgroups(&work_dir).await,
        None => None,
    };

    args.metrics.install()?;
    let shutdown = Shutdown::install()?;
    let nats = args.connect.connect(&format!("jetci-runner {id}")).await?;
    let streams = jetci::streams::setup(&nats).await?;
    let executor = ShellExecutor::new(
        nats.clone(),
        (streams.timings.clone(), streams.shards.clone()),
        Settings {
            id: id.clone(),
            work_dir: work_dir.clone(),
            default_command: args.default_command,
            default_timeout: args.timeout,
            grace: Duration::from_secs(5),
            log_cap: args.log_cap,
            keep_workspaces: args.keep_workspaces,
            pass_env: args.pass_env,
            cache_dir,
            sandbox,
            max_procs: Some(args.max_procs),
            pids,
        },
    );
    tracing::info!(%id, work_dir = %work_dir.display(), "starting runner");
    let config = jetci::runner::Config {
        id,
        host,
        labels: args.labels,
        slots: args.jobs,
        heartbeat: args.heartbeat,
        lease: args.lease,
        drain_timeout: args.drain_timeout,
        work_dir,
        // A runner id that never comes back should not leave its consumer forever.
        consumer_inactive: Duration::from_secs(7 * 24 * 3600),
        warnings,
    };
    jetci::runner::run(nats, streams, config, Arc::new(executor), shutdown).await?;
    Ok(())
}

/// The sandbox jobs run in, and the warnings for the runner's presence: `--sandbox auto` tries
/// bwrap once (a trivial job in a sandbox like every job's) and falls back to none, saying why;
/// `bwrap` refuses to start without it ([`without_sandbox`] decides).
async fn choose_sandbox(
    args: &Args,
    work_dir: &std::path::Path,
) -> anyhow::Result<(Option<Sandbox>, Vec<String>)> {
    let network_off = args.network == Network::Off;
    if args.sandbox == Mode::None {
        let warning = without_sandbox(Mode::None, network_off, None).map_err(anyhow::Error::msg)?;
        tracing::warn!("{warning}{}", unenforced(args));
        return Ok((None, vec![warning]));
    }
    let sandbox = Sandbox {
        program: sandbox::BWRAP.into(),
        work_dir: work_dir.to_path_buf(),
        ro_binds: args.ro_bind.clone(),
        hidden_files: secret_files(args),
        network: !network_off,
    };
    let probe = sandbox.clone();
    let works = tokio::task::spawn_blocking(move || probe.probe())
        .await
        .context("the sandbox check failed")?;
    match works {
        Ok(()) => {
            tracing::info!(network = ?args.network, max_procs = args.max_procs, "jobs run in a bwrap sandbox");
            Ok((Some(sandbox), Vec::new()))
        }
        Err(e) => {
            let warning =
                without_sandbox(args.sandbox, network_off, Some(&e)).map_err(anyhow::Error::msg)?;
            tracing::warn!("{warning}{}", unenforced(args));
            Ok((None, vec![warning]))
        }
    }
}

/// Whether a runner may run its jobs without a sandbox: `Ok(warning)` for its log and presence,
/// or the one-line reason it must not start. `--sandbox none` is the operator's choice and
/// `auto` falls back when bwrap does not work here (`probe`), but never when the operator asked
/// for `--network off` (only a sandbox can take the network away), never with `--sandbox
/// bwrap`, and never for settings the operator must fix ([`ProbeError::Setup`]). Pure.
fn without_sandbox(
    mode: Mode,
    network_off: bool,
    probe: Option<&ProbeError>,
) -> Result<String, String> {
    match (mode, probe) {
        (Mode::None, _) if network_off => Err(
            "--network off needs a sandbox to take the network away from jobs, and --sandbox \
             none runs them without one"
                .into(),
        ),
        (Mode::None, _) => Ok(
            "jobs run without a sandbox (--sandbox none): they see the runner's files and \
             processes"
                .into(),
        ),
        (_, Some(e @ ProbeError::Setup(_))) => Err(e.to_string()),
        (Mode::Bwrap, Some(e)) => Err(format!("--sandbox bwrap, but {e}")),
        (_, Some(e)) if network_off => Err(format!(
            "--network off needs a sandbox to take the network away from jobs, but {e}"
        )),
        (_, e) => Ok(format!(
            "jobs run without a sandbox: {}; install bubblewrap and allow user namespaces, or \
             pass --sandbox none to accept this",
            e.map(|e| e.to_string()).unwrap_or_default()
        )),
    }
}

/// Where each job's pids cgroup is made, if the kernel lets this runner make them; says in the
/// log what bounds a job's processes.
async fn pids_cgroups(work_dir: &std::path::Path) -> Option<cgroup::PidsParent> {
    let owner = executor::owner_of(work_dir);
    let found = tokio::task::spawn_blocking(move || cgroup::PidsParent::find(&owner))
        .await
        .ok()
        .flatten();
    match (&found, nix::unistd::geteuid().is_root()) {
        (Some(p), _) => tracing::info!(cgroups = ?p, "each job gets a pids cgroup: the kernel refuses its forks past --max-procs"),
        (None, true) => tracing::warn!("no pids cgroup can be made here: a root runner bounds a job's processes only by counting them every 10 ms"),
        (None, false) => tracing::info!("no pids cgroup can be made here: RLIMIT_NPROC bounds a job's processes"),
    }
    found
}

/// The runner's secret files: NATS credentials and keys, and git logins, absolute (and resolved
/// where they exist, so that a symlink to one is still recognised).
fn secret_files(args: &Args) -> Vec<PathBuf> {
    let c = &args.connect;
    [&c.creds, &c.nkey, &c.tlskey, &args.git_credentials]
        .into_iter()
        .flatten()
        .map(|p| {
            std::fs::canonicalize(p)
                .or_else(|_| std::path::absolute(p))
                .unwrap_or_else(|_| p.clone())
        })
        .collect()
}

/// [`secret_files`] and the configuration dirs a job never sees ([`sandbox::HIDDEN_DIRS`]).
fn secrets(args: &Args) -> Vec<PathBuf> {
    let mut all = secret_files(args);
    all.extend(sandbox::HIDDEN_DIRS.iter().map(PathBuf::from));
    all
}

/// What a runner without a sandbox cannot honour, for its warning: `--ro-bind` and a
/// repository's `network = false` (whose jobs end `error`) need one.
fn unenforced(args: &Args) -> &'static str {
    if !args.ro_bind.is_empty() {
        "; --ro-bind means nothing without one, and jobs of a repository with network = false \
         end in error"
    } else {
        "; jobs of a repository with network = false end in error"
    }
}

/// The work dir (`--work-dir`, or a default per id), created. What a previous life left there
/// is cleared by the executor once the id is known to be free ([`ShellExecutor`]'s `prepare`).
fn prepare_work_dir(args: &Args, id: &str) -> anyhow::Result<PathBuf> {
    let work_dir = match &args.work_dir {
        Some(d) => d.clone(),
        None => default_work_dir(id),
    };
    std::fs::create_dir_all(&work_dir)
        .with_context(|| format!("cannot create work dir {}", work_dir.display()))?;
    // Absolute: the sandbox binds a job's places by path.
    std::fs::canonicalize(&work_dir)
        .with_context(|| format!("cannot resolve work dir {}", work_dir.display()))
}

fn default_work_dir(id: &str) -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("jetci").join(format!("runner-{id}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_off_never_runs_jobs_without_a_sandbox() {
        let absent = ProbeError::Unavailable("no user namespaces".into());
        let setup = ProbeError::Setup("cannot mount".into());
        // Falls back with a warning only where nothing asked for the sandbox.
        let w = without_sandbox(Mode::Auto, false, Some(&absent)).unwrap();
        assert!(
            w.contains("without a sandbox: bwrap does not work here"),
            "{w}"
        );
        let w = without_sandbox(Mode::None, false, None).unwrap();
        assert!(w.contains("--sandbox none"), "{w}");
        for (mode, off, probe, why) in [
            (
                Mode::Auto,
                true,
                Some(&absent),
                "--network off needs a sandbox",
            ),
            (Mode::None, true, None, "--network off needs a sandbox"),
            (Mode::Bwrap, false, Some(&absent), "--sandbox bwrap, but"),
            (Mode::Auto, false, Some(&setup), "cannot be set up"),
        ] {
            let e = without_sandbox(mode, off, probe).unwrap_err();
            assert!(e.contains(why), "{mode:?} {off}: {e}");
        }
    }
}
