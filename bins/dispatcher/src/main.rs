//! `jetci-dispatcher`: takes commits from `CI_COMMITS`, gives each to a runner, and holds the
//! commit unacked until its run has a final result.
//!
//! The dispatcher is the library's ([`jetci::dispatcher`]: a sans-IO core and its NATS driver);
//! this file parses flags into its config and runs it.

use std::time::Duration;

use clap::Parser;
use jetci::connect::ConnectArgs;
use jetci::logging::LogArgs;
use jetci::shutdown::Shutdown;

/// jetci's dispatcher: assigns each new commit to an idle runner and moves the job to another
/// runner when the one running it stops heartbeating.
///
/// It reads commits published by jetci-observer, picks a live runner (from the ci-runners
/// bucket) whose labels match, publishes the job on that runner's subject `ci.jobs.<id>`, and
/// acks the commit only once a final result exists. A runner that stops heartbeating for
/// --ack-wait loses the job to another runner (attempt + 1); after --max-attempts the commit
/// gets a final `error` result. Run one or several; they share the work.
///
/// Example: jetci-dispatcher -s nats://ci.example:4222
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    #[command(flatten)]
    connect: ConnectArgs,
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    metrics: jetci::metrics::MetricsArgs,
    /// The lease: a job whose runner has not heartbeaten for this long goes to another runner,
    /// and a commit whose dispatcher died goes to another dispatcher after it.
    #[arg(long, value_parser = jetci::limits::interval, default_value = "3s")]
    ack_wait: Duration,
    /// Attempts per run before it is given up as `error` (a failing test is never retried; only
    /// lost runners count).
    #[arg(long, default_value_t = 3)]
    max_attempts: u32,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    args.log.init();
    if let Err(e) = run(args).await {
        eprintln!("jetci-dispatcher: error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.max_attempts >= 1, "--max-attempts must be at least 1");
    anyhow::ensure!(
        args.ack_wait >= Duration::from_millis(300),
        "--ack-wait must be at least 300ms"
    );
    args.metrics.install()?;
    let shutdown = Shutdown::install()?;
    let nats = args.connect.connect("jetci-dispatcher").await?;
    let streams = jetci::streams::setup(&nats).await?;
    let config = jetci::dispatcher::Config {
        lease: args.ack_wait,
        max_attempts: args.max_attempts,
        names: nats.names.clone(),
    };
    tracing::info!(lease = ?config.lease, max_attempts = config.max_attempts, "starting dispatcher");
    jetci::dispatcher::run(nats, streams, config, shutdown.token).await?;
    Ok(())
}
