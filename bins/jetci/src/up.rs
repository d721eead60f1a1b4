//! `jetci up`: the whole system on one machine, for a first try.
//!
//! It finds or starts a NATS server, starts one observer on the repository, one dispatcher and N
//! runners as child processes with their logs in `.jetci/logs/`, and prints each result as it
//! arrives (and writes `test_results/<sha>`), exactly as `jetci tail --write-dir` does. Ctrl-C or
//! SIGTERM stops everything it started: the jetci processes first, the NATS server last, because
//! a runner needs NATS to hand its job back while it stops.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::ValueEnum;
use jetci::connect::{ConnectArgs, Nats};
use jetci::follow::Start;
use jetci::logging::LogArgs;
use jetci::shutdown::{CancellationToken, Shutdown};
use tokio::process::Command;

use crate::local_nats::{self, LocalNats};
use crate::procs::{self, Proc, GRACE};
use crate::results::{self, FollowOptions};

/// `jetci up` flags.
#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// Number of runners to start.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub runners: u16,
    /// Directory for jetci's local state: the NATS store (if jetci starts the server), the
    /// processes' logs and the runners' workspaces.
    #[arg(long, value_name = "DIR", default_value = ".jetci")]
    pub store: PathBuf,
    /// How often the observer looks for new commits (e.g. 1s, 500ms, 1m).
    #[arg(long, value_name = "DUR", default_value = "1s", value_parser = jetci::limits::interval)]
    pub poll_interval: Duration,
    /// Where to write one `<sha>` file per result.
    #[arg(long, value_name = "DIR", default_value = "test_results")]
    pub results_dir: PathBuf,
    /// Where the web dashboard (jetci-web) listens; `off` starts none.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    pub web: String,
    /// The git repository to watch: a local path or a URL.
    #[arg(value_name = "REPO")]
    pub repo: String,
}

/// The binaries `jetci up` starts.
struct Binaries {
    observer: PathBuf,
    dispatcher: PathBuf,
    runner: PathBuf,
    /// Optional: without it `jetci up` runs without a dashboard.
    web: Option<PathBuf>,
}

impl Binaries {
    fn find() -> Result<Binaries> {
        Ok(Binaries {
            observer: procs::find_sibling("jetci-observer")?,
            dispatcher: procs::find_sibling("jetci-dispatcher")?,
            runner: procs::find_sibling("jetci-runner")?,
            web: procs::find_sibling("jetci-web").ok(),
        })
    }
}

/// Runs `jetci up` until Ctrl-C, SIGTERM, or the NATS server it started dies.
///
/// Errors: the repository cannot be opened, a binary is missing, NATS cannot be found or
/// started, the streams cannot be set up, or the NATS server it started exited.
///
/// `reset_rust_log`: `RUST_LOG` was set by `jetci` itself (to keep the terminal quiet), so the
/// children should not inherit it and log at their usual level.
pub async fn run(
    args: &UpArgs,
    connect: &ConnectArgs,
    log: &LogArgs,
    reset_rust_log: bool,
    shutdown: &Shutdown,
) -> Result<()> {
    let repo = check_repo(&args.repo)?;
    let bins = Binaries::find()?;
    let LocalNats { nats, mut server } = tokio::select! {
        biased;
        _ = shutdown.token.cancelled() => return Ok(()),
        found = local_nats::ensure(connect, &args.store) => found?,
    };

    let common = CommonArgs::new(connect, log, reset_rust_log);
    let mut children = Vec::new();
    let setup = Setup {
        args,
        common: &common,
        nats: &nats,
        repo: &repo,
        bins: &bins,
    };
    let outcome = tokio::select! {
        biased;
        _ = shutdown.token.cancelled() => Ok(()),
        r = run_system(&setup, &mut children, &mut server, &shutdown.token) => r,
    };

    let running = children
        .iter_mut()
        .map(|p| p.exited().is_none())
        .filter(|&alive| alive)
        .count()
        + server
            .as_mut()
            .map_or(0, |s| usize::from(s.exited().is_none()));
    if running > 0 {
        println!("stopping {running} processes (Ctrl-C again to hurry)");
    }
    procs::stop_all(&mut children, GRACE, Some(&shutdown.again)).await;
    // Close our own connection before the server goes, so it does not log a lost connection.
    let _ = tokio::time::timeout(Duration::from_secs(2), nats.client.drain()).await;
    if let Some(server) = server.as_mut() {
        procs::stop_all(std::slice::from_mut(server), GRACE, Some(&shutdown.again)).await;
    }
    if running > 0 {
        println!("stopped");
    }
    outcome
}

/// What `jetci up` starts the system with.
struct Setup<'a> {
    args: &'a UpArgs,
    common: &'a CommonArgs,
    nats: &'a Nats,
    repo: &'a Repo,
    bins: &'a Binaries,
}

/// The part that runs with NATS up: set up the streams, start the processes, print results,
/// watch the processes.
async fn run_system(
    setup: &Setup<'_>,
    children: &mut Vec<Proc>,
    server: &mut Option<Proc>,
    stop: &CancellationToken,
) -> Result<()> {
    let (args, nats) = (setup.args, setup.nats);
    let mut streams = jetci::streams::setup(nats)
        .await
        .context("cannot set up jetci's streams")?;
    // Results from here on: taken before any process starts, so even the fastest is shown.
    let start_after = streams
        .results
        .info()
        .await
        .context("cannot read the results stream")?
        .state
        .last_sequence;
    std::fs::create_dir_all(&args.results_dir)
        .with_context(|| format!("cannot create directory {}", args.results_dir.display()))?;

    let logs = args.store.join("logs");
    let runner_ids = start_processes(setup, &logs, children)?;
    print_banner(setup, &logs, &runner_ids, server.is_some());

    let opts = FollowOptions {
        start: Start::After(start_after),
        json: false,
        write_dir: Some(args.results_dir.clone()),
    };
    tokio::select! {
        r = watch(children, server, stop) => r,
        r = results::follow(nats, &streams.results, &opts, stop) => r,
    }
}

/// Starts the observer, a dispatcher, the web (unless `--web off`) and the runners, logging to
/// `logs`; returns the runners' ids.
fn start_processes(
    setup: &Setup<'_>,
    logs: &Path,
    children: &mut Vec<Proc>,
) -> Result<Vec<String>> {
    let (args, common, bins) = (setup.args, setup.common, setup.bins);
    let poll = humantime::format_duration(args.poll_interval).to_string();
    let mut observer = common.command(&bins.observer);
    observer
        .arg("--poll-interval")
        .arg(&poll)
        .arg(&setup.repo.arg);
    children.push(Proc::spawn(
        "observer",
        observer,
        logs.join("observer.log"),
    )?);
    children.push(Proc::spawn(
        "dispatcher",
        common.command(&bins.dispatcher),
        logs.join("dispatcher.log"),
    )?);
    if args.web != "off" {
        match &bins.web {
            Some(web) => {
                let mut cmd = common.command(web);
                cmd.arg("--listen").arg(&args.web);
                children.push(Proc::spawn("web", cmd, logs.join("web.log"))?);
            }
            None => eprintln!(
                "jetci: warning: jetci-web not found next to jetci; running without the dashboard"
            ),
        }
    }
    // Runner ids carry a tag of the store directory, so two `jetci up` on one NATS server (two
    // checkouts, two repositories) do not fight over the same runner ids.
    let store_abs = std::fs::canonicalize(&args.store).unwrap_or_else(|_| args.store.clone());
    let tag = &jetci::git::text_hash(&store_abs.to_string_lossy())[..4];
    let host = format!("{}-{tag}", procs::host_slug(&procs::hostname()));
    let mut runner_ids = Vec::new();
    for i in 1..=usize::from(args.runners) {
        let id = procs::runner_id(&host, i);
        let mut runner = common.command(&bins.runner);
        runner
            .arg("--id")
            .arg(&id)
            .arg("--work-dir")
            .arg(args.store.join(format!("runner-{i}")));
        let name = format!("runner-{i}");
        children.push(Proc::spawn(
            &name,
            runner,
            logs.join(format!("{name}.log")),
        )?);
        runner_ids.push(id);
    }
    Ok(runner_ids)
}

/// Watches the started processes every half second. A jetci process that exits is reported once
/// and left alone (the rest can still show something); the NATS server exiting ends `jetci up`,
/// since nothing works without it.
async fn watch(
    children: &mut [Proc],
    server: &mut Option<Proc>,
    stop: &CancellationToken,
) -> Result<()> {
    let mut reported = vec![false; children.len()];
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        // A Ctrl-C in the terminal reaches the children too; their exit is then expected.
        if stop.is_cancelled() {
            return Ok(());
        }
        if let Some(server) = server.as_mut() {
            if let Some(status) = server.exited() {
                bail!(
                    "nats-server exited unexpectedly ({status}); stopped everything (see {})",
                    server.log.display()
                );
            }
        }
        for (p, seen) in children.iter_mut().zip(reported.iter_mut()) {
            if *seen {
                continue;
            }
            if let Some(status) = p.exited() {
                *seen = true;
                eprintln!(
                    "jetci: warning: {} exited unexpectedly ({status}); see {}",
                    p.name,
                    p.log.display()
                );
            }
        }
    }
}

fn print_banner(setup: &Setup<'_>, logs: &Path, runner_ids: &[String], started_nats: bool) {
    let (args, nats, repo) = (setup.args, setup.nats, setup.repo);
    let url = &setup.common.url;
    let nats_note = if started_nats {
        format!(
            "started here, stopped on exit; log {}",
            args.store.join("nats-server.log").display()
        )
    } else {
        "already running; left running on exit".to_string()
    };
    let mut log_names = vec!["observer.log".to_string(), "dispatcher.log".to_string()];
    log_names.extend((1..=runner_ids.len()).map(|i| format!("runner-{i}.log")));
    println!("jetci up");
    println!(
        "  watching  {} (polled every {})",
        repo.shown,
        humantime::format_duration(args.poll_interval)
    );
    println!("  NATS      {url} ({nats_note})");
    println!(
        "  runners   {}: {}",
        runner_ids.len(),
        runner_ids.join(", ")
    );
    if args.web != "off" {
        println!("  dashboard http://{}/", args.web);
    }
    println!("  logs      {}/ ({})", logs.display(), log_names.join(", "));
    println!(
        "  results   printed below and written to {}/<sha>",
        args.results_dir.display()
    );
    println!(
        "  also      nats -s {url} sub '{}'   (any machine can follow along)",
        nats.names.results_filter()
    );
    println!(
        "commit to {} to see results; Ctrl-C stops everything",
        repo.shown
    );
}

/// The repository as given to the observer and as shown to the user.
struct Repo {
    arg: OsString,
    shown: String,
}

/// A URL is passed through as it is (the observer mirrors it); a local path must be a git
/// repository, and the observer gets its absolute path.
///
/// Errors: the path does not exist or is not a git repository.
fn check_repo(spec: &str) -> Result<Repo> {
    if jetci::git::is_url(spec) {
        return Ok(Repo {
            arg: spec.into(),
            shown: spec.to_string(),
        });
    }
    let path =
        std::fs::canonicalize(spec).with_context(|| format!("cannot open repository {spec}"))?;
    git2::Repository::open(&path).map_err(|e| {
        anyhow!(
            "cannot open repository {spec}: not a git repository ({})",
            e.message()
        )
    })?;
    Ok(Repo {
        shown: path.display().to_string(),
        arg: path.into_os_string(),
    })
}

/// What every started jetci process gets: the same server, prefix, replicas and log format, and
/// the credentials through the environment (not argv, where `ps` shows them).
struct CommonArgs {
    /// The `-s` value.
    url: String,
    args: Vec<OsString>,
    env: Vec<(&'static str, OsString)>,
    reset_rust_log: bool,
}

impl CommonArgs {
    fn new(connect: &ConnectArgs, log: &LogArgs, reset_rust_log: bool) -> CommonArgs {
        let format = log
            .log_format
            .to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_else(|| "text".into());
        let args = [
            "-s",
            &connect.server,
            "--prefix",
            &connect.prefix,
            "--replicas",
            &connect.replicas.to_string(),
            "--log-format",
            &format,
        ]
        .into_iter()
        .map(OsString::from)
        .collect();
        let mut env = Vec::new();
        let paths = [
            ("NATS_CREDS", &connect.creds),
            ("NATS_NKEY", &connect.nkey),
            ("NATS_CERT", &connect.tlscert),
            ("NATS_KEY", &connect.tlskey),
            ("NATS_CA", &connect.tlsca),
        ];
        for (name, value) in paths {
            if let Some(p) = value {
                env.push((name, p.clone().into_os_string()));
            }
        }
        let strings = [
            ("NATS_USER", &connect.user),
            ("NATS_PASSWORD", &connect.password),
            ("NATS_TOKEN", &connect.token),
        ];
        for (name, value) in strings {
            if let Some(s) = value {
                env.push((name, s.into()));
            }
        }
        CommonArgs {
            url: connect.server.clone(),
            args,
            env,
            reset_rust_log,
        }
    }

    fn command(&self, binary: &Path) -> Command {
        let mut cmd = Command::new(binary);
        cmd.args(&self.args);
        if self.reset_rust_log {
            cmd.env_remove("RUST_LOG");
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }
}
