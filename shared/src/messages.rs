//! Every wire type: one struct per subject or bucket, JSON with a `"v": 1` field (DESIGN.md,
//! "Messages").
//!
//! Times are RFC 3339 UTC, durations are milliseconds in fields ending `_ms`. Decoding is strict:
//! unknown fields, a wrong `v`, a malformed commit id or repo slug are all a [`MessageError`], so
//! a reader can terminate the message with a logged reason instead of acting on half of it
//! (invariant I5).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::subjects::{check_sha, check_token, run_key, JobRef, NameError};

/// The schema version every message carries in `v`.
pub const VERSION: u32 = 1;

/// The largest message jetci accepts on any subject it reads, in bytes (1 MiB, the nats-server
/// default `max_payload`).
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// Why a message could not be used.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    /// Not JSON, or not the expected shape (missing or unknown fields, wrong types).
    #[error("malformed message: {0}")]
    Json(#[from] serde_json::Error),
    /// A schema version this build does not speak.
    #[error("unsupported message version {found} (this build speaks version {VERSION})")]
    Version { found: u32 },
    /// A field that parses but cannot be right (bad commit id, bad repo slug, run 0, ...).
    #[error("invalid field: {0}")]
    Invalid(String),
    /// Larger than [`MAX_MESSAGE_BYTES`].
    #[error("message of {0} bytes is larger than the {MAX_MESSAGE_BYTES} byte limit")]
    TooLarge(usize),
}

impl From<NameError> for MessageError {
    fn from(e: NameError) -> Self {
        MessageError::Invalid(e.to_string())
    }
}

/// A wire type: it knows its version field and can check its own fields.
pub trait Wire: Serialize + DeserializeOwned {
    /// The `v` field.
    fn version(&self) -> u32;
    /// Field checks beyond the JSON shape.
    fn validate(&self) -> Result<(), MessageError> {
        Ok(())
    }
}

/// Parses and checks one message body.
///
/// Errors: [`MessageError::TooLarge`], [`MessageError::Json`], [`MessageError::Version`],
/// [`MessageError::Invalid`].
pub fn decode<T: Wire>(bytes: &[u8]) -> Result<T, MessageError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(MessageError::TooLarge(bytes.len()));
    }
    // Read the version first so a future version reports as such, not as "unknown field".
    #[derive(Deserialize)]
    struct Probe {
        v: Option<u32>,
    }
    match serde_json::from_slice::<Probe>(bytes)?.v {
        Some(VERSION) => {}
        Some(found) => return Err(MessageError::Version { found }),
        None => {
            return Err(MessageError::Invalid("missing field `v`".into()));
        }
    }
    let msg: T = serde_json::from_slice(bytes)?;
    msg.validate()?;
    Ok(msg)
}

/// Serializes a message; wire types always serialize.
pub fn encode<T: Wire>(msg: &T) -> bytes::Bytes {
    serde_json::to_vec(msg)
        .expect("wire types serialize to JSON")
        .into()
}

/// A branch name as git allows it: not empty, no control characters (git's
/// `check-ref-format` rules), so it can go into a job's environment and a log line.
fn check_branch(branch: &str) -> Result<(), MessageError> {
    if branch.is_empty() || branch.chars().any(char::is_control) {
        return Err(MessageError::Invalid(format!(
            "branch {branch:?} is empty or holds control characters"
        )));
    }
    Ok(())
}

/// A job's token within its run: a subject token that is not all digits ([`JobRef`]).
fn check_job(job: Option<&str>) -> Result<(), MessageError> {
    match job {
        Some(j) if j.bytes().all(|b| b.is_ascii_digit()) => Err(MessageError::Invalid(format!(
            "job {j:?} is all digits (it would read as an attempt)"
        ))),
        Some(j) => Ok(check_token("job", j)?),
        None => Ok(()),
    }
}

fn check_run(run: u32) -> Result<(), MessageError> {
    if run == 0 {
        return Err(MessageError::Invalid("run must be at least 1".into()));
    }
    Ok(())
}

/// The current time, for the `*_at` fields.
pub fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// A commit to test, published by the observer on `ci.commits.<repo>` (stream `CI_COMMITS`)
/// with `Nats-Msg-Id: <repo>.<sha>.<run>`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CommitMsg {
    pub v: u32,
    /// Repository slug, the subject token.
    pub repo: String,
    /// Where runners fetch it from: a URL or an absolute local path.
    pub url: String,
    /// Branch name without `refs/heads/`; any characters, payload only.
    pub branch: String,
    /// Full commit id, 40 hex digits.
    pub sha: String,
    /// Run number, 1 for the first test of this commit; a rerun is `n + 1`.
    pub run: u32,
    /// Runner labels the repository's `.jetci.toml` asks for.
    #[serde(default)]
    pub labels: Vec<String>,
    /// Commit author as `Name <email>`.
    #[serde(default)]
    pub author: String,
    /// First line of the commit message.
    #[serde(default)]
    pub summary: String,
    #[serde(with = "time::serde::rfc3339")]
    pub published_at: OffsetDateTime,
    /// The pipeline's jobs, as the commit's `.jetci.toml` names them for this branch
    /// ([`crate::pipeline::plan()`]); empty for a run of one job.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jobs: Vec<JobPlan>,
    /// The first failed job cancels the rest of the run.
    #[serde(default, skip_serializing_if = "is_false")]
    pub fail_fast: bool,
}

fn is_false(b: &bool) -> bool {
    !b
}

/// One job of a pipeline in a commit message: what a dispatcher needs to place it and to know
/// when it may start.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobPlan {
    /// What users see, such as `test (python=3.11, 2/4)`.
    pub name: String,
    /// Its token in keys and subjects ([`JobRef::job`]).
    pub job: String,
    /// Tokens of the jobs of this run that must pass before it starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub needs: Vec<String>,
    /// Runner labels it needs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// Its failure shows but does not fail the run.
    #[serde(default, skip_serializing_if = "is_false")]
    pub allow_failure: bool,
    /// The passed result of an earlier run that stands for this job (`jetci rerun --failed`):
    /// the job does not run again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carried: Option<JobSummary>,
}

impl From<&JobSummary> for JobPlan {
    /// The job as planned, from a run's result (a rerun plans the same jobs).
    fn from(job: &JobSummary) -> JobPlan {
        JobPlan {
            name: job.name.clone(),
            job: job.job.clone(),
            needs: job.needs.clone(),
            labels: job.labels.clone(),
            allow_failure: job.allow_failure,
            carried: None,
        }
    }
}

impl From<&crate::pipeline::PlannedJob> for JobPlan {
    fn from(job: &crate::pipeline::PlannedJob) -> JobPlan {
        JobPlan {
            name: job.name.clone(),
            job: job.token.clone(),
            needs: job.needs.clone(),
            labels: job.labels.clone(),
            allow_failure: job.allow_failure,
            carried: None,
        }
    }
}

/// A pipeline's jobs in a commit message: at most [`crate::repo_config::MAX_JOBS`], tokens
/// distinct, names short and printable, every need a job of the run.
fn check_jobs(jobs: &[JobPlan]) -> Result<(), MessageError> {
    if jobs.len() > crate::repo_config::MAX_JOBS {
        return Err(MessageError::Invalid(format!(
            "{} jobs (at most {})",
            jobs.len(),
            crate::repo_config::MAX_JOBS
        )));
    }
    let tokens: std::collections::HashSet<&str> = jobs.iter().map(|j| j.job.as_str()).collect();
    if tokens.len() != jobs.len() {
        return Err(MessageError::Invalid("two jobs share a token".into()));
    }
    for j in jobs {
        check_job(Some(&j.job))?;
        if j.name.is_empty() || j.name.len() > 2048 || j.name.chars().any(char::is_control) {
            return Err(MessageError::Invalid(format!("job name {:?}", j.name)));
        }
        for l in &j.labels {
            check_token("label", l)?;
        }
        if let Some(n) = j.needs.iter().find(|n| !tokens.contains(n.as_str())) {
            return Err(MessageError::Invalid(format!(
                "job {} needs {n:?}, not a job of the run",
                j.job
            )));
        }
    }
    Ok(())
}

impl CommitMsg {
    /// `<repo>.<sha>.<run>`: the run's key and the message id.
    pub fn key(&self) -> String {
        run_key(&self.repo, &self.sha, self.run)
    }
    /// The run's only job (a run of one job: [`CommitMsg::jobs`] is empty).
    pub fn only_job(&self) -> JobRef {
        JobRef::only(&self.repo, &self.sha, self.run)
    }
    /// Job `token` of this run (a pipeline's job).
    pub fn job(&self, token: &str) -> JobRef {
        JobRef::new(&self.repo, &self.sha, self.run, Some(token))
    }
    /// The name users see of job `token` of this run's pipeline.
    pub fn job_name(&self, token: &str) -> Option<String> {
        self.jobs
            .iter()
            .find(|j| j.job == token)
            .map(|j| j.name.clone())
    }
}

impl Wire for CommitMsg {
    fn version(&self) -> u32 {
        self.v
    }
    fn validate(&self) -> Result<(), MessageError> {
        check_token("repo", &self.repo)?;
        check_sha(&self.sha)?;
        check_run(self.run)?;
        if self.labels.len() > crate::repo_config::MAX_LABELS {
            return Err(MessageError::Invalid(format!(
                "{} labels are more than the limit of {}",
                self.labels.len(),
                crate::repo_config::MAX_LABELS
            )));
        }
        for l in &self.labels {
            check_token("label", l)?;
        }
        if self.url.is_empty() {
            return Err(MessageError::Invalid("url is empty".into()));
        }
        check_jobs(&self.jobs)?;
        check_branch(&self.branch)
    }
}

/// One attempt of a job, published by a dispatcher on `ci.jobs.<runner-id>` (stream `CI_JOBS`)
/// with `Nats-Msg-Id` the attempt's id ([`JobRef::attempt_id`]).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobMsg {
    pub v: u32,
    pub repo: String,
    pub url: String,
    pub branch: String,
    pub sha: String,
    pub run: u32,
    /// Which job of the run; absent for a run's only job ([`JobRef::job`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// The job's name as users see it (a pipeline's job), such as `test (python=3.11, 2/4)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
    /// 1 for the first assignment; each reassignment after a lost runner adds one.
    pub attempt: u32,
    /// The runner this attempt is assigned to.
    pub runner: String,
    #[serde(default)]
    pub author: String,
    #[serde(default)]
    pub summary: String,
    /// Sequence of the commit message in `CI_COMMITS`, for ordering results per branch.
    pub commit_seq: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub assigned_at: OffsetDateTime,
}

impl JobMsg {
    /// The job this attempt is of.
    pub fn job_ref(&self) -> JobRef {
        JobRef::new(&self.repo, &self.sha, self.run, self.job.as_deref())
    }
    /// The job's `ci-jobs` key ([`JobRef::key`]).
    pub fn key(&self) -> String {
        self.job_ref().key()
    }
    /// This attempt's id, `<repo>.<sha>.<run>.<attempt>` for a run's only job
    /// ([`JobRef::attempt_id`]).
    pub fn attempt_id(&self) -> String {
        self.job_ref().attempt_id(self.attempt)
    }
}

impl Wire for JobMsg {
    fn version(&self) -> u32 {
        self.v
    }
    fn validate(&self) -> Result<(), MessageError> {
        check_token("repo", &self.repo)?;
        check_token("runner", &self.runner)?;
        check_sha(&self.sha)?;
        check_run(self.run)?;
        check_job(self.job.as_deref())?;
        if self.attempt == 0 {
            return Err(MessageError::Invalid("attempt must be at least 1".into()));
        }
        check_branch(&self.branch)
    }
}

/// A job's final status.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The command exited 0.
    Passed,
    /// The command exited non-zero or was killed by a signal: the test's fault.
    Failed,
    /// jetci could not run the test (checkout failed, invalid `.jetci.toml`, runner lost too often).
    Error,
    /// The command ran past its timeout and was killed.
    TimedOut,
    /// A user cancelled the job (or `fail_fast` did, after another job failed).
    Cancelled,
    /// A pipeline's job that did not run: a job it needs did not pass, or `fail_fast` stopped
    /// the run before it started.
    Skipped,
}

impl Status {
    /// The lowercase wire name, as in `passed`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Status::Passed => "passed",
            Status::Failed => "failed",
            Status::Error => "error",
            Status::TimedOut => "timed_out",
            Status::Cancelled => "cancelled",
            Status::Skipped => "skipped",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Test counts read from the output (unittest or pytest summary) or JUnit XML files.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TestCounts {
    pub tests: u64,
    pub passed: u64,
    pub failed: u64,
    pub skipped: u64,
    /// Names of failing tests, as the tool printed them.
    #[serde(default)]
    pub failures: Vec<String>,
}

/// A final result on `ci.results.<repo>.<sha>.<run>` (stream `CI_RESULTS`): exactly one per run,
/// first writer wins. The same shape goes to `ci.superseded.…` for a fenced attempt.
///
/// In a pipeline each job has its own result, on `ci.results.<repo>.<sha>.<run>.<job>` (with
/// `job` set), and the run's result lists every job in `jobs` (its `job_id` is the run's key,
/// its `runner` empty): `ci.results.*.*.*` takes run results alone.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ResultMsg {
    pub v: u32,
    pub repo: String,
    pub url: String,
    pub branch: String,
    pub sha: String,
    pub run: u32,
    /// The id of the attempt that gave the verdict, `<repo>.<sha>.<run>.<attempt>`
    /// ([`JobRef::attempt_id`]).
    pub job_id: String,
    pub attempt: u32,
    /// The runner that ran the attempt; empty when a dispatcher gave the verdict (no runner).
    pub runner: String,
    pub status: Status,
    /// The command's exit code, when it exited.
    pub exit_code: Option<i32>,
    /// The signal that ended the command, when one did (9 is SIGKILL).
    pub signal: Option<i32>,
    /// Why, for `error`, `timed_out` and `cancelled`.
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub finished_at: OffsetDateTime,
    pub duration_ms: u64,
    /// The last few KiB of the output, lossily decoded as UTF-8.
    pub output_tail: String,
    /// Where the full output is: `ci.logs.<repo>.<sha>.<run>.<attempt>` in `CI_LOGS`.
    pub log_subject: String,
    /// Bytes of output the command wrote (before any cap).
    pub log_bytes: u64,
    /// Sequence of the commit message in `CI_COMMITS`.
    pub commit_seq: u64,
    #[serde(default)]
    pub author: String,
    #[serde(default)]
    pub summary: String,
    #[serde(default)]
    pub tests: Option<TestCounts>,
    /// The job's token, for a result of one job of a pipeline ([`JobRef::job`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// The job's name as users see it, for a result of one job of a pipeline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
    /// A pipeline run's jobs, for the run's result.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jobs: Vec<JobSummary>,
    /// A pipeline run's `fail_fast`, for the run's result (a rerun keeps it).
    #[serde(default, skip_serializing_if = "is_false")]
    pub fail_fast: bool,
}

/// One job in a pipeline run's result.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobSummary {
    pub name: String,
    /// Its token ([`JobRef::job`]): its own result is on `ci.results.<repo>.<sha>.<run>.<job>`.
    pub job: String,
    /// Tokens of the jobs it needs (the run's graph).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub needs: Vec<String>,
    /// Runner labels it needs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    pub status: Status,
    /// The runner of its verdict; empty when it did not run.
    #[serde(default)]
    pub runner: String,
    /// Attempts it took (0 when it did not run).
    #[serde(default)]
    pub attempt: u32,
    #[serde(default)]
    pub duration_ms: u64,
    /// Its counts, without the failing tests' names (they are in its own result).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tests: Option<TestCounts>,
    /// Its `allow_failure`: when it did not pass, the run does not fail for it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub allow_failure: bool,
    /// Why it was skipped, cancelled or in error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The run whose result this is, when it was carried over into a later run
    /// (`jetci rerun --failed` does not run a job that passed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carried_from: Option<u32>,
}

impl ResultMsg {
    /// `<repo>.<sha>.<run>`: the run this is the result of.
    pub fn key(&self) -> String {
        run_key(&self.repo, &self.sha, self.run)
    }
    /// The job this is the result of ([`JobRef::only`] for a run's result).
    pub fn job_ref(&self) -> JobRef {
        JobRef::new(&self.repo, &self.sha, self.run, self.job.as_deref())
    }
}

impl Wire for ResultMsg {
    fn version(&self) -> u32 {
        self.v
    }
    fn validate(&self) -> Result<(), MessageError> {
        check_token("repo", &self.repo)?;
        check_sha(&self.sha)?;
        check_job(self.job.as_deref())?;
        check_run(self.run)
    }
}

/// Where a job is in its life (DESIGN.md: `queued → assigned → running → final`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum JobPhase {
    /// A dispatcher holds the commit and waits for a runner.
    Queued,
    /// Published to a runner's subject.
    Assigned,
    /// The runner has it and heartbeats.
    Running,
    /// A final result exists in `CI_RESULTS`.
    Final,
}

/// The `ci-jobs` KV value of one job, under its key ([`JobRef::key`]).
///
/// Written with compare-and-set on the entry's revision by the dispatcher (assign, reassign,
/// final error) and by the runner holding the current attempt (running, heartbeat, final), so a
/// superseded runner's write fails instead of overwriting the new attempt. Every change goes
/// through the transitions in `crate::protocol::job`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobState {
    pub v: u32,
    pub repo: String,
    pub branch: String,
    pub sha: String,
    pub run: u32,
    /// Which job of the run; absent for a run's only job ([`JobRef::job`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    pub phase: JobPhase,
    /// Current attempt; 0 while queued before the first assignment.
    pub attempt: u32,
    /// Runner of the current attempt.
    #[serde(default)]
    pub runner: Option<String>,
    /// Sequence of the current attempt's job message in `CI_JOBS`, so a dispatcher can delete it
    /// from a lost runner's subject.
    #[serde(default)]
    pub job_seq: Option<u64>,
    /// Labels the job needs.
    #[serde(default)]
    pub labels: Vec<String>,
    /// Final status once `phase` is `final`.
    #[serde(default)]
    pub status: Option<Status>,
    /// Why the job waits or failed.
    #[serde(default)]
    pub reason: Option<String>,
    /// Set by `jetci cancel` (who asked, and when): the runner stops the command and reports
    /// `cancelled`; a dispatcher gives a job that is not running a `cancelled` result.
    #[serde(default)]
    pub cancel: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

impl JobState {
    /// The job this state is of.
    pub fn job_ref(&self) -> JobRef {
        JobRef::new(&self.repo, &self.sha, self.run, self.job.as_deref())
    }
}

impl Wire for JobState {
    fn version(&self) -> u32 {
        self.v
    }
    fn validate(&self) -> Result<(), MessageError> {
        check_job(self.job.as_deref())
    }
}

/// The `ci-runners` KV value for one runner id, refreshed every heartbeat; an entry older than
/// the lease means the runner is gone.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunnerInfo {
    pub v: u32,
    pub id: String,
    pub host: String,
    pub labels: Vec<String>,
    /// Jobs it runs at once, at most [`crate::limits::MAX_RUNNER_SLOTS`] (an entry claiming more
    /// is invalid: dispatchers skip it).
    pub capacity: u32,
    /// Job ids it runs now.
    pub jobs: Vec<String>,
    /// False while it drains for shutdown: give it nothing new.
    pub accepting: bool,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// What its operator should know, e.g. that its jobs run without a sandbox. Absent when
    /// empty, so a runner without warnings writes what older readers expect.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl Wire for RunnerInfo {
    fn version(&self) -> u32 {
        self.v
    }
    fn validate(&self) -> Result<(), MessageError> {
        check_token("runner", &self.id)?;
        if self.capacity > crate::limits::MAX_RUNNER_SLOTS {
            return Err(MessageError::Invalid(format!(
                "capacity {} is over {}",
                self.capacity,
                crate::limits::MAX_RUNNER_SLOTS
            )));
        }
        Ok(())
    }
}

/// The `ci-observer` KV value for `<repo>.<branch-hash>`: the last head published for a branch.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BranchMark {
    pub v: u32,
    pub repo: String,
    /// The branch's name as text (bytes that are not UTF-8 shown as U+FFFD).
    pub branch: String,
    /// Only for a branch whose name is not UTF-8: its exact bytes, in lowercase hex (the key is
    /// a hash of these bytes, so two such names never share a mark).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch_hex: Option<String>,
    pub sha: String,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// In the `<repo>._seen` entry only: the URL or path the name belongs to, so a second
    /// repository under the same name is refused instead of sharing its marks and results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

impl Wire for BranchMark {
    fn version(&self) -> u32 {
        self.v
    }
}

/// A hint that refs of `repo` moved, sent by `jetci notify` (from a git `post-receive` hook) as a
/// core-NATS request on `ci.notify.<repo>`: the observer of `repo` polls at once and answers with
/// a [`NotifyReply`]. Never stored and never needed for correctness: the observer's next poll finds
/// the same commits, and its marks keep a notify from publishing one twice (DESIGN.md, I1). The
/// ref fields are what the hook read from git, for the observer's log only.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NotifyMsg {
    pub v: u32,
    /// Repository slug, as in the subject.
    pub repo: String,
    /// The ref that moved, such as `refs/heads/main`.
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<String>,
    /// Its old commit id (all zeros for a new ref).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<String>,
    /// Its new commit id (all zeros for a deleted ref).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new: Option<String>,
}

impl Wire for NotifyMsg {
    fn version(&self) -> u32 {
        self.v
    }
    fn validate(&self) -> Result<(), MessageError> {
        check_token("repo", &self.repo)?;
        Ok(())
    }
}

/// The observer's answer to a [`NotifyMsg`], sent once the poll that started after the notify
/// arrived has published (or failed).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NotifyReply {
    pub v: u32,
    pub repo: String,
    /// Commits that poll published (0: nothing was new).
    pub published: u32,
    /// Why the poll failed, when it did; the observer retries at its next poll.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Wire for NotifyReply {
    fn version(&self) -> u32 {
        self.v
    }
    fn validate(&self) -> Result<(), MessageError> {
        check_token("repo", &self.repo)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runner_entry_claiming_more_slots_than_the_bound_is_invalid() {
        let info = |capacity: u32| RunnerInfo {
            v: VERSION,
            id: "r1".into(),
            host: "h".into(),
            labels: vec![],
            capacity,
            jobs: vec![],
            accepting: true,
            started_at: now(),
            updated_at: now(),
            warnings: vec![],
        };
        let ok = encode(&info(crate::limits::MAX_RUNNER_SLOTS));
        assert!(decode::<RunnerInfo>(&ok).is_ok());
        let huge = encode(&info(u32::MAX));
        let err = decode::<RunnerInfo>(&huge).unwrap_err();
        assert!(err.to_string().contains("capacity"), "{err}");
    }

    fn commit() -> CommitMsg {
        CommitMsg {
            v: VERSION,
            repo: "app".into(),
            url: "/srv/app".into(),
            branch: "feature/ä.b".into(),
            sha: "0123456789abcdef0123456789abcdef01234567".into(),
            run: 1,
            labels: vec!["linux".into()],
            author: "A <a@x>".into(),
            summary: "fix".into(),
            published_at: now(),
            jobs: vec![],
            fail_fast: false,
        }
    }

    #[test]
    fn round_trip() {
        let c = commit();
        let back: CommitMsg = decode(&encode(&c)).unwrap();
        assert_eq!(back.branch, c.branch);
        assert_eq!(back.key(), format!("app.{}.1", c.sha));
    }

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(
            decode::<CommitMsg>(b"not json"),
            Err(MessageError::Json(_))
        ));
        assert!(matches!(
            decode::<CommitMsg>(b"[]"),
            Err(MessageError::Json(_))
        ));
        let mut v = serde_json::to_value(commit()).unwrap();
        v["v"] = 2.into();
        let err = decode::<CommitMsg>(v.to_string().as_bytes()).unwrap_err();
        assert!(matches!(err, MessageError::Version { found: 2 }), "{err}");
        let mut v = serde_json::to_value(commit()).unwrap();
        v["surprise"] = 1.into();
        assert!(matches!(
            decode::<CommitMsg>(v.to_string().as_bytes()),
            Err(MessageError::Json(_))
        ));
        let mut v = serde_json::to_value(commit()).unwrap();
        v["sha"] = "HEAD".into();
        assert!(matches!(
            decode::<CommitMsg>(v.to_string().as_bytes()),
            Err(MessageError::Invalid(_))
        ));
        let mut v = serde_json::to_value(commit()).unwrap();
        v["repo"] = "a.b".into();
        assert!(matches!(
            decode::<CommitMsg>(v.to_string().as_bytes()),
            Err(MessageError::Invalid(_))
        ));
        let mut v = serde_json::to_value(commit()).unwrap();
        v["branch"] = "a\nb".into();
        assert!(matches!(
            decode::<CommitMsg>(v.to_string().as_bytes()),
            Err(MessageError::Invalid(_))
        ));
        let mut v = serde_json::to_value(commit()).unwrap();
        v["labels"] = vec!["a"; 33].into();
        assert!(matches!(
            decode::<CommitMsg>(v.to_string().as_bytes()),
            Err(MessageError::Invalid(_))
        ));
        let mut v = serde_json::to_value(commit()).unwrap();
        v["run"] = 0.into();
        assert!(decode::<CommitMsg>(v.to_string().as_bytes()).is_err());
        let big = vec![b' '; MAX_MESSAGE_BYTES + 1];
        assert!(matches!(
            decode::<CommitMsg>(&big),
            Err(MessageError::TooLarge(_))
        ));
        let no_v = br#"{"repo":"a"}"#;
        assert!(matches!(
            decode::<CommitMsg>(no_v),
            Err(MessageError::Invalid(_))
        ));
    }

    #[test]
    fn notify_messages_round_trip_with_optional_fields() {
        let full = NotifyMsg {
            v: VERSION,
            repo: "app".into(),
            git_ref: Some("refs/heads/feature/ä.b".into()),
            old: Some("0".repeat(40)),
            new: Some("a".repeat(40)),
        };
        let bytes = encode(&full);
        assert!(std::str::from_utf8(&bytes)
            .unwrap()
            .contains(r#""ref":"refs/heads/"#));
        assert_eq!(decode::<NotifyMsg>(&bytes).unwrap(), full);
        let bare: NotifyMsg = decode(br#"{"v":1,"repo":"app"}"#).unwrap();
        assert_eq!(bare.git_ref, None);
        assert_eq!(&encode(&bare)[..], br#"{"v":1,"repo":"app"}"#);
        assert!(decode::<NotifyMsg>(br#"{"v":1,"repo":"a.b"}"#).is_err());
        assert!(decode::<NotifyMsg>(br#"{"v":1,"repo":"app","x":1}"#).is_err());

        let reply = NotifyReply {
            v: VERSION,
            repo: "app".into(),
            published: 2,
            error: None,
        };
        assert_eq!(decode::<NotifyReply>(&encode(&reply)).unwrap(), reply);
        assert!(decode::<NotifyReply>(br#"{"v":1,"repo":"app","published":-1}"#).is_err());
    }

    #[test]
    fn status_names() {
        assert_eq!(
            serde_json::to_string(&Status::TimedOut).unwrap(),
            "\"timed_out\""
        );
        assert_eq!(Status::Passed.to_string(), "passed");
    }
}
