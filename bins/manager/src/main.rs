//! `jetci-manager`: keeps a pool of `jetci-runner` processes on one machine as large as the queue
//! needs, between `--min` and `--max`.
//!
//! The loop, every `--interval`: reap runners that exited (restart the crashed ones) → measure
//! the work that waits for this manager's labels ([`queue`]) → let the pure policy
//! ([`jetci::scaling::plan`]) decide → start runners, or SIGTERM idle ones ([`fleet`]). Every
//! decision is logged with the numbers it was taken on. The manager keeps no state that matters:
//! the queue is read from `CI_COMMITS` and `ci-jobs`, the runners' load from `ci-runners`, so a
//! restarted manager picks up where the last one left off.

// The doc comments on the flags are `--help` text, written as plain text (`<id>`, `[:PORT]`),
// not as rustdoc markdown.
#![allow(rustdoc::invalid_html_tags, rustdoc::broken_intra_doc_links)]

mod fleet;
mod queue;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use jetci::connect::ConnectArgs;
use jetci::logging::{LogArgs, LogFormat};
use jetci::scaling::{self, default_name, runner_id, Limits, Plan};
use jetci::shutdown::Shutdown;
use jetci::streams::{self, watch_bucket};
use jetci::subjects::check_token;

use crate::fleet::{Fleet, Spec};
use crate::queue::Queue;

/// jetci's runner manager: starts jetci-runner processes while work waits and stops them when
/// they sit idle.
///
/// Run one per build machine instead of a fixed set of runners. Every --interval it reads the
/// queue from NATS: commits no dispatcher has taken yet (the `dispatcher` consumer's pending
/// count on CI_COMMITS) and commits a dispatcher holds while they wait for a runner (`ci-jobs`
/// entries in phase `queued`), counting only commits whose labels its runners have. While that
/// work is more than its runners' free slots, it starts runners, up to --max. A runner that has
/// had no job for --idle-timeout (from its `ci-runners` entry) is stopped with SIGTERM, down to
/// --min; a busy runner is never stopped. A runner that exits by itself is restarted.
///
/// Runners get the ids `<name>-1`, `<name>-2`, ... (each a durable consumer on CI_JOBS), the
/// manager's --labels, its NATS settings (as NATS_URL, NATS_CREDS, ... in their environment), and
/// every argument after `--`. Their output appears in the manager's log, each line prefixed with
/// the runner's id. On SIGTERM or Ctrl-C the manager drains: each runner finishes its jobs (up to
/// the runner's --drain-timeout), then the manager exits; a second signal makes the runners hand
/// their jobs back at once.
#[derive(Parser, Debug)]
#[command(
    version,
    about,
    long_about,
    after_help = "Examples:\n  \
      jetci-manager --min 1 --max 4\n  \
      jetci-manager -s nats://ci.example.com:4222 --min 0 --max 8 --labels linux,docker \\\n      \
        --idle-timeout 5m --work-root /var/lib/jetci-manager -- --jobs 2 --timeout 30m"
)]
struct Args {
    #[command(flatten)]
    connect: ConnectArgs,
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    metrics: jetci::metrics::MetricsArgs,
    /// Runners kept even when nothing waits (0 is allowed).
    #[arg(long, value_name = "N")]
    min: u32,
    /// Runners started at most.
    #[arg(long, value_name = "M")]
    max: u32,
    /// Labels of the runners (comma-separated); the manager counts only commits that need no
    /// other labels.
    #[arg(long, value_delimiter = ',')]
    labels: Vec<String>,
    /// How long a runner must have had no job before it is stopped (e.g. 30s, 5m).
    #[arg(long, value_parser = jetci::limits::interval, default_value = "30s", value_name = "DUR")]
    idle_timeout: Duration,
    /// How often the queue is measured and a decision taken.
    #[arg(long, value_parser = jetci::limits::interval, default_value = "1s", value_name = "DUR")]
    interval: Duration,
    /// This manager's name, the prefix of its runners' ids (default: the host name's first
    /// label). Give every manager its own.
    #[arg(long, env = "JETCI_MANAGER_NAME")]
    name: Option<String>,
    /// Each runner gets `--work-dir <DIR>/<id>` (default: the runner's own default,
    /// ~/.cache/jetci/runner-<id>).
    #[arg(long, value_name = "DIR")]
    work_root: Option<PathBuf>,
    /// The jetci-runner binary (default: next to jetci-manager, else on PATH).
    #[arg(long, env = "JETCI_RUNNER_BIN", value_name = "PATH")]
    runner: Option<PathBuf>,
    /// Arguments for every runner (e.g. `-- --jobs 2 --timeout 30m`); see `jetci-runner --help`.
    /// --id, --work-dir and --labels are set by the manager.
    #[arg(last = true, value_name = "RUNNER-ARGS")]
    runner_args: Vec<String>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    args.log.init();
    if let Err(e) = run(args).await {
        eprintln!("jetci-manager: error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.max >= 1, "--max must be at least 1");
    anyhow::ensure!(
        args.min <= args.max,
        "--min ({}) must not be larger than --max ({})",
        args.min,
        args.max
    );
    anyhow::ensure!(!args.interval.is_zero(), "--interval must be more than 0");
    for l in &args.labels {
        check_token("label", l)?;
    }
    let name = match &args.name {
        Some(n) => n.clone(),
        None => default_name(
            &hostname::get()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
        ),
    };
    check_token("manager name", &runner_id(&name, args.max))?;
    check_runner_args(&args.runner_args)?;
    let program = match &args.runner {
        Some(p) if is_executable(p) => p.clone(),
        Some(p) => anyhow::bail!("--runner {} is not an executable file", p.display()),
        None => find_runner()?,
    };
    let limits = Limits {
        min: args.min,
        max: args.max,
        idle_timeout: args.idle_timeout,
        capacity: jobs_flag(&args.runner_args)?,
    };

    args.metrics.install()?;
    let shutdown = Shutdown::install()?;
    let nats = args
        .connect
        .connect(&format!("jetci-manager {name}"))
        .await?;
    let streams = streams::setup(&nats).await?;

    let spec = Spec {
        program: program.clone(),
        labels: args.labels.clone(),
        work_root: args.work_root.clone(),
        env: runner_env(&args.connect),
        leading: match args.log.log_format {
            LogFormat::Json => vec!["--log-format".into(), "json".into()],
            LogFormat::Text => Vec::new(),
        },
        args: args.runner_args.clone(),
        raw_logs: args.log.log_format == LogFormat::Json,
    };
    let mut fleet = Fleet::new(name.clone(), spec);
    let mut queue = Queue::new(args.labels.clone());
    let mut runner_entries = watch_bucket(streams.runners.clone(), "runners");
    let mut job_entries = watch_bucket(streams.job_states.clone(), "jobs");
    let mut tick = tokio::time::interval(args.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(%name, min = args.min, max = args.max, labels = ?args.labels, idle_timeout = %humantime::format_duration(args.idle_timeout), runner = %program.display(), "manager ready");

    let mut last_reason = "";
    loop {
        tokio::select! {
            _ = shutdown.token.cancelled() => break,
            Some(e) = runner_entries.recv() => fleet.on_runner_entry(&e),
            Some(e) = job_entries.recv() => queue.on_job_entry(&e),
            _ = tick.tick() => {
                fleet.reap_and_restart(false);
                let demand = match queue.measure(&nats, &streams).await {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::warn!(error = format!("{e:#}"), "cannot measure the queue; deciding next time");
                        continue;
                    }
                };
                let plan = scaling::plan(demand, &fleet.views(), &limits);
                log_decision(&plan, &mut last_reason);
                fleet.start(plan.start);
                fleet.stop(&plan.stop);
            }
        }
    }

    fleet.drain(&shutdown.again).await;
    tracing::info!("manager stopped");
    Ok(())
}

/// Logs a decision with the numbers it was taken on: every start and stop, and a change of
/// "why nothing changes" (say, the pool reaching --max).
fn log_decision(plan: &Plan, last_reason: &mut &'static str) {
    let n = &plan.numbers;
    {
        use jetci::metrics::names as m;
        metrics::gauge!(m::QUEUE_DEPTH).set((n.pending + n.waiting) as f64);
        metrics::gauge!(m::JOBS_IN_FLIGHT).set(n.busy as f64);
        metrics::gauge!(m::MANAGER_RUNNERS).set(n.running as f64);
        // Register the counter at 0 before the first start; the starts are counted by the fleet.
        metrics::counter!(m::MANAGER_STARTED).increment(0);
        metrics::counter!(m::MANAGER_STOPPED).increment(plan.stop.len() as u64);
    }
    if plan.start > 0 {
        tracing::info!(
            pending = n.pending,
            waiting = n.waiting,
            busy = n.busy,
            free = n.free,
            running = n.running,
            idle = n.idle,
            start = plan.start,
            reason = plan.reason,
            "scaling up"
        );
    } else if !plan.stop.is_empty() {
        tracing::info!(
            pending = n.pending, waiting = n.waiting, busy = n.busy, free = n.free,
            running = n.running, idle = n.idle, stop = ?plan.stop, reason = plan.reason,
            "scaling down"
        );
    } else if plan.reason != *last_reason {
        tracing::info!(
            pending = n.pending,
            waiting = n.waiting,
            busy = n.busy,
            free = n.free,
            running = n.running,
            idle = n.idle,
            reason = plan.reason,
            "holding"
        );
    } else {
        tracing::debug!(
            pending = n.pending,
            waiting = n.waiting,
            busy = n.busy,
            free = n.free,
            running = n.running,
            idle = n.idle,
            reason = plan.reason,
            "holding"
        );
    }
    *last_reason = plan.reason;
}

/// RUNNER-ARGS may not set what the manager sets for each runner.
fn check_runner_args(args: &[String]) -> anyhow::Result<()> {
    for a in args {
        let flag = a.split('=').next().unwrap_or(a);
        if matches!(flag, "--id" | "--work-dir" | "--labels") {
            anyhow::bail!(
                "RUNNER-ARGS must not set {flag}: the manager gives each runner its id and work dir (--work-root), and its own --labels"
            );
        }
    }
    Ok(())
}

/// The runners' `--jobs` from RUNNER-ARGS (1 when not given): the slots a runner that has not
/// registered yet is counted with.
fn jobs_flag(args: &[String]) -> anyhow::Result<u32> {
    let mut jobs = 1;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let value = if a == "--jobs" {
            it.next().map(String::as_str)
        } else {
            a.strip_prefix("--jobs=")
        };
        if let Some(v) = value {
            jobs = v.parse::<u32>().ok().filter(|j| *j >= 1).with_context(|| {
                format!("--jobs in RUNNER-ARGS must be a number from 1, not {v:?}")
            })?;
        }
    }
    Ok(jobs)
}

/// The manager's NATS settings as the environment variables the runner's flags read, so the
/// runners reach the same server as the same user without secrets on their command lines (flags
/// in RUNNER-ARGS still win).
fn runner_env(c: &ConnectArgs) -> Vec<(String, String)> {
    let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    let vars = [
        ("NATS_URL", Some(c.server.clone())),
        ("NATS_CREDS", path(&c.creds)),
        ("NATS_USER", c.user.clone()),
        ("NATS_PASSWORD", c.password.clone()),
        ("NATS_TOKEN", c.token.clone()),
        ("NATS_NKEY", path(&c.nkey)),
        ("NATS_CERT", path(&c.tlscert)),
        ("NATS_KEY", path(&c.tlskey)),
        ("NATS_CA", path(&c.tlsca)),
        ("NATS_INBOX_PREFIX", c.inbox_prefix.clone()),
        ("JETCI_PREFIX", Some(c.prefix.clone())),
        ("JETCI_REPLICAS", Some(c.replicas.to_string())),
    ];
    vars.into_iter()
        .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
        .collect()
}

/// `jetci-runner` next to this executable (where cargo and the install put every jetci binary),
/// else on PATH.
fn find_runner() -> anyhow::Result<PathBuf> {
    const NAME: &str = "jetci-runner";
    let exe = std::env::current_exe().ok();
    let beside = exe.as_deref().and_then(Path::parent).map(|d| d.join(NAME));
    if let Some(p) = beside.as_ref().filter(|p| is_executable(p)) {
        return Ok(p.clone());
    }
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join(NAME))
                .find(|p| is_executable(p))
        })
        .with_context(|| {
            format!("cannot find {NAME} next to jetci-manager or on PATH; install it, or pass --runner PATH")
        })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn runner_args_may_not_set_what_the_manager_sets() {
        assert!(check_runner_args(&s(&["--jobs", "2", "--timeout", "5m"])).is_ok());
        for bad in ["--id", "--work-dir=/x", "--labels"] {
            let err = check_runner_args(&s(&[bad, "x"])).unwrap_err().to_string();
            assert!(err.contains("must not set"), "{err}");
        }
    }

    #[test]
    fn jobs_flag_gives_the_assumed_capacity() {
        assert_eq!(jobs_flag(&s(&[])).unwrap(), 1);
        assert_eq!(
            jobs_flag(&s(&["--heartbeat", "1s", "--jobs", "3"])).unwrap(),
            3
        );
        assert_eq!(jobs_flag(&s(&["--jobs=4"])).unwrap(), 4);
        assert!(jobs_flag(&s(&["--jobs", "0"])).is_err());
        assert!(jobs_flag(&s(&["--jobs", "x"])).is_err());
    }

    #[test]
    fn runners_get_the_connection_settings() {
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            c: ConnectArgs,
        }
        let t = T::parse_from(["t", "-s", "nats://h:1", "--token", "tok", "--prefix", "x"]);
        let env = runner_env(&t.c);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("NATS_URL"), Some("nats://h:1"));
        assert_eq!(get("NATS_TOKEN"), Some("tok"));
        assert_eq!(get("JETCI_PREFIX"), Some("x"));
        assert_eq!(get("NATS_CREDS"), None);
    }

    #[test]
    fn help_parses() {
        <Args as clap::CommandFactory>::command().debug_assert();
        let a = Args::try_parse_from(["m", "--min", "1", "--max", "3", "--", "--heartbeat", "1s"])
            .unwrap();
        assert_eq!(a.runner_args, s(&["--heartbeat", "1s"]));
        assert_eq!(a.idle_timeout, Duration::from_secs(30));
    }
}
