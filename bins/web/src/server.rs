//! The HTTP side: routes, the HTML pages, badges and static files.
//!
//! Handlers only read the in-memory view (under a short read lock) and, for a commit page, the
//! job's log from `CI_LOGS`. Every response carries a strict Content-Security-Policy (scripts and
//! styles from this origin only, no inline script) and `nosniff`, a second line of defence
//! behind the escaping of every value from a repository.

use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use jetci::connect::Nats;
use jetci::messages::{decode, CommitMsg, JobPlan};
use jetci::shutdown::CancellationToken;
use jetci::subjects::{check_sha, is_token, JobRef};
use maud::Markup;
use serde::Deserialize;
use time::OffsetDateTime;

use crate::feed::Shared;
use crate::graph::{self, Pipeline};
use crate::pages::{self, Log};
use crate::view::CommitView;
use crate::{api, badge, live};

/// Bytes of one log shown in a page; longer logs link to `/log/…`.
const PAGE_LOG_BYTES: usize = 2 * 1024 * 1024;
/// Bytes of one log served raw by `/log/…`.
const RAW_LOG_BYTES: usize = 64 * 1024 * 1024;
/// How long reading one log may take.
const LOG_TIMEOUT: Duration = Duration::from_secs(10);
/// Commits shown per branch on a repository page.
const COMMITS_PER_BRANCH: usize = 50;
/// Results on the dashboard.
const DASHBOARD_RESULTS: usize = 50;
/// Commit messages of one repository looked through for a running pipeline's plan.
const PLAN_SCAN: usize = 256;
/// Pipeline runs drawn on one commit page, the newest.
const PIPELINE_RUNS: usize = 20;
/// How long looking for running pipelines' plans may take, for one page.
const PLAN_TIMEOUT: Duration = Duration::from_secs(5);

/// What every handler can reach.
#[derive(Clone)]
pub struct App {
    pub shared: Shared,
    pub nats: Nats,
    pub logs: async_nats::jetstream::stream::Stream,
    /// `CI_COMMITS`, where a running pipeline's plan is read from (its commit message).
    pub commits: async_nats::jetstream::stream::Stream,
    pub max_results: usize,
    /// Cancelled at shutdown, so open event streams end.
    pub stop: CancellationToken,
    /// Live log streams open at once, at most [`crate::live::MAX_LOG_FOLLOWERS`]: each holds a
    /// `CI_LOGS` consumer.
    pub log_followers: std::sync::Arc<tokio::sync::Semaphore>,
}

/// The whole router.
pub fn router(app: App) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/repo/{repo}", get(repo_page))
        .route("/repo/{repo}/commit/{sha}", get(commit_page))
        .route("/runners", get(runners_page))
        .route("/log/{repo}/{sha}/{run}/{attempt}", get(raw_log))
        .route("/log/{repo}/{sha}/{run}/{job}/{attempt}", get(raw_job_log))
        .route("/badge/{file}", get(badge_repo))
        .route("/badge/{repo}/{*branch}", get(badge_branch))
        .route("/static/style.css", get(style))
        .route("/static/live.js", get(script))
        .route("/events", get(live::changes))
        .route("/events/log/{repo}/{sha}/{run}/{attempt}", get(live::log))
        .route(
            "/events/log/{repo}/{sha}/{run}/{job}/{attempt}",
            get(live::job_log),
        )
        .route("/healthz", get(api::health))
        .route("/api/results", get(api::results))
        .route("/api/repos", get(api::repos))
        .route("/api/commit/{repo}/{sha}", get(api::commit))
        .route("/api/runners", get(api::runners))
        .route("/api/queue", get(api::queue))
        .route("/api/jobs", get(api::jobs))
        .fallback(not_found)
        .layer(middleware::from_fn(security_headers))
        .with_state(app)
}

async fn security_headers(req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
             connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    res
}

fn page(markup: Markup) -> Response {
    (
        [(header::CACHE_CONTROL, "no-cache")],
        Html(markup.into_string()),
    )
        .into_response()
}

fn error(code: StatusCode, title: &str, message: &str) -> Response {
    (code, Html(pages::error_page(title, message).into_string())).into_response()
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "Not found", "There is no such page.")
}

async fn dashboard(State(app): State<App>) -> Response {
    let now = OffsetDateTime::now_utc();
    let (repos, jobs, recent) = app.shared.read(|v| {
        let repos: Vec<_> = v
            .repo_names()
            .into_iter()
            .map(|r| {
                let b = v.branches(&r);
                (r, b)
            })
            .collect();
        (
            repos,
            v.jobs(false),
            v.recent(None, None, DASHBOARD_RESULTS),
        )
    });
    page(pages::dashboard(&repos, &jobs, &recent, now))
}

#[derive(Deserialize)]
pub struct BranchQuery {
    pub branch: Option<String>,
}

async fn repo_page(
    State(app): State<App>,
    Path(repo): Path<String>,
    Query(q): Query<BranchQuery>,
) -> Response {
    if !is_token(&repo) {
        return error(
            StatusCode::BAD_REQUEST,
            "Bad repository name",
            "Repository names hold only letters, digits, '-' and '_'.",
        );
    }
    let now = OffsetDateTime::now_utc();
    let selected = q.branch.as_deref();
    let (branches, jobs) = app.shared.read(|v| {
        let branches: Vec<_> = v
            .branches(&repo)
            .into_iter()
            .filter(|b| selected.is_none_or(|s| b.name == s))
            .map(|b| {
                let commits = v.branch_commits(&repo, &b.name, COMMITS_PER_BRANCH);
                (b, commits)
            })
            .collect();
        let jobs: Vec<_> = v
            .jobs(false)
            .into_iter()
            .filter(|j| j.state.repo == repo && selected.is_none_or(|s| j.state.branch == s))
            .collect();
        (branches, jobs)
    });
    page(pages::repo_page(&repo, &branches, selected, &jobs, now))
}

async fn commit_page(
    State(app): State<App>,
    Path((repo, sha)): Path<(String, String)>,
) -> Response {
    if !is_token(&repo) || check_sha(&sha).is_err() {
        return error(
            StatusCode::BAD_REQUEST,
            "Bad commit",
            "Give a repository name and a full 40-digit commit id.",
        );
    }
    let now = OffsetDateTime::now_utc();
    let view = app.shared.read(|v| v.commit(&repo, &sha));
    let pipelines = pipelines(&app, &repo, &sha, &view).await;
    let mut logs = Vec::new();
    for s in &view.finals {
        let r = &s.result;
        if !r.jobs.is_empty() {
            // A pipeline run's result has no log of its own: its jobs have theirs.
            logs.push(Log::Unavailable(
                "a pipeline run's jobs have the logs".into(),
            ));
            continue;
        }
        let subject = app
            .nats
            .names
            .logs_subject(&JobRef::only(&r.repo, &r.sha, r.run), r.attempt);
        logs.push(match read_log(&app, &subject, PAGE_LOG_BYTES).await {
            Ok((text, cut)) => Log::Text(text, cut),
            Err(e) => Log::Unavailable(e),
        });
    }
    let code = if view.is_empty() {
        StatusCode::NOT_FOUND
    } else {
        StatusCode::OK
    };
    (
        code,
        page(pages::commit_page(
            &repo, &sha, &view, &pipelines, &logs, now,
        )),
    )
        .into_response()
}

/// The pipeline runs of a commit, newest first, each laid out as a graph.
///
/// At most [`PIPELINE_RUNS`] runs are drawn, and looking for the plans of running ones takes at
/// most [`PLAN_TIMEOUT`] in all (results on made-up runs cannot make a page slow).
pub async fn pipelines(app: &App, repo: &str, sha: &str, view: &CommitView) -> Vec<Pipeline> {
    let deadline = tokio::time::Instant::now() + PLAN_TIMEOUT;
    let mut out = Vec::new();
    let runs = graph::pipeline_runs(&view.finals, &view.job_results, &view.jobs);
    for run in runs.into_iter().take(PIPELINE_RUNS) {
        let run_result = view.finals.iter().find(|s| s.result.run == run);
        let plan = match run_result {
            Some(s) if !s.result.jobs.is_empty() => None,
            _ => {
                // Still running: the plan is in its commit message, which a job's result
                // points at.
                let hint = view
                    .job_results
                    .iter()
                    .find(|s| s.result.run == run)
                    .map(|s| s.result.commit_seq);
                live_plan(app, repo, sha, run, hint, deadline).await
            }
        };
        out.push(graph::pipeline(
            run,
            run_result,
            plan.as_deref(),
            &view.job_results,
            &view.jobs,
        ));
    }
    out
}

/// Run `run`'s plan from its commit message in `CI_COMMITS`, where it stays until the run has
/// its result: at `hint` (a job result's `commit_seq`), else found among the first
/// [`PLAN_SCAN`] messages on the repository's subject. `None` when not found by `deadline` (the
/// graph then shows the jobs seen so far, without their needs).
async fn live_plan(
    app: &App,
    repo: &str,
    sha: &str,
    run: u32,
    hint: Option<u64>,
    deadline: tokio::time::Instant,
) -> Option<Vec<JobPlan>> {
    let subject = app.nats.names.commits_subject(repo);
    // Anyone who may publish can put anything on any subject: only this repository's subject,
    // and a message that names this very run, is taken.
    let plan_of = |raw: &async_nats::jetstream::message::StreamMessage| {
        if raw.subject.as_str() != subject {
            return None;
        }
        let c: CommitMsg = decode(&raw.payload).ok()?;
        (c.repo == repo && c.sha == sha && c.run == run).then_some(c.jobs)
    };
    let find = async {
        if let Some(seq) = hint {
            if let Ok(raw) = app.commits.get_raw_message(seq).await {
                if let Some(plan) = plan_of(&raw) {
                    return Some(plan);
                }
            }
        }
        let mut seq = 1;
        for _ in 0..PLAN_SCAN {
            let raw = app
                .commits
                .get_first_raw_message_by_subject(subject.as_str(), seq)
                .await
                .ok()?;
            seq = raw.sequence + 1;
            if let Some(plan) = plan_of(&raw) {
                return Some(plan);
            }
        }
        None
    };
    tokio::time::timeout_at(deadline, find).await.ok().flatten()
}

/// A job's stored output, lossily decoded, at most `max` bytes; true when cut.
async fn read_log(app: &App, subject: &str, max: usize) -> Result<(String, bool), String> {
    let (chunks, cut) = jetci::follow::read_stored(&app.logs, subject, max, LOG_TIMEOUT).await?;
    let mut bytes = Vec::new();
    for c in chunks {
        bytes.extend_from_slice(&c.payload);
    }
    Ok((String::from_utf8_lossy(&bytes).into_owned(), cut))
}

/// `/log/{repo}/{sha}/{run}/{attempt}`: an attempt of a run's only job.
async fn raw_log(
    State(app): State<App>,
    Path((repo, sha, run, attempt)): Path<(String, String, u32, u32)>,
) -> Response {
    if !is_token(&repo) || check_sha(&sha).is_err() || run == 0 || attempt == 0 {
        return (StatusCode::BAD_REQUEST, "bad job name\n").into_response();
    }
    serve_log(&app, &JobRef::only(&repo, &sha, run), attempt).await
}

/// `/log/{repo}/{sha}/{run}/{job}/{attempt}`: an attempt of a pipeline's job.
async fn raw_job_log(
    State(app): State<App>,
    Path((repo, sha, run, job, attempt)): Path<(String, String, u32, String, u32)>,
) -> Response {
    match job_ref(&repo, &sha, run, Some(&job), attempt) {
        Some(job) => serve_log(&app, &job, attempt).await,
        None => (StatusCode::BAD_REQUEST, "bad job name\n").into_response(),
    }
}

/// The job a log route names, when every part is well formed: a repository token, a full
/// commit id, run and attempt from 1, and a job token that is not all digits (that would read
/// as an attempt).
pub fn job_ref(repo: &str, sha: &str, run: u32, job: Option<&str>, attempt: u32) -> Option<JobRef> {
    let job_ok = job.is_none_or(|j| is_token(j) && !j.bytes().all(|b| b.is_ascii_digit()));
    (is_token(repo) && check_sha(sha).is_ok() && run > 0 && attempt > 0 && job_ok)
        .then(|| JobRef::new(repo, sha, run, job))
}

async fn serve_log(app: &App, job: &JobRef, attempt: u32) -> Response {
    let subject = app.nats.names.logs_subject(job, attempt);
    match read_log(app, &subject, RAW_LOG_BYTES).await {
        Ok((text, cut)) => {
            let mut text = text;
            if cut {
                text.push_str("\n[jetci-web: log cut at 64 MiB]\n");
            }
            ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response()
        }
        Err(e) => (
            StatusCode::BAD_GATEWAY,
            format!("cannot read the log: {e}\n"),
        )
            .into_response(),
    }
}

async fn runners_page(State(app): State<App>) -> Response {
    let now = OffsetDateTime::now_utc();
    let (runners, jobs) = app.shared.write(|v| {
        (
            v.runners(now, jetci::streams::RUNNERS_KV_MAX_AGE),
            v.jobs(false),
        )
    });
    let (queued, active): (Vec<_>, Vec<_>) = jobs
        .into_iter()
        .partition(|j| j.state.phase == jetci::messages::JobPhase::Queued);
    page(pages::runners_page(&runners, &queued, &active, now))
}

fn badge_response(app: &App, repo: &str, branch: Option<&str>) -> Response {
    let status = if is_token(repo) {
        app.shared.read(|v| v.badge_status(repo, branch))
    } else {
        None
    };
    let what = match branch {
        Some(b) => format!("{repo} {b}"),
        None => repo.to_string(),
    };
    (
        [
            (header::CONTENT_TYPE, "image/svg+xml; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache, max-age=0"),
        ],
        badge::svg(&what, status),
    )
        .into_response()
}

/// `/badge/{repo}.svg` and `/badge/{repo}.svg?branch=…`.
async fn badge_repo(
    State(app): State<App>,
    Path(file): Path<String>,
    Query(q): Query<BranchQuery>,
) -> Response {
    let Some(repo) = file.strip_suffix(".svg") else {
        return not_found().await;
    };
    badge_response(&app, repo, q.branch.as_deref())
}

/// `/badge/{repo}/{branch}.svg`; the branch may hold `/`.
async fn badge_branch(
    State(app): State<App>,
    Path((repo, branch)): Path<(String, String)>,
) -> Response {
    let Some(branch) = branch.strip_suffix(".svg") else {
        return not_found().await;
    };
    badge_response(&app, &repo, Some(branch))
}

async fn style() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        pages::STYLE,
    )
        .into_response()
}

async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        pages::LIVE_JS,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_routes_take_well_formed_names_only() {
        let sha = "ab".repeat(20);
        let job = job_ref("app", &sha, 2, Some("lint"), 1).expect("a pipeline's job");
        assert_eq!(job.key(), format!("app.{sha}.2.lint"));
        assert_eq!(
            job_ref("app", &sha, 1, None, 3).unwrap().key(),
            format!("app.{sha}.1")
        );
        for (repo, sha, run, job, attempt) in [
            ("a.b", sha.as_str(), 1, None, 1),
            ("app", "abc", 1, None, 1),
            ("app", sha.as_str(), 0, None, 1),
            ("app", sha.as_str(), 1, None, 0),
            ("app", sha.as_str(), 1, Some("12"), 1),
            ("app", sha.as_str(), 1, Some("a.b"), 1),
            ("app", sha.as_str(), 1, Some("*"), 1),
            ("app", sha.as_str(), 1, Some(""), 1),
        ] {
            assert!(
                job_ref(repo, sha, run, job, attempt).is_none(),
                "{repo} {sha} {run} {job:?}"
            );
        }
    }
}
