//! Connection flags, the same as the `nats` CLI's, turned into a connected client.
//!
//! Every binary flattens [`ConnectArgs`] into its own clap parser, so `-s/--server` (env
//! `NATS_URL`), `--creds`, `--user`/`--password`, `--token`, `--nkey` and `--tlscert`/`--tlskey`/
//! `--tlsca` mean the same everywhere. The first connection fails fast with a one-line error (a
//! typo in a URL should not hang); after that async-nats reconnects forever with its capped
//! backoff (JETSTREAM-NOTES 1.1), and each disconnect and reconnect is logged.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream;

use crate::subjects::{NameError, Names};

/// The oldest nats-server jetci accepts. 2.9 silently drops 2.10 features and breaks
/// async-nats' bucket creation (JETSTREAM-NOTES, section 0, item 2).
pub const MIN_SERVER: (u64, u64) = (2, 10);

/// How a process reaches NATS.
#[derive(clap::Args, Clone, Debug)]
pub struct ConnectArgs {
    /// NATS server URL(s), comma-separated.
    #[arg(
        short = 's',
        long = "server",
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        global = true
    )]
    pub server: String,
    /// NATS credentials file (JWT and seed).
    #[arg(long, env = "NATS_CREDS", global = true)]
    pub creds: Option<PathBuf>,
    /// User name (with --password).
    #[arg(long, env = "NATS_USER", global = true)]
    pub user: Option<String>,
    /// Password (with --user).
    #[arg(long, env = "NATS_PASSWORD", global = true, hide_env_values = true)]
    pub password: Option<String>,
    /// Authentication token.
    #[arg(long, env = "NATS_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// File holding an NKey seed.
    #[arg(long, env = "NATS_NKEY", global = true)]
    pub nkey: Option<PathBuf>,
    /// TLS client certificate (with --tlskey).
    #[arg(long, env = "NATS_CERT", global = true)]
    pub tlscert: Option<PathBuf>,
    /// TLS client key (with --tlscert).
    #[arg(long, env = "NATS_KEY", global = true)]
    pub tlskey: Option<PathBuf>,
    /// CA certificate to verify the server with; implies TLS.
    #[arg(long, env = "NATS_CA", global = true)]
    pub tlsca: Option<PathBuf>,
    /// Prefix of reply subjects (default `_INBOX`): replies come on `PREFIX.<id>[.<token>]`. Give
    /// each user its own (e.g. `_INBOX_runner-build-1`, allowed to subscribe to
    /// `_INBOX_runner-build-1.>` only) so no user can read another's replies (deploy/auth).
    #[arg(long, env = "NATS_INBOX_PREFIX", global = true, value_parser = inbox_prefix)]
    pub inbox_prefix: Option<String>,
    /// Prefix of every subject, stream and bucket, so installations can share an account.
    #[arg(long, env = "JETCI_PREFIX", default_value = "ci", global = true)]
    pub prefix: String,
    /// Replicas of streams and buckets this process creates (3 on a three-node cluster).
    #[arg(long, env = "JETCI_REPLICAS", default_value_t = 1, global = true)]
    pub replicas: usize,
}

/// Most bytes of an `--inbox-prefix`.
pub const MAX_INBOX_PREFIX_BYTES: usize = 128;

/// An `--inbox-prefix`: one or more subject tokens (letters, digits, `-`, `_`, ...) separated by
/// dots, without wildcards (`*`, `>`), whitespace or empty tokens, at most
/// [`MAX_INBOX_PREFIX_BYTES`]. async-nats appends `.<id>` for an inbox and `.<id>.<token>` for a
/// request's reply (async-nats 0.51, `Client::new_inbox` and the request multiplexer), so a user
/// with the prefix `P` needs to subscribe to `P.>`. For clap's `value_parser`.
pub fn inbox_prefix(text: &str) -> Result<String, String> {
    if text.len() > MAX_INBOX_PREFIX_BYTES {
        return Err(format!(
            "an inbox prefix has at most {MAX_INBOX_PREFIX_BYTES} bytes"
        ));
    }
    if text.split('.').any(|token| {
        token.is_empty()
            || token == "*"
            || token.contains('>')
            || token.contains('*')
            || token.chars().any(|c| c.is_whitespace() || c.is_control())
    }) {
        return Err(format!(
            "{text:?} is not an inbox prefix: subject tokens separated by dots, without *, > \
             or whitespace (e.g. _INBOX_runner-build-1)"
        ));
    }
    Ok(text.to_string())
}

/// Why a connection could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// A flag is wrong (missing pair, bad prefix, unreadable file).
    #[error("{0}")]
    BadFlag(String),
    #[error(transparent)]
    Name(#[from] NameError),
    /// No server answered.
    #[error(
        "cannot connect to NATS at {url}: {reason} (start one with `jetci up`, or set -s/NATS_URL)"
    )]
    Unreachable { url: String, reason: String },
    /// The server is older than [`MIN_SERVER`].
    #[error("nats-server {found} at {url} is too old: jetci needs 2.10 or newer (deploy/install-nats-server.sh installs 2.15.1)")]
    TooOld { url: String, found: String },
    /// The server runs without JetStream, or the account has none.
    #[error("JetStream is not enabled on the NATS server at {url}: start nats-server with -js (or `jetstream {{}}` in its config)")]
    NoJetStream { url: String },
}

/// A connected client with its JetStream context and the installation's names.
#[derive(Clone)]
pub struct Nats {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub names: Names,
    pub replicas: usize,
    /// Counts (re)connections. After an outage every heartbeat is old, for no fault of the
    /// runners; a dispatcher uses this to restart its lease clocks instead of reassigning
    /// healthy jobs (I3).
    pub connections: tokio::sync::watch::Receiver<u64>,
}

/// Room left for the headers of a result (message id, expected sequence, status, runner), in
/// bytes: [`Nats::message_limit`] is this much below the server's `max_payload`.
pub const HEADER_ROOM: usize = 8 * 1024;

impl Nats {
    /// The most bytes a payload jetci builds from user data may have: the server's
    /// `max_payload` (from its INFO; headers count towards it) or
    /// [`crate::messages::MAX_MESSAGE_BYTES`], whichever is smaller, less [`HEADER_ROOM`].
    pub fn message_limit(&self) -> usize {
        self.client
            .max_payload()
            .min(crate::messages::MAX_MESSAGE_BYTES)
            .saturating_sub(HEADER_ROOM)
    }
}

impl ConnectArgs {
    /// Builds the async-nats options from the flags.
    async fn options(
        &self,
        name: &str,
        connections: tokio::sync::watch::Sender<u64>,
    ) -> Result<async_nats::ConnectOptions, ConnectError> {
        let mut opts = match &self.creds {
            Some(path) => async_nats::ConnectOptions::with_credentials_file(path.clone())
                .await
                .map_err(|e| {
                    ConnectError::BadFlag(format!("cannot read --creds {}: {e}", path.display()))
                })?,
            None => async_nats::ConnectOptions::new(),
        };
        match (&self.user, &self.password) {
            (Some(u), Some(p)) => opts = opts.user_and_password(u.clone(), p.clone()),
            (None, None) => {}
            _ => {
                return Err(ConnectError::BadFlag(
                    "--user and --password go together".into(),
                ))
            }
        }
        if let Some(prefix) = &self.inbox_prefix {
            opts = opts.custom_inbox_prefix(prefix.clone());
        }
        if let Some(t) = &self.token {
            opts = opts.token(t.clone());
        }
        if let Some(path) = &self.nkey {
            let seed = std::fs::read_to_string(path).map_err(|e| {
                ConnectError::BadFlag(format!("cannot read --nkey {}: {e}", path.display()))
            })?;
            opts = opts.nkey(seed.trim().to_string());
        }
        match (&self.tlscert, &self.tlskey) {
            (Some(c), Some(k)) => {
                opts = opts
                    .add_client_certificate(c.clone(), k.clone())
                    .require_tls(true)
            }
            (None, None) => {}
            _ => {
                return Err(ConnectError::BadFlag(
                    "--tlscert and --tlskey go together".into(),
                ))
            }
        }
        if let Some(ca) = &self.tlsca {
            opts = opts.add_root_certificates(ca.clone()).require_tls(true);
        }
        let who = name.to_string();
        let connections = std::sync::Arc::new(connections);
        Ok(opts
            .name(name)
            .connection_timeout(Duration::from_secs(5))
            .event_callback(move |event| {
                let who = who.clone();
                let connections = connections.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            connections.send_modify(|n| *n += 1);
                            tracing::info!(process = %who, "connected to NATS")
                        }
                        async_nats::Event::Disconnected => {
                            tracing::warn!(process = %who, "lost NATS; reconnecting with backoff")
                        }
                        // A permissions violation means this user may not do what this process
                        // needs: a configuration error, not noise.
                        async_nats::Event::ServerError(e) => {
                            tracing::error!(process = %who, error = %e, "the NATS server refused a request")
                        }
                        other => tracing::info!(process = %who, event = %other, "NATS event"),
                    }
                }
            }))
    }

    /// Connects, checks the server version and JetStream, and returns the client.
    ///
    /// `name` is the connection name the server shows (`nats server report connections`).
    /// Errors: [`ConnectError`], each printable as one line.
    pub async fn connect(&self, name: &str) -> Result<Nats, ConnectError> {
        let names = Names::new(&self.prefix)?;
        if self.replicas == 0 || self.replicas > 5 {
            return Err(ConnectError::BadFlag(
                "--replicas must be between 1 and 5".into(),
            ));
        }
        let (connected, connections) = tokio::sync::watch::channel(0);
        let opts = self.options(name, connected).await?;
        let urls: Vec<String> = self
            .server
            .split(',')
            .map(|s| s.trim().to_string())
            .collect();
        // async-nats 0.51 ignores `user:password@` in a URL; a silent anonymous login would only
        // show up later as a refused request, so say it now.
        let has_userinfo = |u: &String| {
            let rest = u.split_once("://").map(|(_, r)| r).unwrap_or(u);
            rest.split('/').next().unwrap_or("").contains('@')
        };
        if urls.iter().any(has_userinfo) {
            return Err(ConnectError::BadFlag(
                "credentials in the server URL are not used; pass --user/--password or --token instead".into(),
            ));
        }
        let url = self.server.clone();
        let client =
            opts.connect(urls.as_slice())
                .await
                .map_err(|e| ConnectError::Unreachable {
                    url: url.clone(),
                    reason: e.to_string(),
                })?;
        check_server(&client, &url).await?;
        let js = jetstream::new(client.clone());
        Ok(Nats {
            client,
            js,
            names,
            replicas: self.replicas,
            connections,
        })
    }
}

/// How long a process waits at start for JetStream to answer `$JS.API.INFO`. The server answered
/// the connection, so it is there: on a cluster the JetStream API pauses while a meta leader is
/// elected (a node just died) and answers slowly while every process sets up at once, and a
/// process that exits then would have to be restarted by hand.
const JETSTREAM_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long one `$JS.API.INFO` request may take.
const JETSTREAM_INFO_TIMEOUT: Duration = Duration::from_secs(5);

/// Refuses servers older than 2.10 and servers without JetStream; waits (up to
/// [`JETSTREAM_READY_TIMEOUT`], saying so every few seconds) while JetStream does not answer yet.
async fn check_server(client: &async_nats::Client, url: &str) -> Result<(), ConnectError> {
    let version = client.server_info().version;
    if !version_at_least(&version, MIN_SERVER) {
        return Err(ConnectError::TooOld {
            url: url.to_string(),
            found: version,
        });
    }
    let deadline = tokio::time::Instant::now() + JETSTREAM_READY_TIMEOUT;
    loop {
        // `$JS.API.INFO` answers with account info, or an error when JetStream is off for the
        // account or not ready; with JetStream off for the whole server nobody answers at all.
        let reply = tokio::time::timeout(
            JETSTREAM_INFO_TIMEOUT,
            client.request("$JS.API.INFO", bytes::Bytes::new()),
        )
        .await;
        let not_yet = match reply {
            Ok(Ok(msg)) => match jetstream_info(&msg.payload) {
                InfoReply::Ready => return Ok(()),
                InfoReply::Disabled => {
                    return Err(ConnectError::NoJetStream {
                        url: url.to_string(),
                    })
                }
                InfoReply::NotYet(why) => why,
            },
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                return Err(ConnectError::NoJetStream {
                    url: url.to_string(),
                })
            }
            Ok(Err(e)) => format!("JetStream did not answer: {e}"),
            Err(_) => format!(
                "JetStream did not answer within {}",
                humantime::format_duration(JETSTREAM_INFO_TIMEOUT)
            ),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(ConnectError::Unreachable {
                url: url.to_string(),
                reason: not_yet,
            });
        }
        tracing::warn!(url, reason = %not_yet, "JetStream is not ready yet; asking again");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// What a `$JS.API.INFO` reply says.
#[derive(Debug, PartialEq, Eq)]
enum InfoReply {
    /// Account info: JetStream works.
    Ready,
    /// JetStream is off for the server or the account: waiting will not help.
    Disabled,
    /// Any other error, e.g. 10008 "JetStream system temporarily unavailable" while a cluster
    /// elects its meta leader: worth asking again.
    NotYet(String),
}

/// Reads a `$JS.API.INFO` reply. A body that is not JSON counts as ready, as it always did: the
/// streams' set-up will say what is wrong.
fn jetstream_info(body: &[u8]) -> InfoReply {
    /// "jetstream not enabled for account" and "jetstream not enabled".
    const DISABLED: [u64; 2] = [10039, 10076];
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let Some(error) = v.get("error") else {
        return InfoReply::Ready;
    };
    if error["err_code"]
        .as_u64()
        .is_some_and(|code| DISABLED.contains(&code))
    {
        return InfoReply::Disabled;
    }
    InfoReply::NotYet(format!(
        "JetStream answered: {}",
        error["description"].as_str().unwrap_or("an error")
    ))
}

/// True when a `major.minor.patch[-suffix]` version is at least `min`.
pub fn version_at_least(version: &str, min: (u64, u64)) -> bool {
    let mut parts = version
        .trim_start_matches('v')
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u64>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major, minor) >= min
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbox_prefixes_are_subject_tokens_without_wildcards() {
        for good in ["_INBOX", "_INBOX_runner-build-1", "_INBOX.viewer", "a"] {
            assert_eq!(inbox_prefix(good).as_deref(), Ok(good));
        }
        for bad in [
            "", ".", "_INBOX.", ".x", "a..b", "_INBOX.>", "_INBOX.*", "a*b", "in box", "tab\t",
        ] {
            assert!(inbox_prefix(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(inbox_prefix(&"x".repeat(MAX_INBOX_PREFIX_BYTES)).is_ok());
        assert!(inbox_prefix(&"x".repeat(MAX_INBOX_PREFIX_BYTES + 1)).is_err());
    }

    #[test]
    fn jetstream_info_replies() {
        assert_eq!(
            jetstream_info(
                br#"{"type":"io.nats.jetstream.api.v1.account_info_response","memory":0}"#
            ),
            InfoReply::Ready
        );
        assert_eq!(
            jetstream_info(
                br#"{"error":{"code":503,"err_code":10039,"description":"jetstream not enabled for account"}}"#
            ),
            InfoReply::Disabled
        );
        assert_eq!(
            jetstream_info(
                br#"{"error":{"code":503,"err_code":10076,"description":"jetstream not enabled"}}"#
            ),
            InfoReply::Disabled
        );
        assert_eq!(
            jetstream_info(
                br#"{"error":{"code":503,"err_code":10008,"description":"JetStream system temporarily unavailable"}}"#
            ),
            InfoReply::NotYet(
                "JetStream answered: JetStream system temporarily unavailable".into()
            )
        );
        assert_eq!(jetstream_info(b"not json"), InfoReply::Ready);
    }

    #[test]
    fn versions() {
        assert!(version_at_least("2.15.1", (2, 10)));
        assert!(version_at_least("2.10.0", (2, 10)));
        assert!(version_at_least("3.0.0-beta", (2, 10)));
        assert!(!version_at_least("2.9.10", (2, 10)));
        assert!(!version_at_least("", (2, 10)));
    }
}
