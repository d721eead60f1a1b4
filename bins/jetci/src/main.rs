//! `jetci`, the command line: `up` runs the whole system on one machine, `tail` follows results.
//!
//! Thin by design (STYLE.md): argument parsing here, the subcommands in their own modules
//! (`up`, `results`), everything shared with the other processes in the `jetci` library crate.

mod jobs;
mod local_nats;
mod notify;
mod procs;
mod results;
mod status;
mod up;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use jetci::connect::ConnectArgs;
use jetci::logging::LogArgs;
use jetci::shutdown::Shutdown;

const ABOUT: &str = "jetci: distributed CI on NATS JetStream. It watches git repositories, tests \
every new commit on a pool of runners and publishes the results (more with --help)";

const LONG_ABOUT: &str = "\
jetci: distributed CI on NATS JetStream

jetci is a distributed continuous-integration system. It watches git repositories, runs the \
tests of every new commit on a pool of runners and publishes the results.

Its processes talk only through NATS JetStream, so each can run many times, on any machine that \
reaches the NATS server, and none keeps state a crash can lose:
  jetci-observer    watches repositories and publishes each new commit
  jetci-dispatcher  assigns each commit to a runner and reassigns it if the runner is lost
  jetci-runner      checks the commit out, runs its tests and publishes the result

This command starts all of them on one machine (`jetci up`) and follows the results (`jetci tail`).

First try:
  jetci up path/to/repo       then commit to that repository and watch the results arrive";

const AFTER_HELP: &str = "\
Examples:
  jetci up ~/src/myproject                   everything here; results in test_results/<sha>
  jetci up --runners 4 https://host/x.git    watch a remote repository with four runners
  jetci tail                                 print new results as they arrive
  jetci tail --all --write-dir test_results  every stored result, also written to files
  jetci logs myproject 1a2b3c4d -f           follow a job's output live
  jetci cancel myproject 1a2b3c4d            stop a queued or running job
  jetci rerun myproject 1a2b3c4d             test a commit again as a new run
  jetci -s nats://ci.example:4222 tail --json | jq .status";

#[derive(Parser, Debug)]
#[command(
    name = "jetci",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = AFTER_HELP,
    propagate_version = true
)]
struct Cli {
    #[command(flatten, next_help_heading = "NATS connection (any subcommand)")]
    connect: ConnectArgs,
    #[command(flatten, next_help_heading = "Logging (any subcommand)")]
    log: LogArgs,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the whole system on this machine for a first try and print results as they arrive.
    ///
    /// Starts a NATS server (unless one answers at -s), an observer watching REPO, a dispatcher
    /// and --runners runners. Each result is printed on one line and written to
    /// test_results/<sha>; the processes' logs go to .jetci/logs/. Ctrl-C stops everything that
    /// `jetci up` started.
    Up(up::UpArgs),
    /// Print test results as they arrive, one line each.
    ///
    /// Reads the results stream, so it works from any machine that reaches NATS. Without --all
    /// only new results are shown; --json prints each result's JSON message instead.
    Tail(TailArgs),
    /// Print a job's output (the latest run's; a pipeline's job with --job NAME); -f follows it
    /// live until the result.
    Logs(LogsArgs),
    /// Stop a queued or running run (every job of a pipeline, taken by a dispatcher or not), or
    /// one job of a pipeline with --job NAME (not one carried over by rerun --failed); its
    /// result is `cancelled`.
    Cancel(jobs::CommitRef),
    /// Test a commit again, as a new run with its own result.
    Rerun(RerunArgs),
    /// Show the queue (and why each commit waits), the runners, the jobs in flight and the
    /// streams' sizes.
    Status(StatusArgs),
    /// Tell REPO's observer to poll now (run by the git post-receive hook, deploy/hooks).
    ///
    /// Sends a request on ci.notify.<repo> and waits for the observer's answer, which comes when
    /// the commits of the push are published. Exits 0 also when no observer answers (a warning
    /// says so): the observer's poll publishes the commits anyway. Non-zero only when NATS
    /// cannot be reached.
    Notify(notify::NotifyArgs),
}

/// `jetci status` flags.
#[derive(clap::Args, Debug)]
struct StatusArgs {
    /// Print JSON, for scripts.
    #[arg(long)]
    json: bool,
    /// The dispatchers' lease (--ack-wait): what counts as a live runner and the lease left.
    #[arg(long, value_parser = jetci::limits::interval, default_value = "3s")]
    lease: std::time::Duration,
}

/// `jetci logs` flags.
#[derive(clap::Args, Debug)]
struct LogsArgs {
    #[command(flatten)]
    commit: jobs::CommitRef,
    /// Attempt (default: the one that gave the result, or the current one).
    #[arg(long)]
    attempt: Option<u32>,
    /// Keep printing new output until the run has its result.
    #[arg(short, long)]
    follow: bool,
}

/// `jetci rerun` flags.
#[derive(clap::Args, Debug)]
struct RerunArgs {
    #[command(flatten)]
    commit: jobs::CommitRef,
    /// Return once the run is queued instead of waiting for its result.
    #[arg(long)]
    no_wait: bool,
    /// Run again only the jobs of a pipeline that did not pass; the jobs that passed carry their
    /// results over into the new run (marked `carried_from` in its result).
    #[arg(long)]
    failed: bool,
}

/// `jetci tail` flags.
#[derive(clap::Args, Debug)]
struct TailArgs {
    /// Also write each result to DIR/<sha> (status, facts, then the output tail).
    #[arg(long, value_name = "DIR")]
    write_dir: Option<PathBuf>,
    /// Start with every stored result instead of only new ones.
    #[arg(long)]
    all: bool,
    /// Print each result as its JSON message, one per line.
    #[arg(long)]
    json: bool,
}

fn main() {
    let cli = Cli::parse();
    // The terminal is for results: unless RUST_LOG says otherwise, log warnings and errors only
    // (the shared default is `info`). Set before any thread exists; `up` gives its children the
    // usual default back.
    let quiet_default = std::env::var_os("RUST_LOG").is_none();
    if quiet_default {
        std::env::set_var("RUST_LOG", "warn");
    }
    cli.log.init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => fail(anyhow::Error::from(e).context("cannot start the async runtime")),
    };
    if let Err(e) = runtime.block_on(run(cli, quiet_default)) {
        fail(e);
    }
}

/// Prints `jetci: error: <one line>` and exits 1.
fn fail(e: anyhow::Error) -> ! {
    eprintln!("jetci: error: {}", results::one_line(&format!("{e:#}")));
    std::process::exit(1);
}

async fn run(cli: Cli, quiet_default: bool) -> Result<()> {
    let shutdown = Shutdown::install().context("cannot install signal handlers")?;
    match &cli.command {
        Cmd::Up(args) => up::run(args, &cli.connect, &cli.log, quiet_default, &shutdown).await,
        Cmd::Tail(args) => tokio::select! {
            // Until the follow loop runs, nothing else listens for Ctrl-C.
            _ = shutdown.token.cancelled() => Ok(()),
            r = tail(args, &cli.connect, &shutdown) => r,
        },
        Cmd::Logs(args) => {
            let (nats, streams) = connect(&cli.connect, "jetci-logs").await?;
            let target = jobs::resolve(&nats, &streams, &args.commit).await?;
            jobs::logs(
                &nats,
                &streams,
                &target,
                args.attempt,
                args.follow,
                &shutdown.token,
            )
            .await
        }
        Cmd::Cancel(commit) => {
            let (nats, streams) = connect(&cli.connect, "jetci-cancel").await?;
            let target = jobs::resolve(&nats, &streams, commit).await?;
            jobs::cancel(&nats, &streams, &target).await
        }
        Cmd::Status(args) => {
            let (nats, streams) = connect(&cli.connect, "jetci-status").await?;
            let v = status::gather(&nats, &streams, args.lease).await?;
            if args.json {
                println!("{v}");
            } else {
                print!("{}", status::render(&v));
            }
            Ok(())
        }
        Cmd::Notify(args) => notify::run(args, &cli.connect).await,
        Cmd::Rerun(args) => {
            let (nats, streams) = connect(&cli.connect, "jetci-rerun").await?;
            let target = jobs::resolve(&nats, &streams, &args.commit).await?;
            jobs::rerun(&nats, &streams, &target, !args.no_wait, args.failed).await
        }
    }
}

async fn connect(
    connect: &ConnectArgs,
    name: &str,
) -> Result<(jetci::connect::Nats, jetci::streams::Streams)> {
    let nats = connect.connect(name).await?;
    let streams = jetci::streams::setup(&nats)
        .await
        .context("cannot set up jetci's streams")?;
    Ok((nats, streams))
}

async fn tail(args: &TailArgs, connect: &ConnectArgs, shutdown: &Shutdown) -> Result<()> {
    let nats = connect.connect("jetci-tail").await?;
    let name = nats.names.results_stream();
    // Only set up when the stream is missing, so a user allowed to read results but not to
    // create streams can still tail.
    let stream = match nats.js.get_stream(&name).await {
        Ok(stream) => stream,
        Err(_) => {
            jetci::streams::setup(&nats)
                .await
                .context("cannot set up jetci's streams")?
                .results
        }
    };
    let opts = results::FollowOptions {
        start: if args.all {
            jetci::follow::Start::All
        } else {
            jetci::follow::Start::New
        },
        json: args.json,
        write_dir: args.write_dir.clone(),
    };
    results::follow(&nats, &stream, &opts, &shutdown.token).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_work_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "jetci",
            "tail",
            "-s",
            "nats://127.0.0.1:14333",
            "--all",
            "--prefix",
            "t1",
        ])
        .unwrap();
        assert_eq!(cli.connect.server, "nats://127.0.0.1:14333");
        assert_eq!(cli.connect.prefix, "t1");
        assert!(matches!(cli.command, Cmd::Tail(TailArgs { all: true, .. })));
        let cli = Cli::try_parse_from(["jetci", "up", "--poll-interval", "250ms", "/x"]).unwrap();
        let Cmd::Up(up) = cli.command else {
            panic!("not up")
        };
        assert_eq!(up.poll_interval, std::time::Duration::from_millis(250));
        assert_eq!(up.runners, 2);
        assert!(Cli::try_parse_from(["jetci", "up", "--runners", "0", "/x"]).is_err());
    }
}
