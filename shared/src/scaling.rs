//! The pure part of `jetci-manager`: how many runners to start, and which idle ones to stop,
//! given the work that waits and the runners it has. The manager binary does the I/O (reading
//! the queue, spawning and signalling processes); [`plan`] decides, so the policy is tested here
//! without NATS or processes.
//!
//! The policy, in the order it applies:
//! - never fewer runners than `min`, never more than `max` (runners still starting count);
//! - start runners while the work that waits for the manager's labels exceeds the free slots
//!   (a runner still starting counts as free: it will take work as soon as it registers, so a
//!   burst does not start a runner per tick);
//! - stop only runners that are idle — no job in their `ci-runners` entry — for at least the idle
//!   timeout, the longest idle first, down to `min`, and only while enough free slots stay for
//!   the work that waits. A busy runner is never stopped: stopping is SIGTERM, and a runner
//!   drains, but a job is never moved for the sake of scaling (DESIGN.md, I3).

use std::time::Duration;

/// The manager's bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Runners kept even with nothing to do.
    pub min: u32,
    /// Runners started at most.
    pub max: u32,
    /// How long a runner must have been without a job before it may be stopped.
    pub idle_timeout: Duration,
    /// Slots a runner that has not registered yet is assumed to have (its `--jobs`).
    pub capacity: u32,
}

/// Work that waits for the manager's labels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Demand {
    /// Commits no dispatcher has taken yet (the shared consumer's pending count on `CI_COMMITS`,
    /// restricted to commits whose labels the manager's runners have).
    pub pending: u32,
    /// Commits a dispatcher holds that wait for a runner (`ci-jobs` phase `queued`, same
    /// restriction).
    pub waiting: u32,
}

/// What one of the manager's runners is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunnerLoad {
    /// Started (or waiting to be restarted) but not registered in `ci-runners` yet.
    Starting,
    /// Registered: its slots, the jobs in its entry, and how long it has had none (zero while
    /// busy).
    Up {
        capacity: u32,
        busy: u32,
        idle_for: Duration,
    },
}

/// One runner as [`plan`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerView {
    pub id: String,
    pub load: RunnerLoad,
}

/// The numbers a decision was taken on; logged with every decision.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Numbers {
    pub pending: u32,
    pub waiting: u32,
    /// Busy slots over all the manager's runners.
    pub busy: u32,
    /// Free slots (a starting runner counts with its assumed capacity).
    pub free: u32,
    /// Runners the manager has (starting ones included).
    pub running: u32,
    /// Registered runners without a job.
    pub idle: u32,
}

/// What to do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Runners to start.
    pub start: u32,
    /// Runners to stop (SIGTERM), all idle for at least the idle timeout.
    pub stop: Vec<String>,
    /// Why, in a few words (for the log).
    pub reason: &'static str,
    pub numbers: Numbers,
}

/// Decides from the waiting work and the runners' states. Pure: the same inputs give the same
/// plan, so the manager can take it every tick.
pub fn plan(demand: Demand, runners: &[RunnerView], limits: &Limits) -> Plan {
    let capacity = limits.capacity.max(1);
    let mut n = Numbers {
        pending: demand.pending,
        waiting: demand.waiting,
        running: runners.len() as u32,
        ..Numbers::default()
    };
    for r in runners {
        match r.load {
            RunnerLoad::Starting => n.free += capacity,
            RunnerLoad::Up {
                capacity: c, busy, ..
            } => {
                n.busy += busy;
                n.free += c.saturating_sub(busy);
                if busy == 0 {
                    n.idle += 1;
                }
            }
        }
    }
    let work = demand.pending.saturating_add(demand.waiting);
    let room = limits.max.saturating_sub(n.running);

    let below_min = limits.min.saturating_sub(n.running);
    let for_work = work.saturating_sub(n.free).div_ceil(capacity);
    let start = below_min.max(for_work).min(room);
    if start > 0 {
        let reason = if for_work >= below_min {
            "work waits"
        } else {
            "below --min"
        };
        return Plan {
            start,
            stop: Vec::new(),
            reason,
            numbers: n,
        };
    }

    // Stop idle runners past the timeout, longest idle first, keeping `min` runners and enough
    // free slots for the work that waits.
    let mut idle: Vec<(&str, u32, Duration)> = runners
        .iter()
        .filter_map(|r| match r.load {
            RunnerLoad::Up {
                capacity,
                busy: 0,
                idle_for,
            } if idle_for >= limits.idle_timeout => Some((r.id.as_str(), capacity, idle_for)),
            _ => None,
        })
        .collect();
    idle.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(b.0)));
    let mut may_stop = n.running.saturating_sub(limits.min);
    let mut free = n.free;
    let mut stop = Vec::new();
    for (id, c, _) in idle {
        if may_stop == 0 {
            break;
        }
        if free.saturating_sub(c) < work {
            continue;
        }
        free -= c;
        may_stop -= 1;
        stop.push(id.to_string());
    }
    let reason = if !stop.is_empty() {
        "idle past --idle-timeout"
    } else if for_work > 0 {
        "work waits, but --max runners run"
    } else {
        "steady"
    };
    Plan {
        start: 0,
        stop,
        reason,
        numbers: n,
    }
}

/// True when a runner offering `offered` labels can run a job that needs `needed`: it has them
/// all (the dispatcher's rule, [`crate::protocol::placement::pick_runner`]).
pub fn covers(offered: &[String], needed: &[String]) -> bool {
    needed.iter().all(|l| offered.contains(l))
}

/// A manager's default name from the host name: its first label, lowercased, with anything
/// outside `[a-z0-9_-]` turned into `-` (`Build-Box.example.com` → `build-box`); `manager` when
/// nothing is left. Runner ids are `<name>-<n>`, so the name must be a subject token.
pub fn default_name(hostname: &str) -> String {
    let first = hostname.trim().split('.').next().unwrap_or("");
    let slug: String = first
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '_' | '-') => c,
            _ => '-',
        })
        .take(40)
        .collect();
    let slug = slug.trim_matches('-');
    if slug.is_empty() {
        "manager".to_string()
    } else {
        slug.to_string()
    }
}

/// The id of a manager's runner number `n` (from 1): `<name>-<n>`.
pub fn runner_id(name: &str, n: u32) -> String {
    format!("{name}-{n}")
}

/// The smallest runner number (from 1) not in `used`. Reusing numbers keeps the set of runner
/// ids, and so of durable consumers on `CI_JOBS`, as small as `--max`.
pub fn lowest_free_number(used: impl IntoIterator<Item = u32>) -> u32 {
    let mut used: Vec<u32> = used.into_iter().collect();
    used.sort_unstable();
    let mut n = 1;
    for u in used {
        if u == n {
            n += 1;
        } else if u > n {
            break;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn limits(min: u32, max: u32) -> Limits {
        Limits {
            min,
            max,
            idle_timeout: 30 * S,
            capacity: 1,
        }
    }

    fn starting(id: &str) -> RunnerView {
        RunnerView {
            id: id.into(),
            load: RunnerLoad::Starting,
        }
    }

    fn busy(id: &str, busy: u32) -> RunnerView {
        RunnerView {
            id: id.into(),
            load: RunnerLoad::Up {
                capacity: busy.max(1),
                busy,
                idle_for: Duration::ZERO,
            },
        }
    }

    fn idle(id: &str, secs: u64) -> RunnerView {
        RunnerView {
            id: id.into(),
            load: RunnerLoad::Up {
                capacity: 1,
                busy: 0,
                idle_for: Duration::from_secs(secs),
            },
        }
    }

    fn demand(pending: u32, waiting: u32) -> Demand {
        Demand { pending, waiting }
    }

    #[test]
    fn starts_up_to_min_with_no_work() {
        let p = plan(demand(0, 0), &[], &limits(2, 5));
        assert_eq!((p.start, p.reason), (2, "below --min"));
        assert!(p.stop.is_empty());
        assert_eq!(plan(demand(0, 0), &[], &limits(0, 5)).start, 0);
    }

    #[test]
    fn starts_for_waiting_work_up_to_max() {
        let runners = [busy("m-1", 1)];
        let p = plan(demand(29, 0), &runners, &limits(1, 3));
        assert_eq!((p.start, p.reason), (2, "work waits"));
        assert_eq!(
            p.numbers,
            Numbers {
                pending: 29,
                waiting: 0,
                busy: 1,
                free: 0,
                running: 1,
                idle: 0
            }
        );
        // Held commits count like pending ones.
        assert_eq!(plan(demand(0, 1), &runners, &limits(1, 3)).start, 1);
        // At --max nothing more starts, and nothing stops.
        let full = [busy("m-1", 1), busy("m-2", 1), busy("m-3", 1)];
        let p = plan(demand(20, 0), &full, &limits(1, 3));
        assert_eq!((p.start, p.stop.len()), (0, 0));
        assert_eq!(p.reason, "work waits, but --max runners run");
    }

    #[test]
    fn starting_runners_count_as_free_slots() {
        // One commit waits and a runner is already starting: do not start another per tick.
        let runners = [busy("m-1", 1), starting("m-2")];
        assert_eq!(plan(demand(1, 0), &runners, &limits(1, 5)).start, 0);
        assert_eq!(plan(demand(3, 0), &runners, &limits(1, 5)).start, 2);
    }

    #[test]
    fn multi_slot_runners_start_by_slots() {
        let l = Limits {
            capacity: 4,
            ..limits(0, 10)
        };
        assert_eq!(plan(demand(9, 0), &[], &l).start, 3);
        let runners = [RunnerView {
            id: "m-1".into(),
            load: RunnerLoad::Up {
                capacity: 4,
                busy: 2,
                idle_for: Duration::ZERO,
            },
        }];
        // Two free slots take two of five commits; three more need one runner.
        assert_eq!(plan(demand(5, 0), &runners, &l).start, 1);
        assert_eq!(plan(demand(2, 0), &runners, &l).start, 0);
    }

    #[test]
    fn stops_only_idle_runners_past_the_timeout_down_to_min() {
        let runners = [
            busy("m-1", 1),
            idle("m-2", 40),
            idle("m-3", 10),
            idle("m-4", 90),
        ];
        let p = plan(demand(0, 0), &runners, &limits(1, 5));
        assert_eq!(p.start, 0);
        // m-3 is idle for less than the timeout; the longest idle goes first.
        assert_eq!(p.stop, vec!["m-4".to_string(), "m-2".to_string()]);
        assert_eq!(p.reason, "idle past --idle-timeout");
        assert_eq!(p.numbers.idle, 3);

        // --min keeps runners even when they are all idle.
        let all_idle = [idle("m-1", 100), idle("m-2", 100), idle("m-3", 100)];
        let p = plan(demand(0, 0), &all_idle, &limits(2, 5));
        assert_eq!(p.stop, vec!["m-1".to_string()]);
        assert!(plan(demand(0, 0), &all_idle, &limits(3, 5)).stop.is_empty());
        // Busy and starting runners are never stopped.
        let p = plan(
            demand(0, 0),
            &[busy("m-1", 1), starting("m-2")],
            &limits(0, 5),
        );
        assert_eq!((p.start, p.stop.len(), p.reason), (0, 0, "steady"));
    }

    #[test]
    fn keeps_free_slots_for_work_that_waits() {
        let runners = [idle("m-1", 100), idle("m-2", 100), idle("m-3", 100)];
        // One commit waits (the dispatcher has not handed it over yet): keep one free runner.
        let p = plan(demand(1, 0), &runners, &limits(0, 5));
        assert_eq!(p.stop, vec!["m-1".to_string(), "m-2".to_string()]);
    }

    #[test]
    fn labels_cover_when_all_are_offered() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(covers(&s(&["linux", "python"]), &s(&["python"])));
        assert!(covers(&s(&[]), &s(&[])));
        assert!(covers(&s(&["linux"]), &s(&[])));
        assert!(!covers(&s(&[]), &s(&["gpu"])));
        assert!(!covers(&s(&["linux"]), &s(&["linux", "gpu"])));
    }

    #[test]
    fn names_and_numbers() {
        assert_eq!(default_name("Build-Box.example.com"), "build-box");
        assert_eq!(default_name("my host!"), "my-host");
        assert_eq!(default_name(""), "manager");
        assert_eq!(runner_id("build-box", 2), "build-box-2");
        assert!(crate::subjects::is_token(&runner_id(
            &default_name("ü x"),
            1
        )));
        assert_eq!(lowest_free_number([]), 1);
        assert_eq!(lowest_free_number([1, 2, 4]), 3);
        assert_eq!(lowest_free_number([3, 1, 2]), 4);
        assert_eq!(lowest_free_number([2, 3]), 1);
    }
}
