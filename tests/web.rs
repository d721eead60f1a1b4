//! End-to-end test of jetci-web: the real observer, dispatcher, runner and web process on a real
//! nats-server; assertions over HTTP on the JSON API, the escaping of the pages, the badges, the
//! live events, and the view rebuilt from the stream after a restart.
//!
//! HTTP is spoken by hand (HTTP/1.0 over a `TcpStream`, so the server closes the connection and
//! sends no chunked encoding): the test needs GET only, and this keeps an HTTP client out of the
//! build.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use jetci_e2e::{failing_test, free_port, passing_test, wait_results, GitRepo, NatsServer, Proc};
use serde_json::Value;

/// Generous bound for anything the system does; the test waits on events, never sleeps for one.
const BOUND: Duration = Duration::from_secs(120);

/// A response: status code, headers (lowercased names) and body.
struct Response {
    code: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// `GET path` on 127.0.0.1:port; `Err` when nothing answers.
fn get(port: u16, path: &str) -> Result<Response, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no header end in {text:?}"))?;
    let mut lines = head.lines();
    let code = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Response {
        code,
        headers,
        body: body.to_string(),
    })
}

/// Polls `GET path` until `done` holds for a 200 response, and returns it; panics after BOUND
/// with the last response.
async fn wait_get(port: u16, path: &str, done: impl Fn(&Response) -> bool) -> Response {
    let deadline = Instant::now() + BOUND;
    loop {
        let last = match get(port, path) {
            Ok(r) if r.code == 200 && done(&r) => return r,
            Ok(r) => format!("{} {}", r.code, r.body),
            Err(e) => e,
        };
        assert!(
            Instant::now() < deadline,
            "timed out waiting on GET {path}; last: {last}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn spawn_web(url: &str, port: u16) -> Proc {
    Proc::spawn(
        "jetci-web",
        &["-s", url, "--listen", &format!("127.0.0.1:{port}")],
        &[],
    )
}

/// Percent-encodes a query value.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The parts of `/api/results` that must survive a restart: sequence, commit, status.
fn fingerprint(results: &Value) -> Vec<(u64, String, String, String)> {
    results
        .as_array()
        .expect("array")
        .iter()
        .map(|r| {
            (
                r["seq"].as_u64().expect("seq"),
                r["sha"].as_str().expect("sha").to_string(),
                r["branch"].as_str().expect("branch").to_string(),
                r["status"].as_str().expect("status").to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_web_shows_results_escaped_live_and_after_a_restart() {
    let nats = NatsServer::start();
    let url = nats.url();
    let repo = GitRepo::new();
    let (ok_name, ok_body) = passing_test();
    let first = repo.commit("first", &[(ok_name, ok_body)]);

    let work = tempfile::tempdir().expect("tempdir");
    let path = repo.path().to_str().expect("utf-8 path").to_string();
    let _observer = Proc::spawn(
        "jetci-observer",
        &[
            "-s",
            &url,
            "--poll-interval",
            "200ms",
            "--name",
            "app",
            &path,
        ],
        &[],
    );
    let _dispatcher = Proc::spawn("jetci-dispatcher", &["-s", &url], &[]);
    let runner_dir = work.path().join("r1");
    let _runner = Proc::spawn(
        "jetci-runner",
        &[
            "-s",
            &url,
            "--id",
            "r1",
            "--work-dir",
            runner_dir.to_str().unwrap(),
        ],
        &[],
    );
    let port = free_port();
    let mut web = spawn_web(&url, port);

    // The first commit passes, and the API shows it.
    wait_results(&url, "CI_RESULTS", "ci.results.>", 1, BOUND).await;
    wait_get(port, "/api/results", |r| {
        r.json().as_array().is_some_and(|a| a.len() == 1)
    })
    .await;

    // Follow /events from here on: the next result must be announced.
    let events_port = port;
    let events = std::thread::spawn(move || {
        let mut s = TcpStream::connect(("127.0.0.1", events_port)).expect("connect /events");
        s.set_read_timeout(Some(BOUND)).unwrap();
        write!(s, "GET /events HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut seen = Vec::new();
        for line in BufReader::new(s).lines() {
            let Ok(line) = line else { break };
            if line.starts_with("data:") && line.contains(r#""kind":"result""#) {
                seen.push(line);
                return seen;
            }
        }
        seen
    });
    // Give the event stream a moment to be subscribed before the result can arrive; a missed
    // event would fail the test, not hang it.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A failing commit whose summary is a script, then a branch whose name is one.
    let (bad_name, bad_body) = failing_test();
    let evil = "<script>alert(1)</script>";
    let failing = repo.commit(evil, &[(bad_name, bad_body)]);
    let branch = "feat/<script>alert(1)</script>";
    repo.checkout_new_branch(branch);
    let fixed = repo.commit("fix <b>it</b>", &[(bad_name, ok_body)]);

    let all = wait_results(&url, "CI_RESULTS", "ci.results.>", 3, BOUND).await;
    let announced = events.join().expect("events thread");
    assert!(!announced.is_empty(), "no result announced on /events");

    let results = wait_get(port, "/api/results", |r| {
        r.json().as_array().is_some_and(|a| a.len() == 3)
    })
    .await
    .json();
    let by_sha = |sha: &str| {
        results
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["sha"] == sha)
            .unwrap_or_else(|| panic!("no result for {sha} in {results:#}; stream: {all:#?}"))
            .clone()
    };
    assert_eq!(by_sha(&first)["status"], "passed");
    assert_eq!(by_sha(&failing)["status"], "failed");
    assert_eq!(by_sha(&failing)["summary"], evil);
    assert_eq!(by_sha(&fixed)["status"], "passed");
    assert_eq!(by_sha(&fixed)["branch"], branch);

    // Filters.
    let main_only = get(port, "/api/results?repo=app&branch=main&limit=10")
        .unwrap()
        .json();
    assert_eq!(main_only.as_array().unwrap().len(), 2, "{main_only:#}");
    let limited = get(port, "/api/results?limit=1").unwrap().json();
    assert_eq!(limited.as_array().unwrap().len(), 1);
    let on_branch = get(port, &format!("/api/results?branch={}", enc(branch)))
        .unwrap()
        .json();
    assert_eq!(on_branch[0]["sha"], fixed.as_str(), "{on_branch:#}");

    // Repositories: main's newest commit failed, the branch passed.
    let repos = get(port, "/api/repos").unwrap().json();
    let branches = repos[0]["branches"].as_array().expect("branches").clone();
    assert_eq!(repos[0]["repo"], "app", "{repos:#}");
    let status_of = |b: &str| {
        branches
            .iter()
            .find(|x| x["branch"] == b)
            .unwrap_or_else(|| panic!("no branch {b} in {repos:#}"))["status"]
            .clone()
    };
    assert_eq!(status_of("main"), "failed");
    assert_eq!(status_of(branch), "passed");

    // The commit as JSON, and an unknown one.
    let commit = get(port, &format!("/api/commit/app/{failing}")).unwrap();
    assert_eq!(commit.code, 200);
    assert_eq!(commit.json()["results"][0]["status"], "failed");
    assert_eq!(
        get(port, &format!("/api/commit/app/{}", "0".repeat(40)))
            .unwrap()
            .code,
        404
    );
    assert_eq!(get(port, "/api/commit/app/HEAD").unwrap().code, 400);

    // Pages escape everything from the repository and never contain it raw.
    let pages = [
        "/".to_string(),
        "/repo/app".to_string(),
        format!("/repo/app?branch={}", enc(branch)),
        format!("/repo/app/commit/{failing}"),
        format!("/repo/app/commit/{fixed}"),
        "/runners".to_string(),
    ];
    for p in &pages {
        let r = get(port, p).unwrap();
        assert_eq!(r.code, 200, "GET {p}: {}", r.body);
        assert!(
            r.header("content-type")
                .is_some_and(|c| c.starts_with("text/html")),
            "GET {p}"
        );
        assert!(
            r.header("content-security-policy")
                .is_some_and(|c| c.contains("script-src 'self'")),
            "GET {p}"
        );
        assert!(
            !r.body.contains("<script>alert"),
            "GET {p} holds a raw script:\n{}",
            r.body
        );
        assert!(!r.body.contains("<b>it"), "GET {p}:\n{}", r.body);
        if p != "/runners" {
            assert!(
                r.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
                "GET {p} shows the summary or branch escaped:\n{}",
                r.body
            );
        }
    }
    // The failing commit's page has the output and the full log from CI_LOGS.
    let page = get(port, &format!("/repo/app/commit/{failing}"))
        .unwrap()
        .body;
    assert!(page.contains("FAILED"), "{page}");
    assert!(page.contains("test_fails"), "{page}");
    let raw = get(port, &format!("/log/app/{failing}/1/1")).unwrap();
    assert_eq!(raw.code, 200);
    assert!(raw.body.contains("FAILED"), "{}", raw.body);
    // The runners page shows the runner.
    let runners = wait_get(port, "/api/runners", |r| {
        r.json()
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["id"] == "r1"))
    })
    .await
    .json();
    assert!(runners[0]["heartbeat_age_ms"].is_u64(), "{runners:#}");
    assert!(get(port, "/runners").unwrap().body.contains("r1"));
    assert!(get(port, "/api/queue").unwrap().json().is_array());

    // Badges.
    let badge = get(port, "/badge/app.svg").unwrap();
    assert_eq!(badge.code, 200);
    assert!(badge
        .header("content-type")
        .is_some_and(|c| c.starts_with("image/svg+xml")));
    assert!(
        badge.body.starts_with("<svg") && badge.body.contains("failing"),
        "{}",
        badge.body
    );
    let badge = get(port, &format!("/badge/app.svg?branch={}", enc(branch))).unwrap();
    assert!(badge.body.contains("passing"), "{}", badge.body);
    assert!(!badge.body.contains("<script>"), "{}", badge.body);
    let badge = get(port, "/badge/app/main.svg").unwrap();
    assert!(badge.body.contains("failing"), "{}", badge.body);
    let badge = get(
        port,
        &format!(
            "/badge/app/{}.svg",
            branch.replace('<', "%3C").replace('>', "%3E")
        ),
    )
    .unwrap();
    assert!(badge.body.contains("passing"), "{}", badge.body);
    let badge = get(port, "/badge/nope.svg").unwrap();
    assert!(badge.body.contains("unknown"), "{}", badge.body);

    // A restarted jetci-web shows the same view, rebuilt from the stream.
    let before = fingerprint(&get(port, "/api/results").unwrap().json());
    let repos_before = get(port, "/api/repos").unwrap().json();
    web.kill();
    let port2 = free_port();
    let web2 = spawn_web(&url, port2);
    wait_get(port2, "/healthz", |r| r.json()["caught_up"] == true).await;
    let after = fingerprint(&get(port2, "/api/results").unwrap().json());
    assert_eq!(before, after);
    assert_eq!(repos_before, get(port2, "/api/repos").unwrap().json());
    drop(web2);
}

/// Reads `GET path` as server-sent events until a `data:` line contains `needle`; the lines
/// read. Runs on its own thread (blocking reads), bounded by BOUND.
fn sse_until(
    port: u16,
    path: String,
    needle: &'static str,
) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(BOUND)).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut seen = Vec::new();
        for line in BufReader::new(s).lines() {
            let Ok(line) = line else { break };
            let found = line.starts_with("data:") && line.contains(needle);
            seen.push(line);
            if found {
                break;
            }
        }
        seen
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn the_web_skips_bad_messages_survives_a_nats_restart_and_streams_live_logs() {
    let mut nats = NatsServer::start();
    let url = nats.url();
    let repo = GitRepo::new();
    let (ok_name, ok_body) = passing_test();
    repo.commit("first", &[(ok_name, ok_body)]);

    let work = tempfile::tempdir().expect("tempdir");
    let path = repo.path().to_str().expect("utf-8 path").to_string();
    let _observer = Proc::spawn(
        "jetci-observer",
        &[
            "-s",
            &url,
            "--poll-interval",
            "200ms",
            "--name",
            "app",
            &path,
        ],
        &[],
    );
    let _dispatcher = Proc::spawn("jetci-dispatcher", &["-s", &url], &[]);
    let runner_dir = work.path().join("r1");
    let _runner = Proc::spawn(
        "jetci-runner",
        &[
            "-s",
            &url,
            "--id",
            "r1",
            "--work-dir",
            runner_dir.to_str().unwrap(),
        ],
        &[],
    );
    let port = free_port();
    let web = spawn_web(&url, port);
    wait_results(&url, "CI_RESULTS", "ci.results.>", 1, BOUND).await;

    // A message that is not a result is logged and skipped, and the view goes on.
    let js = jetci_e2e::js(&url).await;
    js.publish(
        format!("ci.results.app.{}.1", "0".repeat(40)),
        "not json".into(),
    )
    .await
    .expect("publish")
    .await
    .expect("ack");
    wait_get(port, "/healthz", |r| r.json()["skipped"] == 1).await;
    wait_get(port, "/api/results", |r| {
        r.json().as_array().is_some_and(|a| a.len() == 1)
    })
    .await;

    // NATS restarts; the next result still reaches the view.
    nats.restart();
    let second = repo.commit("second", &[("b.txt", "b")]);
    wait_get(port, "/api/results", |r| {
        r.json()
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["sha"] == second.as_str()))
    })
    .await;

    // A slow job's output streams live to its commit page's log events.
    let slow = repo.commit(
        "slow",
        &[(
            ".jetci.toml",
            "command = \"echo hello-live; sleep 3; echo done\"\n",
        )],
    );
    let log = sse_until(port, format!("/events/log/app/{slow}/1/1"), "hello-live");
    let lines = log.join().expect("log thread");
    assert!(
        lines.iter().any(|l| l.starts_with("id:")),
        "log events carry their sequence: {lines:?}"
    );
    assert!(
        lines.last().is_some_and(|l| l.contains("hello-live")),
        "{lines:?}\n{}",
        web.log()
    );
    wait_get(port, &format!("/api/commit/app/{slow}"), |r| {
        r.json()["results"][0]["status"] == "passed"
    })
    .await;
    assert!(
        web.log().contains("skipped a result that does not decode"),
        "{}",
        web.log()
    );
}
