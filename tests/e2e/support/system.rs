//! Starting jetci's processes the way the end-to-end tests do.
//!
//! Each `spawn_*` function starts one real binary with the connection flag (`-s URL`) and the
//! flags every test uses, followed by the test's own `extra` flags (metrics addresses,
//! credentials, labels, ...). [`System`] starts the usual set in one call: an observer on a
//! repository, one dispatcher and named runners. What they start is a [`Proc`], killed (with
//! everything it started) when it is dropped.
//!
//! The defaults are part of what the tests check, so they are spelled out here once:
//! - the observer polls every 200 ms, so a test waits for a new commit for a moment, not a
//!   second, and calls the repository [`REPO`] (`app`), so subjects and job keys are
//!   predictable ([`app_job`]);
//! - a runner `ID` works in `WORK/ID`, so runners of one test never share a workspace.

use std::path::Path;

use jetci::subjects::JobRef;
use tempfile::TempDir;

use super::git::GitRepo;
use super::nats::NatsServer;
use super::processes::Proc;

/// The name the observer gives the repository under test (`--name app`).
pub const REPO: &str = "app";

/// The observer flags of every test that does not pass its own (see the module's doc).
const OBSERVER_FLAGS: [&str; 4] = ["--poll-interval", "200ms", "--name", REPO];

/// The only job of the first run of commit `sha` of [`REPO`]: its `key()` is the job's `ci-jobs`
/// key, `run_key()` the run's, `attempt_id(n)` its attempt `n`.
pub fn app_job(sha: &str) -> JobRef {
    JobRef::only(REPO, sha, 1)
}

/// Starts `jetci-observer -s URL --poll-interval 200ms --name app EXTRA... REPO`.
pub fn spawn_observer(url: &str, repo: &GitRepo, extra: &[&str]) -> Proc {
    spawn_observer_at(url, repo.path(), &[&OBSERVER_FLAGS[..], extra].concat())
}

/// Starts `jetci-observer -s URL FLAGS... PATH` with no default flags, for a repository that is
/// not a [`GitRepo`] (a bare one) or a test that needs another poll interval or name.
pub fn spawn_observer_at(url: &str, path: &Path, flags: &[&str]) -> Proc {
    let path = path.to_str().expect("utf-8 repository path");
    let args = [&["-s", url][..], flags, &[path]].concat();
    Proc::spawn("jetci-observer", &args, &[])
}

/// Starts `jetci-dispatcher -s URL EXTRA...`.
pub fn spawn_dispatcher(url: &str, extra: &[&str]) -> Proc {
    Proc::spawn("jetci-dispatcher", &[&["-s", url][..], extra].concat(), &[])
}

/// Starts `jetci-runner -s URL --id ID --work-dir WORK/ID EXTRA...`.
pub fn spawn_runner(url: &str, id: &str, work: &Path, extra: &[&str]) -> Proc {
    spawn_runner_with_env(url, id, work, extra, &[])
}

/// Like [`spawn_runner`], with extra environment variables for the runner (which it must keep
/// from the jobs it runs).
pub fn spawn_runner_with_env(
    url: &str,
    id: &str,
    work: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Proc {
    let dir = work.join(id);
    let dir = dir.to_str().expect("utf-8 work dir");
    let args = [&["-s", url, "--id", id, "--work-dir", dir][..], extra].concat();
    Proc::spawn("jetci-runner", &args, env)
}

/// Starts `jetci-web -s URL --listen ADDR EXTRA...`; `addr` is `127.0.0.1:PORT` (see
/// [`super::nats::free_addr`]).
pub fn spawn_web(url: &str, addr: &str, extra: &[&str]) -> Proc {
    let args = [&["-s", url, "--listen", addr][..], extra].concat();
    Proc::spawn("jetci-web", &args, &[])
}

/// One jetci installation on a test server: an observer on one repository (the usual flags, see
/// the module's doc), one dispatcher and any number of runners, each in its own directory under
/// [`System::work`]. The fields are public so a test can kill, replace or read any of them;
/// everything is killed when the `System` is dropped, and the work directory removed after.
pub struct System {
    /// The server's URL.
    pub url: String,
    pub observer: Proc,
    pub dispatcher: Proc,
    /// In the order they were started.
    pub runners: Vec<Proc>,
    /// Holds the runners' work directories (and whatever else a test puts there).
    pub work: TempDir,
}

impl System {
    /// Starts the observer on `repo`, a dispatcher, and one runner per id in `runners` (none is
    /// fine: jobs then wait for one).
    pub fn start(nats: &NatsServer, repo: &GitRepo, runners: &[&str]) -> System {
        System::start_with(nats, repo, runners, &[])
    }

    /// [`System::start`] with `runner_flags` for every runner (such as
    /// [`super::executions::Executions::runner_flags`]).
    pub fn start_with(
        nats: &NatsServer,
        repo: &GitRepo,
        runners: &[&str],
        runner_flags: &[&str],
    ) -> System {
        let url = nats.url();
        let work = tempfile::tempdir().expect("cannot create a work dir for the runners");
        let observer = spawn_observer(&url, repo, &[]);
        let dispatcher = spawn_dispatcher(&url, &[]);
        let runners = runners
            .iter()
            .map(|id| spawn_runner(&url, id, work.path(), runner_flags))
            .collect();
        System {
            url,
            observer,
            dispatcher,
            runners,
            work,
        }
    }

    /// Starts one more runner `id` with `extra` flags and `env`, and returns it.
    pub fn add_runner(&mut self, id: &str, extra: &[&str], env: &[(&str, &str)]) -> &mut Proc {
        let runner = spawn_runner_with_env(&self.url, id, self.work.path(), extra, env);
        self.runners.push(runner);
        self.runners.last_mut().expect("a runner was just added")
    }
}
