//! jetci's library crate: what more than one process needs, and each process's loop.
//!
//! The protocol and the processes that speak it:
//! - [`protocol`]: the dispatch protocol, top to bottom: publishing a commit, a job's state and
//!   its transitions, placement, a runner's attempt, the lease decision, the verdict;
//! - [`dispatcher`]: the dispatcher's sans-IO core and its NATS driver;
//! - [`runner`]: the runner's loop, with the work of a job injected as an executor;
//! - [`observer`]: the observer's loop, where commits enter (plan, marks, poll-now notifies).
//!
//! What they are built from:
//! - [`subjects`]: every subject, stream, bucket and consumer name, and the job and attempt ids;
//! - [`messages`]: every wire type, strictly decoded;
//! - [`connect`]: the `nats` CLI's connection flags and the server check at connect;
//! - [`streams`]: idempotent stream and bucket set-up;
//! - [`git`]: repository access with git2 (branches, new commits, mirrors, checkouts);
//! - [`repo_config`]: the watched repository's `.jetci.toml`;
//! - [`limits`]: bounds on durations and text users give;
//! - [`pipeline`]: a run of several jobs: expanding the file's jobs, and which may start;
//! - [`follow`]: following a limits stream in order across NATS restarts (results, logs);
//! - [`result_file`]: the `test_results/<sha>` files;
//! - [`scaling`]: jetci-manager's pure scaling decision;
//! - [`schedule`]: which waiting job a free slot takes: fair share, branch order, bisection;
//! - [`test_report`]: test counts from unittest/pytest output and JUnit XML files;
//! - [`metrics`]: `--metrics-addr` and the Prometheus metric names;
//! - [`shutdown`] and [`logging`]: process plumbing every binary shares.

pub mod connect;
pub mod dispatcher;
pub mod follow;
pub mod git;
pub mod limits;
pub mod logging;
pub mod messages;
pub mod metrics;
pub mod observer;
pub mod pipeline;
pub mod protocol;
pub mod repo_config;
pub mod result_file;
pub mod runner;
pub mod scaling;
pub mod schedule;
pub mod shutdown;
pub mod streams;
pub mod subjects;
pub mod test_report;
