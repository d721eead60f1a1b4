//! jetci on a real three-node JetStream cluster (DESIGN.md, I1, I3 and I4 with a node lost):
//! three `nats-server`s on loopback ports, configured from `deploy/cluster/n1.conf`..`n3.conf`
//! (only ports and store dirs are changed), one observer, two dispatchers
//! and three runners, every one started with `--replicas 3` and `-s` naming all three nodes.
//!
//! Commits are pushed over two branches (a quarter of them failing on purpose); mid-run the node
//! that leads the `ci-jobs` bucket (where every heartbeat is written) is SIGKILLed, more commits
//! are pushed while it is down and must be tested by the two survivors, then it is restarted on
//! the same ports and store and must catch up. At the end every commit has exactly one final
//! result with the status its test dictates, no test command ran twice (each run appends a line
//! to a file, [`Executions`]), no jetci process died, and every stream and bucket has three
//! current replicas. The figures are printed; run it with
//! `cargo test -p jetci-e2e --test e2e cluster:: -- --nocapture`.
//!
//! The cluster helpers live here rather than in the support module: only this test needs them.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use jetci::subjects::Names;
use serde_json::Value;

use crate::support::executions::Executions;
use crate::support::git::GitRepo;
use crate::support::heavy;
use crate::support::jetstream::{all_streams, names, read_stream};
use crate::support::nats::free_port;
use crate::support::processes::Proc;
use crate::support::waiting::{wait_until, wait_until_async};

/// Upper bound of every wait: generous, since the machine is small and shared.
const BOUND: Duration = Duration::from_secs(180);
/// Commits pushed before the kill, while the node is down, and after it is back.
const BEFORE: usize = 14;
const DURING: usize = 14;
const AFTER: usize = 12;
/// Results that must be stored while the node is down (proof that the survivors serve).
const PROGRESS_WHILE_DOWN: usize = 6;
const BRANCHES: [&str; 2] = ["main", "feature/cluster.ha"];

/// The shipped node configs, used as they are apart from the substitutions in [`node_config`].
const CONFIGS: [&str; 3] = [
    include_str!("../../deploy/cluster/n1.conf"),
    include_str!("../../deploy/cluster/n2.conf"),
    include_str!("../../deploy/cluster/n3.conf"),
];
/// The ports the shipped configs use: client, route, monitoring (node i adds i).
const SHIPPED_PORTS: [u16; 3] = [4511, 6511, 8511];

// ---------------------------------------------------------------------------------------------
// The cluster
// ---------------------------------------------------------------------------------------------

/// One node's ports on 127.0.0.1.
#[derive(Clone, Copy, Debug)]
struct Ports {
    client: u16,
    route: u16,
    http: u16,
}

/// One `nats-server` of the cluster; its config, store and log live in the cluster's temp dir.
struct Node {
    name: String,
    ports: Ports,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Node {
    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.ports.client)
    }

    /// Starts the server (appending to its log); does not wait for it.
    fn spawn(&mut self) {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("cannot open a node log");
        let err = log.try_clone().expect("cannot clone a log handle");
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot spawn nats-server (run deploy/install-nats-server.sh): {e}")
            });
        self.child = Some(child);
    }

    /// SIGKILL, as a crash would; the store keeps what was written.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => !matches!(c.try_wait(), Ok(None)),
            None => true,
        }
    }

    /// `/healthz` answers 200 once the node has JetStream, a meta leader and current streams.
    fn healthy(&self) -> bool {
        http_get(self.ports.http, "/healthz").is_some()
    }

    fn log_tail(&self, n: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// Three nodes on free loopback ports, each with its own store dir; all killed on `Drop`.
struct Cluster {
    nodes: Vec<Node>,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts the three nodes and returns once every one says it is healthy. A port taken by
    /// someone else between [`free_port`] and the bind makes a node exit; then all three start
    /// again on new ports.
    fn start() -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("jetci-cluster-")
            .tempdir()
            .expect("cannot create the cluster's temp dir");
        let mut cluster = Cluster {
            nodes: Vec::new(),
            dir,
        };
        for attempt in 1..=3 {
            let ports = distinct_ports();
            let dir = &cluster.dir;
            cluster.nodes = (0..3)
                .map(|i| {
                    let name = format!("n{}", i + 1);
                    let store = dir.path().join(&name);
                    fs::create_dir_all(&store).expect("cannot create a store dir");
                    let config = dir.path().join(format!("{name}.conf"));
                    fs::write(&config, node_config(CONFIGS[i], &ports, &store))
                        .expect("cannot write a node config");
                    Node {
                        log: dir.path().join(format!("{name}.log")),
                        name,
                        ports: ports[i],
                        config,
                        child: None,
                    }
                })
                .collect();
            cluster.nodes.iter_mut().for_each(Node::spawn);
            // Healthy, or a node exited (its port was taken meanwhile). A panic here leaves the
            // nodes to `Drop`, which kills them and prints their logs.
            let nodes = &mut cluster.nodes;
            let started = wait_until(
                "the cluster to become healthy",
                Duration::from_secs(60),
                || {
                    if nodes.iter_mut().any(Node::exited) {
                        return Ok(false);
                    }
                    let sick: Vec<&str> = nodes
                        .iter()
                        .filter(|n| !n.healthy())
                        .map(|n| n.name.as_str())
                        .collect();
                    sick.is_empty()
                        .then_some(true)
                        .ok_or_else(|| format!("not healthy yet: {sick:?}"))
                },
            );
            if started {
                return cluster;
            }
            eprintln!("cluster: a node exited at start (attempt {attempt}); new ports");
            cluster.nodes.iter_mut().for_each(Node::kill);
        }
        panic!("could not start the cluster on free ports three times");
    }

    fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Node::url).collect()
    }

    fn index(&self, name: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node named {name}"))
    }

    /// Starts a killed node again on its ports and store, and waits until it is healthy (caught
    /// up). Retries while its old ports are not free yet.
    fn restart(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        node.kill();
        node.spawn();
        let what = format!("{} to become healthy after its restart", node.name);
        wait_until(&what, BOUND, || {
            if node.healthy() {
                return Ok(());
            }
            if node.exited() {
                eprintln!("cluster: {} exited at restart; trying again", node.name);
                node.spawn();
            }
            Err(node.log_tail(40))
        });
    }

    /// A client of all three nodes, as jetci's processes are.
    async fn client(&self) -> async_nats::Client {
        async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(self.urls())
            .await
            .expect("cannot connect to the cluster")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        if panicking {
            for node in &self.nodes {
                eprintln!("--- consumers on {} ---\n{}", node.name, consumers_on(node));
            }
            // The configs, stores and whole logs stay for a look.
            self.dir.disable_cleanup(true);
            eprintln!("cluster files kept in {}", self.dir.path().display());
        }
        for node in &mut self.nodes {
            node.kill();
            if panicking {
                eprintln!("--- nats-server {} ---\n{}", node.name, node.log_tail(30));
            }
        }
    }
}

/// One line per consumer a node hosts (from its `/jsz`), for a failing test's report: which
/// consumers of which streams live where, and how far each got.
fn consumers_on(node: &Node) -> String {
    let Some(body) = http_get(
        node.ports.http,
        "/jsz?accounts=true&streams=true&consumers=true",
    ) else {
        return "(no answer)".into();
    };
    let jsz: Value = serde_json::from_str(&body).unwrap_or_default();
    let routez: Value = http_get(node.ports.http, "/routez")
        .and_then(|b| serde_json::from_str(&b).ok())
        .unwrap_or_default();
    let routes: Vec<String> = routez["routes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| format!("{}", r["remote_name"]))
        .collect();
    let mut lines = vec![format!("routes to {routes:?}")];
    for account in jsz["account_details"].as_array().into_iter().flatten() {
        for stream in account["stream_detail"].as_array().into_iter().flatten() {
            let leader = &stream["cluster"]["leader"];
            let last = &stream["state"]["last_seq"];
            lines.push(format!(
                "stream {} leader {leader} last_seq {last}",
                stream["name"]
            ));
            for c in stream["consumer_detail"].as_array().into_iter().flatten() {
                lines.push(format!(
                    "  consumer {} leader {} delivered {} ack_floor {} pending {} ack_pending {} waiting {}",
                    c["name"],
                    c["cluster"]["leader"],
                    c["delivered"]["stream_seq"],
                    c["ack_floor"]["stream_seq"],
                    c["num_pending"],
                    c["num_ack_pending"],
                    c["num_waiting"],
                ));
            }
        }
    }
    lines.join("\n")
}

/// Nine different free ports, three per node.
fn distinct_ports() -> [Ports; 3] {
    let mut seen: Vec<u16> = Vec::new();
    while seen.len() < 9 {
        let p = free_port();
        if !seen.contains(&p) {
            seen.push(p);
        }
    }
    std::array::from_fn(|i| Ports {
        client: seen[3 * i],
        route: seen[3 * i + 1],
        http: seen[3 * i + 2],
    })
}

/// A shipped node config with every shipped port replaced by this cluster's and `store_dir` set
/// to `store`; nothing else changes (not even `max_file_store`: a node needs room for
/// `CI_LOGS`' 4 GiB limit, or no stream can be placed). Panics if a shipped port is left over,
/// so a change to the shipped files is noticed here.
fn node_config(shipped: &str, ports: &[Ports; 3], store: &Path) -> String {
    // Every shipped port becomes `@@PORT@@` first, so a new port that contains an old one is
    // not replaced again; a shipped port still there afterwards was missed.
    let mut text = shipped.to_string();
    for (i, p) in ports.iter().enumerate() {
        let new = [p.client, p.route, p.http];
        for (kind, base) in SHIPPED_PORTS.iter().enumerate() {
            let old = format!("127.0.0.1:{}", base + i as u16);
            text = text.replace(&old, &format!("127.0.0.1:@@{}@@", new[kind]));
        }
    }
    for base in SHIPPED_PORTS {
        for i in 0..3 {
            let old = format!("127.0.0.1:{}", base + i);
            assert!(!text.contains(&old), "{old} left in a test config:\n{text}");
        }
    }
    let text = text.replace("@@", "");
    text.lines()
        .map(|line| {
            let key = line.trim_start();
            if key.starts_with("store_dir") {
                format!("  store_dir: {:?}\n", store.display().to_string())
            } else {
                format!("{line}\n")
            }
        })
        .collect()
}

/// `GET path` from a node's monitoring port: the body when the answer is 200.
fn http_get(port: u16, path: &str) -> Option<String> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    head.lines()
        .next()?
        .contains(" 200 ")
        .then(|| body.to_string())
}

// ---------------------------------------------------------------------------------------------
// Reading the streams
// ---------------------------------------------------------------------------------------------

/// The final results stored so far, as JSON. Errors (a leader election, a node going away) are
/// returned for the caller to look again.
async fn results(js: &jetstream::Context) -> Result<Vec<Value>, String> {
    let n = names();
    Ok(read_stream(js, &n.results_stream(), &n.results_filter(), 1)
        .await?
        .iter()
        .map(|m| serde_json::from_slice(&m.payload).expect("a result is JSON"))
        .collect())
}

/// The jetci processes of the test, by name.
struct Fleet(Mutex<Vec<(String, Proc)>>);

impl Fleet {
    /// The names of the processes that have exited.
    fn dead(&self) -> Vec<String> {
        let mut procs = self.0.lock().expect("fleet lock");
        let mut dead = Vec::new();
        for (name, p) in procs.iter_mut() {
            if !p.is_running() {
                dead.push(name.clone());
            }
        }
        dead
    }
}

/// Asks `check` until it gives a value (see [`wait_until_async`]); panics after [`BOUND`] with
/// `what` and the last thing `check` said, or at once when a process of `fleet` has died (a
/// process must survive the loss of a node, and nothing would happen after it).
async fn wait_for<T>(
    what: &str,
    fleet: &Fleet,
    mut check: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    wait_until_async(what, BOUND, async || {
        let outcome = check().await;
        if outcome.is_err() {
            let dead = fleet.dead();
            assert!(
                dead.is_empty(),
                "jetci processes died while waiting for {what}: {dead:?}"
            );
        }
        outcome
    })
    .await
}

/// Waits until at least `n` final results are stored; returns how many there are.
async fn wait_results(js: &jetstream::Context, fleet: &Fleet, n: usize) -> usize {
    wait_for(&format!("{n} results"), fleet, move || async move {
        let got = results(js).await?.len();
        if got >= n {
            Ok(got)
        } else {
            Err(format!("{got} results"))
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// The pushes
// ---------------------------------------------------------------------------------------------

/// Makes commits in small bursts, alternating branches, a quarter of them failing; remembers the
/// status each must get.
struct Pusher<'a> {
    repo: &'a GitRepo,
    made: usize,
    expected: BTreeMap<String, &'static str>,
}

impl Pusher<'_> {
    /// `n` more commits, in bursts of 1-3 with a short pause between bursts (so the observer
    /// sees several pushes, not one).
    async fn push(&mut self, n: usize) {
        let mut left = n;
        while left > 0 {
            let branch = BRANCHES[self.made % 2];
            self.repo.checkout(branch);
            let burst = (1 + self.made % 3).min(left);
            for _ in 0..burst {
                let fail = self.made % 4 == 3;
                let sha = self.repo.commit(
                    &format!("commit {} on {branch}", self.made),
                    &[
                        ("status", if fail { "1" } else { "0" }),
                        ("n", &self.made.to_string()),
                    ],
                );
                self.expected
                    .insert(sha, if fail { "failed" } else { "passed" });
                self.made += 1;
                left -= 1;
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_node_lost_and_restarted_mid_run_loses_nothing_and_runs_nothing_twice() {
    // Three nats-servers and six jetci processes: not beside another heavy test.
    let _heavy = heavy().await;
    let started = Instant::now();
    let mut cluster = Cluster::start();
    let servers = cluster.urls().join(",");
    let names = names();
    let work = tempfile::tempdir().expect("tempdir");

    // Every run of the test command appends one line: the executions are counted from it.
    let executions = Executions::new();
    let repo = GitRepo::new();
    let command = format!("{}; sleep 1; exit $(cat status)", executions.record());
    let toml = format!("command = {command:?}\n");
    let first = repo.commit("first", &[(".jetci.toml", toml.as_str()), ("status", "0")]);
    repo.run_git(&["branch", BRANCHES[1]]);

    let common = ["-s", servers.as_str(), "--replicas", "3"];
    let with = |extra: &[&str]| -> Vec<String> {
        common.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let spawn = |bin: &str, args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Proc::spawn(bin, &args, &[])
    };
    let repo_path = repo.path().to_str().expect("utf-8 path").to_string();
    let mut procs: Vec<(String, Proc)> = vec![(
        "observer".into(),
        spawn(
            "jetci-observer",
            with(&["--poll-interval", "200ms", "--name", "app", &repo_path]),
        ),
    )];
    for d in 0..2 {
        procs.push((
            format!("dispatcher-{d}"),
            spawn("jetci-dispatcher", with(&[])),
        ));
    }
    for r in 0..3 {
        let id = format!("r{r}");
        let dir = work.path().join(&id);
        let dir = dir.to_str().expect("utf-8 path");
        procs.push((
            id.clone(),
            spawn(
                "jetci-runner",
                with(
                    &[
                        &["--id", &id, "--work-dir", dir][..],
                        &executions.runner_flags(),
                    ]
                    .concat(),
                ),
            ),
        ));
    }

    // The first spawn built the binaries; the run is timed from here.
    let spawned = Instant::now();
    let fleet = &Fleet(Mutex::new(procs));
    let client = cluster.client().await;
    let js = &jetstream::new(client);
    wait_results(js, fleet, 1).await;
    let ready = spawned.elapsed();

    let mut pusher = Pusher {
        repo: &repo,
        made: 0,
        expected: BTreeMap::from([(first.clone(), "passed")]),
    };

    // Before: commits flow, jobs run.
    pusher.push(BEFORE).await;
    let before_kill = wait_results(js, fleet, 6).await;

    // The victim: the node leading the `ci-jobs` bucket, where every heartbeat and every
    // assignment is written, so losing it stalls them all until a new leader is elected.
    let jobs_stream = format!("KV_{}", names.jobs_bucket());
    let jobs_stream = &jobs_stream;
    let leader = wait_for(
        "a leader of the ci-jobs bucket",
        fleet,
        move || async move {
            let info = js
                .get_stream(jobs_stream)
                .await
                .map_err(|e| e.to_string())?
                .get_info()
                .await
                .map_err(|e| e.to_string())?;
            info.cluster
                .and_then(|c| c.leader)
                .ok_or_else(|| "no leader".to_string())
        },
    )
    .await;
    let victim = cluster.index(&leader);
    let led = leaders_on(js, &names, &leader).await;
    let connected = connection_names(cluster.nodes[victim].ports.http);
    eprintln!(
        "cluster: SIGKILL {leader} ({}), leader of {led:?}, with jetci connections {connected:?}",
        cluster.nodes[victim].url()
    );
    let killed_at = Instant::now();
    cluster.nodes[victim].kill();

    // While it is down: more commits, and the survivors must test some of them.
    pusher.push(DURING).await;
    let first_after_kill = &std::cell::Cell::new(None);
    let counted = wait_for("results while a node is down", fleet, move || async move {
        let got = results(js).await?.len();
        if got > before_kill && first_after_kill.get().is_none() {
            first_after_kill.set(Some(killed_at.elapsed()));
        }
        if got >= before_kill + PROGRESS_WHILE_DOWN {
            Ok(got)
        } else {
            Err(format!("{got} results, {before_kill} at the kill"))
        }
    })
    .await;
    // Read once more for the figure; if that read fails (an election), the wait's count stands.
    let while_down = results(js).await.map_or(counted, |r| r.len()) - before_kill;
    let restart_at = Instant::now();
    cluster.restart(victim);
    let down_for = restart_at.duration_since(killed_at);
    let caught_up = restart_at.elapsed();
    eprintln!(
        "cluster: {leader} back after {down_for:.1?} down, healthy {caught_up:.1?} after its restart"
    );

    // After: more commits, then everything drains.
    pusher.push(AFTER).await;
    let last_push = Instant::now();
    let expected = pusher.expected.clone();
    wait_results(js, fleet, expected.len()).await;
    let drained = last_push.elapsed();

    // Settled: every commit acked, every runner idle, every replica current.
    let commits_stream = &names.commits_stream();
    wait_for("every commit acked", fleet, move || async move {
        let left = js
            .get_stream(commits_stream)
            .await
            .map_err(|e| e.to_string())?
            .get_info()
            .await
            .map_err(|e| e.to_string())?
            .state
            .messages;
        (left == 0)
            .then_some(())
            .ok_or(format!("{left} commits unacked"))
    })
    .await;
    let names = &names;
    wait_for("every runner idle", fleet, move || runners_idle(js, names)).await;
    let replicas = wait_for("three current replicas of everything", fleet, move || {
        all_replicated(js, names)
    })
    .await;

    // The verdicts.
    let all = results(js).await.expect("results readable");
    let superseded = read_stream(js, &names.results_stream(), &names.superseded_filter(), 1)
        .await
        .expect("superseded results readable");
    let mut per_sha: HashMap<String, Vec<&Value>> = HashMap::new();
    for r in &all {
        let sha = r["sha"].as_str().expect("sha").to_string();
        per_sha.entry(sha).or_default().push(r);
    }
    let lost: Vec<&String> = expected
        .keys()
        .filter(|s| !per_sha.contains_key(*s))
        .collect();
    let duplicated: Vec<&String> = per_sha
        .iter()
        .filter(|(_, v)| v.len() > 1)
        .map(|(s, _)| s)
        .collect();
    let wrong: Vec<String> = expected
        .iter()
        .filter_map(|(sha, want)| {
            let got = per_sha.get(sha)?.first()?["status"].as_str()?;
            (got != *want).then(|| format!("{sha}: want {want}, got {got}"))
        })
        .collect();
    let reassigned = all
        .iter()
        .filter(|r| r["attempt"].as_u64() != Some(1))
        .count();
    let executions = executions.per_sha();
    let twice: Vec<String> = executions
        .iter()
        .filter(|(_, runs)| runs.len() > 1)
        .map(|(sha, runs)| format!("{sha}: {runs:?}"))
        .collect();
    let dead = fleet.dead();

    eprintln!(
        "| figure | value |\n| --- | --- |\n\
         | commits tested | {} ({} pushed over 2 branches, plus the first) |\n\
         | node SIGKILLed | {leader}: leader of {}; jetci connections on it: {} |\n\
         | down for | {:.1} s; first result after the kill {}; {while_down} results stored while down |\n\
         | restarted node healthy (caught up) after | {:.1} s |\n\
         | time to drain after the last push | {:.1} s |\n\
         | final results / lost / duplicated / wrong status | {} / {} / {} / {} |\n\
         | test commands run / run twice | {} / {} |\n\
         | results of a later attempt / superseded results | {reassigned} / {} |\n\
         | streams and buckets with 3 current replicas | {replicas} |\n\
         | run time | {:.1} s from starting the processes to the last check (first result after {:.1} s); {:.1} s in all |",
        expected.len(),
        expected.len() - 1,
        led.join(", "),
        if connected.is_empty() {
            "none".to_string()
        } else {
            connected.join(", ")
        },
        down_for.as_secs_f64(),
        first_after_kill
            .get()
            .map(|d| format!("{:.1} s", d.as_secs_f64()))
            .unwrap_or("-".into()),
        caught_up.as_secs_f64(),
        drained.as_secs_f64(),
        all.len(),
        lost.len(),
        duplicated.len(),
        wrong.len(),
        executions.values().map(Vec::len).sum::<usize>(),
        twice.len(),
        superseded.len(),
        spawned.elapsed().as_secs_f64(),
        ready.as_secs_f64(),
        started.elapsed().as_secs_f64(),
    );

    assert!(dead.is_empty(), "jetci processes died: {dead:?}");
    assert!(lost.is_empty(), "commits without a result: {lost:?}");
    assert!(
        duplicated.is_empty(),
        "runs with two results: {duplicated:?}"
    );
    assert!(wrong.is_empty(), "wrong statuses: {wrong:?}");
    assert_eq!(
        all.len(),
        expected.len(),
        "one result per commit, nothing else"
    );
    assert!(twice.is_empty(), "test commands run twice: {twice:?}");
    assert_eq!(
        executions.len(),
        expected.len(),
        "every commit's test ran: {executions:?}"
    );
}

/// The jetci streams and buckets whose leader is `node`.
async fn leaders_on(js: &jetstream::Context, names: &Names, node: &str) -> Vec<String> {
    let mut led = Vec::new();
    for name in all_streams(names) {
        let Ok(stream) = js.get_stream(&name).await else {
            continue;
        };
        if let Ok(info) = stream.get_info().await {
            if info.cluster.and_then(|c| c.leader).as_deref() == Some(node) {
                led.push(name);
            }
        }
    }
    led
}

/// The names of the jetci connections of a node (from its `/connz`).
fn connection_names(http: u16) -> Vec<String> {
    let Some(body) = http_get(http, "/connz?limit=1000") else {
        return Vec::new();
    };
    let connz: Value = serde_json::from_str(&body).unwrap_or_default();
    let mut out: Vec<String> = connz["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .filter(|n| n.starts_with("jetci"))
        .map(str::to_string)
        .collect();
    out.sort();
    out
}

/// Ok when every runner's presence entry says it runs no job.
async fn runners_idle(js: &jetstream::Context, names: &Names) -> Result<(), String> {
    let kv = js
        .get_key_value(names.runners_bucket())
        .await
        .map_err(|e| e.to_string())?;
    for id in ["r0", "r1", "r2"] {
        let entry = kv
            .get(id)
            .await
            .map_err(|e| e.to_string())?
            .ok_or(format!("runner {id} not registered"))?;
        let info: Value = serde_json::from_slice(&entry).map_err(|e| e.to_string())?;
        if info["jobs"].as_array().is_some_and(|j| !j.is_empty()) {
            return Err(format!("runner {id} still runs {}", info["jobs"]));
        }
    }
    Ok(())
}

/// Ok (with how many) when every jetci stream and bucket, and the dispatchers' consumer, has
/// three replicas, a leader and two current followers.
async fn all_replicated(js: &jetstream::Context, names: &Names) -> Result<usize, String> {
    let check = |what: &str, cluster: Option<jetstream::stream::ClusterInfo>| {
        let c = cluster.ok_or(format!("{what} has no cluster info"))?;
        if c.leader.is_none() {
            return Err(format!("{what} has no leader"));
        }
        if c.replicas.len() != 2 || c.replicas.iter().any(|p| !p.current || p.offline) {
            return Err(format!("{what} followers: {:?}", c.replicas));
        }
        Ok(())
    };
    let mut count = 0;
    for name in all_streams(names) {
        let mut stream = js.get_stream(&name).await.map_err(|e| e.to_string())?;
        let info = stream.info().await.map_err(|e| e.to_string())?;
        assert_eq!(
            info.config.num_replicas, 3,
            "{name} was created with {} replica(s), not 3",
            info.config.num_replicas
        );
        check(&name, info.cluster.clone())?;
        count += 1;
    }
    let commits = js
        .get_stream(names.commits_stream())
        .await
        .map_err(|e| e.to_string())?;
    let consumer = commits
        .consumer_info(names.dispatcher_consumer())
        .await
        .map_err(|e| e.to_string())?;
    check("the dispatchers' consumer", consumer.cluster)?;
    Ok(count)
}
