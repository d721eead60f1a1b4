//! jetci under `deploy/auth/nats-server.conf`: one NATS user per role, each allowed only what its
//! process does. The real observer, dispatcher and runner run with their own role's
//! `--user/--password` and test a commit end to end; then a client holding the runner's
//! credentials is refused everything outside its role (publishing a commit, reading another
//! runner's jobs), and the server says so.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream::Stream};
use futures::StreamExt;
use tokio::sync::mpsc;

use crate::support::git::{passing_test, GitRepo};
use crate::support::jetstream::{all_streams, names};
use crate::support::nats::NatsServer;
use crate::support::processes::Proc;
use crate::support::system::{app_job, spawn_dispatcher, spawn_observer, spawn_runner, REPO};
use crate::support::waiting::{wait_until_async, BOUND};

/// The deployment's configuration itself, so the test checks what operators run.
const CONF: &str = include_str!("../../deploy/auth/nats-server.conf");

/// The placeholder passwords of that configuration.
const ADMIN: (&str, &str) = ("admin", "change-me-admin");
const OBSERVER: (&str, &str) = ("observer", "change-me-observer");
const DISPATCHER: (&str, &str) = ("dispatcher", "change-me-dispatcher");
const RUNNER: (&str, &str) = ("runner-build-1", "change-me-runner-build-1");
const VIEWER: (&str, &str) = ("viewer", "change-me-viewer");
const NOTIFIER: (&str, &str) = ("notifier", "change-me-notifier");

/// How long a refused subscription is watched for a message that must not arrive.
const QUIET: Duration = Duration::from_secs(3);

/// The flags that make any jetci binary connect as `who`.
fn login<'a>(who: (&'a str, &'a str)) -> [&'a str; 4] {
    ["--user", who.0, "--password", who.1]
}

/// Runs the `jetci` command line as `who`.
fn jetci_as(url: &str, who: (&str, &str), args: &[&str]) -> Proc {
    let all = [&["-s", url][..], &login(who), args].concat();
    Proc::spawn("jetci", &all, &[])
}

/// A client connected as `who`, with the server's asynchronous errors (permission violations
/// arrive as `-ERR`, reported by async-nats as `Event::ServerError`) forwarded to a channel.
async fn connect_as(
    url: &str,
    who: (&str, &str),
) -> (async_nats::Client, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let client = async_nats::ConnectOptions::new()
        .user_and_password(who.0.into(), who.1.into())
        .connection_timeout(Duration::from_secs(5))
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    let _ = tx.send(e.to_string());
                }
            }
        })
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url} as {}: {e}", who.0));
    (client, rx)
}

/// Waits for a server error containing `needle` (case-insensitive); panics with what came
/// instead after [`BOUND`].
async fn expect_server_error(errors: &mut mpsc::UnboundedReceiver<String>, needle: &str) {
    let needle = needle.to_lowercase();
    let mut seen = Vec::new();
    let found = tokio::time::timeout(BOUND, async {
        while let Some(e) = errors.recv().await {
            if e.to_lowercase().contains(&needle) {
                return true;
            }
            seen.push(e);
        }
        false
    })
    .await
    .unwrap_or(false);
    assert!(
        found,
        "expected a server error containing {needle:?}; got {seen:?}"
    );
}

/// Waits until every stream and bucket `jetci::streams::setup` makes exists (read as admin).
async fn wait_streams(js: &jetstream::Context) {
    let streams = all_streams(&names());
    wait_until_async("every stream and bucket", BOUND, async || {
        let mut missing = Vec::new();
        for name in &streams {
            if js.get_stream(name).await.is_err() {
                missing.push(name.as_str());
            }
        }
        missing
            .is_empty()
            .then_some(())
            .ok_or_else(|| format!("missing: {missing:?}"))
    })
    .await
}

/// Waits for the final result on `subject` in `CI_RESULTS` and returns it as JSON.
async fn wait_result(results: &Stream, subject: &str) -> serde_json::Value {
    let raw = wait_until_async(&format!("a result on {subject}"), BOUND, async || {
        results
            .get_last_raw_message_by_subject(subject)
            .await
            .map_err(|e| e.to_string())
    })
    .await;
    serde_json::from_slice(&raw.payload).expect("a result is JSON")
}

/// The server log's lines that report a permission violation.
fn violations(nats: &NatsServer) -> Vec<String> {
    std::fs::read_to_string(nats.log_path())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("Violation"))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn each_role_works_with_its_own_credentials_and_a_runner_is_refused_outside_its_role() {
    let nats = NatsServer::start_with_config(CONF, ADMIN.0, ADMIN.1);
    let url = nats.url();
    let names = names();
    // The subjects the runner's role may not touch: commits, and another runner's jobs.
    let commits = names.commits_subject(REPO);
    let other_jobs = names.jobs_subject("other");
    let (admin, _admin_errors) = connect_as(&url, ADMIN).await;
    let admin_js = jetstream::new(admin.clone());

    // Anonymous clients are turned away: the configuration has no open door.
    let anonymous = tokio::time::timeout(BOUND, async_nats::connect(url.as_str()))
        .await
        .expect("an anonymous connect neither failed nor succeeded");
    assert!(anonymous.is_err(), "an anonymous client was let in");

    // Admin creates the streams and buckets once (the roles may only look them up).
    let mut admin_tail = jetci_as(&url, ADMIN, &["tail"]);
    wait_streams(&admin_js).await;
    assert!(admin_tail.stop().success(), "{}", admin_tail.log());

    // Every role with its own credentials; the viewer follows the results.
    let repo = GitRepo::new();
    let (ok_name, ok_body) = passing_test();
    let sha = repo.commit("passing", &[(ok_name, ok_body)]);
    let work = tempfile::tempdir().expect("tempdir");
    let viewer = jetci_as(&url, VIEWER, &["tail", "--all"]);
    let mut observer = spawn_observer(&url, &repo, &login(OBSERVER));
    let _dispatcher = spawn_dispatcher(&url, &login(DISPATCHER));
    let runner = spawn_runner(&url, "build-1", work.path(), &login(RUNNER));

    let results = admin_js
        .get_stream(names.results_stream())
        .await
        .expect("CI_RESULTS");
    let result = wait_result(&results, &names.results_subject(REPO, &sha, 1)).await;
    assert_eq!(result["status"], "passed", "{result:#}");
    assert_eq!(result["runner"], "build-1", "{result:#}");
    // The runner's output reached CI_LOGS under its permissions.
    let logs = admin_js
        .get_stream(names.logs_stream())
        .await
        .expect("CI_LOGS");
    assert!(
        logs.get_last_raw_message_by_subject(&names.logs_subject(&app_job(&sha), 1))
            .await
            .is_ok(),
        "no log stored for the job"
    );
    // The viewer's `jetci tail` printed the result.
    viewer
        .wait_for_log_async(&format!("passed  app  main  {}", &sha[..8]), BOUND)
        .await;
    // The git hook's `jetci notify`, as notifier, is answered by the observer.
    let second = repo.commit("second", &[("a.txt", "1")]);
    let mut notify = jetci_as(&url, NOTIFIER, &["notify", "app"]);
    let status = notify.wait_exit(BOUND);
    assert!(
        status.success()
            && notify.log().contains("jetci: app: ")
            && !notify.log().contains("warning"),
        "jetci notify was not answered: {status}\n{}",
        notify.log()
    );
    let result = wait_result(&results, &names.results_subject(REPO, &second, 1)).await;
    assert_eq!(result["status"], "passed", "{result:#}");

    // The roles did all of that without touching anything outside their permissions.
    assert_eq!(
        violations(&nats),
        Vec::<String>::new(),
        "a role needed more than the configuration allows"
    );
    assert!(
        runner.log().contains("runner ready"),
        "runner log:\n{}",
        runner.log()
    );
    assert!(observer.stop().success(), "{}", observer.log());

    // Now a client with the runner's credentials, outside the runner's role.
    let (intruder, mut errors) = connect_as(&url, RUNNER).await;
    let intruder_js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(3))
        .build(intruder.clone());

    // 1. It cannot publish a commit: the server refuses the message, so JetStream never acks it
    //    and CI_COMMITS stores nothing.
    let mut commits_stream = admin_js
        .get_stream(names.commits_stream())
        .await
        .expect("CI_COMMITS");
    let before = commits_stream
        .info()
        .await
        .expect("info")
        .state
        .last_sequence;
    let forged = serde_json::json!({"v": 1, "repo": "app", "sha": "f".repeat(40), "forged": true});
    let published = async {
        intruder_js
            .publish(commits.clone(), forged.to_string().into())
            .await?
            .await
            .map_err(async_nats::Error::from)
    };
    let published = tokio::time::timeout(BOUND, published)
        .await
        .expect("the refused publish neither failed nor timed out");
    assert!(
        published.is_err(),
        "a runner published a commit: {published:?}"
    );
    expect_server_error(
        &mut errors,
        &format!("Permissions Violation for Publish to \"{commits}\""),
    )
    .await;
    let after = commits_stream
        .info()
        .await
        .expect("info")
        .state
        .last_sequence;
    assert_eq!(
        before, after,
        "CI_COMMITS stored the runner's forged commit"
    );

    // 2. It cannot read another runner's jobs, neither by subscribing to the subject ...
    let mut snoop = intruder
        .subscribe(other_jobs.clone())
        .await
        .expect("subscribe is sent");
    intruder.flush().await.expect("flush");
    expect_server_error(
        &mut errors,
        &format!("Permissions Violation for Subscription to \"{other_jobs}\""),
    )
    .await;
    // ... a job published there reaches an allowed subscriber (admin) but not the runner.
    let mut control = admin
        .subscribe(other_jobs.clone())
        .await
        .expect("subscribe");
    admin.flush().await.expect("flush");
    admin_js
        .publish(other_jobs.clone(), "{\"v\":1,\"job\":\"for other\"}".into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    let seen = tokio::time::timeout(BOUND, control.next()).await;
    assert!(
        matches!(seen, Ok(Some(_))),
        "admin's subscription got nothing: the check below would prove nothing"
    );
    match tokio::time::timeout(QUIET, snoop.next()).await {
        Err(_) | Ok(None) => {}
        Ok(Some(msg)) => panic!("the runner read another runner's job: {msg:?}"),
    }

    // ... nor through JetStream: a consumer on the other runner's subject is refused, whatever
    //     its name.
    let jobs_stream = names.jobs_stream();
    let jobs = intruder_js
        .get_stream(&jobs_stream)
        .await
        .expect("CI_JOBS info is allowed");
    for name in [
        names.runner_consumer("other"),
        names.runner_consumer("build-1"),
    ] {
        let created = jobs
            .create_consumer(pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: other_jobs.clone(),
                ..Default::default()
            })
            .await;
        assert!(
            created.is_err(),
            "the runner made consumer {name} on {other_jobs}"
        );
        expect_server_error(
            &mut errors,
            &format!("Permissions Violation for Publish to \"$JS.API.CONSUMER.CREATE.{jobs_stream}.{name}.{other_jobs}\""),
        )
        .await;
    }
    let admin_jobs = admin_js.get_stream(&jobs_stream).await.expect("CI_JOBS");
    let mut names = admin_jobs.consumer_names();
    let mut found = Vec::new();
    while let Some(name) = names.next().await {
        let name = name.expect("consumer name");
        let info = admin_jobs
            .consumer_info(&name)
            .await
            .expect("consumer info");
        found.push((name, info.config.filter_subject.clone()));
    }
    assert!(
        found.iter().all(|(_, filter)| *filter != other_jobs),
        "a consumer reads {other_jobs}: {found:?}"
    );
    // The other runner's job is still waiting for it.
    assert!(
        admin_jobs
            .get_last_raw_message_by_subject(&other_jobs)
            .await
            .is_ok(),
        "the other runner's job is gone"
    );

    // The server log names the refusals, for the operator.
    let logged = violations(&nats);
    for subject in [&commits, &other_jobs] {
        assert!(
            logged
                .iter()
                .any(|l| l.contains(RUNNER.0) && l.contains(subject)),
            "the server log does not report the refusal on {subject}: {logged:#?}"
        );
    }
}
