//! What a flood of runner entries costs the dispatcher's core while jobs wait (issue 17,
//! "Forged runner presence"): `cargo run --release -p jetci --example runner_flood -- 10000 100`.
//!
//! It drives [`jetci::dispatcher::core::Core`] alone, as the driver does (every question answered
//! at once, `wanted` asked after every event), with no server: one real runner with one slot,
//! `JOBS` commits that wait, then `ENTRIES` new `ci-runners` entries, each a runner of its own
//! (its id is its key, so the core takes it). Two cases:
//! - `labels`: the waiting commits need a label (`gpu`) the new entries do not have, and the
//!   entries are free runners: each one is a new runner with a free slot that none of the
//!   waiting jobs can use.
//! - `draining`: the commits need no label and wait for a free runner; the entries are runners
//!   that take no job (`accepting` false).
//!
//! It prints the CPU time of the flood (the core's work, on one thread) and the time per entry.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use jetci::dispatcher::core::{Config, Core, Effect, Event};
use jetci::messages::{now, CommitMsg, RunnerInfo, VERSION};
use jetci::subjects::Names;

fn commit(i: u64, labels: &[&str]) -> CommitMsg {
    CommitMsg {
        v: VERSION,
        repo: "app".into(),
        url: "/srv/app".into(),
        branch: "main".into(),
        sha: format!("{i:040x}"),
        run: 1,
        labels: labels.iter().map(|l| l.to_string()).collect(),
        author: String::new(),
        summary: String::new(),
        published_at: now(),
        jobs: vec![],
        fail_fast: false,
    }
}

fn runner(id: &str, labels: &[&str], accepting: bool) -> RunnerInfo {
    RunnerInfo {
        v: VERSION,
        id: id.into(),
        host: "h".into(),
        labels: labels.iter().map(|l| l.to_string()).collect(),
        capacity: 1,
        jobs: vec![],
        accepting,
        started_at: now(),
        updated_at: now(),
        warnings: Vec::new(),
    }
}

/// The core and a driver that answers every question at once, as a healthy server would.
struct Driven {
    core: Core,
    now: Instant,
    revision: u64,
    assigned: usize,
}

impl Driven {
    fn on(&mut self, event: Event) {
        let mut todo: VecDeque<Effect> = self.core.handle(event, self.now).into();
        while let Some(effect) = todo.pop_front() {
            let answer = match effect {
                Effect::WriteState { key, .. } => {
                    self.revision += 1;
                    Some(Event::StateWritten {
                        key,
                        written: Ok(self.revision),
                    })
                }
                Effect::ReadState { key } => Some(Event::StateRead {
                    key,
                    read: Ok(None),
                }),
                Effect::LookUpResult { key, .. } => {
                    Some(Event::ResultLookedUp { key, result: None })
                }
                Effect::PublishJob { .. } => {
                    self.assigned += 1;
                    None
                }
                _ => None,
            };
            if let Some(answer) = answer {
                let more = self.core.handle(answer, self.now);
                for e in more.into_iter().rev() {
                    todo.push_front(e);
                }
            }
        }
        // The driver asks after every event how many commits to pull.
        std::hint::black_box(self.core.wanted(self.now));
    }
}

/// Runs one case; returns the flood's CPU time and how many jobs were assigned during it.
fn flood(entries: usize, jobs: u64, job_labels: &[&str], accepting: bool) -> (Duration, usize) {
    let start = Instant::now();
    let config = Config {
        lease: Duration::from_secs(10),
        max_attempts: 3,
        names: Names::default(),
    };
    let mut d = Driven {
        core: Core::new(config, start),
        now: start,
        revision: 0,
        assigned: 0,
    };
    d.on(Event::RunnerSeen {
        key: "r0".into(),
        info: runner("r0", &[], true),
        age: Duration::ZERO,
        revision: 1,
    });
    // Its one slot taken by commit 0, then the waiting commits.
    d.on(Event::CommitDelivered {
        commit: commit(0, &[]),
        seq: 0,
        redelivered: false,
    });
    for i in 1..=jobs {
        d.on(Event::CommitDelivered {
            commit: commit(i, job_labels),
            seq: i,
            redelivered: false,
        });
    }
    // Their waits are recorded, as they would be after half a second.
    d.now += Duration::from_millis(600);
    d.on(Event::Tick);
    let assigned_before = d.assigned;
    let cpu = cpu_time();
    for i in 0..entries {
        let id = format!("flood-{i}");
        d.on(Event::RunnerSeen {
            key: id.clone(),
            info: runner(&id, &[], accepting),
            age: Duration::ZERO,
            revision: 2 + i as u64,
        });
    }
    (cpu_time() - cpu, d.assigned - assigned_before)
}

/// The process's CPU time (user and system; the example runs on one thread).
fn cpu_time() -> Duration {
    use nix::sys::resource::{getrusage, UsageWho};
    let usage = getrusage(UsageWho::RUSAGE_SELF).expect("the process's CPU time");
    let micros = |t: nix::sys::time::TimeVal| t.tv_sec() as u64 * 1_000_000 + t.tv_usec() as u64;
    Duration::from_micros(micros(usage.user_time()) + micros(usage.system_time()))
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("usage: runner_flood [ENTRIES [JOBS]]"))
        .collect();
    let entries = args.first().copied().unwrap_or(10_000);
    let jobs = args.get(1).copied().unwrap_or(100) as u64;
    for (case, labels, accepting) in [("labels", &["gpu"][..], true), ("draining", &[][..], false)]
    {
        let (cpu, assigned) = flood(entries, jobs, labels, accepting);
        println!(
            "{case}: {entries} runner entries while {jobs} jobs wait: {:.1} ms CPU, {:.1} µs per entry, {assigned} jobs assigned",
            cpu.as_secs_f64() * 1e3,
            cpu.as_secs_f64() * 1e6 / entries as f64,
        );
    }
}
