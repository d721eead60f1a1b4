//! When a branch breaks and when it is fixed: the state machine behind the alerts.
//!
//! A branch's state is the verdict of its newest commit (by history, as the view orders commits):
//! `passed` is passing; `failed`, `error` and `timed_out` are failing; `cancelled` says nothing
//! about the code, so it leaves the state as it was. A alert is due only when the state
//! flips, which is what keeps a red branch that gets ten more red commits quiet.
//!
//! Two rules keep restarts and replays quiet:
//! - The states are *seeded* from the rebuilt view when the follow loop has caught up with the
//!   stream, and only results that arrive after that can flip one. A restarted jetci-web reads the
//!   same history and so sends nothing for it (the "none on restart").
//! - A flip is sent at most once per `(repo, branch, commit, kind)`, so a commit whose reruns go
//!   red, green, red does not announce "broken by X" twice.
//!
//! Everything here is pure and synchronous; `report.rs` feeds it.

use std::collections::{HashMap, HashSet, VecDeque};

use jetci::messages::Status;
use serde::Serialize;

/// At most this many branches are tracked (a bound against a flood of branch names); results of
/// further branches are not tracked until jetci-web restarts.
const MAX_BRANCHES: usize = 100_000;
/// How many sent alerts are remembered for deduplication.
const MAX_SENT: usize = 10_000;

/// Whether a branch is green or red.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Health {
    Passing,
    Failing,
}

impl Health {
    /// The health a verdict means; `None` for `cancelled` and `skipped`, which change nothing.
    pub fn of(status: Status) -> Option<Health> {
        match status {
            Status::Passed => Some(Health::Passing),
            Status::Failed | Status::Error | Status::TimedOut => Some(Health::Failing),
            Status::Cancelled | Status::Skipped => None,
        }
    }
}

/// What a flip means for people.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Passing → failing.
    Broken,
    /// Failing → passing.
    Fixed,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Broken => "broken",
            Kind::Fixed => "fixed",
        }
    }
}

type BranchKey = (String, String);
type SentKey = (String, String, String, Kind);

/// The state of every branch and the alerts already sent; see the module comment.
#[derive(Default, Debug)]
pub struct Transitions {
    states: HashMap<BranchKey, Health>,
    sent: HashSet<SentKey>,
    sent_order: VecDeque<SentKey>,
}

impl Transitions {
    /// Records a branch's state without alerting (the baseline from history).
    pub fn seed(&mut self, repo: &str, branch: &str, status: Status) {
        if let Some(health) = Health::of(status) {
            self.set(repo, branch, health);
        }
    }

    /// Records the verdict of `branch`'s newest commit `sha` after a new result; returns the
    /// alert due, if any. A branch seen for the first time only sets its baseline.
    pub fn observe(&mut self, repo: &str, branch: &str, sha: &str, status: Status) -> Option<Kind> {
        let health = Health::of(status)?;
        let before = self.set(repo, branch, health)?;
        let kind = match (before, health) {
            (Health::Passing, Health::Failing) => Kind::Broken,
            (Health::Failing, Health::Passing) => Kind::Fixed,
            _ => return None,
        };
        let key = (repo.to_string(), branch.to_string(), sha.to_string(), kind);
        if !self.sent.insert(key.clone()) {
            return None;
        }
        self.sent_order.push_back(key);
        while self.sent_order.len() > MAX_SENT {
            if let Some(old) = self.sent_order.pop_front() {
                self.sent.remove(&old);
            }
        }
        Some(kind)
    }

    /// Sets a branch's state; returns the previous one.
    fn set(&mut self, repo: &str, branch: &str, health: Health) -> Option<Health> {
        let key = (repo.to_string(), branch.to_string());
        if self.states.len() >= MAX_BRANCHES && !self.states.contains_key(&key) {
            return None;
        }
        self.states.insert(key, health)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Status::*;

    #[test]
    fn one_alert_per_flip() {
        let mut t = Transitions::default();
        // A new branch sets its baseline quietly, whatever its colour.
        assert_eq!(t.observe("app", "main", "a", Passed), None);
        assert_eq!(t.observe("app", "main", "b", Failed), Some(Kind::Broken));
        assert_eq!(t.observe("app", "main", "c", Failed), None);
        assert_eq!(t.observe("app", "main", "d", Error), None);
        assert_eq!(t.observe("app", "main", "e", Passed), Some(Kind::Fixed));
        assert_eq!(t.observe("app", "main", "f", Passed), None);
        assert_eq!(t.observe("app", "main", "g", TimedOut), Some(Kind::Broken));
        // Other branches and repositories are separate.
        assert_eq!(t.observe("app", "dev", "h", Failed), None);
        assert_eq!(t.observe("lib", "main", "i", Failed), None);
    }

    #[test]
    fn cancelled_changes_nothing() {
        let mut t = Transitions::default();
        t.observe("app", "main", "a", Passed);
        assert_eq!(t.observe("app", "main", "b", Cancelled), None);
        assert_eq!(t.observe("app", "main", "c", Passed), None);
        assert_eq!(t.observe("app", "main", "d", Cancelled), None);
        assert_eq!(t.observe("app", "main", "e", Failed), Some(Kind::Broken));
    }

    #[test]
    fn the_seeded_history_is_not_announced() {
        let mut t = Transitions::default();
        t.seed("app", "main", Failed);
        t.seed("app", "dev", Cancelled);
        assert_eq!(t.observe("app", "main", "a", Failed), None);
        assert_eq!(t.observe("app", "main", "b", Passed), Some(Kind::Fixed));
        assert_eq!(t.observe("app", "dev", "c", Failed), None);
    }

    #[test]
    fn a_commit_announces_each_kind_once() {
        let mut t = Transitions::default();
        t.observe("app", "main", "a", Passed);
        // Runs of commit b go red, green, red, green.
        assert_eq!(t.observe("app", "main", "b", Failed), Some(Kind::Broken));
        assert_eq!(t.observe("app", "main", "b", Passed), Some(Kind::Fixed));
        assert_eq!(t.observe("app", "main", "b", Failed), None);
        assert_eq!(t.observe("app", "main", "b", Passed), None);
        // The state still follows, so the next commit's flip is announced.
        assert_eq!(t.observe("app", "main", "c", Failed), Some(Kind::Broken));
    }
}
