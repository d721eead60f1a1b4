//! jetci under `deploy/auth/nats-server.conf`: one NATS user per role, each allowed only what its
//! process does. The real observer, dispatcher and runner run with their own role's
//! `--user/--password` and `--inbox-prefix` and test a commit end to end; then a client holding
//! the runner's credentials is refused everything outside its role (publishing a commit, reading
//! another runner's jobs), and the server says so. The attacks that worked under earlier
//! versions of the file each have a test: reading another role's replies, ending the
//! dispatcher's commit through its ack subject, and the viewer deleting or piling up consumers.

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

/// A user of that configuration: its name, its placeholder password, and the inbox prefix whose
/// subjects it may subscribe to (`_INBOX_<user>`; admin may read any).
#[derive(Clone, Copy, Debug)]
struct Role {
    user: &'static str,
    password: &'static str,
    inbox: &'static str,
}

const ADMIN: Role = role("admin", "change-me-admin", "_INBOX");
const OBSERVER: Role = role("observer", "change-me-observer", "_INBOX_observer");
const DISPATCHER: Role = role("dispatcher", "change-me-dispatcher", "_INBOX_dispatcher");
const RUNNER: Role = role(
    "runner-build-1",
    "change-me-runner-build-1",
    "_INBOX_runner-build-1",
);
const RUNNER_2: Role = role(
    "runner-build-2",
    "change-me-runner-build-2",
    "_INBOX_runner-build-2",
);
const VIEWER: Role = role("viewer", "change-me-viewer", "_INBOX_viewer");
const NOTIFIER: Role = role("notifier", "change-me-notifier", "_INBOX_notifier");

const fn role(user: &'static str, password: &'static str, inbox: &'static str) -> Role {
    Role {
        user,
        password,
        inbox,
    }
}

/// How long a refused subscription is watched for a message that must not arrive.
const QUIET: Duration = Duration::from_secs(3);

/// The flags that make any jetci binary connect as `who`, with its inbox prefix.
fn login(who: Role) -> [&'static str; 6] {
    [
        "--user",
        who.user,
        "--password",
        who.password,
        "--inbox-prefix",
        who.inbox,
    ]
}

/// Runs the `jetci` command line as `who`.
fn jetci_as(url: &str, who: Role, args: &[&str]) -> Proc {
    let all = [&["-s", url][..], &login(who), args].concat();
    Proc::spawn("jetci", &all, &[])
}

/// A client connected as `who` with its inbox prefix, with the server's asynchronous errors
/// (permission violations arrive as `-ERR`, reported by async-nats as `Event::ServerError`)
/// forwarded to a channel.
async fn connect_as(url: &str, who: Role) -> (async_nats::Client, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let client = async_nats::ConnectOptions::new()
        .user_and_password(who.user.into(), who.password.into())
        .custom_inbox_prefix(who.inbox)
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
        .unwrap_or_else(|e| panic!("cannot connect to {url} as {}: {e}", who.user));
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
    let nats = NatsServer::start_with_config(CONF, ADMIN.user, ADMIN.password);
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
    // The viewer's `jetci tail` printed the result, and its `jetci logs` prints the job's output
    // (both read through consumers the viewer never deletes).
    viewer
        .wait_for_log_async(&format!("passed  app  main  {}", &sha[..8]), BOUND)
        .await;
    let mut logs_cmd = jetci_as(&url, VIEWER, &["logs", "app", &sha]);
    let status = logs_cmd.wait_exit(BOUND);
    assert!(
        status.success() && logs_cmd.log().contains("Ran 1 test"),
        "jetci logs as viewer: {status}\n{}",
        logs_cmd.log()
    );
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
                .any(|l| l.contains(RUNNER.user) && l.contains(subject)),
            "the server log does not report the refusal on {subject}: {logged:#?}"
        );
    }
}

/// A server under the shipped configuration whose streams and buckets admin has made (as an
/// operator does once), with admin's client.
async fn server_with_streams() -> (NatsServer, async_nats::Client, jetstream::Context) {
    let nats = NatsServer::start_with_config(CONF, ADMIN.user, ADMIN.password);
    let (admin, _errors) = connect_as(&nats.url(), ADMIN).await;
    let admin_js = jetstream::new(admin.clone());
    let mut admin_tail = jetci_as(&nats.url(), ADMIN, &["tail"]);
    wait_streams(&admin_js).await;
    assert!(admin_tail.stop().success(), "{}", admin_tail.log());
    (nats, admin, admin_js)
}

#[tokio::test(flavor = "multi_thread")]
async fn no_role_reads_the_replies_of_another() {
    let (nats, admin, _admin_js) = server_with_streams().await;
    let url = nats.url();
    for intruder_role in [RUNNER_2, VIEWER] {
        let (intruder, mut errors) = connect_as(&url, intruder_role).await;
        // Its own inbox works: a request gets its answer.
        let answer = tokio::time::timeout(BOUND, intruder.request("$JS.API.INFO", "".into()))
            .await
            .expect("a request neither failed nor was answered");
        assert!(
            answer.is_ok(),
            "{} gets no reply on its own inbox {}: {answer:?}",
            intruder_role.user,
            intruder_role.inbox
        );
        // Every other inbox is refused: the one every client uses by default, the dispatcher's
        // (pulled commits with their ack subjects) and another runner's (its pulled jobs).
        for other in ["_INBOX.>", "_INBOX_dispatcher.>", "_INBOX_runner-build-1.>"] {
            let mut snoop = intruder.subscribe(other).await.expect("subscribe is sent");
            intruder.flush().await.expect("flush");
            expect_server_error(
                &mut errors,
                &format!("Permissions Violation for Subscription to \"{other}\""),
            )
            .await;
            // A reply sent there reaches an allowed subscriber (admin) but not the intruder.
            let subject = format!("{}.reply", other.trim_end_matches(".>"));
            let mut control = admin.subscribe(other).await.expect("subscribe");
            admin.flush().await.expect("flush");
            admin
                .publish(subject.clone(), "a reply".into())
                .await
                .expect("publish");
            admin.flush().await.expect("flush");
            let seen = tokio::time::timeout(BOUND, control.next()).await;
            assert!(
                matches!(seen, Ok(Some(_))),
                "admin's subscription got nothing: the check below would prove nothing"
            );
            match tokio::time::timeout(QUIET, snoop.next()).await {
                Err(_) | Ok(None) => {}
                Ok(Some(msg)) => {
                    panic!("{} read a reply on {subject}: {msg:?}", intruder_role.user)
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_runner_user_cannot_end_the_dispatchers_commit_through_its_ack_subject() {
    let (nats, admin, admin_js) = server_with_streams().await;
    let url = nats.url();
    let names = names();
    let commits_stream = names.commits_stream();

    // The intruder: a client with another runner's credentials. It listens to every inbox it
    // may (under the old file, `_INBOX.>`: the dispatcher's pulled commits, whose reply subject
    // is the commit's ack subject) and answers every commit it sees with a +TERM.
    let (intruder, mut errors) = connect_as(&url, RUNNER_2).await;
    let mut sniffers = futures::stream::select_all(Vec::new());
    for other in ["_INBOX.>", "_INBOX_dispatcher.>"] {
        sniffers.push(intruder.subscribe(other).await.expect("subscribe is sent"));
    }
    let (terms_tx, mut terms_rx) = mpsc::unbounded_channel::<String>();
    let ack_prefix = format!("$JS.ACK.{commits_stream}.");
    let sniffer_client = intruder.clone();
    let sniffing = tokio::spawn(async move {
        while let Some(msg) = sniffers.next().await {
            if let Some(reply) = msg.reply.filter(|r| r.starts_with(&ack_prefix)) {
                let _ = sniffer_client.publish(reply.clone(), "+TERM".into()).await;
                let _ = sniffer_client.flush().await;
                let _ = terms_tx.send(reply.to_string());
            }
        }
    });
    // And it learns the ack subject another way (a guess, or a message seen elsewhere): admin
    // hears the dispatcher's in-progress acks, which are published on it.
    let mut acks = admin
        .subscribe(format!("$JS.ACK.{commits_stream}.>"))
        .await
        .expect("subscribe");
    admin.flush().await.expect("flush");

    // A commit only a runner labelled gpu may run: the dispatcher holds it, unacked, while no
    // such runner is there.
    let repo = GitRepo::new();
    let (ok_name, ok_body) = passing_test();
    let sha = repo.commit(
        "needs a gpu",
        &[(ok_name, ok_body), (".jetci.toml", "labels = [\"gpu\"]\n")],
    );
    let work = tempfile::tempdir().expect("tempdir");
    let mut runner = spawn_runner(&url, "build-1", work.path(), &login(RUNNER));
    let _observer = spawn_observer(&url, &repo, &login(OBSERVER));
    let mut dispatcher = spawn_dispatcher(&url, &login(DISPATCHER));
    let ack_subject = match tokio::time::timeout(BOUND, acks.next()).await {
        Ok(Some(ack)) => ack.subject.to_string(),
        other => panic!(
            "the dispatcher never extended its commit: {other:?}\n{}",
            dispatcher.log()
        ),
    };
    intruder
        .publish(ack_subject.clone(), "+TERM".into())
        .await
        .expect("publish is sent");
    intruder.flush().await.expect("flush");
    // The server refuses it: the intruder never received a message with that reply subject, and
    // no allow list names it.
    expect_server_error(
        &mut errors,
        &format!("Permissions Violation for Publish to \"{ack_subject}\""),
    )
    .await;

    // The dispatcher restarts (holding nothing in memory) and a gpu runner comes: the commit is
    // still in CI_COMMITS, so it is delivered again and tested.
    dispatcher.kill();
    assert!(runner.stop().success(), "{}", runner.log());
    let _runner = spawn_runner(
        &url,
        "build-1",
        work.path(),
        &[&login(RUNNER)[..], &["--labels", "gpu"]].concat(),
    );
    let _dispatcher = spawn_dispatcher(&url, &login(DISPATCHER));
    let results = admin_js
        .get_stream(names.results_stream())
        .await
        .expect("CI_RESULTS");
    let result = wait_result(&results, &names.results_subject(REPO, &sha, 1)).await;
    assert_eq!(result["status"], "passed", "{result:#}");
    sniffing.abort();
    let terms: Vec<String> = std::iter::from_fn(|| terms_rx.try_recv().ok()).collect();
    assert!(
        terms.is_empty(),
        "the intruder saw the commit's ack subject: {terms:?}"
    );
}

/// The viewer's client and its JetStream context, which gives up on a refused request after 5 s.
async fn viewer_js(
    url: &str,
) -> (
    async_nats::Client,
    jetstream::Context,
    mpsc::UnboundedReceiver<String>,
) {
    let (viewer, errors) = connect_as(url, VIEWER).await;
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(5))
        .build(viewer.clone());
    (viewer, js, errors)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_viewer_cannot_delete_another_readers_consumer() {
    let (nats, _admin, admin_js) = server_with_streams().await;
    let names = names();
    let (_viewer, viewer_js, mut errors) = viewer_js(&nats.url()).await;

    // Another reader's consumer on CI_RESULTS (as jetci-web's feed is).
    let results_stream = names.results_stream();
    let results = admin_js
        .get_stream(&results_stream)
        .await
        .expect("CI_RESULTS");
    let feed = "web-feed";
    results
        .create_consumer(pull::Config {
            name: Some(feed.into()),
            inactive_threshold: Duration::from_secs(600),
            ..Default::default()
        })
        .await
        .expect("admin makes a consumer");
    let viewer_results = viewer_js
        .get_stream(&results_stream)
        .await
        .expect("the viewer may look CI_RESULTS up");
    let deleted = viewer_results.delete_consumer(feed).await;
    assert!(deleted.is_err(), "the viewer deleted {feed}");
    expect_server_error(
        &mut errors,
        &format!("Permissions Violation for Publish to \"$JS.API.CONSUMER.DELETE.{results_stream}.{feed}\""),
    )
    .await;
    assert!(results.consumer_info(feed).await.is_ok(), "{feed} is gone");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_viewer_cannot_pile_up_consumers() {
    let (nats, _admin, _admin_js) = server_with_streams().await;
    let names = names();
    let (_viewer, viewer_js, _errors) = viewer_js(&nats.url()).await;

    // The viewer makes consumers on CI_LOGS (as `jetci logs` does) until the server refuses one.
    let logs_stream = names.logs_stream();
    let logs = viewer_js
        .get_stream(&logs_stream)
        .await
        .expect("the viewer may look CI_LOGS up");
    let bound = jetci::streams::READERS_MAX_CONSUMERS as usize;
    let mut made = 0;
    let refusal = loop {
        let created = logs
            .create_consumer(pull::Config {
                ack_policy: jetstream::consumer::AckPolicy::None,
                inactive_threshold: Duration::from_secs(600),
                memory_storage: true,
                ..Default::default()
            })
            .await;
        match created {
            Ok(_) => made += 1,
            Err(e) => break e.to_string(),
        }
        assert!(
            made <= bound,
            "the viewer made {made} consumers on {logs_stream}, past the bound of {bound}"
        );
    };
    assert_eq!(made, bound, "refused early: {refusal}");
    assert!(
        refusal.contains("maximum consumers limit reached"),
        "{refusal}"
    );
}
