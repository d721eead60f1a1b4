//! A job's state and the transitions between its phases (DESIGN.md: `queued → assigned →
//! running → final`), as methods on [`JobState`]: every process that changes a job's state in
//! `ci-jobs` builds the new state here and writes it with [`super::store::write`]
//! (compare-and-set), so the rules of each transition live in one place.
//!
//! ```text
//!            assign                claim              finish
//!  queued ───────────▶ assigned ─────────▶ running ─────────▶ final
//!    ▲  ▲                 │                  │ renew (each heartbeat)
//!    │  └─── requeue ─────┴──────────────────┘ (lost runner, no free runner)
//!    └────── hand_back (the runner gives it back without a verdict)
//!  request_cancel: any phase but final; the runner (or, with none, a dispatcher) finishes it
//! ```
//!
//! The transitions are pure: they take the state as it was read (or as the dispatcher last knew
//! it) and return the state to write; `updated_at` is the only thing they read from the world.

use crate::messages::{now, CommitMsg, JobMsg, JobPhase, JobState, Status, VERSION};
use crate::subjects::JobRef;

impl JobState {
    /// The state of `job` of `commit`'s run before any dispatcher decided on it: `queued`,
    /// attempt 0, the labels the commit asks for.
    pub fn queued(commit: &CommitMsg, job: &JobRef) -> JobState {
        JobState {
            v: VERSION,
            repo: commit.repo.clone(),
            // Bookkeeping, not identity: a name too long to fit a state is clipped.
            branch: crate::limits::clip(&commit.branch, crate::limits::MAX_BRANCH_BYTES),
            sha: commit.sha.clone(),
            run: commit.run,
            job: job.job.clone(),
            phase: JobPhase::Queued,
            attempt: 0,
            runner: None,
            job_seq: None,
            labels: commit.labels.clone(),
            status: None,
            reason: None,
            cancel: None,
            updated_at: now(),
        }
    }

    /// Whether this state names `attempt` of `job` on `runner`: the test a runner applies before
    /// it writes anything, so a superseded attempt never overwrites a newer one.
    pub fn names_attempt(&self, job: &JobRef, attempt: u32, runner: &str) -> bool {
        self.repo == job.repo
            && self.sha == job.sha
            && self.run == job.run
            && self.job == job.job
            && self.attempt == attempt
            && self.runner.as_deref() == Some(runner)
    }

    /// A dispatcher gives `attempt` to `runner`: `assigned`, no job message yet (the runner
    /// records it when it claims), no reason.
    pub fn assign(mut self, runner: &str, attempt: u32) -> JobState {
        self.phase = JobPhase::Assigned;
        self.attempt = attempt;
        self.runner = Some(runner.to_string());
        self.job_seq = None;
        self.reason = None;
        self.status = None;
        self.touch()
    }

    /// The runner takes the job delivered at `job_seq` in `CI_JOBS`: `running`, with the job
    /// message's sequence so a dispatcher can delete it should the runner be lost.
    pub fn claim(mut self, job_seq: u64) -> JobState {
        self.phase = JobPhase::Running;
        self.job_seq = Some(job_seq);
        self.touch()
    }

    /// A heartbeat: the runner still runs it. The write's age is the dispatcher's measure of the
    /// runner's liveness (DESIGN.md, "Deadlines instead of pings").
    pub fn renew(mut self) -> JobState {
        self.phase = JobPhase::Running;
        self.touch()
    }

    /// Back to `queued` with `reason`, no runner: a dispatcher records why the job waits, and
    /// clears a lost attempt's runner so that runner, if it comes back, finds itself superseded.
    /// The attempt count stays: the next assignment is `attempt + 1`.
    pub fn requeue(mut self, reason: String) -> JobState {
        self.phase = JobPhase::Queued;
        self.runner = None;
        self.reason = Some(reason);
        self.status = None;
        self.touch()
    }

    /// The runner gives the job back without a verdict (its checkout failed, it shuts down):
    /// a [`requeue`](Self::requeue), so a dispatcher assigns the next attempt at its next beat
    /// instead of waiting out the lease.
    pub fn hand_back(self, reason: String) -> JobState {
        self.requeue(reason)
    }

    /// `jetci cancel` asks for the job to end (`who`: by whom, where, when). A runner sees it in
    /// its next heartbeat and stops the command; a job on no runner is finished by whoever sees
    /// the request (a dispatcher, or `jetci cancel` itself).
    pub fn request_cancel(mut self, who: String) -> JobState {
        self.cancel = Some(who);
        self.touch()
    }

    /// The job is over with `status` (and why): `final`. Written only once its run's result is
    /// stored in `CI_RESULTS` (DESIGN.md, I1: a result first, then the state).
    pub fn finish(mut self, status: Status, reason: Option<String>) -> JobState {
        self.phase = JobPhase::Final;
        self.status = Some(status);
        self.reason = reason;
        self.touch()
    }

    fn touch(mut self) -> JobState {
        self.updated_at = now();
        self
    }
}

impl JobMsg {
    /// The job message of `attempt` of `job` (of `commit`'s run, whose commit message is at
    /// `commit_seq` in `CI_COMMITS`) for `runner`.
    pub fn for_attempt(
        commit: &CommitMsg,
        commit_seq: u64,
        job: &JobRef,
        runner: &str,
        attempt: u32,
    ) -> JobMsg {
        JobMsg {
            v: VERSION,
            repo: commit.repo.clone(),
            url: commit.url.clone(),
            branch: commit.branch.clone(),
            sha: commit.sha.clone(),
            run: commit.run,
            job: job.job.clone(),
            job_name: job.job.as_deref().and_then(|t| commit.job_name(t)),
            attempt,
            runner: runner.to_string(),
            author: commit.author.clone(),
            summary: commit.summary.clone(),
            commit_seq,
            assigned_at: now(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn commit() -> CommitMsg {
        CommitMsg {
            v: VERSION,
            repo: "app".into(),
            url: "/srv/app".into(),
            branch: "main".into(),
            sha: "a".repeat(40),
            run: 1,
            labels: vec!["linux".into()],
            author: "A <a@x>".into(),
            summary: "fix".into(),
            published_at: now(),
            jobs: vec![],
            fail_fast: false,
        }
    }

    #[test]
    fn a_job_goes_from_queued_to_final_through_its_transitions() {
        let c = commit();
        let job = c.only_job();
        let queued = JobState::queued(&c, &job);
        assert_eq!((queued.phase, queued.attempt), (JobPhase::Queued, 0));
        assert_eq!(queued.labels, vec!["linux"]);
        assert_eq!(queued.job_ref(), job);

        let assigned = queued.assign("r1", 1);
        assert_eq!(assigned.phase, JobPhase::Assigned);
        assert!(assigned.names_attempt(&job, 1, "r1"));
        assert!(!assigned.names_attempt(&job, 2, "r1"));
        assert!(!assigned.names_attempt(&job, 1, "r2"));

        let running = assigned.claim(42);
        assert_eq!(
            (running.phase, running.job_seq),
            (JobPhase::Running, Some(42))
        );
        let renewed = running.clone().renew();
        assert!(renewed.updated_at >= running.updated_at);

        let done = renewed.finish(Status::Passed, None);
        assert_eq!(
            (done.phase, done.status),
            (JobPhase::Final, Some(Status::Passed))
        );
    }

    #[test]
    fn requeue_and_hand_back_clear_the_runner_and_keep_the_attempt() {
        let c = commit();
        let running = JobState::queued(&c, &c.only_job()).assign("r1", 2).claim(7);
        let back = running.clone().hand_back("checkout failed".into());
        assert_eq!(
            (back.phase, back.attempt, back.runner.as_deref()),
            (JobPhase::Queued, 2, None)
        );
        assert_eq!(back.reason.as_deref(), Some("checkout failed"));
        // The lost attempt's job message stays known, so it can be deleted.
        assert_eq!(back.job_seq, Some(7));
        let waiting = running.requeue("waiting for a free runner".into());
        assert_eq!(waiting.phase, JobPhase::Queued);
        // A new assignment forgets the old job message and the reason.
        let again = waiting.assign("r2", 3);
        assert_eq!((again.job_seq, again.reason), (None, None));
    }

    #[test]
    fn a_cancel_request_is_kept_through_to_the_final_state() {
        let c = commit();
        let state = JobState::queued(&c, &c.only_job())
            .assign("r1", 1)
            .request_cancel("by ann".into());
        assert_eq!(state.phase, JobPhase::Assigned);
        let done = state.finish(Status::Cancelled, Some("cancelled by ann".into()));
        assert_eq!(done.cancel.as_deref(), Some("by ann"));
        assert_eq!(done.status, Some(Status::Cancelled));
    }

    #[test]
    fn a_named_job_says_which_job_it_is_everywhere() {
        let c = commit();
        let job = JobRef {
            job: Some("lint".into()),
            ..c.only_job()
        };
        let state = JobState::queued(&c, &job);
        assert_eq!(state.job.as_deref(), Some("lint"));
        assert_eq!(state.job_ref().key(), format!("app.{}.1.lint", c.sha));
        let msg = JobMsg::for_attempt(&c, 9, &job, "r1", 2);
        assert_eq!(msg.attempt_id(), format!("app.{}.1.lint.2", c.sha));
        assert!(!state.assign("r1", 2).names_attempt(&c.only_job(), 2, "r1"));
        // The only job of a run keeps the names it always had.
        let only = JobMsg::for_attempt(&c, 9, &c.only_job(), "r1", 2);
        assert_eq!(only.attempt_id(), format!("app.{}.1.2", c.sha));
        assert_eq!(only.key(), c.key());
    }
}
