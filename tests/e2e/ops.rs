//! Operating jetci: what an operator looks at and what an operator installs.
//!
//! - `jetci status --json` (and its text view) against a known state: one commit waiting for a
//!   label no runner has, one job running on a runner busy with a slow command.
//! - `deploy/`, checked with the tools that will read each file: every systemd unit with
//!   `systemd-analyze verify` (and its flags with the binary it starts), the compose file with
//!   `docker compose config` (the Compose specification's schema), every nats-server config with
//!   `nats-server -t`. Each check is also shown a broken file, so a checker that passes
//!   everything cannot go unnoticed. The one-node config, which has no authorization, is also
//!   started as shipped and must serve this machine only.
//!
//! The tools come with the machine (systemd-analyze, nats-server, docker) or from
//! `deploy/install-docker-compose.sh`, which `.ci/run` runs. Where one is missing, the test fails
//! under CI (`CI` set) and skips with a message elsewhere.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

use crate::support::git::GitRepo;
use crate::support::http::http_get;
use crate::support::jetstream::names;
use crate::support::nats::NatsServer;
use crate::support::processes::bin_path;
use crate::support::processes::missing_tool;
use crate::support::system::{app_job, System};
use crate::support::waiting::{wait_until_async, BOUND};

// ---------------------------------------------------------------------------------------------
// jetci status
// ---------------------------------------------------------------------------------------------

/// `jetci status` (with `args`) as JSON or text; panics if it fails.
fn status(url: &str, args: &[&str]) -> String {
    let out = Command::new(bin_path("jetci"))
        .args(["-s", url, "status"])
        .args(args)
        .output()
        .expect("cannot run jetci status");
    assert!(
        out.status.success(),
        "jetci status {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("jetci status prints UTF-8")
}

/// The entries of the JSON list `list` whose `sha` is `sha`.
fn with_sha<'a>(list: &'a Value, sha: &str) -> Vec<&'a Value> {
    list.as_array()
        .map(|l| l.iter().filter(|e| e["sha"] == sha).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn status_shows_the_waiting_commit_the_running_job_the_runner_and_the_streams() {
    let nats = NatsServer::start();
    let url = nats.url();
    let repo = GitRepo::new();
    // On main, a test that runs until the test ends (the runner's process tree is killed then).
    let slow = repo.commit("slow", &[(".jetci.toml", "command = \"sleep 600.4242\"\n")]);
    let mut sys = System::start(&nats, &repo, &[]);
    sys.add_runner("r1", &["--labels", "linux"], &[]);

    // The slow job runs first, so the runner is busy when the second commit comes.
    wait_until_async("the slow job to run", BOUND, async || {
        let v: Value = serde_json::from_str(&status(&url, &["--json"])).expect("JSON");
        with_sha(&v["in_flight"], &slow)
            .first()
            .is_some_and(|j| j["phase"] == "running")
            .then_some(())
            .ok_or(v)
    })
    .await;

    // On branch gpu, a commit that needs a label no runner has.
    repo.checkout_new_branch("gpu");
    let gpu = repo.commit(
        "needs a gpu",
        &[(".jetci.toml", "command = \"true\"\nlabels = [\"gpu\"]\n")],
    );

    // Wait until status shows both, and the runner lists its job (it does at its next presence
    // refresh, up to a heartbeat after the job state says `running`). The lease is long enough
    // that the runner and the job are alive whatever the machine's load: `lease_left_ms` is then
    // this lease less the age of the job's last heartbeat.
    let lease_ms = 60_000;
    let job_id = app_job(&slow).attempt_id(1);
    let v = wait_until_async("status to show both commits", BOUND, async || {
        let v: Value =
            serde_json::from_str(&status(&url, &["--json", "--lease", "60s"])).expect("JSON");
        let waiting = with_sha(&v["queue"]["not_taken"], &gpu).len()
            + with_sha(&v["queue"]["waiting_for_runner"], &gpu).len();
        let listed = v["runners"]
            .as_array()
            .is_some_and(|rs| rs.iter().any(|r| r["jobs"][0] == job_id.as_str()));
        if waiting > 0 && with_sha(&v["in_flight"], &slow).len() == 1 && listed {
            Ok(v)
        } else {
            Err(v)
        }
    })
    .await;

    // The waiting commit: whether a dispatcher holds it (`waiting_for_runner`, from `ci-jobs`)
    // or it is still in CI_COMMITS (`not_taken`), it is listed once, with its labels and why.
    let queue = &v["queue"];
    let listed: Vec<&Value> = with_sha(&queue["not_taken"], &gpu)
        .into_iter()
        .chain(with_sha(&queue["waiting_for_runner"], &gpu))
        .collect();
    assert_eq!(listed.len(), 1, "{v:#}");
    let w = listed[0];
    assert_eq!(w["repo"], "app", "{v:#}");
    assert_eq!(w["branch"], "gpu", "{v:#}");
    assert_eq!(w["run"], 1, "{v:#}");
    assert_eq!(w["labels"], serde_json::json!(["gpu"]), "{v:#}");
    assert_eq!(w["reason"], "no live runner has labels [gpu]", "{v:#}");
    // Two commits are in CI_COMMITS (neither has a result), one of them running.
    assert_eq!(queue["waiting"], 1, "{v:#}");

    // The running job: its runner, attempt and lease.
    let jobs = v["in_flight"].as_array().expect("in_flight is a list");
    assert_eq!(jobs.len(), 1, "{v:#}");
    let j = &jobs[0];
    assert_eq!(j["repo"], "app", "{v:#}");
    assert_eq!(j["branch"], "main", "{v:#}");
    assert_eq!(j["sha"], slow.as_str(), "{v:#}");
    assert_eq!(j["run"], 1, "{v:#}");
    assert_eq!(j["attempt"], 1, "{v:#}");
    assert_eq!(j["job_id"], job_id.as_str(), "{v:#}");
    assert_eq!(j["phase"], "running", "{v:#}");
    assert_eq!(j["runner"], "r1", "{v:#}");
    assert_eq!(j["cancel_requested"], false, "{v:#}");
    let left = j["lease_left_ms"].as_u64().expect("lease_left_ms");
    let age = j["last_heartbeat_ms"].as_u64().expect("last_heartbeat_ms");
    assert!(left > 0, "{v:#}");
    assert_eq!(left + age, lease_ms, "{v:#}");

    // The runner: its labels, its one slot busy with that job, its heartbeat.
    let runners = v["runners"].as_array().expect("runners is a list");
    assert_eq!(runners.len(), 1, "{v:#}");
    let r = &runners[0];
    assert_eq!(r["id"], "r1", "{v:#}");
    assert_eq!(r["labels"], serde_json::json!(["linux"]), "{v:#}");
    assert_eq!(r["capacity"], 1, "{v:#}");
    assert_eq!(r["busy"], 1, "{v:#}");
    assert_eq!(r["jobs"], serde_json::json!([job_id]), "{v:#}");
    assert_eq!(r["accepting"], true, "{v:#}");
    assert_eq!(r["alive"], true, "{v:#}");
    assert!(r["last_heartbeat_ms"].as_u64().expect("number") < lease_ms);
    assert!(r["host"].as_str().is_some_and(|h| !h.is_empty()), "{v:#}");

    // The streams, by name: both commits unacked, the one job message unacked, no result yet.
    let n = names();
    let (commits, results) = (n.commits_stream(), n.results_stream());
    let stream = |name: &str| v["streams"][name].clone();
    assert_eq!(stream(&commits)["messages"], 2, "{v:#}");
    assert!(stream(&commits)["bytes"].as_u64() > Some(0), "{v:#}");
    assert_eq!(stream(&n.jobs_stream())["messages"], 1, "{v:#}");
    assert_eq!(stream(&results)["messages"], 0, "{v:#}");
    assert!(stream(&n.logs_stream())["messages"].is_u64(), "{v:#}");

    // The text view names the same things.
    let text = status(&url, &["--lease", "60s"]);
    for needle in [
        "Queue: 1 commit(s) waiting".to_string(),
        format!(
            "app  gpu  {}  run 1  no live runner has labels [gpu]",
            &gpu[..8]
        ),
        "Runners: 1".to_string(),
        format!(
            "r1  host {}  labels [linux]  busy 1/1  running {job_id}  heartbeat",
            r["host"].as_str().unwrap_or("")
        ),
        "In flight: 1".to_string(),
        format!(
            "app  main  {}  run 1 attempt 1  on r1  running  lease left",
            &slow[..8]
        ),
        format!("{commits}: 2 messages"),
        format!("{results}: 0 messages"),
    ] {
        assert!(text.contains(&needle), "no {needle:?} in:\n{text}");
    }
}

// ---------------------------------------------------------------------------------------------
// deploy/
// ---------------------------------------------------------------------------------------------

/// The repository's `deploy/` directory.
fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The first executable `name` on PATH.
fn on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Everything a finished command said, for failure messages.
fn said(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The files in `dir` (recursively) whose name ends with `suffix`, sorted.
fn files_ending(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).expect("read deploy dir").flatten() {
            let p = entry.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.to_string_lossy().ends_with(suffix) {
                found.push(p);
            }
        }
    }
    found.sort();
    found
}

/// The installed path a unit names (`/usr/local/bin/NAME`) → the binary this checkout built
/// (jetci's own) or the one on PATH (nats-server), so `systemd-analyze verify` checks the unit
/// and not whether jetci is installed on this machine.
fn real_binary(name: &str) -> PathBuf {
    if name.starts_with("jetci") {
        bin_path(name)
    } else {
        on_path(name).unwrap_or_else(|| panic!("{name} is not on PATH"))
    }
}

/// `text` with every `/usr/local/bin/NAME` in an `Exec…=` line replaced by
/// [`real_binary`]`(NAME)`.
fn with_real_binaries(text: &str) -> String {
    const INSTALLED: &str = "/usr/local/bin/";
    let mut out = String::new();
    for line in text.lines() {
        let mut rest = line;
        if line.starts_with("Exec") {
            while let Some(at) = rest.find(INSTALLED) {
                out.push_str(&rest[..at]);
                let after = &rest[at + INSTALLED.len()..];
                let end = after.find(char::is_whitespace).unwrap_or(after.len());
                out.push_str(&real_binary(&after[..end]).display().to_string());
                rest = &after[end..];
            }
        }
        out.push_str(rest);
        out.push('\n');
    }
    out
}

/// Runs `systemd-analyze verify` on the unit `name` with the content `text`; `Err` with what it
/// said if it fails or warns (it warns, and exits 0, about unknown keys and bad values).
fn verify_unit(analyze: &Path, name: &str, text: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(name);
    std::fs::write(&path, with_real_binaries(text)).expect("write unit");
    let out = Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("cannot run systemd-analyze");
    let said = said(&out);
    if out.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(format!("{} {said}", out.status))
    }
}

/// A unit's `Environment=` defaults: `Environment=K=V` and `Environment="K=V W"`.
fn unit_environment(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("Environment="))
        .filter_map(|v| {
            let v = v.trim().trim_matches('"');
            v.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

/// The unit's `ExecStart=` as a command line, the way systemd expands it with the unit's
/// default environment: `$NAME` splits into words, `${NAME}` is one word, `%i` is `build-1`.
fn exec_start(text: &str) -> Vec<String> {
    let env = unit_environment(text);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("a unit without ExecStart=");
    let mut words = Vec::new();
    for word in line.split_whitespace() {
        let word = word.replace("%i", "build-1");
        if let Some(name) = word.strip_prefix("${").and_then(|w| w.strip_suffix('}')) {
            words.push(env.get(name).cloned().unwrap_or_default());
        } else if let Some(name) = word.strip_prefix('$') {
            let value = env.get(name).cloned().unwrap_or_default();
            words.extend(value.split_whitespace().map(str::to_string));
        } else {
            words.push(word);
        }
    }
    words
}

/// Runs the jetci binary `program` with `args` and `--help`: clap rejects an unknown flag or a
/// bad value before it prints the help, so this checks the arguments without starting anything.
/// Arguments after `--` are RUNNER-ARGS of jetci-manager, checked with jetci-runner.
fn check_flags(program: &str, args: &[String]) -> Result<(), String> {
    let (own, runner_args) = match args.iter().position(|a| a == "--") {
        Some(at) => (&args[..at], Some(&args[at + 1..])),
        None => (args, None),
    };
    let out = Command::new(bin_path(program))
        .args(own)
        .arg("--help")
        .output()
        .expect("cannot run a jetci binary");
    if !out.status.success() {
        return Err(format!("{program} {}: {}", own.join(" "), said(&out)));
    }
    match runner_args {
        Some(rest) => check_flags("jetci-runner", rest),
        None => Ok(()),
    }
}

#[test]
fn systemd_units_pass_systemd_analyze_verify_and_start_binaries_with_real_flags() {
    let Some(analyze) = on_path("systemd-analyze") else {
        return missing_tool("systemd-analyze", "Debian's systemd package");
    };
    let units = files_ending(&deploy_dir().join("systemd"), ".service");
    let names: BTreeSet<String> = units
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    // A unit for every long-running process (jetci itself is a command, not a service).
    for expected in [
        "nats-server.service",
        "jetci-observer.service",
        "jetci-dispatcher.service",
        "jetci-runner@.service",
        "jetci-manager.service",
        "jetci-web.service",
    ] {
        assert!(names.contains(expected), "no {expected} in {names:?}");
    }

    let mut broken = Vec::new();
    for unit in &units {
        let name = unit.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(unit).expect("read unit");
        if let Err(e) = verify_unit(&analyze, &name, &text) {
            broken.push(format!("{name}: systemd-analyze verify: {e}"));
        }
        let command = exec_start(&text);
        let program = command[0].trim_start_matches("/usr/local/bin/");
        if program.starts_with("jetci") {
            if let Err(e) = check_flags(program, &command[1..]) {
                broken.push(format!("{name}: ExecStart: {e}"));
            }
        }
    }
    assert!(broken.is_empty(), "broken units:\n{}", broken.join("\n"));

    // The check itself catches a broken unit: a misspelt key and a bad value.
    let good = std::fs::read_to_string(deploy_dir().join("systemd/jetci-dispatcher.service"))
        .expect("read unit");
    for (from, to) in [
        ("KillMode=", "KilMode="),
        ("Restart=always", "Restart=sometimes"),
    ] {
        let bad = good.replace(from, to);
        assert!(
            verify_unit(&analyze, "jetci-dispatcher.service", &bad).is_err(),
            "systemd-analyze verify passed a unit with {to}"
        );
    }
    assert!(check_flags("jetci-dispatcher", &["--ack-wiat".into(), "3s".into()]).is_err());
}

/// How to run Docker Compose v2 here: `docker compose`, else `docker-compose`.
fn compose_command() -> Option<Vec<String>> {
    let works = |cmd: &[&str]| {
        Command::new(cmd[0])
            .args(&cmd[1..])
            .args(["version", "--short"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if works(&["docker", "compose"]) {
        Some(vec!["docker".into(), "compose".into()])
    } else if works(&["docker-compose"]) {
        Some(vec!["docker-compose".into()])
    } else {
        None
    }
}

/// `COMPOSE -f FILE config ARGS`: the file merged, interpolated and checked against the Compose
/// specification's schema (no Docker daemon needed).
fn compose_config(compose: &[String], file: &Path, args: &[&str]) -> Output {
    Command::new(&compose[0])
        .args(&compose[1..])
        .arg("-f")
        .arg(file)
        .arg("config")
        .args(args)
        .env_remove("COMPOSE_FILE")
        .env_remove("COMPOSE_PROJECT_NAME")
        .output()
        .expect("cannot run docker compose")
}

#[test]
fn compose_file_passes_the_compose_schema_and_runs_real_commands() {
    let Some(compose) = compose_command() else {
        return missing_tool(
            "Docker Compose v2",
            "deploy/install-docker-compose.sh installs it",
        );
    };
    let file = deploy_dir().join("compose.yaml");
    let out = compose_config(&compose, &file, &["--format", "json"]);
    assert!(out.status.success(), "{}: {}", file.display(), said(&out));
    let config: Value = serde_json::from_slice(&out.stdout).expect("compose config JSON");
    let services = config["services"].as_object().expect("services");
    let names: BTreeSet<&str> = services.keys().map(String::as_str).collect();
    for expected in [
        "nats",
        "observer",
        "dispatcher",
        "runner-1",
        "runner-2",
        "web",
    ] {
        assert!(names.contains(expected), "no service {expected}: {names:?}");
    }
    // NATS, without authentication there, is published on the host's loopback only.
    let nats_ports = services["nats"]["ports"].as_array().expect("nats ports");
    assert!(!nats_ports.is_empty(), "{:#}", services["nats"]);
    for port in nats_ports {
        assert_eq!(
            port["host_ip"], "127.0.0.1",
            "NATS published beyond loopback: {port}"
        );
    }
    // Every jetci service runs a binary of this workspace, with flags it has.
    for (name, service) in services {
        let command: Vec<String> = service["command"]
            .as_array()
            .map(|c| {
                c.iter()
                    .filter_map(|w| w.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        if let Some(program) = command.first().filter(|p| p.starts_with("jetci")) {
            check_flags(program, &command[1..]).unwrap_or_else(|e| panic!("service {name}: {e}"));
        }
    }

    // The check itself catches a broken file: a misspelt key in a service.
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("compose.yaml");
    let text = std::fs::read_to_string(&file).expect("read compose.yaml");
    std::fs::write(&bad, text.replacen("    command:", "    comand:", 1)).expect("write");
    let out = compose_config(&compose, &bad, &["-q"]);
    assert!(
        !out.status.success() && said(&out).contains("comand"),
        "docker compose config passed a service with `comand`: {}",
        said(&out)
    );
}

/// `nats-server -t -c FILE`: parses the config and exits, starting nothing.
fn nats_config_check(server: &Path, file: &Path) -> Output {
    Command::new(server)
        .args(["-t", "-c"])
        .arg(file)
        .output()
        .expect("cannot run nats-server")
}

#[test]
fn every_nats_server_config_is_valid() {
    let Some(server) = on_path("nats-server") else {
        return missing_tool("nats-server", "deploy/install-nats-server.sh installs it");
    };
    let configs = files_ending(&deploy_dir(), ".conf");
    // One node, three cluster nodes, per-role auth.
    assert!(configs.len() >= 5, "{configs:?}");
    for file in &configs {
        let out = nats_config_check(&server, file);
        assert!(out.status.success(), "{}: {}", file.display(), said(&out));
    }

    // The check itself catches a broken config: a misspelt field.
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.conf");
    let text = std::fs::read_to_string(deploy_dir().join("nats-server.conf")).expect("read");
    std::fs::write(&bad, text.replace("store_dir", "store_dri")).expect("write");
    let out = nats_config_check(&server, &bad);
    assert!(
        !out.status.success(),
        "nats-server -t passed {}",
        said(&out)
    );
}

/// This host's address on its network (not loopback): the one the kernel picks for a datagram to
/// 192.0.2.1 (TEST-NET-1; `connect` on UDP sends nothing). `None` on a host without a route.
fn non_loopback_address() -> Option<IpAddr> {
    let socket = UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[test]
fn the_shipped_server_config_serves_this_machine_only() {
    // The file as operators run it: only its ports and store directory are changed.
    let conf = std::fs::read_to_string(deploy_dir().join("nats-server.conf")).expect("read");
    let nats = NatsServer::start_as_shipped(&conf);
    let monitoring = nats.monitoring_addr();
    let varz = http_get(&monitoring, "/varz")
        .unwrap_or_else(|e| panic!("no /varz on {monitoring}: {e}"))
        .json();
    // The addresses the server bound, in its own words.
    assert_eq!(varz["host"], "127.0.0.1", "clients' listener: {varz:#}");
    assert_eq!(
        varz["http_host"], "127.0.0.1",
        "monitoring listener: {varz:#}"
    );
    // And from the network's side: this host's own address reaches neither port.
    let http_port: u16 = monitoring
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("port");
    match non_loopback_address() {
        Some(ip) => {
            for port in [nats.port(), http_port] {
                let addr = SocketAddr::new(ip, port);
                let reached = TcpStream::connect_timeout(&addr, Duration::from_secs(5));
                assert!(
                    reached.is_err(),
                    "nats-server answers on {addr}, beyond loopback"
                );
            }
        }
        None => eprintln!("this host has no address but loopback: checked /varz only"),
    }
}
