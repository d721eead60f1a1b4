//! `jetci-web`: the reporting process. A dashboard, per-commit pages with logs, the runners and
//! the queue, a JSON API, live updates and status badges, all served from an in-memory view that
//! it rebuilds from the streams at every start (DESIGN.md: it owns no state).
//!
//! `feed.rs` keeps the view current (results stream, jobs and runners buckets), `view.rs` is the
//! view, `server.rs` the routes and pages, `api.rs` the JSON, `live.rs` the server-sent events.
//! `report.rs` takes each new result further: `transitions.rs` decides when a branch broke or was
//! fixed, `alerts.rs` sends the webhook and the email, `results_dir.rs` writes
//! `test_results/<sha>`; `config.rs` holds their flags and config file.

// The doc comments on the flags are `--help` text, written as plain text (`<id>`, `[:PORT]`),
// not as rustdoc markdown.
#![allow(rustdoc::invalid_html_tags, rustdoc::broken_intra_doc_links)]

mod alerts;
mod api;
mod badge;
mod config;
mod feed;
mod graph;
mod live;
mod pages;
mod report;
mod results_dir;
mod server;
mod transitions;
mod view;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use jetci::connect::ConnectArgs;
use jetci::logging::LogArgs;
use jetci::shutdown::Shutdown;

/// jetci's web interface: dashboard, commit pages with live logs, runners and queue, a JSON API
/// and SVG status badges.
///
/// It follows CI_RESULTS from its newest --max-results results and watches the ci-jobs and
/// ci-runners buckets; it keeps no database, so a restarted jetci-web shows the same view
/// rebuilt from the streams. Pages need no JavaScript; with it, they update within a second of
/// a result.
///
/// When a branch goes from passing to failing or back, it POSTs JSON to each --webhook-url and
/// mails --mail-to through --smtp-url, once per change and never for the history it reads at
/// start.
///
/// Example: jetci-web -s nats://ci.example:4222 --listen 0.0.0.0:8080
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    #[command(flatten)]
    connect: ConnectArgs,
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    metrics: jetci::metrics::MetricsArgs,
    /// Address to serve HTTP on.
    #[arg(long, env = "JETCI_WEB_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Results kept in memory (the newest; older ones are evicted).
    #[arg(long, default_value_t = 10_000)]
    max_results: usize,
    /// Memory the results kept may fill with their text, in MiB: over it (or over
    /// --max-results), the repository holding the most loses its oldest result first.
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    max_results_mib: usize,
    #[command(flatten)]
    report: config::ReportArgs,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    args.log.init();
    if let Err(e) = run(args).await {
        eprintln!("jetci-web: error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.max_results >= 1, "--max-results must be at least 1");
    let settings = args.report.settings(args.listen)?;
    args.metrics.install()?;
    let shutdown = Shutdown::install()?;
    let alerter = alerts::Alerter::start(&settings.alerts, &shutdown.token)?;
    let files = match &settings.results_dir {
        Some(dir) => Some(results_dir::ResultFiles::start(dir)?),
        None => None,
    };
    let reporter = report::Reporter::new(alerter, files, settings.base_url);
    let nats = args.connect.connect("jetci-web").await?;
    let streams = jetci::streams::setup(&nats).await?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    anyhow::ensure!(
        (1..=1 << 20).contains(&args.max_results_mib),
        "--max-results-mib must be between 1 and 1048576"
    );
    let shared = feed::Shared::new(args.max_results, args.max_results_mib << 20);
    let stop = shutdown.token.clone();
    feed::start(&nats, &streams, &shared, args.max_results, reporter, &stop).await;
    let app = server::App {
        shared,
        nats,
        logs: streams.logs.clone(),
        commits: streams.commits.clone(),
        max_results: args.max_results,
        stop: stop.clone(),
        log_followers: std::sync::Arc::new(tokio::sync::Semaphore::new(live::MAX_LOG_FOLLOWERS)),
    };
    let addr = listener.local_addr().unwrap_or(args.listen);
    tracing::info!(%addr, "serving http://{addr}/");
    let serve = axum::serve(listener, server::router(app))
        .with_graceful_shutdown(stop.clone().cancelled_owned());
    tokio::select! {
        r = serve => r.context("the HTTP server failed")?,
        // Open connections get a moment to finish after the stop; then we go anyway.
        _ = async { stop.cancelled().await; tokio::time::sleep(Duration::from_secs(3)).await } => {}
    }
    tracing::info!("stopped");
    Ok(())
}
