//! The dispatcher's decisions, without I/O (the sans-IO style of quinn-proto and rustls): the
//! core takes [`Event`]s with the current time and returns [`Effect`]s; the driver
//! ([`super::driver`]) does the NATS work and feeds the answers back as events.
//!
//! The protocol it follows (DESIGN.md, "One commit's life" and "Deadlines instead of pings"):
//! a commit is held unacked while its job runs; the job goes to a runner whose labels match
//! ([`crate::protocol::placement`]); the age of the job's state in `ci-jobs`, which the runner rewrites every
//! heartbeat, says whether the runner is alive ([`lease`]); a lost runner's job goes to another
//! runner as attempt n+1 (I2), a live one is adopted after a dispatcher restart (I3), and the
//! commit is acked once the job's state is final (I1).
//!
//! A pipeline's run (a commit whose message lists jobs) is held as a whole, and each of its jobs
//! is held as a job of its own once it may start ([`crate::pipeline::Progress`] decides which):
//! each job is placed, leased and closed exactly like a run's only job, and once every job has
//! ended the core publishes the run's result (listing the jobs) and only then acks the commit.
//!
//! Each held job's place in that protocol is a `Step`, an enum whose variants carry their own
//! data; the steps that wait for an answer (`Step::in_flight`) say what to do with it. Besides
//! the runs it holds, the core keeps a cache of two buckets: the runners in `ci-runners` and the
//! jobs `assigned` or `running` on them in `ci-jobs` (any dispatcher's), from which it counts
//! free slots. Losing all of it loses nothing: the buckets and the unacked commits are the state.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::messages::{CommitMsg, JobMsg, JobPhase, JobState, ResultMsg, RunnerInfo, Status};
use crate::pipeline::{Outcome, Progress};
use crate::protocol::lease::{self, Decision};
use crate::protocol::placement::{nobody_has_labels, pick_runner, Candidate};
use crate::protocol::store::{StateError, Versioned};
use crate::schedule::{Ready, Schedule};
use crate::subjects::{JobRef, Names};

/// How often the driver ticks: held jobs are checked for late heartbeats this often (in memory,
/// cheap), and a late runner is probed at most this often.
pub const CHECK_EVERY: Duration = Duration::from_millis(250);

/// How long a new commit waits for a runner before its `queued` state (with the reason) is
/// written for `jetci status`: commits held ready for a busy runner usually start within
/// milliseconds, and skipping the write for them saves a bucket write per job.
pub const RECORD_WAIT_AFTER: Duration = Duration::from_millis(500);

/// How many commits a dispatcher holds waiting for a runner beyond its runners' slots: the
/// window the fair share chooses from ([`crate::schedule`]). A push of more commits than this
/// still waits behind the window in the stream, in order; each held commit costs one
/// in-progress ack per lease/3 and its message's memory.
pub const HOLD_AHEAD: u64 = 1_000;

/// The window shrinks to one commit per runner slot while the commits held waiting weigh more
/// than this ([`weight`]): a publisher of commits near the server's max payload (1 MiB) cannot
/// make a dispatcher hold a gigabyte.
pub const HOLD_AHEAD_BYTES: usize = 64 << 20;

/// Runners whose presence was not refreshed for this many leases are forgotten.
const FORGET_AFTER_LEASES: u32 = 20;

/// The most jobs a dispatcher holds that no live runner could take (they need labels nobody
/// alive has): such jobs wait on the side and never count against [`Core::wanted`], so other
/// commits keep flowing however many there are, and this bounds the memory they take. A run of
/// one job beyond it is given back to the stream ([`Effect::Release`]); a pipeline's job beyond
/// it counts as waiting again (its run is held whole, other jobs of it may run).
pub const MAX_UNPLACEABLE: usize = 1_000;

/// How long a commit given back for want of a runner with its labels stays in the stream before
/// JetStream delivers it again (a delayed nak): once such a runner has joined, the commit starts
/// within this delay.
pub const RELEASE_DELAY: Duration = Duration::from_secs(30);

/// The core's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The lease: a job whose state is older than this has lost its runner, and the ack wait of
    /// commits (extended every lease/3 while held).
    pub lease: Duration,
    /// Attempts per job before its run is given up as `error` (lost runners only; a failing test
    /// is never retried).
    pub max_attempts: u32,
    /// The installation's names (for the results the core builds).
    pub names: Names,
}

/// Something that happened, fed to [`Core::handle`].
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one at a time, moved straight into `handle`
pub enum Event {
    /// A commit message was pulled from `CI_COMMITS` (decoded and accepted by the driver);
    /// `seq` is its stream sequence, `redelivered` true when JetStream delivered it before (to
    /// this or another dispatcher).
    CommitDelivered {
        commit: CommitMsg,
        seq: u64,
        redelivered: bool,
    },
    /// The answer to [`Effect::LookUpResult`]: the run's stored result, if any (a failed read
    /// counts as none: the worst that follows is a run the verdict ignores).
    ResultLookedUp {
        key: String,
        result: Option<ResultMsg>,
    },
    /// The answer to [`Effect::ReadState`].
    StateRead {
        key: String,
        read: Result<Option<Versioned>, StateError>,
    },
    /// The answer to [`Effect::WriteState`]: the new revision, or why not.
    StateWritten {
        key: String,
        written: Result<u64, StateError>,
    },
    /// The answer to [`Effect::FinishWithoutRunner`]: whether a result for the run is stored now
    /// (this one or an earlier one).
    FinishedWithoutRunner { key: String, stored: bool },
    /// The server's answer to [`Effect::PublishJob`]: the job message's sequence in `CI_JOBS`, or
    /// why it was not stored.
    JobStored {
        key: String,
        stored: Result<u64, String>,
    },
    /// The answer to [`Effect::PublishJob`] when the job message can never be published: it is
    /// larger than the server takes (`reason`), because of what its commit carries.
    JobRefused { key: String, reason: String },
    /// A `ci-jobs` entry went by on the bucket's watch; `None` for a deleted one.
    JobStateChanged {
        key: String,
        state: Option<Versioned>,
    },
    /// A `ci-runners` entry went by: written `age` ago, at `revision`.
    RunnerSeen {
        key: String,
        info: RunnerInfo,
        age: Duration,
        revision: u64,
    },
    /// A `ci-runners` entry was deleted or purged.
    RunnerGone { key: String },
    /// The answer to [`Effect::Probe`]: `gone` when NATS said "no responders", that is no
    /// connection subscribes to the runner's control subject any more.
    ProbeAnswered { runner: String, gone: bool },
    /// The answer to [`Effect::PublishRunResult`]: whether the run's result is stored now (this
    /// one, or one that was there first).
    RunResultPublished { key: String, stored: bool },
    /// The connection to NATS came back after an outage.
    Reconnected,
    /// Time passed ([`CHECK_EVERY`]).
    Tick,
}

/// Something the driver must do. Effects that ask a question are answered by the event their
/// doc names, before the driver takes the next event.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // a few per event, carried out at once
pub enum Effect {
    /// Is a final result of `job`'s run stored? Answer: [`Event::ResultLookedUp`].
    LookUpResult { key: String, job: JobRef },
    /// Read the job's state. Answer: [`Event::StateRead`].
    ReadState { key: String },
    /// Write `state` if the key is at `revision` (`None`: only if it does not exist). Answer:
    /// [`Event::StateWritten`].
    WriteState {
        key: String,
        state: JobState,
        revision: Option<u64>,
    },
    /// Publish `job` on its runner's subject, with the `assigned` state and its revision in the
    /// headers (the runner claims on them). Answer, whenever the server acks:
    /// [`Event::JobStored`]; at once when it can never be published: [`Event::JobRefused`].
    PublishJob {
        key: String,
        job: JobMsg,
        assigned: JobState,
        revision: u64,
    },
    /// Delete a lost attempt's job message from its runner's subject (`CI_JOBS` sequence).
    DeleteJobMessage { seq: u64 },
    /// Give the run its final result without a runner, then write `state` finished
    /// ([`crate::protocol::verdict::finish_without_runner`]). Answer:
    /// [`Event::FinishedWithoutRunner`].
    FinishWithoutRunner {
        key: String,
        result: ResultMsg,
        state: JobState,
        revision: Option<u64>,
    },
    /// The run has its result: ack its commit message for good (the run's key).
    AckCommit { run: String },
    /// Give the commit back to the stream, to be delivered again after `delay` (a delayed nak;
    /// the consumer's `max_deliver` is unlimited, so it is never dropped for it): the core no
    /// longer holds the run (`run`, its key). Its `queued` state in `ci-jobs` says why it waits.
    Release { run: String, delay: Duration },
    /// Ask job `key` to stop (a pipeline's `fail_fast`, or its run cancelled): request a cancel
    /// in its state, as `jetci cancel` does, creating a `queued` one from `queued` when it has
    /// none. Its runner, or the dispatcher holding it when it is on none, ends it `cancelled`.
    /// No answer: the state comes back on the watch.
    CancelJob {
        key: String,
        queued: JobState,
        by: String,
    },
    /// Publish a pipeline run's result (first writer wins) on `ci.results.<repo>.<sha>.<run>`.
    /// Answer: [`Event::RunResultPublished`].
    PublishRunResult { key: String, result: ResultMsg },
    /// Extend the ack deadline of every commit message held (an in-progress ack).
    ExtendCommits,
    /// Ask the runner's control subject whether it is there. Answer: [`Event::ProbeAnswered`].
    Probe { runner: String },
    /// Count a final result for the metrics: a run's (`job` false: a run of one job, or a
    /// pipeline's run) or a pipeline job's.
    CountResult { status: Option<Status>, job: bool },
}

/// A runner as seen in `ci-runners`.
#[derive(Debug)]
struct Presence {
    info: RunnerInfo,
    /// When it last wrote its entry, on this host's clock.
    written: Instant,
    revision: u64,
    /// What it adds to [`Offered`]: its slots and its busy ones, while it was available when
    /// last counted.
    counted: Option<(u32, u32)>,
}

/// The slots of the available runners, all and busy, kept as runners and jobs come and go so
/// that [`Core::wanted`], asked after every event, costs the same however many runners there
/// are. A runner whose presence grows older than the lease leaves it at the next tick, when
/// every runner is counted again.
#[derive(Debug, Default, Clone, Copy)]
struct Offered {
    all: u64,
    busy: u64,
}

impl Offered {
    /// Replaces a runner's contribution `old` with `new`.
    fn replace(&mut self, old: Option<(u32, u32)>, new: Option<(u32, u32)>) {
        if let Some((all, busy)) = old {
            self.all -= u64::from(all);
            self.busy -= u64::from(busy);
        }
        if let Some((all, busy)) = new {
            self.all += u64::from(all);
            self.busy += u64::from(busy);
        }
    }

    fn free(&self) -> u64 {
        self.all - self.busy
    }
}

/// A job that is `assigned` or `running` (by any dispatcher), as seen in `ci-jobs`.
#[derive(Debug)]
struct Active {
    runner: String,
    /// When its state was last written: the runner's last heartbeat.
    written: Instant,
    /// Its repository and branch, for the fair share's running counts.
    repo: String,
    branch: String,
}

/// What this dispatcher knows of a held job's state, so that it can write without reading.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // one per held job, replaced in place: a box buys nothing
enum Known {
    /// Delivered for the first time and nothing written since: the state almost surely does not
    /// exist, so the first write creates it (a create fails if it does exist, and then the state
    /// is read).
    Absent,
    /// As last written or watched, with its revision.
    State(JobState, u64),
    /// To be read before the next decision.
    Unknown,
}

/// Why and since when a job waits for a runner.
#[derive(Debug, Clone, PartialEq)]
struct Wait {
    reason: String,
    /// No live runner has the labels it needs (as of the last decision on it): it does not
    /// count against [`Core::wanted`].
    unplaceable: bool,
    since: Instant,
    /// Its `queued` state with this reason is in `ci-jobs` (for `jetci status`).
    recorded: bool,
}

/// Where a held run's job is in the protocol.
#[derive(Debug, Clone)]
enum Step {
    /// A redelivered commit: is its run's result stored already?
    CheckingResult,
    /// Reading the job's state to decide (the wait it was in, if any).
    Reading { wait: Option<Wait> },
    /// A decision after a lost runner, held until we know whether the lost attempt stored its
    /// result ([`lease::after_a_loss`]).
    CheckingLoss {
        current: Option<Versioned>,
        decision: Decision,
    },
    /// Waiting for a runner.
    Waiting(Wait),
    /// Writing `queued` with the reason it waits.
    RecordingWait {
        wait: Wait,
        state: JobState,
        stale: Option<u64>,
        created: bool,
    },
    /// Writing `assigned` (the runner's slot is taken meanwhile).
    Assigning { to: Assignment, created: bool },
    /// Replacing a state that does not parse with a fresh `queued` one.
    Replacing,
    /// Writing `final` with the status of a result a lost attempt stored.
    RecordingFinal,
    /// The job's state says `final` (`current`, seen first at `since`): is its run's result
    /// stored? A run closes only on a stored result, never on a state anyone could have written.
    CheckingFinal { current: Versioned, since: Instant },
    /// A `final` state whose result was not found yet: looked for again every tick, for a
    /// beat (a result just stored may not be readable from every replica at once), then the
    /// state counts as forged and the job runs again.
    UnconfirmedFinal { current: Versioned, since: Instant },
    /// Giving the run its final result without a runner (`status`, `reason`, for the log).
    Finishing {
        stale: Option<u64>,
        status: Status,
        reason: String,
    },
    /// The job is on a runner (assigned here, or adopted); its heartbeats are in `active`.
    OnRunner,
    /// Nothing in flight; decided again at the next tick (after an error, say).
    Idle,
}

impl Step {
    /// Whether the step waits for an answer from the driver.
    fn in_flight(&self) -> bool {
        matches!(
            self,
            Step::CheckingResult
                | Step::Reading { .. }
                | Step::CheckingLoss { .. }
                | Step::RecordingWait { .. }
                | Step::Assigning { .. }
                | Step::Replacing
                | Step::RecordingFinal
                | Step::CheckingFinal { .. }
                | Step::Finishing { .. }
        )
    }
}

/// What a decision on a held job writes over: its state as read (or a fresh `queued` one when
/// it has none), the revision for the compare-and-set, where a lost attempt's job message is,
/// and whether the write creates the key (the job is fresh: a conflict means read and decide).
struct Base {
    state: JobState,
    revision: Option<u64>,
    stale: Option<u64>,
    created: bool,
}

/// An attempt being given to a runner: the `assigned` state written, and where the previous
/// attempt's job message is (deleted once the write lands).
#[derive(Debug, Clone)]
struct Assignment {
    runner: String,
    attempt: u32,
    state: JobState,
    stale: Option<u64>,
}

/// A pipeline's run this dispatcher holds: its commit and where its jobs are. Each started job
/// is also held as a [`Run`] under its own key.
#[derive(Debug)]
struct Pipeline {
    commit: CommitMsg,
    seq: u64,
    progress: Progress,
    /// Whether the commit was delivered before: its jobs' states are read before deciding.
    redelivered: bool,
    step: Stage,
    /// When this dispatcher took the commit, for the run's duration.
    taken: Instant,
    /// The run's own entry in `ci-jobs` (under the run's key): there once a user asked to
    /// cancel the whole run (`jetci cancel REPO SHA`); marked `final` once the run's result is
    /// stored.
    marker: Option<Versioned>,
    /// While the run is taken: the stored results of its jobs found so far (a redelivered
    /// commit), and the jobs found with a state that is not final (started before).
    found: Vec<(String, Outcome)>,
    live: Vec<String>,
}

/// Where a held pipeline's run is.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stage {
    /// Taken, nothing started: `awaiting` answers to come. Before anything starts, the run's
    /// own state is read (a cancel requested before any dispatcher held the run), and for a
    /// redelivered commit the run's result (stored: the commit is acked) and each job's result
    /// and state: a job whose need passed must not start before a failed sibling's result is
    /// known, and jobs another dispatcher started are held again.
    Taking { awaiting: usize },
    /// Its jobs run.
    Running,
    /// Every job has ended; the run's result is being published.
    Publishing,
    /// The run's result could not be published; tried again at the next tick.
    Unpublished,
}

/// A commit this dispatcher holds, and its one job; or one job of a held pipeline.
#[derive(Debug)]
struct Run {
    commit: CommitMsg,
    job: JobRef,
    /// The commit message's sequence in `CI_COMMITS`.
    seq: u64,
    /// Where this dispatcher's last job message for it is in `CI_JOBS`, from the publish ack.
    job_seq: Option<u64>,
    known: Known,
    step: Step,
}

/// Figures for the dispatcher's gauges.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gauges {
    /// Held jobs waiting for a runner.
    pub waiting: u32,
    /// Jobs assigned or running (any dispatcher's).
    pub in_flight: usize,
    /// Age of the oldest heartbeat among them.
    pub oldest_heartbeat: Duration,
}

/// The dispatcher's state and decisions. See the module doc.
pub struct Core {
    config: Config,
    runners: HashMap<String, Presence>,
    /// Runners a probe found gone, with the presence revision they had then.
    gone: HashMap<String, u64>,
    /// Runners not heard from since the last reconnect, with the presence revision they had
    /// then: given no new job until they write a newer one. A runner that died before an outage
    /// never does, so the outage does not bring it back to life.
    unconfirmed: HashMap<String, u64>,
    active: HashMap<String, Active>,
    /// Jobs per runner, kept as `active` and the assignments being written change: those in
    /// `active` on it, and those this dispatcher is assigning to it right now (`Step::Assigning`).
    load: HashMap<String, u32>,
    /// The available runners' slots, all and busy (see [`Offered`]).
    offered: Offered,
    /// Held jobs by job key.
    runs: HashMap<String, Run>,
    /// Held pipeline runs by run key.
    pipelines: HashMap<String, Pipeline>,
    /// The held jobs that wait for a runner, in the fair share's order (by repository, then
    /// branch, running counts from `active`).
    schedule: Schedule,
    /// When each runner was last given a job (a counter), so equal runners take turns.
    picks: HashMap<String, u64>,
    pick_count: u64,
    /// When held commits were last extended.
    extended: Instant,
    /// When each runner was last probed.
    probed: HashMap<String, Instant>,
    /// When the connection to NATS last came back: no heartbeat can be older than that for a
    /// runner's fault, so ages count from it at most.
    reconnected: Option<Instant>,
}

type Effects = Vec<Effect>;

impl Core {
    /// A core that holds nothing yet, started at `now`.
    pub fn new(config: Config, now: Instant) -> Core {
        Core {
            config,
            runners: HashMap::new(),
            gone: HashMap::new(),
            unconfirmed: HashMap::new(),
            active: HashMap::new(),
            load: HashMap::new(),
            offered: Offered::default(),
            runs: HashMap::new(),
            pipelines: HashMap::new(),
            schedule: Schedule::new(),
            picks: HashMap::new(),
            pick_count: 0,
            extended: now,
            probed: HashMap::new(),
            reconnected: None,
        }
    }

    /// The heartbeat period the lease implies: commits are extended this often.
    pub fn beat(&self) -> Duration {
        self.config.lease / 3
    }

    /// Takes one event at `now` and returns what to do, in order.
    pub fn handle(&mut self, event: Event, now: Instant) -> Effects {
        let mut out = Vec::new();
        match event {
            Event::CommitDelivered {
                commit,
                seq,
                redelivered,
            } => self.on_commit(commit, seq, redelivered, now, &mut out),
            Event::ResultLookedUp { key, result } => {
                self.on_result_looked_up(&key, result, now, &mut out)
            }
            Event::StateRead { key, read } => self.on_state_read(&key, read, now, &mut out),
            Event::StateWritten { key, written } => {
                self.on_state_written(&key, written, now, &mut out)
            }
            Event::FinishedWithoutRunner { key, stored } => {
                self.on_finished(&key, stored, now, &mut out)
            }
            Event::RunResultPublished { key, stored } => {
                self.on_run_result_published(&key, stored, &mut out)
            }
            Event::JobStored { key, stored } => self.on_job_stored(&key, stored),
            Event::JobRefused { key, reason } => self.on_job_refused(&key, reason, &mut out),
            Event::JobStateChanged { key, state } => self.on_job_state(&key, state, now, &mut out),
            Event::RunnerSeen {
                key,
                info,
                age,
                revision,
            } => self.on_runner(key, info, age, revision, now, &mut out),
            Event::RunnerGone { key } => {
                self.forget_runner(&key);
                self.unconfirmed.remove(&key);
            }
            Event::ProbeAnswered { runner, gone } => self.on_probe(&runner, gone, now, &mut out),
            Event::Reconnected => self.on_reconnect(now),
            Event::Tick => self.on_tick(now, &mut out),
        }
        out
    }

    /// How many more commits to pull now: one per free runner slot, plus a window of
    /// [`HOLD_AHEAD`] held waiting (at least one per slot; none while no runner is available;
    /// one per slot while those held weigh over [`HOLD_AHEAD_BYTES`]), so that a slot that
    /// frees goes to the fairest of them (another repository's commit behind a big push)
    /// without a round trip to the stream, minus those that already wait for a runner. A job no
    /// live runner could take (it needs labels nobody alive has) does not count, up to
    /// [`MAX_UNPLACEABLE`] of them: nothing that cannot be placed holds back what can. The rest
    /// of the queue stays in the stream, in order.
    pub fn wanted(&self, now: Instant) -> usize {
        let _ = now; // `offered` is kept as things change (runners leave it at the next tick)
        let (waiting, unplaceable, bytes) = self.waiting();
        let counted = u64::from(waiting - unplaceable.min(MAX_UNPLACEABLE as u32));
        let all = self.offered.all;
        let window = if all == 0 || bytes > HOLD_AHEAD_BYTES {
            all
        } else {
            all.max(HOLD_AHEAD)
        };
        let ready = self.offered.free() + window;
        ready.saturating_sub(counted).min(usize::MAX as u64) as usize
    }

    /// Figures for the gauges at `now`.
    pub fn gauges(&self, now: Instant) -> Gauges {
        Gauges {
            waiting: self.waiting().0,
            in_flight: self.active.len(),
            oldest_heartbeat: self
                .active
                .values()
                .map(|a| now.saturating_duration_since(a.written))
                .max()
                .unwrap_or_default(),
        }
    }

    /// How many jobs it holds.
    pub fn held(&self) -> usize {
        self.runs.len()
    }

    // ---- commits -----------------------------------------------------------------------------

    fn on_commit(
        &mut self,
        commit: CommitMsg,
        seq: u64,
        redelivered: bool,
        now: Instant,
        out: &mut Effects,
    ) {
        if !commit.jobs.is_empty() {
            return self.on_pipeline(commit, seq, redelivered, now, out);
        }
        let job = commit.only_job();
        let key = job.key();
        // A commit delivered for the first time cannot have a result yet, short of a
        // re-published commit (whose job state says final anyway): the check is for redeliveries.
        let (known, step) = if redelivered {
            (Known::Unknown, Step::CheckingResult)
        } else {
            (Known::Absent, Step::Idle)
        };
        self.runs.insert(
            key.clone(),
            Run {
                commit,
                job: job.clone(),
                seq,
                job_seq: None,
                known,
                step,
            },
        );
        if redelivered {
            out.push(Effect::LookUpResult { key, job });
        } else {
            self.advance(&key, now, out);
        }
    }

    fn on_result_looked_up(
        &mut self,
        key: &str,
        result: Option<ResultMsg>,
        now: Instant,
        out: &mut Effects,
    ) {
        if self.pipelines.contains_key(key) {
            return self.on_pipeline_result(key, result.is_some(), now, out);
        }
        if let Some((run, token)) = self.taking(key) {
            if let Some(r) = result {
                if let Some(p) = self.pipelines.get_mut(&run) {
                    p.found.push((token, outcome_of(&r)));
                }
            }
            return self.answered(&run, now, out);
        }
        let Some(run) = self.runs.get_mut(key) else {
            return;
        };
        match std::mem::replace(&mut run.step, Step::Idle) {
            Step::CheckingResult => match result {
                Some(result) => {
                    tracing::debug!(%key, "commit already has its result");
                    self.close(key, Some(&result), now, out);
                }
                None => self.advance(key, now, out),
            },
            Step::CheckingFinal { current, since } => {
                let settled = now.saturating_duration_since(since) >= self.config.lease / 3;
                match result {
                    Some(result) => self.close(key, Some(&result), now, out),
                    None if !settled => run.step = Step::UnconfirmedFinal { current, since },
                    None => self.run_again(key, current, now, out),
                }
            }
            Step::CheckingLoss { current, decision } => match (result, current) {
                (Some(result), Some(current)) => {
                    // The run is over: mark its state final with the stored result's status
                    // (compare-and-set); the watched entry then closes the commit.
                    tracing::info!(%key, attempt = result.attempt, runner = %result.runner, status = %result.status, "the lost attempt had stored its result; the run is over");
                    run.known = Known::Unknown;
                    run.step = Step::RecordingFinal;
                    let state = current.state.finish(result.status, result.reason);
                    out.push(Effect::WriteState {
                        key: key.to_string(),
                        state,
                        revision: Some(current.revision),
                    });
                }
                (_, current) => self.act(key, current, decision, None, now, out),
            },
            other => run.step = other,
        }
    }

    // ---- deciding ----------------------------------------------------------------------------

    /// Decides what to do with a held job: on the state as known, or after reading it.
    fn advance(&mut self, key: &str, now: Instant, out: &mut Effects) {
        let Some(run) = self.runs.get_mut(key) else {
            return;
        };
        if run.step.in_flight() {
            return;
        }
        let wait = match &run.step {
            Step::Waiting(w) => Some(w.clone()),
            _ => None,
        };
        if wait.is_some() {
            self.schedule.remove(key);
        }
        let Some(run) = self.runs.get_mut(key) else {
            return;
        };
        let known = match &run.known {
            Known::Absent => Some(None),
            // A waiting job's own `queued` state: nothing to read (a change by anyone else
            // comes by the watch and replaces it).
            Known::State(state, revision)
                if wait.is_some() && state.phase == JobPhase::Queued && state.cancel.is_none() =>
            {
                Some(Some(Versioned {
                    state: state.clone(),
                    revision: *revision,
                    age: Duration::ZERO,
                }))
            }
            _ => None,
        };
        match known {
            Some(current) => self.decide(key, current, wait, now, out),
            None => {
                run.step = Step::Reading { wait };
                out.push(Effect::ReadState {
                    key: key.to_string(),
                });
            }
        }
    }

    fn on_state_read(
        &mut self,
        key: &str,
        read: Result<Option<Versioned>, StateError>,
        now: Instant,
        out: &mut Effects,
    ) {
        if let Some(p) = self.pipelines.get_mut(key) {
            // The run's own state: a cancel requested before this dispatcher held the run.
            match read {
                Ok(marker) => p.marker = marker,
                Err(e) => {
                    tracing::warn!(%key, error = %e, "cannot read the run's state; a cancel of the run is seen on the watch only")
                }
            }
            return self.answered(key, now, out);
        }
        if let Some((run, token)) = self.taking(key) {
            let live = matches!(&read, Ok(Some(v)) if v.state.phase != JobPhase::Final);
            if let (true, Some(p)) = (live, self.pipelines.get_mut(&run)) {
                p.live.push(token);
            }
            return self.answered(&run, now, out);
        }
        let Some(run) = self.runs.get_mut(key) else {
            return;
        };
        let Step::Reading { wait } = std::mem::replace(&mut run.step, Step::Idle) else {
            return;
        };
        match read {
            Ok(current) => self.decide(key, current, wait, now, out),
            Err(StateError::Bad {
                reason, revision, ..
            }) => {
                // Replace it (compare-and-set on its revision); the next tick decides afresh.
                tracing::warn!(%key, %reason, "job state does not parse; starting the run afresh");
                run.step = Step::Replacing;
                out.push(Effect::WriteState {
                    key: key.to_string(),
                    state: JobState::queued(&run.commit, &run.job),
                    revision: Some(revision),
                });
            }
            Err(e) => {
                tracing::warn!(%key, error = %e, "cannot read job state; trying again next beat");
            }
        }
    }

    /// Decides on the job's `current` state: the lease decision, after looking for a stored
    /// result when it ends a lost attempt.
    fn decide(
        &mut self,
        key: &str,
        current: Option<Versioned>,
        wait: Option<Wait>,
        now: Instant,
        out: &mut Effects,
    ) {
        let runner_gone = current
            .as_ref()
            .and_then(|c| c.state.runner.as_deref())
            .is_some_and(|r| !self.runner_alive(r, now) && self.gone.contains_key(r));
        let age = lease::effective_age(
            current.as_ref().map(|c| c.age).unwrap_or_default(),
            self.reconnected.map(|at| now.saturating_duration_since(at)),
            runner_gone,
            self.config.lease,
        );
        let state = current.as_ref().map(|c| &c.state);
        let decision = lease::decide(state, age, self.config.lease, self.config.max_attempts);
        if lease::after_a_loss(state, &decision) {
            let Some(run) = self.runs.get_mut(key) else {
                return;
            };
            out.push(Effect::LookUpResult {
                key: key.to_string(),
                job: run.job.clone(),
            });
            run.step = Step::CheckingLoss { current, decision };
            return;
        }
        self.act(key, current, decision, wait, now, out);
    }

    fn act(
        &mut self,
        key: &str,
        current: Option<Versioned>,
        decision: Decision,
        wait: Option<Wait>,
        now: Instant,
        out: &mut Effects,
    ) {
        match decision {
            Decision::Done => match current {
                Some(current) => self.confirm_final(key, current, now, out),
                None => self.close(key, None, now, out),
            },
            Decision::Adopt => {
                if let Some(run) = self.runs.get_mut(key) {
                    run.step = Step::OnRunner;
                }
            }
            Decision::Assign { attempt } => self.assign(key, current, attempt, wait, now, out),
            Decision::GiveUp { attempts } => {
                let state = current.as_ref().map(|c| &c.state);
                let reason = lease::give_up_reason(state, attempts, self.config.max_attempts);
                self.finish(key, current, attempts, Status::Error, reason, out);
            }
            Decision::Cancel => {
                let attempt = current.as_ref().map(|c| c.state.attempt).unwrap_or(0);
                let who = current
                    .as_ref()
                    .and_then(|c| c.state.cancel.clone())
                    .unwrap_or_default();
                let reason = format!("cancelled {who}");
                self.finish(key, current, attempt, Status::Cancelled, reason, out);
            }
        }
    }

    // ---- assigning ---------------------------------------------------------------------------

    /// Starts `attempt` on a free runner, or leaves the job waiting with the reason.
    fn assign(
        &mut self,
        key: &str,
        current: Option<Versioned>,
        attempt: u32,
        wait: Option<Wait>,
        now: Instant,
        out: &mut Effects,
    ) {
        let Some((picked, reason, unplaceable)) = self.place(key, now) else {
            return;
        };
        let Some(base) = self.base(key, current) else {
            return;
        };
        match picked {
            Some(runner) => self.start(key, base, runner, attempt, out),
            None => self.wait(key, base, (reason, unplaceable), wait, now, out),
        }
    }

    /// The runner for a held job, or why there is none: the reason, and whether no live runner
    /// could ever take it (it needs labels nobody alive has).
    fn place(&self, key: &str, now: Instant) -> Option<(Option<String>, String, bool)> {
        let run = self.runs.get(key)?;
        let candidates = self.candidates(now);
        let labels = &run.commit.labels;
        let picked = pick_runner(&candidates, labels, &self.picks).map(str::to_string);
        if picked.is_some() {
            return Some((picked, String::new(), false));
        }
        Some(
            if !labels.is_empty() && nobody_has_labels(&candidates, labels) {
                let reason = format!("waiting for a runner with labels [{}]", labels.join(", "));
                (None, reason, true)
            } else {
                (None, "waiting for a free runner".to_string(), false)
            },
        )
    }

    /// What a decision on a held job writes over: its `current` state (or a fresh `queued` one).
    fn base(&self, key: &str, current: Option<Versioned>) -> Option<Base> {
        let run = self.runs.get(key)?;
        let stale = self.stale_job_seq(key, current.as_ref().map(|c| &c.state));
        let created = matches!(run.known, Known::Absent);
        Some(match current {
            Some(c) => Base {
                state: c.state,
                revision: Some(c.revision),
                stale,
                created,
            },
            None => Base {
                state: JobState::queued(&run.commit, &run.job),
                revision: None,
                stale,
                created,
            },
        })
    }

    /// Claims `attempt` for `runner` (compare-and-set: of two dispatchers racing here, one
    /// write fails). The runner's slot counts as taken from now on.
    fn start(&mut self, key: &str, base: Base, runner: String, attempt: u32, out: &mut Effects) {
        if !self.runs.contains_key(key) {
            return;
        }
        self.add_load(&runner);
        let Some(run) = self.runs.get_mut(key) else {
            return;
        };
        let state = base.state.assign(&runner, attempt);
        run.step = Step::Assigning {
            to: Assignment {
                runner,
                attempt,
                state: state.clone(),
                stale: base.stale,
            },
            created: base.created,
        };
        out.push(Effect::WriteState {
            key: key.to_string(),
            state,
            revision: base.revision,
        });
    }

    /// Leaves the job waiting for a runner (`why`: the reason, and whether no live runner could
    /// take it), and records that in its state so `jetci status` can say why: a new commit only
    /// once it has waited a moment, a job that had a state at once (so a lost attempt's runner
    /// is cleared and, if it comes back, finds itself superseded). A run that no live runner
    /// could take, beyond [`MAX_UNPLACEABLE`] of them, is recorded at once and given back.
    fn wait(
        &mut self,
        key: &str,
        base: Base,
        why: (String, bool),
        wait: Option<Wait>,
        now: Instant,
        out: &mut Effects,
    ) {
        let (reason, unplaceable) = why;
        let over = unplaceable && self.over_unplaceable(key);
        let Some(run) = self.runs.get_mut(key) else {
            return;
        };
        let mut wait = match wait {
            Some(w) if w.reason == reason => Wait { unplaceable, ..w },
            _ => {
                tracing::info!(%key, %reason, "commit waits");
                Wait {
                    reason: reason.clone(),
                    unplaceable,
                    since: now,
                    recorded: false,
                }
            }
        };
        // Recorded when the stored state says so: our own write, a job handed back, or one
        // recorded by another dispatcher.
        wait.recorded = base.revision.is_some()
            && base.state.phase == JobPhase::Queued
            && base.state.runner.is_none()
            && base.state.reason.as_deref() == Some(reason.as_str());
        let due = over || now.saturating_duration_since(wait.since) >= RECORD_WAIT_AFTER;
        if wait.recorded || (base.revision.is_none() && !due) {
            let recorded = wait.recorded;
            run.step = Step::Waiting(wait);
            self.queue(key);
            if recorded && over {
                self.release(key, out);
            }
            return;
        }
        let state = base.state.requeue(reason);
        run.step = Step::RecordingWait {
            wait,
            state: state.clone(),
            stale: base.stale,
            created: base.created,
        };
        out.push(Effect::WriteState {
            key: key.to_string(),
            state,
            revision: base.revision,
        });
    }

    /// Whether held run `key` is a run of one job (not a pipeline's) and this dispatcher holds
    /// [`MAX_UNPLACEABLE`] other jobs no live runner could take: then it is given back.
    fn over_unplaceable(&self, key: &str) -> bool {
        let single = self.runs.get(key).is_some_and(|r| r.job.job.is_none());
        if !single {
            return false;
        }
        let others = self
            .runs
            .iter()
            .filter(|(k, r)| *k != key && matches!(&r.step, Step::Waiting(w) if w.unplaceable))
            .count();
        others >= MAX_UNPLACEABLE
    }

    /// Gives held run `key` (a run of one job, waiting with its state recorded) back to the
    /// stream, to come back after [`RELEASE_DELAY`]: it neither blocks nor is lost.
    fn release(&mut self, key: &str, out: &mut Effects) {
        let Some(run) = self.runs.remove(key) else {
            return;
        };
        self.schedule.remove(key);
        tracing::info!(%key, delay = ?RELEASE_DELAY, "no live runner has the labels the commit needs and too many such wait here; giving it back to the stream");
        out.push(Effect::Release {
            run: run.commit.key(),
            delay: RELEASE_DELAY,
        });
    }

    fn on_state_written(
        &mut self,
        key: &str,
        written: Result<u64, StateError>,
        now: Instant,
        out: &mut Effects,
    ) {
        let Some(run) = self.runs.get_mut(key) else {
            return;
        };
        match (std::mem::replace(&mut run.step, Step::Idle), written) {
            (Step::Assigning { to, .. }, Ok(revision)) => {
                self.sub_load(&to.runner);
                self.assigned(key, to, revision, now, out)
            }
            (
                Step::RecordingWait {
                    wait, state, stale, ..
                },
                Ok(revision),
            ) => {
                run.known = Known::State(state, revision);
                let unplaceable = wait.unplaceable;
                run.step = Step::Waiting(Wait {
                    recorded: true,
                    ..wait
                });
                if let Some(seq) = stale {
                    out.push(Effect::DeleteJobMessage { seq });
                }
                self.queue(key);
                if unplaceable && self.over_unplaceable(key) {
                    self.release(key, out);
                }
            }
            (step @ (Step::Assigning { .. } | Step::RecordingWait { .. }), Err(e)) => {
                run.known = Known::Unknown;
                let created = match &step {
                    Step::Assigning { to, created } => {
                        self.sub_load(&to.runner);
                        *created
                    }
                    Step::RecordingWait { created, .. } => *created,
                    _ => false,
                };
                if matches!(e, StateError::Conflict) && created {
                    // The state existed after all (a commit published again, a cancel request
                    // written early): decide again on what is there.
                    self.advance(key, now, out);
                } else if matches!(e, StateError::Conflict) {
                    tracing::debug!(%key, "another dispatcher moved the job first; deciding again next beat");
                } else {
                    tracing::warn!(%key, error = %e, "cannot record the assignment; trying again next beat");
                }
            }
            (Step::Replacing, result) => {
                run.known = Known::Unknown;
                if let Err(e) = result {
                    tracing::warn!(%key, error = %e, "cannot replace the job state");
                }
            }
            (Step::RecordingFinal, result) => {
                run.known = Known::Unknown;
                if let Err(e) = result {
                    tracing::warn!(%key, error = %e, "cannot mark the run final; trying again next beat");
                }
            }
            (other, _) => run.step = other,
        }
    }

    /// `assigned` is written at `revision`: the job is on its runner; publish its message.
    fn assigned(
        &mut self,
        key: &str,
        to: Assignment,
        revision: u64,
        now: Instant,
        out: &mut Effects,
    ) {
        let Some(run) = self.runs.get_mut(key) else {
            return;
        };
        let Assignment {
            runner,
            attempt,
            state,
            stale,
        } = to;
        let job = JobMsg::for_attempt(&run.commit, run.seq, &run.job, &runner, attempt);
        run.known = Known::State(state.clone(), revision);
        run.step = Step::OnRunner;
        if let Some(seq) = stale {
            out.push(Effect::DeleteJobMessage { seq });
        }
        self.pick_count += 1;
        self.picks.insert(runner.clone(), self.pick_count);
        let (repo, branch) = (run.commit.repo.clone(), run.commit.branch.clone());
        self.set_active(
            key,
            Active {
                runner,
                written: now,
                repo,
                branch,
            },
        );
        out.push(Effect::PublishJob {
            key: key.to_string(),
            job,
            assigned: state,
            revision,
        });
    }

    fn on_job_stored(&mut self, key: &str, stored: Result<u64, String>) {
        match stored {
            // A later attempt's message has a higher sequence, so a late ack never hides it.
            Ok(seq) => {
                if let Some(run) = self.runs.get_mut(key) {
                    run.job_seq = run.job_seq.max(Some(seq));
                }
            }
            // The state says `assigned`; with no heartbeat it goes stale after the lease and the
            // job is assigned again.
            Err(e) => {
                tracing::warn!(%key, error = %e, "the job was not stored; it is retried after the lease")
            }
        }
    }

    /// The job's message can never be published (larger than the server takes): publishing it
    /// again after every lease would keep its runner counted busy forever, so the run ends now
    /// with an `error` result (clipped to fit when it is published) that says why.
    fn on_job_refused(&mut self, key: &str, reason: String, out: &mut Effects) {
        let Some(run) = self.runs.get(key) else {
            return;
        };
        let current = match &run.known {
            Known::State(state, revision) => Some(Versioned {
                state: state.clone(),
                revision: *revision,
                age: Duration::ZERO,
            }),
            Known::Absent | Known::Unknown => None,
        };
        let attempt = current.as_ref().map_or(0, |c| c.state.attempt);
        self.clear_active(key);
        let reason = format!(
            "the job cannot be sent to a runner: {reason} (its commit's branch, author or summary is too long)"
        );
        self.finish(key, current, attempt, Status::Error, reason, out);
    }

    /// Where the previous attempt's job message is: recorded in its state by the runner that
    /// claimed it, or remembered from publishing it.
    fn stale_job_seq(&self, key: &str, previous: Option<&JobState>) -> Option<u64> {
        previous
            .and_then(|s| s.job_seq)
            .or_else(|| self.runs.get(key).and_then(|r| r.job_seq))
    }

    /// The job's state says `final`: close the run once its result is found stored.
    fn confirm_final(&mut self, key: &str, current: Versioned, now: Instant, out: &mut Effects) {
        let Some(run) = self.runs.get_mut(key) else {
            return;
        };
        out.push(Effect::LookUpResult {
            key: key.to_string(),
            job: run.job.clone(),
        });
        run.step = Step::CheckingFinal {
            current,
            since: now,
        };
    }

    /// A `final` state with no stored result (written by hand, or forged): the run has no
    /// verdict, so its job runs again as the next attempt, or is given up after the last.
    fn run_again(&mut self, key: &str, current: Versioned, now: Instant, out: &mut Effects) {
        let attempts = current.state.attempt;
        let max = self.config.max_attempts;
        tracing::warn!(%key, attempt = attempts, "the job's state says final but its run has no stored result; running it again");
        if attempts >= max {
            let reason = format!(
                "attempt {attempts} of {max}: the job's state said final but no result was stored; giving up"
            );
            self.finish(key, Some(current), attempts, Status::Error, reason, out);
        } else {
            self.assign(key, Some(current), attempts + 1, None, now, out);
        }
    }

    // ---- finishing ---------------------------------------------------------------------------

    /// Gives the run a final result without a runner (given up, or cancelled while not running).
    fn finish(
        &mut self,
        key: &str,
        current: Option<Versioned>,
        attempt: u32,
        status: Status,
        reason: String,
        out: &mut Effects,
    ) {
        let stale = self.stale_job_seq(key, current.as_ref().map(|c| &c.state));
        let Some(run) = self.runs.get_mut(key) else {
            return;
        };
        let result = ResultMsg::without_run(
            &self.config.names,
            &run.commit,
            &run.job,
            run.seq,
            attempt,
            status,
            reason,
        );
        let revision = current.as_ref().map(|c| c.revision);
        let state = match current {
            Some(c) => c.state,
            None => JobState::queued(&run.commit, &run.job),
        };
        run.step = Step::Finishing {
            stale,
            status,
            reason: result.reason.clone().unwrap_or_default(),
        };
        out.push(Effect::FinishWithoutRunner {
            key: key.to_string(),
            result,
            state,
            revision,
        });
    }

    fn on_finished(&mut self, key: &str, stored: bool, now: Instant, out: &mut Effects) {
        let Some(run) = self.runs.get_mut(key) else {
            return;
        };
        let Step::Finishing {
            stale,
            status,
            reason,
        } = std::mem::replace(&mut run.step, Step::Idle)
        else {
            return;
        };
        if !stored {
            // Nothing was written: the next tick decides again.
            return;
        }
        tracing::warn!(%key, %status, %reason, "run finished without a runner");
        if let Some(seq) = stale {
            out.push(Effect::DeleteJobMessage { seq });
        }
        let attempt = match &run.known {
            Known::State(s, _) => s.attempt,
            _ => 0,
        };
        self.clear_active(key);
        let ended = Outcome {
            status,
            runner: String::new(),
            attempt,
            duration_ms: 0,
            tests: None,
            reason: Some(reason),
            carried_from: None,
        };
        self.close_job(key, ended, now, out);
    }

    /// The job has its final `result` (found stored; `None` when it is not at hand): let go of
    /// it, and ack its commit, or for a pipeline's job, go on with the run.
    fn close(&mut self, key: &str, result: Option<&ResultMsg>, now: Instant, out: &mut Effects) {
        let ended = match result {
            Some(r) => outcome_of(r),
            None => {
                let state = match self.runs.get(key).map(|r| &r.known) {
                    Some(Known::State(s, _)) => Some(s.clone()),
                    _ => None,
                };
                Outcome {
                    status: state
                        .as_ref()
                        .and_then(|s| s.status)
                        .unwrap_or(Status::Error),
                    runner: state
                        .as_ref()
                        .and_then(|s| s.runner.clone())
                        .unwrap_or_default(),
                    attempt: state.as_ref().map_or(0, |s| s.attempt),
                    duration_ms: 0,
                    tests: None,
                    reason: state.and_then(|s| s.reason),
                    carried_from: None,
                }
            }
        };
        self.close_job(key, ended, now, out);
    }

    fn close_job(&mut self, key: &str, ended: Outcome, now: Instant, out: &mut Effects) {
        let Some(run) = self.runs.remove(key) else {
            return;
        };
        self.schedule.remove(key);
        match &run.job.job {
            None => out.push(Effect::AckCommit {
                run: run.commit.key(),
            }),
            Some(token) => self.job_ended(&run.commit.key(), token, ended, now, out),
        }
    }

    // ---- pipelines ---------------------------------------------------------------------------

    fn on_pipeline(
        &mut self,
        commit: CommitMsg,
        seq: u64,
        redelivered: bool,
        now: Instant,
        out: &mut Effects,
    ) {
        let key = commit.key();
        let progress = Progress::new(&commit.jobs, commit.fail_fast);
        tracing::info!(%key, jobs = commit.jobs.len(), "pipeline run taken");
        let mut asks = vec![Effect::ReadState { key: key.clone() }];
        if redelivered {
            asks.push(Effect::LookUpResult {
                key: key.clone(),
                job: commit.only_job(),
            });
            for plan in commit.jobs.iter().filter(|j| j.carried.is_none()) {
                let job = commit.job(&plan.job);
                asks.push(Effect::LookUpResult {
                    key: job.key(),
                    job: job.clone(),
                });
                asks.push(Effect::ReadState { key: job.key() });
            }
        }
        self.pipelines.insert(
            key,
            Pipeline {
                commit,
                seq,
                progress,
                redelivered,
                step: Stage::Taking {
                    awaiting: asks.len(),
                },
                taken: now,
                marker: None,
                found: vec![],
                live: vec![],
            },
        );
        out.extend(asks);
    }

    /// The run and job token of `key` when it is a job of a pipeline being taken.
    fn taking(&self, key: &str) -> Option<(String, String)> {
        let (run, token) = key.rsplit_once('.')?;
        let p = self.pipelines.get(run)?;
        matches!(p.step, Stage::Taking { .. }).then(|| (run.to_string(), token.to_string()))
    }

    /// One answer more for pipeline `key` being taken; after the last, the run goes on.
    fn answered(&mut self, key: &str, now: Instant, out: &mut Effects) {
        let Some(p) = self.pipelines.get_mut(key) else {
            return;
        };
        let Stage::Taking { awaiting } = p.step else {
            return;
        };
        if awaiting > 1 {
            p.step = Stage::Taking {
                awaiting: awaiting - 1,
            };
            return;
        }
        p.step = Stage::Running;
        // Every stored job result first (in plan order, as they were found), so a failed
        // sibling's stops a fail_fast run before anything starts.
        for (token, outcome) in std::mem::take(&mut p.found) {
            p.progress.finish(&token, outcome);
        }
        // Jobs another dispatcher started (or a user asked to cancel) are held again.
        let mut held = vec![];
        for token in std::mem::take(&mut p.live) {
            held.extend(p.progress.force_start(&token));
        }
        let cancel = p
            .marker
            .as_ref()
            .and_then(|m| m.state.cancel.clone())
            .filter(|_| !p.progress.is_done());
        if let Some(who) = &cancel {
            tracing::info!(%key, %who, "the run was cancelled before this dispatcher took it");
            p.progress.cancel(who);
        }
        let stop = p.progress.stopped().map(str::to_string);
        let mut keys = vec![];
        for plan in held {
            keys.push(self.hold(key, &plan, Known::Unknown));
        }
        for job_key in keys {
            self.advance(&job_key, now, out);
            if let Some(by) = &stop {
                self.stop_job(&job_key, by, out);
            }
        }
        self.start_ready(key, now, out);
    }

    /// The answer to whether a redelivered pipeline's run has its result.
    fn on_pipeline_result(&mut self, key: &str, stored: bool, now: Instant, out: &mut Effects) {
        let Some(p) = self.pipelines.get(key) else {
            return;
        };
        if !matches!(p.step, Stage::Taking { .. }) {
            return;
        }
        if stored {
            tracing::debug!(%key, "pipeline run already has its result");
            self.pipelines.remove(key);
            out.push(Effect::AckCommit {
                run: key.to_string(),
            });
        } else {
            self.answered(key, now, out);
        }
    }

    /// Holds job `plan` of pipeline `key` as a job of its own; returns its key.
    fn hold(&mut self, key: &str, plan: &crate::messages::JobPlan, known: Known) -> String {
        let Some(p) = self.pipelines.get(key) else {
            return String::new();
        };
        let job = p.commit.job(&plan.job);
        let job_key = job.key();
        let run = Run {
            commit: job_commit(&p.commit, plan),
            job,
            seq: p.seq,
            job_seq: None,
            known,
            step: Step::Idle,
        };
        self.runs.insert(job_key.clone(), run);
        job_key
    }

    /// Asks held job `job_key` to stop (`by`: why, or who asked).
    fn stop_job(&self, job_key: &str, by: &str, out: &mut Effects) {
        let Some(run) = self.runs.get(job_key) else {
            return;
        };
        out.push(Effect::CancelJob {
            key: job_key.to_string(),
            queued: JobState::queued(&run.commit, &run.job),
            by: by.to_string(),
        });
    }

    /// A user asked to cancel the whole run `key` (its own state, `marker`, says by whom): what
    /// runs is asked to stop, nothing starts any more, and the run ends `cancelled`.
    fn cancel_run(&mut self, key: &str, marker: Versioned, now: Instant, out: &mut Effects) {
        let Some(p) = self.pipelines.get_mut(key) else {
            return;
        };
        let who = marker.state.cancel.clone().unwrap_or_default();
        p.marker = Some(marker);
        if p.step != Stage::Running || p.progress.cancelled().is_some() {
            return;
        }
        tracing::info!(%key, %who, "pipeline run cancelled");
        for stop in p.progress.cancel(&who) {
            let job = p.commit.job(&stop.job);
            let commit = job_commit(&p.commit, &stop);
            out.push(Effect::CancelJob {
                key: job.key(),
                queued: JobState::queued(&commit, &job),
                by: who.clone(),
            });
        }
        self.start_ready(key, now, out);
    }

    /// Holds every job of the run that may start now (each then goes its own way), and
    /// publishes the run's result once every job has ended.
    fn start_ready(&mut self, key: &str, now: Instant, out: &mut Effects) {
        let Some(p) = self.pipelines.get_mut(key) else {
            return;
        };
        let ready = p.progress.ready();
        // A redelivered commit's jobs may have states already: read before deciding.
        let known = if p.redelivered {
            Known::Unknown
        } else {
            Known::Absent
        };
        let mut keys = Vec::with_capacity(ready.len());
        for plan in ready {
            keys.push(self.hold(key, &plan, known.clone()));
        }
        for job_key in keys {
            self.advance(&job_key, now, out);
        }
        self.publish_if_done(key, now, out);
    }

    /// Job `token` of pipeline `key` ended: go on with the run.
    fn job_ended(
        &mut self,
        key: &str,
        token: &str,
        ended: Outcome,
        now: Instant,
        out: &mut Effects,
    ) {
        let Some(p) = self.pipelines.get_mut(key) else {
            return;
        };
        tracing::info!(run = %key, job = token, status = %ended.status, "pipeline job ended");
        for stop in p.progress.finish(token, ended) {
            let job = p.commit.job(&stop.job);
            let commit = job_commit(&p.commit, &stop);
            out.push(Effect::CancelJob {
                key: job.key(),
                queued: JobState::queued(&commit, &job),
                by: p.progress.stopped().unwrap_or("fail_fast").to_string(),
            });
        }
        self.start_ready(key, now, out);
    }

    fn publish_if_done(&mut self, key: &str, now: Instant, out: &mut Effects) {
        let Some(p) = self.pipelines.get_mut(key) else {
            return;
        };
        if !matches!(p.step, Stage::Running | Stage::Unpublished) {
            return;
        }
        let Some(verdict) = p.progress.verdict() else {
            return;
        };
        let duration = now.saturating_duration_since(p.taken).as_millis() as u64;
        let result = verdict.result(&self.config.names, &p.commit, p.seq, duration);
        p.step = Stage::Publishing;
        out.push(Effect::PublishRunResult {
            key: key.to_string(),
            result,
        });
    }

    fn on_run_result_published(&mut self, key: &str, stored: bool, out: &mut Effects) {
        let Some(p) = self.pipelines.get_mut(key) else {
            return;
        };
        if p.step != Stage::Publishing {
            return;
        }
        if !stored {
            // NATS did not take it: tried again at the next tick.
            p.step = Stage::Unpublished;
            return;
        }
        let p = self.pipelines.remove(key);
        // A cancel request on the run is answered: its state says so (result first, then state).
        if let Some(m) = p.and_then(|p| p.marker) {
            if m.state.phase != JobPhase::Final {
                let why = m.state.cancel.as_ref().map(|w| format!("cancelled {w}"));
                out.push(Effect::WriteState {
                    key: key.to_string(),
                    state: m.state.finish(Status::Cancelled, why),
                    revision: Some(m.revision),
                });
            }
        }
        out.push(Effect::AckCommit {
            run: key.to_string(),
        });
    }

    // ---- the buckets' watches ----------------------------------------------------------------

    fn on_job_state(
        &mut self,
        key: &str,
        state: Option<Versioned>,
        now: Instant,
        out: &mut Effects,
    ) {
        let Some(v) = state else {
            self.clear_active(key);
            return;
        };
        if v.state.cancel.is_some() && v.state.phase != JobPhase::Final {
            if self.pipelines.contains_key(key) {
                // `jetci cancel REPO SHA` of a pipeline's run this dispatcher holds.
                return self.cancel_run(key, v, now, out);
            }
            if let Some((run, token)) = key.rsplit_once('.') {
                // `jetci cancel --job` of a job that has not started: it ends `cancelled` here,
                // with a result of its own, and the jobs that need it are skipped.
                let pending = self.pipelines.get_mut(run).and_then(|p| {
                    (p.step == Stage::Running && !self.runs.contains_key(key))
                        .then(|| p.progress.force_start(token))
                        .flatten()
                });
                if let Some(plan) = pending {
                    tracing::info!(%key, "a job cancelled before it started");
                    self.hold(run, &plan, Known::Unknown);
                } else if !self.runs.contains_key(key) {
                    // Asked too late: the job was skipped without a state. Its state says so,
                    // so that it does not look queued.
                    let skipped = self.pipelines.get(run).and_then(|p| {
                        let o = p.progress.ended(token)?;
                        (o.status == Status::Skipped).then(|| o.reason.clone())
                    });
                    if let Some(reason) = skipped {
                        out.push(Effect::WriteState {
                            key: key.to_string(),
                            state: v.state.finish(Status::Skipped, reason),
                            revision: Some(v.revision),
                        });
                        return;
                    }
                }
            }
        }
        let held = match self.runs.get_mut(key) {
            Some(run) => {
                let newer = match &run.known {
                    Known::State(_, revision) => *revision < v.revision,
                    Known::Absent | Known::Unknown => true,
                };
                if newer {
                    run.known = Known::State(v.state.clone(), v.revision);
                }
                true
            }
            None => false,
        };
        match v.state.phase {
            JobPhase::Assigned | JobPhase::Running => {
                if let Some(runner) = v.state.runner.clone() {
                    let written = self.since(v.age, now);
                    let (repo, branch) = (v.state.repo.clone(), v.state.branch.clone());
                    self.set_active(
                        key,
                        Active {
                            runner,
                            written,
                            repo,
                            branch,
                        },
                    );
                }
            }
            JobPhase::Final => {
                let freed = self.clear_active(key);
                if freed.is_some() || held {
                    out.push(Effect::CountResult {
                        status: v.state.status,
                        job: v.state.job.is_some(),
                    });
                }
                if held {
                    self.confirm_final(key, v, now, out);
                }
                if let Some(runner) = freed {
                    // A slot of `runner` is free: the waiting jobs it can take.
                    self.assign_to(&runner, now, out);
                }
                return;
            }
            JobPhase::Queued => {
                self.clear_active(key);
            }
        }
        if held && v.state.cancel.is_some() {
            // A cancel request for a job this dispatcher holds: a waiting job ends now.
            self.advance(key, now, out);
        }
    }

    fn on_runner(
        &mut self,
        key: String,
        info: RunnerInfo,
        age: Duration,
        revision: u64,
        now: Instant,
        out: &mut Effects,
    ) {
        if info.id != key {
            // An entry that claims to be another runner than its key (forged, or written by
            // hand): trusted, it would send jobs to the subject of a runner that cannot take
            // them. Ignored, and whatever the key held before is forgotten.
            tracing::warn!(%key, id = %info.id, "ignoring a runner entry whose id is not its key");
            self.forget_runner(&key);
            return;
        }
        let written = self.since(age, now);
        let confirmed = self.unconfirmed.get(&key).is_some_and(|at| revision > *at);
        if confirmed {
            self.unconfirmed.remove(&key);
        }
        let new = !self.runners.contains_key(&key);
        if new {
            tracing::info!(runner = %info.id, labels = ?info.labels, capacity = info.capacity, "runner joined");
        }
        let old = self.runners.insert(
            key.clone(),
            Presence {
                info,
                written,
                revision,
                counted: None,
            },
        );
        self.offered.replace(old.and_then(|p| p.counted), None);
        self.recount(&key, now);
        if new || confirmed {
            // Only a runner that may take a job now costs more than this entry: the waiting
            // jobs it can take, as many as it has free slots (flat per entry, however many
            // runners there are: 10,000 forged entries must not each look at every job).
            self.assign_to(&key, now, out);
        }
    }

    // ---- liveness ----------------------------------------------------------------------------

    /// Every [`CHECK_EVERY`]: extend held commits (each lease/3), probe late runners, decide
    /// again on stale and waiting jobs.
    fn on_tick(&mut self, now: Instant, out: &mut Effects) {
        let beat = self.beat();
        if now.saturating_duration_since(self.extended) >= beat {
            self.extended = now;
            out.push(Effect::ExtendCommits);
        }
        let mut recheck = Vec::new();
        let mut unconfirmed = Vec::new();
        for (key, run) in &self.runs {
            if run.step.in_flight() {
                continue;
            }
            if matches!(run.step, Step::UnconfirmedFinal { .. }) {
                unconfirmed.push(key.clone());
                continue;
            }
            if matches!(run.step, Step::Waiting(_)) {
                recheck.push(key.clone());
                continue;
            }
            let Some(active) = self.active.get(key) else {
                recheck.push(key.clone());
                continue;
            };
            let age = now.saturating_duration_since(active.written);
            if age >= self.config.lease {
                recheck.push(key.clone());
            } else if age > beat / 2 {
                // The next heartbeat is due: probe the runner (at most every CHECK_EVERY); NATS
                // answers "no responders" at once if the runner's connection is gone, so a
                // crashed runner's job moves well before its lease ends.
                let due = self
                    .probed
                    .get(&active.runner)
                    .is_none_or(|at| now.saturating_duration_since(*at) >= CHECK_EVERY);
                if due {
                    self.probed.insert(active.runner.clone(), now);
                    out.push(Effect::Probe {
                        runner: active.runner.clone(),
                    });
                }
            }
        }
        for key in unconfirmed {
            if let Some(run) = self.runs.get_mut(&key) {
                if let Step::UnconfirmedFinal { current, since } =
                    std::mem::replace(&mut run.step, Step::Idle)
                {
                    run.step = Step::CheckingFinal { current, since };
                    out.push(Effect::LookUpResult {
                        key: key.clone(),
                        job: run.job.clone(),
                    });
                }
            }
        }
        let unpublished: Vec<String> = self
            .pipelines
            .iter()
            .filter(|(_, p)| p.step == Stage::Unpublished)
            .map(|(k, _)| k.clone())
            .collect();
        for key in unpublished {
            self.publish_if_done(&key, now, out);
        }
        let forget = self.config.lease * FORGET_AFTER_LEASES;
        self.runners
            .retain(|_, p| now.saturating_duration_since(p.written) < forget);
        // Every runner counted again: presences that grew older than the lease leave `offered`.
        self.recount_all(now);
        for key in recheck {
            // A job that waits (and is recorded, or not yet due to be) waits for a free slot,
            // which the fair share gives below; one that waits, recorded, for labels no live
            // runner has waits for a runner to join (which decides on it at once, `on_runner`).
            let idle_wait = match self.runs.get(&key).map(|r| &r.step) {
                Some(Step::Waiting(w)) => {
                    w.recorded || now.saturating_duration_since(w.since) < RECORD_WAIT_AFTER
                }
                _ => false,
            };
            if !idle_wait {
                self.advance(&key, now, out);
            }
        }
        if self.offered.free() > 0 && !self.schedule.is_empty() {
            let free: Vec<String> = self
                .runners
                .values()
                .filter(|p| p.counted.is_some_and(|(all, busy)| busy < all))
                .map(|p| p.info.id.clone())
                .collect();
            for id in free {
                self.assign_to(&id, now, out);
            }
        }
    }

    fn on_probe(&mut self, runner: &str, gone: bool, now: Instant, out: &mut Effects) {
        // Right after a reconnect the runners are reconnecting too: their silence proves nothing.
        let settling = self
            .reconnected
            .is_some_and(|at| now.saturating_duration_since(at) < self.config.lease);
        if !gone || settling {
            return;
        }
        let Some(presence) = self.runners.get(runner) else {
            return;
        };
        tracing::warn!(%runner, "runner's connection is gone; moving its jobs now");
        self.gone.insert(runner.to_string(), presence.revision);
        self.recount(runner, now);
        let keys: Vec<String> = self
            .active
            .iter()
            .filter(|(k, a)| a.runner == runner && self.runs.contains_key(*k))
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            self.advance(&key, now, out);
        }
    }

    /// Back from an outage: every job and runner gets a full lease from now to show it is alive,
    /// and no runner gets a new job before it wrote its presence again (a refresh after the
    /// outage: a runner SIGKILLed before it never writes one).
    fn on_reconnect(&mut self, now: Instant) {
        tracing::info!(
            jobs = self.active.len(),
            "connected to NATS; lease clocks restart"
        );
        self.reconnected = Some(now);
        for a in self.active.values_mut() {
            a.written = a.written.max(now);
        }
        for (id, p) in self.runners.iter_mut() {
            p.written = p.written.max(now);
            self.unconfirmed.insert(id.clone(), p.revision);
        }
        self.gone.clear();
        self.recount_all(now);
    }

    /// The time a state or presence written `age` before `now` counts as, after an outage.
    fn since(&self, age: Duration, now: Instant) -> Instant {
        let written = now.checked_sub(age).unwrap_or(now);
        match self.reconnected {
            Some(at) => written.max(at),
            None => written,
        }
    }

    // ---- slots -------------------------------------------------------------------------------

    /// A slot of runner `id` may be free (it joined, came back, or finished a job): gives each
    /// of its free slots the waiting job the fair share picks for it ([`Schedule::pick`]: the
    /// repository, then the branch, with the fewest jobs running, among the jobs its labels
    /// cover; oldest commit first within a branch). Nothing when it is not available or full,
    /// so a runner entry costs the same however many runners and jobs there are, bar the jobs
    /// it takes.
    fn assign_to(&mut self, id: &str, now: Instant, out: &mut Effects) {
        let Some(p) = self.runners.get(id) else {
            return;
        };
        if !self.available(p, now) {
            return;
        }
        let free = p.info.capacity.saturating_sub(self.load_of(id));
        let mut room = free.saturating_sub(self.reading());
        let labels = p.info.labels.clone();
        while room > 0 {
            let Some(pick) = self.schedule.pick(&labels) else {
                break;
            };
            self.schedule.remove(&pick.key);
            let waiting = self
                .runs
                .get(&pick.key)
                .is_some_and(|r| matches!(r.step, Step::Waiting(_)));
            if waiting {
                room -= 1;
                self.advance(&pick.key, now, out);
            }
        }
    }

    /// Puts held job `key`, now waiting, in the fair share's queue.
    fn queue(&mut self, key: &str) {
        let Some(run) = self.runs.get(key) else {
            return;
        };
        self.schedule.add(Ready {
            key: key.to_string(),
            repo: run.commit.repo.clone(),
            branch: run.commit.branch.clone(),
            position: run.seq,
            labels: run.commit.labels.clone(),
            since: run.seq,
        });
    }

    /// Held jobs whose decision waits for a read (each may take a slot once it is answered).
    fn reading(&self) -> u32 {
        self.runs
            .values()
            .filter(|r| matches!(r.step, Step::Reading { .. } | Step::CheckingLoss { .. }))
            .count() as u32
    }

    /// A runner is alive while its presence entry is younger than the lease and no probe found
    /// it gone since its last refresh.
    fn runner_alive(&self, id: &str, now: Instant) -> bool {
        let Some(p) = self.runners.get(id) else {
            return false;
        };
        now.saturating_duration_since(p.written) < self.config.lease
            && self.gone.get(id) != Some(&p.revision)
    }

    /// Whether runner `p` may be given a job: it accepts jobs, is alive, and wrote its presence
    /// since the last reconnect.
    fn available(&self, p: &Presence, now: Instant) -> bool {
        p.info.accepting
            && self.runner_alive(&p.info.id, now)
            && !self.unconfirmed.contains_key(&p.info.id)
    }

    /// Jobs on runner `id`: assigned or running on it, and being assigned to it here.
    fn load_of(&self, id: &str) -> u32 {
        self.load.get(id).copied().unwrap_or(0)
    }

    /// Records that job `key` is assigned or running on a runner (replacing what it was on).
    fn set_active(&mut self, key: &str, active: Active) {
        self.add_load(&active.runner);
        self.schedule.running(&active.repo, &active.branch, 1);
        if let Some(old) = self.active.insert(key.to_string(), active) {
            self.sub_load(&old.runner);
            self.schedule.running(&old.repo, &old.branch, -1);
        }
    }

    /// Job `key` is no longer on a runner; returns the runner it was on.
    fn clear_active(&mut self, key: &str) -> Option<String> {
        let old = self.active.remove(key)?;
        self.sub_load(&old.runner);
        self.schedule.running(&old.repo, &old.branch, -1);
        Some(old.runner)
    }

    /// One job more on `runner`.
    fn add_load(&mut self, runner: &str) {
        *self.load.entry(runner.to_string()).or_default() += 1;
        self.rebusy(runner);
    }

    /// One job fewer on `runner`.
    fn sub_load(&mut self, runner: &str) {
        if let Some(n) = self.load.get_mut(runner) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.load.remove(runner);
            }
        }
        self.rebusy(runner);
    }

    /// Runner `id`'s busy slots in `offered` after its load changed.
    fn rebusy(&mut self, id: &str) {
        let load = self.load_of(id);
        let Some(p) = self.runners.get_mut(id) else {
            return;
        };
        if let Some((all, busy)) = p.counted {
            let new = Some((all, load.min(all)));
            p.counted = new;
            self.offered.replace(Some((all, busy)), new);
        }
    }

    /// Runner `id` counted again in `offered` at `now`.
    fn recount(&mut self, id: &str, now: Instant) {
        let Some(p) = self.runners.get(id) else {
            return;
        };
        let cap = p.info.capacity;
        let new = self
            .available(p, now)
            .then(|| (cap, self.load_of(id).min(cap)));
        if let Some(p) = self.runners.get_mut(id) {
            let old = std::mem::replace(&mut p.counted, new);
            self.offered.replace(old, new);
        }
    }

    /// Every runner counted again at `now` (each tick, and after a reconnect).
    fn recount_all(&mut self, now: Instant) {
        let mut offered = Offered::default();
        let counted: Vec<(String, Option<(u32, u32)>)> = self
            .runners
            .values()
            .map(|p| {
                let cap = p.info.capacity;
                let c = self
                    .available(p, now)
                    .then(|| (cap, self.load_of(&p.info.id).min(cap)));
                offered.replace(None, c);
                (p.info.id.clone(), c)
            })
            .collect();
        for (id, c) in counted {
            if let Some(p) = self.runners.get_mut(&id) {
                p.counted = c;
            }
        }
        self.offered = offered;
    }

    /// Runner `id`'s entry is gone.
    fn forget_runner(&mut self, id: &str) {
        if let Some(p) = self.runners.remove(id) {
            self.offered.replace(p.counted, None);
        }
    }

    /// Every known runner with its load.
    fn candidates(&self, now: Instant) -> Vec<Candidate<'_>> {
        self.runners
            .values()
            .map(|p| Candidate {
                id: p.info.id.as_str(),
                labels: &p.info.labels,
                capacity: p.info.capacity,
                busy: self.load_of(&p.info.id),
                available: self.available(p, now),
            })
            .collect()
    }

    /// Held jobs waiting for a runner: all of them, those no live runner could take, and
    /// about how many bytes they hold ([`weight`]).
    fn waiting(&self) -> (u32, u32, usize) {
        let (mut all, mut unplaceable, mut bytes) = (0, 0, 0);
        for r in self.runs.values() {
            if let Step::Waiting(w) = &r.step {
                all += 1;
                unplaceable += u32::from(w.unplaceable);
                bytes += weight(&r.commit);
            }
        }
        (all, unplaceable, bytes)
    }
}

/// About how many bytes a held commit takes: its text fields and its jobs' (the message's
/// size in memory, to a few dozen bytes each).
fn weight(c: &CommitMsg) -> usize {
    let texts = [&c.repo, &c.url, &c.branch, &c.sha, &c.author, &c.summary];
    let jobs: usize = c
        .jobs
        .iter()
        .map(|j| {
            let lists = j.needs.iter().chain(&j.labels).map(|t| t.len() + 24);
            64 + j.name.len() + j.job.len() + lists.sum::<usize>()
        })
        .sum();
    256 + texts.iter().map(|t| t.len()).sum::<usize>()
        + c.labels.iter().map(|l| l.len() + 24).sum::<usize>()
        + jobs
}

/// How a job ended, by its stored result.
fn outcome_of(r: &ResultMsg) -> Outcome {
    Outcome {
        status: r.status,
        runner: r.runner.clone(),
        attempt: r.attempt,
        duration_ms: r.duration_ms,
        tests: r.tests.clone(),
        reason: r.reason.clone(),
        carried_from: None,
    }
}

/// The commit as one of its pipeline's jobs sees it: that job's labels, and that job alone of
/// the plan (for its name), so that holding 256 jobs does not hold 256 copies of the plan.
fn job_commit(commit: &CommitMsg, plan: &crate::messages::JobPlan) -> CommitMsg {
    CommitMsg {
        v: commit.v,
        repo: commit.repo.clone(),
        url: commit.url.clone(),
        branch: commit.branch.clone(),
        sha: commit.sha.clone(),
        run: commit.run,
        labels: plan.labels.clone(),
        author: commit.author.clone(),
        summary: commit.summary.clone(),
        published_at: commit.published_at,
        jobs: vec![crate::messages::JobPlan {
            carried: None,
            ..plan.clone()
        }],
        fail_fast: false,
    }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
