//! Waiting for an event, the one way every test does it.
//!
//! [`wait_until`] (or [`wait_until_async`] in async code) asks a condition again and again until it
//! holds, and panics after a bound with what it was waiting for and what the condition last saw.
//! Tests never sleep for a fixed time to let something happen: they wait for the thing itself (a
//! result stored, a KV entry, a log line, a process gone). The bound is generous because the
//! machines that run the suite are small and shared: it detects a failure, it claims nothing
//! about speed.
//!
//! A condition returns `Ok(value)` when it holds and `Err(seen)` otherwise, where `seen` says what
//! it found instead (the last job state, the processes left, the last HTTP answer). For a yes or
//! no about something worth showing: `left.is_empty().then_some(()).ok_or_else(|| ...)`.
//!
//! A wait whose length grows with the work (hundreds of results on a loaded machine) uses
//! [`wait_progressing`] instead: it fails when the work stops moving for a while, not after one
//! bound for the whole of it, so it needs no bound long enough for the slowest machine (which
//! would also be the time a broken run takes to fail).

use std::fmt::Display;
use std::time::{Duration, Instant};

/// The usual bound of a wait: long enough for anything the system does on a loaded machine.
pub const BOUND: Duration = Duration::from_secs(120);

/// How often a condition is asked again: often enough to see a state that lasts a moment (a short
/// job is `running` for less than a second), rarely enough to leave the machine to the system
/// under test.
pub const POLL: Duration = Duration::from_millis(50);

/// Asks `condition` until it gives `Ok(value)`, and returns the value; `Err(seen)` means "not
/// yet". After `bound`, panics with `what` and the last `seen` (formatted with `{:#}`, so a JSON
/// value is pretty-printed).
///
/// Blocks the thread between looks: for plain `#[test]`s and helpers that run outside async code.
/// Async code uses [`wait_until_async`].
pub fn wait_until<T, S: Display>(
    what: &str,
    bound: Duration,
    mut condition: impl FnMut() -> Result<T, S>,
) -> T {
    let deadline = Instant::now() + bound;
    loop {
        match condition() {
            Ok(value) => return value,
            Err(seen) if Instant::now() >= deadline => timed_out(what, bound, seen),
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// [`wait_until`] for async code: the condition is an async closure (`async || { ... }`, which
/// may keep state from one look to the next), and the wait sleeps with tokio so the test's other
/// tasks keep running.
pub async fn wait_until_async<T, S: Display>(
    what: &str,
    bound: Duration,
    mut condition: impl AsyncFnMut() -> Result<T, S>,
) -> T {
    let deadline = Instant::now() + bound;
    loop {
        match condition().await {
            Ok(value) => return value,
            Err(seen) if Instant::now() >= deadline => timed_out(what, bound, seen),
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// What a condition of [`wait_progressing`] saw when it did not hold yet: how far the awaited work
/// got (a count that grows while it moves, such as results stored) and what it saw.
pub struct NotYet<S> {
    pub progress: usize,
    pub seen: S,
}

/// [`wait_until_async`] for work that takes longer the more there is: asks `condition` until it
/// gives `Ok(value)` and returns the value, and panics with `what` and the last `seen` when its
/// `progress` has not grown for `stall`, or after `bound` in all.
pub async fn wait_progressing<T, S: Display>(
    what: &str,
    stall: Duration,
    bound: Duration,
    mut condition: impl AsyncFnMut() -> Result<T, NotYet<S>>,
) -> T {
    let started = Instant::now();
    let (mut best, mut moved) = (0, started);
    loop {
        match condition().await {
            Ok(value) => return value,
            Err(not_yet) => {
                if not_yet.progress > best {
                    (best, moved) = (not_yet.progress, Instant::now());
                }
                if moved.elapsed() >= stall {
                    panic!(
                        "no progress for {stall:?} (at {best}) waiting for {what}; last saw: {:#}",
                        not_yet.seen
                    )
                }
                if started.elapsed() >= bound {
                    timed_out(what, bound, not_yet.seen)
                }
                tokio::time::sleep(POLL).await
            }
        }
    }
}

fn timed_out(what: &str, bound: Duration, seen: impl Display) -> ! {
    panic!("timed out after {bound:?} waiting for {what}; last saw: {seen:#}")
}
