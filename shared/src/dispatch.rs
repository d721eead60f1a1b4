//! The pure parts of the dispatch policy: what to do with a commit given its job state, and
//! which runner gets a job. The dispatcher binary does the I/O; these functions decide.

use std::collections::HashMap;
use std::time::Duration;

use crate::messages::{JobPhase, JobState};

/// What a dispatcher does with a commit message it holds.
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

/// Decides from the `ci-jobs` state and the age of its last write (the runner's last heartbeat,
/// or the assignment).
///
/// A job is alive while its state was written less than `lease` ago: the runner rewrites it every
/// heartbeat (DESIGN.md, "Deadlines instead of pings").
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

/// A runner as the dispatcher sees it.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    pub id: &'a str,
    pub labels: &'a [String],
    pub capacity: u32,
    /// Jobs it holds now (from `ci-jobs`: assigned or running on it).
    pub busy: u32,
    /// Alive (presence refreshed within the lease) and not draining.
    pub available: bool,
}

/// Picks the runner for a job that needs `labels`: an available runner whose labels cover them
/// and that has a free slot, the one with the most free slots first, then the one assigned least
/// recently (`last_pick`, a counter per runner), so equal runners take turns.
pub fn pick_runner<'a>(
    candidates: &[Candidate<'a>],
    labels: &[String],
    last_pick: &HashMap<String, u64>,
) -> Option<&'a str> {
    candidates
        .iter()
        .filter(|c| c.available && c.busy < c.capacity)
        .filter(|c| labels.iter().all(|l| c.labels.contains(l)))
        .max_by_key(|c| {
            let free = c.capacity - c.busy;
            let recency = last_pick.get(c.id).copied().unwrap_or(0);
            (free, std::cmp::Reverse(recency), std::cmp::Reverse(c.id))
        })
        .map(|c| c.id)
}

/// True when no candidate could ever take a job with `labels`, free or busy: the job waits for a
/// runner with those labels to register.
pub fn nobody_has_labels(candidates: &[Candidate<'_>], labels: &[String]) -> bool {
    !candidates
        .iter()
        .filter(|c| c.available)
        .any(|c| labels.iter().all(|l| c.labels.contains(l)))
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
    fn picks_free_matching_runner_in_turn() {
        let linux = vec!["linux".to_string()];
        let none: Vec<String> = vec![];
        let c = vec![
            Candidate {
                id: "a",
                labels: &linux,
                capacity: 1,
                busy: 1,
                available: true,
            },
            Candidate {
                id: "b",
                labels: &none,
                capacity: 1,
                busy: 0,
                available: true,
            },
            Candidate {
                id: "c",
                labels: &linux,
                capacity: 1,
                busy: 0,
                available: true,
            },
            Candidate {
                id: "d",
                labels: &linux,
                capacity: 4,
                busy: 0,
                available: false,
            },
        ];
        let mut last = HashMap::new();
        assert_eq!(pick_runner(&c, &linux, &last), Some("c"));
        assert_eq!(pick_runner(&c, &none, &last), Some("b"));
        last.insert("b".to_string(), 5);
        assert_eq!(pick_runner(&c, &none, &last), Some("c"));
        assert_eq!(pick_runner(&c, &["gpu".to_string()], &last), None);
        assert!(nobody_has_labels(&c, &["gpu".to_string()]));
        assert!(!nobody_has_labels(&c, &linux));
    }
}
