//! jetci's library crate: what more than one process needs.
//!
//! - [`subjects`]: every subject, stream, bucket and consumer name, built in one place;
//! - [`messages`]: every wire type, strictly decoded;
//! - [`connect`]: the `nats` CLI's connection flags and the server check at connect;
//! - [`streams`]: idempotent stream and bucket set-up;
//! - [`git`]: repository access with git2 (branches, new commits, mirrors, checkouts);
//! - [`repo_config`]: the watched repository's `.jetci.toml`;
//! - [`follow`]: following a limits stream in order across NATS restarts (results, logs);
//! - [`results`]: first-writer-wins publishing of final results;
//! - [`result_file`]: the `test_results/<sha>` files;
//! - [`job_state`]: compare-and-set reads and writes of `ci-jobs`;
//! - [`attempt`]: a runner's side of its attempt's state: claim, renew, final, hand back;
//! - [`dispatch`]: the pure parts of the dispatch policy (liveness, runner choice);
//! - [`test_report`]: test counts from unittest/pytest output and JUnit XML files;
//! - [`metrics`]: `--metrics-addr` and the Prometheus metric names;
//! - [`shutdown`] and [`logging`]: process plumbing every binary shares.

pub mod attempt;
pub mod connect;
pub mod dispatch;
pub mod follow;
pub mod git;
pub mod job_state;
pub mod logging;
pub mod messages;
pub mod metrics;
pub mod repo_config;
pub mod result_file;
pub mod results;
pub mod scaling;
pub mod shutdown;
pub mod streams;
pub mod subjects;
pub mod test_report;
