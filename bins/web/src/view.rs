//! The in-memory view jetci-web serves: the newest results of `CI_RESULTS`, the live jobs of
//! `ci-jobs` and the runners of `ci-runners`.
//!
//! It is rebuilt from the streams at every start (DESIGN.md: jetci-web owns no state), so it holds
//! nothing that is not in JetStream. It is bounded by count (`max_results`) and by bytes
//! (`max_bytes`, the text the results hold): over either bound, the oldest result (by stream
//! sequence) of the repository holding the most results (or bytes) is evicted, so a flood of
//! results for one repository, or for many new ones, evicts its own results first and every
//! other repository keeps its latest. A pipeline's job results are kept (and counted) like run
//! results, but only a commit's page shows them: branches, lists, badges and alerts take run
//! results alone ([`Stored::is_run_result`]). Jobs are kept only while
//! they are not final (a final job's verdict is its result), runners only while their presence
//! entry is fresh. Everything here is pure and synchronous; the follow tasks in `follow.rs` feed it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use jetci::messages::{JobPhase, JobState, ResultMsg, RunnerInfo, Status};
use time::OffsetDateTime;

/// At most this many unfinished jobs are kept (a bound against a flooded `ci-jobs`).
const MAX_JOBS: usize = 10_000;

/// One result as stored in `CI_RESULTS`.
#[derive(Debug)]
pub struct Stored {
    /// Its stream sequence.
    pub seq: u64,
    /// A fenced result of an attempt that lost its lease (`ci.superseded.…`): kept for the
    /// record, never the verdict.
    pub superseded: bool,
    pub result: ResultMsg,
}

impl Stored {
    /// A run's final result: the verdict of its run, what branches, badges, lists and alerts
    /// show. Not a superseded attempt's, nor one job's of a pipeline (its commit page shows it).
    pub fn is_run_result(&self) -> bool {
        !self.superseded && self.result.job.is_none()
    }
}

/// A job that is not final yet, from `ci-jobs`.
#[derive(Clone, Debug)]
pub struct Job {
    /// Its `ci-jobs` key, `<repo>.<sha>.<run>[.<job>]`.
    pub key: String,
    pub state: JobState,
    /// When the entry was last written (server time).
    pub written: OffsetDateTime,
}

/// A runner's presence entry, from `ci-runners`.
#[derive(Clone, Debug)]
pub struct Runner {
    pub info: RunnerInfo,
    /// When the entry was last written (server time): the runner's last heartbeat.
    pub written: OffsetDateTime,
}

/// The commits of one branch in history order: the key is the smallest `commit_seq` of the
/// commit's final results on that branch (the position at which the observer first published it).
#[derive(Default, Debug)]
struct Branch {
    order: BTreeSet<(u64, String)>,
    pos: HashMap<String, u64>,
}

/// A branch and its latest verdict.
#[derive(Debug)]
pub struct BranchSummary {
    pub name: String,
    /// The verdict of the branch's newest commit.
    pub latest: Arc<Stored>,
    pub commits: usize,
}

/// One commit of a branch with its verdict (its latest run's final result).
#[derive(Debug)]
pub struct CommitSummary {
    pub sha: String,
    pub verdict: Arc<Stored>,
    pub runs: usize,
}

/// Everything known about one commit.
#[derive(Debug, Default)]
pub struct CommitView {
    /// Final results of runs, newest run first.
    pub finals: Vec<Arc<Stored>>,
    /// Final results of a pipeline's jobs, by run then job token.
    pub job_results: Vec<Arc<Stored>>,
    /// Fenced results of superseded attempts, oldest first.
    pub superseded: Vec<Arc<Stored>>,
    /// Runs that are not final yet.
    pub jobs: Vec<Job>,
}

impl CommitView {
    pub fn is_empty(&self) -> bool {
        self.finals.is_empty()
            && self.job_results.is_empty()
            && self.superseded.is_empty()
            && self.jobs.is_empty()
    }
}

/// The byte bound of [`View::new`] (jetci-web's is `--max-results-mib`).
#[cfg(test)]
const DEFAULT_MAX_BYTES: usize = 256 * 1024 * 1024;

/// The bytes a result counts for against `max_bytes`: its text, plus a fixed part for the rest.
fn size_of(r: &ResultMsg) -> usize {
    let texts = [
        &r.repo,
        &r.url,
        &r.branch,
        &r.sha,
        &r.job_id,
        &r.runner,
        &r.output_tail,
        &r.log_subject,
        &r.author,
        &r.summary,
    ];
    256 + texts.iter().map(|t| t.len()).sum::<usize>() + r.reason.as_ref().map_or(0, String::len)
}

/// What one repository holds in the view: its results' sequences and their bytes.
#[derive(Debug, Default)]
struct Share {
    seqs: BTreeSet<u64>,
    bytes: usize,
}

/// The view; see the module comment.
#[derive(Debug)]
pub struct View {
    max_results: usize,
    max_bytes: usize,
    /// The bytes of every result kept ([`size_of`]).
    bytes: usize,
    results: BTreeMap<u64, Arc<Stored>>,
    /// repo → its results, and the repositories ordered by how many results and bytes they hold,
    /// to find the one to evict from in log time.
    shares: HashMap<String, Share>,
    by_count: BTreeSet<(usize, String)>,
    by_bytes: BTreeSet<(usize, String)>,
    /// `(repo, sha)` → stream sequences of its results (final and superseded).
    by_commit: HashMap<(String, String), BTreeSet<u64>>,
    /// repo → branch → commits.
    repos: BTreeMap<String, BTreeMap<String, Branch>>,
    jobs: BTreeMap<String, Job>,
    runners: BTreeMap<String, Runner>,
    /// The last stream sequence read from `CI_RESULTS`.
    pub last_seq: u64,
    /// True once everything stored at start has been read.
    pub caught_up: bool,
    /// Messages that did not decode and were skipped.
    pub skipped: u64,
}

impl View {
    /// An empty view keeping at most `max_results` results (at least 1) and
    /// [`DEFAULT_MAX_BYTES`].
    #[cfg(test)]
    pub fn new(max_results: usize) -> View {
        View::bounded(max_results, DEFAULT_MAX_BYTES)
    }

    /// An empty view keeping at most `max_results` results (at least 1) holding at most
    /// `max_bytes` of text (at least one result is kept, whatever its size).
    pub fn bounded(max_results: usize, max_bytes: usize) -> View {
        View {
            max_results: max_results.max(1),
            max_bytes,
            bytes: 0,
            results: BTreeMap::new(),
            shares: HashMap::new(),
            by_count: BTreeSet::new(),
            by_bytes: BTreeSet::new(),
            by_commit: HashMap::new(),
            repos: BTreeMap::new(),
            jobs: BTreeMap::new(),
            runners: BTreeMap::new(),
            last_seq: 0,
            caught_up: false,
            skipped: 0,
        }
    }

    /// Adds the result stored at `seq`; returns it, or `None` when `seq` was seen already.
    pub fn add_result(
        &mut self,
        seq: u64,
        superseded: bool,
        result: ResultMsg,
    ) -> Option<Arc<Stored>> {
        self.last_seq = self.last_seq.max(seq);
        if self.results.contains_key(&seq) {
            return None;
        }
        let size = size_of(&result);
        let stored = Arc::new(Stored {
            seq,
            superseded,
            result,
        });
        let r = &stored.result;
        self.results.insert(seq, stored.clone());
        self.bytes += size;
        self.reshare(&r.repo, |share| {
            share.seqs.insert(seq);
            share.bytes += size;
        });
        self.by_commit
            .entry((r.repo.clone(), r.sha.clone()))
            .or_default()
            .insert(seq);
        if stored.is_run_result() {
            self.reindex_branch(&r.repo.clone(), &r.branch.clone(), &r.sha.clone());
        }
        while self.results.len() > 1
            && (self.results.len() > self.max_results || self.bytes > self.max_bytes)
        {
            let over_count = self.results.len() > self.max_results;
            let largest = if over_count {
                self.by_count.last()
            } else {
                self.by_bytes.last()
            };
            let Some((_, repo)) = largest.cloned() else {
                break;
            };
            let oldest = self.shares.get(&repo).and_then(|s| s.seqs.first().copied());
            match oldest {
                Some(oldest) => self.evict(oldest),
                None => break,
            }
        }
        // The result itself may have been the one evicted.
        self.results.contains_key(&seq).then_some(stored)
    }

    /// Changes `repo`'s share with `change`, keeping the orders by count and bytes true.
    fn reshare(&mut self, repo: &str, change: impl FnOnce(&mut Share)) {
        let share = self.shares.entry(repo.to_string()).or_default();
        self.by_count.remove(&(share.seqs.len(), repo.to_string()));
        self.by_bytes.remove(&(share.bytes, repo.to_string()));
        change(share);
        if share.seqs.is_empty() {
            self.shares.remove(repo);
        } else {
            self.by_count.insert((share.seqs.len(), repo.to_string()));
            self.by_bytes.insert((share.bytes, repo.to_string()));
        }
    }

    fn evict(&mut self, seq: u64) {
        let Some(stored) = self.results.remove(&seq) else {
            return;
        };
        let r = &stored.result;
        let size = size_of(r);
        self.bytes -= size;
        self.reshare(&r.repo, |share| {
            share.seqs.remove(&seq);
            share.bytes -= size;
        });
        let key = (r.repo.clone(), r.sha.clone());
        if let Some(seqs) = self.by_commit.get_mut(&key) {
            seqs.remove(&seq);
            if seqs.is_empty() {
                self.by_commit.remove(&key);
            }
        }
        if stored.is_run_result() {
            self.reindex_branch(&r.repo, &r.branch, &r.sha);
        }
    }

    /// Puts `sha` at its place in `branch` of `repo` (or takes it out when no final result of it
    /// on that branch is left).
    fn reindex_branch(&mut self, repo: &str, branch: &str, sha: &str) {
        let place = self
            .by_commit
            .get(&(repo.to_string(), sha.to_string()))
            .into_iter()
            .flatten()
            .filter_map(|seq| self.results.get(seq))
            .filter(|s| s.is_run_result() && s.result.branch == branch)
            .map(|s| s.result.commit_seq)
            .min();
        let branches = self.repos.entry(repo.to_string()).or_default();
        let b = branches.entry(branch.to_string()).or_default();
        if let Some(old) = b.pos.remove(sha) {
            b.order.remove(&(old, sha.to_string()));
        }
        if let Some(place) = place {
            b.pos.insert(sha.to_string(), place);
            b.order.insert((place, sha.to_string()));
        }
        if b.order.is_empty() {
            branches.remove(branch);
            if branches.is_empty() {
                self.repos.remove(repo);
            }
        }
    }

    /// The number of results kept.
    pub fn len(&self) -> usize {
        self.results.len()
    }

    /// The verdict of a commit: the final result of its highest run.
    fn verdict(&self, repo: &str, sha: &str) -> Option<Arc<Stored>> {
        self.by_commit
            .get(&(repo.to_string(), sha.to_string()))?
            .iter()
            .filter_map(|seq| self.results.get(seq))
            .filter(|s| s.is_run_result())
            .max_by_key(|s| (s.result.run, s.seq))
            .cloned()
    }

    fn runs(&self, repo: &str, sha: &str) -> usize {
        self.by_commit
            .get(&(repo.to_string(), sha.to_string()))
            .into_iter()
            .flatten()
            .filter_map(|seq| self.results.get(seq))
            .filter(|s| s.is_run_result())
            .count()
    }

    /// Repository names, sorted.
    pub fn repo_names(&self) -> Vec<String> {
        self.repos.keys().cloned().collect()
    }

    /// The branches of `repo` with their latest verdict, sorted by name.
    pub fn branches(&self, repo: &str) -> Vec<BranchSummary> {
        let Some(branches) = self.repos.get(repo) else {
            return Vec::new();
        };
        branches
            .iter()
            .filter_map(|(name, b)| {
                let (_, sha) = b.order.last()?;
                Some(BranchSummary {
                    name: name.clone(),
                    latest: self.verdict(repo, sha)?,
                    commits: b.order.len(),
                })
            })
            .collect()
    }

    /// The commits of one branch, newest first, at most `limit`.
    pub fn branch_commits(&self, repo: &str, branch: &str, limit: usize) -> Vec<CommitSummary> {
        let Some(b) = self.repos.get(repo).and_then(|r| r.get(branch)) else {
            return Vec::new();
        };
        b.order
            .iter()
            .rev()
            .take(limit)
            .filter_map(|(_, sha)| {
                Some(CommitSummary {
                    sha: sha.clone(),
                    verdict: self.verdict(repo, sha)?,
                    runs: self.runs(repo, sha),
                })
            })
            .collect()
    }

    /// Final results of runs newest first (by arrival in the stream), optionally of one repository and
    /// branch, at most `limit`.
    pub fn recent(
        &self,
        repo: Option<&str>,
        branch: Option<&str>,
        limit: usize,
    ) -> Vec<Arc<Stored>> {
        self.results
            .values()
            .rev()
            .filter(|s| s.is_run_result())
            .filter(|s| repo.is_none_or(|r| s.result.repo == r))
            .filter(|s| branch.is_none_or(|b| s.result.branch == b))
            .take(limit)
            .cloned()
            .collect()
    }

    /// Everything known about one commit.
    pub fn commit(&self, repo: &str, sha: &str) -> CommitView {
        let mut view = CommitView::default();
        for s in self
            .by_commit
            .get(&(repo.to_string(), sha.to_string()))
            .into_iter()
            .flatten()
            .filter_map(|seq| self.results.get(seq))
        {
            if s.superseded {
                view.superseded.push(s.clone());
            } else if s.result.job.is_some() {
                view.job_results.push(s.clone());
            } else {
                view.finals.push(s.clone());
            }
        }
        view.finals
            .sort_by_key(|s| std::cmp::Reverse((s.result.run, s.seq)));
        view.job_results
            .sort_by(|a, b| (a.result.run, &a.result.job).cmp(&(b.result.run, &b.result.job)));
        view.jobs = self
            .jobs
            .values()
            .filter(|j| j.state.repo == repo && j.state.sha == sha)
            .cloned()
            .collect();
        view
    }

    /// The verdict of the newest commit (by history) of `branch` in `repo`: the branch's state.
    pub fn branch_head(&self, repo: &str, branch: &str) -> Option<Arc<Stored>> {
        let (_, sha) = self.repos.get(repo)?.get(branch)?.order.last()?;
        self.verdict(repo, sha)
    }

    /// Every branch of every repository with the verdict of its newest commit.
    pub fn heads(&self) -> Vec<Arc<Stored>> {
        self.repos
            .iter()
            .flat_map(|(repo, branches)| {
                branches
                    .keys()
                    .filter_map(move |branch| self.branch_head(repo, branch))
            })
            .collect()
    }

    /// The status a badge shows: the verdict of `branch`'s newest commit; without a branch, that
    /// of `main`, else `master`, else the repository's newest final result.
    pub fn badge_status(&self, repo: &str, branch: Option<&str>) -> Option<Status> {
        let latest = |b: &str| {
            let (_, sha) = self.repos.get(repo)?.get(b)?.order.last()?;
            self.verdict(repo, sha).map(|s| s.result.status)
        };
        match branch {
            Some(b) => latest(b),
            None => latest("main").or_else(|| latest("master")).or_else(|| {
                self.recent(Some(repo), None, 1)
                    .first()
                    .map(|s| s.result.status)
            }),
        }
    }

    /// Records a `ci-jobs` entry (`None`: deleted). Returns true when the view changed.
    pub fn set_job(&mut self, key: &str, state: Option<JobState>, written: OffsetDateTime) -> bool {
        match state {
            Some(state) if state.phase != JobPhase::Final => {
                if self.jobs.len() >= MAX_JOBS && !self.jobs.contains_key(key) {
                    return false;
                }
                self.jobs.insert(
                    key.to_string(),
                    Job {
                        key: key.to_string(),
                        state,
                        written,
                    },
                );
                true
            }
            _ => self.jobs.remove(key).is_some(),
        }
    }

    /// Records a `ci-runners` entry (`None`: deleted).
    pub fn set_runner(&mut self, key: &str, info: Option<RunnerInfo>, written: OffsetDateTime) {
        match info {
            Some(info) => {
                self.runners
                    .insert(key.to_string(), Runner { info, written });
            }
            None => {
                self.runners.remove(key);
            }
        }
    }

    /// Runners whose presence entry is younger than `max_age` at `now`, by id; older ones are
    /// dropped (their entry expired in the bucket, which a watch does not report).
    pub fn runners(&mut self, now: OffsetDateTime, max_age: Duration) -> Vec<Runner> {
        self.runners.retain(|_, r| age(now, r.written) <= max_age);
        self.runners.values().cloned().collect()
    }

    /// Jobs that are not final, oldest write first; only `queued` ones when `queued_only`.
    pub fn jobs(&self, queued_only: bool) -> Vec<Job> {
        let mut jobs: Vec<Job> = self
            .jobs
            .values()
            .filter(|j| !queued_only || j.state.phase == JobPhase::Queued)
            .cloned()
            .collect();
        jobs.sort_by_key(|j| j.written);
        jobs
    }
}

/// `now - then`, never negative.
pub fn age(now: OffsetDateTime, then: OffsetDateTime) -> Duration {
    (now - then).try_into().unwrap_or(Duration::ZERO)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use jetci::messages::VERSION;

    pub fn result(
        repo: &str,
        branch: &str,
        sha_byte: u8,
        run: u32,
        commit_seq: u64,
        status: Status,
    ) -> ResultMsg {
        let sha = format!("{:02x}", sha_byte).repeat(20);
        ResultMsg {
            v: VERSION,
            repo: repo.into(),
            url: "/srv/x".into(),
            branch: branch.into(),
            sha: sha.clone(),
            run,
            job_id: format!("{repo}.{sha}.{run}.1"),
            attempt: 1,
            runner: "r1".into(),
            status,
            exit_code: Some(0),
            signal: None,
            reason: None,
            started_at: OffsetDateTime::UNIX_EPOCH,
            finished_at: OffsetDateTime::UNIX_EPOCH,
            duration_ms: 1200,
            output_tail: "OK".into(),
            log_subject: format!("ci.logs.{repo}.{sha}.{run}.1"),
            log_bytes: 2,
            commit_seq,
            author: "A <a@x>".into(),
            summary: "s".into(),
            tests: None,
            job: None,
            job_name: None,
            jobs: vec![],
            fail_fast: false,
        }
    }

    #[test]
    fn branches_show_the_newest_commit_by_history_not_arrival() {
        let mut v = View::new(100);
        // Commit 2 (newer in history) finishes before commit 1.
        v.add_result(1, false, result("app", "main", 2, 1, 20, Status::Failed));
        v.add_result(2, false, result("app", "main", 1, 1, 10, Status::Passed));
        v.add_result(3, false, result("app", "feat/x", 3, 1, 30, Status::Passed));
        let b = v.branches("app");
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].name, "feat/x");
        assert_eq!(b[1].name, "main");
        assert_eq!(b[1].latest.result.status, Status::Failed);
        let commits = v.branch_commits("app", "main", 10);
        assert_eq!(commits.len(), 2);
        assert_eq!(commits[0].sha, "02".repeat(20));
        assert_eq!(v.badge_status("app", None), Some(Status::Failed));
        assert_eq!(v.badge_status("app", Some("feat/x")), Some(Status::Passed));
        assert_eq!(v.badge_status("app", Some("nope")), None);
        assert_eq!(v.badge_status("other", None), None);
        // Newest arrival first.
        let recent = v.recent(None, None, 10);
        assert_eq!(recent.iter().map(|s| s.seq).collect::<Vec<_>>(), [3, 2, 1]);
        assert_eq!(v.recent(Some("app"), Some("main"), 1)[0].seq, 2);
    }

    #[test]
    fn a_rerun_is_the_verdict_and_superseded_results_are_not() {
        let mut v = View::new(100);
        v.add_result(1, true, result("app", "main", 1, 1, 10, Status::Error));
        v.add_result(2, false, result("app", "main", 1, 1, 10, Status::Failed));
        v.add_result(3, false, result("app", "main", 1, 2, 40, Status::Passed));
        assert!(v
            .add_result(3, false, result("app", "main", 1, 2, 40, Status::Passed))
            .is_none());
        let c = v.commit("app", &"01".repeat(20));
        assert_eq!(c.finals.len(), 2);
        assert_eq!(c.finals[0].result.run, 2);
        assert_eq!(c.superseded.len(), 1);
        assert_eq!(v.badge_status("app", Some("main")), Some(Status::Passed));
        assert_eq!(v.branch_commits("app", "main", 10)[0].runs, 2);
    }

    #[test]
    fn the_repository_holding_the_most_loses_its_oldest_result() {
        let mut v = View::new(2);
        v.add_result(1, false, result("a", "main", 1, 1, 1, Status::Passed));
        v.add_result(2, false, result("b", "main", 2, 1, 2, Status::Passed));
        v.add_result(3, false, result("b", "dev", 3, 1, 3, Status::Failed));
        assert_eq!(v.len(), 2);
        assert_eq!(v.repo_names(), ["a", "b"]);
        assert!(v.commit("b", &"02".repeat(20)).is_empty());
        assert_eq!(v.branch_head("a", "main").unwrap().seq, 1);
        assert_eq!(v.last_seq, 3);
    }

    #[test]
    fn a_flood_of_results_evicts_its_own_and_every_repository_keeps_its_latest() {
        let mut v = View::new(10);
        v.add_result(1, false, result("app", "main", 1, 1, 1, Status::Passed));
        // 1,000 junk results in one repository, then one each in 1,000 new repositories.
        for seq in 2..1002 {
            v.add_result(seq, false, result("junk", "x", 5, 1, seq, Status::Failed));
        }
        assert_eq!(v.branch_head("app", "main").unwrap().seq, 1);
        for seq in 1002..2002 {
            let repo = format!("junk{seq}");
            v.add_result(seq, false, result(&repo, "x", 5, 1, seq, Status::Failed));
        }
        assert_eq!(v.len(), 10);
        assert_eq!(v.branch_head("app", "main").unwrap().seq, 1);
    }

    #[test]
    fn the_view_is_bounded_by_bytes_too() {
        let mut v = View::bounded(1000, 100_000);
        let big = |seq: u64, repo: &str| {
            let mut r = result(repo, "main", seq as u8, 1, seq, Status::Passed);
            r.output_tail = "x".repeat(30_000);
            r
        };
        v.add_result(1, false, result("app", "main", 1, 1, 1, Status::Passed));
        for seq in 2..20 {
            v.add_result(seq, false, big(seq, "huge"));
        }
        assert!(v.bytes <= 100_000, "{}", v.bytes);
        assert_eq!(v.len(), 4, "app's one and three of 30 kB");
        assert_eq!(v.branch_head("app", "main").unwrap().seq, 1);
        // One result larger than the bound is still kept, alone.
        let mut v = View::bounded(1000, 1_000);
        assert!(v.add_result(1, false, big(1, "huge")).is_some());
        assert_eq!(v.len(), 1);
    }

    #[test]
    fn a_pipelines_job_results_show_on_its_commit_only() {
        let mut v = View::new(100);
        let mut lint = result("app", "main", 1, 1, 10, Status::Failed);
        lint.job = Some("lint".into());
        v.add_result(1, false, lint);
        // Only a job's result so far: the commit has it, branches and lists do not.
        assert!(v.branches("app").is_empty());
        assert!(v.recent(None, None, 10).is_empty());
        assert_eq!(v.badge_status("app", None), None);
        let c = v.commit("app", &"01".repeat(20));
        assert_eq!((c.finals.len(), c.job_results.len()), (0, 1));
        assert!(!c.is_empty());
        // The run's result is the branch's verdict.
        v.add_result(2, false, result("app", "main", 1, 1, 10, Status::Passed));
        assert_eq!(v.badge_status("app", None), Some(Status::Passed));
        assert_eq!(v.recent(None, None, 10).len(), 1);
        assert_eq!(v.branch_commits("app", "main", 10)[0].runs, 1);
    }

    #[test]
    fn jobs_and_runners() {
        let mut v = View::new(10);
        let r = result("app", "main", 1, 1, 1, Status::Passed);
        let mut state = JobState {
            v: VERSION,
            job: None,
            repo: "app".into(),
            branch: "main".into(),
            sha: r.sha.clone(),
            run: 1,
            phase: JobPhase::Queued,
            attempt: 0,
            runner: None,
            job_seq: None,
            labels: vec!["gpu".into()],
            status: None,
            reason: Some("no runner with labels gpu".into()),
            cancel: None,
            updated_at: OffsetDateTime::UNIX_EPOCH,
        };
        let now = OffsetDateTime::now_utc();
        assert!(v.set_job("k", Some(state.clone()), now));
        assert_eq!(v.jobs(true).len(), 1);
        state.phase = JobPhase::Running;
        v.set_job("k", Some(state.clone()), now);
        assert_eq!(v.jobs(true).len(), 0);
        assert_eq!(v.jobs(false).len(), 1);
        assert_eq!(v.commit("app", &r.sha).jobs.len(), 1);
        state.phase = JobPhase::Final;
        assert!(v.set_job("k", Some(state), now));
        assert!(v.jobs(false).is_empty());

        let info = RunnerInfo {
            v: VERSION,
            id: "r1".into(),
            host: "h".into(),
            labels: vec![],
            capacity: 1,
            jobs: vec![],
            accepting: true,
            started_at: now,
            updated_at: now,
            warnings: Vec::new(),
        };
        v.set_runner("r1", Some(info.clone()), now - Duration::from_secs(120));
        v.set_runner(
            "r2",
            Some(RunnerInfo {
                id: "r2".into(),
                ..info
            }),
            now,
        );
        let live = v.runners(now, Duration::from_secs(60));
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].info.id, "r2");
        v.set_runner("r2", None, now);
        assert!(v.runners(now, Duration::from_secs(60)).is_empty());
    }
}
