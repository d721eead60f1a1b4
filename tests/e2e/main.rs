//! jetci's end-to-end tests: one test binary with a module per capability, as ripgrep keeps
//! `tests/integration`, and the [`support`] they share (split by concern: nats, git, processes,
//! waiting, ...).
//!
//! Every test runs the real system (a nats-server, git repositories, the workspace's binaries)
//! and waits for events with a generous bound. `cargo test --workspace` runs them all; one area
//! runs with its module as the filter, e.g. `cargo test -p jetci-e2e --test e2e faults::`.
//!
//! The tests run on parallel threads of this one process, and each is safe beside any other: it
//! starts its own nats-server on a free port with its own store, its own repositories, temp dirs
//! and processes, and kills only what it started. None sets an environment variable or reads the
//! process's own output; tests that look for their processes in the machine's process table name
//! them with a marker unique to the call ([`support::processes::marker_seconds`]). The few that
//! load the whole machine take [`support::heavy`], so no two of them run at once.

mod support;

mod alerts;
mod auth;
mod bench_smoke;
mod browser;
mod chaos;
mod cluster;
mod fair_share;
mod faults;
mod inputs;
mod inputs_observer;
mod jobs;
mod manager;
mod metrics;
mod notify;
mod ops;
mod pipeline;
mod pipelines;
mod runner;
mod sandbox;
mod scheduling;
mod submodules;
mod up;
mod verdicts;
mod web;
