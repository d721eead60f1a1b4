//! Telling people that a branch broke or was fixed: a JSON webhook and an email.
//!
//! [`Alert`] is what is said (built from the result of the branch's newest commit); the
//! [`Alerter`] delivers it. Each destination (every `--webhook-url`, and the mail server) has its
//! own bounded queue and its own task, so a slow or dead webhook delays nothing else: neither the
//! view, which only `try_send`s (a full queue drops the alert with a warning rather than
//! hold up the results feed), nor the other destinations. Each delivery is retried with
//! exponential backoff (`backon`) while the failure may pass (a connection error, a 5xx, a 429,
//! a transient SMTP reply) and given up at once when it cannot (a 4xx, a permanent SMTP reply).
//! Alerts are not persisted: one still queued when jetci-web stops is lost, which is the
//! price of keeping no state (DESIGN.md).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use backon::{ExponentialBuilder, Retryable};
use jetci::messages::{ResultMsg, Status, TestCounts};
use jetci::shutdown::CancellationToken;
use lettre::message::{header::ContentType, Mailbox};
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::Serialize;
use time::OffsetDateTime;
use tokio::sync::mpsc;

use crate::pages::{enc, short};
use crate::transitions::Kind;

/// Alerts waiting per destination; more are dropped (with a warning).
const QUEUE: usize = 100;
/// Attempts after the first, per alert and destination.
const RETRIES: usize = 6;
/// The first pause between attempts; it doubles up to `MAX_BACKOFF` (about 2.5 minutes in all).
const MIN_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How long one webhook request or SMTP exchange may take.
const SEND_TIMEOUT: Duration = Duration::from_secs(20);
/// Lines of output quoted in a "broken" email.
const MAIL_OUTPUT_LINES: usize = 30;

/// What a webhook receives (JSON) and what an email says.
#[derive(Clone, Debug, Serialize)]
pub struct Alert {
    /// `broken` (passing → failing) or `fixed` (failing → passing).
    pub event: Kind,
    pub repo: String,
    pub branch: String,
    pub sha: String,
    /// The commit's summary line.
    pub summary: String,
    pub author: String,
    /// The verdict that flipped the branch: `passed`, `failed`, `error` or `timed_out`.
    pub status: Status,
    pub reason: Option<String>,
    pub exit_code: Option<i32>,
    pub run: u32,
    pub attempt: u32,
    pub runner: String,
    pub duration_ms: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub finished_at: OffsetDateTime,
    /// Test counts, when the runner could read them.
    pub tests: Option<TestCounts>,
    /// Names of the failing tests (empty when unknown or passing).
    pub failures: Vec<String>,
    /// The commit's page on this jetci-web.
    pub url: String,
    /// One line for people (chat tools show `text`).
    pub text: String,
    /// The last lines of the output (for `broken`; empty for `fixed`).
    #[serde(skip)]
    pub output: String,
}

impl Alert {
    /// The alert for `result`, the verdict of the branch's newest commit; links point at
    /// `base_url` (e.g. `https://ci.example.com`).
    pub fn new(event: Kind, r: &ResultMsg, base_url: &str) -> Alert {
        let url = format!(
            "{}/repo/{}/commit/{}",
            base_url.trim_end_matches('/'),
            enc(&r.repo),
            enc(&r.sha)
        );
        let failures = r
            .tests
            .as_ref()
            .map(|t| t.failures.clone())
            .unwrap_or_default();
        let summary = one_line(&r.summary, 200);
        let mut text = format!(
            "{} {} {} by {} \"{}\" ({})",
            r.repo,
            one_line(&r.branch, 200),
            event.as_str(),
            short(&r.sha),
            summary,
            one_line(&r.author, 200)
        );
        if event == Kind::Broken {
            text.push_str(&format!(": {}", r.status));
            if !failures.is_empty() {
                text.push_str(&format!(
                    ", failing: {}",
                    failures
                        .iter()
                        .map(|f| one_line(f, 200))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        text.push_str(&format!(" {url}"));
        let output = if event == Kind::Broken {
            last_lines(&r.output_tail, MAIL_OUTPUT_LINES)
        } else {
            String::new()
        };
        Alert {
            event,
            repo: r.repo.clone(),
            branch: r.branch.clone(),
            sha: r.sha.clone(),
            summary: r.summary.clone(),
            author: r.author.clone(),
            status: r.status,
            reason: r.reason.clone(),
            exit_code: r.exit_code,
            run: r.run,
            attempt: r.attempt,
            runner: r.runner.clone(),
            duration_ms: r.duration_ms,
            finished_at: r.finished_at,
            tests: r.tests.clone(),
            failures,
            url,
            text,
            output,
        }
    }

    /// The email's subject: `[jetci] app main broken by 1a2b3c4d: summary`.
    pub fn subject(&self) -> String {
        format!(
            "[jetci] {} {} {} by {}: {}",
            self.repo,
            one_line(&self.branch, 100),
            self.event.as_str(),
            short(&self.sha),
            one_line(&self.summary, 120)
        )
    }

    /// The email's plain-text body.
    pub fn body(&self) -> String {
        let mut s = String::new();
        let what = match self.event {
            Kind::Broken => "broken",
            Kind::Fixed => "fixed",
        };
        s.push_str(&format!(
            "Branch {} of {} is {what}: commit {} {}.\n\n",
            clean(&self.branch),
            self.repo,
            short(&self.sha),
            self.status
        ));
        s.push_str(&format!("commit:  {}\n", self.sha));
        s.push_str(&format!("summary: {}\n", one_line(&self.summary, 400)));
        s.push_str(&format!("author:  {}\n", one_line(&self.author, 200)));
        let mut status = self.status.to_string();
        if let Some(code) = self.exit_code {
            status.push_str(&format!(" (exit code {code})"));
        }
        if let Some(reason) = &self.reason {
            status.push_str(&format!(": {}", one_line(reason, 400)));
        }
        s.push_str(&format!("status:  {status}\n"));
        let runner = if self.runner.is_empty() {
            "-"
        } else {
            &self.runner
        };
        s.push_str(&format!(
            "run:     {} attempt {} on {} in {:.1}s\n",
            self.run,
            self.attempt,
            clean(runner),
            self.duration_ms as f64 / 1000.0
        ));
        if let Some(t) = &self.tests {
            s.push_str(&format!(
                "tests:   {} run, {} passed, {} failed, {} skipped\n",
                t.tests, t.passed, t.failed, t.skipped
            ));
        }
        if !self.failures.is_empty() {
            s.push_str("\nFailing tests:\n");
            for f in &self.failures {
                s.push_str(&format!("  {}\n", one_line(f, 400)));
            }
        }
        if !self.output.is_empty() {
            s.push_str("\nLast lines of the output:\n");
            for line in self.output.lines() {
                s.push_str(&format!("  {}\n", clean(line)));
            }
        }
        s.push_str(&format!("\nDetails and the full log: {}\n", self.url));
        s
    }
}

/// Where alerts go.
#[derive(Debug, Default, Clone)]
pub struct AlertConfig {
    pub webhooks: Vec<String>,
    /// `smtp://host:port` (no TLS), `smtps://…` (TLS), `smtp+starttls://…`; user and password
    /// in the URL.
    pub smtp_url: Option<String>,
    pub mail_from: Option<String>,
    pub mail_to: Vec<String>,
}

/// The queues of the delivery tasks; cheap to clone.
#[derive(Clone, Default)]
pub struct Alerter {
    queues: Vec<(String, mpsc::Sender<Arc<Alert>>)>,
}

impl Alerter {
    /// Checks the configuration and starts one delivery task per destination; they end when
    /// `stop` is cancelled. No destination: a alerter that sends nothing.
    ///
    /// Errors: a URL or an address that does not parse, mail settings without recipients.
    pub fn start(config: &AlertConfig, stop: &CancellationToken) -> anyhow::Result<Alerter> {
        let mut sinks = Vec::new();
        if !config.webhooks.is_empty() {
            let client = reqwest::Client::builder()
                .timeout(SEND_TIMEOUT)
                .user_agent(concat!("jetci-web/", env!("CARGO_PKG_VERSION")))
                .build()
                .context("cannot set up the HTTP client for webhooks")?;
            for url in &config.webhooks {
                let parsed = reqwest::Url::parse(url)
                    .with_context(|| format!("bad --webhook-url {}", redact(url)))?;
                if !matches!(parsed.scheme(), "http" | "https") {
                    bail!("bad --webhook-url {}: not http or https", redact(url));
                }
                sinks.push(Sink::Webhook {
                    client: client.clone(),
                    url: parsed,
                });
            }
        }
        match &config.smtp_url {
            Some(url) => {
                if config.mail_to.is_empty() {
                    bail!("--smtp-url needs at least one --mail-to");
                }
                let from = config
                    .mail_from
                    .as_deref()
                    .unwrap_or("jetci <jetci@localhost>");
                let from: Mailbox = from
                    .parse()
                    .with_context(|| format!("bad --mail-from {from:?}"))?;
                let to = config
                    .mail_to
                    .iter()
                    .map(|t| t.parse().with_context(|| format!("bad --mail-to {t:?}")))
                    .collect::<anyhow::Result<Vec<Mailbox>>>()?;
                sinks.push(Sink::Mail {
                    transport: smtp_transport(url)?,
                    server: redact(url),
                    from,
                    to,
                });
            }
            None if !config.mail_to.is_empty() => bail!("--mail-to needs --smtp-url"),
            None => {}
        }
        let mut queues = Vec::new();
        for sink in sinks {
            let (tx, rx) = mpsc::channel(QUEUE);
            let name = sink.name();
            tracing::info!(destination = %name, "alerts on");
            tokio::spawn(deliver_all(sink, rx, stop.clone()));
            queues.push((name, tx));
        }
        Ok(Alerter { queues })
    }

    /// Queues `n` for every destination without waiting; a full queue drops it (logged).
    pub fn send(&self, n: Alert) {
        tracing::info!(event = n.event.as_str(), repo = %n.repo, branch = %n.branch, sha = %n.sha, "branch {}", n.event.as_str());
        let n = Arc::new(n);
        for (name, tx) in &self.queues {
            if let Err(e) = tx.try_send(n.clone()) {
                tracing::warn!(destination = %name, error = %e, "alert dropped: the destination's queue is full or closed");
            }
        }
    }
}

/// One destination.
enum Sink {
    Webhook {
        client: reqwest::Client,
        url: reqwest::Url,
    },
    Mail {
        transport: AsyncSmtpTransport<Tokio1Executor>,
        /// The server's URL without the password, for logs.
        server: String,
        from: Mailbox,
        to: Vec<Mailbox>,
    },
}

/// A failed delivery, and whether trying again may help.
#[derive(Debug)]
struct Failure {
    message: String,
    retry: bool,
}

impl Sink {
    fn name(&self) -> String {
        match self {
            Sink::Webhook { url, .. } => format!("webhook {}", redact(url.as_str())),
            Sink::Mail { server, .. } => format!("mail via {server}"),
        }
    }

    async fn deliver(&self, n: &Alert) -> Result<(), Failure> {
        match self {
            Sink::Webhook { client, url } => {
                let res = client
                    .post(url.clone())
                    .json(n)
                    .send()
                    .await
                    .map_err(|e| Failure {
                        message: e.without_url().to_string(),
                        retry: true,
                    })?;
                let code = res.status();
                if code.is_success() {
                    return Ok(());
                }
                Err(Failure {
                    message: format!("the receiver answered {code}"),
                    retry: code.is_server_error() || code.as_u16() == 429 || code.as_u16() == 408,
                })
            }
            Sink::Mail {
                transport,
                from,
                to,
                ..
            } => {
                let message = mail(n, from, to).map_err(|e| Failure {
                    message: format!("cannot build the email: {e}"),
                    retry: false,
                })?;
                match transport.send(message).await {
                    Ok(_) => Ok(()),
                    Err(e) => Err(Failure {
                        retry: !e.is_permanent(),
                        message: e.to_string(),
                    }),
                }
            }
        }
    }
}

/// The delivery task of one destination: each alert in turn, retried with backoff.
async fn deliver_all(sink: Sink, mut rx: mpsc::Receiver<Arc<Alert>>, stop: CancellationToken) {
    let name = sink.name();
    loop {
        let n = tokio::select! {
            _ = stop.cancelled() => return,
            n = rx.recv() => match n { Some(n) => n, None => return },
        };
        let policy = ExponentialBuilder::default()
            .with_min_delay(MIN_BACKOFF)
            .with_max_delay(MAX_BACKOFF)
            .with_max_times(RETRIES)
            .with_jitter();
        let attempt = (|| sink.deliver(&n))
            .retry(policy)
            .when(|f| f.retry)
            .notify(|f, pause| {
                tracing::warn!(destination = %name, error = %f.message, ?pause, "alert not delivered; trying again");
            });
        let outcome = tokio::select! {
            _ = stop.cancelled() => return,
            r = attempt => r,
        };
        match outcome {
            Ok(()) => {
                tracing::info!(destination = %name, event = n.event.as_str(), repo = %n.repo, branch = %n.branch, sha = %n.sha, "alert delivered")
            }
            Err(f) => {
                tracing::warn!(destination = %name, error = %f.message, repo = %n.repo, branch = %n.branch, sha = %n.sha, "alert given up")
            }
        }
    }
}

/// The email for `n`.
fn mail(n: &Alert, from: &Mailbox, to: &[Mailbox]) -> anyhow::Result<Message> {
    let mut builder = Message::builder()
        .from(from.clone())
        .subject(n.subject())
        .header(ContentType::TEXT_PLAIN);
    for t in to {
        builder = builder.to(t.clone());
    }
    Ok(builder.body(n.body())?)
}

/// The SMTP transport for `url`: `smtp://host[:port]` speaks plain SMTP without TLS (port 25;
/// for a local relay or a test sink), `smtps://host[:port]` TLS from the start (465),
/// `smtp+starttls://host[:port]` STARTTLS (587). `user:password@` in the URL logs in.
pub fn smtp_transport(url: &str) -> anyhow::Result<AsyncSmtpTransport<Tokio1Executor>> {
    let bad = || format!("bad --smtp-url {}", redact(url));
    let u = reqwest::Url::parse(url).with_context(bad)?;
    let host = u
        .host_str()
        .filter(|h| !h.is_empty())
        .with_context(|| format!("{}: no host", bad()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    type T = AsyncSmtpTransport<Tokio1Executor>;
    let builder = match u.scheme() {
        "smtp" => T::builder_dangerous(host).port(u.port().unwrap_or(25)),
        "smtps" => T::relay(&host)
            .with_context(bad)?
            .port(u.port().unwrap_or(465)),
        "smtp+starttls" => T::starttls_relay(&host)
            .with_context(bad)?
            .port(u.port().unwrap_or(587)),
        other => bail!(
            "{}: the scheme is {other:?}, not smtp, smtps or smtp+starttls",
            bad()
        ),
    };
    let builder = builder.timeout(Some(SEND_TIMEOUT));
    let builder = if u.username().is_empty() {
        builder
    } else {
        builder.credentials(Credentials::new(
            percent_decode(u.username()),
            percent_decode(u.password().unwrap_or("")),
        ))
    };
    Ok(builder.build())
}

/// A URL without its user, password, path and query, for logs: they may hold secrets (webhook
/// tokens often sit in the path).
pub fn redact(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => match (u.host_str(), u.port()) {
            (Some(h), Some(p)) => format!("{}://{h}:{p}/…", u.scheme()),
            (Some(h), None) => format!("{}://{h}/…", u.scheme()),
            _ => format!("{}:…", u.scheme()),
        },
        Err(_) => "(unparsable URL)".to_string(),
    }
}

/// Decodes `%XX` escapes (as in the user and password of a URL).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Any text on one line, control characters replaced, cut at `max` characters.
fn one_line(s: &str, max: usize) -> String {
    let joined = s.split_whitespace().collect::<Vec<_>>().join(" ");
    let cleaned = clean(&joined);
    if cleaned.chars().count() > max {
        let mut cut: String = cleaned.chars().take(max).collect();
        cut.push('…');
        cut
    } else {
        cleaned
    }
}

/// Control characters (but tabs) replaced with `?`, so repository text cannot drive a terminal
/// or a mail reader.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() && c != '\t' { '?' } else { c })
        .collect()
}

/// The last `n` lines of `s`.
fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::tests::result;

    fn failing() -> ResultMsg {
        let mut r = result("app", "main", 0xab, 1, 7, Status::Failed);
        r.summary = "break it\nsecond line".into();
        r.author = "Ada <ada@example.com>".into();
        r.exit_code = Some(1);
        r.output_tail = "line\nFAILED (failures=1)\n".into();
        r.tests = Some(TestCounts {
            tests: 2,
            passed: 1,
            failed: 1,
            skipped: 0,
            failures: vec!["test_bad (test_x.T.test_bad)".into()],
        });
        r
    }

    #[test]
    fn a_broken_alert_names_everything() {
        let n = Alert::new(Kind::Broken, &failing(), "http://ci.example/");
        let sha = "ab".repeat(20);
        assert_eq!(n.url, format!("http://ci.example/repo/app/commit/{sha}"));
        assert_eq!(n.failures, ["test_bad (test_x.T.test_bad)"]);
        let json = serde_json::to_value(&n).unwrap();
        assert_eq!(json["event"], "broken");
        assert_eq!(json["status"], "failed");
        assert_eq!(json["sha"], sha);
        assert_eq!(json["author"], "Ada <ada@example.com>");
        assert!(json.get("output").is_none());
        assert!(n.text.contains("test_bad"), "{}", n.text);
        assert_eq!(
            n.subject(),
            "[jetci] app main broken by abababab: break it second line"
        );
        let body = n.body();
        for needle in [
            "is broken",
            &sha,
            "Ada <ada@example.com>",
            "test_bad (test_x.T.test_bad)",
            "FAILED (failures=1)",
            "exit code 1",
            &n.url,
        ] {
            assert!(body.contains(needle), "{needle:?} not in:\n{body}");
        }
        let from: Mailbox = "jetci <ci@example.com>".parse().unwrap();
        let to: Mailbox = "dev@example.com".parse().unwrap();
        let formatted = String::from_utf8(mail(&n, &from, &[to]).unwrap().formatted()).unwrap();
        assert!(formatted.contains("test_bad"), "{formatted}");
    }

    #[test]
    fn a_fixed_alert() {
        let mut r = failing();
        r.status = Status::Passed;
        r.tests = None;
        let n = Alert::new(Kind::Fixed, &r, "http://x");
        assert!(n.body().contains("is fixed"));
        assert!(!n.body().contains("Last lines"));
        assert!(
            n.text.starts_with("app main fixed by abababab"),
            "{}",
            n.text
        );
    }

    #[test]
    fn smtp_urls() {
        assert!(smtp_transport("smtp://127.0.0.1:2525").is_ok());
        assert!(smtp_transport("smtps://u:p%40ss@mail.example.com").is_ok());
        assert!(smtp_transport("smtp+starttls://mail.example.com:587").is_ok());
        assert!(smtp_transport("http://mail.example.com").is_err());
        assert!(smtp_transport("smtp://").is_err());
        assert_eq!(percent_decode("p%40ss%2"), "p@ss%2");
        assert_eq!(
            redact("https://u:secret@hooks.example/T0/abc?x=1"),
            "https://hooks.example/…"
        );
    }

    #[tokio::test]
    async fn bad_settings_are_refused() {
        let stop = CancellationToken::new();
        let cfg = |f: fn(&mut AlertConfig)| {
            let mut c = AlertConfig::default();
            f(&mut c);
            c
        };
        assert!(Alerter::start(&cfg(|_| {}), &stop).is_ok());
        // The default sender parses.
        assert!(Alerter::start(
            &cfg(|c| {
                c.smtp_url = Some("smtp://127.0.0.1:2525".into());
                c.mail_to = vec!["dev@example.com".into()];
                c.webhooks = vec!["http://127.0.0.1:9/hook".into()];
            }),
            &stop
        )
        .is_ok());
        assert!(Alerter::start(&cfg(|c| c.webhooks = vec!["ftp://x".into()]), &stop).is_err());
        assert!(Alerter::start(&cfg(|c| c.smtp_url = Some("smtp://h".into())), &stop).is_err());
        assert!(Alerter::start(&cfg(|c| c.mail_to = vec!["a@b".into()]), &stop).is_err());
        assert!(Alerter::start(
            &cfg(|c| {
                c.smtp_url = Some("smtp://h".into());
                c.mail_to = vec!["not an address".into()];
            }),
            &stop
        )
        .is_err());
        stop.cancel();
    }
}
