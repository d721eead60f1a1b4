//! What the end-to-end tests share, one module per concern.
//!
//! Every test runs the real system: a real `nats-server` on a free port with its own store
//! directory ([`nats`]), real git repositories made with the `git` command line ([`git`]) and the
//! real workspace binaries ([`processes`], and [`system`] for jetci's processes with the flags the
//! tests share). There is no mock broker: the invariants of DESIGN.md are about how JetStream
//! behaves, so only JetStream can check them.
//!
//! - [`waiting`]: the one way to wait for an event, [`waiting::wait_until`], which panics with
//!   what it waited for and what it last saw; tests never sleep to let something happen.
//! - [`jetstream`]: what jetci stored (results, stream messages, job states), with every name
//!   taken from the library ([`jetstream::names`]).
//! - [`executions`]: how many times a test command really ran, from a file it appends to.
//! - [`http`] and [`prom`]: plain HTTP to jetci-web and `--metrics-addr`, and Prometheus text.
//!
//! Each helper owns what it started and kills only that (by pid, on `Drop`), so tests on
//! parallel threads never touch each other's processes and a failing test leaves nothing
//! running. Panicking with a clear message is the error handling here: a test that cannot set up
//! its world should fail at once and say why.

pub mod executions;
pub mod git;
pub mod http;
pub mod jetstream;
pub mod nats;
pub mod processes;
pub mod prom;
pub mod system;
pub mod waiting;

use tokio::sync::{Mutex, MutexGuard};

/// Held by each test that loads the whole machine for a minute or more (the chaos test, the
/// cluster, the benchmark smoke run, the manager scaling to three runners), for its whole run.
///
/// All tests run in one process on parallel threads. Each isolates itself (its own nats-server,
/// repositories, directories and processes), so any two may run at once; but two of these heavy
/// ones together on a small machine would starve the processes under test of CPU until leases
/// expire, and a healthy job would look lost. Before the suite was one binary each of them was a
/// process of its own and never ran beside another. Lighter tests still run beside them.
///
/// A tokio mutex, so an async test may hold it across its awaits; it works across the tests'
/// runtimes, and a test that panicked releases it like any other.
static HEAVY: Mutex<()> = Mutex::const_new(());

/// Waits until no other heavy test runs; see [`HEAVY`].
pub async fn heavy() -> MutexGuard<'static, ()> {
    HEAVY.lock().await
}

/// [`heavy`] for a plain `#[test]` (outside any async runtime).
pub fn heavy_blocking() -> MutexGuard<'static, ()> {
    HEAVY.blocking_lock()
}
