//! `jetci-bench`: measures jetci against the floor (the same work done directly, with no CI
//! around it) and writes BENCHMARKS.md.
//!
//! ```sh
//! cargo build --profile dist --workspace && cargo run --profile dist -p jetci-bench -- --out BENCHMARKS.md
//! ```
//!
//! Everything is real: a nats-server on a free port with a temp store, the binaries found
//! beside this executable, git repositories made with the git CLI (fast-import for long
//! histories), results timestamped on arrival by a core-NATS subscription on `ci.results.>`.
//! `--quick` runs a tiny version of every benchmark (the smoke test `tests/e2e/bench_smoke.rs`).
//!
//! `sys.rs` is the world the benchmarks run in; `web.rs` is W (jetci-web with a full view),
//! `fair.rs` is F (the fair share: one repository's commit beside another's backlog), `dispatch.rs` is D (the dispatch rate) with the library's runner loop and an executor that runs nothing; the
//! other benchmarks are in this file.

mod dispatch;
mod fair;
mod pipelines;
mod sys;
mod web;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use nix::sys::signal::Signal;
use sys::{cpu_seconds, floor_once, vm_kib, Listener, Proc, Repo, Server};

const TRUE_TOML: &str = "command = \"true\"\n";

/// `--runner-sandbox`: the `--sandbox` every runner of a benchmark gets (unset: the runner's
/// default), to measure the job sandbox's cost (L and T with and without it).
static RUNNER_SANDBOX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
const WAIT: Duration = Duration::from_secs(60);

struct Opts {
    quick: bool,
    out: PathBuf,
    only: Option<Vec<String>>,
}

/// One line of the table.
struct Row {
    id: &'static str,
    what: String,
    n: String,
    median: String,
    p95: String,
    floor: String,
    ratio: String,
    goal: String,
    verdict: String,
}

impl Row {
    fn not_measured(id: &'static str, what: &str, goal: &str, why: &str) -> Row {
        Row {
            id,
            what: what.into(),
            n: "–".into(),
            median: "not measured".into(),
            p95: "–".into(),
            floor: "–".into(),
            ratio: "–".into(),
            goal: goal.into(),
            verdict: format!("not measured: {why}"),
        }
    }
}

struct Report {
    rows: Vec<Row>,
    notes: Vec<String>,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut opts = Opts {
        quick: false,
        out: PathBuf::from("BENCHMARKS.md"),
        only: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => opts.quick = true,
            "--out" => opts.out = PathBuf::from(it.next().expect("--out FILE")),
            "--runner-sandbox" => {
                let mode = it.next().expect("--runner-sandbox auto|bwrap|none").clone();
                let _ = RUNNER_SANDBOX.set(mode);
            }
            "--only" => {
                opts.only = Some(
                    it.next()
                        .expect("--only L,T,...")
                        .split(',')
                        .map(|s| s.to_uppercase())
                        .collect(),
                )
            }
            "-h" | "--help" => {
                println!(
                    "usage: jetci-bench [--quick] [--out BENCHMARKS.md] [--only L,T,R,M,W,I,D,B,S,P] \
                     [--runner-sandbox auto|bwrap|none]\n\
                     Runs nats-server and the jetci binaries found beside this executable; \
                     --runner-sandbox is the runners' --sandbox (default: theirs, auto)."
                );
                return;
            }
            other => {
                eprintln!("jetci-bench: unknown argument {other}");
                std::process::exit(2);
            }
        }
    }
    if let Err(e) = run(&opts, &args) {
        eprintln!("jetci-bench: error: {e:#}");
        std::process::exit(1);
    }
}

fn wanted(opts: &Opts, id: &str) -> bool {
    opts.only.as_ref().is_none_or(|o| o.iter().any(|x| x == id))
}

fn run(opts: &Opts, args: &[String]) -> Result<()> {
    for b in [
        "jetci",
        "jetci-observer",
        "jetci-dispatcher",
        "jetci-runner",
        "jetci-web",
    ] {
        if !sys::bin(b).is_file() {
            bail!(
                "{} not found beside jetci-bench; build the workspace first (cargo build --profile dist --workspace)",
                sys::bin(b).display()
            );
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut rep = Report {
        rows: Vec::new(),
        notes: Vec::new(),
    };
    let started = Instant::now();

    type Bench = fn(&tokio::runtime::Runtime, &Opts, &mut Report) -> Result<()>;
    let benches: [(&str, Bench); 11] = [
        ("L", bench_latency),
        ("T", bench_throughput),
        ("R", bench_recovery),
        ("M", bench_memory),
        ("W", web::bench_web),
        ("I", bench_idle),
        ("D", dispatch::bench_dispatch),
        ("B", bench_burst),
        ("S", bench_scaling),
        ("P", pipelines::bench_pipelines),
        ("F", fair::bench_fair),
    ];
    for (id, f) in benches {
        if !wanted(opts, id) {
            rep.rows
                .push(Row::not_measured(leak(id), id, "", "skipped by --only"));
            continue;
        }
        let t = Instant::now();
        eprintln!("jetci-bench: {id} ...");
        if let Err(e) = f(&rt, opts, &mut rep) {
            eprintln!("jetci-bench: {id} failed: {e:#}");
            rep.rows.push(Row::not_measured(
                leak(id),
                id,
                "",
                &format!("the run failed: {e:#}"),
            ));
        }
        eprintln!(
            "jetci-bench: {id} done in {:.1}s",
            t.elapsed().as_secs_f64()
        );
    }
    let md = render(opts, args, &rep, started.elapsed());
    std::fs::write(&opts.out, md)
        .with_context(|| format!("cannot write {}", opts.out.display()))?;
    eprintln!(
        "jetci-bench: wrote {} in {:.0}s",
        opts.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn leak(s: &str) -> &'static str {
    Box::leak(s.to_string().into_boxed_str())
}

// -------------------------------------------------------------------------------------------
// Statistics and formatting
// -------------------------------------------------------------------------------------------

fn median(xs: &[f64]) -> f64 {
    pct(xs, 50.0)
}

/// Nearest-rank percentile.
fn pct(xs: &[f64], p: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn fms(x: f64) -> String {
    if x >= 1000.0 {
        format!("{:.2} s", x / 1000.0)
    } else {
        format!("{x:.1} ms")
    }
}

fn verdict(ok: bool) -> String {
    if ok {
        "**met**".into()
    } else {
        "**missed**".into()
    }
}

// -------------------------------------------------------------------------------------------
// A running jetci installation
// -------------------------------------------------------------------------------------------

struct Stack {
    server: Server,
    url: String,
    dir: tempfile::TempDir,
    listener: Listener,
    observers: Vec<Proc>,
    dispatchers: Vec<Proc>,
    runners: Vec<Proc>,
    web: Option<Proc>,
    runner_seq: usize,
    runner_ids: Vec<String>,
}

impl Stack {
    fn new(rt: &tokio::runtime::Runtime) -> Result<Stack> {
        let server = Server::start(rt)?;
        let url = server.url();
        let listener = Listener::start(&url)?;
        Ok(Stack {
            server,
            url,
            dir: tempfile::Builder::new().prefix("jetci-bench-").tempdir()?,
            listener,
            observers: vec![],
            dispatchers: vec![],
            runners: vec![],
            web: None,
            runner_seq: 0,
            runner_ids: vec![],
        })
    }

    fn observer(&mut self, repo: &Repo, name: &str, poll: &str) -> Result<()> {
        let p = Proc::spawn(
            "jetci-observer",
            &[
                "-s",
                &self.url,
                "--poll-interval",
                poll,
                "--name",
                name,
                &repo.path_str(),
            ],
            self.dir.path(),
        )?;
        self.observers.push(p);
        Ok(())
    }

    fn dispatcher(&mut self) -> Result<()> {
        let p = Proc::spawn("jetci-dispatcher", &["-s", &self.url], self.dir.path())?;
        self.dispatchers.push(p);
        Ok(())
    }

    /// Starts a runner with a fresh id; returns the id.
    fn runner(&mut self) -> Result<String> {
        let id = format!("r{}", self.runner_seq);
        self.runner_seq += 1;
        let work = self.dir.path().join(format!("work-{id}"));
        let p = Proc::spawn(
            "jetci-runner",
            &[
                "-s",
                &self.url,
                "--id",
                &id,
                "--work-dir",
                work.to_str().unwrap(),
                "--default-command",
                "true",
                "--sandbox",
                RUNNER_SANDBOX.get().map_or("auto", String::as_str),
            ],
            self.dir.path(),
        )?;
        self.runners.push(p);
        self.runner_ids.push(id.clone());
        Ok(id)
    }

    fn web(&mut self) -> Result<()> {
        self.web_with(&[]).map(|_| ())
    }

    /// Starts (or restarts) jetci-web with `extra` flags; returns its base URL.
    fn web_with(&mut self, extra: &[&str]) -> Result<String> {
        if let Some(mut old) = self.web.take() {
            old.kill();
        }
        let listen = format!("127.0.0.1:{}", sys::free_port());
        let mut args = vec!["-s", &self.url, "--listen", &listen];
        args.extend_from_slice(extra);
        let p = Proc::spawn("jetci-web", &args, self.dir.path())?;
        self.web = Some(p);
        Ok(format!("http://{listen}"))
    }

    /// `jetci notify NAME`, as the post-receive hook runs it; returns when the observer answered.
    fn notify(&self, name: &str) -> Result<()> {
        let st = Command::new(sys::bin("jetci"))
            .args(["notify", "-s", &self.url, "--timeout", "120s", name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        if !st.success() {
            bail!("jetci notify {name} failed");
        }
        Ok(())
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for p in self
            .observers
            .iter()
            .chain(&self.dispatchers)
            .chain(&self.runners)
            .chain(&self.web)
        {
            let _ = writeln!(s, "--- {} ---\n{}", p.name, p.log_tail());
        }
        s
    }

    fn wait_sha(&self, sha: &str) -> Result<sys::Arrival> {
        self.listener
            .wait_sha(sha, WAIT)
            .map_err(|e| anyhow::anyhow!("{e}\n{}", self.logs()))
    }

    /// Stored messages of a stream.
    fn stream_messages(&self, rt: &tokio::runtime::Runtime, stream: &str) -> Result<u64> {
        let url = self.url.clone();
        let stream = stream.to_string();
        rt.block_on(async move {
            let js = async_nats::jetstream::new(async_nats::connect(&url).await?);
            let mut s = js.get_stream(&stream).await?;
            Ok(s.info().await?.state.messages)
        })
    }
}

// -------------------------------------------------------------------------------------------
// L: commit → result latency
// -------------------------------------------------------------------------------------------

/// One latency sample: commit, trigger, wait; returns (latency, commit creation time, sha).
fn latency_sample(
    st: &Stack,
    repo: &Repo,
    name: &str,
    notify: bool,
    i: usize,
) -> Result<(Duration, Duration, String)> {
    let t0 = Instant::now();
    let sha = repo.commit(&format!("sample {i}"))?;
    let made = t0.elapsed();
    if notify {
        st.notify(name)?;
    }
    let a = st.wait_sha(&sha)?;
    if a.status != "passed" {
        bail!("{sha}: status {} (expected passed)", a.status);
    }
    Ok((a.at - t0, made, sha))
}

fn bench_latency(rt: &tokio::runtime::Runtime, o: &Opts, rep: &mut Report) -> Result<()> {
    let n = if o.quick { 3 } else { 30 };
    let mut st = Stack::new(rt)?;
    let repo = Repo::new(&[(".jetci.toml", TRUE_TOML), ("README.md", "bench\n")])?;
    st.dispatcher()?;
    st.runner()?;
    st.observer(&repo, "lat", "10m")?;
    st.wait_sha(&repo.head()?)?;

    let mut floor = Vec::new();
    for (mode, notify) in [("notify", true), ("poll 100 ms", false)] {
        if !notify {
            // The same repository, now watched by an observer polling every 100 ms.
            st.observers.clear();
            st.observer(&repo, "lat", "100ms")?;
            std::thread::sleep(Duration::from_millis(500));
        }
        // One warm-up sample, not counted.
        latency_sample(&st, &repo, "lat", notify, 0)?;
        let (mut lat, mut over) = (Vec::new(), Vec::new());
        for i in 1..=n {
            let (l, made, sha) = latency_sample(&st, &repo, "lat", notify, i)?;
            let f = made + floor_once(repo.path(), &sha, "true")?;
            lat.push(ms(l));
            floor.push(ms(f));
            over.push(ms(l) - ms(f));
            std::thread::sleep(Duration::from_millis(50));
        }
        let (m, f) = (median(&lat), median(&floor));
        let goal = if notify {
            "overhead < 25 ms"
        } else {
            "(poll: ≤ interval + notify overhead)"
        };
        let ok = median(&over) < 25.0;
        rep.rows.push(Row {
            id: "L",
            what: format!("commit → result, `true`, triggered by {mode}"),
            n: n.to_string(),
            median: fms(m),
            p95: fms(pct(&lat, 95.0)),
            floor: fms(f),
            ratio: format!("{:.1}× (overhead {})", m / f, fms(median(&over))),
            goal: goal.into(),
            verdict: if notify { verdict(ok) } else { "–".into() },
        });
    }
    rep.notes.push(format!(
        "L: a sample is timed from just before `git commit` to the arrival of its result on a core-NATS \
         subscription to `ci.results.>`; the notify variant then runs `jetci notify` (a new process, as \
         the post-receive hook does) against an observer with `--poll-interval 10m`. One dispatcher, one \
         runner, `.jetci.toml` `command = \"true\"`. The floor of each sample is the same `git commit` time \
         plus a git2 checkout of that commit into a fresh directory and `sh -c true` there. Floor median \
         {}.", fms(median(&floor))
    ));
    Ok(())
}

// -------------------------------------------------------------------------------------------
// T: throughput on a backlog
// -------------------------------------------------------------------------------------------

fn bench_throughput(rt: &tokio::runtime::Runtime, o: &Opts, rep: &mut Report) -> Result<()> {
    let n = if o.quick { 20 } else { 500 };
    for k in [1usize, 2, 4] {
        let mut st = Stack::new(rt)?;
        let repo = Repo::new(&[(".jetci.toml", TRUE_TOML), ("README.md", "bench\n")])?;
        let name = format!("tp{k}");
        st.dispatcher()?;
        for _ in 0..k {
            st.runner()?;
        }
        st.observer(&repo, &name, "10m")?;
        st.wait_sha(&repo.head()?)?;
        let shas = repo.fast_commits("main", n)?;
        let t0 = Instant::now();
        st.notify(&name)?;
        let last = st
            .listener
            .wait_count(&name, n + 1, Duration::from_secs(600))
            .map_err(|e| anyhow::anyhow!("{e}\n{}", st.logs()))?;
        let secs = (last.at - t0).as_secs_f64();
        let rate = n as f64 / secs;
        let arr = st.listener.all();
        let passed = arr
            .iter()
            .filter(|a| a.repo == name && a.status == "passed")
            .count();
        drop(st);

        // Floor: k threads, each checking out its share of the same commits and running `true`.
        let t1 = Instant::now();
        std::thread::scope(|s| -> Result<()> {
            let handles: Vec<_> = (0..k)
                .map(|j| {
                    let (shas, path) = (&shas, repo.path());
                    s.spawn(move || -> Result<()> {
                        for sha in shas.iter().skip(j).step_by(k) {
                            floor_once(path, sha, "true")?;
                        }
                        Ok(())
                    })
                })
                .collect();
            for h in handles {
                h.join().expect("floor thread")?;
            }
            Ok(())
        })?;
        let frate = n as f64 / t1.elapsed().as_secs_f64();
        let ratio = rate / frate;
        rep.rows.push(Row {
            id: "T",
            what: format!("backlog of {n} commits, `true`, {k} runner(s)"),
            n: format!("{n} jobs"),
            median: format!("{rate:.1} jobs/s"),
            p95: format!("({secs:.2} s total)"),
            floor: format!("{frate:.1} jobs/s ({k} thread(s))"),
            ratio: format!("{:.0} %", ratio * 100.0),
            goal: "≥ 80 % of floor".into(),
            verdict: verdict(ratio >= 0.8 && passed == n + 1),
        });
    }
    rep.notes.push(
        "T: with the observer (`--poll-interval 10m`) already watching the repository, N empty commits are \
         added with `git fast-import`, then `jetci notify`; the clock runs from the notify to the N-th \
         result. Runners have `--jobs 1`. The floor runs the same N checkouts + `sh -c true` on k threads \
         in this process."
            .into(),
    );
    Ok(())
}

// -------------------------------------------------------------------------------------------
// R: recovery after SIGKILL / SIGSTOP of the runner holding a job
// -------------------------------------------------------------------------------------------

/// Watches the `ci-jobs` key until `done(state)`; returns that state.
fn watch_job(
    rt: &tokio::runtime::Runtime,
    url: &str,
    key: &str,
    timeout: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    rt.block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(url).await?);
        let kv = js.get_key_value("ci-jobs").await?;
        let mut w = kv.watch_with_history(key).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next = tokio::time::timeout_at(deadline, w.next()).await;
            match next {
                Ok(Some(Ok(e))) => {
                    let v: serde_json::Value = serde_json::from_slice(&e.value).unwrap_or_default();
                    if done(&v) {
                        return Ok(v);
                    }
                }
                Ok(Some(Err(e))) => bail!("watch {key}: {e}"),
                Ok(None) => bail!("watch {key} ended"),
                Err(_) => bail!("{key}: condition not reached within {timeout:?}"),
            }
        }
    })
}

/// Waits until runner `id` is in `ci-runners`.
fn wait_runner(rt: &tokio::runtime::Runtime, url: &str, id: &str) -> Result<()> {
    rt.block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(url).await?);
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(kv) = js.get_key_value("ci-runners").await {
                if let Ok(Some(_)) = kv.get(id).await {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("runner {id} did not register");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

fn bench_recovery(rt: &tokio::runtime::Runtime, o: &Opts, rep: &mut Report) -> Result<()> {
    let n = if o.quick { 1 } else { 10 };
    let mut st = Stack::new(rt)?;
    let flags = st.dir.path().join("flags");
    std::fs::create_dir_all(&flags)?;
    // The job runs until the harness drops a flag file named after the commit.
    let toml = format!(
        "command = 'while [ ! -e {}/\"$JETCI_COMMIT\" ]; do sleep 0.02; done'\n",
        flags.display()
    );
    let repo = Repo::new(&[(".jetci.toml", &toml)])?;
    std::fs::write(flags.join(repo.head()?), "")?;
    st.dispatcher()?;
    let a = st.runner()?;
    let b = st.runner()?;
    wait_runner(rt, &st.url, &a)?;
    wait_runner(rt, &st.url, &b)?;
    st.observer(&repo, "rec", "10m")?;
    st.wait_sha(&repo.head()?)?;
    // A dispatcher ignores "no responders" probes for one lease after it (re)connects (its
    // runners may be reconnecting too), so trials start after that window.
    std::thread::sleep(Duration::from_millis(3500));

    for (label, sig, goal_ms) in [
        ("SIGKILL", Signal::SIGKILL, 1200.0),
        ("SIGSTOP", Signal::SIGSTOP, 3500.0),
    ] {
        let mut xs = Vec::new();
        for i in 0..n {
            let sha = repo.commit(&format!("{label} {i}"))?;
            st.notify("rec")?;
            let key = format!("rec.{sha}.1");
            let s = watch_job(rt, &st.url, &key, WAIT, |v| v["phase"] == "running")?;
            let victim = s["runner"].as_str().unwrap_or("").to_string();
            let idx = st
                .runner_ids
                .iter()
                .position(|r| *r == victim)
                .with_context(|| format!("job {key} runs on unknown runner {victim:?}"))?;
            let t0 = Instant::now();
            st.runners[idx].signal(sig);
            let v2 = watch_job(rt, &st.url, &key, WAIT, |v| {
                v["phase"] == "running" && v["runner"].as_str().is_some_and(|r| r != victim)
            })?;
            let dt = t0.elapsed();
            xs.push(ms(dt));
            let _ = v2;
            std::fs::write(flags.join(&sha), "")?;
            st.wait_sha(&sha)?;
            // Replace the victim with a fresh runner, so two are idle again.
            let mut dead = st.runners.remove(idx);
            dead.kill();
            st.runner_ids.remove(idx);
            let id = st.runner()?;
            wait_runner(rt, &st.url, &id)?;
            std::thread::sleep(Duration::from_millis(300));
        }
        let m = median(&xs);
        rep.rows.push(Row {
            id: "R",
            what: format!("runner {label} → job running on another runner"),
            n: n.to_string(),
            median: fms(m),
            p95: fms(pct(&xs, 95.0)),
            floor: "–".into(),
            ratio: "–".into(),
            goal: format!("≤ {}", fms(goal_ms)),
            verdict: verdict(m <= goal_ms),
        });
    }
    rep.notes.push(
        "R: two runners, a job whose command waits for a flag file; when `ci-jobs` shows it `running`, \
         the harness signals that runner's process and watches the key (KV watch) until the job is \
         `running` on another runner. Then the flag ends the job, the victim is killed and replaced by a \
         fresh runner (new id), and the next trial starts. Defaults: lease 3 s, heartbeat 1 s."
            .into(),
    );
    Ok(())
}

// -------------------------------------------------------------------------------------------
// M and I: memory and idle cost
// -------------------------------------------------------------------------------------------

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn bench_memory(rt: &tokio::runtime::Runtime, o: &Opts, rep: &mut Report) -> Result<()> {
    // Idle: a whole installation after one result.
    {
        let mut st = Stack::new(rt)?;
        let repo = Repo::new(&[(".jetci.toml", TRUE_TOML)])?;
        st.dispatcher()?;
        st.runner()?;
        st.web()?;
        st.observer(&repo, "mem", "1s")?;
        st.wait_sha(&repo.head()?)?;
        std::thread::sleep(Duration::from_secs(if o.quick { 1 } else { 3 }));
        let mut line = String::from("M idle RSS (VmRSS after one result):");
        let procs: Vec<(&str, u32)> = vec![
            ("nats-server", st.server.proc.pid()),
            ("jetci-observer", st.observers[0].pid()),
            ("jetci-dispatcher", st.dispatchers[0].pid()),
            ("jetci-runner", st.runners[0].pid()),
            ("jetci-web", st.web.as_ref().unwrap().pid()),
        ];
        for (name, pid) in &procs {
            let kib = vm_kib(*pid, "VmRSS");
            let _ = write!(line, " {name} {};", mib(kib));
            let (goal, ok) = match *name {
                "jetci-runner" => ("< 16 MiB", Some(kib < 16 * 1024)),
                _ => ("–", None),
            };
            rep.rows.push(Row {
                id: "M",
                what: format!("{name} RSS, idle"),
                n: "1".into(),
                median: mib(kib),
                p95: "–".into(),
                floor: "–".into(),
                ratio: "–".into(),
                goal: goal.into(),
                verdict: ok.map(verdict).unwrap_or_else(|| "–".into()),
            });
        }
        rep.notes.push(line);
    }
    // 10,000 commits waiting, no runner.
    let n = if o.quick { 200 } else { 10_000 };
    let mut st = Stack::new(rt)?;
    let repo = Repo::new(&[(".jetci.toml", TRUE_TOML)])?;
    st.dispatcher()?;
    st.web()?;
    st.observer(&repo, "wait", "10m")?;
    let deadline = Instant::now() + WAIT;
    while st.stream_messages(rt, "CI_COMMITS").unwrap_or(0) < 1 {
        if Instant::now() > deadline {
            bail!("the head was never published\n{}", st.logs());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    repo.fast_commits("main", n)?;
    let t0 = Instant::now();
    st.notify("wait")?;
    let deadline = Instant::now() + Duration::from_secs(300);
    while st.stream_messages(rt, "CI_COMMITS")? < (n + 1) as u64 {
        if Instant::now() > deadline {
            bail!("not all {n} commits were published\n{}", st.logs());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let publish = t0.elapsed();
    std::thread::sleep(Duration::from_secs(if o.quick { 1 } else { 5 }));
    for (name, pid, goal) in [
        ("jetci-dispatcher", st.dispatchers[0].pid(), Some(64 * 1024)),
        ("jetci-web", st.web.as_ref().unwrap().pid(), None),
        ("jetci-observer", st.observers[0].pid(), None),
    ] {
        let kib = vm_kib(pid, "VmRSS");
        let hwm = vm_kib(pid, "VmHWM");
        rep.rows.push(Row {
            id: "M",
            what: format!("{name} RSS, {n} commits waiting (no runner)"),
            n: "1".into(),
            median: mib(kib),
            p95: format!("peak {}", mib(hwm)),
            floor: "–".into(),
            ratio: "–".into(),
            goal: goal
                .map(|g| format!("< {}", mib(g)))
                .unwrap_or_else(|| "–".into()),
            verdict: goal.map(|g| verdict(hwm < g)).unwrap_or_else(|| "–".into()),
        });
    }
    rep.notes.push(format!(
        "M: with {n} commits waiting, the observer published them in {:.2} s ({:.0} commits/s, one notify).",
        publish.as_secs_f64(),
        n as f64 / publish.as_secs_f64()
    ));
    Ok(())
}

fn bench_idle(rt: &tokio::runtime::Runtime, o: &Opts, rep: &mut Report) -> Result<()> {
    let window = Duration::from_secs(if o.quick { 3 } else { 60 });
    let mut st = Stack::new(rt)?;
    let repo = Repo::new(&[(".jetci.toml", TRUE_TOML)])?;
    st.dispatcher()?;
    st.runner()?;
    st.web()?;
    st.observer(&repo, "idle", "1s")?;
    st.wait_sha(&repo.head()?)?;
    std::thread::sleep(Duration::from_secs(2));
    let procs: Vec<(&str, u32)> = vec![
        ("nats-server", st.server.proc.pid()),
        ("jetci-observer (poll 1 s)", st.observers[0].pid()),
        ("jetci-dispatcher", st.dispatchers[0].pid()),
        ("jetci-runner", st.runners[0].pid()),
        ("jetci-web", st.web.as_ref().unwrap().pid()),
    ];
    let before: Vec<f64> = procs.iter().map(|(_, p)| cpu_seconds(*p)).collect();
    let t0 = Instant::now();
    std::thread::sleep(window);
    let secs = t0.elapsed().as_secs_f64();
    for ((name, pid), b) in procs.iter().zip(before) {
        let used = cpu_seconds(*pid) - b;
        let per_min = used * 60.0 / secs;
        let pct_core = used / secs * 100.0;
        let jetci = name.starts_with("jetci");
        rep.rows.push(Row {
            id: "I",
            what: format!("{name}, idle CPU"),
            n: format!("{secs:.0} s"),
            median: format!("{per_min:.3} s/min"),
            p95: format!("{pct_core:.2} % of a core"),
            floor: "0".into(),
            ratio: "–".into(),
            goal: if jetci {
                "< 0.5 % of a core".into()
            } else {
                "–".into()
            },
            verdict: if jetci {
                verdict(pct_core < 0.5)
            } else {
                "–".into()
            },
        });
    }
    rep.notes.push(format!(
        "I: utime+stime from /proc/PID/stat over {secs:.0} s with nothing to do, after one result; \
         resolution 10 ms (one clock tick), so short windows (--quick) read mostly 0."
    ));
    Ok(())
}

fn bytes_of(n: usize) -> bytes::Bytes {
    vec![b'x'; n].into()
}

// -------------------------------------------------------------------------------------------
// B: burst
// -------------------------------------------------------------------------------------------

fn bench_burst(rt: &tokio::runtime::Runtime, o: &Opts, rep: &mut Report) -> Result<()> {
    let reps = if o.quick { 1 } else { 5 };
    let mut st = Stack::new(rt)?;
    let repo = Repo::new(&[(".jetci.toml", TRUE_TOML)])?;
    st.dispatcher()?;
    st.runner()?;
    st.runner()?;
    st.observer(&repo, "burst", "10m")?;
    st.wait_sha(&repo.head()?)?;
    let (mut xs, mut floors, mut all_ok) = (Vec::new(), Vec::new(), true);
    for r in 0..reps {
        let t0 = Instant::now();
        let mut shas = Vec::new();
        for i in 0..5 {
            let due = t0 + Duration::from_millis(200 * i as u64);
            if let Some(w) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(w);
            }
            shas.push(repo.commit(&format!("burst {r}.{i}"))?);
            st.notify("burst")?;
        }
        let made = t0.elapsed();
        let mut last = t0;
        for sha in &shas {
            let a = st.wait_sha(sha)?;
            all_ok &= a.status == "passed";
            last = last.max(a.at);
        }
        xs.push(ms(last - t0));
        let _ = made;
        floors.push(200.0 * 4.0 + ms(floor_once(repo.path(), shas.last().unwrap(), "true")?));
        std::thread::sleep(Duration::from_millis(300));
    }
    let arr = st.listener.all();
    let burst_results = arr.iter().filter(|a| a.repo == "burst").count();
    all_ok &= burst_results == 1 + 5 * reps;
    let (m, f) = (median(&xs), median(&floors));
    rep.rows.push(Row {
        id: "B",
        what: "5 commits within 1 s (200 ms apart, notify each) → last result, 2 runners".into(),
        n: reps.to_string(),
        median: fms(m),
        p95: fms(pct(&xs, 95.0)),
        floor: fms(f),
        ratio: format!("{:.2}×", m / f),
        goal: "all 5 tested".into(),
        verdict: verdict(all_ok),
    });
    rep.notes.push(
        "B: the floor of a burst is the 800 ms spread of the commits plus one checkout + `true` of the last \
         commit."
            .into(),
    );
    Ok(())
}

// -------------------------------------------------------------------------------------------
// S: scaling with history and branches
// -------------------------------------------------------------------------------------------

fn bench_scaling(rt: &tokio::runtime::Runtime, o: &Opts, rep: &mut Report) -> Result<()> {
    let configs: Vec<(usize, usize)> = if o.quick {
        vec![(100, 1), (100, 10)]
    } else {
        vec![(1_000, 1), (50_000, 1), (1_000, 500)]
    };
    let samples = if o.quick { 2 } else { 10 };
    let window = Duration::from_secs(if o.quick { 2 } else { 10 });
    for (history, branches) in configs {
        let mut st = Stack::new(rt)?;
        let repo = Repo::new(&[(".jetci.toml", TRUE_TOML)])?;
        repo.fast_commits("main", history.saturating_sub(1))?;
        repo.git(&["reset", "-q", "--hard", "main"])?;
        let head = repo.head()?;
        for b in 1..branches {
            repo.git(&["branch", &format!("b/{b}"), &head])?;
        }
        st.dispatcher()?;
        st.runner()?;
        st.observer(&repo, "sc", "10m")?;
        st.wait_sha(&head)?;
        let mut lat = Vec::new();
        for i in 0..samples {
            let (l, _, _) = latency_sample(&st, &repo, "sc", true, i)?;
            lat.push(ms(l));
            std::thread::sleep(Duration::from_millis(50));
        }
        // Poll cost: a second observer of the same repository polling every 100 ms, nothing new.
        st.observer(&repo, "scpoll", "100ms")?;
        std::thread::sleep(Duration::from_secs(2));
        let pid = st.observers[1].pid();
        let c0 = cpu_seconds(pid);
        let t0 = Instant::now();
        std::thread::sleep(window);
        let polls = t0.elapsed().as_secs_f64() / 0.1;
        let per_poll = (cpu_seconds(pid) - c0) * 1000.0 / polls;
        rep.rows.push(Row {
            id: "S",
            what: format!(
                "{history} commits, {branches} branch(es): notify latency / CPU per idle poll"
            ),
            n: samples.to_string(),
            median: fms(median(&lat)),
            p95: fms(pct(&lat, 95.0)),
            floor: "–".into(),
            ratio: format!("{per_poll:.2} ms CPU/poll"),
            goal: "poll cost flat in history".into(),
            verdict: "see rows".into(),
        });
    }
    throughput_vs_history(rt, o, rep)?;
    rep.notes.push(
        "S: history made with `git fast-import`, branches all pointing at the head of main (so the \
         observer's first sight publishes one commit). Poll cost is the CPU time of an extra observer \
         with `--poll-interval 100ms` over a window with nothing new, divided by the number of polls."
            .into(),
    );
    Ok(())
}

/// One backlog of `n` commits on top of `history` commits, 1 runner: jobs per second from the
/// notify to the n-th result, and the CPU milliseconds per job of the runner, the observer, the
/// dispatcher and nats-server over that time.
fn backlog_rate(rt: &tokio::runtime::Runtime, history: usize, n: usize) -> Result<(f64, [f64; 4])> {
    let mut st = Stack::new(rt)?;
    let repo = Repo::new(&[(".jetci.toml", TRUE_TOML), ("README.md", "bench\n")])?;
    repo.fast_commits("main", history.saturating_sub(1))?;
    repo.git(&["reset", "-q", "--hard", "main"])?;
    let name = format!("th{history}");
    st.dispatcher()?;
    st.runner()?;
    st.observer(&repo, &name, "10m")?;
    // The head's job makes the runner's mirror (a clone of the whole history) before the clock.
    st.wait_sha(&repo.head()?)?;
    repo.fast_commits("main", n)?;
    let pids = [
        st.runners[0].pid(),
        st.observers[0].pid(),
        st.dispatchers[0].pid(),
        st.server.proc.pid(),
    ];
    let cpu0 = pids.map(cpu_seconds);
    let t0 = Instant::now();
    st.notify(&name)?;
    let last = st
        .listener
        .wait_count(&name, n + 1, Duration::from_secs(600))
        .map_err(|e| anyhow::anyhow!("{e}\n{}", st.logs()))?;
    let cpu1 = pids.map(cpu_seconds);
    let passed = st
        .listener
        .all()
        .iter()
        .filter(|a| a.repo == name && a.status == "passed")
        .count();
    if passed != n + 1 {
        bail!("{} of {} results passed\n{}", passed, n + 1, st.logs());
    }
    let per_job = [0, 1, 2, 3].map(|i| (cpu1[i] - cpu0[i]) * 1000.0 / n as f64);
    Ok((n as f64 / (last.at - t0).as_secs_f64(), per_job))
}

/// Issue 7 S, "T as history grows": the T backlog on a small and on a long history, alternated
/// so that both see the same background load.
fn throughput_vs_history(rt: &tokio::runtime::Runtime, o: &Opts, rep: &mut Report) -> Result<()> {
    let (n, histories, reps): (usize, [usize; 2], usize) = if o.quick {
        (10, [100, 2_000], 1)
    } else {
        (200, [1_000, 50_000], 3)
    };
    let mut rates = [Vec::new(), Vec::new()];
    let mut cpu = [[0.0f64; 4]; 2];
    for _ in 0..reps {
        for (i, &h) in histories.iter().enumerate() {
            let (rate, per_job) = backlog_rate(rt, h, n)?;
            rates[i].push(rate);
            for (sum, x) in cpu[i].iter_mut().zip(per_job) {
                *sum += x / reps as f64;
            }
        }
    }
    let small = median(&rates[0]);
    for (i, &h) in histories.iter().enumerate() {
        let rate = median(&rates[i]);
        let all: Vec<String> = rates[i].iter().map(|r| format!("{r:.1}")).collect();
        let ratio = rate / small;
        rep.rows.push(Row {
            id: "S",
            what: format!("T as history grows: backlog of {n} commits, `true`, 1 runner, {h} commits of history"),
            n: format!("{reps} × {n} jobs"),
            median: format!("{rate:.1} jobs/s"),
            p95: format!("(runs: {} jobs/s)", all.join(", ")),
            floor: format!(
                "CPU/job: runner {:.1}, observer {:.1}, dispatcher {:.1}, nats-server {:.1} ms",
                cpu[i][0], cpu[i][1], cpu[i][2], cpu[i][3]
            ),
            ratio: format!("{:.2}× the {}-commit repository", ratio, histories[0]),
            goal: "T flat in history (≥ 0.8×)".into(),
            verdict: if i == 0 {
                "–".into()
            } else {
                verdict(ratio >= 0.8)
            },
        });
    }
    rep.notes.push(format!(
        "S, T as history grows: as T with 1 runner (observer `--poll-interval 10m`, the backlog \
         added with `git fast-import`, clock from `jetci notify` to the N-th result), on a repository \
         that already has {} or {} commits of history (the runner's mirror is cloned by the head's \
         job, before the clock). The two sizes are run alternately, {reps} time(s) each; the median \
         rate is shown, and in the floor column the mean CPU time per job of each process over the \
         backlog (/proc/PID/stat, 10 ms ticks).",
        histories[0], histories[1]
    ));
    Ok(())
}

// -------------------------------------------------------------------------------------------
// BENCHMARKS.md
// -------------------------------------------------------------------------------------------

fn render(o: &Opts, args: &[String], rep: &Report, took: Duration) -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let nats = Command::new("nats-server")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let date = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let mut s = String::new();
    let _ = writeln!(s, "# jetci benchmarks against the floor\n");
    let _ = writeln!(
        s,
        "Written by `jetci-bench` (bins/bench). Regenerate with:\n\n```sh\ncargo build --profile dist --workspace && \
         cargo run --profile dist -p jetci-bench -- --out BENCHMARKS.md\n```\n\n\
         `dist` is the profile deploy/Dockerfile builds (release with fat LTO, one codegen unit, \
         opt-level \"s\"; Cargo.toml).\n"
    );
    let _ = writeln!(
        s,
        "- command: `jetci-bench {}`{}",
        args.join(" "),
        if o.quick {
            " (**quick: tiny samples, not figures to quote**)"
        } else {
            ""
        }
    );
    let _ = writeln!(s, "- date: {date}");
    let _ = writeln!(s, "- machine: {cores} cores ({cpu}), {nats}");
    let _ = writeln!(s, "- binaries: {}", sys::bin_dir().display());
    let _ = writeln!(s, "- run time: {:.0} s\n", took.as_secs_f64());
    let _ = writeln!(s, "Every figure comes from a real nats-server (file store, temp dir, free port), the real \
        jetci binaries as processes and real git repositories. Ratio is jetci's median over the floor's \
        (for T: jetci's rate over the floor's rate). \"not measured\" says why.\n");
    let _ = writeln!(
        s,
        "| | what | n | median | p95 | floor | ratio | goal | verdict |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    for r in &rep.rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.id, r.what, r.n, r.median, r.p95, r.floor, r.ratio, r.goal, r.verdict
        );
    }
    let _ = writeln!(s, "\n## How each figure is taken\n");
    for n in &rep.notes {
        let _ = writeln!(s, "- {n}");
    }
    s
}
