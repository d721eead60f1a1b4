//! A pipeline run as a graph for its commit page: its jobs with their status, the `needs` between
//! them, and where each box goes (columns by depth).
//!
//! Pure: [`pipeline`] takes what the view knows about one run (the plan, the run's result, the
//! jobs' results and `ci-jobs` states) and returns the nodes; [`layout`] places them. Everything
//! here comes from messages anyone who may publish can forge, so nothing trusts it: at most
//! [`MAX_NODES`] jobs are drawn (the rest are counted), needs that name no drawn job are dropped,
//! and a cycle (which the observer never plans, but a hand-made message may hold) cannot loop.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use jetci::messages::{JobPhase, JobPlan, JobSummary, Status};
use serde::Serialize;

use crate::view::{Job, Stored};

/// At most this many jobs of one run are drawn (a pipeline plans at most
/// `jetci::repo_config::MAX_JOBS`).
pub const MAX_NODES: usize = jetci::repo_config::MAX_JOBS;

/// What a box shows: a job's final status, or where it is while the run goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    Passed,
    Failed,
    Error,
    TimedOut,
    Cancelled,
    Skipped,
    /// A runner has it (`assigned` or `running` in `ci-jobs`).
    Running,
    /// Not started: waiting for its needs, or queued for a runner.
    Waiting,
}

impl NodeStatus {
    /// The CSS class and JSON word: `passed`, …, `timed_out`, `running`, `waiting`.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Passed => "passed",
            NodeStatus::Failed => "failed",
            NodeStatus::Error => "error",
            NodeStatus::TimedOut => "timed_out",
            NodeStatus::Cancelled => "cancelled",
            NodeStatus::Skipped => "skipped",
            NodeStatus::Running => "running",
            NodeStatus::Waiting => "waiting",
        }
    }

    /// The word shown in a box (the word carries the meaning, not only the colour).
    pub fn word(self) -> &'static str {
        match self {
            NodeStatus::TimedOut => "timed out",
            s => s.as_str(),
        }
    }

    /// Ended: it will not change any more within this run.
    pub fn is_final(self) -> bool {
        !matches!(self, NodeStatus::Running | NodeStatus::Waiting)
    }
}

impl From<Status> for NodeStatus {
    fn from(s: Status) -> NodeStatus {
        match s {
            Status::Passed => NodeStatus::Passed,
            Status::Failed => NodeStatus::Failed,
            Status::Error => NodeStatus::Error,
            Status::TimedOut => NodeStatus::TimedOut,
            Status::Cancelled => NodeStatus::Cancelled,
            Status::Skipped => NodeStatus::Skipped,
        }
    }
}

/// One job of the run, as drawn.
#[derive(Clone, Debug)]
pub struct Node {
    /// Its name as users see it, e.g. `test (python=3.11, 1/2)`.
    pub name: String,
    /// Its token (`ci.results.<repo>.<sha>.<run>.<job>`).
    pub job: String,
    /// Tokens of the drawn jobs it needs.
    pub needs: Vec<String>,
    pub status: NodeStatus,
    /// Its column: 0 for a job that needs nothing, else one more than its deepest need.
    pub column: usize,
    /// Its place in its column, from the top.
    pub row: usize,
    /// Its own result, once stored.
    pub result: Option<Arc<Stored>>,
    /// Its `ci-jobs` state while unfinished.
    pub state: Option<Job>,
    /// Its entry in the run's result, once the run ended (holds the reason of a skip).
    pub summary: Option<JobSummary>,
}

impl Node {
    /// The attempt whose log is this job's: its result's, else its running state's (0: none).
    pub fn attempt(&self) -> u32 {
        match (&self.result, &self.state) {
            (Some(r), _) => r.result.attempt,
            (None, Some(s)) if s.state.phase != JobPhase::Queued => s.state.attempt,
            _ => 0,
        }
    }
}

/// One pipeline run, laid out.
#[derive(Debug)]
pub struct Pipeline {
    pub run: u32,
    pub nodes: Vec<Node>,
    /// Columns and the rows of the tallest one.
    pub columns: usize,
    pub rows: usize,
    /// Jobs known but not drawn (over [`MAX_NODES`]).
    pub hidden: usize,
    /// The run's own result, once stored.
    pub result: Option<Arc<Stored>>,
}

impl Pipeline {
    /// A short fingerprint of what the graph shows, so the live page replaces it only when it
    /// changed.
    pub fn fingerprint(&self) -> String {
        let mut s = self
            .nodes
            .iter()
            .map(|n| &n.status.as_str()[..2])
            .collect::<String>();
        s.push_str(&format!(":{}", self.result.is_some()));
        s
    }
}

/// What one job is planned as: from the run's result, the commit message, or (without either)
/// from its own result or state alone.
struct Planned {
    name: String,
    job: String,
    needs: Vec<String>,
    /// Its entry in the run's result, or the earlier run's result it carries over
    /// (`jetci rerun --failed`).
    summary: Option<JobSummary>,
}

/// Assembles run `run`'s graph from the run's result (its `jobs`, when stored), else `plan` (the
/// commit message's jobs), else the jobs seen in `results` and `states` (without needs).
/// `results` and `states` may hold other runs' and jobs' entries; only run `run`'s are taken.
pub fn pipeline(
    run: u32,
    run_result: Option<&Arc<Stored>>,
    plan: Option<&[JobPlan]>,
    results: &[Arc<Stored>],
    states: &[Job],
) -> Pipeline {
    let results: HashMap<&str, &Arc<Stored>> = results
        .iter()
        .filter(|s| s.result.run == run)
        .filter_map(|s| Some((s.result.job.as_deref()?, s)))
        .collect();
    let states: HashMap<&str, &Job> = states
        .iter()
        .filter(|j| j.state.run == run)
        .filter_map(|j| Some((j.state.job.as_deref()?, j)))
        .collect();
    let summaries: &[JobSummary] = run_result.map_or(&[], |s| &s.result.jobs);
    let planned: Vec<Planned> = if !summaries.is_empty() {
        summaries
            .iter()
            .map(|j| Planned {
                name: j.name.clone(),
                job: j.job.clone(),
                needs: j.needs.clone(),
                summary: Some(j.clone()),
            })
            .collect()
    } else if let Some(plan) = plan.filter(|p| !p.is_empty()) {
        plan.iter()
            .map(|j| Planned {
                name: j.name.clone(),
                job: j.job.clone(),
                needs: j.needs.clone(),
                summary: j.carried.clone(),
            })
            .collect()
    } else {
        let tokens: BTreeSet<&str> = results.keys().chain(states.keys()).copied().collect();
        tokens
            .into_iter()
            .map(|t| Planned {
                name: results
                    .get(t)
                    .and_then(|s| s.result.job_name.clone())
                    .unwrap_or_else(|| t.to_string()),
                job: t.to_string(),
                needs: Vec::new(),
                summary: None,
            })
            .collect()
    };
    // Distinct tokens, at most MAX_NODES; needs only on drawn jobs, each once.
    let mut seen = BTreeSet::new();
    let mut total = 0;
    let mut drawn = Vec::new();
    for p in planned {
        if !seen.insert(p.job.clone()) {
            continue;
        }
        total += 1;
        if drawn.len() < MAX_NODES {
            drawn.push(p);
        }
    }
    let index: HashMap<String, usize> = drawn
        .iter()
        .enumerate()
        .map(|(i, p)| (p.job.clone(), i))
        .collect();
    let needs: Vec<Vec<usize>> = drawn
        .iter()
        .map(|p| {
            let mut n: Vec<usize> = p
                .needs
                .iter()
                .filter_map(|t| index.get(t).copied())
                .collect();
            n.sort_unstable();
            n.dedup();
            n
        })
        .collect();
    let tokens: Vec<String> = drawn.iter().map(|p| p.job.clone()).collect();
    let columns = depths(&needs);
    // Statuses in column order, so a job's needs are decided before it.
    let mut order: Vec<usize> = (0..drawn.len()).collect();
    order.sort_by_key(|&i| (columns[i], i));
    let mut status = vec![NodeStatus::Waiting; drawn.len()];
    for &i in &order {
        let p = &drawn[i];
        status[i] = if let Some(s) = &p.summary {
            s.status.into()
        } else if let Some(r) = results.get(p.job.as_str()) {
            r.result.status.into()
        } else if states
            .get(p.job.as_str())
            .is_some_and(|j| matches!(j.state.phase, JobPhase::Assigned | JobPhase::Running))
        {
            NodeStatus::Running
        } else if needs[i]
            .iter()
            .any(|&n| status[n].is_final() && status[n] != NodeStatus::Passed)
        {
            // The dispatcher skips it (a need did not pass); the run's result will say so.
            NodeStatus::Skipped
        } else {
            NodeStatus::Waiting
        };
    }
    let mut nodes: Vec<Node> = drawn
        .into_iter()
        .enumerate()
        .map(|(i, p)| Node {
            needs: needs[i].iter().map(|&n| tokens[n].clone()).collect(),
            status: status[i],
            column: columns[i],
            row: 0,
            result: results.get(p.job.as_str()).map(|s| (*s).clone()),
            state: states.get(p.job.as_str()).map(|j| (*j).clone()),
            summary: p.summary,
            name: p.name,
            job: p.job,
        })
        .collect();
    let (columns, rows) = layout(&mut nodes);
    Pipeline {
        run,
        nodes,
        columns,
        rows,
        hidden: total - total.min(MAX_NODES),
        result: run_result.cloned(),
    }
}

/// Each job's depth: 0 without needs, else one more than its deepest need. A need that closes
/// a cycle is not followed (it adds nothing), so any input ends, in time linear in the edges.
pub fn depths(needs: &[Vec<usize>]) -> Vec<usize> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done(usize),
    }
    let mut marks = vec![Mark::New; needs.len()];
    for start in 0..needs.len() {
        // Depth-first without recursion: (node, next need to look at).
        let mut stack = vec![(start, 0usize)];
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            if *next == 0 && marks[node] == Mark::New {
                marks[node] = Mark::Open;
            }
            if let Mark::Done(_) = marks[node] {
                stack.pop();
                continue;
            }
            match needs[node].get(*next) {
                Some(&need) => {
                    *next += 1;
                    if need < needs.len() && marks[need] == Mark::New {
                        stack.push((need, 0));
                    }
                }
                None => {
                    let depth = needs[node]
                        .iter()
                        .filter_map(|&n| match marks.get(n) {
                            Some(Mark::Done(d)) => Some(d + 1),
                            _ => None,
                        })
                        .max()
                        .unwrap_or(0);
                    marks[node] = Mark::Done(depth);
                    stack.pop();
                }
            }
        }
    }
    marks
        .into_iter()
        .map(|m| match m {
            Mark::Done(d) => d,
            _ => 0,
        })
        .collect()
}

/// Gives each node its row (in the order given, within its column); returns the number of
/// columns and the rows of the tallest column.
pub fn layout(nodes: &mut [Node]) -> (usize, usize) {
    let mut filled: HashMap<usize, usize> = HashMap::new();
    for n in nodes.iter_mut() {
        let rows = filled.entry(n.column).or_default();
        n.row = *rows;
        *rows += 1;
    }
    let columns = nodes.iter().map(|n| n.column + 1).max().unwrap_or(0);
    let rows = filled.values().copied().max().unwrap_or(0);
    (columns, rows)
}

/// The runs of a commit that are pipelines: whose result lists jobs, or that have a job's
/// result or state. Newest first.
pub fn pipeline_runs(finals: &[Arc<Stored>], results: &[Arc<Stored>], states: &[Job]) -> Vec<u32> {
    let mut runs: BTreeSet<u32> = finals
        .iter()
        .filter(|s| !s.result.jobs.is_empty())
        .map(|s| s.result.run)
        .collect();
    runs.extend(results.iter().map(|s| s.result.run));
    runs.extend(
        states
            .iter()
            .filter(|j| j.state.job.is_some())
            .map(|j| j.state.run),
    );
    runs.into_iter().rev().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::tests::result;
    use jetci::messages::{JobState, VERSION};
    use time::OffsetDateTime;

    fn plan(name: &str, job: &str, needs: &[&str]) -> JobPlan {
        JobPlan {
            name: name.into(),
            job: job.into(),
            needs: needs.iter().map(|n| n.to_string()).collect(),
            labels: vec![],
            allow_failure: false,
            carried: None,
        }
    }

    fn job_result(job: &str, status: Status) -> Arc<Stored> {
        let mut r = result("app", "main", 1, 1, 1, status);
        r.job = Some(job.into());
        r.job_name = Some(format!("name of {job}"));
        Arc::new(Stored {
            seq: 1,
            superseded: false,
            result: r,
        })
    }

    fn state(job: &str, phase: JobPhase) -> Job {
        Job {
            key: format!("k.{job}"),
            state: JobState {
                v: VERSION,
                job: Some(job.into()),
                repo: "app".into(),
                branch: "main".into(),
                sha: "01".repeat(20),
                run: 1,
                phase,
                attempt: 1,
                runner: Some("r1".into()),
                job_seq: None,
                labels: vec![],
                status: None,
                reason: None,
                cancel: None,
                updated_at: OffsetDateTime::UNIX_EPOCH,
            },
            written: OffsetDateTime::UNIX_EPOCH,
        }
    }

    fn lint_test_build() -> Vec<JobPlan> {
        vec![
            plan("lint", "lint", &[]),
            plan("test (1/2)", "test-1", &["lint"]),
            plan("test (2/2)", "test-2", &["lint"]),
            plan("build", "build", &[]),
            plan("deploy", "deploy", &["test-1", "test-2", "build"]),
        ]
    }

    #[test]
    fn columns_by_depth_rows_in_plan_order() {
        let p = pipeline(1, None, Some(&lint_test_build()), &[], &[]);
        let at: Vec<(&str, usize, usize)> = p
            .nodes
            .iter()
            .map(|n| (n.job.as_str(), n.column, n.row))
            .collect();
        assert_eq!(
            at,
            [
                ("lint", 0, 0),
                ("test-1", 1, 0),
                ("test-2", 1, 1),
                ("build", 0, 1),
                ("deploy", 2, 0)
            ]
        );
        assert_eq!((p.columns, p.rows), (3, 2));
        assert_eq!(p.nodes[4].needs, ["test-1", "test-2", "build"]);
        assert!(p.nodes.iter().all(|n| n.status == NodeStatus::Waiting));
    }

    #[test]
    fn statuses_come_from_results_then_states_and_a_failed_need_skips() {
        let results = [
            job_result("lint", Status::Passed),
            job_result("build", Status::Failed),
        ];
        let states = [
            state("test-1", JobPhase::Running),
            state("test-2", JobPhase::Queued),
        ];
        let p = pipeline(1, None, Some(&lint_test_build()), &results, &states);
        let statuses: Vec<NodeStatus> = p.nodes.iter().map(|n| n.status).collect();
        assert_eq!(
            statuses,
            [
                NodeStatus::Passed,
                NodeStatus::Running,
                NodeStatus::Waiting,
                NodeStatus::Failed,
                NodeStatus::Skipped
            ]
        );
        assert_eq!(p.nodes[1].attempt(), 1);
        assert_eq!(p.nodes[2].attempt(), 0, "a queued job has no log yet");
        // Another run's results are not this run's.
        let other = pipeline(2, None, Some(&lint_test_build()), &results, &states);
        assert!(other.nodes.iter().all(|n| n.status == NodeStatus::Waiting));
    }

    #[test]
    fn the_runs_result_is_the_truth_once_stored() {
        let mut r = result("app", "main", 1, 1, 1, Status::Failed);
        r.jobs = vec![JobSummary {
            name: "only <one>".into(),
            job: "one".into(),
            needs: vec!["ghost".into()],
            labels: vec![],
            status: Status::Skipped,
            runner: String::new(),
            attempt: 0,
            duration_ms: 0,
            tests: None,
            allow_failure: false,
            reason: Some("ghost did not pass".into()),
            carried_from: None,
        }];
        let run = Arc::new(Stored {
            seq: 9,
            superseded: false,
            result: r,
        });
        let p = pipeline(1, Some(&run), Some(&lint_test_build()), &[], &[]);
        assert_eq!(p.nodes.len(), 1);
        assert_eq!(p.nodes[0].status, NodeStatus::Skipped);
        assert!(
            p.nodes[0].needs.is_empty(),
            "a need on no drawn job is dropped"
        );
        assert!(p.fingerprint().ends_with(":true"));
    }

    #[test]
    fn a_carried_job_is_passed_while_its_rerun_runs() {
        let mut plan = lint_test_build();
        plan[0].carried = Some(JobSummary {
            name: "lint".into(),
            job: "lint".into(),
            needs: vec![],
            labels: vec![],
            status: Status::Passed,
            runner: "r1".into(),
            attempt: 1,
            duration_ms: 5,
            tests: None,
            allow_failure: false,
            reason: None,
            carried_from: Some(1),
        });
        let p = pipeline(1, None, Some(&plan), &[], &[]);
        assert_eq!(p.nodes[0].status, NodeStatus::Passed);
        assert_eq!(p.nodes[0].summary.as_ref().unwrap().carried_from, Some(1));
        assert_eq!(p.nodes[1].status, NodeStatus::Waiting);
    }

    #[test]
    fn without_a_plan_the_jobs_seen_are_drawn() {
        let results = [job_result("b", Status::Passed)];
        let states = [state("a", JobPhase::Running)];
        let p = pipeline(1, None, None, &results, &states);
        let names: Vec<&str> = p.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["a", "name of b"]);
        assert_eq!(p.columns, 1);
    }

    #[test]
    fn hostile_plans_are_bounded_and_cycles_end() {
        // A cycle, a self-need and a need out of range.
        assert_eq!(depths(&[vec![1], vec![0]]).len(), 2);
        assert_eq!(depths(&[vec![0]]), [0]);
        assert_eq!(depths(&[vec![7]]), [0]);
        // A chain of 256: depth 255 at the end, without recursion.
        let chain: Vec<Vec<usize>> = (0..256)
            .map(|i| if i == 0 { vec![] } else { vec![i - 1] })
            .collect();
        assert_eq!(depths(&chain)[255], 255);
        let many: Vec<JobPlan> = (0..300)
            .map(|i| plan(&format!("j{i}"), &format!("j{i}"), &[]))
            .chain([plan("dup", "j1", &[])])
            .collect();
        let p = pipeline(1, None, Some(&many), &[], &[]);
        assert_eq!(p.nodes.len(), MAX_NODES);
        assert_eq!(p.hidden, 300 - MAX_NODES);
    }

    #[test]
    fn pipeline_runs_are_found_newest_first() {
        let mut single = result("app", "main", 1, 1, 1, Status::Passed);
        single.jobs.clear();
        let finals = [Arc::new(Stored {
            seq: 1,
            superseded: false,
            result: single,
        })];
        let results = [job_result("a", Status::Passed)];
        let mut s = state("b", JobPhase::Running);
        s.state.run = 3;
        assert_eq!(pipeline_runs(&finals, &results, &[s]), [3, 1]);
        assert!(pipeline_runs(&finals, &[], &[]).is_empty());
    }
}
