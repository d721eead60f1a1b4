//! Prometheus metrics: `--metrics-addr ADDR` serves `/metrics` in the Prometheus text format.
//!
//! The processes record with the `metrics` crate's macros (`counter!`, `gauge!`,
//! `histogram!`); `metrics-exporter-prometheus` renders them and runs the HTTP listener. Without
//! the flag nothing listens and the macros cost next to nothing. Every name starts with
//! `jetci_`; the names each process records are listed in [`names`].

use std::net::SocketAddr;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// The metric names, in one place (Prometheus naming: `_total` for counters, base units).
pub mod names {
    /// Counter: commit messages a dispatcher took (including redeliveries).
    pub const COMMITS_RECEIVED: &str = "jetci_commits_received_total";
    /// Counter: jobs a dispatcher assigned to a runner.
    pub const JOBS_ASSIGNED: &str = "jetci_jobs_assigned_total";
    /// Counter: assignments of attempt 2 or later (a lost runner's job moved).
    pub const JOBS_REASSIGNED: &str = "jetci_jobs_reassigned_total";
    /// Counter, labels `status` and `kind`: final results (a dispatcher counts those it saw
    /// become final and the pipelines' run results it published, a runner those it
    /// published). `kind` is `run` for a run's one result (a run of one job, or a pipeline's
    /// run) and `job` for a pipeline job's own result ([`super::result_kind`]), so runs are
    /// counted once whatever their number of jobs.
    pub const RESULTS: &str = "jetci_results_total";
    /// Gauge: commits waiting for a runner (a dispatcher: not yet taken plus held and waiting).
    pub const QUEUE_DEPTH: &str = "jetci_queue_depth";
    /// Gauge: jobs assigned or running.
    pub const JOBS_IN_FLIGHT: &str = "jetci_jobs_in_flight";
    /// Histogram: seconds from a job's start to its result (runner).
    pub const JOB_DURATION: &str = "jetci_job_duration_seconds";
    /// Gauge: runner processes a manager runs.
    pub const MANAGER_RUNNERS: &str = "jetci_manager_runners";
    /// Counter: runner processes a manager started (scaling up, or replacing a crashed one).
    pub const MANAGER_STARTED: &str = "jetci_manager_runners_started_total";
    /// Counter: idle runner processes a manager stopped.
    pub const MANAGER_STOPPED: &str = "jetci_manager_runners_stopped_total";
    /// Gauge: age in seconds of the oldest heartbeat among jobs in flight (dispatcher), or of
    /// this runner's last successful heartbeat write (runner).
    pub const HEARTBEAT_AGE: &str = "jetci_heartbeat_age_seconds";
}

/// The `kind` label of [`names::RESULTS`]: `job` for a pipeline job's result, `run` for a run's.
pub fn result_kind(pipeline_job: bool) -> &'static str {
    if pipeline_job {
        "job"
    } else {
        "run"
    }
}

/// Buckets of [`names::JOB_DURATION`], in seconds: from a trivial test to an hour-long one.
const DURATION_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// The `--metrics-addr` flag.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9464) at /metrics.
    #[arg(long, value_name = "ADDR", env = "JETCI_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
}

/// The metrics listener could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on {addr}: {reason}")]
pub struct MetricsError {
    pub addr: SocketAddr,
    pub reason: String,
}

impl MetricsArgs {
    /// Starts the listener when the flag is given; call from inside the tokio runtime.
    pub fn install(&self) -> Result<(), MetricsError> {
        let Some(addr) = self.metrics_addr else {
            return Ok(());
        };
        let err = |e: &dyn std::fmt::Display| MetricsError {
            addr,
            reason: e.to_string(),
        };
        // Bind first, so a taken port is a clear error now rather than a log line later.
        std::net::TcpListener::bind(addr).map_err(|e| err(&e))?;
        PrometheusBuilder::new()
            .with_http_listener(addr)
            .set_buckets_for_metric(Matcher::Full(names::JOB_DURATION.into()), DURATION_BUCKETS)
            .map_err(|e| err(&e))?
            .install()
            .map_err(|e| err(&e))
    }
}
