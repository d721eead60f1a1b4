//! Pipelines: a run of several jobs (DESIGN.md, "Runs and jobs").
//!
//! A repository whose `.jetci.toml` names `[jobs.<name>]` tables runs each commit as a pipeline:
//! - [`mod@plan`] expands the file's jobs for one branch (matrix, shards, branch filters) into the
//!   run's jobs, each with a display name, a key token and the jobs it needs. The observer puts
//!   the plan in the commit message (the dispatcher places jobs without touching git); the runner
//!   plans again from its own checkout and runs the job the message names ([`resolve`]).
//! - [`progress`] decides, as the jobs end, which job may start, which is skipped, what
//!   `fail_fast` cancels, and the run's verdict. The dispatcher's core drives it.
//! - [`shard`] splits a job's tests over its shards by recorded durations (longest first);
//!   [`timings`] keeps the splits and durations in JetStream KV.
//!
//! A file with one top-level `command` (or none) is a run of one job, exactly as before
//! pipelines: its job has no token and its result is the run's result.

pub mod plan;
pub mod progress;
pub mod shard;
pub mod timings;

pub use plan::{plan, resolve, PlannedJob, Resolved};
pub use progress::{Outcome, Progress, Verdict};
