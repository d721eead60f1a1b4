//! A pipeline run as its jobs end: which job may start, which is skipped, what `fail_fast`
//! cancels, and the run's verdict. Pure; the dispatcher's core drives it
//! ([`crate::dispatcher::core`]).
//!
//! Rules (the "Dispatch" and "Results"):
//! - a job starts once every job it needs ended `passed`; if one ended otherwise (an allowed
//!   failure too), it ends `skipped` without running, and so do the jobs that need it;
//! - with `fail_fast`, the first job that fails without `allow_failure` stops the run: jobs not
//!   started end `skipped`, started ones are cancelled; a job that ends `cancelled` (a user
//!   cancelled that one job, `jetci cancel --job`) does not stop the run: only the jobs that
//!   need it are skipped;
//! - a user cancelling the run ([`Progress::cancel`]) stops it the same way: jobs not started
//!   end `skipped`, started ones are cancelled, and no job starts afterwards;
//! - the run is `passed` when every job passed, failed with `allow_failure`, or was skipped;
//!   otherwise it takes the worst status among the others (`error` > `timed_out` > `failed` >
//!   `cancelled`); a run a user cancelled is at least `cancelled`.

use crate::messages::{CommitMsg, JobPlan, JobSummary, ResultMsg, Status, TestCounts};
use crate::subjects::Names;

/// How one job ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub status: Status,
    /// The runner of its verdict; empty when none.
    pub runner: String,
    pub attempt: u32,
    pub duration_ms: u64,
    pub tests: Option<TestCounts>,
    pub reason: Option<String>,
    /// The earlier run it was carried over from (`jetci rerun --failed`).
    pub carried_from: Option<u32>,
}

impl Outcome {
    /// A job that did not run, for `reason`.
    pub fn skipped(reason: String) -> Outcome {
        Outcome {
            status: Status::Skipped,
            runner: String::new(),
            attempt: 0,
            duration_ms: 0,
            tests: None,
            reason: Some(reason),
            carried_from: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Place {
    /// Not started: its needs have not all ended.
    Pending,
    Started,
    Done(Outcome),
}

/// The run's verdict once every job ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    pub status: Status,
    /// Why, for a run that did not pass: the first job (in plan order) with the run's status.
    pub reason: Option<String>,
    pub jobs: Vec<JobSummary>,
}

impl Verdict {
    /// The run's result on `ci.results.<repo>.<sha>.<run>` for this verdict: no runner, no log
    /// (each job has its own), the jobs listed in `jobs`, one line per job in `output_tail`
    /// (within 16 KiB), test counts summed. `commit_seq` is the commit message's sequence in
    /// `CI_COMMITS` (0 when unknown), `duration_ms` the run's length in milliseconds.
    pub fn result(
        self,
        names: &Names,
        commit: &CommitMsg,
        commit_seq: u64,
        duration_ms: u64,
    ) -> ResultMsg {
        let mut result = ResultMsg::without_run(
            names,
            commit,
            &commit.only_job(),
            commit_seq,
            1,
            self.status,
            String::new(),
        );
        result.job_id = commit.key();
        result.log_subject = String::new();
        result.reason = self.reason;
        result.duration_ms = duration_ms;
        let mut tail = String::new();
        for j in &self.jobs {
            let line = format!("{}: {}\n", j.name, j.status);
            if tail.len() + line.len() > 16 * 1024 {
                tail.push_str("...\n");
                break;
            }
            tail.push_str(&line);
        }
        result.output_tail = tail;
        result.tests = sum_counts(self.jobs.iter().filter_map(|j| j.tests.as_ref()));
        result.jobs = self.jobs;
        result.fail_fast = commit.fail_fast;
        result
    }
}

/// The sum of jobs' test counts (failing test names are in each job's own result); `None` when
/// no job counted tests.
fn sum_counts<'a>(counts: impl Iterator<Item = &'a TestCounts>) -> Option<TestCounts> {
    counts.fold(None, |sum, c| {
        let mut sum = sum.unwrap_or_default();
        sum.tests += c.tests;
        sum.passed += c.passed;
        sum.failed += c.failed;
        sum.skipped += c.skipped;
        Some(sum)
    })
}

/// One pipeline run's jobs and where each is.
#[derive(Clone, Debug)]
pub struct Progress {
    jobs: Vec<(JobPlan, Place)>,
    fail_fast: bool,
    /// Set once `fail_fast` or a user's cancel stopped the run: why.
    stopped: Option<String>,
    /// Set once a user cancelled the run: by whom (`by ann on host-1 at <time>`).
    cancelled: Option<String>,
}

impl Progress {
    /// A run of `jobs` (as in the commit message), none started but those carried over from an
    /// earlier run, which count as ended with their result.
    pub fn new(jobs: &[JobPlan], fail_fast: bool) -> Progress {
        let place = |j: &JobPlan| match &j.carried {
            Some(c) => Place::Done(Outcome {
                status: c.status,
                runner: c.runner.clone(),
                attempt: c.attempt,
                duration_ms: c.duration_ms,
                tests: c.tests.clone(),
                reason: c.reason.clone(),
                carried_from: c.carried_from,
            }),
            None => Place::Pending,
        };
        Progress {
            jobs: jobs.iter().map(|j| (j.clone(), place(j))).collect(),
            fail_fast,
            stopped: None,
            cancelled: None,
        }
    }

    /// The jobs that may start now, marked started; jobs that will never run (a need did not
    /// pass, or `fail_fast` stopped the run) end `skipped` on the way.
    pub fn ready(&mut self) -> Vec<JobPlan> {
        let mut start = vec![];
        loop {
            let mut changed = false;
            for i in 0..self.jobs.len() {
                if self.jobs[i].1 != Place::Pending {
                    continue;
                }
                let decided = match (&self.stopped, self.blocked_by(i)) {
                    (Some(why), _) => Some(Place::Done(Outcome::skipped(why.clone()))),
                    (None, Needs::Failed(need)) => Some(Place::Done(Outcome::skipped(format!(
                        "{need} did not pass"
                    )))),
                    (None, Needs::Passed) => {
                        start.push(self.jobs[i].0.clone());
                        Some(Place::Started)
                    }
                    (None, Needs::Waiting) => None,
                };
                if let Some(place) = decided {
                    self.jobs[i].1 = place;
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        // Nothing runs or may start, yet jobs wait: their needs can never end (a cycle, or a need
        // that is no job, in a message published by hand). They end `error` instead of holding
        // the run forever.
        let running = self.jobs.iter().any(|(_, p)| *p == Place::Started);
        if start.is_empty() && !running {
            for (_, place) in self.jobs.iter_mut().filter(|(_, p)| *p == Place::Pending) {
                *place = Place::Done(Outcome {
                    status: Status::Error,
                    ..Outcome::skipped("its needs can never pass (a cycle in `needs`)".into())
                });
            }
        }
        start
    }

    /// Records that job `token` ended with `outcome`. Returns the jobs to cancel: every started
    /// job still running, when this was the first failure of a `fail_fast` run. A token not of
    /// this run, or recorded before, changes nothing.
    pub fn finish(&mut self, token: &str, outcome: Outcome) -> Vec<JobPlan> {
        let Some(i) = self.jobs.iter().position(|(j, _)| j.job == token) else {
            return vec![];
        };
        if matches!(self.jobs[i].1, Place::Done(_)) {
            return vec![];
        }
        // A job cancelled on its own (`jetci cancel --job`) is not a failure that stops the run;
        // the jobs that need it are skipped all the same.
        let fails = !matches!(
            outcome.status,
            Status::Passed | Status::Skipped | Status::Cancelled
        ) && !self.jobs[i].0.allow_failure;
        self.jobs[i].1 = Place::Done(outcome);
        if !(fails && self.fail_fast && self.stopped.is_none()) {
            return vec![];
        }
        let name = &self.jobs[i].0.name;
        self.stopped = Some(format!("fail_fast: {name} did not pass"));
        self.jobs
            .iter()
            .filter(|(_, p)| *p == Place::Started)
            .map(|(j, _)| j.clone())
            .collect()
    }

    /// A user cancelled the run (`who`: by whom, where, when). Returns the started jobs to
    /// cancel; from now on no job starts, and the jobs not started end `skipped` at the next
    /// [`Progress::ready`]. A run whose jobs have all ended, or cancelled before, changes nothing.
    pub fn cancel(&mut self, who: &str) -> Vec<JobPlan> {
        if self.cancelled.is_some() || self.is_done() {
            return vec![];
        }
        self.cancelled = Some(who.to_string());
        if self.stopped.is_none() {
            self.stopped = Some(format!("the run was cancelled {who}"));
        }
        self.jobs
            .iter()
            .filter(|(_, p)| *p == Place::Started)
            .map(|(j, _)| j.clone())
            .collect()
    }

    /// Marks job `token` started although its needs have not all passed, and returns its plan:
    /// a job some dispatcher started before (found with a live state when a run is taken
    /// again), or one a user asked to cancel before it started (it then ends `cancelled`
    /// through its own state, with a result of its own, as any job on no runner does).
    /// `None` when the job is not of this run or not waiting to start.
    pub fn force_start(&mut self, token: &str) -> Option<JobPlan> {
        let (plan, place) = self.jobs.iter_mut().find(|(j, _)| j.job == token)?;
        if *place != Place::Pending {
            return None;
        }
        *place = Place::Started;
        Some(plan.clone())
    }

    /// How job `token` ended, once it did.
    pub fn ended(&self, token: &str) -> Option<&Outcome> {
        self.jobs.iter().find_map(|(j, p)| match p {
            Place::Done(o) if j.job == token => Some(o),
            _ => None,
        })
    }

    /// Whether job `token` is of this run and waits to start.
    pub fn is_pending(&self, token: &str) -> bool {
        self.jobs
            .iter()
            .any(|(j, p)| j.job == token && *p == Place::Pending)
    }

    /// Whether job `token` is of this run and has not ended.
    pub fn is_running(&self, token: &str) -> bool {
        self.jobs
            .iter()
            .any(|(j, p)| j.job == token && *p == Place::Started)
    }

    /// Why `fail_fast` or a user's cancel stopped the run, once one did.
    pub fn stopped(&self) -> Option<&str> {
        self.stopped.as_deref()
    }

    /// Who cancelled the run, once a user did ([`Progress::cancel`]).
    pub fn cancelled(&self) -> Option<&str> {
        self.cancelled.as_deref()
    }

    /// Whether every job has ended.
    pub fn is_done(&self) -> bool {
        self.jobs.iter().all(|(_, p)| matches!(p, Place::Done(_)))
    }

    /// The verdict, once every job has ended ([`Progress::is_done`]); `None` before.
    pub fn verdict(&self) -> Option<Verdict> {
        let mut jobs = Vec::with_capacity(self.jobs.len());
        let mut worst: Option<(u8, Status, Option<String>)> = None;
        let mut unran: Option<String> = None;
        for (plan, place) in &self.jobs {
            let Place::Done(o) = place else {
                return None;
            };
            let counts = o.tests.clone().map(|t| TestCounts {
                failures: vec![],
                ..t
            });
            let allowed = plan.allow_failure && o.status != Status::Passed;
            // A job skipped because a need did not pass did not run: the run does not pass for
            // it (unless it may fail), though its status comes from the job that did not pass.
            if o.status == Status::Skipped && !plan.allow_failure && unran.is_none() {
                let why = o.reason.as_deref().unwrap_or("skipped");
                unran = Some(format!("{}: skipped ({why})", plan.name));
            }
            let rank = match o.status {
                _ if allowed => 0,
                Status::Passed | Status::Skipped => 0,
                Status::Cancelled => 1,
                Status::Failed => 2,
                Status::TimedOut => 3,
                Status::Error => 4,
            };
            if rank > worst.as_ref().map_or(0, |w| w.0) {
                let why = match &o.reason {
                    Some(r) => format!("{}: {} ({r})", plan.name, o.status),
                    None => format!("{}: {}", plan.name, o.status),
                };
                worst = Some((rank, o.status, Some(why)));
            }
            jobs.push(JobSummary {
                name: plan.name.clone(),
                job: plan.job.clone(),
                needs: plan.needs.clone(),
                labels: plan.labels.clone(),
                status: o.status,
                runner: o.runner.clone(),
                attempt: o.attempt,
                duration_ms: o.duration_ms,
                tests: counts,
                allow_failure: plan.allow_failure,
                reason: o.reason.as_ref().map(|r| r.chars().take(300).collect()),
                carried_from: o.carried_from,
            });
        }
        let (status, reason) = match (worst, unran, &self.cancelled) {
            // A cancelled run is at least `cancelled`, whatever did not run for it.
            (Some((rank, status, reason)), _, Some(_)) if rank >= 1 => (status, reason),
            (_, _, Some(who)) => (Status::Cancelled, Some(format!("cancelled {who}"))),
            (Some((_, status, reason)), _, None) => (status, reason),
            // Only allowed failures, but a job that needed one never ran.
            (None, Some(why), None) => (Status::Failed, Some(why)),
            (None, None, None) => (Status::Passed, None),
        };
        Some(Verdict {
            status,
            reason,
            jobs,
        })
    }

    /// Whether job `i`'s needs all passed, one did not, or some have not ended.
    fn blocked_by(&self, i: usize) -> Needs {
        let mut waiting = false;
        for need in &self.jobs[i].0.needs {
            match self.jobs.iter().find(|(j, _)| &j.job == need) {
                Some((_, Place::Done(o))) if o.status == Status::Passed => {}
                Some((j, Place::Done(_))) => return Needs::Failed(j.name.clone()),
                Some(_) => waiting = true,
                // A need that is not a job of the run (the message checks forbid it): ignored.
                None => {}
            }
        }
        if waiting {
            Needs::Waiting
        } else {
            Needs::Passed
        }
    }
}

enum Needs {
    Passed,
    Failed(String),
    Waiting,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(token: &str, needs: &[&str]) -> JobPlan {
        JobPlan {
            name: token.to_string(),
            job: token.to_string(),
            needs: needs.iter().map(|n| n.to_string()).collect(),
            labels: vec![],
            allow_failure: false,
            carried: None,
        }
    }

    fn ended(status: Status) -> Outcome {
        Outcome {
            status,
            runner: "r1".into(),
            attempt: 1,
            duration_ms: 5,
            tests: None,
            reason: None,
            carried_from: None,
        }
    }

    fn tokens(jobs: Vec<JobPlan>) -> Vec<String> {
        jobs.into_iter().map(|j| j.job).collect()
    }

    #[test]
    fn jobs_start_as_their_needs_pass() {
        let mut p = Progress::new(
            &[job("lint", &[]), job("test", &["lint"]), job("build", &[])],
            false,
        );
        assert_eq!(tokens(p.ready()), ["lint", "build"]);
        assert!(p.ready().is_empty(), "started jobs do not start again");
        assert!(p.finish("lint", ended(Status::Passed)).is_empty());
        assert_eq!(tokens(p.ready()), ["test"]);
        p.finish("build", ended(Status::Passed));
        assert!(!p.is_done() && p.verdict().is_none());
        p.finish("test", ended(Status::Passed));
        let v = p.verdict().unwrap();
        assert_eq!(v.status, Status::Passed);
        assert_eq!(v.jobs.len(), 3);
        assert_eq!(v.jobs[1].needs, ["lint"]);
    }

    #[test]
    fn a_failed_need_skips_its_dependents_and_theirs() {
        let mut p = Progress::new(
            &[
                job("lint", &[]),
                job("test", &["lint"]),
                job("docs", &["test"]),
                job("build", &[]),
            ],
            false,
        );
        p.ready();
        p.finish("lint", ended(Status::Failed));
        assert!(p.ready().is_empty());
        p.finish("build", ended(Status::Passed));
        let v = p.verdict().unwrap();
        assert_eq!(v.status, Status::Failed);
        assert_eq!(v.reason.as_deref(), Some("lint: failed"));
        let statuses: Vec<Status> = v.jobs.iter().map(|j| j.status).collect();
        assert_eq!(
            statuses,
            [
                Status::Failed,
                Status::Skipped,
                Status::Skipped,
                Status::Passed
            ]
        );
        assert_eq!(v.jobs[1].reason.as_deref(), Some("lint did not pass"));
    }

    #[test]
    fn fail_fast_cancels_what_runs_and_skips_what_waits() {
        let mut p = Progress::new(&[job("a", &[]), job("b", &[]), job("c", &["b"])], true);
        assert_eq!(tokens(p.ready()), ["a", "b"]);
        assert_eq!(tokens(p.finish("a", ended(Status::Failed))), ["b"]);
        assert!(p.stopped().is_some());
        assert!(
            p.finish("x", ended(Status::Failed)).is_empty(),
            "not a job of the run"
        );
        p.finish("b", ended(Status::Cancelled));
        assert!(p.ready().is_empty());
        let v = p.verdict().unwrap();
        assert_eq!(v.status, Status::Failed);
        assert_eq!(v.jobs[2].status, Status::Skipped);
        assert!(v.jobs[2].reason.as_deref().unwrap().contains("fail_fast"));
    }

    #[test]
    fn allowed_failures_show_but_do_not_fail_the_run() {
        let mut docs = job("docs", &[]);
        docs.allow_failure = true;
        let mut p = Progress::new(&[docs, job("test", &[])], true);
        p.ready();
        assert!(
            p.finish("docs", ended(Status::Failed)).is_empty(),
            "no fail_fast for it"
        );
        p.finish("test", ended(Status::Passed));
        let v = p.verdict().unwrap();
        assert_eq!(v.status, Status::Passed);
        assert!(v.jobs[0].allow_failure);
        assert_eq!(v.jobs[0].status, Status::Failed);
        assert!(!v.jobs[1].allow_failure);
    }

    #[test]
    fn the_worst_status_wins() {
        let mut p = Progress::new(&[job("a", &[]), job("b", &[]), job("c", &[])], false);
        p.ready();
        p.finish("a", ended(Status::Cancelled));
        p.finish("b", ended(Status::TimedOut));
        p.finish("c", ended(Status::Failed));
        assert_eq!(p.verdict().unwrap().status, Status::TimedOut);
        assert!(p.finish("a", ended(Status::Passed)).is_empty());
        assert_eq!(
            p.verdict().unwrap().jobs[0].status,
            Status::Cancelled,
            "first end counts"
        );
    }

    #[test]
    fn carried_results_stand_and_their_dependents_start_at_once() {
        let mut p = Progress::new(&[job("lint", &[]), job("test", &["lint"])], false);
        p.ready();
        p.finish("lint", ended(Status::Passed));
        p.ready();
        p.finish("test", ended(Status::Failed));
        let first = p.verdict().unwrap();
        let mut lint = job("lint", &[]);
        lint.carried = Some(JobSummary {
            carried_from: Some(1),
            ..first.jobs[0].clone()
        });
        let mut again = Progress::new(&[lint, job("test", &["lint"])], false);
        assert_eq!(tokens(again.ready()), ["test"], "lint does not run again");
        again.finish("test", ended(Status::Passed));
        let v = again.verdict().unwrap();
        assert_eq!(v.status, Status::Passed);
        assert_eq!(v.jobs[0].carried_from, Some(1));
        assert_eq!(v.jobs[0].runner, "r1");
        assert_eq!(v.jobs[1].carried_from, None);
    }

    #[test]
    fn a_job_that_never_ran_keeps_the_run_from_passing_and_a_stuck_plan_ends() {
        let mut docs = job("docs", &[]);
        docs.allow_failure = true;
        let mut p = Progress::new(&[docs, job("test", &["docs"])], false);
        p.ready();
        p.finish("docs", ended(Status::Failed));
        p.ready();
        let v = p.verdict().unwrap();
        assert_eq!(v.status, Status::Failed);
        assert_eq!(
            v.reason.as_deref(),
            Some("test: skipped (docs did not pass)")
        );

        // A cycle (only a hand-made message can hold one): it ends instead of waiting forever.
        let mut p = Progress::new(&[job("a", &["b"]), job("b", &["a"]), job("c", &[])], false);
        assert_eq!(tokens(p.ready()), ["c"]);
        assert!(!p.is_done(), "c runs; a and b wait for it to end");
        p.finish("c", ended(Status::Passed));
        assert!(p.ready().is_empty());
        let v = p.verdict().expect("done");
        assert_eq!(v.status, Status::Error);
        let mut p = Progress::new(&[job("a", &["a"])], false);
        assert!(p.ready().is_empty());
        assert!(p.is_done());
    }

    #[test]
    fn cancelling_one_job_of_a_fail_fast_run_skips_only_what_needs_it() {
        let mut p = Progress::new(&[job("a", &[]), job("b", &[]), job("c", &["a"])], true);
        assert_eq!(tokens(p.ready()), ["a", "b"]);
        assert!(
            p.finish("a", ended(Status::Cancelled)).is_empty(),
            "b goes on"
        );
        assert!(p.stopped().is_none());
        assert!(p.ready().is_empty());
        p.finish("b", ended(Status::Passed));
        let v = p.verdict().unwrap();
        assert_eq!(v.status, Status::Cancelled);
        let statuses: Vec<Status> = v.jobs.iter().map(|j| j.status).collect();
        assert_eq!(
            statuses,
            [Status::Cancelled, Status::Passed, Status::Skipped]
        );
    }

    #[test]
    fn a_cancelled_run_starts_nothing_more_and_ends_cancelled() {
        // Cancelled before anything started: every job skipped, the run cancelled.
        let mut p = Progress::new(&[job("a", &[]), job("b", &["a"])], false);
        assert!(p.cancel("by ann").is_empty());
        assert!(p.ready().is_empty());
        let v = p.verdict().expect("done");
        assert_eq!(v.status, Status::Cancelled);
        assert_eq!(v.reason.as_deref(), Some("cancelled by ann"));
        assert!(v.jobs.iter().all(|j| j.status == Status::Skipped));

        // Cancelled while a runs: a is cancelled; b, whose need passes just after, never starts.
        let mut p = Progress::new(&[job("a", &[]), job("b", &["a"])], false);
        p.ready();
        assert_eq!(tokens(p.cancel("by ann")), ["a"]);
        assert!(p.cancel("by bob").is_empty(), "once");
        p.finish("a", ended(Status::Passed));
        assert!(p.ready().is_empty(), "b does not start");
        let v = p.verdict().unwrap();
        assert_eq!(v.status, Status::Cancelled);
        assert_eq!(v.jobs[1].status, Status::Skipped);
        assert!(v.jobs[1]
            .reason
            .as_deref()
            .unwrap()
            .contains("cancelled by ann"));

        // A worse status stands.
        let mut p = Progress::new(&[job("a", &[]), job("b", &[])], false);
        p.ready();
        p.finish("a", ended(Status::Failed));
        p.cancel("by ann");
        p.finish("b", ended(Status::Cancelled));
        assert_eq!(p.verdict().unwrap().status, Status::Failed);
    }

    #[test]
    fn a_job_cancelled_before_it_started_is_started_to_end_on_its_own() {
        let mut p = Progress::new(&[job("a", &[]), job("b", &["a"])], false);
        p.ready();
        assert!(p.is_pending("b"));
        assert_eq!(p.force_start("b").map(|j| j.job).as_deref(), Some("b"));
        assert!(p.force_start("b").is_none(), "started already");
        assert!(p.force_start("x").is_none(), "not of the run");
        p.finish("b", ended(Status::Cancelled));
        p.finish("a", ended(Status::Passed));
        assert!(p.ready().is_empty(), "b ended: it does not start again");
        let v = p.verdict().unwrap();
        assert_eq!(v.jobs[1].status, Status::Cancelled);
    }
}
