//! jetci-web's break/fix alerts (webhooks and mail) and its result files: the real observer,
//! dispatcher, runner and web process on a real nats-server, a webhook receiver and an SMTP sink
//! run by the test itself.
//!
//! A branch goes pass → fail (one webhook and one email saying it broke, naming the failing
//! test), fail → fail (nothing), fail → pass (one of each saying it is fixed); a restarted
//! jetci-web, which rebuilds its view from the stream, sends nothing for that history. Both
//! receivers are hand-written (HTTP/1.1 with Content-Length, SMTP's few commands), so the test
//! sees exactly what went over the wire and needs no server of its own in the build.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use crate::support::git::{failing_test, passing_test, GitRepo};
use crate::support::http::wait_http;
use crate::support::jetstream::wait_results;
use crate::support::nats::{free_addr, NatsServer};
use crate::support::processes::Proc;
use crate::support::system::{spawn_web, System};
use crate::support::waiting::{wait_until_async, BOUND};

/// How long "nothing more arrives" is watched for.
const QUIET: Duration = Duration::from_secs(4);

/// What a receiver got, in order.
type Inbox = Arc<Mutex<Vec<String>>>;

/// An HTTP server on 127.0.0.1 that answers every request 200 and keeps each POST's body.
async fn webhook_receiver() -> (u16, Inbox) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().unwrap().port();
    let inbox: Inbox = Arc::default();
    let bodies = inbox.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let bodies = bodies.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut read = BufReader::new(read);
                // One request per connection: the answer says `Connection: close`.
                let mut request_line = String::new();
                if read.read_line(&mut request_line).await.unwrap_or(0) == 0 {
                    return;
                }
                let mut length = 0usize;
                loop {
                    let mut line = String::new();
                    if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let line = line.trim_end();
                    if line.is_empty() {
                        break;
                    }
                    if let Some((name, value)) = line.split_once(':') {
                        if name.eq_ignore_ascii_case("content-length") {
                            length = value.trim().parse().unwrap_or(0);
                        }
                    }
                }
                let mut body = vec![0; length];
                if read.read_exact(&mut body).await.is_err() {
                    return;
                }
                if request_line.starts_with("POST ") {
                    bodies
                        .lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&body).into_owned());
                }
                let _ = write
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
                let _ = write.shutdown().await;
            });
        }
    });
    (port, inbox)
}

/// An SMTP server on 127.0.0.1 without TLS or authentication that accepts every message and keeps
/// it (envelope recipients, then the data as sent).
async fn smtp_sink() -> (u16, Inbox) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().unwrap().port();
    let inbox: Inbox = Arc::default();
    let messages = inbox.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let messages = messages.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut read = BufReader::new(read);
                let _ = write.write_all(b"220 sink.test ESMTP\r\n").await;
                let mut rcpt = Vec::new();
                loop {
                    let mut line = String::new();
                    if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let cmd = line.trim_end().to_string();
                    let verb = cmd
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_ascii_uppercase();
                    let answer: &[u8] = match verb.as_str() {
                        "EHLO" | "HELO" => b"250 sink.test\r\n",
                        "MAIL" | "RSET" | "NOOP" => b"250 OK\r\n",
                        "RCPT" => {
                            rcpt.push(cmd.clone());
                            b"250 OK\r\n"
                        }
                        "DATA" => {
                            let _ = write.write_all(b"354 go on\r\n").await;
                            let mut data = String::new();
                            loop {
                                let mut l = String::new();
                                if read.read_line(&mut l).await.unwrap_or(0) == 0 {
                                    return;
                                }
                                if l == ".\r\n" {
                                    break;
                                }
                                data.push_str(&l);
                            }
                            messages
                                .lock()
                                .unwrap()
                                .push(format!("{}\r\n\r\n{data}", rcpt.join("\r\n")));
                            rcpt.clear();
                            b"250 queued\r\n"
                        }
                        "QUIT" => {
                            let _ = write.write_all(b"221 bye\r\n").await;
                            return;
                        }
                        _ => b"502 not here\r\n",
                    };
                    if write.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, inbox)
}

/// A mail as the sink stored it with its body decoded from quoted-printable (which lettre picks
/// for long lines), as a mail reader shows it.
fn readable(mail: &str) -> String {
    let Some((head, body)) = mail.split_once("\r\n\r\n").and_then(|(rcpt, rest)| {
        let (head, body) = rest.split_once("\r\n\r\n")?;
        Some((format!("{rcpt}\r\n\r\n{head}"), body))
    }) else {
        return mail.to_string();
    };
    if !head.contains("Content-Transfer-Encoding: quoted-printable") {
        return mail.to_string();
    }
    let joined = body.replace("=\r\n", "");
    let bytes = joined.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
            Some(b) if bytes[i] == b'=' => {
                out.push(b);
                i += 3;
            }
            _ => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    format!("{head}\r\n\r\n{}", String::from_utf8_lossy(&out))
}

fn count(inbox: &Inbox) -> usize {
    inbox.lock().unwrap().len()
}

fn snapshot(inbox: &Inbox) -> Vec<String> {
    inbox.lock().unwrap().clone()
}

/// Waits until `inbox` holds at least `n` messages; panics after BOUND with what `web` logged.
async fn wait_count(inbox: &Inbox, n: usize, what: &str, web: &Proc) {
    wait_until_async(&format!("{n} {what}"), BOUND, async || {
        if count(inbox) >= n {
            Ok(())
        } else {
            Err(format!("{:#?}\njetci-web:\n{}", snapshot(inbox), web.log()))
        }
    })
    .await
}

/// Waits until jetci-web at `addr` says its view is rebuilt and holds the result of `sha`.
fn wait_web_has(addr: &str, sha: &str) {
    wait_http(addr, "/healthz", BOUND, |r| r.json()["caught_up"] == true);
    wait_http(addr, "/api/results?limit=1000", BOUND, |r| {
        r.json()
            .as_array()
            .is_some_and(|a| a.iter().any(|r| r["sha"] == sha))
    });
}

const BASE_URL: &str = "http://ci.example.test:8080";

/// jetci-web at `addr`, notifying the test's receivers and writing result files.
fn notifying_web(url: &str, addr: &str, hook_port: u16, smtp_port: u16, results_dir: &str) -> Proc {
    spawn_web(
        url,
        addr,
        &[
            "--webhook-url",
            &format!("http://127.0.0.1:{hook_port}/hook"),
            "--smtp-url",
            &format!("smtp://127.0.0.1:{smtp_port}"),
            "--mail-from",
            "jetci <ci@example.test>",
            "--mail-to",
            "dev@example.test",
            "--base-url",
            BASE_URL,
            "--results-dir",
            results_dir,
        ],
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn one_webhook_and_one_mail_per_break_and_fix_and_none_on_restart() {
    let (hook_port, hooks) = webhook_receiver().await;
    let (smtp_port, mails) = smtp_sink().await;
    let nats = NatsServer::start();
    let url = nats.url();
    let repo = GitRepo::new();
    let (ok_name, ok_body) = passing_test();
    let (bad_name, bad_body) = failing_test();
    let first = repo.commit("first", &[(ok_name, ok_body)]);

    let sys = System::start(&nats, &repo, &["r1"]);
    let results_dir = sys.work.path().join("test_results");
    let results_dir = results_dir.to_str().expect("utf-8 path").to_string();
    let addr = free_addr();
    let mut web = notifying_web(&url, &addr, hook_port, smtp_port, &results_dir);
    wait_web_has(&addr, &first);

    // pass → fail: exactly one webhook and one mail, saying it broke and naming the test.
    let broke = repo.commit("make it fail", &[(bad_name, bad_body)]);
    wait_results(&url, 2, BOUND).await;
    wait_count(&hooks, 1, "webhook", &web).await;
    wait_count(&mails, 1, "mail", &web).await;

    let hook: Value = serde_json::from_str(&snapshot(&hooks)[0]).expect("webhook body is JSON");
    assert_eq!(hook["event"], "broken", "{hook:#}");
    assert_eq!(hook["repo"], "app");
    assert_eq!(hook["branch"], "main");
    assert_eq!(hook["sha"], broke.as_str());
    assert_eq!(hook["summary"], "make it fail");
    assert_eq!(hook["author"], "jetci test <test@jetci.invalid>");
    assert_eq!(hook["status"], "failed");
    assert_eq!(hook["run"], 1);
    assert_eq!(hook["runner"], "r1");
    assert!(
        hook["failures"].as_array().is_some_and(|f| f
            .iter()
            .any(|t| t.as_str().is_some_and(|t| t.contains("test_fails")))),
        "{hook:#}"
    );
    assert_eq!(hook["tests"]["failed"], 1, "{hook:#}");
    assert_eq!(
        hook["url"],
        format!("{BASE_URL}/repo/app/commit/{broke}").as_str()
    );
    assert!(hook["text"].as_str().is_some_and(|t| t.contains("broken")));
    assert!(hook["finished_at"].is_string());

    let mail = readable(&snapshot(&mails)[0]);
    for needle in [
        "RCPT TO:<dev@example.test>",
        "Subject: [jetci] app main broken by",
        "From: jetci <ci@example.test>",
        "is broken",
        "make it fail",
        "jetci test <test@jetci.invalid>",
        "test_fails",
        &format!("{BASE_URL}/repo/app/commit/{broke}"),
    ] {
        assert!(mail.contains(needle), "{needle:?} not in the mail:\n{mail}");
    }

    // fail → fail: nothing. fail → pass: exactly one of each, saying it is fixed. Each receiver
    // gets its messages in order, so a notification for the second failing commit would be the
    // second message, before the fix.
    let still = repo.commit("still failing", &[("notes.txt", "x")]);
    wait_results(&url, 3, BOUND).await;
    wait_web_has(&addr, &still);
    let fixed = repo.commit("fix it", &[(bad_name, ok_body)]);
    wait_results(&url, 4, BOUND).await;
    wait_count(&hooks, 2, "webhooks", &web).await;
    wait_count(&mails, 2, "mails", &web).await;
    let hook: Value = serde_json::from_str(&snapshot(&hooks)[1]).expect("webhook body is JSON");
    assert_eq!(hook["event"], "fixed", "{hook:#}");
    assert_eq!(hook["sha"], fixed.as_str());
    assert_eq!(hook["status"], "passed");
    assert_eq!(hook["failures"], serde_json::json!([]));
    let mail = readable(&snapshot(&mails)[1]);
    assert!(
        mail.contains("Subject: [jetci] app main fixed by") && mail.contains("is fixed"),
        "{mail}"
    );
    assert!(mail.contains("fix it"), "{mail}");

    // A commit that keeps it green: nothing.
    let green = repo.commit("still green", &[("notes.txt", "y")]);
    wait_results(&url, 5, BOUND).await;
    wait_web_has(&addr, &green);
    tokio::time::sleep(QUIET).await;
    assert_eq!(count(&hooks), 2, "{:#?}", snapshot(&hooks));
    assert_eq!(count(&mails), 2, "{:#?}", snapshot(&mails));

    // A restarted jetci-web rebuilds its view from the stream and notifies nothing for it, nor
    // for a later result that changes nothing.
    web.kill();
    let addr2 = free_addr();
    let web2 = notifying_web(&url, &addr2, hook_port, smtp_port, &results_dir);
    wait_web_has(&addr2, &green);
    let again = repo.commit("green again", &[("notes.txt", "z")]);
    wait_results(&url, 6, BOUND).await;
    wait_web_has(&addr2, &again);
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        count(&hooks),
        2,
        "webhooks after restart: {:#?}\n{}",
        snapshot(&hooks),
        web2.log()
    );
    assert_eq!(
        count(&mails),
        2,
        "mails after restart: {:#?}",
        snapshot(&mails)
    );

    // test_results/<sha>, one per commit, as `jetci up` writes them.
    for (sha, status) in [
        (&first, "passed"),
        (&broke, "failed"),
        (&still, "failed"),
        (&fixed, "passed"),
        (&green, "passed"),
        (&again, "passed"),
    ] {
        let file = std::path::Path::new(&results_dir).join(sha);
        // Written whole (a temporary file renamed), so once it is there it is complete.
        let what = format!("result file {}", file.display());
        let text = wait_until_async(&what, BOUND, async || {
            std::fs::read_to_string(&file).map_err(|e| e.to_string())
        })
        .await;
        assert!(
            text.starts_with(&format!(
                "status: {status}\nrepo: app\nbranch: main\nsha: {sha}\n"
            )),
            "{text}"
        );
    }
    drop(web2);
}
