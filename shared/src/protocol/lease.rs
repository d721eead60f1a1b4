//! The lease decision (DESIGN.md, "Deadlines instead of pings"): what a dispatcher does with a
//! job it holds, given the job's state in `ci-jobs` and how long ago its runner last proved it is
//! alive. Pure functions; the dispatcher's core ([`crate::dispatcher::core`]) calls them.
//!
//! A job is alive while its state was written less than a lease ago: the runner rewrites it every
//! heartbeat. Two facts can change the age the decision sees ([`effective_age`]): after an outage
//! of this dispatcher's connection, no heartbeat can be older than the reconnection for its
//! runner's fault (I3: a healthy job is not taken from its runner), and a runner whose connection
//! a probe found gone needs no lease to be lost (I2: its job moves at once).

use std::time::Duration;

use crate::messages::{JobPhase, JobState};

/// What a dispatcher does with a job it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// A final result exists: ack the commit.
    Done,
    /// The current attempt is alive on its runner: keep extending the commit's deadline.
    Adopt,
    /// Start attempt `attempt` on a runner (the first, or a new one after a lost runner).
    Assign { attempt: u32 },
    /// Attempts are used up: publish a final `error` result.
    GiveUp { attempts: u32 },
    /// A user cancelled the job and no live runner holds it: publish a final `cancelled` result.
    Cancel,
}

/// The age a decision counts for a state written `written_ago`: at most the time since this
/// process's connection to NATS came back (`since_reconnect`), and at least a whole `lease` when
/// a probe found the state's runner gone (`runner_gone`).
pub fn effective_age(
    written_ago: Duration,
    since_reconnect: Option<Duration>,
    runner_gone: bool,
    lease: Duration,
) -> Duration {
    let age = match since_reconnect {
        Some(since) => written_ago.min(since),
        None => written_ago,
    };
    if runner_gone {
        age.max(lease)
    } else {
        age
    }
}

/// Decides from the `ci-jobs` state and its effective age ([`effective_age`]).
pub fn decide(
    state: Option<&JobState>,
    age: Duration,
    lease: Duration,
    max_attempts: u32,
) -> Decision {
    let Some(s) = state else {
        return Decision::Assign { attempt: 1 };
    };
    let alive = age < lease;
    match s.phase {
        JobPhase::Final => Decision::Done,
        // A live runner sees the cancel request in its next heartbeat and reports `cancelled`.
        JobPhase::Assigned | JobPhase::Running if s.cancel.is_some() && alive => Decision::Adopt,
        _ if s.cancel.is_some() => Decision::Cancel,
        // Handed back by its runner (a failed checkout, a shutdown) after the last attempt.
        JobPhase::Queued if s.attempt >= max_attempts => Decision::GiveUp {
            attempts: s.attempt,
        },
        JobPhase::Queued => Decision::Assign {
            attempt: s.attempt + 1,
        },
        JobPhase::Assigned | JobPhase::Running if alive => Decision::Adopt,
        JobPhase::Assigned | JobPhase::Running => {
            if s.attempt >= max_attempts {
                Decision::GiveUp {
                    attempts: s.attempt,
                }
            } else {
                Decision::Assign {
                    attempt: s.attempt + 1,
                }
            }
        }
    }
}

/// Whether `decision` ends an attempt whose runner was lost (its state says `assigned` or
/// `running`): another attempt, giving up, or a cancel. That runner may have stored its result
/// and died before it wrote `final`; the run is over then, and the dispatcher looks for the
/// result before it acts. (A `queued` state, handed back or already decided on, has no result
/// to find.)
pub fn after_a_loss(state: Option<&JobState>, decision: &Decision) -> bool {
    let lost = state.is_some_and(|s| matches!(s.phase, JobPhase::Assigned | JobPhase::Running));
    lost && match decision {
        Decision::Assign { attempt } => *attempt > 1,
        Decision::GiveUp { .. } | Decision::Cancel => true,
        Decision::Done | Decision::Adopt => false,
    }
}

/// Why a job is given up after `attempts` lost runners, from its last state: the reason it was
/// handed back with, else the runner that went silent.
pub fn give_up_reason(state: Option<&JobState>, attempts: u32, max_attempts: u32) -> String {
    let why = match (
        state.and_then(|s| s.reason.clone()),
        state.and_then(|s| s.runner.clone()),
    ) {
        (Some(reason), _) => reason,
        (None, Some(runner)) => format!("runner {runner} stopped heartbeating"),
        (None, None) => "the runner was lost".to_string(),
    };
    format!("attempt {attempts} of {max_attempts} failed: {why}; giving up")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{now, VERSION};

    fn state(phase: JobPhase, attempt: u32) -> JobState {
        JobState {
            v: VERSION,
            repo: "r".into(),
            branch: "main".into(),
            sha: "a".repeat(40),
            run: 1,
            job: None,
            phase,
            attempt,
            runner: Some("r1".into()),
            job_seq: Some(1),
            labels: vec![],
            status: None,
            reason: None,
            cancel: None,
            updated_at: now(),
        }
    }

    #[test]
    fn decisions() {
        let lease = Duration::from_secs(3);
        let fresh = Duration::from_millis(500);
        let stale = Duration::from_secs(4);
        assert_eq!(
            decide(None, fresh, lease, 3),
            Decision::Assign { attempt: 1 }
        );
        assert_eq!(
            decide(Some(&state(JobPhase::Final, 1)), stale, lease, 3),
            Decision::Done
        );
        assert_eq!(
            decide(Some(&state(JobPhase::Running, 1)), fresh, lease, 3),
            Decision::Adopt
        );
        assert_eq!(
            decide(Some(&state(JobPhase::Assigned, 1)), fresh, lease, 3),
            Decision::Adopt
        );
        assert_eq!(
            decide(Some(&state(JobPhase::Running, 1)), stale, lease, 3),
            Decision::Assign { attempt: 2 }
        );
        assert_eq!(
            decide(Some(&state(JobPhase::Running, 3)), stale, lease, 3),
            Decision::GiveUp { attempts: 3 }
        );
        assert_eq!(
            decide(Some(&state(JobPhase::Queued, 0)), stale, lease, 3),
            Decision::Assign { attempt: 1 }
        );
        assert_eq!(
            decide(Some(&state(JobPhase::Queued, 2)), fresh, lease, 3),
            Decision::Assign { attempt: 3 }
        );
        assert_eq!(
            decide(Some(&state(JobPhase::Queued, 3)), fresh, lease, 3),
            Decision::GiveUp { attempts: 3 }
        );
        let mut cancelled = state(JobPhase::Running, 1);
        cancelled.cancel = Some("by a user".into());
        assert_eq!(decide(Some(&cancelled), fresh, lease, 3), Decision::Adopt);
        assert_eq!(decide(Some(&cancelled), stale, lease, 3), Decision::Cancel);
        cancelled.phase = JobPhase::Queued;
        assert_eq!(decide(Some(&cancelled), fresh, lease, 3), Decision::Cancel);
        cancelled.phase = JobPhase::Final;
        assert_eq!(decide(Some(&cancelled), fresh, lease, 3), Decision::Done);
    }

    #[test]
    fn ages_count_from_a_reconnect_and_a_gone_runner_is_past_its_lease() {
        let lease = Duration::from_secs(3);
        let s = Duration::from_secs;
        assert_eq!(effective_age(s(10), None, false, lease), s(10));
        assert_eq!(effective_age(s(10), Some(s(1)), false, lease), s(1));
        assert_eq!(effective_age(s(1), Some(s(5)), false, lease), s(1));
        assert_eq!(effective_age(s(1), None, true, lease), lease);
        assert_eq!(effective_age(s(10), Some(s(1)), true, lease), lease);
    }

    #[test]
    fn only_a_lost_attempt_is_looked_for_a_result() {
        let running = state(JobPhase::Running, 1);
        let queued = state(JobPhase::Queued, 1);
        assert!(after_a_loss(
            Some(&running),
            &Decision::Assign { attempt: 2 }
        ));
        assert!(after_a_loss(
            Some(&running),
            &Decision::GiveUp { attempts: 3 }
        ));
        assert!(after_a_loss(Some(&running), &Decision::Cancel));
        assert!(!after_a_loss(Some(&running), &Decision::Adopt));
        assert!(!after_a_loss(
            Some(&queued),
            &Decision::Assign { attempt: 2 }
        ));
        assert!(!after_a_loss(None, &Decision::Assign { attempt: 1 }));
    }

    #[test]
    fn giving_up_says_why() {
        let mut s = state(JobPhase::Running, 3);
        assert_eq!(
            give_up_reason(Some(&s), 3, 3),
            "attempt 3 of 3 failed: runner r1 stopped heartbeating; giving up"
        );
        s.reason = Some("checkout failed".into());
        assert!(give_up_reason(Some(&s), 3, 3).contains("checkout failed"));
        assert!(give_up_reason(None, 1, 1).contains("the runner was lost"));
    }
}
