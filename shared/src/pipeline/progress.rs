//! A pipeline run as its jobs end: which job may start, which is skipped, what `fail_fast`
//! cancels, and the run's verdict. Pure; the dispatcher's core drives it
//! ([`crate::dispatcher::core`]).
//!
//! Rules (the "Dispatch" and "Results"):
//! - a job starts once every job it needs ended `passed`; if one ended otherwise (an allowed
//!   failure too), it ends `skipped` without running, and so do the jobs that need it;
//! - with `fail_fast`, the first job that fails without `allow_failure` stops the run: jobs not
//!   started end `skipped`, started ones are cancelled;
//! - the run is `passed` when every job passed, failed with `allow_failure`, or was skipped;
//!   otherwise it takes the worst status among the others (`error` > `timed_out` > `failed` >
//!   `cancelled`).

use crate::messages::{JobPlan, JobSummary, Status, TestCounts};

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

/// One pipeline run's jobs and where each is.
#[derive(Clone, Debug)]
pub struct Progress {
    jobs: Vec<(JobPlan, Place)>,
    fail_fast: bool,
    /// Set once `fail_fast` stopped the run: why.
    stopped: Option<String>,
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
        let fails = !matches!(outcome.status, Status::Passed | Status::Skipped)
            && !self.jobs[i].0.allow_failure;
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

    /// Whether job `token` is of this run and has not ended.
    pub fn is_running(&self, token: &str) -> bool {
        self.jobs
            .iter()
            .any(|(j, p)| j.job == token && *p == Place::Started)
    }

    /// Why `fail_fast` stopped the run, once it did.
    pub fn stopped(&self) -> Option<&str> {
        self.stopped.as_deref()
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
        let (status, reason) = match (worst, unran) {
            (Some((_, status, reason)), _) => (status, reason),
            // Only allowed failures, but a job that needed one never ran.
            (None, Some(why)) => (Status::Failed, Some(why)),
            (None, None) => (Status::Passed, None),
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
}
