//! W: jetci-web with a full view (issue 5).
//!
//! A corpus of realistic final results (several repositories and branches, mostly passed, some
//! failed with 4 KiB output tails and test counts, some errors, timeouts, reruns and superseded
//! attempts), each with its log in `CI_LOGS` and its final state in `ci-jobs`, is published
//! straight into the streams, as runners would have left it. jetci-web takes it in live, is
//! restarted so it rebuilds its view from the streams, and then every page and API endpoint is
//! timed with a keep-alive HTTP client. A second corpus of the same size then shows whether
//! memory stays flat once the view is full (it is capped by `--max-results`).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use jetci::connect::Nats;
use jetci::messages::{
    self, encode, JobPhase, JobState, ResultMsg, RunnerInfo, Status, TestCounts, VERSION,
};
use jetci::protocol::verdict::{publish_final, publish_superseded, Published};
use jetci::shutdown::CancellationToken;
use jetci::streams::Streams;
use jetci::subjects::{run_key, JobRef};
use time::OffsetDateTime;

use crate::sys::vm_kib;
use crate::{fms, median, mib, pct, verdict, Opts, Report, Row, Stack};

/// jetci-web's `--max-results` default: the view's bound.
const DEFAULT_MAX_RESULTS: usize = 10_000;
/// The runner's `TAIL_BYTES` (bins/runner/src/exec.rs): a result's output tail is at most this.
const TAIL_BYTES: usize = 4096;
/// Publishes in flight while loading the corpus.
const IN_FLIGHT: usize = 256;
/// Runners registered while the pages are timed (the runners page lists them).
const RUNNERS: usize = 8;
/// Unfinished jobs in `ci-jobs` besides one running job per runner (the queue).
const QUEUED: usize = 20;
/// The latency goal of every page and endpoint.
const GOAL_MS: f64 = 100.0;

const REPOS: &[(&str, u64)] = &[("app", 50), ("lib", 25), ("infra", 15), ("docs", 10)];
const BRANCHES: &[(&str, u64)] = &[
    ("main", 55),
    ("develop", 15),
    ("feature/login", 5),
    ("feature/parser-v2", 5),
    ("fix/issue-1234", 4),
    ("release/2.4", 4),
    ("dependabot/pip/requests-2.32.3", 4),
    ("user/ana/experiment", 4),
    ("feature/ünïcode", 2),
    ("hotfix/crash.on.start", 2),
];
const STATUSES: &[(Status, u64)] = &[
    (Status::Passed, 850),
    (Status::Failed, 100),
    (Status::Error, 20),
    (Status::TimedOut, 20),
    (Status::Cancelled, 10),
];
const AUTHORS: &[&str] = &[
    "Ana Lima <ana@example.com>",
    "Bo Chen <bo@example.com>",
    "Chidi Okafor <chidi@example.com>",
    "Dana Weiß <dana@example.com>",
    "dependabot[bot] <support@github.com>",
];
const SUMMARIES: &[&str] = &[
    "Fix off-by-one in the pager",
    "Parser: accept trailing commas",
    "Bump requests from 2.32.2 to 2.32.3",
    "Refactor the login flow; split session handling out of views.py",
    "Add retry with backoff to the upload client",
    "WIP",
    "Docs: explain the config file",
    "Speed up the importer by batching inserts",
];

/// A deterministic generator (xorshift64*), so every run publishes the same corpus.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }

    fn weighted<'a, T>(&mut self, items: &'a [(T, u64)]) -> &'a T {
        let total: u64 = items.iter().map(|(_, w)| w).sum();
        let mut x = self.below(total);
        for (item, w) in items {
            if x < *w {
                return item;
            }
            x -= w;
        }
        &items[items.len() - 1].0
    }

    fn sha(&mut self) -> String {
        format!(
            "{:016x}{:016x}{:08x}",
            self.next(),
            self.next(),
            self.next() as u32
        )
    }
}

/// One message of the corpus: a result (final or superseded) and its job's log.
struct Item {
    result: ResultMsg,
    superseded: bool,
    log: String,
}

/// `n` messages for `CI_RESULTS`, commit sequences starting after `first_commit_seq`.
fn corpus(n: usize, seed: u64, first_commit_seq: u64) -> Vec<Item> {
    let mut rng = Rng(seed | 1);
    let mut items: Vec<Item> = Vec::with_capacity(n);
    // The highest run of each commit so far, so a rerun takes the next number.
    let mut runs: std::collections::HashMap<String, u32> = Default::default();
    let mut commit_seq = first_commit_seq;
    // Results are spread over the last 30 days, oldest first.
    let end = OffsetDateTime::now_utc();
    let step = time::Duration::seconds((30 * 24 * 3600 / n.max(1)) as i64);
    while items.len() < n {
        let i = items.len();
        commit_seq += 1;
        let finished = end - step * (n - i) as i32;
        // A rerun of an earlier commit (a new run of the same sha), now and then.
        if i > 10 && rng.chance(20) {
            let j = rng.below(i as u64) as usize;
            if !items[j].superseded {
                let mut r = items[j].result.clone();
                let run = runs.entry(r.sha.clone()).or_insert(r.run);
                *run += 1;
                r.run = *run;
                r.attempt = 1;
                let status = *rng.weighted(STATUSES);
                let item = make(&mut rng, r, status, commit_seq, finished);
                items.push(item);
                continue;
            }
        }
        let repo = *rng.weighted(REPOS);
        let branch = *rng.weighted(BRANCHES);
        let base = ResultMsg {
            v: VERSION,
            repo: repo.into(),
            url: format!("https://git.example.com/acme/{repo}.git"),
            branch: branch.into(),
            sha: rng.sha(),
            run: 1,
            job_id: String::new(),
            attempt: 1,
            runner: String::new(),
            status: Status::Passed,
            exit_code: None,
            signal: None,
            reason: None,
            started_at: finished,
            finished_at: finished,
            duration_ms: 0,
            output_tail: String::new(),
            log_subject: String::new(),
            log_bytes: 0,
            commit_seq,
            author: AUTHORS[rng.below(AUTHORS.len() as u64) as usize].into(),
            summary: format!(
                "{} (#{})",
                SUMMARIES[rng.below(SUMMARIES.len() as u64) as usize],
                1000 + i
            ),
            tests: None,
            job: None,
            job_name: None,
            jobs: vec![],
            fail_fast: false,
        };
        // A runner lost its lease now and then: its fenced result, then attempt 2's verdict.
        if rng.chance(5) && items.len() + 2 <= n {
            let mut lost = make(&mut rng, base.clone(), Status::Passed, commit_seq, finished);
            lost.superseded = true;
            items.push(lost);
            let mut second = base;
            second.attempt = 2;
            let status = *rng.weighted(STATUSES);
            let item = make(&mut rng, second, status, commit_seq, finished);
            items.push(item);
            continue;
        }
        let status = *rng.weighted(STATUSES);
        let item = make(&mut rng, base, status, commit_seq, finished);
        items.push(item);
    }
    items
}

/// Fills in a result's verdict, output tail, test counts and log.
fn make(
    rng: &mut Rng,
    mut r: ResultMsg,
    status: Status,
    commit_seq: u64,
    finished: OffsetDateTime,
) -> Item {
    let runner = format!("build-{}", rng.below(RUNNERS as u64));
    r.status = status;
    r.runner = runner.clone();
    r.commit_seq = commit_seq;
    r.job_id = format!("{}.{}", run_key(&r.repo, &r.sha, r.run), r.attempt);
    r.log_subject = format!("ci.logs.{}", r.job_id);
    r.duration_ms = 2_000 + rng.below(300_000);
    r.finished_at = finished;
    r.started_at = finished - time::Duration::milliseconds(r.duration_ms as i64);
    let tests = 40 + rng.below(400);
    let skipped = rng.below(5);
    let mut output = String::new();
    let mut failures = Vec::new();
    let (mut exit_code, mut signal, mut reason) = (Some(0), None, None);
    if status != Status::Error {
        for t in 0..10 + rng.below(60) {
            output.push_str(&format!(
                "test_case_{t} (tests.test_{}.{}Tests.test_case_{t}) ... ok\n",
                r.repo,
                ["Parser", "Session", "Upload", "Cache"][t as usize % 4]
            ));
        }
    }
    match status {
        Status::Passed | Status::TimedOut | Status::Cancelled | Status::Skipped => {
            if status == Status::Passed {
                output.push_str(&format!(
                    "\n----------------------------------------------------------------------\n\
                     Ran {tests} tests in {}.{:03}s\n\nOK (skipped={skipped})\n",
                    r.duration_ms / 1000,
                    r.duration_ms % 1000
                ));
            } else if status == Status::TimedOut {
                exit_code = None;
                signal = Some(15);
                reason = Some("the command ran past its timeout of 10m".to_string());
            } else {
                exit_code = None;
                signal = Some(15);
                reason = Some("the job was cancelled".to_string());
            }
        }
        Status::Failed => {
            exit_code = Some(1);
            let nfail = 1 + rng.below(5);
            while (failures.len() as u64) < nfail {
                let t = failures.len() as u64;
                let name = format!(
                    "test_edge_{t} (tests.test_{}.EdgeTests.test_edge_{t})",
                    r.repo
                );
                output.push_str(&format!(
                    "======================================================================\n\
                     FAIL: {name}\n\
                     ----------------------------------------------------------------------\n\
                     Traceback (most recent call last):\n  \
                     File \"/work/src/tests/test_{repo}.py\", line {line}, in test_edge_{t}\n    \
                     self.assertEqual(parse(\"a,b,\"), [\"a\", \"b\"])\n\
                     AssertionError: Lists differ: ['a', 'b', ''] != ['a', 'b']\n\n",
                    repo = r.repo,
                    line = 40 + t * 7
                ));
                failures.push(name);
            }
            output.push_str(&format!(
                "----------------------------------------------------------------------\n\
                 Ran {tests} tests in 3.141s\n\nFAILED (failures={nfail})\n"
            ));
        }
        Status::Error => {
            exit_code = None;
            reason = Some(format!(
                "checkout failed on runner {runner}: object not found - no match for id ({})",
                r.sha
            ));
        }
    }
    let tail_start = output.len().saturating_sub(TAIL_BYTES);
    let tail_start = (tail_start..output.len())
        .find(|&i| output.is_char_boundary(i))
        .unwrap_or(output.len());
    r.output_tail = output[tail_start..].to_string();
    r.exit_code = exit_code;
    r.signal = signal;
    r.reason = reason;
    // Repositories without a recognised test summary report no counts.
    if r.repo != "docs" && matches!(status, Status::Passed | Status::Failed) {
        let failed = failures.len() as u64;
        r.tests = Some(TestCounts {
            tests,
            passed: tests - failed - skipped,
            failed,
            skipped,
            failures,
        });
    }
    let prelude: String = (0..rng.below(40))
        .map(|i| format!("Collecting dependency-{i}==1.{i}.0 (from -r requirements.txt)\n"))
        .collect();
    let log = format!("{prelude}{output}");
    r.log_bytes = log.len() as u64;
    Item {
        result: r,
        superseded: false,
        log,
    }
}

/// Publishes the corpus: each result (first writer wins, as runners do), its log, and its
/// final state in `ci-jobs`.
async fn load(nats: &Nats, streams: &Streams, items: &[Item]) -> Result<()> {
    let results = futures::stream::iter(items.iter().map(|it| async move {
        if it.superseded {
            publish_superseded(
                nats,
                &JobRef::only(&it.result.repo, &it.result.sha, it.result.run),
                &it.result,
            )
            .await?;
        } else if publish_final(nats, &it.result).await? == Published::AlreadyPublished {
            bail!("{} was published twice", it.result.key());
        }
        anyhow::Ok(())
    }))
    .buffered(IN_FLIGHT);
    results
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<()>>>()?;
    let logs = futures::stream::iter(items.iter().map(|it| async move {
        nats.js
            .publish(it.result.log_subject.clone(), it.log.clone().into())
            .await?
            .await?;
        anyhow::Ok(())
    }))
    .buffer_unordered(IN_FLIGHT);
    logs.collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<()>>>()?;
    let states = futures::stream::iter(items.iter().filter(|it| !it.superseded).map(|it| {
        let r = &it.result;
        let state = JobState {
            v: VERSION,
            job: None,
            repo: r.repo.clone(),
            branch: r.branch.clone(),
            sha: r.sha.clone(),
            run: r.run,
            phase: JobPhase::Final,
            attempt: r.attempt,
            runner: Some(r.runner.clone()),
            job_seq: Some(r.commit_seq),
            labels: vec![],
            status: Some(r.status),
            reason: r.reason.clone(),
            cancel: None,
            updated_at: r.finished_at,
        };
        async move {
            streams.job_states.put(r.key(), encode(&state)).await?;
            anyhow::Ok(())
        }
    }))
    .buffer_unordered(IN_FLIGHT);
    states
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<()>>>()?;
    Ok(())
}

/// Registers [`RUNNERS`] runners (refreshed every second until `stop`), one running job on each
/// and [`QUEUED`] queued jobs, so the runners page and the queue have something to show.
async fn seed_live(streams: &Streams, stop: CancellationToken) -> Result<()> {
    let mut rng = Rng(7);
    let now = messages::now();
    let job = |rng: &mut Rng, phase: JobPhase, runner: Option<String>| JobState {
        v: VERSION,
        job: None,
        repo: "app".into(),
        branch: "main".into(),
        sha: rng.sha(),
        run: 1,
        phase,
        attempt: u32::from(runner.is_some()),
        runner,
        job_seq: None,
        labels: vec!["linux".into()],
        status: None,
        reason: (phase == JobPhase::Queued).then(|| "waiting for a free runner".to_string()),
        cancel: None,
        updated_at: now,
    };
    let mut infos = Vec::new();
    for i in 0..RUNNERS {
        let id = format!("build-{i}");
        let s = job(&mut rng, JobPhase::Running, Some(id.clone()));
        let key = run_key(&s.repo, &s.sha, s.run);
        streams.job_states.put(key.clone(), encode(&s)).await?;
        infos.push(RunnerInfo {
            v: VERSION,
            id,
            host: format!("ci-host-{}", i / 2),
            labels: vec!["linux".into(), "x86_64".into()],
            capacity: 2,
            jobs: vec![format!("{key}.1")],
            accepting: true,
            started_at: now,
            updated_at: now,
            warnings: Vec::new(),
        });
    }
    for _ in 0..QUEUED {
        let s = job(&mut rng, JobPhase::Queued, None);
        streams
            .job_states
            .put(run_key(&s.repo, &s.sha, s.run), encode(&s))
            .await?;
    }
    let runners = streams.runners.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            for info in &mut infos {
                info.updated_at = messages::now();
                let _ = runners.put(&info.id, encode(info)).await;
            }
        }
    });
    Ok(())
}

/// `/healthz` of jetci-web, when it answers.
async fn health(client: &reqwest::Client, base: &str) -> Option<serde_json::Value> {
    let resp = client.get(format!("{base}/healthz")).send().await.ok()?;
    resp.json().await.ok()
}

/// Polls `/healthz` until `done` holds; the time it took.
fn wait_health(
    rt: &tokio::runtime::Runtime,
    client: &reqwest::Client,
    base: &str,
    timeout: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> Result<Duration> {
    let t0 = Instant::now();
    rt.block_on(async {
        loop {
            let h = health(client, base).await;
            if h.as_ref().is_some_and(&done) {
                return Ok(t0.elapsed());
            }
            if t0.elapsed() > timeout {
                bail!("jetci-web did not get there within {timeout:?}; /healthz: {h:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

/// Latencies of `n` sequential GETs (after one warm-up), cycling through `paths`.
async fn time_gets(
    client: &reqwest::Client,
    base: &str,
    paths: &[String],
    n: usize,
) -> Result<(Vec<f64>, usize)> {
    let mut ms = Vec::with_capacity(n);
    let mut bytes = 0;
    for i in 0..=n {
        let path = &paths[i % paths.len()];
        let t = Instant::now();
        let resp = client
            .get(format!("{base}{path}"))
            .send()
            .await
            .with_context(|| format!("GET {path}"))?;
        let status = resp.status();
        let body = resp.bytes().await?;
        let took = t.elapsed();
        if !status.is_success() {
            bail!("GET {path}: {status}");
        }
        if i > 0 {
            ms.push(took.as_secs_f64() * 1000.0);
            bytes = bytes.max(body.len());
        }
    }
    Ok((ms, bytes))
}

fn kib(bytes: usize) -> String {
    if bytes >= 1024 * 1024 {
        format!("{:.1} MiB", bytes as f64 / 1024.0 / 1024.0)
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}

/// The W benchmark; see the module comment.
pub fn bench_web(rt: &tokio::runtime::Runtime, o: &Opts, rep: &mut Report) -> Result<()> {
    let n = if o.quick { 300 } else { 10_000 };
    let requests = if o.quick { 5 } else { 200 };
    // Requests of the whole view as JSON, and rounds of `n` more results once the view is full.
    let (bulk, rounds) = if o.quick { (2, 2) } else { (20, 10) };
    // The view's bound; in --quick it equals the tiny corpus so the eviction path still runs.
    let cap = if o.quick { n } else { DEFAULT_MAX_RESULTS };
    let cap_flag = cap.to_string();
    let mut st = Stack::new(rt)?;
    let stop = CancellationToken::new();
    let _stop_guard = stop.clone().drop_guard();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    let nats = rt.block_on(crate::sys::connect(&st.url, "jetci-bench web corpus"))?;
    let streams = rt.block_on(jetci::streams::setup(&nats))?;
    rt.block_on(seed_live(&streams, stop.clone()))?;

    // Live: jetci-web runs while the corpus arrives.
    let base = st.web_with(&["--max-results", &cap_flag])?;
    wait_health(rt, &client, &base, Duration::from_secs(30), |h| {
        h["caught_up"] == true
    })?;
    std::thread::sleep(Duration::from_millis(500));
    let idle_kib = vm_kib(st.web.as_ref().unwrap().pid(), "VmRSS");
    let items = corpus(n, 0x5eed, 0);
    let t0 = Instant::now();
    rt.block_on(load(&nats, &streams, &items))?;
    let loaded = t0.elapsed();
    wait_health(rt, &client, &base, Duration::from_secs(300), |h| {
        h["last_seq"].as_u64() == Some(n as u64)
    })?;
    let live_took = t0.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let pid = st.web.as_ref().unwrap().pid();
    let (live_rss, live_hwm) = (vm_kib(pid, "VmRSS"), vm_kib(pid, "VmHWM"));

    // Rebuild: a restarted jetci-web reads the same results from the stream.
    let t1 = Instant::now();
    let base = st.web_with(&["--max-results", &cap_flag])?;
    let rebuild = wait_health(rt, &client, &base, Duration::from_secs(300), |h| {
        h["caught_up"] == true && h["results"].as_u64() == Some(n.min(cap) as u64)
    })
    .map(|_| t1.elapsed())?;
    std::thread::sleep(Duration::from_secs(1));
    let pid = st.web.as_ref().unwrap().pid();
    let (rebuilt_rss, rebuilt_hwm) = (vm_kib(pid, "VmRSS"), vm_kib(pid, "VmHWM"));

    // Every page and endpoint.
    let finals: Vec<&ResultMsg> = items
        .iter()
        .filter(|it| !it.superseded && it.result.repo == "app")
        .map(|it| &it.result)
        .collect();
    let sample: Vec<&ResultMsg> = finals
        .iter()
        .step_by((finals.len() / 50).max(1))
        .copied()
        .collect();
    let commit_pages: Vec<String> = sample
        .iter()
        .map(|r| format!("/repo/app/commit/{}", r.sha))
        .collect();
    let commit_api: Vec<String> = sample
        .iter()
        .map(|r| format!("/api/commit/app/{}", r.sha))
        .collect();
    let one = |p: &str| vec![p.to_string()];
    let endpoints: Vec<(String, Vec<String>)> = vec![
        ("`/` dashboard".into(), one("/")),
        (
            "`/repo/app` repository page (every branch, 50 commits each)".into(),
            one("/repo/app"),
        ),
        (
            "`/repo/app?branch=main` branch page".into(),
            one("/repo/app?branch=main"),
        ),
        (
            "`/repo/app?branch=feature%2Flogin` branch page (a small branch)".into(),
            one("/repo/app?branch=feature%2Flogin"),
        ),
        (
            format!(
                "`/repo/app/commit/<sha>` commit page, log from CI_LOGS ({} commits in turn)",
                commit_pages.len()
            ),
            commit_pages,
        ),
        ("`/runners` runners and queue page".into(), one("/runners")),
        (
            "`/api/results` (default limit 100)".into(),
            one("/api/results"),
        ),
        (
            "`/api/results?repo=lib&branch=develop&limit=20`".into(),
            one("/api/results?repo=lib&branch=develop&limit=20"),
        ),
        ("`/api/repos`".into(), one("/api/repos")),
        ("`/api/commit/app/<sha>`".into(), commit_api),
        ("`/api/runners`".into(), one("/api/runners")),
        ("`/api/queue`".into(), one("/api/queue")),
        ("`/api/jobs`".into(), one("/api/jobs")),
        ("`/healthz`".into(), one("/healthz")),
        ("`/badge/app.svg`".into(), one("/badge/app.svg")),
        (
            "`/badge/app/feature/login.svg`".into(),
            one("/badge/app/feature/login.svg"),
        ),
    ];
    let in_view = n.min(cap);
    let latency_row = |what: &str, count: usize, ms: &[f64], bytes: usize| {
        let p95 = pct(ms, 95.0);
        Row {
            id: "W",
            what: format!("jetci-web {what}, {in_view} results in view"),
            n: count.to_string(),
            median: fms(median(ms)),
            p95: fms(p95),
            floor: "–".into(),
            ratio: kib(bytes),
            goal: format!("< {}", fms(GOAL_MS)),
            verdict: verdict(p95 < GOAL_MS),
        }
    };
    let cpu0 = crate::sys::cpu_seconds(pid);
    let mut total_requests = 0;
    let mut rows = Vec::new();
    for (what, paths) in &endpoints {
        let (ms, bytes) = rt.block_on(time_gets(&client, &base, paths, requests))?;
        total_requests += requests + 1;
        rows.push(latency_row(what, requests, &ms, bytes));
    }
    let cpu_per_request = (crate::sys::cpu_seconds(pid) - cpu0) * 1000.0 / total_requests as f64;
    let (paged_rss, paged_hwm) = (vm_kib(pid, "VmRSS"), vm_kib(pid, "VmHWM"));

    // Growth: as many results again, a few times; the view is full, so memory should level off.
    let mut grown = Vec::new();
    for round in 1..=rounds {
        let more = corpus(n, 0xfeed + 2 * round as u64, (round * 2 * n) as u64);
        rt.block_on(load(&nats, &streams, &more))?;
        let last = ((round + 1) * n) as u64;
        wait_health(rt, &client, &base, Duration::from_secs(300), |h| {
            h["last_seq"].as_u64() == Some(last) && h["results"].as_u64() == Some(in_view as u64)
        })?;
        std::thread::sleep(Duration::from_secs(1));
        grown.push((round * n, vm_kib(pid, "VmRSS"), vm_kib(pid, "VmHWM")));
    }

    // The whole view as JSON, last, so its transient memory is seen on its own.
    let bulk_what = format!("`/api/results?limit={cap}` (the whole view)");
    let (ms, bytes) = rt.block_on(time_gets(
        &client,
        &base,
        &[format!("/api/results?limit={cap}")],
        bulk,
    ))?;
    rows.push(latency_row(&bulk_what, bulk, &ms, bytes));
    std::thread::sleep(Duration::from_millis(500));
    let (bulk_rss, bulk_hwm) = (vm_kib(pid, "VmRSS"), vm_kib(pid, "VmHWM"));

    let mean_json = items
        .iter()
        .map(|it| encode(&it.result).len())
        .sum::<usize>()
        / items.len().max(1);
    let mean_log = items.iter().map(|it| it.log.len()).sum::<usize>() / items.len().max(1);
    let per_result = (rebuilt_rss.saturating_sub(idle_kib)) as f64 * 1024.0 / in_view as f64;
    let mem = |what: String, rss: u64, hwm: u64, ratio: String, goal: &str, verdict: String| Row {
        id: "W",
        what,
        n: "1".into(),
        median: mib(rss),
        p95: format!("peak {}", mib(hwm)),
        floor: format!("idle {}", mib(idle_kib)),
        ratio,
        goal: goal.into(),
        verdict,
    };
    let x = |rss: u64| format!("{:.2}× rebuilt", rss as f64 / rebuilt_rss.max(1) as f64);
    rep.rows.push(mem(
        format!("jetci-web RSS, {n} results taken in live"),
        live_rss,
        live_hwm,
        "–".into(),
        "–",
        "–".into(),
    ));
    rep.rows.push(mem(
        format!(
            "jetci-web RSS, restarted: {in_view} results rebuilt from CI_RESULTS in {}",
            fms(rebuild.as_secs_f64() * 1000.0)
        ),
        rebuilt_rss,
        rebuilt_hwm,
        format!("{} per result", kib(per_result as usize)),
        "–",
        "–".into(),
    ));
    rep.rows.push(mem(
        format!(
            "jetci-web RSS after the {total_requests} page requests below (without the whole-view one)"
        ),
        paged_rss,
        paged_hwm,
        x(paged_rss),
        "–",
        "–".into(),
    ));
    // Levelled off: no growth over the last three rounds (the allocator keeps some slack, so
    // the first rounds after a restart still grow a little).
    let (&(_, before, _), &(through, last_rss, last_hwm)) = (
        &grown[grown.len().saturating_sub(4)],
        grown.last().expect("at least one round"),
    );
    let level = last_rss as f64 / before.max(1) as f64;
    let steps: Vec<String> = grown
        .iter()
        .map(|(_, rss, _)| format!("{:.0}", *rss as f64 / 1024.0))
        .collect();
    rep.rows.push(mem(
        format!(
            "jetci-web RSS after {through} more results in {rounds} rounds (view full at --max-results {cap})"
        ),
        last_rss,
        last_hwm,
        format!("{}; after each round: {} MiB", x(last_rss), steps.join(", ")),
        "levels off: last round ≤ 1.05× three rounds before",
        format!("{} ({level:.2}×)", verdict(level <= 1.05)),
    ));
    rep.rows.push(mem(
        format!("jetci-web RSS after {bulk} × `/api/results?limit={cap}`"),
        bulk_rss,
        bulk_hwm,
        x(bulk_rss),
        "–",
        "–".into(),
    ));
    rep.rows.extend(rows);
    rep.notes.push(format!(
        "W: {n} results ({} repositories, {} branch names each drawn by weight; about 85 % passed, 10 % \
         failed with a 4 KiB output tail and failing-test names, 2 % error, 2 % timed out, 1 % cancelled; \
         2 % reruns, 0.5 % superseded attempts; mean result {} of JSON) are published into CI_RESULTS as \
         runners do (`publish_final`, 256 in flight), each with its log in CI_LOGS (mean {}) and its \
         final state in ci-jobs, plus {RUNNERS} live runners and {} unfinished jobs; loading took {:.1} s \
         and the live jetci-web had them all {:.1} s after the first publish. Then jetci-web is \
         restarted (rebuild time: start → `/healthz` caught up with every result), and every page is \
         timed on the rebuilt one: sequential GETs with reqwest on one keep-alive connection, time to \
         the last body byte, one warm-up not counted; the ratio column is the response size. The web \
         process used {cpu_per_request:.2} ms CPU per request on average. Then {rounds} rounds of {n} \
         more results are published (RSS read after each, once the view holds {in_view} again), and \
         last the whole view is asked for as JSON {bulk} times. Bound (bins/web/src/view.rs): the view keeps at most \
         `--max-results` results (default {DEFAULT_MAX_RESULTS}; oldest stream sequence evicted \
         first), at most 10,000 unfinished jobs (MAX_JOBS), runners whose presence is younger than 60 s, \
         and the notifier keeps at most 100,000 branch states and 10,000 sent keys; all are counts, not \
         bytes, so memory ≈ max-results × the mean result: here about {} of RSS per result \
         ((rebuilt − idle) / {in_view}). A jetci-runner result is at most a 4 KiB tail plus 100 failure \
         names of 300 characters (~35 KiB); a result published by anything else may be up to the \
         1 MiB max_payload, so the hard bound is max-results × 1 MiB.",
        REPOS.len(),
        BRANCHES.len(),
        kib(mean_json),
        kib(mean_log),
        RUNNERS + QUEUED,
        loaded.as_secs_f64(),
        live_took.as_secs_f64(),
        kib(per_result as usize),
    ));
    drop(st);
    Ok(())
}
