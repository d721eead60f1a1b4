//! Jobs in a sandbox (issue 16), tried as an attacker would: each test runs the real runner in
//! its default mode (`--sandbox auto`, bwrap here) and a job that attacks it, and checks that the
//! attack did nothing. Every test first makes sure the runner did start its sandbox (its log
//! says so): `kill -9 -1` outside one would kill every process of the machine's user.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use async_nats::jetstream::kv;
use jetci::messages::{self, RunnerInfo};
use serde_json::Value;

use crate::support::git::GitRepo;
use crate::support::jetstream::{js, names, stream_raw_messages, wait_job_phase, wait_results};
use crate::support::nats::NatsServer;
use crate::support::processes::{bin_path, Proc};
use crate::support::system::{app_job, spawn_runner_with_env, System};
use crate::support::waiting::{wait_until, wait_until_async, BOUND};

/// What the runner logs when its jobs run in bwrap.
const SANDBOXED: &str = "jobs run in a bwrap sandbox";

fn toml(command: &str, extra: &str) -> String {
    format!("command = {command:?}\n{extra}")
}

/// Waits until `runner` says its jobs run in a sandbox; panics if it fell back to none.
fn sandboxed(runner: &Proc) {
    wait_until("the runner to start its sandbox", BOUND, || {
        let log = runner.log();
        assert!(
            !log.contains("without a sandbox"),
            "the runner runs jobs without a sandbox here; these tests need bwrap \
             (Debian's bubblewrap) and user namespaces:\n{log}"
        );
        log.contains(SANDBOXED).then_some(()).ok_or("not yet")
    });
}

/// Everything the job printed, from CI_LOGS.
async fn job_output(url: &str, sha: &str) -> String {
    let logs = stream_raw_messages(
        url,
        &names().logs_stream(),
        &names().logs_subject(&app_job(sha), 1),
    )
    .await;
    logs.iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect()
}

/// The sizes of the files in `dir`, by name.
fn sizes(dir: &Path) -> Vec<(String, u64)> {
    let mut all: Vec<(String, u64)> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| {
                    let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                    (e.file_name().to_string_lossy().into_owned(), len)
                })
                .collect()
        })
        .unwrap_or_default();
    all.sort();
    all
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_cannot_read_the_runners_credentials() {
    let password = "pw-7c1e9a0b5d";
    let conf = format!(
        "jetstream {{\n  store_dir: \"x\"\n}}\nauthorization {{\n  users = [ {{ user: \"ci\", \
         password: \"{password}\" }} ]\n}}\n"
    );
    let nats = NatsServer::start_with_config(&conf, "ci", password);
    let url = nats.url();
    let repo = GitRepo::new();
    // The runner's parent (on the host), every process the job can see, and the files a runner
    // host keeps its settings in.
    let sha = repo.commit(
        "snoops",
        &[(
            ".jetci.toml",
            &toml(
                "tr '\\0' '\\n' < /proc/$PPID/environ; tr '\\0' ' ' < /proc/$PPID/cmdline; \
                 for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; tr '\\0' '\\n' < $p/environ; done; \
                 cat /etc/jetci/env; echo snooped",
                "",
            ),
        )],
    );
    let login = ["--user", "ci", "--password", password];
    let work = tempfile::tempdir().unwrap();
    let runner = spawn_runner_with_env(
        &url,
        "r0",
        work.path(),
        &login,
        &[
            ("NATS_USER", "ci"),
            ("NATS_PASSWORD", password),
            ("JETCI_SECRET_SETTING", "env-secret-5f3a"),
        ],
    );
    sandboxed(&runner);
    let observer = crate::support::system::spawn_observer(&url, &repo, &login);
    let dispatcher = crate::support::system::spawn_dispatcher(&url, &login);
    let admin = async_nats::ConnectOptions::new()
        .user_and_password("ci".into(), password.into())
        .connect(url.as_str())
        .await
        .unwrap();
    // The results, read as the one user of this server.
    let result = wait_until_async("the job's result", BOUND, async || {
        let js = async_nats::jetstream::new(admin.clone());
        let stream = js
            .get_stream(names().results_stream())
            .await
            .map_err(|e| e.to_string())?;
        let m = stream
            .get_last_raw_message_by_subject(&names().results_subject("app", &sha, 1))
            .await
            .map_err(|e| e.to_string())?;
        serde_json::from_slice::<Value>(&m.payload).map_err(|e| e.to_string())
    })
    .await;
    assert_eq!(result["status"], "passed", "{result:#}");
    let logs = admin_logs(&admin, &sha).await;
    assert!(logs.contains("snooped"), "{logs}");
    assert!(
        !logs.contains(password),
        "the job saw the password:\n{logs}"
    );
    assert!(
        !logs.contains("env-secret-5f3a"),
        "the job saw the runner's environment:\n{logs}"
    );
    drop((observer, dispatcher, runner));
}

/// The job's log, read as `admin`.
async fn admin_logs(admin: &async_nats::Client, sha: &str) -> String {
    let js = async_nats::jetstream::new(admin.clone());
    let stream = js.get_stream(names().logs_stream()).await.unwrap();
    let mut out = String::new();
    let mut seq = 1;
    while let Ok(m) = stream.get_raw_message(seq).await {
        if m.subject.as_str() == names().logs_subject(&app_job(sha), 1) {
            out.push_str(&String::from_utf8_lossy(&m.payload));
        }
        seq += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_cannot_reach_the_runners_work_dir() {
    let nats = NatsServer::start();
    let repo = GitRepo::new();
    let mut sys = System::start(&nats, &repo, &[]);
    let runner = sys.add_runner("r0", &[], &[]);
    sandboxed(runner);
    let work = sys.work.path().join("r0");
    let w = work.display();
    // Kept results, mirrors and other workspaces, by the absolute path and from HOME; a forged
    // result where the runner would publish it at its next start.
    let sha = repo.commit(
        "trespasses",
        &[(
            ".jetci.toml",
            &toml(
                &format!(
                    "for d in {w}/pending {w}/mirrors \"$HOME/../../../pending\" \
                     \"$HOME/../../../mirrors\"; do ls -d \"$d\" && echo VISIBLE; done; \
                     ls {w}/jobs; echo '{{}}' > {w}/pending/app.0.99.1.json; \
                     echo '{{}}' > \"$HOME/../../../pending/app.1.99.1.json\"; echo tried"
                ),
                "",
            ),
        )],
    );
    let r = &wait_results(&sys.url, 1, BOUND).await[0];
    let out = job_output(&sys.url, &sha).await;
    assert!(out.contains("tried"), "{r:#}\n{out}");
    assert!(!out.contains("VISIBLE"), "the job saw the work dir:\n{out}");
    // Of the runner's workspaces it sees only its own.
    let attempt = app_job(&sha).attempt_id(1);
    let listed: Vec<&str> = out
        .lines()
        .filter(|l| !l.contains(' ') && !l.is_empty() && *l != "tried")
        .collect();
    assert_eq!(listed, vec![attempt.as_str()], "{out}");
    let pending: Vec<_> = std::fs::read_dir(work.join("pending"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(pending.is_empty(), "the job left {pending:?} in pending/");
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_the_runner_from_a_job_kills_nothing_and_the_next_job_passes() {
    let nats = NatsServer::start();
    let repo = GitRepo::new();
    let mut sys = System::start(&nats, &repo, &[]);
    sandboxed(sys.add_runner("r0", &[], &[]));
    repo.commit(
        "kills",
        &[(
            ".jetci.toml",
            &toml("kill -9 $PPID; kill -9 -1; sleep 1; echo alive", ""),
        )],
    );
    let first = &wait_results(&sys.url, 1, BOUND).await[0];
    assert!(
        sys.runners[0].is_running(),
        "the job killed its runner: {first:#}"
    );
    repo.commit("next", &[(".jetci.toml", &toml("echo next", ""))]);
    let all = wait_results(&sys.url, 2, BOUND).await;
    assert_eq!(all[1]["status"], "passed", "{:#}", all[1]);
    assert_eq!(all[1]["runner"], "r0", "{:#}", all[1]);
    assert!(sys.runners[0].is_running(), "{}", sys.runners[0].log());
}

/// A command that leaves two processes writing to `$JETCI_CACHE_DIR` every 0.2 s: a loop that
/// left the job's group and environment (`env -i setsid`), and a double-forked daemon.
const ESCAPES: &str = "env -i setsid sh -c 'while :; do date >> $0/loop; sleep 0.2; done' \
     \"$JETCI_CACHE_DIR\" < /dev/null > /dev/null 2>&1 & \
     (setsid sh -c 'while :; do date >> \"$JETCI_CACHE_DIR/daemon\"; sleep 0.2; done' \
     < /dev/null > /dev/null 2>&1 &) ; \
     while [ ! -s \"$JETCI_CACHE_DIR/loop\" ] || [ ! -s \"$JETCI_CACHE_DIR/daemon\" ]; \
     do sleep 0.1; done; echo escaped; sleep 600";

/// Waits until the files in `cache` stop growing: their sizes one second after `since` are
/// their sizes two seconds later. Both files must exist (the escapes did start).
async fn stopped_growing(cache: &Path) {
    let first = sizes(cache);
    assert_eq!(
        first.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["daemon", "loop"],
        "the escapes did not start"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let settled = sizes(cache);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        sizes(cache),
        settled,
        "a process of the job still writes after its result"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_a_job_started_outlives_its_timeout() {
    let nats = NatsServer::start();
    let repo = GitRepo::new();
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().to_str().unwrap();
    let mut sys = System::start(&nats, &repo, &[]);
    sandboxed(sys.add_runner("r0", &["--cache-dir", cache_dir], &[]));
    repo.commit(
        "escapes",
        &[(".jetci.toml", &toml(ESCAPES, "timeout = \"3s\"\n"))],
    );
    let r = &wait_results(&sys.url, 1, BOUND).await[0];
    assert_eq!(r["status"], "timed_out", "{r:#}");
    assert!(
        r["output_tail"].as_str().unwrap().contains("escaped"),
        "{r:#}"
    );
    stopped_growing(cache.path()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_a_job_started_outlives_its_cancel() {
    let nats = NatsServer::start();
    let repo = GitRepo::new();
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().to_str().unwrap();
    let mut sys = System::start(&nats, &repo, &[]);
    sandboxed(sys.add_runner("r0", &["--cache-dir", cache_dir], &[]));
    let sha = repo.commit("escapes", &[(".jetci.toml", &toml(ESCAPES, ""))]);
    wait_job_phase(&sys.url, &app_job(&sha).key(), "running", BOUND).await;
    wait_until("the escapes to start", BOUND, || {
        (sizes(cache.path()).len() == 2)
            .then_some(())
            .ok_or("not yet")
    });
    let out = Command::new(bin_path("jetci"))
        .args(["-s", &sys.url, "cancel", "app", &sha])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = &wait_results(&sys.url, 1, BOUND).await[0];
    assert_eq!(r["status"], "cancelled", "{r:#}");
    stopped_growing(cache.path()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_runner_without_a_sandbox_says_so_in_its_log_and_presence() {
    let nats = NatsServer::start();
    let repo = GitRepo::new();
    let mut sys = System::start(&nats, &repo, &[]);
    let runner = sys.add_runner("r0", &["--sandbox", "none"], &[]);
    runner.wait_for_log_async("WARN", BOUND).await;
    assert!(
        runner.log().contains("without a sandbox (--sandbox none)"),
        "{}",
        runner.log()
    );
    // The warning is logged before the runner sets up its bucket: wait for both.
    let context = js(&sys.url).await;
    let info: RunnerInfo = wait_until_async("the runner's presence", BOUND, async || {
        let bucket = context
            .get_key_value(names().runners_bucket())
            .await
            .map_err(|e| e.to_string())?;
        match bucket.entry("r0").await {
            Ok(Some(e)) if e.operation == kv::Operation::Put => {
                messages::decode::<RunnerInfo>(&e.value).map_err(|e| e.to_string())
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(info.warnings.len(), 1, "{info:?}");
    assert!(info.warnings[0].contains("without a sandbox"), "{info:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_past_its_bound_of_processes_is_an_error_that_says_so() {
    let nats = NatsServer::start();
    let repo = GitRepo::new();
    let mut sys = System::start(&nats, &repo, &[]);
    sandboxed(sys.add_runner("r0", &["--max-procs", "32"], &[]));
    repo.commit(
        "forks",
        &[(
            ".jetci.toml",
            &toml("for i in $(seq 200); do sleep 60 & done; wait", ""),
        )],
    );
    let r = &wait_results(&sys.url, 1, BOUND).await[0];
    assert_eq!(r["status"], "error", "{r:#}");
    assert!(
        r["reason"]
            .as_str()
            .unwrap()
            .contains("bound of 32 processes"),
        "{r:#}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn network_off_leaves_a_job_loopback_only_and_ro_bind_shows_a_dir() {
    let nats = NatsServer::start();
    let repo = GitRepo::new();
    let tool = tempfile::tempdir().unwrap();
    std::fs::write(tool.path().join("tool.txt"), "from the operator\n").unwrap();
    let bind = format!("{}:/jetci-tool", tool.path().display());
    let port = sys_port(&nats.url());
    let mut sys = System::start(&nats, &repo, &[]);
    sandboxed(sys.add_runner("r0", &["--ro-bind", &bind], &[]));
    // The NATS server listens on the host's loopback: out of reach in a network namespace.
    let probe = format!(
        "python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", {port}), 2)' \
         && echo REACHED; cat /jetci-tool/tool.txt; touch /jetci-tool/x || echo read-only"
    );
    let sha = repo.commit(
        "offline",
        &[(".jetci.toml", &toml(&probe, "network = false\n"))],
    );
    let r = &wait_results(&sys.url, 1, BOUND).await[0];
    let out = job_output(&sys.url, &sha).await;
    assert!(!out.contains("REACHED"), "{r:#}\n{out}");
    assert!(out.contains("from the operator"), "{out}");
    assert!(out.contains("read-only"), "{out}");
    // Without `network = false` the same job reaches the server.
    repo.commit("online", &[(".jetci.toml", &toml(&probe, ""))]);
    let all = wait_results(&sys.url, 2, BOUND).await;
    assert!(
        all[1]["output_tail"].as_str().unwrap().contains("REACHED"),
        "{:#}",
        all[1]
    );
}

/// The port of a `nats://127.0.0.1:PORT` URL.
fn sys_port(url: &str) -> u16 {
    url.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn a_runner_whose_sandbox_cannot_be_set_up_does_not_start() {
    let nats = NatsServer::start();
    let work = tempfile::tempdir().unwrap();
    // /usr is read-only in a job's sandbox: a directory cannot be mounted on a path it lacks.
    let mut runner = crate::support::system::spawn_runner(
        &nats.url(),
        "r0",
        work.path(),
        &["--ro-bind", "/usr/share:/usr/jetci-no-such-dir"],
    );
    let status = runner.wait_exit(BOUND);
    assert!(!status.success(), "{}", runner.log());
    assert!(
        runner
            .log()
            .contains("error: a job's sandbox cannot be set up"),
        "{}",
        runner.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn junit_globs_end_promptly_over_symlink_loops() {
    let nats = NatsServer::start();
    let repo = GitRepo::new();
    let mut sys = System::start(&nats, &repo, &[]);
    sandboxed(sys.add_runner("r0", &[], &[]));
    // Directories that link to their parent and to the checkout: a walk that follows them
    // never ends (it used to, after the job, while the runner heartbeated on).
    let loops = "d=.; for i in 1 2 3 4 5 6; do d=$d/d$i; mkdir $d; ln -s .. $d/up; \
                 ln -s \"$PWD\" $d/root; done; mkdir out; \
                 printf '<testsuite><testcase name=\"a\"/><testcase name=\"b\"><failure/>\
                 </testcase></testsuite>' > out/r.xml";
    repo.commit(
        "loops",
        &[(".jetci.toml", &toml(loops, "junit = [\"**/*.xml\"]\n"))],
    );
    let r = &wait_results(&sys.url, 1, BOUND).await[0];
    assert_eq!(r["status"], "passed", "{r:#}");
    assert_eq!(r["tests"]["tests"], 2, "{r:#}");
    assert_eq!(r["tests"]["failed"], 1, "{r:#}");
}

#[test]
fn a_ro_bind_that_would_show_the_work_dir_or_a_secret_is_refused_at_start() {
    let nats = NatsServer::start();
    let work = tempfile::tempdir().unwrap();
    let logins = work.path().join("keys");
    std::fs::create_dir(&logins).unwrap();
    let file = logins.join("git-credentials");
    std::fs::write(&file, "https://ci:t0ken@git.example\n").unwrap();
    let parent = format!("{}:/host", work.path().display());
    let keys = format!("{}:/keys", logins.display());
    for (id, extra, why) in [
        (
            "r0",
            vec!["--ro-bind", &parent],
            "would show jobs the runner's work dir",
        ),
        (
            "r1",
            vec![
                "--git-credentials",
                file.to_str().unwrap(),
                "--ro-bind",
                &keys,
            ],
            "would show jobs the runner's secret",
        ),
    ] {
        let mut runner = crate::support::system::spawn_runner(&nats.url(), id, work.path(), &extra);
        let status = runner.wait_exit(BOUND);
        assert!(!status.success(), "{}", runner.log());
        let log = runner.log();
        let line = log
            .lines()
            .find(|l| l.contains("error:"))
            .unwrap_or_default();
        assert!(line.contains(why), "{log}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn network_off_is_never_given_up_for_want_of_a_sandbox() {
    let nats = NatsServer::start();
    let repo = GitRepo::new();
    let mut sys = System::start(&nats, &repo, &[]);
    // A runner cannot take the network away without a sandbox: it does not start.
    let mut refused = crate::support::system::spawn_runner(
        &sys.url,
        "r1",
        sys.work.path(),
        &["--sandbox", "none", "--network", "off"],
    );
    assert!(!refused.wait_exit(BOUND).success(), "{}", refused.log());
    assert!(
        refused
            .log()
            .contains("error: --network off needs a sandbox"),
        "{}",
        refused.log()
    );
    // A repository's `network = false` job on a runner without one ends in error, unrun.
    sys.add_runner("r0", &["--sandbox", "none"], &[]);
    repo.commit(
        "offline",
        &[(".jetci.toml", &toml("echo RAN", "network = false\n"))],
    );
    let r = &wait_results(&sys.url, 1, BOUND).await[0];
    assert_eq!(r["status"], "error", "{r:#}");
    assert!(
        r["reason"].as_str().unwrap().contains("network = false"),
        "{r:#}"
    );
    assert!(!r["output_tail"].as_str().unwrap().contains("RAN"), "{r:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_jobs_dev_is_read_only_and_its_dev_shm_bounded() {
    let nats = NatsServer::start();
    let repo = GitRepo::new();
    let mut sys = System::start(&nats, &repo, &[]);
    sandboxed(sys.add_runner("r0", &[], &[]));
    let sha = repo.commit(
        "fills /dev",
        &[(
            ".jetci.toml",
            &toml(
                "dd if=/dev/zero of=/dev/shm/f bs=1M count=100 2>/dev/null || echo SHM-BOUNDED; \
                 rm -f /dev/shm/f; touch /dev/x 2>/dev/null || echo DEV-READ-ONLY; \
                 echo x > /dev/null && echo NULL-WRITABLE",
                "",
            ),
        )],
    );
    let r = &wait_results(&sys.url, 1, BOUND).await[0];
    let out = job_output(&sys.url, &sha).await;
    for said in ["SHM-BOUNDED", "DEV-READ-ONLY", "NULL-WRITABLE"] {
        assert!(out.contains(said), "{said} missing: {r:#}\n{out}");
    }
}

/// A fork loop is stopped at its bound, not some time after it: a root runner used to count the
/// job's processes every 100 ms, and a fork bomb reached thousands meanwhile. Where the runner
/// can make a pids cgroup (here) the kernel refuses the forks past the bound.
#[tokio::test(flavor = "multi_thread")]
async fn a_fork_loop_never_gets_past_its_bound_of_processes() {
    let nats = NatsServer::start();
    let repo = GitRepo::new();
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().to_str().unwrap();
    let mut sys = System::start(&nats, &repo, &[]);
    sandboxed(sys.add_runner("r0", &["--max-procs", "100", "--cache-dir", cache_dir], &[]));
    // Each started `sleep` is counted in the cache dir, which outlives the job.
    repo.commit(
        "forks",
        &[(
            ".jetci.toml",
            &toml(
                "i=0; while [ $i -lt 600 ]; do sleep 30 & i=$((i+1)); \
                 echo $i >> \"$JETCI_CACHE_DIR/started\"; done; wait",
                "",
            ),
        )],
    );
    let r = &wait_results(&sys.url, 1, BOUND).await[0];
    assert_eq!(r["status"], "error", "{r:#}");
    assert!(
        r["reason"]
            .as_str()
            .unwrap()
            .contains("bound of 100 processes"),
        "{r:#}"
    );
    let started = std::fs::read_to_string(cache.path().join("started"))
        .unwrap()
        .lines()
        .filter(|l| !l.is_empty())
        .count();
    assert!(started < 100, "{started} processes started: {r:#}");
}
