//! Commands on one commit's jobs: `jetci logs`, `jetci cancel`, `jetci rerun`.
//!
//! A commit is named by its repository (the observer's `--name`, or a path whose last component
//! gives it) and its id (full, or a prefix unique among the commits jetci knows). Its runs are
//! numbered from 1 with no gaps, so the latest run is found by probing `ci-jobs` and
//! `CI_RESULTS` for run 1, 2, ... until neither knows one.

use std::io::Write as _;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use futures::StreamExt;
use jetci::connect::Nats;
use jetci::messages::{
    self, decode, CommitMsg, JobPhase, JobPlan, JobState, ResultMsg, Status, VERSION,
};
use jetci::pipeline::Progress;
use jetci::protocol::commit::publish_commit;
use jetci::protocol::store::{self, StateError, Versioned};
use jetci::protocol::verdict::{final_result, finish_without_runner, publish_final, Published};
use jetci::shutdown::CancellationToken;
use jetci::streams::Streams;
use jetci::subjects::{is_token, repo_slug, JobRef};

use crate::results::result_line;

/// Which commit a command is about.
#[derive(clap::Args, Debug, Clone)]
pub struct CommitRef {
    /// Repository name as jetci shows it (or the repository's path).
    pub repo: String,
    /// Commit id: full, or a prefix of at least 4 characters.
    pub sha: String,
    /// Run number (default: the latest).
    #[arg(long)]
    pub run: Option<u32>,
    /// One job of a pipeline's run: its name as `jetci tail` shows it (`test (python=3.11, 2/4)`)
    /// or its token (the last part of its result's subject).
    #[arg(long, value_name = "NAME")]
    pub job: Option<String>,
}

/// A resolved commit: repository slug, full id, run, and the pipeline job named, if any.
pub struct Target {
    pub repo: String,
    pub sha: String,
    pub run: u32,
    /// A pipeline job's token (`--job`).
    pub job: Option<String>,
}

impl Target {
    /// The job named (`--job`), else the run's only job.
    fn job(&self) -> JobRef {
        JobRef::new(&self.repo, &self.sha, self.run, self.job.as_deref())
    }

    /// The run's result (not a job's).
    fn run_only(&self) -> JobRef {
        JobRef::only(&self.repo, &self.sha, self.run)
    }

    /// What the target names, for messages: `run 2 of <sha>` or `job "lint" of run 2 of <sha>`.
    fn describe(&self) -> String {
        match &self.job {
            Some(job) => format!("job {job} of run {} of {}", self.run, self.sha),
            None => format!("run {} of {}", self.run, self.sha),
        }
    }
}

/// Resolves a [`CommitRef`]: the repository slug, the full commit id, and the run (latest when
/// not given). Errors name what was not found.
pub async fn resolve(nats: &Nats, streams: &Streams, r: &CommitRef) -> Result<Target> {
    let repo = if is_token(&r.repo) {
        r.repo.clone()
    } else {
        repo_slug(&r.repo)
    };
    let sha = full_sha(nats, streams, &repo, &r.sha.to_ascii_lowercase()).await?;
    let run = match r.run {
        Some(0) => bail!("--run starts at 1"),
        Some(n) => n,
        None => {
            let latest = latest_run(nats, streams, &repo, &sha).await?;
            if latest == 0 {
                bail!("jetci has no job for commit {sha} of repository {repo} yet (names are as `jetci tail` shows them)");
            }
            latest
        }
    };
    let mut target = Target {
        repo,
        sha,
        run,
        job: None,
    };
    if let Some(name) = &r.job {
        let jobs = pipeline_jobs(nats, streams, &target)
            .await?
            .with_context(|| {
                format!(
                    "run {run} of {} is not a pipeline: it has no job {name:?}",
                    target.sha
                )
            })?;
        let found = jobs.iter().find(|j| &j.name == name || &j.job == name);
        let names: Vec<&str> = jobs.iter().map(|j| j.name.as_str()).collect();
        let found = found.with_context(|| {
            format!(
                "run {run} of {} has no job {name:?}; its jobs: {}",
                target.sha,
                names.join(", ")
            )
        })?;
        target.job = Some(found.job.clone());
    }
    Ok(target)
}

/// The jobs of a pipeline's run: from its commit message while it is held, else from its
/// result; `None` for a run of one job (or one jetci knows nothing of).
async fn pipeline_jobs(nats: &Nats, streams: &Streams, t: &Target) -> Result<Option<Vec<JobPlan>>> {
    if let Some(c) = find_commit(nats, streams, t).await? {
        return Ok((!c.jobs.is_empty()).then_some(c.jobs));
    }
    let result = final_result(nats, &streams.results, &t.run_only()).await?;
    Ok(result
        .filter(|r| !r.jobs.is_empty())
        .map(|r| r.jobs.iter().map(JobPlan::from).collect()))
}

async fn full_sha(nats: &Nats, streams: &Streams, repo: &str, sha: &str) -> Result<String> {
    if !sha.bytes().all(|b| b.is_ascii_hexdigit()) || sha.len() < 4 || sha.len() > 40 {
        bail!("{sha:?} is not a commit id (4 to 40 hex digits)");
    }
    if sha.len() == 40 {
        return Ok(sha.to_string());
    }
    let prefix = format!("{repo}.{sha}");
    let mut keys = streams
        .job_states
        .keys()
        .await
        .context("cannot list jobs")?;
    let mut found: Vec<String> = Vec::new();
    while let Some(key) = keys.next().await {
        let Ok(key) = key else { continue };
        if let Some(rest) = key.strip_prefix(&prefix) {
            let full = format!("{sha}{}", rest.split('.').next().unwrap_or(""));
            if !found.contains(&full) {
                found.push(full);
            }
        }
    }
    for c in queued_commits(nats, streams, repo).await {
        if c.sha.starts_with(sha) && !found.contains(&c.sha) {
            found.push(c.sha);
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => bail!("no commit of repository {repo} starts with {sha}"),
        n => bail!("{sha} is ambiguous in repository {repo}: {n} commits start with it"),
    }
}

/// The highest run number jetci knows for the commit, 0 if none: from job states and results,
/// and from `CI_COMMITS` for runs no dispatcher has taken yet.
async fn latest_run(nats: &Nats, streams: &Streams, repo: &str, sha: &str) -> Result<u32> {
    let mut run = 0;
    loop {
        let next = run + 1;
        let key = JobRef::only(repo, sha, next).key();
        let state = store::read(&streams.job_states, &key).await?;
        let result = final_result(nats, &streams.results, &JobRef::only(repo, sha, next)).await?;
        if state.is_none() && result.is_none() {
            break;
        }
        run = next;
    }
    let queued = queued_commits(nats, streams, repo).await;
    Ok(queued
        .iter()
        .filter(|c| c.sha == sha)
        .map(|c| c.run)
        .fold(run, u32::max))
}

/// `jetci logs`: prints a job's output; with `follow`, live until the run has its result.
pub async fn logs(
    nats: &Nats,
    streams: &Streams,
    t: &Target,
    attempt: Option<u32>,
    follow: bool,
    stop: &CancellationToken,
) -> Result<()> {
    if t.job.is_none() {
        if let Some(jobs) = pipeline_jobs(nats, streams, t).await? {
            let names: Vec<String> = jobs.iter().map(|j| format!("{:?}", j.name)).collect();
            bail!(
                "{} is a pipeline: name one of its jobs with --job ({})",
                t.describe(),
                names.join(", ")
            );
        }
    }
    let state = store::read(&streams.job_states, &t.job().key()).await?;
    let result = final_result(nats, &streams.results, &t.job()).await?;
    let attempt = attempt
        .or_else(|| {
            result
                .as_ref()
                .filter(|r| !r.runner.is_empty())
                .map(|r| r.attempt)
        })
        .or_else(|| state.as_ref().map(|s| s.state.attempt).filter(|a| *a > 0))
        .context("the job has not started yet: no log so far")?;
    let subject = nats.names.logs_subject(&t.job(), attempt);
    let config = pull::Config {
        filter_subject: subject.clone(),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::None,
        inactive_threshold: jetci::follow::READER_INACTIVE,
        memory_storage: true,
        ..Default::default()
    };
    let consumer = streams
        .logs
        .create_consumer(config)
        .await
        .context("cannot read the logs stream")?;
    let mut pending = consumer.cached_info().num_pending;
    let mut out = std::io::stdout().lock();
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(64)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(10))
        .messages()
        .await
        .context("cannot read the logs stream")?;
    loop {
        if pending == 0
            && (!follow
                || final_result(nats, &streams.results, &t.job())
                    .await?
                    .is_some())
        {
            // Everything stored is printed; when following, the run is also over (the runner
            // stores the log before it publishes the result).
            break;
        }
        let next = tokio::select! {
            _ = stop.cancelled() => break,
            n = tokio::time::timeout(Duration::from_millis(500), messages.next()) => n,
        };
        match next {
            Ok(Some(Ok(msg))) => {
                out.write_all(&msg.payload)
                    .context("cannot write to stdout")?;
                out.flush().ok();
                pending = msg.info().map(|i| i.pending).unwrap_or(0);
            }
            Ok(Some(Err(e))) => tracing::warn!(error = %e, "reading the log failed; going on"),
            Ok(None) => break,
            Err(_) => {} // nothing new for a moment: check whether the run is over
        }
    }
    Ok(())
}

/// `jetci cancel`: stops a queued or running job; its result is `cancelled`. For a pipeline's
/// run without `--job`, the whole run ([`cancel_pipeline`]); with `--job`, one of its jobs
/// ([`cancel_pipeline_job`]).
pub async fn cancel(nats: &Nats, streams: &Streams, t: &Target) -> Result<()> {
    if let Some(jobs) = pipeline_jobs(nats, streams, t).await? {
        return match &t.job {
            None => cancel_pipeline(nats, streams, t, &jobs).await,
            Some(token) => cancel_pipeline_job(nats, streams, t, &jobs, token).await,
        };
    }
    let who = who();
    let key = t.job().key();
    loop {
        let current = store::read(&streams.job_states, &key).await?;
        let phase = current.as_ref().map(|c| c.state.phase);
        match (phase, current) {
            (Some(JobPhase::Final), current) => {
                let status = current
                    .and_then(|c| c.state.status)
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                bail!(
                    "nothing to cancel: {} already finished ({status})",
                    t.describe()
                );
            }
            (Some(JobPhase::Assigned | JobPhase::Running), Some(c)) => {
                // The runner sees this in its next heartbeat and stops the command.
                let next = c.state.request_cancel(who.clone());
                match store::write(&streams.job_states, &key, &next, Some(c.revision)).await {
                    Ok(_) => break,
                    Err(StateError::Conflict) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            (_, current) => {
                if cancel_here(nats, streams, t, current, &who).await? {
                    break;
                }
            }
        }
    }
    println!("cancel requested for {} in {}", t.describe(), t.repo);
    let result = wait_result(nats, streams, &t.job(), Duration::from_secs(60)).await?;
    println!("{}", result_line(&result));
    Ok(())
}

/// Who asks, for the record in the job's state: `by ann on host-1 at <time>`.
fn who() -> String {
    format!(
        "by {} on {} at {}",
        std::env::var("USER").unwrap_or_else(|_| "someone".into()),
        hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        messages::now()
    )
}

/// Cancels a pipeline's whole run. The request is written in the run's own state in `ci-jobs`
/// (under the run's key), which the dispatcher holding the run watches and a dispatcher taking
/// it reads before it starts anything: what runs is stopped, nothing starts any more, and the
/// run ends `cancelled`. Jobs on a runner are also asked to stop here, so they stop within a
/// heartbeat even while their dispatcher is away. A run no dispatcher has taken yet is finished
/// here: its result first (first writer wins), then its state. Waits for the run's result.
async fn cancel_pipeline(
    nats: &Nats,
    streams: &Streams,
    t: &Target,
    jobs: &[JobPlan],
) -> Result<()> {
    if final_result(nats, &streams.results, &t.run_only())
        .await?
        .is_some()
    {
        bail!("nothing to cancel: {} already finished", t.describe());
    }
    let Some((commit, seq)) = find_commit_seq(nats, streams, t).await? else {
        bail!(
            "{} has no result and is not queued: nothing to cancel",
            t.describe()
        );
    };
    let who = who();
    let run_key = t.run_only().key();
    let queued = JobState::queued(&commit, &commit.only_job());
    store::request_cancel(&streams.job_states, &run_key, &queued, &who)
        .await
        .context("cannot record the cancel request")?;
    let mut asked = 0;
    for plan in jobs.iter().filter(|j| j.carried.is_none()) {
        let key = JobRef::new(&t.repo, &t.sha, t.run, Some(&plan.job)).key();
        let Some(current) = store::read(&streams.job_states, &key).await? else {
            continue;
        };
        if current.state.phase == JobPhase::Final {
            continue;
        }
        store::request_cancel(&streams.job_states, &key, &current.state, &who).await?;
        asked += 1;
    }
    if delivered(nats, streams, seq).await? {
        println!(
            "cancel requested for {} in {}: {asked} of its {} jobs asked to stop, the others will not start",
            t.describe(),
            t.repo,
            jobs.len()
        );
    } else {
        // No dispatcher has taken the run: none will start a job of it now (one that takes it
        // reads the request first), so its result is given here.
        let mut progress = Progress::new(jobs, commit.fail_fast);
        progress.cancel(&who);
        progress.ready();
        let verdict = progress
            .verdict()
            .context("a cancelled run has a verdict")?;
        let result = verdict.result(&nats.names, &commit, seq, 0);
        publish_final(nats, &result)
            .await
            .context("cannot publish the run's result")?;
        if let Some(c) = store::read(&streams.job_states, &run_key).await? {
            let done = c
                .state
                .finish(Status::Cancelled, Some(format!("cancelled {who}")));
            // A dispatcher that took the run meanwhile marks it itself: a conflict is fine.
            let _ = store::write(&streams.job_states, &run_key, &done, Some(c.revision)).await;
        }
        // A `cancel --job` before this left a `queued` state holding its request: the run's
        // result lists that job `skipped`, and so does its state now (else it would show as
        // waiting for days). A state a dispatcher moved on meanwhile is left to it.
        for plan in jobs.iter().filter(|j| j.carried.is_none()) {
            let key = JobRef::new(&t.repo, &t.sha, t.run, Some(&plan.job)).key();
            if let Some(c) = store::read(&streams.job_states, &key).await? {
                if c.state.phase == JobPhase::Queued {
                    let done = c.state.finish(
                        Status::Skipped,
                        Some(format!("the run was cancelled {who} before it started")),
                    );
                    let _ = store::write(&streams.job_states, &key, &done, Some(c.revision)).await;
                }
            }
        }
        println!(
            "cancelled {} in {} before any dispatcher took it: none of its {} jobs ran",
            t.describe(),
            t.repo,
            jobs.len()
        );
    }
    let result = wait_result(nats, streams, &t.run_only(), Duration::from_secs(60)).await?;
    println!("{}", result_line(&result));
    Ok(())
}

/// Cancels one job of a pipeline's run (`token`). A carried job (`rerun --failed`) did not run
/// in this run and cannot be cancelled. A job on a runner is stopped by its runner; one that has
/// not started gets a cancel request in its state, and the dispatcher holding the run ends it
/// `cancelled` with a result of its own (or, once its run is taken, the dispatcher that takes
/// it). The jobs that need it are skipped; the others go on, `fail_fast` or not. Waits for the
/// job's result, or the run's should the job end without one (skipped meanwhile).
async fn cancel_pipeline_job(
    nats: &Nats,
    streams: &Streams,
    t: &Target,
    jobs: &[JobPlan],
    token: &str,
) -> Result<()> {
    let plan = jobs.iter().find(|j| j.job == token);
    if let Some(carried) = plan.and_then(|p| p.carried.as_ref()) {
        bail!(
            "{} was carried over from run {} ({}): it does not run in run {}, so it cannot be cancelled",
            t.describe(),
            carried.carried_from.unwrap_or(0),
            carried.status,
            t.run
        );
    }
    if let Some(r) = final_result(nats, &streams.results, &t.job()).await? {
        bail!(
            "nothing to cancel: {} already finished ({})",
            t.describe(),
            r.status
        );
    }
    if let Some(run) = final_result(nats, &streams.results, &t.run_only()).await? {
        bail!(
            "nothing to cancel: run {} of {} already finished ({})",
            t.run,
            t.sha,
            run.status
        );
    }
    let key = t.job().key();
    let current = store::read(&streams.job_states, &key).await?;
    if let Some(c) = current
        .as_ref()
        .filter(|c| c.state.phase == JobPhase::Final)
    {
        let status = c.state.status.map(|s| s.to_string()).unwrap_or_default();
        bail!(
            "nothing to cancel: {} already finished ({status})",
            t.describe()
        );
    }
    let commit = match find_commit(nats, streams, t).await? {
        Some(c) => c,
        None => bail!("{} is not queued: nothing to cancel", t.describe()),
    };
    let queued = JobState::queued(&commit, &t.job());
    let who = who();
    store::request_cancel(&streams.job_states, &key, &queued, &who)
        .await
        .context("cannot record the cancel request")?;
    let started = current.is_some_and(|c| c.state.phase != JobPhase::Queued);
    println!(
        "cancel requested for {} in {} ({}); the jobs that need it will be skipped",
        t.describe(),
        t.repo,
        if started { "running" } else { "not started" }
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(r) = final_result(nats, &streams.results, &t.job()).await? {
            println!("{}", result_line(&r));
            return Ok(());
        }
        if let Some(run) = final_result(nats, &streams.results, &t.run_only()).await? {
            // The job ended without a result of its own: skipped, as the run lists it.
            if let Some(j) = run.jobs.iter().find(|j| j.job == token) {
                let why = j.reason.as_deref().unwrap_or("");
                println!("{}: {} ({why})", j.name, j.status);
            }
            println!("{}", result_line(&run));
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("no result for {} within 60s", t.describe());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether the dispatchers' consumer has delivered the commit message at `seq` of `CI_COMMITS`
/// to a dispatcher (it holds the run, or held it and its message comes back to another). No
/// consumer yet: no dispatcher ever ran, nothing was delivered.
async fn delivered(nats: &Nats, streams: &Streams, seq: u64) -> Result<bool> {
    let name = nats.names.dispatcher_consumer();
    match streams.commits.consumer_info(&name).await {
        Ok(info) => Ok(info.delivered.stream_sequence >= seq),
        Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("cannot read consumer {name}")),
    }
}

/// Cancels a job that is on no runner (queued, or not even recorded yet) the way a dispatcher
/// would ([`finish_without_runner`]): a `cancelled` result first (first writer wins), then
/// `final`; a dispatcher that holds or later takes the commit finds the result and closes it.
/// Returns false when the job moved meanwhile (a dispatcher assigned it: decide again).
async fn cancel_here(
    nats: &Nats,
    streams: &Streams,
    t: &Target,
    current: Option<Versioned>,
    who: &str,
) -> Result<bool> {
    let job = t.job();
    let commit = match find_commit(nats, streams, t).await? {
        Some(c) => c,
        None => match &current {
            Some(c) => commit_from_state(&c.state),
            None => bail!(
                "jetci has no job for run {} of {} in {}",
                t.run,
                t.sha,
                t.repo
            ),
        },
    };
    let attempt = current.as_ref().map(|c| c.state.attempt).unwrap_or(0);
    let reason = format!("cancelled {who}");
    let result = ResultMsg::without_run(
        &nats.names,
        &commit,
        &job,
        0,
        attempt,
        Status::Cancelled,
        reason,
    );
    let (state, revision) = match current {
        Some(c) => (c.state, Some(c.revision)),
        None => (JobState::queued(&commit, &job), None),
    };
    let state = state.request_cancel(who.to_string());
    let finished =
        finish_without_runner(nats, &streams.job_states, &result, state, revision).await?;
    match finished.state {
        // The job is final, with our verdict or the one that was there first.
        Ok(_) => Ok(true),
        // Another verdict was there first: the run is over, whoever marks it final.
        Err(_) if finished.published == Published::AlreadyPublished => Ok(true),
        // A dispatcher assigned it meanwhile: the runner must stop it too.
        Err(StateError::Conflict) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// `jetci rerun`: tests the commit again as a new run with its own result. With `failed`, a
/// pipeline's jobs that passed are not run again: their results are carried over.
pub async fn rerun(
    nats: &Nats,
    streams: &Streams,
    t: &Target,
    wait: bool,
    failed: bool,
) -> Result<()> {
    if t.job.is_some() {
        bail!("rerun runs a whole run again; --job is not for rerun");
    }
    let last = final_result(nats, &streams.results, &t.run_only())
        .await?
        .with_context(|| {
            format!(
                "run {} of {} has no result yet; rerun a finished run",
                t.run, t.sha
            )
        })?;
    let labels = store::read(&streams.job_states, &t.job().key())
        .await?
        .map(|s| s.state.labels)
        .unwrap_or_default();
    let latest = latest_run(nats, streams, &t.repo, &t.sha).await?;
    let commit = CommitMsg {
        v: VERSION,
        repo: t.repo.clone(),
        url: last.url.clone(),
        branch: last.branch.clone(),
        sha: t.sha.clone(),
        run: latest + 1,
        labels,
        author: last.author.clone(),
        summary: last.summary.clone(),
        published_at: messages::now(),
        // A pipeline's run plans the same jobs again.
        jobs: rerun_jobs(&last, failed)?,
        fail_fast: last.fail_fast,
    };
    let ack = publish_commit(nats, &commit)
        .await
        .context("cannot queue the rerun")?;
    if ack.duplicate {
        bail!("run {} of {} is already queued", commit.run, t.sha);
    }
    println!("queued run {} of {} in {}", commit.run, t.sha, t.repo);
    if wait {
        let target = Target {
            repo: t.repo.clone(),
            sha: t.sha.clone(),
            run: commit.run,
            job: None,
        };
        let result = wait_result(
            nats,
            streams,
            &target.run_only(),
            Duration::from_secs(24 * 3600),
        )
        .await?;
        println!("{}", result_line(&result));
    }
    Ok(())
}

/// The jobs of a rerun of the run that gave `last`: all of them, or with `failed` only those that
/// did not pass (the others carry their results over).
///
/// Errors: with `failed`, a run that passed, or every job of which passed.
fn rerun_jobs(last: &ResultMsg, failed: bool) -> Result<Vec<JobPlan>> {
    let plans = last.jobs.iter().map(|j| {
        let mut plan = JobPlan::from(j);
        if failed && j.status == Status::Passed {
            plan.carried = Some(messages::JobSummary {
                carried_from: Some(j.carried_from.unwrap_or(last.run)),
                ..j.clone()
            });
        }
        plan
    });
    let plans: Vec<JobPlan> = plans.collect();
    if failed
        && (last.status == Status::Passed
            || (!plans.is_empty() && plans.iter().all(|p| p.carried.is_some())))
    {
        bail!(
            "run {} of {} passed: nothing failed to run again",
            last.run,
            last.sha
        );
    }
    Ok(plans)
}

/// The commit message of the run, if it is still in `CI_COMMITS` (not yet closed).
async fn find_commit(nats: &Nats, streams: &Streams, t: &Target) -> Result<Option<CommitMsg>> {
    Ok(find_commit_seq(nats, streams, t).await?.map(|(c, _)| c))
}

/// The commit message of the run and its sequence in `CI_COMMITS`, if it is still there.
async fn find_commit_seq(
    nats: &Nats,
    streams: &Streams,
    t: &Target,
) -> Result<Option<(CommitMsg, u64)>> {
    let queued = queued_commits_seq(nats, streams, &t.repo).await;
    Ok(queued
        .into_iter()
        .find(|(c, _)| c.sha == t.sha && c.run == t.run))
}

/// The repository's commits still in `CI_COMMITS` (waiting, or held by a dispatcher), read
/// without a consumer so the work queue is not disturbed.
async fn queued_commits(nats: &Nats, streams: &Streams, repo: &str) -> Vec<CommitMsg> {
    let queued = queued_commits_seq(nats, streams, repo).await;
    queued.into_iter().map(|(c, _)| c).collect()
}

/// [`queued_commits`] with each one's sequence in `CI_COMMITS`.
async fn queued_commits_seq(nats: &Nats, streams: &Streams, repo: &str) -> Vec<(CommitMsg, u64)> {
    let subject = nats.names.commits_subject(repo);
    let mut found = Vec::new();
    let mut seq = 1;
    while let Ok(raw) = streams
        .commits
        .get_first_raw_message_by_subject(&subject, seq)
        .await
    {
        seq = raw.sequence + 1;
        if let Ok(c) = decode::<CommitMsg>(&raw.payload) {
            found.push((c, raw.sequence));
        }
    }
    found
}

fn commit_from_state(s: &JobState) -> CommitMsg {
    CommitMsg {
        v: VERSION,
        repo: s.repo.clone(),
        url: String::new(),
        branch: s.branch.clone(),
        sha: s.sha.clone(),
        run: s.run,
        labels: s.labels.clone(),
        author: String::new(),
        summary: String::new(),
        published_at: messages::now(),
        jobs: vec![],
        fail_fast: false,
    }
}

async fn wait_result(
    nats: &Nats,
    streams: &Streams,
    job: &JobRef,
    bound: Duration,
) -> Result<ResultMsg> {
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        if let Some(r) = final_result(nats, &streams.results, job).await? {
            return Ok(r);
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "no result for {job} within {}",
                humantime::format_duration(bound)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
