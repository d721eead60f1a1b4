//! Browser tests of jetci-web's dashboard and a pipeline's commit page: headless Chromium (Debian's `chromium` and
//! `chromium-driver` packages) driven over WebDriver with fantoccini, against the real observer,
//! dispatcher, runner and web process on a real nats-server.
//!
//! The dashboard is opened, a commit is made, and the test waits until the page shows the new
//! commit's status without a reload (the live script swaps `<main>` when `/events` announces a
//! result); a marker set on `window` before the commit proves the page was not reloaded. A
//! screenshot goes to `target/test-output/browser/dashboard.png`.
//!
//! A pipeline's commit page is opened while one job waits for a file the test creates: its box
//! shows `running`, the other jobs' boxes turn `passed`, `failed` and `skipped` without a reload,
//! the arrows follow `needs`, a click on a box opens the job's live log, and once the file
//! exists the box turns `passed` (`target/test-output/browser/pipeline.png`).
//!
//! Without `/usr/bin/chromium` and `chromedriver` the test fails under CI (`.ci/run` installs
//! them) and, elsewhere, prints why and passes, so a machine without a browser still runs the
//! rest of the suite (`apt-get install chromium chromium-driver` brings them).

use std::path::{Path, PathBuf};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{json, Value};

use crate::support::git::{failing_test, passing_test, GitRepo};
use crate::support::http::http_get;
use crate::support::jetstream::wait_results;
use crate::support::nats::{free_addr, free_port, NatsServer};
use crate::support::processes::missing_tool;
use crate::support::processes::{tail, Proc};
use crate::support::system::{app_job, spawn_web, System};
use crate::support::waiting::{wait_until_async, BOUND};

const CHROMIUM: &str = "/usr/bin/chromium";

/// `chromedriver` on PATH (Debian puts it in /usr/bin), if any.
fn chromedriver() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("chromedriver"))
        .find(|p| p.is_file())
}

/// Where this test's files go: `target/test-output/browser/`.
fn output_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("test-output")
        .join("browser");
    std::fs::create_dir_all(&dir).expect("cannot create the test output dir");
    dir
}

/// Starts chromedriver on a free port and returns once it answers.
async fn start_chromedriver(binary: &Path) -> (Proc, u16) {
    let bound = Duration::from_secs(30);
    wait_until_async("chromedriver to start on a free port", bound, async || {
        let port = free_port();
        let driver = Proc::spawn_program(
            binary,
            &[&format!("--port={port}"), "--allowed-ips=127.0.0.1"],
            &[],
        );
        // It answers, or says the port was taken meanwhile (then another port is tried).
        let what = format!("chromedriver to answer on port {port}");
        let started = wait_until_async(&what, bound, async || {
            let log = driver.log();
            if log.contains("started successfully")
                && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            {
                Ok(true)
            } else if log.contains("bind() failed") {
                Ok(false)
            } else {
                Err(tail(&log, 30))
            }
        })
        .await;
        if started {
            Ok((driver, port))
        } else {
            Err(format!(
                "port {port} was taken:\n{}",
                tail(&driver.log(), 30)
            ))
        }
    })
    .await
}

/// A WebDriver session on headless Chromium with a fresh profile in `profile`.
async fn browser(driver_port: u16, profile: &Path) -> Client {
    let caps = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": [
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--window-size=1280,900",
                format!("--user-data-dir={}", profile.display()),
            ],
        },
    });
    let Value::Object(caps) = caps else {
        unreachable!()
    };
    ClientBuilder::new(HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{driver_port}"))
        .await
        .expect("cannot start a WebDriver session on chromium")
}

/// Runs `script` in the page until it returns `want`; panics after BOUND with the last value,
/// the page and what jetci-web logged.
async fn wait_script(client: &Client, script: &str, want: &Value, web: &Proc) {
    let what = format!("`{script}` to give {want}");
    wait_until_async(&what, BOUND, async || {
        let got = client
            .execute(script, vec![])
            .await
            .unwrap_or_else(|e| Value::String(format!("error: {e}")));
        if &got == want {
            return Ok(());
        }
        let html = client.source().await.unwrap_or_default();
        Err(format!("{got}\npage:\n{html}\njetci-web:\n{}", web.log()))
    })
    .await
}

/// The status word the dashboard shows in the row of run 1 of `sha` (its run key), or null.
fn status_script(sha: &str) -> String {
    format!(
        "var s = document.querySelector('tr[data-key=\"{}\"] .status'); \
         return s ? s.textContent : null;",
        app_job(sha).run_key()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_shows_a_new_result_live() {
    let Some(driver_binary) = chromedriver().filter(|_| Path::new(CHROMIUM).is_file()) else {
        return missing_tool(
            &format!("{CHROMIUM} or chromedriver"),
            "apt-get install -y chromium chromium-driver; .ci/run does",
        );
    };

    let nats = NatsServer::start();
    let url = nats.url();
    let repo = GitRepo::new();
    let (ok_name, ok_body) = passing_test();
    let first = repo.commit("first", &[(ok_name, ok_body)]);
    let sys = System::start(&nats, &repo, &["r1"]);
    let addr = free_addr();
    let web = spawn_web(&url, &addr, &[]);
    wait_results(&url, 1, BOUND).await;

    let (_driver, driver_port) = start_chromedriver(&driver_binary).await;
    let client = browser(driver_port, &sys.work.path().join("chromium-profile")).await;

    // The dashboard shows the first commit (reloading until jetci-web has it).
    let dashboard = format!("http://{addr}/");
    let what = format!("the dashboard to show {first}");
    wait_until_async(&what, BOUND, async || {
        client.goto(&dashboard).await.expect("open the dashboard");
        let shown = client
            .execute(&status_script(&first), vec![])
            .await
            .expect("script");
        if shown == json!("passed") {
            Ok(())
        } else {
            Err(format!("{shown}\n{}", web.log()))
        }
    })
    .await;
    // A marker that a reload would wipe out; then give the page a moment to open /events.
    client
        .execute("window.jetciMarker = 'still here'; return true;", vec![])
        .await
        .expect("set the marker");
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A failing commit: its row appears with its status, live.
    let (bad_name, bad_body) = failing_test();
    let broke = repo.commit("make it fail", &[(bad_name, bad_body)]);
    wait_script(&client, &status_script(&broke), &json!("failed"), &web).await;
    let marker = client
        .execute("return window.jetciMarker || null;", vec![])
        .await
        .expect("read the marker");
    assert_eq!(
        marker,
        json!("still here"),
        "the page was reloaded instead of updated live"
    );

    let png = client.screenshot().await.expect("screenshot");
    let file = output_dir().join("dashboard.png");
    std::fs::write(&file, &png).expect("cannot write the screenshot");
    let size = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    assert!(size > 0, "empty screenshot at {}", file.display());
    assert!(png.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
    println!("screenshot: {} ({size} bytes)", file.display());
    client.close().await.expect("close the session");
}

/// Runs `script` in the page and returns its value (an error's text as a string).
async fn eval(client: &Client, script: &str) -> Value {
    client
        .execute(script, vec![])
        .await
        .unwrap_or_else(|e| Value::String(format!("error: {e}")))
}

/// The status word (`data-status`) of the box of job `name` in the commit page's graph, or null.
fn box_status(name: &str) -> String {
    format!(
        "var b = document.querySelector('a.node[data-name=\"{name}\"]'); \
         return b ? b.dataset.status : null;"
    )
}

/// A job's token, read from its box.
async fn token_of(client: &Client, name: &str) -> String {
    let script = format!(
        "var b = document.querySelector('a.node[data-name=\"{name}\"]'); \
         return b ? b.dataset.job : null;"
    );
    match eval(client, &script).await {
        Value::String(t) => t,
        other => panic!("no box for {name}: {other}"),
    }
}

/// The arrows of the graph as `from>to` token pairs, sorted.
async fn arrows(client: &Client) -> Vec<String> {
    let script = "return Array.prototype.map.call(document.querySelectorAll('path.edge'), \
                  function (p) { return p.dataset.from + '>' + p.dataset.to; });";
    let mut list: Vec<String> = serde_json::from_value(eval(client, script).await)
        .expect("the arrows as a list of strings");
    list.sort();
    list
}

/// Clicks the box of job `name` and waits until the job's part of the page shows `text`.
async fn open_log(client: &Client, name: &str, text: &str, web: &Proc) {
    let selector = format!("a.node[data-name=\"{name}\"]");
    let node = client
        .find(fantoccini::Locator::Css(&selector))
        .await
        .unwrap_or_else(|e| panic!("no box {selector}: {e}"));
    node.click().await.expect("click the box");
    let script = format!(
        "var b = document.querySelector('a.node[data-name=\"{name}\"]'); \
         var part = b && document.getElementById('job-1-' + b.dataset.job); \
         return part && part.open && part.textContent.indexOf('{text}') >= 0;"
    );
    wait_script(client, &script, &json!(true), web).await;
}

/// lint → test (a matrix of two, one failing) → report, and build on its own, which waits for
/// `release` (a file the test creates in the runners' shared cache dir) before it ends.
fn pipeline_toml(release: &Path) -> String {
    format!(
        r#"
[jobs.lint]
command = "echo linted"

[jobs.test]
command = "echo testing python $JETCI_MATRIX_PYTHON; test $JETCI_MATRIX_PYTHON = 3.11"
needs = ["lint"]
matrix = {{ python = ["3.11", "3.12"] }}

[jobs.report]
command = "echo reported"
needs = ["test"]

[jobs.build]
command = "echo build waits for its release; while [ ! -e {release} ]; do sleep 0.2; done; echo build released"
"#,
        release = release.display()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pipelines_commit_page_draws_its_graph_live_with_each_jobs_log() {
    let Some(driver_binary) = chromedriver().filter(|_| Path::new(CHROMIUM).is_file()) else {
        return missing_tool(
            &format!("{CHROMIUM} or chromedriver"),
            "apt-get install -y chromium chromium-driver; .ci/run does",
        );
    };
    let nats = NatsServer::start();
    let url = nats.url();
    let cache = tempfile::tempdir().expect("cannot create the runners' cache dir");
    let release = cache.path().join("release");
    let repo = GitRepo::new();
    let sha = repo.commit("pipeline", &[(".jetci.toml", &pipeline_toml(&release))]);
    let cache_dir = cache.path().to_str().expect("utf-8 temp dir");
    let sys = System::start_with(
        &nats,
        &repo,
        &["r0", "r1", "r2"],
        &["--cache-dir", cache_dir],
    );
    let addr = free_addr();
    let web = spawn_web(&url, &addr, &[]);

    let (_driver, driver_port) = start_chromedriver(&driver_binary).await;
    let client = browser(driver_port, &sys.work.path().join("chromium-profile")).await;

    // The page, once jetci-web knows the run, shows build running (it waits for the file).
    let page = format!("http://{addr}/repo/app/commit/{sha}");
    wait_until_async("the commit page to show build running", BOUND, async || {
        client.goto(&page).await.expect("open the commit page");
        match eval(&client, &box_status("build")).await {
            v if v == json!("running") => Ok(()),
            v => Err(format!("{v}\n{}", web.log())),
        }
    })
    .await;
    client
        .execute("window.jetciMarker = 'still here'; return true;", vec![])
        .await
        .expect("set the marker");

    // The other jobs end while build runs: their boxes change without a reload.
    for (name, status) in [
        ("lint", "passed"),
        ("test (python=3.11)", "passed"),
        ("test (python=3.12)", "failed"),
        ("report", "skipped"),
        ("build", "running"),
    ] {
        wait_script(&client, &box_status(name), &json!(status), &web).await;
    }
    let marker = eval(&client, "return window.jetciMarker || null;").await;
    assert_eq!(
        marker,
        json!("still here"),
        "the page was reloaded, not updated live"
    );

    // The arrows are the needs.
    let [lint, t311, t312, report, build] = [
        "lint",
        "test (python=3.11)",
        "test (python=3.12)",
        "report",
        "build",
    ];
    let lint = token_of(&client, lint).await;
    let (t311, t312) = (token_of(&client, t311).await, token_of(&client, t312).await);
    let report = token_of(&client, report).await;
    let mut want = vec![
        format!("{lint}>{t311}"),
        format!("{lint}>{t312}"),
        format!("{t311}>{report}"),
        format!("{t312}>{report}"),
    ];
    want.sort();
    assert_eq!(arrows(&client).await, want);

    // A click on the running job's box shows its live log.
    open_log(&client, build, "build waits for its release", &web).await;

    // Released, build passes; the run's result (failed: a test failed) reloads the page.
    std::fs::write(&release, "go").expect("cannot create the release file");
    wait_script(&client, &box_status(build), &json!("passed"), &web).await;
    wait_script(
        &client,
        "var s = document.querySelector('#run-1 h2 .status'); return s ? s.textContent : null;",
        &json!("failed"),
        &web,
    )
    .await;
    wait_script(&client, &box_status("report"), &json!("skipped"), &web).await;
    open_log(&client, build, "build released", &web).await;
    open_log(&client, "test (python=3.12)", "testing python 3.12", &web).await;

    // Lists and badges take the run's result alone; the commit's JSON has its jobs too.
    let results = http_get(&addr, "/api/results")
        .expect("GET /api/results")
        .json();
    assert_eq!(results.as_array().map(Vec::len), Some(1), "{results:#}");
    assert_eq!(results[0]["status"], "failed");
    let badge = http_get(&addr, "/badge/app.svg").expect("GET the badge");
    assert!(badge.body.contains("failing"), "{}", badge.body);
    let commit = http_get(&addr, &format!("/api/commit/app/{sha}"))
        .expect("GET /api/commit")
        .json();
    assert_eq!(
        commit["job_results"].as_array().map(Vec::len),
        Some(4),
        "{commit:#}"
    );
    let graph = &commit["pipelines"][0]["jobs"];
    assert_eq!(graph.as_array().map(Vec::len), Some(5), "{commit:#}");
    let report_job = graph
        .as_array()
        .and_then(|jobs| jobs.iter().find(|j| j["job"] == report.as_str()))
        .unwrap_or_else(|| panic!("no report in {commit:#}"));
    assert_eq!(report_job["status"], "skipped");

    // A finished job's whole log is at its own address.
    let raw = http_get(&addr, &format!("/log/app/{sha}/1/{lint}/1")).expect("GET the raw log");
    assert_eq!(raw.status, 200, "{}", raw.body);
    assert!(raw.body.contains("linted"), "{}", raw.body);

    let png = client.screenshot().await.expect("screenshot");
    let file = output_dir().join("pipeline.png");
    std::fs::write(&file, &png).expect("cannot write the screenshot");
    assert!(png.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
    println!("screenshot: {}", file.display());
    client.close().await.expect("close the session");
}
