//! Which waiting job a free runner slot goes to: a fair share of the runners across
//! repositories, then across each repository's branches, then each branch's backlog in its
//! repository's order ([`backlog`]).
//!
//! The share is GitLab's for shared runners among projects: a free slot goes to the repository
//! with the fewest jobs running (ties: the one whose oldest waiting job waited longest), among the
//! jobs that slot's runner can take; within it, the same across branches. Running counts are
//! every dispatcher's (the caller feeds them from `ci-jobs`), so several dispatchers share alike.
//! A job that needs labels no runner has is simply never offered: it waits aside and blocks
//! nothing. Within a branch, jobs of commits already started go first (a pipeline's later jobs
//! finish what its first began), then the commit [`Backlog::next`] chooses.
//!
//! Pure: no clock, no I/O. Each decision costs `O(s + log r)` for `s` distinct label sets with
//! waiting jobs and `r` repositories with waiting jobs: the repositories are kept ordered by
//! (running, oldest wait) per label set, never scanned.

pub mod backlog;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

pub use backlog::{Backlog, Order, Verdict};

/// A job that may start: which commit of which branch it tests, and the labels it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    /// The job's key (`<repo>.<sha>.<run>.<job>`), unique among waiting jobs.
    pub key: String,
    pub repo: String,
    pub branch: String,
    /// Its commit's place in the branch's backlog, from [`Schedule::commit`].
    pub position: u64,
    /// Labels a runner must have (any order, duplicates ignored).
    pub labels: Vec<String>,
    /// When it became ready, as a counter or a time in any unit: smaller waited longer.
    pub since: u64,
}

/// A repository and one of its branches.
type Lane = (String, String);

/// One label set's waiting jobs.
#[derive(Debug, Default)]
struct Queue {
    /// Repositories with a job waiting here: (jobs running in it, its oldest wait here, name).
    repos: BTreeSet<(u32, u64, String)>,
    /// Each such repository's key in `repos`, and its branches with a job waiting here.
    repo: HashMap<String, RepoQueue>,
}

#[derive(Debug, Default)]
struct RepoQueue {
    key: (u32, u64),
    /// Branches with a job waiting: (jobs running on it, its oldest wait here, name).
    branches: BTreeSet<(u32, u64, String)>,
    /// Each branch's oldest wait (to find the repository's), with the branch's key in `branches`.
    oldest: BTreeSet<(u64, String)>,
    lanes: HashMap<String, LaneQueue>,
}

#[derive(Debug, Default)]
struct LaneQueue {
    key: (u32, u64),
    /// Waiting jobs by commit position, then key.
    jobs: BTreeMap<u64, BTreeSet<String>>,
    /// Waiting jobs by wait.
    since: BTreeSet<(u64, String)>,
}

/// The waiting jobs, the running counts and each branch's backlog. See the module doc.
#[derive(Debug, Default)]
pub struct Schedule {
    orders: HashMap<String, Order>,
    backlogs: HashMap<Lane, Backlog>,
    running_repo: HashMap<String, u32>,
    running_lane: HashMap<Lane, u32>,
    /// Queues by label set (sorted, deduplicated).
    queues: HashMap<Vec<String>, Queue>,
    /// The label sets each repository has a job waiting in (to re-key it when its count moves).
    repo_sets: HashMap<String, HashSet<Vec<String>>>,
    waiting: HashMap<String, Ready>,
}

/// What [`Schedule::pick`] chose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pick {
    pub key: String,
    pub repo: String,
    pub branch: String,
    pub position: u64,
}

impl Schedule {
    /// An empty schedule.
    pub fn new() -> Schedule {
        Schedule::default()
    }

    /// Sets a repository's order for the backlogs it starts from now on (its `.jetci.toml`).
    pub fn set_order(&mut self, repo: &str, order: Order) {
        self.orders.insert(repo.to_string(), order);
    }

    /// A new commit of `branch`, newer than every earlier one: its position in the branch's
    /// backlog. `base` is how the branch's last tested commit before it ended, used when this
    /// commit starts a new backlog (the previous one is done).
    pub fn commit(&mut self, repo: &str, branch: &str, base: Option<Verdict>) -> u64 {
        let order = self.orders.get(repo).copied().unwrap_or_default();
        let lane = (repo.to_string(), branch.to_string());
        let backlog = self
            .backlogs
            .entry(lane)
            .or_insert_with(|| Backlog::new(order, base));
        backlog.push()
    }

    /// The commit at `position` ended with `verdict` (`None`: without one, e.g. an `error`);
    /// returns the position of the branch's culprit when this result names it. A done backlog
    /// is dropped: the branch's next commit starts a new one on its tip.
    pub fn ended(
        &mut self,
        repo: &str,
        branch: &str,
        position: u64,
        verdict: Option<Verdict>,
    ) -> Option<u64> {
        let lane = (repo.to_string(), branch.to_string());
        let backlog = self.backlogs.get_mut(&lane)?;
        let culprit = match verdict {
            Some(v) => backlog.end(position, v),
            None => {
                backlog.forget(position);
                None
            }
        };
        let done = backlog.is_done().then(|| backlog.tip());
        if let Some(tip) = done.filter(|_| !self.has_waiting_lane(&lane)) {
            let order = self.orders.get(repo).copied().unwrap_or_default();
            self.backlogs.insert(lane, Backlog::new(order, tip));
            // Positions restart at 0: an old position must not be reused by a late call.
        }
        culprit
    }

    /// The commit at `position` was handed back before it ended (its run was lost).
    pub fn requeued(&mut self, repo: &str, branch: &str, position: u64) {
        let lane = (repo.to_string(), branch.to_string());
        if let Some(b) = self.backlogs.get_mut(&lane) {
            b.requeue(position);
        }
    }

    /// A job of `repo`'s `branch` started (`+1`) or ended (`-1`) on some runner, any
    /// dispatcher's.
    pub fn running(&mut self, repo: &str, branch: &str, delta: i32) {
        let lane = (repo.to_string(), branch.to_string());
        let r = self.running_repo.entry(repo.to_string()).or_default();
        *r = r.saturating_add_signed(delta);
        let r = *r;
        let b = self.running_lane.entry(lane.clone()).or_default();
        *b = b.saturating_add_signed(delta);
        let b = *b;
        if r == 0 {
            self.running_repo.remove(repo);
        }
        if b == 0 {
            self.running_lane.remove(&lane);
        }
        let sets: Vec<Vec<String>> = self
            .repo_sets
            .get(repo)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        for set in sets {
            self.rekey(&set, repo, branch);
        }
    }

    /// Jobs waiting.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// True when no job waits.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Adds a job that may start (a second add of the same key replaces the first).
    pub fn add(&mut self, mut job: Ready) {
        job.labels.sort();
        job.labels.dedup();
        self.remove(&job.key);
        let set = job.labels.clone();
        let queue = self.queues.entry(set.clone()).or_default();
        let rq = queue.repo.entry(job.repo.clone()).or_default();
        let lq = rq.lanes.entry(job.branch.clone()).or_default();
        lq.jobs
            .entry(job.position)
            .or_default()
            .insert(job.key.clone());
        lq.since.insert((job.since, job.key.clone()));
        self.repo_sets
            .entry(job.repo.clone())
            .or_default()
            .insert(set.clone());
        let (repo, branch) = (job.repo.clone(), job.branch.clone());
        self.waiting.insert(job.key.clone(), job);
        self.rekey(&set, &repo, &branch);
    }

    /// Removes a waiting job (taken, cancelled, or started by another dispatcher); returns it.
    pub fn remove(&mut self, key: &str) -> Option<Ready> {
        let job = self.waiting.remove(key)?;
        let set = job.labels.clone();
        if let Some(queue) = self.queues.get_mut(&set) {
            if let Some(rq) = queue.repo.get_mut(&job.repo) {
                if let Some(lq) = rq.lanes.get_mut(&job.branch) {
                    if let Some(keys) = lq.jobs.get_mut(&job.position) {
                        keys.remove(key);
                        if keys.is_empty() {
                            lq.jobs.remove(&job.position);
                        }
                    }
                    lq.since.remove(&(job.since, job.key.clone()));
                }
            }
        }
        self.rekey(&set, &job.repo, &job.branch);
        Some(job)
    }

    /// The job a free slot of a runner with `labels` should take, or `None` when it can take
    /// none of the waiting jobs. The job stays waiting until [`Schedule::take`] (the caller may
    /// fail to claim it).
    pub fn pick(&self, labels: &[String]) -> Option<Pick> {
        let (set, repo) = self
            .queues
            .iter()
            .filter(|(set, _)| set.iter().all(|l| labels.contains(l)))
            .filter_map(|(set, q)| q.repos.first().map(|r| (r, set)))
            .min()
            .map(|((_, _, repo), set)| (set, repo))?;
        let rq = &self.queues[set].repo[repo];
        let (_, _, branch) = rq.branches.first()?;
        let lq = &rq.lanes[branch];
        let lane = (repo.clone(), branch.clone());
        let backlog = self.backlogs.get(&lane);
        // Jobs of a commit already started go first (the oldest such commit): a pipeline's
        // later jobs finish what its first began.
        let started = backlog.and_then(|b| b.started().find(|at| lq.jobs.contains_key(at)));
        let position = started
            .or_else(|| backlog.and_then(|b| b.next(|at| lq.jobs.contains_key(&at))))
            .or_else(|| lq.jobs.keys().next().copied())?;
        let key = lq.jobs.get(&position)?.iter().next()?.clone();
        Some(Pick {
            key,
            repo: repo.clone(),
            branch: branch.clone(),
            position,
        })
    }

    /// The caller claimed `pick`'s job: it no longer waits, its commit is started (a started
    /// commit's other jobs go first), and it counts as running (until [`Schedule::running`]
    /// with `-1` when it ends).
    pub fn take(&mut self, pick: &Pick) {
        if self.remove(&pick.key).is_none() {
            return;
        }
        let lane = (pick.repo.clone(), pick.branch.clone());
        if let Some(b) = self.backlogs.get_mut(&lane) {
            b.start(pick.position);
        }
        self.running(&pick.repo, &pick.branch, 1);
    }

    fn has_waiting_lane(&self, lane: &Lane) -> bool {
        self.repo_sets.get(&lane.0).is_some_and(|sets| {
            sets.iter().any(|set| {
                self.queues[set]
                    .repo
                    .get(&lane.0)
                    .is_some_and(|rq| rq.lanes.get(&lane.1).is_some_and(|lq| !lq.jobs.is_empty()))
            })
        })
    }

    /// Puts `repo` (and `branch`) back in order in `set`'s queue after a count or a wait moved,
    /// dropping what no longer waits.
    fn rekey(&mut self, set: &[String], repo: &str, branch: &str) {
        let running_repo = self.running_repo.get(repo).copied().unwrap_or(0);
        let Some(queue) = self.queues.get_mut(set) else {
            return;
        };
        let Some(rq) = queue.repo.get_mut(repo) else {
            return;
        };
        let lane = (repo.to_string(), branch.to_string());
        let running_lane = self.running_lane.get(&lane).copied().unwrap_or(0);
        if let Some(lq) = rq.lanes.get_mut(branch) {
            rq.branches
                .remove(&(lq.key.0, lq.key.1, branch.to_string()));
            rq.oldest.remove(&(lq.key.1, branch.to_string()));
            match lq.since.first() {
                Some((since, _)) => {
                    lq.key = (running_lane, *since);
                    rq.branches.insert((lq.key.0, lq.key.1, branch.to_string()));
                    rq.oldest.insert((lq.key.1, branch.to_string()));
                }
                None => {
                    rq.lanes.remove(branch);
                }
            }
        }
        queue.repos.remove(&(rq.key.0, rq.key.1, repo.to_string()));
        match rq.oldest.first() {
            Some((since, _)) => {
                rq.key = (running_repo, *since);
                queue.repos.insert((rq.key.0, rq.key.1, repo.to_string()));
            }
            None => {
                queue.repo.remove(repo);
                if let Some(sets) = self.repo_sets.get_mut(repo) {
                    sets.remove(set);
                    if sets.is_empty() {
                        self.repo_sets.remove(repo);
                    }
                }
                if queue.repos.is_empty() {
                    self.queues.remove(set);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
