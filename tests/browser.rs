//! Browser test of jetci-web's dashboard: headless Chromium (Debian's `chromium` and
//! `chromium-driver` packages) driven over WebDriver with fantoccini, against the real observer,
//! dispatcher, runner and web process on a real nats-server.
//!
//! The dashboard is opened, a commit is made, and the test waits until the page shows the new
//! commit's status without a reload (the live script swaps `<main>` when `/events` announces a
//! result); a marker set on `window` before the commit proves the page was not reloaded. A
//! screenshot goes to `target/test-output/browser/dashboard.png`.
//!
//! Without `/usr/bin/chromium` and `chromedriver` the test prints why and passes, so a machine
//! without a browser still runs the rest of the suite (`apt-get install chromium
//! chromium-driver` brings them).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use jetci_e2e::{
    failing_test, free_addr, free_port, passing_test, spawn_web, wait_results, GitRepo, NatsServer,
    Proc, System,
};
use serde_json::{json, Value};

const BOUND: Duration = Duration::from_secs(120);
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
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let port = free_port();
        let driver = Proc::spawn_program(
            binary,
            &[&format!("--port={port}"), "--allowed-ips=127.0.0.1"],
            &[],
        );
        while Instant::now() < deadline {
            if driver.log().contains("started successfully")
                && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            {
                return (driver, port);
            }
            if driver.log().contains("bind() failed") {
                break; // the port was taken meanwhile: try another
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            Instant::now() < deadline,
            "chromedriver did not start:\n{}",
            driver.log()
        );
    }
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

/// Runs `script` in the page until it returns `want`; panics after BOUND with the last value.
async fn wait_script(client: &Client, script: &str, want: &Value, web: &Proc) {
    let deadline = Instant::now() + BOUND;
    loop {
        let got = client
            .execute(script, vec![])
            .await
            .unwrap_or_else(|e| Value::String(format!("error: {e}")));
        if &got == want {
            return;
        }
        if Instant::now() >= deadline {
            let html = client.source().await.unwrap_or_default();
            panic!(
                "timed out waiting for `{script}` to give {want}; last: {got}\npage:\n{html}\n\
                 jetci-web:\n{}",
                web.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The status word the dashboard shows in the row of `repo.sha.1`, or null.
fn status_script(sha: &str) -> String {
    format!(
        "var s = document.querySelector('tr[data-key=\"app.{sha}.1\"] .status'); \
         return s ? s.textContent : null;"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_shows_a_new_result_live() {
    let Some(driver_binary) = chromedriver().filter(|_| Path::new(CHROMIUM).is_file()) else {
        println!(
            "SKIPPED the_dashboard_shows_a_new_result_live: {CHROMIUM} or chromedriver is not \
             installed (apt-get install -y chromium chromium-driver)"
        );
        return;
    };

    let nats = NatsServer::start();
    let url = nats.url();
    let repo = GitRepo::new();
    let (ok_name, ok_body) = passing_test();
    let first = repo.commit("first", &[(ok_name, ok_body)]);
    let sys = System::start(&nats, &repo, &["r1"]);
    let addr = free_addr();
    let web = spawn_web(&url, &addr, &[]);
    wait_results(&url, "CI_RESULTS", "ci.results.>", 1, BOUND).await;

    let (_driver, driver_port) = start_chromedriver(&driver_binary).await;
    let client = browser(driver_port, &sys.work.path().join("chromium-profile")).await;

    // The dashboard shows the first commit (reloading until jetci-web has it).
    let dashboard = format!("http://{addr}/");
    let deadline = Instant::now() + BOUND;
    loop {
        client.goto(&dashboard).await.expect("open the dashboard");
        let shown = client
            .execute(&status_script(&first), vec![])
            .await
            .expect("script");
        if shown == json!("passed") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dashboard never showed {first}: {shown}\n{}",
            web.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
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
