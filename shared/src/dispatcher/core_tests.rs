//! Every transition of the dispatcher's core, driven by events and checked by the effects it
//! returns: no NATS server, no clock but the one the tests move.

use super::*;
use crate::messages::{now, JobPlan, VERSION};

const LEASE: Duration = Duration::from_secs(3);
const MS: fn(u64) -> Duration = Duration::from_millis;

/// A core and the time the tests move by hand.
struct World {
    core: Core,
    now: Instant,
}

impl World {
    fn new() -> World {
        World::with_attempts(3)
    }

    fn with_attempts(max_attempts: u32) -> World {
        let now = Instant::now();
        let config = Config {
            lease: LEASE,
            max_attempts,
            names: Names::default(),
        };
        World {
            core: Core::new(config, now),
            now,
        }
    }

    fn later(&mut self, by: Duration) {
        self.now += by;
    }

    fn on(&mut self, event: Event) -> Vec<Effect> {
        self.core.handle(event, self.now)
    }

    /// A runner writes its presence (now).
    fn runner(&mut self, id: &str, labels: &[&str], capacity: u32) -> Vec<Effect> {
        self.runner_at(id, labels, capacity, 1)
    }

    fn runner_at(&mut self, id: &str, labels: &[&str], capacity: u32, rev: u64) -> Vec<Effect> {
        self.on(Event::RunnerSeen {
            key: id.into(),
            info: runner_info(id, labels, capacity, true),
            age: Duration::ZERO,
            revision: rev,
        })
    }

    /// Commit `i` delivered for the first time at stream sequence `i`.
    fn deliver(&mut self, i: u64) -> Vec<Effect> {
        self.on(Event::CommitDelivered {
            commit: commit(i),
            seq: i,
            redelivered: false,
        })
    }

    fn written(&mut self, i: u64, revision: u64) -> Vec<Effect> {
        self.on(Event::StateWritten {
            key: key(i),
            written: Ok(revision),
        })
    }

    fn read(&mut self, i: u64, state: Option<Versioned>) -> Vec<Effect> {
        self.on(Event::StateRead {
            key: key(i),
            read: Ok(state),
        })
    }

    fn looked_up(&mut self, i: u64, result: Option<ResultMsg>) -> Vec<Effect> {
        self.on(Event::ResultLookedUp {
            key: key(i),
            result,
        })
    }

    fn watched(&mut self, i: u64, state: JobState, revision: u64, age: Duration) -> Vec<Effect> {
        self.on(Event::JobStateChanged {
            key: key(i),
            state: Some(versioned(state, revision, age)),
        })
    }

    fn tick(&mut self) -> Vec<Effect> {
        self.on(Event::Tick)
    }

    /// Commit `i` delivered and assigned to `runner` (written at revision `rev`), its job
    /// published; returns the assigned state.
    fn assigned(&mut self, i: u64, runner: &str, rev: u64) -> JobState {
        let effects = self.deliver(i);
        let state = assignment(&effects, runner, 1);
        let effects = self.written(i, rev);
        assert!(
            matches!(&effects[..], [Effect::PublishJob { job, .. }] if job.runner == runner),
            "{effects:?}"
        );
        state
    }
}

fn commit(i: u64) -> CommitMsg {
    CommitMsg {
        v: VERSION,
        repo: "app".into(),
        url: "/srv/app".into(),
        branch: "main".into(),
        sha: format!("{i:040x}"),
        run: 1,
        labels: vec![],
        author: String::new(),
        summary: String::new(),
        published_at: now(),
        jobs: vec![],
        fail_fast: false,
    }
}

fn key(i: u64) -> String {
    commit(i).only_job().key()
}

fn runner_info(id: &str, labels: &[&str], capacity: u32, accepting: bool) -> RunnerInfo {
    RunnerInfo {
        v: VERSION,
        id: id.into(),
        host: "h".into(),
        labels: labels.iter().map(|l| l.to_string()).collect(),
        capacity,
        jobs: vec![],
        accepting,
        started_at: now(),
        updated_at: now(),
        warnings: Vec::new(),
    }
}

fn versioned(state: JobState, revision: u64, age: Duration) -> Versioned {
    Versioned {
        state,
        revision,
        age,
    }
}

/// The state of commit `i`'s job after `f`.
fn state(i: u64, f: impl FnOnce(JobState) -> JobState) -> JobState {
    let c = commit(i);
    f(JobState::queued(&c, &c.only_job()))
}

fn running(i: u64, runner: &str, attempt: u32, job_seq: u64) -> JobState {
    state(i, |s| s.assign(runner, attempt).claim(job_seq))
}

fn result(i: u64, status: Status) -> ResultMsg {
    let c = commit(i);
    ResultMsg {
        runner: "r1".into(),
        ..ResultMsg::without_run(
            &Names::default(),
            &c,
            &c.only_job(),
            i,
            1,
            status,
            "x".into(),
        )
    }
}

/// The `assigned` state written by `effects` (exactly one write, for `runner` and `attempt`).
#[track_caller]
fn assignment(effects: &[Effect], runner: &str, attempt: u32) -> JobState {
    match effects {
        [Effect::WriteState { state, .. }] => {
            assert_eq!(state.phase, JobPhase::Assigned, "{effects:?}");
            assert_eq!(state.runner.as_deref(), Some(runner), "{effects:?}");
            assert_eq!(state.attempt, attempt, "{effects:?}");
            state.clone()
        }
        _ => panic!("expected one assignment, got {effects:?}"),
    }
}

#[track_caller]
fn no_effects(effects: &[Effect]) {
    assert!(effects.is_empty(), "{effects:?}");
}

fn probes(effects: &[Effect]) -> Vec<&str> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Probe { runner } => Some(runner.as_str()),
            _ => None,
        })
        .collect()
}

// ---- assignment ------------------------------------------------------------------------------

#[test]
fn a_new_commit_goes_to_a_free_runner_with_one_create_and_one_publish() {
    let mut w = World::new();
    no_effects(&w.runner("r1", &[], 1));
    let effects = w.deliver(1);
    match &effects[..] {
        [Effect::WriteState {
            key: k,
            state,
            revision: None,
        }] => {
            assert_eq!(k, &key(1));
            assert_eq!((state.phase, state.attempt), (JobPhase::Assigned, 1));
        }
        other => panic!("{other:?}"),
    }
    let effects = w.written(1, 5);
    match &effects[..] {
        [Effect::PublishJob {
            job,
            assigned,
            revision: 5,
            ..
        }] => {
            assert_eq!(
                (job.runner.as_str(), job.attempt, job.commit_seq),
                ("r1", 1, 1)
            );
            assert_eq!(job.key(), key(1));
            assert_eq!(assigned.runner.as_deref(), Some("r1"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn equal_runners_take_turns() {
    let mut w = World::new();
    w.runner("r1", &[], 2);
    w.runner("r2", &[], 2);
    let first = assignment(&w.deliver(1), "r1", 1);
    w.written(1, 1);
    // r1 has one slot left and r2 two: the freer one goes first.
    assignment(&w.deliver(2), "r2", 1);
    w.written(2, 2);
    // Now both have one free slot: r1 was picked longer ago.
    let third = assignment(&w.deliver(3), "r1", 1);
    assert_eq!(first.runner, third.runner);
}

#[test]
fn a_slot_being_assigned_is_not_given_twice() {
    let mut w = World::new();
    w.runner("r1", &[], 1);
    assignment(&w.deliver(1), "r1", 1);
    // The first assignment's write is not answered yet: r1's one slot is taken all the same.
    no_effects(&w.deliver(2));
    assert_eq!(w.core.gauges(w.now).waiting, 1);
}

#[test]
fn a_new_commit_with_no_free_runner_is_recorded_as_waiting_after_a_moment() {
    let mut w = World::new();
    w.runner("r1", &[], 1);
    w.assigned(1, "r1", 1);
    no_effects(&w.deliver(2));
    w.later(MS(250));
    assert!(w.tick().is_empty(), "not recorded before RECORD_WAIT_AFTER");
    w.later(MS(300));
    let effects: Vec<Effect> = w
        .tick()
        .into_iter()
        .filter(|e| !matches!(e, Effect::Probe { .. }))
        .collect();
    match &effects[..] {
        [Effect::WriteState {
            state,
            revision: None,
            ..
        }] => {
            assert_eq!(state.phase, JobPhase::Queued);
            assert_eq!(state.reason.as_deref(), Some("waiting for a free runner"));
        }
        other => panic!("{other:?}"),
    }
    no_effects(&w.written(2, 7));
    // Recorded: the next beats leave it alone while no slot is free.
    w.later(MS(250));
    assert!(!w
        .tick()
        .iter()
        .any(|e| matches!(e, Effect::WriteState { .. })));
}

#[test]
fn a_job_whose_labels_no_runner_has_says_so_while_it_waits() {
    let mut w = World::new();
    w.runner("r1", &["linux"], 1);
    let mut c = commit(1);
    c.labels = vec!["gpu".into(), "linux".into()];
    no_effects(&w.on(Event::CommitDelivered {
        commit: c,
        seq: 1,
        redelivered: false,
    }));
    w.later(MS(600));
    let effects = w.tick();
    match &effects[..] {
        [Effect::WriteState { state, .. }] => assert_eq!(
            state.reason.as_deref(),
            Some("waiting for a runner with labels [gpu, linux]")
        ),
        other => panic!("{other:?}"),
    }
    // A runner with the labels joins: the job goes there, on the recorded revision.
    w.written(1, 3);
    let effects = w.runner("g1", &["gpu", "linux", "x"], 1);
    match &effects[..] {
        [Effect::WriteState {
            state,
            revision: Some(3),
            ..
        }] => assert_eq!(state.runner.as_deref(), Some("g1")),
        other => panic!("{other:?}"),
    }
}

impl World {
    /// Commit `i`, needing `labels`, delivered for the first time at stream sequence `i`.
    fn deliver_with(&mut self, i: u64, labels: &[&str]) -> Vec<Effect> {
        let mut c = commit(i);
        c.labels = labels.iter().map(|l| l.to_string()).collect();
        self.on(Event::CommitDelivered {
            commit: c,
            seq: i,
            redelivered: false,
        })
    }
}

#[test]
fn jobs_no_live_runner_can_take_do_not_hold_back_the_others() {
    let mut w = World::new();
    w.runner("r1", &[], 1);
    w.runner("r2", &[], 1);
    let window = HOLD_AHEAD as usize;
    assert_eq!(w.core.wanted(w.now), 2 + window);
    // Six commits need a gpu, which no runner has: they wait on the side and count for nothing.
    for i in 1..=6 {
        no_effects(&w.deliver_with(i, &["gpu"]));
    }
    assert_eq!(
        w.core.wanted(w.now),
        2 + window,
        "unplaceable jobs hold back no pull"
    );
    w.later(MS(600));
    let recorded = w.tick();
    assert_eq!(recorded.len(), 6, "{recorded:?}");
    for i in 1..=6 {
        w.written(i, 10 + i);
    }
    assert_eq!(w.core.wanted(w.now), 2 + window);
    // Another repository's commits go to the idle runners at once.
    assignment(&w.deliver(7), "r1", 1);
    w.written(7, 20);
    assignment(&w.deliver(8), "r2", 1);
    w.written(8, 21);
    // Both busy: the window is held ready, and a waiting one counts again.
    assert_eq!(w.core.wanted(w.now), window);
    no_effects(&w.deliver(9));
    assert_eq!(w.core.wanted(w.now), window - 1);
    // Recorded, they are not decided again at every tick while nothing changes.
    w.later(MS(300));
    assert!(!w
        .tick()
        .iter()
        .any(|e| matches!(e, Effect::ReadState { .. } | Effect::WriteState { .. })),);
    // A runner with a gpu joins: the oldest of them start, as many as it has slots.
    let effects = w.runner("g1", &["gpu"], 2);
    let started: Vec<String> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::WriteState { key, state, .. } if state.phase == JobPhase::Assigned => {
                assert_eq!(state.runner.as_deref(), Some("g1"));
                Some(key.clone())
            }
            _ => None,
        })
        .collect();
    assert_eq!(started, vec![key(1), key(2)], "{effects:?}");
}

#[test]
fn beyond_the_bound_a_run_no_runner_can_take_is_recorded_and_given_back() {
    let mut w = World::new();
    w.runner("r1", &[], 1);
    for i in 1..=MAX_UNPLACEABLE as u64 {
        no_effects(&w.deliver_with(i, &["gpu"]));
    }
    assert_eq!(w.core.held(), MAX_UNPLACEABLE);
    assert_eq!(
        w.core.wanted(w.now),
        1 + HOLD_AHEAD as usize,
        "the bound is not passed: nothing counts"
    );
    // One more: its wait is recorded at once (for `jetci status`), then its commit goes back.
    let i = MAX_UNPLACEABLE as u64 + 1;
    let effects = w.deliver_with(i, &["gpu"]);
    match &effects[..] {
        [Effect::WriteState {
            key: k,
            state,
            revision: None,
        }] => {
            assert_eq!(k, &key(i));
            assert_eq!(state.phase, JobPhase::Queued);
            assert_eq!(
                state.reason.as_deref(),
                Some("waiting for a runner with labels [gpu]")
            );
        }
        other => panic!("{other:?}"),
    }
    let effects = w.written(i, 7);
    assert_eq!(
        effects,
        vec![Effect::Release {
            run: commit(i).key(),
            delay: RELEASE_DELAY,
        }]
    );
    assert_eq!(w.core.held(), MAX_UNPLACEABLE);
    // Delivered again later, its recorded state is read and it goes back at once.
    w.later(RELEASE_DELAY);
    let mut c = commit(i);
    c.labels = vec!["gpu".into()];
    let effects = w.on(Event::CommitDelivered {
        commit: c,
        seq: i,
        redelivered: true,
    });
    assert!(
        matches!(&effects[..], [Effect::LookUpResult { .. }]),
        "{effects:?}"
    );
    let effects = w.looked_up(i, None);
    assert_eq!(effects, vec![Effect::ReadState { key: key(i) }]);
    let queued = state(i, |s| {
        s.requeue("waiting for a runner with labels [gpu]".into())
    });
    let effects = w.read(i, Some(versioned(queued, 7, MS(10))));
    assert_eq!(
        effects,
        vec![Effect::Release {
            run: commit(i).key(),
            delay: RELEASE_DELAY,
        }]
    );
    // The other commits still flow (r1 refreshed its presence meanwhile).
    no_effects(&w.runner_at("r1", &[], 1, 2));
    assignment(&w.deliver(i + 1), "r1", 1);
}

#[test]
fn a_runner_that_can_take_no_job_looks_at_none() {
    let mut w = World::new();
    no_effects(&w.deliver(1));
    no_effects(&w.deliver_with(2, &["gpu"]));
    // Draining, full (no slot), or without the labels: nothing starts.
    no_effects(&w.on(Event::RunnerSeen {
        key: "d1".into(),
        info: runner_info("d1", &[], 4, false),
        age: Duration::ZERO,
        revision: 1,
    }));
    no_effects(&w.runner("z1", &[], 0));
    assert_eq!(w.core.wanted(w.now), 0);
    // One that can: the job it can take starts, the one it cannot waits.
    assignment(&w.runner("r1", &["linux"], 4), "r1", 1);
}

#[test]
fn waiting_jobs_start_oldest_first_when_a_runner_joins() {
    let mut w = World::new();
    no_effects(&w.deliver(5));
    no_effects(&w.deliver(3));
    assignment(&w.runner("r1", &[], 1), "r1", 1);
    let effects = w.written(3, 1);
    assert!(
        matches!(&effects[..], [Effect::PublishJob { job, .. }] if job.commit_seq == 3),
        "{effects:?}"
    );
}

#[test]
fn a_waiting_job_starts_when_a_slot_frees_and_the_finished_commit_is_acked() {
    let mut w = World::new();
    w.runner("r1", &[], 1);
    let busy = w.assigned(1, "r1", 1);
    no_effects(&w.deliver(2));
    let effects = w.watched(1, busy.finish(Status::Passed, None), 3, MS(0));
    match &effects[..] {
        [Effect::CountResult {
            status: Some(Status::Passed),
            job: false,
        }, Effect::LookUpResult { key: k, .. }, Effect::WriteState { state, .. }] => {
            assert_eq!(k, &key(1));
            assert_eq!(state.runner.as_deref(), Some("r1"));
            assert_eq!(state.sha, commit(2).sha);
        }
        other => panic!("{other:?}"),
    }
    // The run's result is stored: its commit is acked.
    let effects = w.looked_up(1, Some(result(1, Status::Passed)));
    assert_eq!(
        effects,
        vec![Effect::AckCommit {
            run: commit(1).key()
        }]
    );
}

#[test]
fn a_draining_runner_gets_no_new_job() {
    let mut w = World::new();
    w.on(Event::RunnerSeen {
        key: "r1".into(),
        info: runner_info("r1", &[], 4, false),
        age: Duration::ZERO,
        revision: 1,
    });
    no_effects(&w.deliver(1));
    assert_eq!(w.core.wanted(w.now), 0);
}

#[test]
fn it_pulls_one_commit_per_free_slot_plus_a_window_held_waiting() {
    let mut w = World::new();
    assert_eq!(w.core.wanted(w.now), 0, "no runner: nothing to pull");
    w.runner("r1", &[], 2);
    let window = HOLD_AHEAD as usize;
    assert_eq!(w.core.wanted(w.now), 2 + window);
    w.assigned(1, "r1", 1);
    assert_eq!(w.core.wanted(w.now), 1 + window);
    w.deliver(2);
    w.deliver(3);
    // r1 now full: 0 free + the window - 1 waiting.
    assert_eq!(w.core.wanted(w.now), window - 1);
}

// ---- after a dispatcher restart --------------------------------------------------------------

#[test]
fn a_live_job_is_adopted_after_a_dispatcher_restart() {
    let mut w = World::new();
    w.runner("r1", &[], 1);
    let live = running(1, "r1", 1, 40);
    no_effects(&w.watched(1, live.clone(), 9, MS(900)));
    let effects = w.on(Event::CommitDelivered {
        commit: commit(1),
        seq: 1,
        redelivered: true,
    });
    assert!(
        matches!(&effects[..], [Effect::LookUpResult { .. }]),
        "{effects:?}"
    );
    assert_eq!(
        w.looked_up(1, None),
        vec![Effect::ReadState { key: key(1) }]
    );
    no_effects(&w.read(1, Some(versioned(live.clone(), 9, MS(900)))));
    // While the runner heartbeats, nothing moves it.
    for _ in 0..8 {
        w.later(MS(250));
        no_effects(&w.watched(1, live.clone().renew(), 10, MS(0)));
        let effects = w.tick();
        assert!(
            effects
                .iter()
                .all(|e| matches!(e, Effect::ExtendCommits | Effect::Probe { .. })),
            "{effects:?}"
        );
    }
}

#[test]
fn a_redelivered_commit_whose_run_has_a_result_is_acked_at_once() {
    let mut w = World::new();
    w.on(Event::CommitDelivered {
        commit: commit(1),
        seq: 1,
        redelivered: true,
    });
    let effects = w.looked_up(1, Some(result(1, Status::Passed)));
    assert_eq!(
        effects,
        vec![Effect::AckCommit {
            run: commit(1).key()
        }]
    );
    assert_eq!(w.core.held(), 0);
}

#[test]
fn a_create_that_finds_a_state_reads_it_and_decides_again() {
    let mut w = World::new();
    w.runner("r1", &[], 1);
    w.runner("r2", &[], 1);
    assignment(&w.deliver(1), "r1", 1);
    // Another dispatcher got there first (a commit published twice).
    let effects = w.on(Event::StateWritten {
        key: key(1),
        written: Err(StateError::Conflict),
    });
    assert_eq!(effects, vec![Effect::ReadState { key: key(1) }]);
    no_effects(&w.read(1, Some(versioned(running(1, "r2", 1, 3), 4, MS(100)))));
}

#[test]
fn a_conflict_on_a_known_revision_is_decided_again_at_the_next_beat() {
    let mut w = World::new();
    w.runner("r1", &[], 1);
    let lost = running(1, "r0", 1, 3);
    w.on(Event::CommitDelivered {
        commit: commit(1),
        seq: 1,
        redelivered: true,
    });
    w.looked_up(1, None);
    w.read(1, Some(versioned(lost, 4, LEASE * 2)));
    assignment(&w.looked_up(1, None), "r1", 2);
    no_effects(&w.on(Event::StateWritten {
        key: key(1),
        written: Err(StateError::Conflict),
    }));
    w.later(MS(250));
    assert!(w.tick().contains(&Effect::ReadState { key: key(1) }));
}

#[test]
fn a_state_that_does_not_parse_is_replaced_and_decided_on_afresh() {
    let mut w = World::new();
    w.on(Event::CommitDelivered {
        commit: commit(1),
        seq: 1,
        redelivered: true,
    });
    w.looked_up(1, None);
    let effects = w.on(Event::StateRead {
        key: key(1),
        read: Err(StateError::Bad {
            key: key(1),
            reason: "junk".into(),
            revision: 9,
        }),
    });
    match &effects[..] {
        [Effect::WriteState {
            state,
            revision: Some(9),
            ..
        }] => assert_eq!((state.phase, state.attempt), (JobPhase::Queued, 0)),
        other => panic!("{other:?}"),
    }
    no_effects(&w.written(1, 10));
    w.later(MS(250));
    assert!(w.tick().contains(&Effect::ReadState { key: key(1) }));
}

#[test]
fn a_failed_read_is_tried_again_at_the_next_beat() {
    let mut w = World::new();
    w.on(Event::CommitDelivered {
        commit: commit(1),
        seq: 1,
        redelivered: true,
    });
    w.looked_up(1, None);
    no_effects(&w.on(Event::StateRead {
        key: key(1),
        read: Err(StateError::Server("timed out".into())),
    }));
    w.later(MS(250));
    assert!(w.tick().contains(&Effect::ReadState { key: key(1) }));
}

// ---- leases ----------------------------------------------------------------------------------

#[test]
fn a_job_is_reassigned_once_its_heartbeats_stop_for_a_lease_and_its_message_deleted() {
    let mut w = World::new();
    w.runner("r1", &[], 1);
    let assigned = w.assigned(1, "r1", 1);
    let claimed = assigned.claim(17);
    no_effects(&w.watched(1, claimed.clone(), 2, MS(0)));
    w.later(MS(600));
    w.runner("r2", &[], 1);
    // r1 goes silent; r2 keeps its presence fresh. Before the lease: probes, no move.
    for _ in 0..9 {
        w.later(MS(250));
        w.runner_at("r2", &[], 1, 2);
        let effects = w.tick();
        assert!(
            !effects
                .iter()
                .any(|e| matches!(e, Effect::ReadState { .. })),
            "{effects:?}"
        );
    }
    w.later(MS(250));
    w.runner_at("r2", &[], 1, 3);
    assert!(w.tick().contains(&Effect::ReadState { key: key(1) }));
    let effects = w.read(1, Some(versioned(claimed, 2, LEASE + MS(100))));
    assert!(
        matches!(&effects[..], [Effect::LookUpResult { .. }]),
        "{effects:?}"
    );
    let second = assignment(&w.looked_up(1, None), "r2", 2);
    assert_eq!(second.job_seq, None);
    let effects = w.written(1, 3);
    match &effects[..] {
        [Effect::DeleteJobMessage { seq: 17 }, Effect::PublishJob { job, .. }] => {
            assert_eq!((job.runner.as_str(), job.attempt), ("r2", 2))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_lost_job_never_claimed_has_its_published_message_deleted() {
    let mut w = World::new();
    w.runner("r1", &[], 1);
    let assigned = w.assigned(1, "r1", 1);
    w.on(Event::JobStored {
        key: key(1),
        stored: Ok(77),
    });
    // The runner never claimed it; the dispatcher decides again after the lease. (r1's slot
    // still counts the lost job: it is not given the job again.)
    w.later(LEASE + MS(100));
    w.runner("r2", &[], 1);
    w.tick();
    w.read(1, Some(versioned(assigned, 1, LEASE + MS(100))));
    assignment(&w.looked_up(1, None), "r2", 2);
    let effects = w.written(1, 2);
    assert_eq!(effects[0], Effect::DeleteJobMessage { seq: 77 });
}

#[test]
fn a_late_heartbeat_gets_one_probe_per_check_and_no_responders_moves_the_job_at_once() {
    let mut w = World::new();
    w.runner("r1", &[], 1);
    w.runner("r2", &[], 1);
    let assigned = w.assigned(1, "r1", 1);
    let claimed = assigned.claim(5);
    w.watched(1, claimed.clone(), 2, MS(0));
    w.later(MS(300));
    assert!(probes(&w.tick()).is_empty(), "not late yet");
    w.later(MS(300));
    w.runner_at("r2", &[], 1, 2);
    assert_eq!(probes(&w.tick()), vec!["r1"]);
    w.later(MS(100));
    assert!(probes(&w.tick()).is_empty(), "at most one probe per check");
    let effects = w.on(Event::ProbeAnswered {
        runner: "r1".into(),
        gone: true,
    });
    assert_eq!(effects, vec![Effect::ReadState { key: key(1) }]);
    // The state is younger than the lease, but its runner is gone.
    let effects = w.read(1, Some(versioned(claimed, 2, MS(700))));
    assert!(
        matches!(&effects[..], [Effect::LookUpResult { .. }]),
        "{effects:?}"
    );
    assignment(&w.looked_up(1, None), "r2", 2);
}

#[test]
fn a_probe_that_is_answered_moves_nothing() {
    let mut w = World::new();
    w.runner("r1", &[], 1);
    w.assigned(1, "r1", 1);
    no_effects(&w.on(Event::ProbeAnswered {
        runner: "r1".into(),
        gone: false,
    }));
}

#[test]
fn lease_clocks_restart_after_a_reconnect() {
    let mut w = World::new();
    w.runner("r1", &[], 1);
    let assigned = w.assigned(1, "r1", 1);
    w.later(LEASE - MS(100));
    no_effects(&w.on(Event::Reconnected));
    // Silence right after the outage proves nothing: no decision, and "no responders" is
    // ignored while runners reconnect.
    w.later(MS(500));
    let effects = w.tick();
    assert!(
        !effects
            .iter()
            .any(|e| matches!(e, Effect::ReadState { .. })),
        "{effects:?}"
    );
    no_effects(&w.on(Event::ProbeAnswered {
        runner: "r1".into(),
        gone: true,
    }));
    // A state read now counts its age from the reconnect at most: adopted.
    w.on(Event::Tick);
    let stale = versioned(assigned.claim(2), 2, LEASE * 10);
    w.on(Event::JobStateChanged {
        key: key(1),
        state: Some(stale.clone()),
    });
    w.later(LEASE - MS(600));
    w.runner_at("r1", &[], 1, 2);
    let effects = w.tick();
    assert!(
        !effects
            .iter()
            .any(|e| matches!(e, Effect::ReadState { .. })),
        "{effects:?}"
    );
    // A whole lease after the reconnect without a heartbeat: lost after all.
    w.later(MS(800));
    let effects = w.tick();
    assert!(
        effects.contains(&Effect::ReadState { key: key(1) }),
        "{effects:?}"
    );
}

#[test]
fn the_last_attempt_lost_gives_the_run_an_error_result() {
    let mut w = World::with_attempts(2);
    w.runner("r1", &[], 1);
    w.on(Event::CommitDelivered {
        commit: commit(1),
        seq: 1,
        redelivered: true,
    });
    w.looked_up(1, None);
    let lost = running(1, "r1", 2, 31);
    w.read(1, Some(versioned(lost, 8, LEASE * 2)));
    let effects = w.looked_up(1, None);
    match &effects[..] {
        [Effect::FinishWithoutRunner {
            result,
            state,
            revision: Some(8),
            ..
        }] => {
            assert_eq!((result.status, result.attempt), (Status::Error, 2));
            assert_eq!(
                result.reason.as_deref(),
                Some("attempt 2 of 2 failed: runner r1 stopped heartbeating; giving up")
            );
            assert_eq!(result.runner, "");
            assert_eq!(
                state.phase,
                JobPhase::Running,
                "the state as read, to finish"
            );
        }
        other => panic!("{other:?}"),
    }
    let effects = w.on(Event::FinishedWithoutRunner {
        key: key(1),
        stored: true,
    });
    assert_eq!(
        effects,
        vec![
            Effect::DeleteJobMessage { seq: 31 },
            Effect::AckCommit {
                run: commit(1).key()
            }
        ]
    );
}

#[test]
fn a_result_that_cannot_be_published_is_tried_again_later() {
    let mut w = World::with_attempts(1);
    w.on(Event::CommitDelivered {
        commit: commit(1),
        seq: 1,
        redelivered: true,
    });
    w.looked_up(1, None);
    let handed_back = state(1, |s| s.assign("r1", 1).hand_back("checkout failed".into()));
    let effects = w.read(1, Some(versioned(handed_back, 3, MS(10))));
    assert!(
        matches!(&effects[..], [Effect::FinishWithoutRunner { result, .. }]
            if result.reason.as_deref().is_some_and(|r| r.contains("checkout failed"))),
        "{effects:?}"
    );
    no_effects(&w.on(Event::FinishedWithoutRunner {
        key: key(1),
        stored: false,
    }));
    assert_eq!(w.core.held(), 1);
    w.later(MS(250));
    assert!(w.tick().contains(&Effect::ReadState { key: key(1) }));
}

#[test]
fn a_handed_back_job_goes_to_another_runner_without_waiting_for_the_lease() {
    let mut w = World::new();
    w.runner("r1", &[], 1);
    let assigned = w.assigned(1, "r1", 1);
    let back = assigned
        .claim(4)
        .hand_back("handed back by runner r1".into());
    no_effects(&w.watched(1, back.clone(), 3, MS(0)));
    w.later(MS(250));
    assert!(w.tick().contains(&Effect::ReadState { key: key(1) }));
    // Queued: no runner was lost, so no result to look for.
    let effects = w.read(1, Some(versioned(back, 3, MS(250))));
    let again = assignment(&effects, "r1", 2);
    assert_eq!(again.reason, None);
}

#[test]
fn a_stored_result_of_a_lost_attempt_ends_the_run_instead_of_another_attempt() {
    let mut w = World::new();
    w.runner("r2", &[], 1);
    w.on(Event::CommitDelivered {
        commit: commit(1),
        seq: 1,
        redelivered: true,
    });
    w.looked_up(1, None);
    let lost = running(1, "ghost", 1, 2);
    w.read(1, Some(versioned(lost, 5, LEASE * 3)));
    let effects = w.looked_up(1, Some(result(1, Status::Failed)));
    match &effects[..] {
        [Effect::WriteState {
            state,
            revision: Some(5),
            ..
        }] => assert_eq!(
            (state.phase, state.status),
            (JobPhase::Final, Some(Status::Failed))
        ),
        other => panic!("{other:?}"),
    }
    let done = running(1, "ghost", 1, 2).finish(Status::Failed, None);
    no_effects(&w.written(1, 6));
    let effects = w.watched(1, done, 6, MS(0));
    assert!(
        effects.contains(&Effect::LookUpResult {
            key: key(1),
            job: commit(1).only_job()
        }),
        "{effects:?}"
    );
    let effects = w.looked_up(1, Some(result(1, Status::Failed)));
    assert!(effects.contains(&Effect::AckCommit {
        run: commit(1).key()
    }));
}

// ---- cancel ----------------------------------------------------------------------------------

#[test]
fn a_cancel_of_a_waiting_job_finishes_it_here() {
    let mut w = World::new();
    w.deliver(1);
    w.later(MS(600));
    w.tick();
    w.written(1, 2);
    let cancelled = state(1, |s| {
        s.requeue("waiting for a free runner".into())
            .request_cancel("by ann".into())
    });
    let effects = w.watched(1, cancelled.clone(), 3, MS(0));
    assert_eq!(effects, vec![Effect::ReadState { key: key(1) }]);
    let effects = w.read(1, Some(versioned(cancelled, 3, MS(1))));
    match &effects[..] {
        [Effect::FinishWithoutRunner {
            result,
            revision: Some(3),
            ..
        }] => {
            assert_eq!(result.status, Status::Cancelled);
            assert_eq!(result.reason.as_deref(), Some("cancelled by ann"));
        }
        other => panic!("{other:?}"),
    }
    let effects = w.on(Event::FinishedWithoutRunner {
        key: key(1),
        stored: true,
    });
    assert_eq!(
        effects,
        vec![Effect::AckCommit {
            run: commit(1).key()
        }]
    );
}

#[test]
fn a_cancel_of_a_running_job_is_left_to_its_live_runner() {
    let mut w = World::new();
    w.runner("r1", &[], 1);
    let assigned = w.assigned(1, "r1", 1);
    let cancelled = assigned.claim(3).request_cancel("by ann".into());
    let effects = w.watched(1, cancelled.clone(), 3, MS(0));
    assert_eq!(effects, vec![Effect::ReadState { key: key(1) }]);
    no_effects(&w.read(1, Some(versioned(cancelled, 3, MS(5)))));
}

#[test]
fn a_cancel_of_a_job_whose_runner_is_lost_is_finished_here() {
    let mut w = World::new();
    w.on(Event::CommitDelivered {
        commit: commit(1),
        seq: 1,
        redelivered: true,
    });
    w.looked_up(1, None);
    let cancelled = running(1, "r1", 1, 3).request_cancel("by ann".into());
    let effects = w.read(1, Some(versioned(cancelled, 3, LEASE * 2)));
    assert!(
        matches!(&effects[..], [Effect::LookUpResult { .. }]),
        "{effects:?}"
    );
    let effects = w.looked_up(1, None);
    assert!(
        matches!(&effects[..], [Effect::FinishWithoutRunner { result, .. }] if result.status == Status::Cancelled),
        "{effects:?}"
    );
}

// ---- runners ---------------------------------------------------------------------------------

#[test]
fn a_runner_found_gone_that_comes_back_gets_jobs_again() {
    let mut w = World::new();
    // Two slots: r1 has a free one even with the lost job counted, so only "gone" keeps it out.
    w.runner("r1", &[], 2);
    let assigned = w.assigned(1, "r1", 1);
    let claimed = assigned.claim(2);
    w.watched(1, claimed.clone(), 2, MS(0));
    w.on(Event::ProbeAnswered {
        runner: "r1".into(),
        gone: true,
    });
    // Nobody else: the job waits, and r1 (gone at this revision) gets nothing.
    w.read(1, Some(versioned(claimed, 2, MS(10))));
    let effects = w.looked_up(1, None);
    let queued = match &effects[..] {
        [Effect::WriteState { state, .. }] => {
            assert_eq!(state.phase, JobPhase::Queued);
            assert_eq!(
                state.runner, None,
                "the lost attempt's runner is cleared at once"
            );
            assert_eq!(state.attempt, 1);
            state.clone()
        }
        other => panic!("{other:?}"),
    };
    let effects = w.written(1, 3);
    assert_eq!(effects, vec![Effect::DeleteJobMessage { seq: 2 }]);
    no_effects(&w.deliver(2));
    assert_eq!(w.core.wanted(w.now), 0, "a gone runner offers no slot");
    // The watch shows the queued state: r1 no longer runs the lost job.
    no_effects(&w.watched(1, queued, 3, MS(0)));
    // r1 comes back (a new presence revision): the oldest job goes to it as attempt 2.
    w.later(MS(250));
    w.runner_at("r1", &[], 2, 2);
    let effects = w.tick();
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::WriteState { key: k, state, .. }
            if *k == key(1) && state.runner.as_deref() == Some("r1") && state.attempt == 2)),
        "{effects:?}"
    );
}

#[test]
fn a_reconnect_forgives_runners_a_probe_found_gone() {
    let mut w = World::new();
    w.runner("r1", &[], 2);
    w.assigned(1, "r1", 1);
    w.on(Event::ProbeAnswered {
        runner: "r1".into(),
        gone: true,
    });
    w.read(1, Some(versioned(running(1, "r1", 1, 2), 2, MS(10))));
    w.looked_up(1, None);
    assert_eq!(w.core.wanted(w.now), 0);
    // The probe's "no responders" may have been this dispatcher's own outage: r1 counts again
    // once it shows it lived through it (a presence written after the reconnect).
    w.on(Event::Reconnected);
    assert_eq!(w.core.wanted(w.now), 0, "not before r1 wrote its presence");
    w.runner_at("r1", &[], 2, 2);
    assert!(
        w.core.wanted(w.now) > 0,
        "r1 counts again after a reconnect"
    );
}

#[test]
fn a_runner_dead_before_an_outage_gets_no_job_after_it() {
    let mut w = World::new();
    w.runner_at("dead", &[], 1, 1);
    w.runner_at("alive", &[], 1, 1);
    // NATS goes away; `dead` was SIGKILLed just before, `alive` lives through it.
    w.later(MS(3000));
    w.on(Event::Reconnected);
    // The watch hands both entries over again, unchanged: that proves nothing.
    w.runner_at("dead", &[], 1, 1);
    w.runner_at("alive", &[], 1, 1);
    assert_eq!(w.core.wanted(w.now), 0);
    // `alive` refreshes its entry: it takes the next job.
    w.later(MS(500));
    w.runner_at("alive", &[], 1, 2);
    assert!(w.core.wanted(w.now) > 0);
    w.assigned(1, "alive", 1);
    // `alive` is full; `dead`, never heard from again, is given nothing, however long it waits.
    let mut effects = w.deliver(2);
    w.later(MS(2000));
    effects.extend(w.tick());
    assert!(
        !effects
            .iter()
            .any(|e| matches!(e, Effect::PublishJob { .. })
                || matches!(e, Effect::WriteState { state, .. } if state.runner.is_some())),
        "{effects:?}"
    );
}

#[test]
fn a_runner_whose_entry_went_away_and_came_back_takes_waiting_jobs() {
    let mut w = World::new();
    w.runner("r1", &[], 1);
    no_effects(&w.on(Event::RunnerGone { key: "r1".into() }));
    no_effects(&w.deliver(1));
    assignment(&w.runner_at("r1", &[], 1, 5), "r1", 1);
}

#[test]
fn runners_not_refreshed_for_twenty_leases_are_forgotten() {
    let mut w = World::new();
    w.runner("r1", &[], 1);
    w.later(LEASE * 20);
    w.tick();
    // Forgotten: its next entry is a join again (which starts the waiting job).
    no_effects(&w.deliver(1));
    assignment(&w.runner_at("r1", &[], 1, 2), "r1", 1);
}

#[test]
fn a_stale_runner_entry_counts_as_no_runner() {
    let mut w = World::new();
    w.on(Event::RunnerSeen {
        key: "r1".into(),
        info: runner_info("r1", &[], 1, true),
        age: LEASE * 2,
        revision: 1,
    });
    no_effects(&w.deliver(1));
    assert_eq!(w.core.wanted(w.now), 0);
}

// ---- the commit's deadline -------------------------------------------------------------------

#[test]
fn held_commits_are_extended_every_third_of_the_lease() {
    let mut w = World::new();
    w.runner("r1", &[], 1);
    w.assigned(1, "r1", 1);
    w.later(MS(500));
    w.watched(1, running(1, "r1", 1, 1), 2, MS(0));
    assert!(!w.tick().contains(&Effect::ExtendCommits));
    w.later(MS(500));
    w.watched(1, running(1, "r1", 1, 1), 3, MS(0));
    assert!(w.tick().contains(&Effect::ExtendCommits));
    w.later(MS(250));
    w.watched(1, running(1, "r1", 1, 1), 4, MS(0));
    assert!(!w.tick().contains(&Effect::ExtendCommits));
}

#[test]
fn gauges_count_waiting_and_running_jobs_and_the_oldest_heartbeat() {
    let mut w = World::new();
    w.runner("r1", &[], 1);
    w.assigned(1, "r1", 1);
    w.deliver(2);
    w.later(MS(700));
    let g = w.core.gauges(w.now);
    assert_eq!((g.waiting, g.in_flight), (1, 1));
    assert_eq!(g.oldest_heartbeat, MS(700));
}

#[test]
fn a_redelivered_commit_read_right_after_a_reconnect_is_adopted() {
    let mut w = World::new();
    w.runner("r1", &[], 1);
    w.later(LEASE * 2);
    w.on(Event::Reconnected);
    w.runner_at("r1", &[], 1, 2);
    w.on(Event::CommitDelivered {
        commit: commit(1),
        seq: 1,
        redelivered: true,
    });
    w.looked_up(1, None);
    // Its last heartbeat is ten leases old, but the outage was this dispatcher's: adopted.
    let effects = w.read(1, Some(versioned(running(1, "r1", 1, 2), 2, LEASE * 10)));
    no_effects(&effects);
    // A lease after the reconnect with no heartbeat, it is lost after all.
    w.later(LEASE + MS(100));
    w.runner_at("r1", &[], 1, 3);
    let effects = w.tick();
    assert!(
        effects.contains(&Effect::ReadState { key: key(1) }),
        "{effects:?}"
    );
}

#[test]
fn a_commit_published_again_after_its_job_is_final_is_acked() {
    let mut w = World::new();
    w.runner("r1", &[], 1);
    assignment(&w.deliver(1), "r1", 1);
    let effects = w.on(Event::StateWritten {
        key: key(1),
        written: Err(StateError::Conflict),
    });
    assert_eq!(effects, vec![Effect::ReadState { key: key(1) }]);
    let done = running(1, "r1", 1, 2).finish(Status::Passed, None);
    let effects = w.read(1, Some(versioned(done, 9, LEASE * 100)));
    assert!(
        matches!(&effects[..], [Effect::LookUpResult { .. }]),
        "{effects:?}"
    );
    let effects = w.looked_up(1, Some(result(1, Status::Passed)));
    assert_eq!(
        effects,
        vec![Effect::AckCommit {
            run: commit(1).key()
        }]
    );
}

#[test]
fn a_final_state_with_no_stored_result_runs_the_job_again() {
    let mut w = World::new();
    w.runner("r1", &[], 1);
    w.runner("r2", &[], 1);
    let assigned = w.assigned(1, "r1", 1);
    // Someone writes `final` over the running job; no result is stored.
    let forged = assigned.claim(4).finish(Status::Passed, None);
    let effects = w.watched(1, forged, 3, MS(0));
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::LookUpResult { .. })),
        "{effects:?}"
    );
    assert!(
        !effects
            .iter()
            .any(|e| matches!(e, Effect::AckCommit { .. })),
        "not closed on a state alone: {effects:?}"
    );
    // Not found at once: looked for again while a just-stored result may still be settling.
    no_effects(&w.looked_up(1, None));
    w.later(MS(250));
    let effects = w.tick();
    assert!(
        effects.contains(&Effect::LookUpResult {
            key: key(1),
            job: commit(1).only_job()
        }),
        "{effects:?}"
    );
    no_effects(&w.looked_up(1, None));
    // A beat later still nothing: the job runs again, as attempt 2, on the revision seen.
    w.later(MS(1000));
    w.runner_at("r2", &[], 1, 2);
    w.tick();
    let effects = w.looked_up(1, None);
    match &effects[..] {
        [Effect::WriteState {
            state,
            revision: Some(3),
            ..
        }] => {
            assert_eq!((state.phase, state.attempt), (JobPhase::Assigned, 2));
            assert_eq!(state.status, None, "an assigned job has no status");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_final_state_with_no_stored_result_after_the_last_attempt_is_given_up() {
    let mut w = World::with_attempts(1);
    w.runner("r1", &[], 1);
    let assigned = w.assigned(1, "r1", 1);
    let forged = assigned.claim(4).finish(Status::Passed, None);
    w.watched(1, forged, 3, MS(0));
    w.later(LEASE);
    let effects = w.looked_up(1, None);
    match &effects[..] {
        [Effect::FinishWithoutRunner { result, .. }] => {
            assert_eq!(result.status, Status::Error);
            assert!(
                result
                    .reason
                    .as_deref()
                    .is_some_and(|r| r.contains("no result was stored")),
                "{result:?}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_waiting_record_that_finds_a_state_reads_it_and_decides_again() {
    let mut w = World::new();
    no_effects(&w.deliver(1));
    w.later(MS(600));
    let effects = w.tick();
    assert!(
        matches!(&effects[..], [Effect::WriteState { revision: None, .. }]),
        "{effects:?}"
    );
    let effects = w.on(Event::StateWritten {
        key: key(1),
        written: Err(StateError::Conflict),
    });
    assert_eq!(effects, vec![Effect::ReadState { key: key(1) }]);
}

#[test]
fn a_cancel_of_a_lost_job_that_stored_its_result_keeps_that_verdict() {
    let mut w = World::new();
    w.on(Event::CommitDelivered {
        commit: commit(1),
        seq: 1,
        redelivered: true,
    });
    w.looked_up(1, None);
    let cancelled = running(1, "ghost", 1, 3).request_cancel("by ann".into());
    w.read(1, Some(versioned(cancelled, 4, LEASE * 2)));
    let effects = w.looked_up(1, Some(result(1, Status::Passed)));
    match &effects[..] {
        [Effect::WriteState {
            state,
            revision: Some(4),
            ..
        }] => assert_eq!(
            (state.phase, state.status),
            (JobPhase::Final, Some(Status::Passed)),
            "the stored verdict, not a cancel"
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_runner_entry_whose_id_is_not_its_key_is_ignored() {
    let mut w = World::new();
    w.runner("r0", &[], 1);
    // Under key `ghost`, an entry that says it is r0 with eight slots.
    no_effects(&w.on(Event::RunnerSeen {
        key: "ghost".into(),
        info: runner_info("r0", &[], 8, true),
        age: Duration::ZERO,
        revision: 1,
    }));
    assert_eq!(
        w.core.wanted(w.now),
        1 + HOLD_AHEAD as usize,
        "r0's one slot, free, and the window"
    );
    w.assigned(1, "r0", 1);
    // r0 is full: nothing more goes to its subject.
    no_effects(&w.deliver(2));
}

// ---- pipelines -------------------------------------------------------------------------------

/// Commit `i` as a pipeline: `lint`, `test` (needs lint), `build`; `fail_fast` as given.
fn pipeline_commit(i: u64, fail_fast: bool) -> CommitMsg {
    let job = |token: &str, needs: &[&str]| JobPlan {
        name: token.to_string(),
        job: token.to_string(),
        needs: needs.iter().map(|n| n.to_string()).collect(),
        labels: vec![],
        allow_failure: false,
        carried: None,
    };
    CommitMsg {
        jobs: vec![job("lint", &[]), job("test", &["lint"]), job("build", &[])],
        fail_fast,
        ..commit(i)
    }
}

fn job_key(i: u64, token: &str) -> String {
    pipeline_commit(i, false).job(token).key()
}

/// The keys of the `assigned` writes among `effects`, and their runners.
fn assignments(effects: &[Effect]) -> Vec<(String, String)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::WriteState { key, state, .. } if state.phase == JobPhase::Assigned => {
                Some((key.clone(), state.runner.clone().unwrap_or_default()))
            }
            _ => None,
        })
        .collect()
}

/// The stored result of pipeline job `token` of commit `i`.
fn job_result(i: u64, token: &str, status: Status) -> ResultMsg {
    let c = pipeline_commit(i, false);
    ResultMsg {
        runner: "r1".into(),
        ..ResultMsg::without_run(
            &Names::default(),
            &c,
            &c.job(token),
            i,
            1,
            status,
            "x".into(),
        )
    }
}

impl World {
    /// Pipeline commit `i` delivered for the first time; the run's own state (read before
    /// anything starts) is answered with `marker`. Returns the effects of that answer.
    fn take_pipeline(&mut self, i: u64, fail_fast: bool, marker: Option<JobState>) -> Vec<Effect> {
        let c = pipeline_commit(i, fail_fast);
        let effects = self.on(Event::CommitDelivered {
            commit: c.clone(),
            seq: i,
            redelivered: false,
        });
        assert_eq!(
            effects,
            [Effect::ReadState { key: c.key() }],
            "nothing starts before"
        );
        self.on(Event::StateRead {
            key: c.key(),
            read: Ok(marker.map(|m| versioned(m, 5, Duration::ZERO))),
        })
    }

    /// Pipeline job `token` of commit `i` is seen final and its result found: returns the
    /// effects of the result being found.
    fn job_done(&mut self, i: u64, token: &str, status: Status, rev: u64) -> Vec<Effect> {
        let c = pipeline_commit(i, false);
        let done = JobState::queued(&c, &c.job(token))
            .assign("r1", 1)
            .claim(1)
            .finish(status, None);
        let effects = self.on(Event::JobStateChanged {
            key: job_key(i, token),
            state: Some(versioned(done, rev, Duration::ZERO)),
        });
        assert!(
            effects.iter().any(
                |e| matches!(e, Effect::LookUpResult { key, .. } if key == &job_key(i, token))
            ),
            "{effects:?}"
        );
        assert!(
            effects.contains(&Effect::CountResult {
                status: Some(status),
                job: true
            }),
            "counted as a job's result, not a run's: {effects:?}"
        );
        self.on(Event::ResultLookedUp {
            key: job_key(i, token),
            result: Some(job_result(i, token, status)),
        })
    }
}

#[test]
fn a_pipeline_starts_its_ready_jobs_side_by_side_and_the_rest_as_needs_pass() {
    let mut w = World::new();
    w.runner("r1", &[], 2);
    w.runner("r2", &[], 2);
    let effects = w.take_pipeline(1, false, None);
    let started = assignments(&effects);
    let keys: Vec<&str> = started.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [job_key(1, "lint"), job_key(1, "build")],
        "{effects:?}"
    );
    assert_ne!(started[0].1, started[1].1, "spread over the runners");
    let effects = w.job_done(1, "lint", Status::Passed, 10);
    assert_eq!(
        assignments(&effects)[0].0,
        job_key(1, "test"),
        "{effects:?}"
    );
    assert!(!effects
        .iter()
        .any(|e| matches!(e, Effect::AckCommit { .. })));
    w.job_done(1, "build", Status::Passed, 11);
    let effects = w.job_done(1, "test", Status::Failed, 12);
    let result = match &effects[..] {
        [Effect::PublishRunResult { key, result }] => {
            assert_eq!(key, &pipeline_commit(1, false).key());
            result.clone()
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(result.status, Status::Failed);
    assert_eq!(result.job, None);
    assert_eq!(result.jobs.len(), 3);
    assert_eq!(result.reason.as_deref(), Some("test: failed (x)"));
    // The commit is acked only once the run's result is stored.
    let effects = w.on(Event::RunResultPublished {
        key: pipeline_commit(1, false).key(),
        stored: false,
    });
    no_effects(&effects);
    let effects = w.tick();
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::PublishRunResult { .. })),
        "tried again: {effects:?}"
    );
    let effects = w.on(Event::RunResultPublished {
        key: pipeline_commit(1, false).key(),
        stored: true,
    });
    assert_eq!(
        effects,
        [Effect::AckCommit {
            run: pipeline_commit(1, false).key()
        }]
    );
}

#[test]
fn a_failed_need_skips_without_a_runner_and_fail_fast_cancels_what_runs() {
    let mut w = World::new();
    w.runner("r1", &[], 4);
    w.take_pipeline(1, true, None);
    let effects = w.job_done(1, "lint", Status::Failed, 10);
    // test is skipped (never assigned); build, running, is asked to stop.
    assert!(assignments(&effects).is_empty(), "{effects:?}");
    match &effects[..] {
        [Effect::CancelJob { key, by, .. }] => {
            assert_eq!(key, &job_key(1, "build"));
            assert!(by.contains("fail_fast"), "{by}");
        }
        other => panic!("{other:?}"),
    }
    let effects = w.job_done(1, "build", Status::Cancelled, 11);
    match &effects[..] {
        [Effect::PublishRunResult { result, .. }] => {
            assert_eq!(result.status, Status::Failed);
            let statuses: Vec<Status> = result.jobs.iter().map(|j| j.status).collect();
            assert_eq!(
                statuses,
                [Status::Failed, Status::Skipped, Status::Cancelled]
            );
            assert!(result.fail_fast);
        }
        other => panic!("{other:?}"),
    }
}

/// Answers every question in `effects` of taking a pipeline's run: the run's own state with
/// `marker`, its result with none, each job's result and state from `jobs` (token, status),
/// none for a job not listed. Returns the effects of the last answer.
fn answer_taking(
    w: &mut World,
    i: u64,
    effects: Vec<Effect>,
    marker: Option<JobState>,
    jobs: &[(&str, JobPhase, Option<Status>)],
) -> Vec<Effect> {
    let c = pipeline_commit(i, false);
    let mut last = vec![];
    for e in effects {
        last = match e {
            Effect::ReadState { key } if key == c.key() => w.on(Event::StateRead {
                key,
                read: Ok(marker.clone().map(|m| versioned(m, 5, Duration::ZERO))),
            }),
            Effect::LookUpResult { key, .. } if key == c.key() => {
                w.on(Event::ResultLookedUp { key, result: None })
            }
            Effect::ReadState { key } => {
                let found = jobs.iter().find(|(t, ..)| job_key(i, t) == key);
                let state = found.map(|(t, phase, status)| {
                    let mut s = JobState::queued(&c, &c.job(t)).assign("r1", 1).claim(1);
                    s.phase = *phase;
                    s.status = *status;
                    versioned(s, 3, Duration::ZERO)
                });
                w.on(Event::StateRead {
                    key,
                    read: Ok(state),
                })
            }
            Effect::LookUpResult { key, .. } => {
                let found = jobs.iter().find(|(t, ..)| job_key(i, t) == key);
                let result = found.and_then(|(t, _, status)| status.map(|s| job_result(i, t, s)));
                w.on(Event::ResultLookedUp { key, result })
            }
            other => panic!("taking asks no {other:?}"),
        };
    }
    last
}

#[test]
fn a_redelivered_pipeline_with_a_result_is_acked_and_one_without_reads_its_jobs() {
    let mut w = World::new();
    w.runner("r1", &[], 4);
    let effects = w.on(Event::CommitDelivered {
        commit: pipeline_commit(1, false),
        seq: 1,
        redelivered: true,
    });
    // Nothing starts before the run's state and result, and every job's, are read.
    assert!(assignments(&effects).is_empty());
    let c = pipeline_commit(1, false);
    assert!(effects.contains(&Effect::ReadState { key: c.key() }));
    assert!(effects.contains(&Effect::LookUpResult {
        key: c.key(),
        job: c.only_job()
    }));
    for token in ["lint", "test", "build"] {
        assert!(effects.contains(&Effect::ReadState {
            key: job_key(1, token)
        }));
    }
    let effects = answer_taking(&mut w, 1, effects, None, &[]);
    // No job had a state: the ready ones start (read again as any redelivered job).
    let reads: Vec<&str> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::ReadState { key } => Some(key.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(reads, [job_key(1, "lint"), job_key(1, "build")]);

    let mut w = World::new();
    w.on(Event::CommitDelivered {
        commit: pipeline_commit(2, false),
        seq: 2,
        redelivered: true,
    });
    let c = pipeline_commit(2, false);
    let stored = ResultMsg::without_run(
        &Names::default(),
        &c,
        &c.only_job(),
        2,
        1,
        Status::Passed,
        "x".into(),
    );
    let effects = w.on(Event::ResultLookedUp {
        key: c.key(),
        result: Some(stored),
    });
    assert_eq!(effects, [Effect::AckCommit { run: c.key() }]);
}

#[test]
fn a_redelivered_pipeline_reads_every_job_result_before_starting_anything() {
    // fail_fast: build failed under the dispatcher that died, lint passed. test (needs lint)
    // must end skipped, never started and then cancelled.
    let mut w = World::new();
    w.runner("r1", &[], 4);
    let effects = w.on(Event::CommitDelivered {
        commit: pipeline_commit(1, true),
        seq: 1,
        redelivered: true,
    });
    let jobs = [
        ("lint", JobPhase::Final, Some(Status::Passed)),
        ("build", JobPhase::Final, Some(Status::Failed)),
    ];
    let effects = answer_taking(&mut w, 1, effects, None, &jobs);
    assert!(assignments(&effects).is_empty(), "{effects:?}");
    match &effects[..] {
        [Effect::PublishRunResult { result, .. }] => {
            assert_eq!(result.status, Status::Failed);
            let statuses: Vec<Status> = result.jobs.iter().map(|j| j.status).collect();
            assert_eq!(statuses, [Status::Passed, Status::Skipped, Status::Failed]);
        }
        other => panic!("{other:?}"),
    }

    // A job another dispatcher started is held again (its state read, then adopted) and, the
    // run being stopped, asked to stop.
    let mut w = World::new();
    w.runner("r1", &[], 4);
    let effects = w.on(Event::CommitDelivered {
        commit: pipeline_commit(2, true),
        seq: 2,
        redelivered: true,
    });
    let jobs = [
        ("lint", JobPhase::Final, Some(Status::Failed)),
        ("build", JobPhase::Running, None),
    ];
    let effects = answer_taking(&mut w, 2, effects, None, &jobs);
    assert!(assignments(&effects).is_empty(), "{effects:?}");
    assert!(
        effects.contains(&Effect::ReadState {
            key: job_key(2, "build")
        }),
        "{effects:?}"
    );
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::CancelJob { key, .. } if key == &job_key(2, "build"))),
        "{effects:?}"
    );
}

#[test]
fn a_pipeline_run_cancelled_before_any_dispatcher_took_it_starts_nothing() {
    let mut w = World::new();
    w.runner("r1", &[], 4);
    let c = pipeline_commit(1, false);
    let marker = JobState::queued(&c, &c.only_job()).request_cancel("by ann".into());
    let effects = w.take_pipeline(1, false, Some(marker));
    assert!(assignments(&effects).is_empty(), "{effects:?}");
    let result = match &effects[..] {
        [Effect::PublishRunResult { result, .. }] => result.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(result.status, Status::Cancelled);
    assert_eq!(result.reason.as_deref(), Some("cancelled by ann"));
    assert!(result.jobs.iter().all(|j| j.status == Status::Skipped));
    // Once the result is stored, the request is marked answered, then the commit acked.
    let effects = w.on(Event::RunResultPublished {
        key: c.key(),
        stored: true,
    });
    match &effects[..] {
        [Effect::WriteState {
            key,
            state,
            revision: Some(5),
        }, Effect::AckCommit { run }] => {
            assert_eq!((key, run), (&c.key(), &c.key()));
            assert_eq!(state.phase, JobPhase::Final);
        }
        other => panic!("{other:?}"),
    }

    // Redelivered: the same.
    let mut w = World::new();
    let effects = w.on(Event::CommitDelivered {
        commit: pipeline_commit(2, false),
        seq: 2,
        redelivered: true,
    });
    let c = pipeline_commit(2, false);
    let marker = JobState::queued(&c, &c.only_job()).request_cancel("by ann".into());
    let effects = answer_taking(&mut w, 2, effects, Some(marker), &[]);
    assert!(
        matches!(&effects[..], [Effect::PublishRunResult { result, .. }] if result.status == Status::Cancelled),
        "{effects:?}"
    );
}

#[test]
fn a_cancelled_run_stops_its_jobs_even_unrecorded_ones_and_starts_none_after() {
    let mut w = World::new();
    // One slot: lint runs, build waits with no state yet (its first 500 ms).
    w.runner("r1", &[], 1);
    let effects = w.take_pipeline(1, false, None);
    assert_eq!(assignments(&effects).len(), 1);
    let c = pipeline_commit(1, false);
    let marker = JobState::queued(&c, &c.only_job()).request_cancel("by ann".into());
    let effects = w.on(Event::JobStateChanged {
        key: c.key(),
        state: Some(versioned(marker, 7, Duration::ZERO)),
    });
    let mut cancelled: Vec<&str> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::CancelJob { key, by, .. } => {
                assert_eq!(by, "by ann");
                Some(key.as_str())
            }
            _ => None,
        })
        .collect();
    cancelled.sort();
    let mut expected = [job_key(1, "build"), job_key(1, "lint")];
    expected.sort();
    assert_eq!(cancelled, expected, "{effects:?}");
    // lint passes just after the cancel: test, which needs it, does not start.
    let effects = w.job_done(1, "lint", Status::Passed, 10);
    assert!(assignments(&effects).is_empty(), "{effects:?}");
    // build's cancel request comes back: it ends here (no runner), cancelled.
    let build = JobState::queued(&c, &c.job("build")).request_cancel("by ann".into());
    let effects = w.on(Event::JobStateChanged {
        key: job_key(1, "build"),
        state: Some(versioned(build.clone(), 11, Duration::ZERO)),
    });
    assert_eq!(
        effects,
        [Effect::ReadState {
            key: job_key(1, "build")
        }]
    );
    let effects = w.on(Event::StateRead {
        key: job_key(1, "build"),
        read: Ok(Some(versioned(build, 11, Duration::ZERO))),
    });
    assert!(
        matches!(&effects[..], [Effect::FinishWithoutRunner { result, .. }] if result.status == Status::Cancelled),
        "{effects:?}"
    );
    let effects = w.on(Event::FinishedWithoutRunner {
        key: job_key(1, "build"),
        stored: true,
    });
    match &effects[..] {
        [Effect::PublishRunResult { result, .. }] => {
            assert_eq!(result.status, Status::Cancelled);
            let statuses: Vec<Status> = result.jobs.iter().map(|j| j.status).collect();
            assert_eq!(
                statuses,
                [Status::Passed, Status::Skipped, Status::Cancelled]
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn cancelling_one_job_before_it_starts_ends_it_cancelled_and_skips_its_dependents() {
    let mut w = World::new();
    w.runner("r1", &[], 4);
    w.take_pipeline(1, true, None);
    let c = pipeline_commit(1, true);
    // test (needs lint, still running) is cancelled on its own.
    let test = JobState::queued(&c, &c.job("test")).request_cancel("by ann".into());
    let effects = w.on(Event::JobStateChanged {
        key: job_key(1, "test"),
        state: Some(versioned(test.clone(), 3, Duration::ZERO)),
    });
    assert_eq!(
        effects,
        [Effect::ReadState {
            key: job_key(1, "test")
        }]
    );
    let effects = w.on(Event::StateRead {
        key: job_key(1, "test"),
        read: Ok(Some(versioned(test, 3, Duration::ZERO))),
    });
    assert!(
        matches!(&effects[..], [Effect::FinishWithoutRunner { result, .. }] if result.status == Status::Cancelled && result.job.as_deref() == Some("test")),
        "its own result says cancelled: {effects:?}"
    );
    // In a fail_fast run, that stops nothing else.
    let effects = w.on(Event::FinishedWithoutRunner {
        key: job_key(1, "test"),
        stored: true,
    });
    assert!(
        !effects
            .iter()
            .any(|e| matches!(e, Effect::CancelJob { .. })),
        "{effects:?}"
    );
    // lint passes: test, ended, does not start.
    let effects = w.job_done(1, "lint", Status::Passed, 10);
    assert!(assignments(&effects).is_empty(), "{effects:?}");
    // A running job cancelled on its own does not stop the fail_fast run either.
    let effects = w.job_done(1, "build", Status::Cancelled, 11);
    match &effects[..] {
        [Effect::PublishRunResult { result, .. }] => {
            let statuses: Vec<Status> = result.jobs.iter().map(|j| j.status).collect();
            assert_eq!(
                statuses,
                [Status::Passed, Status::Cancelled, Status::Cancelled]
            );
            assert_eq!(result.status, Status::Cancelled);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_job_too_large_to_publish_ends_its_run_with_an_error_and_frees_its_runner() {
    let mut w = World::new();
    w.runner("r1", &[], 1);
    w.assigned(1, "r1", 1);
    w.deliver(2);
    let effects = w.on(Event::JobRefused {
        key: key(1),
        reason: "max payload size exceeded".into(),
    });
    match &effects[..] {
        [Effect::FinishWithoutRunner {
            result,
            state,
            revision: Some(1),
            ..
        }] => {
            assert_eq!((result.status, result.attempt), (Status::Error, 1));
            let reason = result.reason.as_deref().unwrap_or_default();
            assert!(
                reason.contains("cannot be sent to a runner: max payload"),
                "{reason}"
            );
            assert_eq!(
                state.phase,
                JobPhase::Assigned,
                "the state as written, to finish"
            );
        }
        other => panic!("{other:?}"),
    }
    let effects = w.on(Event::FinishedWithoutRunner {
        key: key(1),
        stored: true,
    });
    assert!(
        effects.contains(&Effect::AckCommit {
            run: commit(1).key()
        }),
        "{effects:?}"
    );
    // The runner is free again: the next commit goes to it.
    w.later(MS(250));
    let effects = w.tick();
    assignment(&effects, "r1", 1);
}

#[test]
fn a_pipelines_job_no_runner_can_take_waits_uncounted_and_is_never_given_back() {
    let mut w = World::new();
    w.runner("r1", &[], 1);
    let mut c = pipeline_commit(1, false);
    c.jobs[2].labels = vec!["gpu".into()];
    let effects = w.on(Event::CommitDelivered {
        commit: c.clone(),
        seq: 1,
        redelivered: false,
    });
    assert_eq!(effects, [Effect::ReadState { key: c.key() }]);
    let effects = w.on(Event::StateRead {
        key: c.key(),
        read: Ok(None),
    });
    // lint starts; build needs a gpu and waits on the side.
    assert_eq!(
        assignments(&effects),
        vec![(job_key(1, "lint"), "r1".to_string())]
    );
    assert_eq!(
        w.core.wanted(w.now),
        HOLD_AHEAD as usize,
        "r1's slot held ready (the window); build counts for nothing"
    );
    // The bound reached with runs of one job: the one past it is given back, never the
    // pipeline's job (its run is held whole).
    for i in 2..=MAX_UNPLACEABLE as u64 {
        no_effects(&w.deliver_with(i, &["gpu"]));
    }
    let last = MAX_UNPLACEABLE as u64 + 1;
    let effects = w.deliver_with(last, &["gpu"]);
    assert!(
        matches!(&effects[..], [Effect::WriteState { key: k, .. }] if *k == key(last)),
        "{effects:?}"
    );
    let effects = w.written(last, 9);
    assert!(
        matches!(&effects[..], [Effect::Release { run, .. }] if *run == commit(last).key()),
        "{effects:?}"
    );
    assert_eq!(
        w.core.held(),
        MAX_UNPLACEABLE + 1,
        "lint, build and the others"
    );
}

// ---- the fair share ----------------------------------------------------------------------------

/// Commit `i` of repository `repo` (branch `branch`), delivered for the first time at sequence `i`.
fn deliver_of(w: &mut World, i: u64, repo: &str, branch: &str, labels: &[&str]) -> Vec<Effect> {
    let c = CommitMsg {
        repo: repo.into(),
        branch: branch.into(),
        labels: labels.iter().map(|l| l.to_string()).collect(),
        ..commit(i)
    };
    w.on(Event::CommitDelivered {
        commit: c,
        seq: i,
        redelivered: false,
    })
}

fn key_of(i: u64, repo: &str) -> String {
    CommitMsg {
        repo: repo.into(),
        ..commit(i)
    }
    .only_job()
    .key()
}

/// The repository of the one job `effects` assigns.
#[track_caller]
fn assigned_repo(effects: &[Effect]) -> String {
    match effects {
        [Effect::WriteState { state, .. }] if state.phase == JobPhase::Assigned => {
            state.repo.clone()
        }
        _ => panic!("expected one assignment, got {effects:?}"),
    }
}

/// Runs commit `i` of `repo` to its end on the watch (assigned, then final).
fn ends(w: &mut World, i: u64, repo: &str, runner: &str) -> Vec<Effect> {
    let c = CommitMsg {
        repo: repo.into(),
        ..commit(i)
    };
    let done = JobState::queued(&c, &c.only_job())
        .assign(runner, 1)
        .claim(i)
        .finish(Status::Passed, None);
    w.on(Event::JobStateChanged {
        key: key_of(i, repo),
        state: Some(versioned(done, 100 + i, MS(0))),
    })
}

#[test]
fn a_freed_slot_goes_to_the_repository_with_the_fewest_jobs_running() {
    let mut w = World::new();
    w.runner("r1", &[], 2);
    for i in 1..=2 {
        assert_eq!(assigned_repo(&deliver_of(&mut w, i, "a", "main", &[])), "a");
        let effects = w.on(Event::StateWritten {
            key: key_of(i, "a"),
            written: Ok(i),
        });
        assert!(
            matches!(&effects[..], [Effect::PublishJob { .. }]),
            "{effects:?}"
        );
    }
    // A's backlog, then one commit of b: all wait, r1 is full.
    for i in 3..=20 {
        no_effects(&deliver_of(&mut w, i, "a", "main", &[]));
    }
    no_effects(&deliver_of(&mut w, 21, "b", "main", &[]));
    // One of a's jobs ends: a has one running, b none: b's commit takes the slot.
    let effects = ends(&mut w, 1, "a", "r1");
    let assigned: Vec<&JobState> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::WriteState { state, .. } if state.phase == JobPhase::Assigned => Some(state),
            _ => None,
        })
        .collect();
    assert_eq!(assigned.len(), 1, "{effects:?}");
    assert_eq!(
        (assigned[0].repo.as_str(), assigned[0].sha.as_str()),
        ("b", commit(21).sha.as_str())
    );
}

#[test]
fn within_a_repository_a_freed_slot_goes_to_the_branch_with_the_fewest_jobs_running() {
    let mut w = World::new();
    w.runner("r1", &[], 2);
    for i in 1..=2 {
        deliver_of(&mut w, i, "a", "feature", &[]);
        w.on(Event::StateWritten {
            key: key_of(i, "a"),
            written: Ok(i),
        });
    }
    for i in 3..=10 {
        no_effects(&deliver_of(&mut w, i, "a", "feature", &[]));
    }
    no_effects(&deliver_of(&mut w, 11, "a", "main", &[]));
    let c = CommitMsg {
        repo: "a".into(),
        branch: "feature".into(),
        ..commit(1)
    };
    let done = JobState::queued(&c, &c.only_job())
        .assign("r1", 1)
        .claim(1)
        .finish(Status::Passed, None);
    let effects = w.on(Event::JobStateChanged {
        key: key_of(1, "a"),
        state: Some(versioned(done, 200, MS(0))),
    });
    let branches: Vec<&str> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::WriteState { state, .. } if state.phase == JobPhase::Assigned => {
                Some(state.branch.as_str())
            }
            _ => None,
        })
        .collect();
    assert_eq!(branches, vec!["main"], "{effects:?}");
}

#[test]
fn jobs_no_runner_can_take_are_never_offered_and_others_pass_them() {
    let mut w = World::new();
    w.runner("r1", &[], 1);
    assert_eq!(assigned_repo(&deliver_of(&mut w, 1, "b", "main", &[])), "b");
    w.on(Event::StateWritten {
        key: key_of(1, "b"),
        written: Ok(1),
    });
    for i in 2..=5 {
        no_effects(&deliver_of(&mut w, i, "gpu", "main", &["gpu"]));
    }
    no_effects(&deliver_of(&mut w, 6, "b", "main", &[]));
    let effects = ends(&mut w, 1, "b", "r1");
    let repos: Vec<&str> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::WriteState { state, .. } if state.phase == JobPhase::Assigned => {
                Some(state.repo.as_str())
            }
            _ => None,
        })
        .collect();
    assert_eq!(repos, vec!["b"], "{effects:?}");
    // A runner with the label joins: a gpu job starts on it.
    let effects = w.runner("g1", &["gpu"], 1);
    assert_eq!(assigned_repo(&effects), "gpu");
}

#[test]
fn heavy_commits_shrink_the_window_to_the_runners_slots() {
    let mut w = World::new();
    w.runner("r1", &[], 1);
    w.assigned(1, "r1", 1);
    let heavy = |i: u64| CommitMsg {
        summary: "x".repeat(1 << 20),
        ..commit(i)
    };
    for i in 2..=80 {
        no_effects(&w.on(Event::CommitDelivered {
            commit: heavy(i),
            seq: i,
            redelivered: false,
        }));
    }
    assert_eq!(
        w.core.wanted(w.now),
        0,
        "79 MiB held: no more than the one slot"
    );
}
