//! `jetci-observer`: watches one git repository and publishes every new commit to test.
//!
//! The observer's loop is the library's ([`jetci::observer`]); this binary opens the repository,
//! parses its flags into a [`jetci::observer::Config`] and runs it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use glob::Pattern;
use jetci::connect::ConnectArgs;
use jetci::git::Watched;
use jetci::logging::LogArgs;
use jetci::shutdown::Shutdown;
use jetci::subjects::{check_token, repo_slug};

const LONG_ABOUT: &str = "\
Watches one git repository and publishes every new commit to test.

jetci is a CI system whose processes talk only through NATS JetStream. The observer is where work
enters it: every poll interval it lists the repository's branches and publishes each commit that
is new since the last poll, oldest first, to the subject ci.commits.<name>. Dispatchers take the
commits from there and hand them to runners.

What it remembers lives in NATS (the ci-observer key-value bucket: the last head seen on each
branch), so it can be stopped and restarted, or moved to another machine, without publishing a
commit twice or missing one pushed while it was down. The first time it sees a repository it
publishes only each branch's current head, not the whole history. A commit already published for
one branch is not published again for another; a force-push publishes the rewritten commits.

REPO is a local path (the repository itself, bare or not, is read on every poll) or a git URL,
which is mirrored under --mirror-dir and fetched on every poll. Runners fetch commits from the
same path or URL, so give a path they can read too.

It also polls at once when asked on ci.notify.<name>: with deploy/hooks/post-receive installed in
the repository, each push runs `jetci notify <name>`, which returns once the push's commits are
published. The poll interval can then be long (e.g. 1m): it only catches a lost notify.

Run one observer per repository. Example:
  jetci-observer -s nats://ci.example:4222 --branches 'release/*' /srv/git/app.git";

/// Watches one git repository and publishes every new commit to test.
#[derive(Parser, Debug)]
#[command(name = "jetci-observer", version, long_about = LONG_ABOUT)]
struct Args {
    #[command(flatten)]
    connect: ConnectArgs,
    #[command(flatten)]
    log: LogArgs,
    /// The repository's name in subjects and keys (letters, digits, '-', '_') [default: the last
    /// component of REPO without '.git', e.g. 'app' for /srv/git/app.git]
    #[arg(long)]
    name: Option<String>,
    /// How often to look for new commits, e.g. 500ms, 5s, 1m.
    #[arg(long, value_name = "DUR", default_value = "1s", value_parser = jetci::limits::interval)]
    poll_interval: Duration,
    /// Watch only branches whose name matches this glob, e.g. 'main' or 'release/*' ('*' also
    /// matches '/', so the default watches every branch).
    #[arg(long, value_name = "GLOB", default_value = "*", value_parser = parse_glob)]
    branches: Pattern,
    /// Where mirrors of repositories given as URLs are kept [default:
    /// $XDG_CACHE_HOME/jetci/mirrors or ~/.cache/jetci/mirrors]
    #[arg(long, value_name = "DIR")]
    mirror_dir: Option<PathBuf>,
    /// Logins for repositories that need them, in the format of git's credential store: one
    /// `https://user:token@host[/path]` a line (better than credentials in REPO, which any user
    /// of the machine sees in the process list).
    #[arg(long, value_name = "FILE", env = "JETCI_GIT_CREDENTIALS")]
    git_credentials: Option<PathBuf>,
    /// The repository: a local path, or a URL (https://..., ssh://..., git@host:path, file://...).
    /// Credentials in the URL (https://user:token@host/...) are used to fetch and never shown,
    /// published or stored.
    #[arg(value_name = "REPO")]
    repo: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    args.log.init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let message = format!("{e:#}").replace('\n', " ");
            eprintln!("jetci-observer: error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Opens the repository (a bad path fails here, before any connection), then runs the observer.
fn run(args: Args) -> anyhow::Result<()> {
    let mirror_dir = args.mirror_dir.clone().unwrap_or_else(default_mirror_dir);
    if let Some(path) = &args.git_credentials {
        jetci::git::use_credentials(jetci::git::CredentialStore::load(path)?);
    }
    let watched = Watched::open(&args.repo, &mirror_dir)?;
    let repo = match &args.name {
        Some(name) => {
            check_token("--name", name)?;
            name.clone()
        }
        // The canonical path, so that `.` is named after the directory.
        None => repo_slug(&watched.url),
    };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the tokio runtime")?;
    let result = runtime.block_on(observe(args, repo, watched));
    // A fetch stuck on a dead network must not hold the exit (the git work runs on the blocking
    // pool, see `poll`).
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

/// Connects, then polls until SIGINT or SIGTERM.
async fn observe(args: Args, repo: String, watched: Watched) -> anyhow::Result<()> {
    let shutdown = Shutdown::install().context("cannot install the signal handlers")?;
    let nats = args
        .connect
        .connect(&format!("jetci-observer {repo}"))
        .await?;
    let streams = jetci::streams::setup(&nats).await?;
    let config = jetci::observer::Config {
        repo,
        watched,
        branches: args.branches,
        poll_interval: args.poll_interval,
    };
    jetci::observer::run(nats, streams, config, shutdown.token).await?;
    Ok(())
}

fn parse_glob(s: &str) -> Result<Pattern, String> {
    Pattern::new(s).map_err(|e| e.to_string())
}

/// `$XDG_CACHE_HOME/jetci/mirrors`, else `~/.cache/jetci/mirrors`, else under the temp dir.
fn default_mirror_dir() -> PathBuf {
    let absolute = |v: std::ffi::OsString| Some(PathBuf::from(v)).filter(|p| p.is_absolute());
    std::env::var_os("XDG_CACHE_HOME")
        .and_then(absolute)
        .or_else(|| {
            std::env::var_os("HOME")
                .and_then(absolute)
                .map(|h| h.join(".cache"))
        })
        .unwrap_or_else(std::env::temp_dir)
        .join("jetci")
        .join("mirrors")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn flags_parse() {
        Args::command().debug_assert();
        let a = Args::try_parse_from(["jetci-observer", "/srv/app.git"]).unwrap();
        assert_eq!(a.poll_interval, Duration::from_secs(1));
        assert!(a.branches.matches("feature/a.b"));
        let a = Args::try_parse_from([
            "jetci-observer",
            "--poll-interval",
            "250ms",
            "--branches",
            "release/*",
            "x",
        ])
        .unwrap();
        assert_eq!(a.poll_interval, Duration::from_millis(250));
        assert!(a.branches.matches("release/1.0"));
        assert!(!a.branches.matches("main"));
        assert!(Args::try_parse_from(["jetci-observer", "--poll-interval", "0s", "x"]).is_err());
        assert!(Args::try_parse_from(["jetci-observer", "--poll-interval", "2days", "x"]).is_err());
        assert!(Args::try_parse_from(["jetci-observer", "--branches", "[", "x"]).is_err());
    }
}
