//! The chaos test (DESIGN.md, invariants I1-I4 under faults): three runners, two dispatchers and
//! an observer test 200 commits pushed in bursts over three branches while a random process is
//! SIGKILLed and restarted every few seconds and the NATS server is restarted once. At the end
//! every commit has exactly one final result with the right status, and no healthy job ran
//! twice. The figures are printed; with `JETCI_RELIABILITY=<path to RELIABILITY.md>` they also
//! replace the figures section of that file (`scripts/reliability` does this).
//!
//! A job ran to the end when its command did: the command's last step appends a line to a file
//! ([`Executions`]) and prints the life of the runner process that runs it (a number each runner
//! process gets from the test in its environment and passes to its jobs: a job in its sandbox
//! sees nothing of the runner's process). An execution on a runner the monkey killed is not a
//! healthy one, and does not count, unless its result was stored (a stored result's output shows
//! that runner's life): then the run was over, and running it again would be running a finished
//! job twice.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::executions::{Execution, Executions, LIFE_VAR};
use crate::support::git::GitRepo;
use crate::support::heavy;
use crate::support::jetstream::{js, names, stream_messages, wait_results};
use crate::support::nats::NatsServer;
use crate::support::processes::Proc;
use crate::support::system::{spawn_dispatcher, spawn_observer, spawn_runner_with_env};

const COMMITS: usize = 200;
const BRANCHES: [&str; 3] = ["main", "feature/a.b", "release/1.x"];
const BOUND: Duration = Duration::from_secs(900);

/// One of the processes the chaos monkey may kill; the processes it replaced are kept, so the
/// test knows which runner processes were killed (and their orphans are killed at the end).
struct Slot {
    name: String,
    spawn: Box<dyn Fn() -> Proc + Send>,
    current: Proc,
    past: Vec<Proc>,
}

impl Slot {
    fn new(name: &str, spawn: Box<dyn Fn() -> Proc + Send>) -> Slot {
        let current = spawn();
        Slot {
            name: name.to_string(),
            spawn,
            current,
            past: Vec::new(),
        }
    }

    fn kill_and_restart(&mut self) {
        self.current.kill();
        let fresh = (self.spawn)();
        self.past.push(std::mem::replace(&mut self.current, fresh));
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
}

#[tokio::test(flavor = "multi_thread")]
async fn chaos_loses_nothing_and_duplicates_nothing() {
    // Seven processes, kills every few seconds and a NATS restart: not beside another heavy test.
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
            "observer",
            Box::new(move || spawn_observer(&u, &repo, &[])),
        ));
    }
    for d in 0..2 {
        let u = url.clone();
        slots.push(Slot::new(
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
    wait_results(&url, 1, BOUND).await;

    // Pushes: bursts of commits on the three branches, each with the status it must get.
    let expected: Arc<Mutex<BTreeMap<String, &'static str>>> =
        Arc::new(Mutex::new(BTreeMap::new()));
    expected.lock().unwrap().insert(first.clone(), "passed");
    let pushing_done = Arc::new(Mutex::new(None::<Instant>));
    let pusher = {
        let expected = expected.clone();
        let done = pushing_done.clone();
        let mut rng = Rng(seed.rotate_left(17) | 1);
        let repo = repo.clone();
        std::thread::spawn(move || {
            let mut made = 0;
            while made < COMMITS {
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
                std::thread::sleep(Duration::from_millis(300 + rng.below(700)));
            }
            *done.lock().unwrap() = Some(Instant::now());
        })
    };

    // The monkey: a SIGKILL every 2-4 s while commits flow, the NATS server restarted once.
    let mut kills = 0;
    let mut recoveries: Vec<Duration> = Vec::new();
    let mut nats_restarted = false;
    let started = Instant::now();
    while !pusher.is_finished() || started.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(2000 + rng.below(2000))).await;
        if !nats_restarted && started.elapsed() > Duration::from_secs(10) {
            eprintln!("chaos: restarting nats-server");
            nats.kill();
            tokio::time::sleep(Duration::from_secs(1)).await;
            nats.restart();
            nats_restarted = true;
            continue;
        }
        let victim = rng.below(slots.len() as u64) as usize;
        let name = slots[victim].name.clone();
        let held = if name.starts_with('r') {
            running_on(&url, &name).await
        } else {
            Vec::new()
        };
        eprintln!("chaos: SIGKILL {name} (running {held:?})");
        let killed_at = Instant::now();
        slots[victim].kill_and_restart();
        kills += 1;
        for key in held {
            if let Some(d) = moved_after(&url, &key, &name, killed_at).await {
                recoveries.push(d);
            }
        }
    }
    pusher.join().unwrap();
    let pushed_at = pushing_done.lock().unwrap().expect("pusher finished");

    // Every commit, one result each, with its status.
    let expected = expected.lock().unwrap().clone();
    let all = wait_results(&url, expected.len(), BOUND).await;
    let drained = pushed_at.elapsed();
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

    // Executions: a job counts as run twice when two healthy executions of it ran to the end
    // (see the module's doc).
    let lives = lives.lock().unwrap().clone();
    let killed: HashSet<u32> = slots
        .iter()
        .filter(|s| s.name.starts_with('r'))
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
            .filter(|e| !killed.contains(&e.runner_life) || result_stored(e))
            .collect();
        if healthy.len() > 1 {
            twice.insert(sha, healthy);
        }
    }
    let extra: usize = twice.values().map(|runs| runs.len() - 1).sum();

    recoveries.sort();
    let median = recoveries.get(recoveries.len() / 2).copied();
    let worst = recoveries.last().copied();
    let figures = format!(
        "| figure | value |\n| --- | --- |\n\
         | commits tested | {} (200 pushed in bursts over 3 branches, plus the first) |\n\
         | processes SIGKILLed and restarted | {kills} |\n\
         | NATS server restarts | {} |\n\
         | commits lost | {} |\n\
         | commits with more than one final result | {duplicated} |\n\
         | wrong statuses | {} |\n\
         | healthy jobs run to the end twice | {extra} |\n\
         | time to drain after the last push | {:.1} s |\n\
         | runner SIGKILL → its job running elsewhere | median {}, worst {} (over {} kills of a busy runner) |\n\
         | seed | {seed} |\n",
        expected.len(),
        u8::from(nats_restarted),
        lost.len(),
        wrong.len(),
        drained.as_secs_f64(),
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
