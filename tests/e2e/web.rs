//! End-to-end test of jetci-web: the real observer, dispatcher, runner and web process on a real
//! nats-server; assertions over HTTP on the JSON API, the escaping of the pages, the badges, the
//! live events, and the view rebuilt from the stream after a restart.
//!
//! HTTP is spoken by hand ([`crate::support::http`]); the live events are read line by line
//! here.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::Value;

use crate::support::git::{failing_test, passing_test, GitRepo};
use crate::support::http::{http_get, wait_http, Response};
use crate::support::jetstream::{js, names, wait_results};
use crate::support::nats::{free_addr, NatsServer};
use crate::support::system::{spawn_web, System, REPO};
use crate::support::waiting::{wait_until, BOUND};

/// `GET path` on `addr`; panics when nothing answers.
fn get(addr: &str, path: &str) -> Response {
    http_get(addr, path).unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// Waits until `GET path` is a 200 for which `done` holds; see [`wait_http`].
fn wait_get(addr: &str, path: &str, done: impl Fn(&Response) -> bool) -> Response {
    wait_http(addr, path, BOUND, done)
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

/// Reads `GET path` as server-sent events until a `data:` line contains `needle`; the lines
/// read. Runs on its own thread (blocking reads), bounded by BOUND.
fn sse_until(addr: &str, path: &str, needle: &'static str) -> std::thread::JoinHandle<Vec<String>> {
    let (addr, path) = (addr.to_string(), path.to_string());
    std::thread::spawn(move || {
        let mut s = TcpStream::connect(&addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        s.set_read_timeout(Some(BOUND)).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
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
async fn the_web_shows_results_escaped_live_and_after_a_restart() {
    let nats = NatsServer::start();
    let url = nats.url();
    let repo = GitRepo::new();
    let (ok_name, ok_body) = passing_test();
    let first = repo.commit("first", &[(ok_name, ok_body)]);

    let _sys = System::start(&nats, &repo, &["r1"]);
    let addr = free_addr();
    let mut web = spawn_web(&url, &addr, &[]);

    // The first commit passes, and the API shows it.
    wait_results(&url, 1, BOUND).await;
    wait_get(&addr, "/api/results", |r| {
        r.json().as_array().is_some_and(|a| a.len() == 1)
    });

    // Follow /events from here on: the next result must be announced.
    let announcement = r#""kind":"result""#;
    let events = sse_until(&addr, "/events", announcement);
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

    let all = wait_results(&url, 3, BOUND).await;
    let announced = events.join().expect("events thread");
    assert!(
        announced
            .last()
            .is_some_and(|l| l.starts_with("data:") && l.contains(announcement)),
        "no result announced on /events: {announced:?}"
    );

    let results = wait_get(&addr, "/api/results", |r| {
        r.json().as_array().is_some_and(|a| a.len() == 3)
    })
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
    let main_only = get(&addr, "/api/results?repo=app&branch=main&limit=10").json();
    assert_eq!(main_only.as_array().unwrap().len(), 2, "{main_only:#}");
    let limited = get(&addr, "/api/results?limit=1").json();
    assert_eq!(limited.as_array().unwrap().len(), 1);
    let on_branch = get(&addr, &format!("/api/results?branch={}", enc(branch))).json();
    assert_eq!(on_branch[0]["sha"], fixed.as_str(), "{on_branch:#}");

    // Repositories: main's newest commit failed, the branch passed.
    let repos = get(&addr, "/api/repos").json();
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
    let commit = get(&addr, &format!("/api/commit/app/{failing}"));
    assert_eq!(commit.status, 200);
    assert_eq!(commit.json()["results"][0]["status"], "failed");
    assert_eq!(
        get(&addr, &format!("/api/commit/app/{}", "0".repeat(40))).status,
        404
    );
    assert_eq!(get(&addr, "/api/commit/app/HEAD").status, 400);

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
        let r = get(&addr, p);
        assert_eq!(r.status, 200, "GET {p}: {}", r.body);
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
    let page = get(&addr, &format!("/repo/app/commit/{failing}")).body;
    assert!(page.contains("FAILED"), "{page}");
    assert!(page.contains("test_fails"), "{page}");
    let raw = get(&addr, &format!("/log/app/{failing}/1/1"));
    assert_eq!(raw.status, 200);
    assert!(raw.body.contains("FAILED"), "{}", raw.body);
    // The runners page shows the runner.
    let runners = wait_get(&addr, "/api/runners", |r| {
        r.json()
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["id"] == "r1"))
    })
    .json();
    assert!(runners[0]["heartbeat_age_ms"].is_u64(), "{runners:#}");
    assert!(get(&addr, "/runners").body.contains("r1"));
    assert!(get(&addr, "/api/queue").json().is_array());

    // Badges.
    let badge = get(&addr, "/badge/app.svg");
    assert_eq!(badge.status, 200);
    assert!(badge
        .header("content-type")
        .is_some_and(|c| c.starts_with("image/svg+xml")));
    assert!(
        badge.body.starts_with("<svg") && badge.body.contains("failing"),
        "{}",
        badge.body
    );
    let badge = get(&addr, &format!("/badge/app.svg?branch={}", enc(branch)));
    assert!(badge.body.contains("passing"), "{}", badge.body);
    assert!(!badge.body.contains("<script>"), "{}", badge.body);
    let badge = get(&addr, "/badge/app/main.svg");
    assert!(badge.body.contains("failing"), "{}", badge.body);
    let badge = get(
        &addr,
        &format!(
            "/badge/app/{}.svg",
            branch.replace('<', "%3C").replace('>', "%3E")
        ),
    );
    assert!(badge.body.contains("passing"), "{}", badge.body);
    let badge = get(&addr, "/badge/nope.svg");
    assert!(badge.body.contains("unknown"), "{}", badge.body);

    // A restarted jetci-web shows the same view, rebuilt from the stream.
    let before = fingerprint(&get(&addr, "/api/results").json());
    let repos_before = get(&addr, "/api/repos").json();
    web.kill();
    let addr2 = free_addr();
    let web2 = spawn_web(&url, &addr2, &[]);
    wait_get(&addr2, "/healthz", |r| r.json()["caught_up"] == true);
    let after = fingerprint(&get(&addr2, "/api/results").json());
    assert_eq!(before, after);
    assert_eq!(repos_before, get(&addr2, "/api/repos").json());
    drop(web2);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_web_skips_bad_messages_survives_a_nats_restart_and_streams_live_logs() {
    let mut nats = NatsServer::start();
    let url = nats.url();
    let repo = GitRepo::new();
    let (ok_name, ok_body) = passing_test();
    repo.commit("first", &[(ok_name, ok_body)]);

    let _sys = System::start(&nats, &repo, &["r1"]);
    let addr = free_addr();
    let web = spawn_web(&url, &addr, &[]);
    wait_results(&url, 1, BOUND).await;

    // A message that is not a result is logged and skipped, and the view goes on.
    let js = js(&url).await;
    js.publish(
        names().results_subject(REPO, &"0".repeat(40), 1),
        "not json".into(),
    )
    .await
    .expect("publish")
    .await
    .expect("ack");
    wait_get(&addr, "/healthz", |r| r.json()["skipped"] == 1);
    wait_get(&addr, "/api/results", |r| {
        r.json().as_array().is_some_and(|a| a.len() == 1)
    });

    // NATS restarts; the next result still reaches the view.
    nats.restart();
    let second = repo.commit("second", &[("b.txt", "b")]);
    wait_get(&addr, "/api/results", |r| {
        r.json()
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["sha"] == second.as_str()))
    });

    // A slow job's output streams live to its commit page's log events.
    let slow = repo.commit(
        "slow",
        &[(
            ".jetci.toml",
            "command = \"echo hello-live; sleep 3; echo done\"\n",
        )],
    );
    let log = sse_until(&addr, &format!("/events/log/app/{slow}/1/1"), "hello-live");
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
    wait_get(&addr, &format!("/api/commit/app/{slow}"), |r| {
        r.json()["results"][0]["status"] == "passed"
    });
    assert!(
        web.log().contains("skipped a result that does not decode"),
        "{}",
        web.log()
    );
}

/// Each live log holds a `CI_LOGS` consumer: anyone reaching the web could pile them up (found
/// by a break-it review: 200 open connections, 200 consumers). Past 64 at once: 503.
#[tokio::test(flavor = "multi_thread")]
async fn live_logs_followed_at_once_are_bounded() {
    let nats = NatsServer::start();
    let addr = free_addr();
    let _web = spawn_web(&nats.url(), &addr, &[]);
    wait_http(&addr, "/healthz", BOUND, |r| r.status == 200);
    let sha = "0".repeat(40);
    let path = format!("/events/log/app/{sha}/1/1");
    let open = |n: usize| -> (TcpStream, String) {
        let mut s = TcpStream::connect(&addr).expect("connect");
        s.set_read_timeout(Some(BOUND)).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\nX-N: {n}\r\n\r\n").unwrap();
        let mut status = String::new();
        BufReader::new(s.try_clone().unwrap())
            .read_line(&mut status)
            .expect("a status line");
        (s, status)
    };
    let held: Vec<(TcpStream, String)> = (0..64).map(open).collect();
    for (_, status) in &held {
        assert!(status.contains(" 200 "), "{status}");
    }
    let (_, status) = open(64);
    assert!(status.contains(" 503 "), "the 65th: {status}");
    drop(held);
    // Closed streams give their places back.
    wait_until("a live log to be followed again", BOUND, || {
        open(65)
            .1
            .contains(" 200 ")
            .then_some(())
            .ok_or("still 503")
    });
}
