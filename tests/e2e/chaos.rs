//! The chaos test (DESIGN.md, invariants I1-I4 under faults): three runners, two dispatchers, an
//! observer and jetci-web test 200 commits pushed in bursts over three branches while the monkey
//! SIGKILLs and restarts a process every 1-2 s, at least [`MIN_KILLS`] times and every process
//! as often as the others (rounds in which each is killed once, in a random order), and restarts
//! the NATS server twice. At the end every commit has exactly one final result with the right
//! status, no healthy job ran twice, and jetci-web (which reads the results and writes a
//! `test_results/<sha>` file per commit) shows each commit once with its status. The figures are
//! printed; with `JETCI_RELIABILITY=<path to RELIABILITY.md>` they also replace the figures
//! section of that file (`scripts/reliability` does this).
//!
//! A job ran to the end when its command did: the command's last step appends a line to a file
//! ([`Executions`]) and prints the life of the runner process that runs it (a number each runner
//! process gets from the test in its environment and passes to its jobs: a job in its sandbox
//! sees nothing of the runner's process). An execution on a runner that died (killed by the
//! monkey, or exited) is not a healthy one, and does not count, unless its result was stored (a
//! stored result's output shows that runner's life): then the run was over, and running it again
//! would be running a finished job twice.
//!
//! A process that exits on its own (not killed by the monkey) is restarted and counted; one that
//! keeps exiting stops the test at once with the end of its logs (a server without room for the
//! streams makes every process exit at start). Results that stop coming for [`STALL`] stop it
//! too, instead of a wait as long as the slowest healthy run could need.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::executions::{Execution, Executions, LIFE_VAR};
use crate::support::git::GitRepo;
use crate::support::heavy;
use crate::support::http::http_get;
use crate::support::jetstream::{js, names, stream_messages, StoredResults};
use crate::support::nats::{free_addr, NatsServer};
use crate::support::processes::{tail, Proc};
use crate::support::system::{spawn_dispatcher, spawn_observer, spawn_runner_with_env, spawn_web};
use crate::support::waiting::{wait_progressing, NotYet};

const COMMITS: usize = 200;
const BRANCHES: [&str; 3] = ["main", "feature/a.b", "release/1.x"];
/// The fewest SIGKILLs of a run; the monkey goes on past it until pushing has ended and its round
/// is complete (with seven processes, 35 kills: 5 rounds).
const MIN_KILLS: usize = 30;
/// The NATS server is restarted once the monkey has made this many kills (while commits flow).
const NATS_RESTARTS_AFTER: [usize; 2] = [6, 20];
/// A process that exits on its own this many times will not stay up: the test stops.
const MAX_OWN_EXITS: usize = 3;
/// How long results (or jetci-web's view of them) may stop coming before the test fails.
const STALL: Duration = Duration::from_secs(120);
/// The bound of each whole wait, far above a healthy run's (the drain takes seconds).
const BOUND: Duration = Duration::from_secs(600);

/// The kinds of process the monkey kills.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Observer,
    Dispatcher,
    Runner,
    Web,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Observer => "observer",
            Kind::Dispatcher => "dispatcher",
            Kind::Runner => "runner",
            Kind::Web => "jetci-web",
        }
    }
}

/// One of the processes under test. The processes it replaced are kept, so the test knows which
/// runner processes died (and their orphans are killed at the end).
struct Slot {
    kind: Kind,
    name: String,
    spawn: Box<dyn Fn() -> Proc + Send>,
    current: Proc,
    past: Vec<Proc>,
    /// SIGKILLs by the monkey.
    kills: usize,
    /// How each process of the slot that exited on its own ended, with the end of its log.
    own_exits: Vec<String>,
}

impl Slot {
    fn new(kind: Kind, name: &str, spawn: Box<dyn Fn() -> Proc + Send>) -> Slot {
        let current = spawn();
        Slot {
            kind,
            name: name.to_string(),
            spawn,
            current,
            past: Vec::new(),
            kills: 0,
            own_exits: Vec::new(),
        }
    }

    fn kill_and_restart(&mut self) {
        self.current.kill();
        self.kills += 1;
        self.replace();
    }

    /// Restarts the process if it exited on its own, and keeps how it ended.
    fn revive_if_exited(&mut self) {
        let Some(status) = self.current.exit_status() else {
            return;
        };
        eprintln!(
            "chaos: {} exited on its own ({status}); restarting it",
            self.name
        );
        self.own_exits.push(format!(
            "--- {} (pid {}) exited on its own with {status}; the end of its log:\n{}",
            self.name,
            self.current.pid(),
            tail(&self.current.log(), 20)
        ));
        self.replace();
    }

    fn replace(&mut self) {
        let fresh = (self.spawn)();
        self.past.push(std::mem::replace(&mut self.current, fresh));
    }
}

/// Every process under test.
struct Processes(Vec<Slot>);

impl Processes {
    /// Restarts every process that exited on its own, and panics with how they ended when one
    /// did so [`MAX_OWN_EXITS`] times: it will not stay up, and waiting on would only hang.
    fn watch(&mut self) {
        for slot in &mut self.0 {
            slot.revive_if_exited();
        }
        if let Some(slot) = self.0.iter().find(|s| s.own_exits.len() >= MAX_OWN_EXITS) {
            let exits: Vec<&String> = self.0.iter().flat_map(|s| &s.own_exits).collect();
            panic!(
                "{} exited on its own {} times: the system under test does not stay up\n{}",
                slot.name,
                slot.own_exits.len(),
                exits
                    .iter()
                    .map(|e| e.as_str())
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }

    /// SIGKILLs by kind, as `observer 5, dispatcher 10 (2 processes), ...`.
    fn kills_by_kind(&self) -> String {
        let mut by_kind: BTreeMap<Kind, (usize, usize)> = BTreeMap::new();
        for slot in &self.0 {
            let entry = by_kind.entry(slot.kind).or_default();
            entry.0 += slot.kills;
            entry.1 += 1;
        }
        by_kind
            .iter()
            .map(|(kind, (kills, processes))| match processes {
                1 => format!("{} {kills}", kind.name()),
                n => format!("{} {kills} ({n} processes)", kind.name()),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A small deterministic random source (xorshift), seeded from the clock and printed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// `0..n` in a random order (Fisher-Yates).
    fn shuffled(&mut self, n: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            order.swap(i, self.below(i as u64 + 1) as usize);
        }
        order
    }
}

/// Sets its flag when dropped, so the pusher thread stops when the test ends, panicking or not.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn chaos_loses_nothing_and_duplicates_nothing() {
    // Eight processes, a kill every second or two and NATS restarts: not beside another heavy
    // test.
    let _heavy = heavy().await;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("chaos seed {seed}");
    let mut rng = Rng(seed);
    let mut nats = NatsServer::start();
    let url = nats.url();
    let work = tempfile::tempdir().unwrap();
    let repo = Arc::new(GitRepo::new());
    let executions = Executions::new();
    let toml = ".jetci.toml";
    let command = format!(
        "command = {:?}\n",
        format!(
            "sleep 0.4; {}; echo \"runner life ${LIFE_VAR}\"; exit $(cat status)",
            executions.record()
        )
    );
    let first = repo.commit("first", &[(toml, &command), ("status", "0")]);
    for b in &BRANCHES[1..] {
        repo.run_git(&["branch", b]);
    }

    let mut slots: Vec<Slot> = Vec::new();
    {
        let (u, repo) = (url.clone(), repo.clone());
        slots.push(Slot::new(
            Kind::Observer,
            "observer",
            Box::new(move || spawn_observer(&u, &repo, &[])),
        ));
    }
    for d in 0..2 {
        let u = url.clone();
        slots.push(Slot::new(
            Kind::Dispatcher,
            &format!("dispatcher-{d}"),
            Box::new(move || spawn_dispatcher(&u, &["--max-attempts", "5"])),
        ));
    }
    // Each runner process's life, by its pid.
    let lives: Arc<Mutex<HashMap<u32, u32>>> = Arc::default();
    for r in 0..3 {
        let (u, work) = (url.clone(), work.path().to_path_buf());
        let id = format!("r{r}");
        let flags: Vec<String> = executions.runner_flags().map(String::from).to_vec();
        let lives = lives.clone();
        slots.push(Slot::new(
            Kind::Runner,
            &id.clone(),
            Box::new(move || {
                let mut lives = lives.lock().unwrap();
                let life = lives.len() as u32 + 1;
                let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
                let env = [(LIFE_VAR, life.to_string())];
                let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let runner = spawn_runner_with_env(&u, &id, &work, &flags, &env);
                lives.insert(runner.pid(), life);
                runner
            }),
        ));
    }
    let web_addr = free_addr();
    let result_files = work.path().join("test_results");
    {
        let (u, addr) = (url.clone(), web_addr.clone());
        let dir = result_files.to_str().expect("utf-8 temp dir").to_string();
        slots.push(Slot::new(
            Kind::Web,
            "jetci-web",
            Box::new(move || spawn_web(&u, &addr, &["--results-dir", &dir])),
        ));
    }
    let mut processes = Processes(slots);
    let mut results = StoredResults::new(&url);
    wait_for_results(&mut results, 1, &mut processes).await;

    // Pushes: bursts of commits on the three branches, each with the status it must get.
    let expected: Arc<Mutex<BTreeMap<String, &'static str>>> =
        Arc::new(Mutex::new(BTreeMap::new()));
    expected.lock().unwrap().insert(first.clone(), "passed");
    let pushing_done = Arc::new(Mutex::new(None::<time::OffsetDateTime>));
    let stop = StopOnDrop(Arc::default());
    let pusher = {
        let expected = expected.clone();
        let done = pushing_done.clone();
        let stop = stop.0.clone();
        let mut rng = Rng(seed.rotate_left(17) | 1);
        let repo = repo.clone();
        std::thread::spawn(move || {
            let mut made = 0;
            while made < COMMITS && !stop.load(Ordering::Relaxed) {
                let branch = BRANCHES[rng.below(3) as usize];
                repo.checkout(branch);
                let burst = (1 + rng.below(10) as usize).min(COMMITS - made);
                for _ in 0..burst {
                    let fail = rng.below(4) == 0;
                    let sha = repo.commit(
                        &format!("commit {made} on {branch}"),
                        &[
                            ("status", if fail { "1" } else { "0" }),
                            ("n", &made.to_string()),
                        ],
                    );
                    expected
                        .lock()
                        .unwrap()
                        .insert(sha, if fail { "failed" } else { "passed" });
                    made += 1;
                }
                // Paced so that commits flow for about as long as the monkey kills.
                std::thread::sleep(Duration::from_millis(600 + rng.below(1200)));
            }
            *done.lock().unwrap() = Some(time::OffsetDateTime::now_utc());
        })
    };

    // The monkey: a SIGKILL every 1-2 s, in rounds that kill every process once in a random
    // order, until pushing has ended, at least MIN_KILLS were made and the round is complete;
    // the NATS server restarted twice while commits flow.
    let mut kills = 0;
    let mut round: VecDeque<usize> = VecDeque::new();
    let mut recoveries = Vec::new();
    let mut nats_restarts = 0;
    while kills < MIN_KILLS || !pusher.is_finished() || !round.is_empty() {
        tokio::time::sleep(Duration::from_millis(1000 + rng.below(1000))).await;
        processes.watch();
        if NATS_RESTARTS_AFTER.get(nats_restarts) == Some(&kills) {
            eprintln!("chaos: restarting nats-server");
            nats.kill();
            tokio::time::sleep(Duration::from_secs(1)).await;
            nats.restart();
            nats_restarts += 1;
            continue;
        }
        if round.is_empty() {
            round = rng.shuffled(processes.0.len()).into();
        }
        let slot = &mut processes.0[round.pop_front().expect("a round was just drawn")];
        let held = if slot.kind == Kind::Runner {
            running_on(&url, &slot.name).await
        } else {
            Vec::new()
        };
        eprintln!("chaos: SIGKILL {} (running {held:?})", slot.name);
        let killed_at = Instant::now();
        slot.kill_and_restart();
        kills += 1;
        for key in held {
            let (url, from) = (url.clone(), slot.name.clone());
            recoveries.push(tokio::spawn(async move {
                moved_after(&url, &key, &from, killed_at).await
            }));
        }
    }
    pusher.join().unwrap();
    let pushed_at = pushing_done.lock().unwrap().expect("pusher finished");

    // Every commit, one result each, with its status.
    let expected = expected.lock().unwrap().clone();
    let all = wait_for_results(&mut results, expected.len(), &mut processes).await;
    let drained = results.last_stored_at().expect("results were read") - pushed_at;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let n = names();
    let all_now = stream_messages(&url, &n.results_stream(), &n.results_filter()).await;
    let mut per_sha: HashMap<String, Vec<Value>> = HashMap::new();
    for (_, r) in &all_now {
        per_sha
            .entry(r["sha"].as_str().unwrap().to_string())
            .or_default()
            .push(r.clone());
    }
    let lost: Vec<&String> = expected
        .keys()
        .filter(|s| !per_sha.contains_key(*s))
        .collect();
    let duplicated = per_sha.values().filter(|v| v.len() > 1).count();
    let wrong: Vec<String> = expected
        .iter()
        .filter_map(|(sha, want)| {
            let got = per_sha.get(sha)?.first()?["status"].as_str()?.to_string();
            (got != *want).then(|| format!("{sha}: want {want}, got {got}"))
        })
        .collect();

    // jetci-web: each commit once in its API, and in its result files, with its status.
    let web = wait_for_web(&web_addr, &result_files, &expected, &mut processes).await;

    // Executions: a job counts as run twice when two healthy executions of it ran to the end
    // (see the module's doc).
    let lives = lives.lock().unwrap().clone();
    let died: HashSet<u32> = processes
        .0
        .iter()
        .filter(|s| s.kind == Kind::Runner)
        .flat_map(|s| s.past.iter().map(|p| lives[&p.pid()]))
        .collect();
    let superseded = stream_messages(&url, &n.results_stream(), &n.superseded_filter()).await;
    let stored: Vec<&Value> = all_now.iter().chain(&superseded).map(|(_, r)| r).collect();
    let result_stored = |e: &Execution| {
        stored.iter().any(|r| {
            r["sha"] == e.sha.as_str()
                && r["attempt"] == e.attempt
                && r["output_tail"]
                    .as_str()
                    .is_some_and(|t| t.contains(&format!("runner life {}\n", e.runner_life)))
        })
    };
    let mut twice: BTreeMap<String, Vec<Execution>> = BTreeMap::new();
    for (sha, runs) in executions.per_sha() {
        let healthy: Vec<Execution> = runs
            .into_iter()
            .filter(|e| !died.contains(&e.runner_life) || result_stored(e))
            .collect();
        if healthy.len() > 1 {
            twice.insert(sha, healthy);
        }
    }
    let extra: usize = twice.values().map(|runs| runs.len() - 1).sum();

    let mut recoveries: Vec<Duration> = futures::future::join_all(recoveries)
        .await
        .into_iter()
        .filter_map(|moved| moved.ok().flatten())
        .collect();
    recoveries.sort();
    let median = recoveries.get(recoveries.len() / 2).copied();
    let worst = recoveries.last().copied();
    let own_exits: usize = processes.0.iter().map(|s| s.own_exits.len()).sum();
    let later_attempts = all_now.iter().filter(|(_, r)| r["attempt"] != 1).count();
    let figures = format!(
        "| figure | value |\n| --- | --- |\n\
         | commits tested | {} (200 pushed in bursts over 3 branches, plus the first) |\n\
         | processes SIGKILLed and restarted | {kills}: {} |\n\
         | processes that exited on their own (restarted) | {own_exits} |\n\
         | NATS server restarts | {nats_restarts} |\n\
         | commits lost | {} |\n\
         | commits with more than one final result | {duplicated} |\n\
         | wrong statuses | {} |\n\
         | healthy jobs run to the end twice | {extra} |\n\
         | results of a later attempt / results kept as superseded | {later_attempts} / {} |\n\
         | commits missing, repeated or wrong in jetci-web's API / its result files | {} / {} |\n\
         | last result stored, after the last push (the monkey goes on) | {:.1} s |\n\
         | runner SIGKILL → its job running elsewhere | median {}, worst {} (over {} kills of a busy runner) |\n\
         | seed | {seed} |\n",
        expected.len(),
        processes.kills_by_kind(),
        lost.len(),
        wrong.len(),
        superseded.len(),
        web.api.len(),
        web.files.len(),
        drained.as_seconds_f64(),
        median.map(|d| format!("{:.2} s", d.as_secs_f64())).unwrap_or("-".into()),
        worst.map(|d| format!("{:.2} s", d.as_secs_f64())).unwrap_or("-".into()),
        recoveries.len(),
    );
    eprintln!("{figures}");
    if let Ok(path) = std::env::var("JETCI_RELIABILITY") {
        write_figures(&PathBuf::from(path), &figures);
    }

    assert!(all.len() >= expected.len());
    assert!(lost.is_empty(), "commits without a result: {lost:?}");
    assert_eq!(duplicated, 0, "runs with two final results");
    assert!(wrong.is_empty(), "wrong statuses: {wrong:?}");
    assert_eq!(
        all_now.len(),
        expected.len(),
        "one result per commit, nothing else"
    );
    assert_eq!(extra, 0, "healthy jobs ran to the end twice: {twice:#?}");
    assert!(web.api.is_empty(), "jetci-web's API: {:#?}", web.api);
    assert!(web.files.is_empty(), "result files: {:#?}", web.files);
}

/// Waits until `results` holds `count` results and returns them, watching the processes under
/// test on each look (see [`Processes::watch`]); panics when no new result is stored for
/// [`STALL`].
async fn wait_for_results(
    results: &mut StoredResults,
    count: usize,
    processes: &mut Processes,
) -> Vec<Value> {
    let what = format!("{count} stored result(s)");
    wait_progressing(&what, STALL, BOUND, async || {
        processes.watch();
        let error = results.look().await.err();
        if results.len() >= count {
            return Ok(results.values());
        }
        let seen = format!(
            "{}\nlast error: {}",
            results.summary(5),
            error.as_deref().unwrap_or("none")
        );
        Err(NotYet {
            progress: results.len(),
            seen,
        })
    })
    .await
}

/// What jetci-web shows wrong: each a line saying which commit and how.
struct WebFindings {
    /// In `/api/results`: a commit missing, listed twice, or with the wrong status.
    api: Vec<String>,
    /// In `--results-dir`: a commit's file missing or with the wrong status.
    files: Vec<String>,
}

/// Waits until jetci-web shows every expected commit (in `/api/results` and as a result file
/// in `files`) and returns what it shows wrong then; watches the processes under test meanwhile
/// and panics when the commits shown stop growing for [`STALL`] (with what was wrong).
async fn wait_for_web(
    addr: &str,
    files: &Path,
    expected: &BTreeMap<String, &'static str>,
    processes: &mut Processes,
) -> WebFindings {
    let path = format!("/api/results?repo=app&limit={}", expected.len() * 2);
    let what = format!("jetci-web to show the {} commits", expected.len());
    wait_progressing(&what, STALL, BOUND, async || {
        processes.watch();
        let listed: Vec<Value> = match http_get(addr, &path) {
            Ok(r) if r.status == 200 => serde_json::from_str(&r.body).unwrap_or_default(),
            Ok(r) => {
                return Err(NotYet {
                    progress: 0,
                    seen: format!("{} {}", r.status, r.body),
                })
            }
            Err(e) => {
                return Err(NotYet {
                    progress: 0,
                    seen: e,
                })
            }
        };
        let mut api: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for r in listed.iter().filter(|r| r["superseded"] != true) {
            let (Some(sha), Some(status)) = (r["sha"].as_str(), r["status"].as_str()) else {
                continue;
            };
            api.entry(sha).or_default().push(status);
        }
        let mut found = WebFindings {
            api: Vec::new(),
            files: Vec::new(),
        };
        let mut shown = 0;
        for (sha, want) in expected {
            match api.get(sha.as_str()).map(Vec::as_slice) {
                None => found.api.push(format!("{sha}: missing")),
                Some([got]) if got == want => shown += 1,
                Some(got) => found.api.push(format!("{sha}: want {want}, got {got:?}")),
            }
            match std::fs::read_to_string(files.join(sha)) {
                Err(_) => found.files.push(format!("{sha}: missing")),
                Ok(text) if text.starts_with(&format!("status: {want}\n")) => shown += 1,
                Ok(text) => found.files.push(format!(
                    "{sha}: want {want}, got {:?}",
                    text.lines().next().unwrap_or("")
                )),
            }
        }
        let missing = |list: &[String]| list.iter().any(|l| l.ends_with(": missing"));
        if !missing(&found.api) && !missing(&found.files) {
            return Ok(found);
        }
        let seen = format!("API: {:#?}\nfiles: {:#?}", found.api, found.files);
        Err(NotYet {
            progress: shown,
            seen,
        })
    })
    .await
}

/// Jobs running on `runner` now, from `ci-jobs`.
async fn running_on(url: &str, runner: &str) -> Vec<String> {
    let js = js(url).await;
    let Ok(kv) = js.get_key_value(names().jobs_bucket()).await else {
        return Vec::new();
    };
    let Ok(mut keys) = kv.keys().await else {
        return Vec::new();
    };
    let mut out = Vec::new();
    use futures::StreamExt;
    while let Some(Ok(key)) = keys.next().await {
        if let Ok(Some(v)) = kv.get(&key).await {
            let v: Value = serde_json::from_slice(&v).unwrap_or_default();
            if v["runner"] == runner && v["phase"] == "running" {
                out.push(key);
            }
        }
    }
    out
}

/// How long after `since` job `key` ran on a runner other than `from` (or ended), if it did
/// within a bound. A measurement, not a wait that fails: a job that does not move in time is
/// left out of the figures.
async fn moved_after(url: &str, key: &str, from: &str, since: Instant) -> Option<Duration> {
    let js = js(url).await;
    let kv = js.get_key_value(names().jobs_bucket()).await.ok()?;
    while since.elapsed() < Duration::from_secs(30) {
        if let Ok(Some(v)) = kv.get(key).await {
            let v: Value = serde_json::from_slice(&v).unwrap_or_default();
            if v["phase"] == "final" {
                return None; // it had finished before the kill took effect
            }
            if v["phase"] == "running" && v["runner"] != from {
                return Some(since.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Replaces the figures between the markers of RELIABILITY.md.
fn write_figures(path: &PathBuf, figures: &str) {
    let text = std::fs::read_to_string(path).expect("read RELIABILITY.md");
    let (start, end) = ("<!-- chaos-figures -->", "<!-- /chaos-figures -->");
    let (Some(a), Some(b)) = (text.find(start), text.find(end)) else {
        panic!("{} lacks the {start} … {end} markers", path.display());
    };
    let date = time::OffsetDateTime::now_utc().date();
    let new = format!(
        "{}{start}\nLast run: {date}, {} cores.\n\n{figures}{}",
        &text[..a],
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        &text[b..]
    );
    std::fs::write(path, new).expect("write RELIABILITY.md");
}
