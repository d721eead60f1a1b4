//! The JSON API (documented in README.md, "jetci-web"). Results are served as published on
//! `CI_RESULTS`, with their stream sequence added as `seq`; times are RFC 3339 UTC.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use jetci::messages::{JobPhase, ResultMsg};
use jetci::subjects::{check_sha, is_token};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use time::OffsetDateTime;

use crate::graph::Pipeline;
use crate::server::App;
use crate::view::{age, Job, Stored};

/// Results returned when `limit` is not given.
const DEFAULT_LIMIT: usize = 100;

/// A result as the API serves it: the fields as published, then `seq` (and `superseded: true`
/// for a fenced attempt).
///
/// Serialized straight into the response body: going through a `serde_json::Value` per result
/// first cost, for `/api/results` with `limit` up to `--max-results` (10,000 by default), about
/// as much transient memory as the whole view plus most of the time (jetci-bench W).
#[derive(Serialize)]
struct ResultOut<'a> {
    #[serde(flatten)]
    result: &'a ResultMsg,
    seq: u64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    superseded: bool,
}

impl<'a> From<&'a Arc<Stored>> for ResultOut<'a> {
    fn from(s: &'a Arc<Stored>) -> Self {
        ResultOut {
            result: &s.result,
            seq: s.seq,
            superseded: s.superseded,
        }
    }
}

fn result_json(s: &Arc<Stored>) -> Value {
    serde_json::to_value(ResultOut::from(s)).unwrap_or(Value::Null)
}

fn job_json(j: &Job, now: OffsetDateTime) -> Value {
    let mut v = serde_json::to_value(&j.state).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut v {
        map.insert("key".into(), j.key.clone().into());
        map.insert(
            "age_ms".into(),
            (age(now, j.written).as_millis() as u64).into(),
        );
    }
    v
}

/// A pipeline run's graph: `{"run","jobs":[{"name","job","needs","status","column","row","attempt"}],"hidden"}`.
fn pipeline_json(p: &Pipeline) -> Value {
    let jobs: Vec<Value> = p
        .nodes
        .iter()
        .map(|n| {
            json!({
                "name": n.name,
                "job": n.job,
                "needs": n.needs,
                "status": n.status,
                "column": n.column,
                "row": n.row,
                "attempt": n.attempt(),
            })
        })
        .collect();
    json!({ "run": p.run, "jobs": jobs, "hidden": p.hidden })
}

fn bad_request(message: &str) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({ "error": message }))).into_response()
}

#[derive(Deserialize)]
pub struct ResultsQuery {
    repo: Option<String>,
    branch: Option<String>,
    limit: Option<usize>,
}

/// `GET /api/results?repo=&branch=&limit=`: final results, newest first.
///
/// Streamed, one result a chunk: the answer for 300 results of 1 MiB each used to be built whole
/// in memory (313 MB); now the handler holds the list of shared results and one result's JSON at
/// a time.
pub async fn results(State(app): State<App>, Query(q): Query<ResultsQuery>) -> Response {
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT).min(app.max_results);
    let list = app
        .shared
        .read(|v| v.recent(q.repo.as_deref(), q.branch.as_deref(), limit));
    let last = list.len();
    let chunks = list.into_iter().enumerate().map(move |(i, s)| {
        let mut chunk = if i == 0 { b"[".to_vec() } else { b",".to_vec() };
        // A result decoded from JSON always encodes again; `null` keeps the array valid if not.
        if serde_json::to_writer(&mut chunk, &ResultOut::from(&s)).is_err() {
            chunk.extend_from_slice(b"null");
        }
        if i + 1 == last {
            chunk.push(b']');
        }
        Ok::<_, std::convert::Infallible>(bytes::Bytes::from(chunk))
    });
    let body = if last == 0 {
        axum::body::Body::from("[]")
    } else {
        axum::body::Body::from_stream(futures::stream::iter(chunks))
    };
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// `GET /api/repos`: each repository with its branches' latest verdict.
pub async fn repos(State(app): State<App>) -> Response {
    let list = app.shared.read(|v| {
        v.repo_names()
            .into_iter()
            .map(|repo| {
                let branches: Vec<Value> = v
                    .branches(&repo)
                    .iter()
                    .map(|b| {
                        let r = &b.latest.result;
                        json!({
                            "branch": b.name,
                            "status": r.status,
                            "sha": r.sha,
                            "run": r.run,
                            "summary": r.summary,
                            "finished_at": r.finished_at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
                            "commits": b.commits,
                        })
                    })
                    .collect();
                json!({ "repo": repo, "branches": branches })
            })
            .collect::<Vec<_>>()
    });
    Json(list).into_response()
}

/// `GET /api/commit/{repo}/{sha}`: every run's result, a pipeline's job results, superseded
/// attempts, unfinished jobs, and each pipeline run's graph as the commit page draws it.
pub async fn commit(State(app): State<App>, Path((repo, sha)): Path<(String, String)>) -> Response {
    if !is_token(&repo) || check_sha(&sha).is_err() {
        return bad_request("give a repository name and a full 40-digit commit id");
    }
    let now = OffsetDateTime::now_utc();
    let view = app.shared.read(|v| v.commit(&repo, &sha));
    let pipelines = crate::server::pipelines(&app, &repo, &sha, &view).await;
    let code = if view.is_empty() {
        StatusCode::NOT_FOUND
    } else {
        StatusCode::OK
    };
    let body = json!({
        "repo": repo,
        "sha": sha,
        "results": view.finals.iter().map(result_json).collect::<Vec<_>>(),
        "job_results": view.job_results.iter().map(result_json).collect::<Vec<_>>(),
        "superseded": view.superseded.iter().map(result_json).collect::<Vec<_>>(),
        "jobs": view.jobs.iter().map(|j| job_json(j, now)).collect::<Vec<_>>(),
        "pipelines": pipelines.iter().map(pipeline_json).collect::<Vec<_>>(),
    });
    (code, Json(body)).into_response()
}

/// `GET /api/runners`: live runners with their heartbeat age.
pub async fn runners(State(app): State<App>) -> Response {
    let now = OffsetDateTime::now_utc();
    let list = app
        .shared
        .write(|v| v.runners(now, jetci::streams::RUNNERS_KV_MAX_AGE));
    let body: Vec<Value> = list
        .iter()
        .map(|r| {
            let i = &r.info;
            json!({
                "id": i.id,
                "host": i.host,
                "labels": i.labels,
                "capacity": i.capacity,
                "busy": i.jobs.len(),
                "jobs": i.jobs,
                "accepting": i.accepting,
                "started_at": i.started_at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
                "heartbeat_age_ms": age(now, r.written).as_millis() as u64,
            })
        })
        .collect();
    Json(body).into_response()
}

/// `GET /api/queue`: jobs waiting for a runner, oldest first, with their reason and labels.
pub async fn queue(State(app): State<App>) -> Response {
    let now = OffsetDateTime::now_utc();
    let jobs = app.shared.read(|v| v.jobs(true));
    Json(jobs.iter().map(|j| job_json(j, now)).collect::<Vec<_>>()).into_response()
}

/// `GET /api/jobs`: every unfinished job (queued, assigned, running).
pub async fn jobs(State(app): State<App>) -> Response {
    let now = OffsetDateTime::now_utc();
    let jobs = app.shared.read(|v| v.jobs(false));
    let list: Vec<Value> = jobs
        .iter()
        .filter(|j| j.state.phase != JobPhase::Final)
        .map(|j| job_json(j, now))
        .collect();
    Json(list).into_response()
}

/// `GET /healthz`: whether the view is rebuilt, and how far it has read.
pub async fn health(State(app): State<App>) -> Response {
    let body = app.shared.read(|v| {
        json!({
            "ok": true,
            "caught_up": v.caught_up,
            "last_seq": v.last_seq,
            "results": v.len(),
            "skipped": v.skipped,
        })
    });
    Json(body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::tests::result;
    use jetci::messages::Status;

    /// The served form is the published result plus `seq`, and `superseded` only when true.
    #[test]
    fn results_are_served_as_published_with_their_sequence() {
        for superseded in [false, true] {
            let stored = Arc::new(Stored {
                seq: 42,
                superseded,
                result: result("app", "feat/ä", 1, 2, 7, Status::Failed),
            });
            let mut expected = serde_json::to_value(&stored.result).unwrap();
            let map = expected.as_object_mut().unwrap();
            map.insert("seq".into(), 42.into());
            if superseded {
                map.insert("superseded".into(), true.into());
            }
            assert_eq!(result_json(&stored), expected);
            let body = serde_json::to_string(&[ResultOut::from(&stored)]).unwrap();
            let parsed: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(parsed, Value::Array(vec![expected]));
        }
    }
}
