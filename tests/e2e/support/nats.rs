//! A `nats-server -js` of one test alone: a free port on 127.0.0.1, its own store directory,
//! killed on `Drop`; and free ports for the processes' own listeners.

use std::fs::{self, OpenOptions};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use tempfile::TempDir;

use super::processes::tail;
use super::waiting::wait_until;

/// How long a nats-server may take to answer JetStream requests after it is spawned. Recovering a
/// file store after SIGKILL is usually quick, but CI machines are slow and shared.
const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long [`NatsServer::restart`] keeps trying when the old port is not free yet.
const RESTART_BIND_TIMEOUT: Duration = Duration::from_secs(10);

/// A `nats-server -js` of this test alone: a free port on 127.0.0.1 and its own file store.
///
/// The store lives in a temporary directory owned by this struct, so [`NatsServer::kill`]
/// followed by [`NatsServer::restart`] brings back the same streams and messages on the same
/// URL, which is how the tests check DESIGN.md's I4 (a NATS restart loses no commit). The server
/// is killed on `Drop`. Its output goes to `nats-server.log` beside the store, and the last lines
/// are printed if the test panics.
pub struct NatsServer {
    port: u16,
    child: Option<Child>,
    /// Holds `store/` and `nats-server.log`; removed when the struct is dropped.
    dir: TempDir,
    /// Set by [`NatsServer::start_with_config`] and [`NatsServer::start_as_shipped`]: the config
    /// file and the user that checks readiness.
    config: Option<ServerConfig>,
    /// The monitoring port of a server started with [`NatsServer::start_as_shipped`].
    http_port: Option<u16>,
}

/// A config file of a [`NatsServer`] started with [`NatsServer::start_with_config`].
struct ServerConfig {
    path: PathBuf,
    /// The config's text with its store directory replaced.
    text: String,
    /// Credentials of the user that checks readiness (none: anonymous).
    login: Option<(String, String)>,
    /// True: the config's own `listen` and `http` addresses are kept, only their ports are
    /// replaced ([`NatsServer::start_as_shipped`]); false: `-a 127.0.0.1 -p PORT` override them.
    own_addresses: bool,
}

impl NatsServer {
    /// Starts a server on a free port and returns once JetStream answers requests.
    ///
    /// Panics if `nats-server` is not on PATH (run `deploy/install-nats-server.sh`) or if the
    /// server does not become ready within 30 s.
    pub fn start() -> NatsServer {
        Self::start_inner(None, false)
    }

    /// Starts a server with the configuration `conf` as an operator would run it: only the
    /// ports of its `listen` and `http` lines (each set to a free port, the host part kept as
    /// written) and its `store_dir` are changed, so the addresses it binds are the file's own.
    /// For a config without authorization; panics as [`NatsServer::start`] does.
    pub fn start_as_shipped(conf: &str) -> NatsServer {
        Self::start_inner(Some((conf, None)), true)
    }

    /// Starts a server with the configuration `conf` (the text of a nats-server config file,
    /// e.g. `include_str!("../../deploy/auth/nats-server.conf")`) on a free port on 127.0.0.1,
    /// and returns once JetStream answers `user`/`password` (a user of that config allowed to
    /// call `$JS.API.INFO`).
    ///
    /// The port comes from `-a 127.0.0.1 -p PORT`, which override the config's `listen`. Any line
    /// setting `store_dir` is replaced by this server's own store directory (nats-server refuses
    /// `-sd` beside a config that sets it), so the config must enable JetStream with a
    /// `store_dir` line of its own. Otherwise like [`NatsServer::start`]; `restart` reuses the
    /// config.
    pub fn start_with_config(conf: &str, user: &str, password: &str) -> NatsServer {
        Self::start_inner(Some((conf, Some((user, password)))), false)
    }

    fn start_inner(conf: Option<(&str, Option<(&str, &str)>)>, own_addresses: bool) -> NatsServer {
        let dir = tempfile::Builder::new()
            .prefix("jetci-nats-")
            .tempdir()
            .expect("cannot create a temp dir for nats-server");
        fs::create_dir_all(dir.path().join("store")).expect("cannot create the store dir");
        let config = conf.map(|(text, login)| {
            let store = dir.path().join("store");
            let text: String = text
                .lines()
                .map(|line| {
                    if line.trim_start().starts_with("store_dir") {
                        format!("  store_dir: {:?}\n", store.display().to_string())
                    } else {
                        format!("{line}\n")
                    }
                })
                .collect();
            let path = dir.path().join("nats-server.conf");
            fs::write(&path, &text).expect("cannot write nats-server.conf");
            ServerConfig {
                path,
                text,
                login: login.map(|(u, p)| (u.to_string(), p.to_string())),
                own_addresses,
            }
        });
        let mut server = NatsServer {
            port: 0,
            child: None,
            dir,
            config,
            http_port: own_addresses.then(free_port),
        };
        // The free port is found by binding port 0 and closing it, so another process may grab
        // it before nats-server does; then the server exits at once and we try another port.
        wait_until(
            "nats-server to start on a free port",
            SERVER_READY_TIMEOUT,
            || {
                server.port = free_port();
                server.spawn_and_wait().inspect_err(|e| {
                    eprintln!("nats-server did not start ({e}); trying another port")
                })
            },
        );
        server
    }

    /// The URL clients connect to: `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The monitoring address (`HOST:PORT`, `/varz`, `/healthz`) of a server started with
    /// [`NatsServer::start_as_shipped`], on 127.0.0.1; panics for any other server.
    pub fn monitoring_addr(&self) -> String {
        let port = self
            .http_port
            .expect("only a server started as shipped has its monitoring port");
        format!("127.0.0.1:{port}")
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store directory (kept across [`NatsServer::restart`]).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// The path of the server's log file (all runs of this server append to it).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats-server.log")
    }

    /// Kills the server with SIGKILL, as a crash would, and waits for it to exit. The store
    /// keeps whatever the server had written.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server with SIGTERM, as an operator restarting it would (it shuts down cleanly,
    /// SIGKILL after 10 s), and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            crate::support::processes::terminate(&mut child, Duration::from_secs(10));
        }
    }

    /// Starts the server again on the same port with the same store, and returns once JetStream
    /// answers. A server that is still running is killed first (SIGKILL).
    ///
    /// The old port may not be free at once, so spawning is retried for up to 10 s.
    pub fn restart(&mut self) {
        self.kill();
        let what = format!("nats-server to restart on port {}", self.port);
        wait_until(&what, RESTART_BIND_TIMEOUT, || {
            self.spawn_and_wait()
                .inspect_err(|e| eprintln!("nats-server restart failed ({e}); retrying"))
        });
    }

    /// Spawns nats-server on `self.port` and waits until JetStream answers. `Err` (with the end
    /// of the server's log) when it exited early, as it does when the port is taken; panics when
    /// it neither answers nor exits within 30 s.
    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("cannot open nats-server.log");
        let log_err = log.try_clone().expect("cannot clone log file handle");
        let mut command = Command::new(nats_server_binary());
        match &self.config {
            None => command
                .args(["-js", "-a", "127.0.0.1", "-p"])
                .arg(self.port.to_string())
                .arg("-sd")
                .arg(self.store_dir()),
            Some(config) if config.own_addresses => {
                let text = with_ports(&config.text, self.port, self.http_port);
                fs::write(&config.path, text).expect("cannot write nats-server.conf");
                command.arg("-c").arg(&config.path)
            }
            Some(config) => command
                .arg("-c")
                .arg(&config.path)
                .args(["-a", "127.0.0.1", "-p"])
                .arg(self.port.to_string()),
        };
        let auth = self.config.as_ref().and_then(|c| c.login.clone());
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn nats-server: {e}"));
        // Owned by `self` from here, so `Drop` kills it if the wait below panics.
        self.child = Some(child);

        let url = self.url();
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let what = format!("nats-server on port {} to answer $JS.API.INFO", self.port);
        let child = self.child.as_mut().expect("just spawned");
        let exited = wait_until(&what, SERVER_READY_TIMEOUT, || {
            if let Ok(Some(status)) = child.try_wait() {
                return Ok(Some(status));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                && jetstream_ready_as(&url, auth.clone())
            {
                return Ok(None);
            }
            Err("no answer yet")
        });
        match exited {
            None => Ok(()),
            Some(status) => {
                self.child = None;
                Err(format!(
                    "nats-server on port {} exited early with {status}\n{}",
                    self.port,
                    self.log_tail(20)
                ))
            }
        }
    }

    fn log_tail(&self, lines: usize) -> String {
        format!(
            "--- last {lines} lines of {} ---\n{}",
            self.log_path().display(),
            tail(
                &fs::read_to_string(self.log_path()).unwrap_or_default(),
                lines
            )
        )
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let was_running = self.child.is_some();
        self.kill();
        if was_running && std::thread::panicking() {
            eprintln!("nats-server {}:\n{}", self.url(), self.log_tail(30));
        }
    }
}

/// `text` with the port of its top-level `listen:` line set to `port` and that of its `http:` line to
/// `http` (when given), each keeping the host it names (`listen: 127.0.0.1:4222` becomes
/// `listen: 127.0.0.1:PORT`). Other lines are kept as they are.
fn with_ports(text: &str, port: u16, http: Option<u16>) -> String {
    text.lines()
        .map(|line| {
            // Top-level lines only: a `cluster { listen: ... }` is not the clients' port.
            let new_port = if line.starts_with("listen:") {
                Some(port)
            } else if line.starts_with("http:") {
                http
            } else {
                None
            };
            match (new_port, line.rsplit_once(':')) {
                (Some(p), Some((host, _))) => format!("{host}:{p}\n"),
                _ => format!("{line}\n"),
            }
        })
        .collect()
}

/// The nats-server binary on PATH; panics with a pointer to the install script if there is none.
fn nats_server_binary() -> PathBuf {
    static FOUND: OnceLock<Option<PathBuf>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            let path = std::env::var_os("PATH")?;
            std::env::split_paths(&path)
                .map(|dir| dir.join("nats-server"))
                .find(|candidate| candidate.is_file())
        })
        .clone()
        .expect(
            "nats-server is not on PATH; run deploy/install-nats-server.sh and add the \
             directory it prints to PATH (jetci needs nats-server >= 2.10)",
        )
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("cannot bind 127.0.0.1:0 to find a free port")
}

/// `127.0.0.1:PORT` with a [`free_port`], for a process's `--listen` or `--metrics-addr`.
pub fn free_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// One attempt to ask JetStream for its account info: true when it answers without an error.
///
/// A server accepts TCP connections before JetStream has recovered its store, so the port alone
/// does not mean ready. This runs on its own thread and runtime, so `NatsServer::start` works the
/// same from a plain `#[test]` and from inside a `#[tokio::test]`.
fn jetstream_ready_as(url: &str, auth: Option<(String, String)>) -> bool {
    let url = url.to_string();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("cannot build a tokio runtime");
        rt.block_on(async move {
            let attempt = async {
                let mut options = async_nats::ConnectOptions::new();
                if let Some((user, password)) = auth {
                    options = options.user_and_password(user, password);
                }
                let client = options
                    .connection_timeout(Duration::from_secs(2))
                    .connect(url.as_str())
                    .await
                    .ok()?;
                let reply = client.request("$JS.API.INFO", "".into()).await.ok()?;
                let body: serde_json::Value = serde_json::from_slice(&reply.payload).ok()?;
                Some(body.get("error").is_none())
            };
            tokio::time::timeout(Duration::from_secs(3), attempt)
                .await
                .ok()
                .flatten()
                .unwrap_or(false)
        })
    })
    .join()
    .unwrap_or(false)
}
