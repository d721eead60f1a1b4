//! One job, from its message to its acked result:
//!
//! claim (fenced by `ci-jobs`) → heartbeat → checkout → run → publish result → mark final → ack.
//!
//! Ordering matters for DESIGN.md's invariants: the result is published *before* the job state
//! says `final` and before the job message is acked, so a crash at any point leaves either no
//! result (the dispatcher reassigns after the lease) or a stored one (the dispatcher sees it and
//! closes the commit); never a closed commit without a result (I1).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use jetci::attempt::{self, Attempt, Renewal, Written};
use jetci::connect::Nats;
use jetci::git::Mirror;
use jetci::messages::{
    self, decode, JobMsg, JobPhase, JobState, ResultMsg, Status, TestCounts, VERSION,
};
use jetci::repo_config::{RepoConfig, FILE_NAME};
use jetci::results::{publish_final, publish_superseded, Published};
use jetci::streams::Streams;
use jetci::test_report::{read_junit, OutputScanner};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::exec::{self, Ended, Spec};
use crate::logs::LogSink;

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

/// The runner's settings and shared state.
pub struct Runner {
    pub nats: Nats,
    pub streams: Streams,
    pub id: String,
    pub work_dir: PathBuf,
    pub default_command: String,
    pub default_timeout: Duration,
    pub grace: Duration,
    pub heartbeat: Duration,
    pub log_cap: u64,
    pub keep_workspaces: bool,
    pub pass_env: Vec<String>,
    /// A directory shared by every job (`--cache-dir`), exposed as `JETCI_CACHE_DIR`; the only
    /// thing one job may leave for the next.
    pub cache_dir: Option<PathBuf>,
    /// Job ids running now (reported in `ci-runners`).
    pub active: Mutex<BTreeSet<String>>,
    /// One lock per mirror: jobs of one repository fetch one at a time.
    mirrors: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
}

/// Why a running job was stopped before it finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Another attempt owns the job now: run nothing more, publish no verdict.
    Superseded,
    /// The runner is shutting down in a hurry: hand the job back (no result, no ack).
    HandBack,
    /// A user cancelled it (`jetci cancel`): stop the command, report `cancelled`.
    Cancel,
}

impl Runner {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        nats: Nats,
        streams: Streams,
        id: String,
        work_dir: PathBuf,
        default_command: String,
        default_timeout: Duration,
        heartbeat: Duration,
        log_cap: u64,
        keep_workspaces: bool,
        pass_env: Vec<String>,
    ) -> Runner {
        Runner {
            nats,
            streams,
            id,
            work_dir,
            default_command,
            default_timeout,
            grace: Duration::from_secs(5),
            heartbeat,
            log_cap,
            keep_workspaces,
            pass_env,
            cache_dir: None,
            active: Mutex::new(BTreeSet::new()),
            mirrors: Mutex::new(HashMap::new()),
        }
    }

    /// This runner's mark on its jobs' processes: a hash of its work dir, stable across restarts.
    pub fn owner(&self) -> String {
        let dir = std::fs::canonicalize(&self.work_dir).unwrap_or_else(|_| self.work_dir.clone());
        format!("runner{}", jetci::git::text_hash(&dir.to_string_lossy()))
    }

    pub fn pending_dir(&self) -> PathBuf {
        self.work_dir.join("pending")
    }

    /// Handles one delivered job message; never panics on its content (I5).
    pub async fn handle(self: Arc<Self>, msg: jetstream::Message, hurry: CancellationToken) {
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        let job: JobMsg = match decode(&msg.payload) {
            Ok(job) => job,
            Err(e) => {
                tracing::warn!(subject = %msg.subject, seq, error = %e, "terminating a job message that does not parse");
                let _ = msg.ack_with(AckKind::Term).await;
                return;
            }
        };
        if job.runner != self.id {
            tracing::warn!(subject = %msg.subject, seq, runner = %job.runner, "terminating a job addressed to another runner");
            let _ = msg.ack_with(AckKind::Term).await;
            return;
        }
        let job_id = job.job_id();
        let assigned = attempt::assigned_in(msg.headers.as_ref());
        let claimed = match Attempt::new(&self.streams.job_states, &job, &self.id)
            .claim(seq, assigned, self.epoch())
            .await
        {
            Ok(Some(written)) => written,
            Ok(None) => {
                tracing::info!(job = %job_id, "job was superseded or is already final; skipping it");
                let _ = msg.double_ack().await;
                return;
            }
            Err(e) => {
                // The dispatcher will reassign when the lease passes; leave the message for then.
                tracing::warn!(job = %job_id, error = %e, "cannot claim the job; leaving it");
                return;
            }
        };
        let cancelled = claimed.state.cancel.clone();
        if cancelled.is_none() {
            tracing::info!(job = %job_id, branch = ?job.branch, "running job");
        }
        self.active.lock().expect("lock").insert(job_id.clone());

        let msg = Arc::new(msg);
        let stop = CancellationToken::new();
        let stop_reason = Arc::new(Mutex::new(None::<Stop>));
        let written = Arc::new(Mutex::new(claimed));
        let heartbeat = tokio::spawn(self.clone().heartbeat(
            job.clone(),
            msg.clone(),
            written.clone(),
            stop.clone(),
            stop_reason.clone(),
        ));
        {
            let (stop, reason) = (stop.clone(), stop_reason.clone());
            let hurry = hurry.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = hurry.cancelled() => {
                        reason.lock().expect("lock").get_or_insert(Stop::HandBack);
                        stop.cancel();
                    }
                    _ = stop.cancelled() => {}
                }
            });
        }

        let verdict = match cancelled {
            // `jetci cancel` came between the assignment and the claim: the command never starts.
            Some(who) => {
                tracing::info!(job = %job_id, who = %who, "job cancelled before it started; not running it");
                let mut result = self.result_of(&job);
                let reason = format!("cancelled {who}");
                result.status = Status::Cancelled;
                result.output_tail = format!("jetci: {reason}\n");
                result.reason = Some(reason);
                Verdict::Done(Box::new(result))
            }
            None => self.execute(&job, &stop).await,
        };
        let why = *stop_reason.lock().expect("lock");
        match (why, verdict) {
            (Some(Stop::HandBack), _) => {
                heartbeat.abort();
                let reason = format!("handed back by runner {} (shutting down)", self.id);
                self.hand_back(&job, reason).await;
            }
            (Some(Stop::Superseded), verdict) => {
                heartbeat.abort();
                if let Verdict::Done(result) = verdict {
                    self.record_superseded(&result).await;
                }
                let _ = msg.double_ack().await;
            }
            (None | Some(Stop::Cancel), Verdict::Retry(reason)) => {
                // Not the test's fault (the checkout failed): another attempt, maybe elsewhere.
                heartbeat.abort();
                self.hand_back(&job, reason).await;
                let _ = msg.double_ack().await;
            }
            (None | Some(Stop::Cancel), Verdict::Done(result)) => {
                match self.fence(&job, &written).await {
                    Renewal::Held(fenced) => self.deliver(&result, Some(fenced), heartbeat).await,
                    Renewal::Unreachable => self.deliver(&result, None, heartbeat).await,
                    Renewal::Lost => {
                        heartbeat.abort();
                        self.record_superseded(&result).await;
                    }
                }
                // The job state says final already: a lost ack only brings the message back,
                // and its claim then skips it. A plain ack goes out before this connection's
                // next pull, so the server frees the slot first (JETSTREAM-NOTES 5.1).
                let _ = msg.ack().await;
            }
        }
        stop.cancel();
        self.active.lock().expect("lock").remove(&job_id);
        if !self.keep_workspaces {
            self.remove_workspace(&job_id);
        }
    }

    /// Deletes the job's workspace in the background (one blocking task, not awaited), so the
    /// slot is free for the next job at once. What a stopped runner leaves behind is deleted at
    /// its next start.
    fn remove_workspace(&self, job_id: &str) {
        let dir = self.job_dir(job_id);
        tokio::task::spawn_blocking(move || {
            let _ = std::fs::remove_dir_all(dir);
        });
    }

    /// Every `heartbeat`: extend the job message's deadline and renew the job state (the
    /// dispatcher's proof of life). A state that names another attempt stops the job as
    /// superseded; a cancel request stops the command. The task runs until the caller aborts it
    /// after the result is out, so the lease holds while the result is on its way.
    async fn heartbeat(
        self: Arc<Self>,
        job: JobMsg,
        msg: Arc<jetstream::Message>,
        written: Arc<Mutex<Written>>,
        stop: CancellationToken,
        reason: Arc<Mutex<Option<Stop>>>,
    ) {
        // The claim was the first beat.
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + self.heartbeat, self.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let _ = msg.ack_with(AckKind::Progress).await;
            match self
                .renew(&job, &written, |s| s.phase = JobPhase::Running)
                .await
            {
                Renewal::Held(w) => {
                    if let Some(who) = &w.state.cancel {
                        if !stop.is_cancelled() {
                            tracing::info!(job = %job.job_id(), who = %who, "job cancelled; stopping its command");
                            reason.lock().expect("lock").get_or_insert(Stop::Cancel);
                            stop.cancel();
                        }
                    }
                }
                Renewal::Unreachable => {
                    tracing::warn!(job = %job.job_id(), "heartbeat failed (NATS unreachable); the test goes on");
                }
                Renewal::Lost => {
                    tracing::warn!(job = %job.job_id(), "the job was given to another attempt; stopping it");
                    reason.lock().expect("lock").get_or_insert(Stop::Superseded);
                    stop.cancel();
                    return;
                }
            }
        }
    }

    fn job_dir(&self, job_id: &str) -> PathBuf {
        self.work_dir.join("jobs").join(job_id)
    }

    /// The fence before a verdict ([`Attempt::fence`]); `written` is updated when it renews.
    async fn fence(&self, job: &JobMsg, written: &Mutex<Written>) -> Renewal {
        let known = written.lock().expect("lock").clone();
        let connected =
            self.nats.client.connection_state() == async_nats::connection::State::Connected;
        let renewal = Attempt::new(&self.streams.job_states, job, &self.id)
            .fence(&known, self.heartbeat, self.epoch(), connected)
            .await;
        remember(written, renewal)
    }

    /// Renews the job's state from the last write (`written`, updated on success); see
    /// [`Attempt::renew`].
    async fn renew(
        &self,
        job: &JobMsg,
        written: &Mutex<Written>,
        change: impl Fn(&mut JobState),
    ) -> Renewal {
        let known = written.lock().expect("lock").clone();
        let renewal = Attempt::new(&self.streams.job_states, job, &self.id)
            .renew(&known, change, self.epoch())
            .await;
        remember(written, renewal)
    }

    /// Gives the job back without a verdict ([`Attempt::hand_back`]).
    async fn hand_back(&self, job: &JobMsg, reason: String) {
        Attempt::new(&self.streams.job_states, job, &self.id)
            .hand_back(reason)
            .await;
        tracing::info!(job = %job.job_id(), "handed the job back; another runner takes it");
    }

    /// How many times this runner has connected to NATS so far.
    fn epoch(&self) -> u64 {
        *self.nats.connections.borrow()
    }

    /// The result of `job` on this runner before anything ran: status `error`, no output, the
    /// current time as start and finish.
    fn result_of(&self, job: &JobMsg) -> ResultMsg {
        let started = OffsetDateTime::now_utc();
        let log_subject = self
            .nats
            .names
            .logs_subject(&job.repo, &job.sha, job.run, job.attempt);
        ResultMsg {
            v: VERSION,
            repo: job.repo.clone(),
            url: job.url.clone(),
            branch: job.branch.clone(),
            sha: job.sha.clone(),
            run: job.run,
            job_id: job.job_id(),
            attempt: job.attempt,
            runner: self.id.clone(),
            status: Status::Error,
            exit_code: None,
            signal: None,
            reason: None,
            started_at: started,
            finished_at: started,
            duration_ms: 0,
            output_tail: String::new(),
            log_subject,
            log_bytes: 0,
            commit_seq: job.commit_seq,
            author: job.author.clone(),
            summary: job.summary.clone(),
            tests: None,
        }
    }

    /// Checks out and runs the job. A failure of the test or of its configuration becomes the
    /// result's status and reason; a failed checkout asks for another attempt.
    async fn execute(&self, job: &JobMsg, stop: &CancellationToken) -> Verdict {
        let clock = std::time::Instant::now();
        let mut result = self.result_of(job);
        let log_subject = result.log_subject.clone();
        match self.prepare(job).await {
            Err(Prepare::Retry(reason)) => {
                tracing::warn!(job = %job.job_id(), %reason, "cannot prepare the job; handing it back for another attempt");
                return Verdict::Retry(reason);
            }
            Err(Prepare::Fail(reason)) => {
                result.output_tail = format!("jetci: {reason}\n");
                result.reason = Some(reason);
            }
            Ok((spec, config)) => {
                let mut output = JobOutput {
                    log: LogSink::start(&self.nats, log_subject, self.log_cap),
                    scanner: OutputScanner::new(),
                };
                let outcome = exec::run(&spec, &mut output, stop).await;
                // The command's time, not the log upload's (slow while NATS recovers).
                result.finished_at = OffsetDateTime::now_utc();
                result.duration_ms = clock.elapsed().as_millis() as u64;
                output.log.finish(Duration::from_secs(10)).await;
                result.tests =
                    test_counts(&result.job_id, &spec.dir, &config.junit, output.scanner).await;
                match outcome {
                    Err(e) => {
                        result.reason = Some(format!("cannot start `sh -c {}`: {e}", spec.command))
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
        Verdict::Done(Box::new(result))
    }

    /// A fresh checkout of the job's commit, its config and its environment.
    ///
    /// Errors: [`Prepare::Retry`] when the workspace or the checkout fails (the network, the
    /// disk, a repository that moved: worth another attempt, maybe on another runner);
    /// [`Prepare::Fail`] when the commit's own `.jetci.toml` is wrong (every attempt would fail
    /// the same way).
    async fn prepare(&self, job: &JobMsg) -> Result<(Spec, RepoConfig), Prepare> {
        let dir = self.job_dir(&job.job_id());
        let src = dir.join("src");
        let home = dir.join("home");
        let tmp = dir.join("tmp");
        let mirrors = self.work_dir.join("mirrors");
        let lock = {
            let mut map = self.mirrors.lock().expect("lock");
            map.entry(Mirror::path_for(&job.url, &mirrors))
                .or_default()
                .clone()
        };
        let guard = lock.lock_owned().await;
        // One blocking task for the whole file-system part: each hop to the blocking pool costs
        // tens of microseconds, and this part used to take seven.
        let (url, sha, id) = (job.url.clone(), job.sha.clone(), self.id.clone());
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
                mirror.checkout(oid, &src_dir)
            });
            drop(guard);
            checkout.map_err(|e| Prepare::Retry(format!("checkout failed on runner {id}: {e}")))?;
            // Read only a regular file: a symlink could point outside the checkout.
            let config_path = src_dir.join(FILE_NAME);
            match std::fs::symlink_metadata(&config_path) {
                Ok(m) if !m.file_type().is_file() => Err(Prepare::Fail(format!(
                    "{FILE_NAME} must be a regular file (not a symlink or a directory)"
                ))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                _ => match std::fs::read_to_string(&config_path) {
                    Ok(text) => Ok(Some(text)),
                    Err(e) => Err(Prepare::Fail(format!("cannot read {FILE_NAME}: {e}"))),
                },
            }
        })
        .await
        .map_err(|e| {
            Prepare::Retry(format!("checkout task failed on runner {}: {e}", self.id))
        })??;
        let config = match prepared {
            Some(text) => RepoConfig::parse(&text).map_err(|e| Prepare::Fail(e.to_string()))?,
            None => RepoConfig::default(),
        };
        let spec = Spec {
            command: config
                .command
                .clone()
                .unwrap_or_else(|| self.default_command.clone()),
            dir: src,
            env: self.job_env(job, &home, &tmp, &config),
            timeout: config.timeout.unwrap_or(self.default_timeout),
            grace: self.grace,
            owner: self.owner(),
        };
        Ok((spec, config))
    }

    /// The job's environment: a short allow-list from the runner's own, a fresh HOME and TMPDIR,
    /// the repository's `env`, and the job's identity as `JETCI_*`. The runner's NATS settings
    /// and credentials never reach the test.
    fn job_env(
        &self,
        job: &JobMsg,
        home: &Path,
        tmp: &Path,
        config: &RepoConfig,
    ) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = PASSED_ENV
            .iter()
            .map(|s| s.to_string())
            .chain(self.pass_env.iter().cloned())
            .filter_map(|k| std::env::var(&k).ok().map(|v| (k, v)))
            .collect();
        if !env.iter().any(|(k, _)| k == "PATH") {
            env.push(("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()));
        }
        env.push(("HOME".into(), home.display().to_string()));
        env.push(("TMPDIR".into(), tmp.display().to_string()));
        env.push(("CI".into(), "true".into()));
        if let Some(cache) = &self.cache_dir {
            env.push(("JETCI_CACHE_DIR".into(), cache.display().to_string()));
        }
        env.extend(config.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        env.extend([
            ("JETCI_REPO".to_string(), job.repo.clone()),
            ("JETCI_BRANCH".to_string(), job.branch.clone()),
            ("JETCI_COMMIT".to_string(), job.sha.clone()),
            ("JETCI_RUN".to_string(), job.run.to_string()),
            ("JETCI_ATTEMPT".to_string(), job.attempt.to_string()),
            ("JETCI_RUNNER".to_string(), self.id.clone()),
        ]);
        env
    }

    /// Publishes the verdict, marks the job final, and stops the heartbeat only then, so the
    /// lease holds while the result is on its way. A result NATS does not take at once (an
    /// outage) is kept on disk until it does, and published again by a restarted runner.
    async fn deliver(
        &self,
        result: &ResultMsg,
        fenced: Option<Written>,
        heartbeat: tokio::task::JoinHandle<()>,
    ) {
        let connected =
            self.nats.client.connection_state() == async_nats::connection::State::Connected;
        let stored = connected && self.publish_once(result).await.is_ok();
        if !stored {
            let pending = self.pending_dir().join(format!("{}.json", result.job_id));
            if let Err(e) = save(&pending, result).await {
                tracing::warn!(job = %result.job_id, error = %e, "cannot keep the result on disk; publishing it from memory only");
            }
            self.publish_until_stored(result).await;
            heartbeat.abort();
            attempt::mark_final(&self.streams.job_states, result, None).await;
            let _ = tokio::fs::remove_file(&pending).await;
            return;
        }
        heartbeat.abort();
        attempt::mark_final(&self.streams.job_states, result, fenced).await;
    }

    /// One attempt to publish a result; `Ok` when CI_RESULTS holds a result for the run (this
    /// one, or an earlier one that is the verdict).
    async fn publish_once(&self, result: &ResultMsg) -> Result<(), jetci::results::PublishError> {
        match publish_final(&self.nats, result).await? {
            Published::Stored(seq) => {
                use jetci::metrics::names as m;
                metrics::counter!(m::RESULTS, "status" => result.status.as_str()).increment(1);
                metrics::histogram!(m::JOB_DURATION).record(result.duration_ms as f64 / 1000.0);
                tracing::info!(job = %result.job_id, status = %result.status, seq, "result published");
            }
            Published::AlreadyPublished => {
                tracing::info!(job = %result.job_id, "a result for this run was already published; ours is not the verdict");
            }
        }
        Ok(())
    }

    /// Publishes a result, retrying with backoff while NATS is unreachable (the test's work is
    /// never thrown away because the network was down when it ended).
    pub async fn publish_until_stored(&self, result: &ResultMsg) {
        let mut delay = Duration::from_millis(200);
        loop {
            match self.publish_once(result).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(job = %result.job_id, error = %e, retry_in = ?delay, "cannot publish the result yet; keeping it");
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    async fn record_superseded(&self, result: &ResultMsg) {
        tracing::warn!(job = %result.job_id, status = %result.status, "recording the result of a superseded attempt (not the verdict)");
        if let Err(e) = publish_superseded(&self.nats, result).await {
            tracing::warn!(job = %result.job_id, error = %e, "cannot record the superseded result");
        }
    }

    /// Publishes results that were kept on disk by an earlier run of this runner (it stopped or
    /// lost NATS before they were stored).
    pub async fn deliver_pending(self: Arc<Self>) {
        let Ok(mut dir) = tokio::fs::read_dir(self.pending_dir()).await else {
            return;
        };
        while let Ok(Some(entry)) = dir.next_entry().await {
            let path = entry.path();
            let result = match tokio::fs::read(&path)
                .await
                .map_err(anyhow::Error::from)
                .and_then(|b| Ok(decode::<ResultMsg>(&b)?))
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "dropping an unreadable kept result");
                    let _ = tokio::fs::remove_file(&path).await;
                    continue;
                }
            };
            tracing::info!(job = %result.job_id, "publishing a result kept from an earlier run");
            self.publish_until_stored(&result).await;
            attempt::mark_final(&self.streams.job_states, &result, None).await;
            let _ = tokio::fs::remove_file(&path).await;
        }
    }
}

/// Keeps what a renewal wrote as the job's last write, and passes the renewal on.
fn remember(written: &Mutex<Written>, renewal: Renewal) -> Renewal {
    if let Renewal::Held(fresh) = &renewal {
        *written.lock().expect("lock") = fresh.clone();
    }
    renewal
}

/// The result's test counts: the repository's JUnit XML files when its `junit` globs match some,
/// else the unittest or pytest summary found in the output. An unreadable report is logged and
/// never changes the job's status.
async fn test_counts(
    job_id: &str,
    checkout: &Path,
    junit: &[String],
    scanner: OutputScanner,
) -> Option<TestCounts> {
    if !junit.is_empty() {
        let (dir, globs) = (checkout.to_path_buf(), junit.to_vec());
        match tokio::task::spawn_blocking(move || read_junit(&dir, &globs)).await {
            Ok(Ok(Some(counts))) => return Some(counts),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                tracing::warn!(job = %job_id, error = %e, "cannot read a JUnit report; counting from the output")
            }
            Err(e) => {
                tracing::warn!(job = %job_id, error = %e, "JUnit reading failed; counting from the output")
            }
        }
    }
    scanner.finish()
}

/// What running a job came to.
enum Verdict {
    /// A result, whatever its status.
    Done(Box<ResultMsg>),
    /// No verdict: the job should be tried again (why).
    Retry(String),
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
    }
}

fn signal_name(sig: i32) -> &'static str {
    nix::sys::signal::Signal::try_from(sig)
        .map(|s| s.as_str())
        .unwrap_or("unknown")
}

async fn save(path: &Path, result: &ResultMsg) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    let tmp = path.with_extension("tmp");
    tokio::fs::write(&tmp, messages::encode(result)).await?;
    tokio::fs::rename(&tmp, path).await
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
    }
}
