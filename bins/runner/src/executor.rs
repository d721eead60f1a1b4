//! The work of a job on this runner, as the library's runner loop runs it ([`jetci::runner`]):
//! a fresh workspace, a checkout of the commit from the runner's mirror (git2), the repository's
//! `.jetci.toml`, then `sh -c COMMAND` with a built environment ([`crate::exec`]), its output
//! streamed to `CI_LOGS` ([`crate::logs`]) and its test counts read from the output or JUnit
//! files. The protocol around it (claim, heartbeat, fence, verdict, ack) is the library's.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv;
use jetci::connect::Nats;
use jetci::git::{CheckoutError, Mirror};
use jetci::messages::{JobMsg, ResultMsg, Status, TestCounts};
use jetci::pipeline::{self, shard, timings, Resolved};
use jetci::repo_config::{check_size, RepoConfig, FILE_NAME};
use jetci::runner::{Execution, Executor};
use jetci::test_report::{read_junit_report, CaseTime, OutputScanner};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::exec::{self, Ended, Sandboxed, Spec};
use crate::logs::LogSink;
use crate::sandbox::{JobDirs, Sandbox};

/// Variables passed from the runner's environment to a job; everything else is built.
const PASSED_ENV: &[&str] = &[
    "PATH",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "LC_MESSAGES",
    "TZ",
    "TERM",
    "USER",
    "LOGNAME",
    "PYENV_ROOT",
    "PYENV_VERSION",
];

/// The most characters of a command quoted in a reason (a command may be megabytes long).
const SHOWN_COMMAND: usize = 200;

/// How a job's command is run: the runner's flags that shape a job.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The runner's id, in messages and `JETCI_RUNNER`.
    pub id: String,
    /// Mirrors live in `<work_dir>/mirrors`, workspaces in `<work_dir>/jobs/<attempt id>`.
    pub work_dir: PathBuf,
    /// For repositories without a `.jetci.toml` command.
    pub default_command: String,
    /// For repositories whose `.jetci.toml` sets no timeout.
    pub default_timeout: Duration,
    /// Between SIGTERM and SIGKILL.
    pub grace: Duration,
    /// Bytes of output stored per job in `CI_LOGS`.
    pub log_cap: u64,
    /// Keep each job's workspace after it ends.
    pub keep_workspaces: bool,
    /// More variables passed from the runner's environment.
    pub pass_env: Vec<String>,
    /// A directory shared by every job, exposed as `JETCI_CACHE_DIR`: the only thing one job
    /// may leave for the next.
    pub cache_dir: Option<PathBuf>,
    /// The sandbox every job runs in (`None`: `--sandbox none`, or `auto` where bwrap does not
    /// work).
    pub sandbox: Option<Sandbox>,
    /// At most this many processes at once per job (in a sandbox only).
    pub max_procs: Option<u32>,
    /// Where each job's pids cgroup is made, where the kernel allows it ([`crate::cgroup`]).
    pub pids: Option<crate::cgroup::PidsParent>,
}

/// The name of the file, in the job's TMPDIR, that lists its shard's tests (`JETCI_SHARD_TESTS`).
const SHARD_TESTS_FILE: &str = "jetci-shard-tests.txt";

/// Checks a job out into a fresh workspace and runs its command there.
pub struct ShellExecutor {
    nats: Nats,
    /// `ci-timings` and `ci-shards` ([`timings`]).
    timings: kv::Store,
    splits: kv::Store,
    settings: Settings,
    /// One lock per mirror: jobs of one repository fetch one at a time.
    mirrors: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
}

impl Executor for ShellExecutor {
    /// Workspaces of a previous life are garbage (earlier builds moved them to `trash` first;
    /// kept results are the runner's, in `pending/`), and test processes it left running are
    /// killed ([`exec::kill_orphans`]).
    async fn prepare(&self) {
        let work_dir = self.settings.work_dir.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let _ = std::fs::remove_dir_all(work_dir.join("jobs"));
            let _ = std::fs::remove_dir_all(work_dir.join("trash"));
        })
        .await;
        let orphans = exec::kill_orphans(&self.owner()).await;
        if orphans > 0 {
            tracing::warn!(
                processes = orphans,
                "killed test processes left by an earlier run of this runner"
            );
        }
    }

    async fn execute(
        &self,
        job: &JobMsg,
        result: ResultMsg,
        stop: &CancellationToken,
    ) -> Execution {
        self.run(job, result, stop).await
    }

    /// Deletes the job's workspace in the background (one blocking task, not awaited), so the
    /// slot is free for the next job at once. What a stopped runner leaves behind is deleted at
    /// its next start.
    fn release(&self, job: &JobMsg) {
        if self.settings.keep_workspaces {
            return;
        }
        let dir = self.job_dir(&job.attempt_id());
        tokio::task::spawn_blocking(move || {
            let _ = std::fs::remove_dir_all(dir);
        });
    }
}

impl ShellExecutor {
    /// An executor that publishes logs with `nats` and keeps shard timings and splits in
    /// `stores` (`ci-timings`, `ci-shards`).
    pub fn new(nats: Nats, stores: (kv::Store, kv::Store), settings: Settings) -> ShellExecutor {
        ShellExecutor {
            nats,
            timings: stores.0,
            splits: stores.1,
            settings,
            mirrors: Mutex::new(HashMap::new()),
        }
    }

    /// This runner's mark on its jobs' processes: a hash of its work dir, stable across restarts.
    pub fn owner(&self) -> String {
        owner_of(&self.settings.work_dir)
    }

    fn job_dir(&self, attempt_id: &str) -> PathBuf {
        self.settings.work_dir.join("jobs").join(attempt_id)
    }

    /// Checks out and runs the job. A failure of the test or of its configuration becomes the
    /// result's status and reason; a failed checkout asks for another attempt.
    async fn run(
        &self,
        job: &JobMsg,
        mut result: ResultMsg,
        stop: &CancellationToken,
    ) -> Execution {
        let clock = std::time::Instant::now();
        let log_subject = result.log_subject.clone();
        match self.prepare(job).await {
            Err(Prepare::Retry(reason)) => return Execution::Retry(reason),
            Err(Prepare::Fail(reason)) => {
                result.output_tail = format!("jetci: {reason}\n");
                result.reason = Some(reason);
            }
            Ok((spec, config, tests)) => {
                let mut output = JobOutput {
                    log: LogSink::start(&self.nats, log_subject, self.settings.log_cap),
                    scanner: OutputScanner::new(),
                };
                let outcome = exec::run(&spec, &mut output, stop).await;
                // The command's time, not the log upload's (slow while NATS recovers).
                result.finished_at = OffsetDateTime::now_utc();
                result.duration_ms = clock.elapsed().as_millis() as u64;
                output.log.finish(&self.nats, Duration::from_secs(10)).await;
                let (counts, measured) = test_counts(
                    &result.job_id,
                    &spec.dir,
                    &config.junit,
                    &tests,
                    output.scanner,
                )
                .await;
                result.tests = counts;
                if let Some(base) = &config.base {
                    self.record_times(job, base, &tests, &measured).await;
                }
                match outcome {
                    Err(e) => {
                        let command = jetci::limits::clip(&spec.command, SHOWN_COMMAND);
                        result.reason = Some(format!("cannot start `sh -c {command}`: {e}"))
                    }
                    Ok(o) => {
                        result.log_bytes = o.output_bytes;
                        result.output_tail = String::from_utf8_lossy(&o.tail).into_owned();
                        let (status, code, signal, reason) = verdict(o.ended, spec.timeout);
                        result.status = status;
                        result.exit_code = code;
                        result.signal = signal;
                        result.reason = reason;
                    }
                }
            }
        }
        if result.duration_ms == 0 {
            result.finished_at = OffsetDateTime::now_utc();
            result.duration_ms = clock.elapsed().as_millis() as u64;
        }
        Execution::Done(result)
    }

    /// A fresh checkout of the job's commit, its config and its environment.
    ///
    /// Errors: [`Prepare::Retry`] when the workspace or the checkout fails (the network, the
    /// disk, a repository that moved: worth another attempt, maybe on another runner);
    /// [`Prepare::Fail`] when the commit's own `.jetci.toml` is wrong (every attempt would fail
    /// the same way).
    ///
    /// For a job with `shard_tests`, the third part is its whole test list (every shard's).
    async fn prepare(&self, job: &JobMsg) -> Result<(Spec, Resolved, Vec<String>), Prepare> {
        let dir = self.job_dir(&job.attempt_id());
        let src = dir.join("src");
        let home = dir.join("home");
        let tmp = dir.join("tmp");
        let mirrors = self.settings.work_dir.join("mirrors");
        let lock = {
            let mut map = self.mirrors.lock().expect("lock");
            map.entry(Mirror::path_for(&job.url, &mirrors))
                .or_default()
                .clone()
        };
        let guard = lock.lock_owned().await;
        // One blocking task for the whole file-system part: each hop to the blocking pool costs
        // tens of microseconds, and this part used to take seven.
        let (url, sha, id) = (job.url.clone(), job.sha.clone(), self.settings.id.clone());
        let (src_dir, home_dir, tmp_dir) = (src.clone(), home.clone(), tmp.clone());
        let prepared = tokio::task::spawn_blocking(move || -> Result<Option<String>, Prepare> {
            let _ = std::fs::remove_dir_all(&dir);
            for d in [&src_dir, &home_dir, &tmp_dir] {
                std::fs::create_dir_all(d).map_err(|e| {
                    Prepare::Retry(format!("cannot create {} on runner {id}: {e}", d.display()))
                })?;
            }
            let checkout = Mirror::open(&url, &mirrors).and_then(|mirror| {
                let oid = mirror.ensure_commit(&sha)?;
                Ok(mirror.checkout(oid, &src_dir))
            });
            drop(guard);
            match checkout {
                Ok(Ok(())) => {}
                // The commit's own doing: every attempt would be refused the same way.
                Ok(Err(CheckoutError::Refused(e))) => {
                    return Err(Prepare::Fail(format!("checkout refused: {e}")))
                }
                Ok(Err(CheckoutError::Failed(e))) | Err(e) => {
                    return Err(Prepare::Retry(format!(
                        "checkout failed on runner {id}: {e}"
                    )))
                }
            }
            read_config(&src_dir.join(FILE_NAME))
        })
        .await
        .map_err(|e| {
            Prepare::Retry(format!(
                "checkout task failed on runner {}: {e}",
                self.settings.id
            ))
        })??;
        let config = match prepared {
            Some(text) => RepoConfig::parse(&text).map_err(|e| Prepare::Fail(e.to_string()))?,
            None => RepoConfig::default(),
        };
        // The job the message names: a pipeline's job, or the run's only one.
        let resolved = pipeline::resolve(&config, &job.branch, job.job.as_deref())
            .map_err(|e| Prepare::Fail(e.to_string()))?;
        if self.settings.sandbox.is_none() && config.network == Some(false) {
            // Only a sandbox can take the network away: never run such a job with it.
            return Err(Prepare::Fail(format!(
                "the repository asks for no network (network = false in {FILE_NAME}), and runner \
                 {} runs jobs without a sandbox, which cannot take the network away",
                self.settings.id
            )));
        }
        let mut env = self.job_env(job, &home, &tmp, &resolved.env);
        let tests = if resolved.shard_tests.is_empty() {
            vec![]
        } else {
            let file = tmp.join(SHARD_TESTS_FILE);
            let tests = self.shard_tests(job, &resolved, &src, &file).await?;
            env.push(("JETCI_SHARD_TESTS".into(), file.display().to_string()));
            tests
        };
        let sandbox = self.settings.sandbox.as_ref().map(|sandbox| {
            let dirs = JobDirs {
                checkout: src.clone(),
                home,
                tmp,
                cache: self.settings.cache_dir.clone(),
            };
            Sandboxed {
                program: sandbox.program.clone(),
                args: sandbox.command(&dirs, config.network.unwrap_or(true)),
                max_procs: self.settings.max_procs,
                pids: self.settings.pids.clone(),
            }
        });
        let spec = Spec {
            command: resolved
                .command
                .clone()
                .unwrap_or_else(|| self.settings.default_command.clone()),
            dir: src,
            env,
            timeout: resolved.timeout.unwrap_or(self.settings.default_timeout),
            grace: self.settings.grace,
            owner: self.owner(),
            sandbox,
        };
        Ok((spec, resolved, tests))
    }

    /// Lists the job's tests in the checkout, takes the commit's split (made now, or by a shard
    /// that started earlier) and writes this shard's part to `file`, one path per line.
    /// Returns the whole list.
    ///
    /// Errors: [`Prepare::Fail`] for a listing the globs cannot make (too many files, a loop of
    /// directories too large) or a split that does not fit; [`Prepare::Retry`] when JetStream
    /// does not answer or the file cannot be written.
    async fn shard_tests(
        &self,
        job: &JobMsg,
        resolved: &Resolved,
        checkout: &Path,
        file: &Path,
    ) -> Result<Vec<String>, Prepare> {
        let (dir, globs) = (checkout.to_path_buf(), resolved.shard_tests.clone());
        let tests = tokio::task::spawn_blocking(move || shard::list_tests(&dir, &globs))
            .await
            .map_err(|e| Prepare::Retry(format!("listing the tests failed: {e}")))?
            .map_err(Prepare::Fail)?;
        let (index, count) = resolved.shard.unwrap_or((0, 1));
        let base = resolved.base.as_deref().unwrap_or("job");
        let split = timings::split_for(
            &self.timings,
            &self.splits,
            &job.repo,
            &job.sha,
            base,
            &tests,
            count,
        )
        .await
        .map_err(Prepare::Retry)?;
        let part = split.part(&tests, index, count).map_err(Prepare::Fail)?;
        let mut text = part.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        tokio::fs::write(file, text)
            .await
            .map_err(|e| Prepare::Retry(format!("cannot write {}: {e}", file.display())))?;
        tracing::debug!(job = %job.attempt_id(), tests = tests.len(), part = part.len(), timed = split.timed, "shard's tests chosen");
        Ok(tests)
    }

    /// Adds this shard's testcase times to the job's timings; a failure is logged and changes
    /// nothing else (the next split is only less balanced).
    async fn record_times(
        &self,
        job: &JobMsg,
        base: &str,
        tests: &[String],
        measured: &BTreeMap<String, u64>,
    ) {
        if measured.is_empty() {
            return;
        }
        match timings::record_times(&self.timings, &job.repo, base, tests, measured).await {
            Ok(files) => tracing::debug!(job = %job.attempt_id(), files, "test timings recorded"),
            Err(e) => {
                tracing::warn!(job = %job.attempt_id(), error = %e, "test timings not recorded")
            }
        }
    }

    /// The job's environment: a short allow-list from the runner's own, a fresh HOME and TMPDIR,
    /// the repository's `env`, and the job's identity as `JETCI_*`. The runner's NATS settings
    /// and credentials never reach the test.
    fn job_env(
        &self,
        job: &JobMsg,
        home: &Path,
        tmp: &Path,
        repo_env: &[(String, String)],
    ) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = PASSED_ENV
            .iter()
            .map(|s| s.to_string())
            .chain(self.settings.pass_env.iter().cloned())
            .filter_map(|k| std::env::var(&k).ok().map(|v| (k, v)))
            .collect();
        if !env.iter().any(|(k, _)| k == "PATH") {
            env.push(("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()));
        }
        env.push(("HOME".into(), home.display().to_string()));
        env.push(("TMPDIR".into(), tmp.display().to_string()));
        env.push(("CI".into(), "true".into()));
        if let Some(cache) = &self.settings.cache_dir {
            env.push(("JETCI_CACHE_DIR".into(), cache.display().to_string()));
        }
        env.extend(repo_env.iter().cloned());
        env.extend([
            ("JETCI_REPO".to_string(), job.repo.clone()),
            ("JETCI_BRANCH".to_string(), job.branch.clone()),
            ("JETCI_COMMIT".to_string(), job.sha.clone()),
            ("JETCI_RUN".to_string(), job.run.to_string()),
            ("JETCI_ATTEMPT".to_string(), job.attempt.to_string()),
            ("JETCI_RUNNER".to_string(), self.settings.id.clone()),
        ]);
        env
    }
}

/// The result's test counts: the repository's JUnit XML files when its `junit` globs match some,
/// else the unittest or pytest summary found in the output. An unreadable report is logged and
/// never changes the job's status. For a job with a test list (`shard_tests`), the JUnit
/// testcases' times summed by test file as well ([`shard::FileIndex`]), all of it off the
/// async threads: a hostile report must not delay the heartbeats.
async fn test_counts(
    job_id: &str,
    checkout: &Path,
    junit: &[String],
    tests: &[String],
    scanner: OutputScanner,
) -> (Option<TestCounts>, BTreeMap<String, u64>) {
    if !junit.is_empty() {
        let (dir, globs, tests) = (checkout.to_path_buf(), junit.to_vec(), tests.to_vec());
        let read = tokio::task::spawn_blocking(move || {
            let mut measured = BTreeMap::new();
            if tests.is_empty() {
                return read_junit_report(&dir, &globs, None).map(|c| (c, measured));
            }
            let index = shard::FileIndex::new(&tests);
            let mut on_case = |case: CaseTime| index.measure(&case, &mut measured);
            let counts = read_junit_report(&dir, &globs, Some(&mut on_case))?;
            Ok((counts, measured))
        })
        .await;
        match read {
            Ok(Ok((Some(counts), measured))) => return (Some(counts), measured),
            Ok(Ok((None, _))) => {}
            Ok(Err(e)) => {
                tracing::warn!(job = %job_id, error = %e, "cannot read a JUnit report; counting from the output")
            }
            Err(e) => {
                tracing::warn!(job = %job_id, error = %e, "JUnit reading failed; counting from the output")
            }
        }
    }
    (scanner.finish(), BTreeMap::new())
}

/// The checkout's `.jetci.toml`, `None` when it has none. Only a regular file is read (a
/// symlink could point outside the checkout), and only when its size is within the limit
/// ([`check_size`]): a huge file is the commit's `error`, not the runner's memory.
fn read_config(path: &Path) -> Result<Option<String>, Prepare> {
    let cannot_read = |e: std::io::Error| Prepare::Fail(format!("cannot read {FILE_NAME}: {e}"));
    let meta = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(cannot_read(e)),
        Ok(meta) => meta,
    };
    if !meta.file_type().is_file() {
        return Err(Prepare::Fail(format!(
            "{FILE_NAME} must be a regular file (not a symlink or a directory)"
        )));
    }
    check_size(meta.len()).map_err(|e| Prepare::Fail(e.to_string()))?;
    std::fs::read_to_string(path).map(Some).map_err(cannot_read)
}

/// Why a job could not be prepared.
enum Prepare {
    /// Worth another attempt.
    Retry(String),
    /// The commit's own fault: the result is `error` with this reason.
    Fail(String),
}

/// A job's output goes to its log and to the test-count scanner.
struct JobOutput {
    log: LogSink,
    scanner: OutputScanner,
}

impl exec::Output for JobOutput {
    async fn write(&mut self, bytes: &[u8]) {
        self.scanner.feed(bytes);
        self.log.write(bytes).await;
    }
}

/// Maps how the command ended to the result's status, exit code, signal and reason.
fn verdict(ended: Ended, timeout: Duration) -> (Status, Option<i32>, Option<i32>, Option<String>) {
    match ended {
        Ended::Exited(0) => (Status::Passed, Some(0), None, None),
        Ended::Exited(code) => (Status::Failed, Some(code), None, None),
        Ended::Signaled(sig) => (
            Status::Failed,
            None,
            Some(sig),
            Some(format!(
                "the command was killed by signal {sig} ({})",
                signal_name(sig)
            )),
        ),
        Ended::TimedOut { signal } => (
            Status::TimedOut,
            None,
            signal,
            Some(format!(
                "the command ran past its timeout of {}",
                humantime::format_duration(timeout)
            )),
        ),
        Ended::Cancelled { signal } => (
            Status::Cancelled,
            None,
            signal,
            Some("the job was cancelled".into()),
        ),
        Ended::Bound { processes } => (
            Status::Error,
            None,
            Some(9),
            Some(format!(
                "the job was killed for reaching its bound of {processes} processes \
                 (the runner's --max-procs)"
            )),
        ),
    }
}

fn signal_name(sig: i32) -> &'static str {
    nix::sys::signal::Signal::try_from(sig)
        .map(|s| s.as_str())
        .unwrap_or("unknown")
}

/// The mark of the runner working in `work_dir` on its jobs' processes: a hash of the directory,
/// stable across restarts ([`exec::kill_orphans`] finds what a killed runner left with it).
pub fn owner_of(work_dir: &Path) -> String {
    let dir = std::fs::canonicalize(work_dir).unwrap_or_else(|_| work_dir.to_path_buf());
    format!("runner{}", jetci::git::text_hash(&dir.to_string_lossy()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        let t = Duration::from_secs(90);
        assert_eq!(verdict(Ended::Exited(0), t).0, Status::Passed);
        assert_eq!(verdict(Ended::Exited(1), t).0, Status::Failed);
        let (s, code, sig, reason) = verdict(Ended::Signaled(9), t);
        assert_eq!((s, code, sig), (Status::Failed, None, Some(9)));
        assert!(reason.unwrap().contains("SIGKILL"));
        let (s, _, _, reason) = verdict(Ended::TimedOut { signal: Some(15) }, t);
        assert_eq!(s, Status::TimedOut);
        assert!(reason.unwrap().contains("1m 30s"));
        assert_eq!(
            verdict(Ended::Cancelled { signal: None }, t).0,
            Status::Cancelled
        );
        let (s, _, _, reason) = verdict(Ended::Bound { processes: 64 }, t);
        assert_eq!(s, Status::Error);
        assert!(reason.unwrap().contains("bound of 64 processes"));
    }
}
