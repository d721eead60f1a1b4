//! Browser test of jetci-web's dashboard: headless Chromium (Debian's `chromium` and
//! `chromium-driver` packages) driven over WebDriver with fantoccini, against the real observer,
//! dispatcher, runner and web process on a real nats-server.
//!
//! The dashboard is opened, a commit is made, and the test waits until the page shows the new
//! commit's status without a reload (the live script swaps `<main>` when `/events` announces a
//! result); a marker set on `window` before the commit proves the page was not reloaded. A
//! screenshot goes to `target/test-output/browser/dashboard.png`.
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
