//! The HTML pages, rendered on the server with maud.
//!
//! maud escapes every interpolated value (`&`, `<`, `>`, `"`, `'`), in text and in attributes, so
//! branch names, commit summaries, authors, reasons and test output from a repository can never
//! become markup (invariant I5 for browsers). The pages need no JavaScript; `/static/live.js`
//! only refreshes the `<main>` element (or the page) when `/events` announces a change that
//! concerns it, and appends a running job's output. It is a separate same-origin file so the
//! Content-Security-Policy can forbid inline scripts altogether.

use std::time::Duration;

use jetci::messages::{JobPhase, Status, TestCounts};
use maud::{html, Markup, DOCTYPE};
use time::OffsetDateTime;

use crate::graph::{Node, NodeStatus, Pipeline};
use crate::view::{age, BranchSummary, CommitSummary, CommitView, Job, Runner, Stored};

/// What the live script needs to know about a page (rendered as `data-` attributes of `<body>`).
#[derive(Default)]
pub struct Live<'a> {
    /// `dashboard`, `repo`, `commit` or `runners`.
    pub page: &'a str,
    pub repo: Option<&'a str>,
    pub sha: Option<&'a str>,
    /// The phases of the commit's unfinished jobs, so a commit page reloads when one changes.
    pub phase: Option<String>,
}

/// The common frame of every page.
pub fn layout(title: &str, live: &Live, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · jetci" }
                link rel="stylesheet" href="/static/style.css";
                script src="/static/live.js" defer {}
            }
            body data-live=(live.page) data-repo=[live.repo] data-sha=[live.sha] data-phase=[live.phase.as_deref()] {
                header {
                    nav aria-label="main" {
                        a href="/" { "jetci" }
                        " "
                        a href="/runners" { "Runners and queue" }
                        " "
                        a href="/api/repos" { "API" }
                    }
                }
                main id="main" { (body) }
            }
        }
    }
}

/// A status word with its colour class; the word itself carries the meaning (accessible without
/// colour).
pub fn status(s: Status) -> Markup {
    html! { span class={ "status " (s.as_str()) } { (status_word(s)) } }
}

/// The word shown for a status.
pub fn status_word(s: Status) -> &'static str {
    match s {
        Status::Passed => "passed",
        Status::Failed => "failed",
        Status::Error => "error",
        Status::TimedOut => "timed out",
        Status::Cancelled => "cancelled",
        Status::Skipped => "skipped",
    }
}

fn phase_word(p: JobPhase) -> &'static str {
    match p {
        JobPhase::Queued => "queued",
        JobPhase::Assigned => "assigned",
        JobPhase::Running => "running",
        JobPhase::Final => "final",
    }
}

/// The first 8 hex digits of a commit id.
pub fn short(sha: &str) -> &str {
    sha.get(..8).unwrap_or(sha)
}

/// Percent-encodes `s` for a path segment or a query value (everything but unreserved bytes).
pub fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn commit_href(repo: &str, sha: &str) -> String {
    format!("/repo/{}/commit/{}", enc(repo), enc(sha))
}

fn repo_href(repo: &str, branch: Option<&str>) -> String {
    match branch {
        Some(b) => format!("/repo/{}?branch={}", enc(repo), enc(b)),
        None => format!("/repo/{}", enc(repo)),
    }
}

/// `0.3s`, `12.0s`, `2m05s`, `1h02m`.
pub fn duration_ms(ms: u64) -> String {
    let secs = ms / 1000;
    if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if secs < 3600 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60)
    }
}

/// A time as `2026-11-30 01:52:12 UTC`.
pub fn when(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// An age as `3s`, `4m`, `2h`, `5d`.
pub fn ago(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// `3 tests: 2 passed, 1 failed` or `-`.
pub fn tests_text(t: Option<&TestCounts>) -> String {
    match t {
        None => "-".into(),
        Some(t) => {
            let noun = if t.tests == 1 { "test" } else { "tests" };
            let mut s = format!(
                "{} {noun}: {} passed, {} failed",
                t.tests, t.passed, t.failed
            );
            if t.skipped > 0 {
                s.push_str(&format!(", {} skipped", t.skipped));
            }
            s
        }
    }
}

fn runner_text(r: &str) -> &str {
    if r.is_empty() {
        "-"
    } else {
        r
    }
}

fn first_line(s: &str) -> &str {
    s.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
}

/// Removes ANSI escape sequences (`ESC [ … letter`) and other control characters but newline
/// and tab from output shown in a page.
pub fn clean_output(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
        } else if c == '\n' || c == '\t' || !c.is_control() {
            out.push(c);
        }
    }
    out
}

/// The rows of a results table.
fn results_table(results: &[std::sync::Arc<Stored>], show_repo: bool) -> Markup {
    html! {
        table {
            thead { tr {
                th scope="col" { "Status" }
                @if show_repo { th scope="col" { "Repository" } }
                th scope="col" { "Branch" }
                th scope="col" { "Commit" }
                th scope="col" { "Summary" }
                th scope="col" { "Duration" }
                th scope="col" { "Runner" }
                th scope="col" { "Run / attempt" }
                th scope="col" { "Tests" }
                th scope="col" { "Finished" }
            } }
            tbody {
                @for s in results {
                    @let r = &s.result;
                    tr data-key=(r.key()) {
                        td { (status(r.status)) }
                        @if show_repo { td { a href=(repo_href(&r.repo, None)) { (r.repo) } } }
                        td { a href=(repo_href(&r.repo, Some(&r.branch))) { (r.branch) } }
                        td { a href=(commit_href(&r.repo, &r.sha)) { code { (short(&r.sha)) } } }
                        td { (first_line(&r.summary)) @if !r.author.is_empty() { br; small { (r.author) } } }
                        td { (duration_ms(r.duration_ms)) }
                        td { (runner_text(&r.runner)) }
                        td { (r.run) " / " (r.attempt) }
                        td { (tests_text(r.tests.as_ref())) }
                        td { (when(r.finished_at)) }
                    }
                }
            }
        }
    }
}

fn jobs_table(jobs: &[Job], now: OffsetDateTime) -> Markup {
    html! {
        table {
            thead { tr {
                th scope="col" { "Phase" }
                th scope="col" { "Repository" }
                th scope="col" { "Branch" }
                th scope="col" { "Commit" }
                th scope="col" { "Run / attempt" }
                th scope="col" { "Runner" }
                th scope="col" { "Labels" }
                th scope="col" { "Reason" }
                th scope="col" { "Updated" }
            } }
            tbody {
                @for j in jobs {
                    @let s = &j.state;
                    tr {
                        td { span class={ "phase " (phase_word(s.phase)) } { (phase_word(s.phase)) } }
                        td { a href=(repo_href(&s.repo, None)) { (s.repo) } }
                        td { (s.branch) }
                        td { a href=(commit_href(&s.repo, &s.sha)) { code { (short(&s.sha)) } } }
                        td { (s.run) " / " (s.attempt) @if let Some(job) = &s.job { " " code { (job) } } }
                        td { (s.runner.as_deref().unwrap_or("-")) }
                        td { (s.labels.join(", ")) }
                        td { (s.reason.as_deref().unwrap_or("")) }
                        td { (ago(age(now, j.written))) " ago" }
                    }
                }
            }
        }
    }
}

/// `/`: repositories with their branches' latest status, jobs in progress, recent results.
pub fn dashboard(
    repos: &[(String, Vec<BranchSummary>)],
    jobs: &[Job],
    recent: &[std::sync::Arc<Stored>],
    now: OffsetDateTime,
) -> Markup {
    let body = html! {
        h1 { "Repositories" }
        @if repos.is_empty() {
            p { "No results yet. Results appear here as soon as a runner publishes them." }
        } @else {
            table {
                thead { tr {
                    th scope="col" { "Repository" }
                    th scope="col" { "Branch" }
                    th scope="col" { "Status" }
                    th scope="col" { "Commit" }
                    th scope="col" { "Finished" }
                } }
                tbody {
                    @for (repo, branches) in repos {
                        @for b in branches {
                            @let r = &b.latest.result;
                            tr data-key=(r.key()) {
                                td { a href=(repo_href(repo, None)) { (repo) } }
                                td { a href=(repo_href(repo, Some(&b.name))) { (b.name) } }
                                td { (status(r.status)) }
                                td { a href=(commit_href(repo, &r.sha)) { code { (short(&r.sha)) } } " " (first_line(&r.summary)) }
                                td { (when(r.finished_at)) }
                            }
                        }
                    }
                }
            }
        }
        @if !jobs.is_empty() {
            h2 { "In progress" }
            (jobs_table(jobs, now))
        }
        h2 { "Recent results" }
        (results_table(recent, true))
    };
    layout(
        "Dashboard",
        &Live {
            page: "dashboard",
            ..Default::default()
        },
        body,
    )
}

/// `/repo/{repo}`: each branch (or one, with `?branch=`) with its commits newest first.
pub fn repo_page(
    repo: &str,
    branches: &[(BranchSummary, Vec<CommitSummary>)],
    selected: Option<&str>,
    jobs: &[Job],
    now: OffsetDateTime,
) -> Markup {
    let body = html! {
        h1 { "Repository " (repo) }
        p {
            "Badge: " img src=(format!("/badge/{}.svg", enc(repo))) alt=(format!("build status of {repo}"));
            @if let Some(b) = selected {
                " " img src=(format!("/badge/{}.svg?branch={}", enc(repo), enc(b))) alt=(format!("build status of {repo} {b}"));
                " " a href=(repo_href(repo, None)) { "all branches" }
            }
        }
        @if !jobs.is_empty() {
            h2 { "In progress" }
            (jobs_table(jobs, now))
        }
        @if branches.is_empty() {
            p { "No results for this repository" @if selected.is_some() { " and branch" } "." }
        }
        @for (b, commits) in branches {
            section {
                h2 { "Branch " a href=(repo_href(repo, Some(&b.name))) { (b.name) } " " (status(b.latest.result.status)) }
                table {
                    thead { tr {
                        th scope="col" { "Status" }
                        th scope="col" { "Commit" }
                        th scope="col" { "Summary" }
                        th scope="col" { "Duration" }
                        th scope="col" { "Runner" }
                        th scope="col" { "Runs" }
                        th scope="col" { "Tests" }
                        th scope="col" { "Finished" }
                    } }
                    tbody {
                        @for c in commits {
                            @let r = &c.verdict.result;
                            tr data-key=(r.key()) {
                                td { (status(r.status)) }
                                td { a href=(commit_href(repo, &c.sha)) { code { (short(&c.sha)) } } }
                                td { (first_line(&r.summary)) @if !r.author.is_empty() { br; small { (r.author) } } }
                                td { (duration_ms(r.duration_ms)) }
                                td { (runner_text(&r.runner)) }
                                td { (c.runs) }
                                td { (tests_text(r.tests.as_ref())) }
                                td { (when(r.finished_at)) }
                            }
                        }
                    }
                }
                @if b.commits > commits.len() {
                    p { small { (b.commits - commits.len()) " older commits not shown." } }
                }
            }
        }
    };
    layout(
        repo,
        &Live {
            page: "repo",
            repo: Some(repo),
            ..Default::default()
        },
        body,
    )
}

/// A job's full log as read from `CI_LOGS`.
pub enum Log {
    /// The text (lossily decoded) and whether it was cut.
    Text(String, bool),
    /// It could not be read.
    Unavailable(String),
}

/// Size of a job's box in a pipeline's graph, and the gaps between boxes, in SVG pixels.
const BOX_W: usize = 210;
const BOX_H: usize = 44;
const GAP_X: usize = 60;
const GAP_Y: usize = 16;
/// Characters of a job's name shown in its box (the whole name is its tooltip).
const BOX_NAME_CHARS: usize = 26;

/// `name`, cut to `max` characters with an ellipsis.
fn cut(name: &str, max: usize) -> String {
    if name.chars().count() <= max {
        name.to_string()
    } else {
        let mut s: String = name.chars().take(max - 1).collect();
        s.push('…');
        s
    }
}

/// The `id` of a job's part of a commit page, which its box links to.
fn job_anchor(run: u32, job: &str) -> String {
    format!("job-{run}-{job}")
}

/// A pipeline run as an SVG graph: a box per job, coloured by status and linking to the job's
/// part of the page, and an arrow from each need to the job that needs it.
fn graph_svg(p: &Pipeline) -> Markup {
    let x = |col: usize| col * (BOX_W + GAP_X);
    let y = |row: usize| row * (BOX_H + GAP_Y);
    let width = (p.columns * (BOX_W + GAP_X)).saturating_sub(GAP_X).max(1);
    let height = (p.rows * (BOX_H + GAP_Y)).saturating_sub(GAP_Y).max(1);
    let at: std::collections::HashMap<&str, &Node> =
        p.nodes.iter().map(|n| (n.job.as_str(), n)).collect();
    let marker = format!("arrow-{}", p.run);
    html! {
        svg class="graph" xmlns="http://www.w3.org/2000/svg" width=(width) height=(height)
            viewBox=(format!("0 0 {width} {height}")) role="img"
            aria-label=(format!("run {} as a graph of {} jobs", p.run, p.nodes.len())) {
            defs {
                marker id=(marker) viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" orient="auto" {
                    path class="arrowhead" d="M0,0 L10,5 L0,10 z" {}
                }
            }
            @for n in &p.nodes {
                @for need in &n.needs {
                    @if let Some(from) = at.get(need.as_str()) {
                        @let (x1, y1) = (x(from.column) + BOX_W, y(from.row) + BOX_H / 2);
                        @let (x2, y2) = (x(n.column), y(n.row) + BOX_H / 2);
                        path class="edge" data-from=(need) data-to=(n.job)
                            d=(format!("M{x1},{y1} C{},{y1} {},{y2} {x2},{y2}", x1 + GAP_X / 2, x2.saturating_sub(GAP_X / 2)))
                            marker-end=(format!("url(#{marker})")) {}
                    }
                }
            }
            @for n in &p.nodes {
                a href=(format!("#{}", job_anchor(p.run, &n.job))) class="node" data-job=(n.job) data-name=(n.name) data-status=(n.status.as_str()) {
                    title { (n.name) ": " (n.status.word()) }
                    rect class={ "box " (n.status.as_str()) } x=(x(n.column)) y=(y(n.row)) width=(BOX_W) height=(BOX_H) rx="6" {}
                    text class="name" x=(x(n.column) + 10) y=(y(n.row) + 19) { (cut(&n.name, BOX_NAME_CHARS)) }
                    text class="word" x=(x(n.column) + 10) y=(y(n.row) + 36) { (n.status.word()) }
                }
            }
        }
    }
}

/// A job of a pipeline under its graph: status, runner, reason, and its log (the output tail
/// and a link to the whole log once it ended; the live output, which the script streams when
/// the part is opened, while it runs).
fn job_part(repo: &str, sha: &str, run: u32, n: &Node, now: OffsetDateTime) -> Markup {
    let result = n.result.as_ref().map(|s| &s.result);
    let state = n.state.as_ref();
    let attempt = n.attempt();
    let runner = result
        .map(|r| r.runner.clone())
        .or_else(|| state.and_then(|j| j.state.runner.clone()))
        .or_else(|| n.summary.as_ref().map(|s| s.runner.clone()))
        .unwrap_or_default();
    let reason = result
        .and_then(|r| r.reason.clone())
        .or_else(|| n.summary.as_ref().and_then(|s| s.reason.clone()))
        .or_else(|| state.and_then(|j| j.state.reason.clone()))
        .filter(|r| !r.trim().is_empty());
    let raw = (attempt > 0).then(|| {
        format!(
            "/log/{}/{}/{}/{}/{}",
            enc(repo),
            enc(sha),
            run,
            enc(&n.job),
            attempt
        )
    });
    let live = (result.is_none() && n.status == NodeStatus::Running && attempt > 0).then(|| {
        format!(
            "/events/log/{}/{}/{}/{}/{}",
            enc(repo),
            enc(sha),
            run,
            enc(&n.job),
            attempt
        )
    });
    let fingerprint = format!(
        "{}:{}:{}",
        n.status.as_str(),
        attempt,
        n.result.as_ref().map_or(0, |s| s.seq)
    );
    html! {
        details class="job" id=(job_anchor(run, &n.job)) data-swap=(fingerprint) data-log=[live.as_deref()] {
            summary { span class={ "status " (n.status.as_str()) } { (n.status.word()) } " " (n.name) }
            dl {
                dt { "Runner" } dd { (runner_text(&runner)) }
                dt { "Attempt" } dd { @if attempt > 0 { (attempt) } @else { "-" } }
                @if let Some(r) = result {
                    dt { "Duration" } dd { (duration_ms(r.duration_ms)) }
                    dt { "Tests" } dd { (tests_text(r.tests.as_ref())) }
                } @else if let Some(j) = state {
                    dt { "Updated" } dd { (ago(age(now, j.written))) " ago" }
                }
                @if let Some(reason) = &reason { dt { "Reason" } dd { (reason) } }
            }
            @if let Some(r) = result {
                @if let Some(t) = &r.tests {
                    @if !t.failures.is_empty() {
                        ul class="failures" { @for f in &t.failures { li { code { (f) } } } }
                    }
                }
                pre class="log" { (clean_output(&r.output_tail)) }
            } @else if live.is_some() {
                pre class="log live" {}
                noscript { p { "Reload the page to see the output so far." } }
            } @else {
                @if let Some(from) = n.summary.as_ref().and_then(|s| s.carried_from) {
                    p { "It passed in " a href=(format!("#{}", job_anchor(from, &n.job))) { "run " (from) } " and was not run again." }
                } @else if n.status == NodeStatus::Skipped {
                    p { "It did not run." }
                } @else {
                    p { "It has not started." }
                }
            }
            @if let Some(raw) = &raw { p { a href=(raw) { "Raw log" } } }
        }
    }
}

/// A pipeline run: its graph, its result once stored, and each job's part.
fn pipeline_section(repo: &str, sha: &str, p: &Pipeline, now: OffsetDateTime) -> Markup {
    html! {
        section class="pipeline" id=(format!("run-{}", p.run)) {
            h2 {
                "Run " (p.run) ": "
                @if let Some(s) = &p.result { (status(s.result.status)) }
                @else { span class="phase running" { "in progress" } }
            }
            div class="graph" id=(format!("graph-{}", p.run)) data-swap=(p.fingerprint()) {
                (graph_svg(p))
                @if p.hidden > 0 { p { (p.hidden) " more jobs are not drawn." } }
            }
            @if let Some(s) = &p.result {
                @let r = &s.result;
                dl {
                    dt { "Duration" } dd { (duration_ms(r.duration_ms)) }
                    dt { "Started" } dd { (when(r.started_at)) }
                    dt { "Finished" } dd { (when(r.finished_at)) }
                    @if let Some(reason) = r.reason.as_deref().filter(|s| !s.trim().is_empty()) {
                        dt { "Reason" } dd { (reason) }
                    }
                    dt { "Tests" } dd { (tests_text(r.tests.as_ref())) }
                }
            }
            h3 { "Jobs" }
            @for n in &p.nodes { (job_part(repo, sha, p.run, n, now)) }
        }
    }
}

/// `/repo/{repo}/commit/{sha}`: every run's result, failing tests, reason, output, full log;
/// the live log of a running attempt; a pipeline run as a graph of its jobs, each with its log.
pub fn commit_page(
    repo: &str,
    sha: &str,
    view: &CommitView,
    pipelines: &[Pipeline],
    logs: &[Log],
    now: OffsetDateTime,
) -> Markup {
    let head = view
        .finals
        .first()
        .or(view.job_results.first())
        .map(|s| &s.result);
    // A single job's phase reloads the page (its live output appears); a pipeline's jobs are
    // redrawn in place.
    let single_jobs: Vec<&Job> = view.jobs.iter().filter(|j| j.state.job.is_none()).collect();
    let phase = single_jobs
        .iter()
        .map(|j| {
            format!(
                "{}:{}:{}",
                j.state.run,
                phase_word(j.state.phase),
                j.state.attempt
            )
        })
        .collect::<Vec<_>>()
        .join(",");
    let body = html! {
        h1 { "Commit " code { (short(sha)) } " of " a href=(repo_href(repo, None)) { (repo) } }
        @if let Some(r) = head {
            p class="summary" { (first_line(&r.summary)) }
            dl {
                dt { "Commit" } dd { code { (sha) } }
                dt { "Author" } dd { (r.author) }
                dt { "Branch" } dd { a href=(repo_href(repo, Some(&r.branch))) { (r.branch) } }
            }
        } @else {
            p { code { (sha) } }
        }
        @if view.is_empty() {
            p { "Nothing is known about this commit (yet)." }
        }
        @for p in pipelines {
            (pipeline_section(repo, sha, p, now))
        }
        @let undrawn = view.finals.iter().filter(|s| !s.result.jobs.is_empty() && !pipelines.iter().any(|p| p.run == s.result.run)).count();
        @if undrawn > 0 {
            p { (undrawn) " older pipeline runs are not shown." }
        }
        @for j in &single_jobs {
            @let s = &j.state;
            section class="job" {
                h2 { "Run " (s.run) ": " span class={ "phase " (phase_word(s.phase)) } { (phase_word(s.phase)) } }
                p {
                    @if let Some(runner) = &s.runner { "Attempt " (s.attempt) " on runner " (runner) ". " }
                    @if let Some(reason) = &s.reason { "Reason: " (reason) ". " }
                    "Updated " (ago(age(now, j.written))) " ago."
                }
                @if s.attempt > 0 && s.phase != JobPhase::Queued {
                    h3 { "Live output" }
                    pre class="log live" data-log=(format!("/events/log/{}/{}/{}/{}", enc(repo), enc(sha), s.run, s.attempt)) {}
                    noscript { p { "Reload the page to see the output so far; it is complete once the result arrives." } }
                }
            }
        }
        @for (i, s) in view.finals.iter().enumerate().filter(|(_, s)| s.result.jobs.is_empty()) {
            @let r = &s.result;
            section class="run" {
                h2 { "Run " (r.run) ": " (status(r.status)) }
                dl {
                    dt { "Attempt" } dd { (r.attempt) }
                    dt { "Runner" } dd { (runner_text(&r.runner)) }
                    dt { "Duration" } dd { (duration_ms(r.duration_ms)) }
                    dt { "Started" } dd { (when(r.started_at)) }
                    dt { "Finished" } dd { (when(r.finished_at)) }
                    dt { "Exit" } dd {
                        @match (r.exit_code, r.signal) {
                            (_, Some(sig)) => { "signal " (sig) }
                            (Some(code), None) => { "exit code " (code) }
                            (None, None) => { "-" }
                        }
                    }
                    @if let Some(reason) = r.reason.as_deref().filter(|s| !s.trim().is_empty()) {
                        dt { "Reason" } dd { (reason) }
                    }
                    dt { "Tests" } dd { (tests_text(r.tests.as_ref())) }
                }
                @if let Some(t) = &r.tests {
                    @if !t.failures.is_empty() {
                        h3 { "Failing tests" }
                        ul class="failures" { @for f in &t.failures { li { code { (f) } } } }
                    }
                }
                @if !r.output_tail.is_empty() {
                    details open[r.status != Status::Passed] {
                        summary { "Output tail" }
                        pre class="log" { (clean_output(&r.output_tail)) }
                    }
                }
                details {
                    summary { "Full log (" (r.log_bytes) " bytes, " code { (r.log_subject) } ")" }
                    @match logs.get(i) {
                        Some(Log::Text(text, cut)) => {
                            pre class="log" { (clean_output(text)) }
                            @if *cut { p { "The log is longer than this page shows; " a href=(format!("/log/{}/{}/{}/{}", enc(repo), enc(sha), r.run, r.attempt)) { "download it" } "." } }
                        }
                        Some(Log::Unavailable(why)) => { p { "The log cannot be read: " (why) } }
                        None => {}
                    }
                    p { a href=(format!("/log/{}/{}/{}/{}", enc(repo), enc(sha), r.run, r.attempt)) { "Raw log" } }
                }
            }
        }
        @if !view.superseded.is_empty() {
            h2 { "Superseded attempts" }
            p { "Results of attempts that lost their runner's lease: kept for the record, never the verdict." }
            ul {
                @for s in &view.superseded {
                    @let r = &s.result;
                    li {
                        "Run " (r.run)
                        @if let Some(job) = &r.job { ", job " (r.job_name.as_deref().unwrap_or(job)) "," }
                        " attempt " (r.attempt) " on " (runner_text(&r.runner)) ": " (status(r.status)) " " (duration_ms(r.duration_ms))
                    }
                }
            }
        }
        p { a href=(format!("/api/commit/{}/{}", enc(repo), enc(sha))) { "This commit as JSON" } }
    };
    layout(
        &format!("{} {}", repo, short(sha)),
        &Live {
            page: "commit",
            repo: Some(repo),
            sha: Some(sha),
            phase: Some(phase),
        },
        body,
    )
}

/// `/runners`: live runners, then the queue and the jobs in progress.
pub fn runners_page(
    runners: &[Runner],
    queued: &[Job],
    active: &[Job],
    now: OffsetDateTime,
) -> Markup {
    let body = html! {
        h1 { "Runners" }
        @if runners.is_empty() {
            p { "No runner has reported in the last minute." }
        } @else {
            table {
                thead { tr {
                    th scope="col" { "Id" }
                    th scope="col" { "Host" }
                    th scope="col" { "Labels" }
                    th scope="col" { "Busy / capacity" }
                    th scope="col" { "Current jobs" }
                    th scope="col" { "Accepting" }
                    th scope="col" { "Heartbeat" }
                } }
                tbody {
                    @for r in runners {
                        @let i = &r.info;
                        tr {
                            td { (i.id) }
                            td { (i.host) }
                            td { (i.labels.join(", ")) }
                            td { (i.jobs.len()) " / " (i.capacity) }
                            td { @for j in &i.jobs { code { (j) } br; } }
                            td { @if i.accepting { "yes" } @else { "draining" } }
                            td { (ago(age(now, r.written))) " ago" }
                        }
                    }
                }
            }
        }
        h2 { "Queue" }
        @if queued.is_empty() { p { "No job is waiting for a runner." } } @else { (jobs_table(queued, now)) }
        h2 { "Assigned and running" }
        @if active.is_empty() { p { "No job is running." } } @else { (jobs_table(active, now)) }
    };
    layout(
        "Runners",
        &Live {
            page: "runners",
            ..Default::default()
        },
        body,
    )
}

/// A plain error page.
pub fn error_page(title: &str, message: &str) -> Markup {
    layout(
        title,
        &Live::default(),
        html! { h1 { (title) } p { (message) } },
    )
}

/// The stylesheet at `/static/style.css`.
pub const STYLE: &str = r#"
body { font-family: system-ui, sans-serif; margin: 0 1rem 2rem; color: #1b1b1b; background: #fff; }
header nav { padding: .6rem 0; border-bottom: 1px solid #ccc; margin-bottom: 1rem; }
header nav a { margin-right: 1rem; }
header nav a:first-child { font-weight: bold; }
table { border-collapse: collapse; width: 100%; margin-bottom: 1rem; }
th, td { text-align: left; padding: .25rem .5rem; border-bottom: 1px solid #e4e4e4; vertical-align: top; }
th { background: #f4f4f4; }
.status, .phase { font-weight: bold; padding: 0 .35rem; border-radius: .25rem; white-space: nowrap; }
.status.passed { color: #fff; background: #1e7b34; }
.status.failed, .status.timed_out { color: #fff; background: #b42318; }
.status.error { color: #fff; background: #b54708; }
.status.cancelled { color: #fff; background: #555; }
.status.skipped { color: #1b1b1b; background: #d0d0d0; }
.status.running { color: #fff; background: #0b57d0; }
.status.waiting { color: #1b1b1b; background: #f1e7b5; }
div.graph { overflow-x: auto; margin-bottom: 1rem; }
svg.graph { font: 13px system-ui, sans-serif; }
svg.graph rect.box { stroke: #333; stroke-width: 1; fill: #eee; }
svg.graph rect.box.passed { fill: #1e7b34; }
svg.graph rect.box.failed, svg.graph rect.box.timed_out { fill: #b42318; }
svg.graph rect.box.error { fill: #b54708; }
svg.graph rect.box.cancelled { fill: #555; }
svg.graph rect.box.skipped { fill: #d0d0d0; }
svg.graph rect.box.running { fill: #0b57d0; }
svg.graph rect.box.waiting { fill: #f1e7b5; }
svg.graph text { fill: #fff; }
svg.graph a[data-status="skipped"] text, svg.graph a[data-status="waiting"] text { fill: #1b1b1b; }
svg.graph text.name { font-weight: bold; }
svg.graph path.edge { fill: none; stroke: #555; stroke-width: 1.5; }
svg.graph path.arrowhead { fill: #555; }
svg.graph a:hover rect.box, svg.graph a:focus rect.box { stroke-width: 3; }
details.job { border: 1px solid #e4e4e4; padding: .3rem .6rem; margin-bottom: .4rem; }
details.job summary { cursor: pointer; }
.phase { color: #1b1b1b; background: #dde6f3; }
pre.log { background: #111; color: #eee; padding: .5rem; overflow: auto; max-height: 40rem; white-space: pre-wrap; word-break: break-all; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1rem; }
dt { font-weight: bold; }
dd { margin: 0; }
.summary { font-size: 1.15rem; }
a { color: #0b57d0; }
"#;

/// The live-update script at `/static/live.js`. It reads only `data-` attributes the server
/// rendered and JSON it parses; it writes output with `textContent`/text nodes, never as HTML.
///
/// On a commit page, a change of a pipeline's job replaces, in place, each part marked
/// `data-swap` whose fingerprint changed (the graph, a job's part), so open parts stay open; a
/// job's part with `data-log` streams its live output while it is open (a browser keeps about six
/// connections per server, so only the parts a user opens hold one). A click on a box opens the
/// job's part. Anything else (a run's result, a single job's phase) reloads the page.
pub const LIVE_JS: &str = r#"(function () {
  "use strict";
  var body = document.body, page = body.dataset.live;
  if (!page || !window.EventSource) return;
  var repo = body.dataset.repo, sha = body.dataset.sha;
  var busy = false, again = false;
  function relevant(c) {
    if (c.kind === "job_result" && page !== "commit") return false;
    if (page === "dashboard") return c.kind !== "runners";
    if (page === "repo") return c.repo === repo;
    if (page === "runners") return c.kind !== "result";
    if (page === "commit") return c.repo === repo && c.sha === sha && (c.kind === "result" || c.kind === "job" || c.kind === "job_result");
    return false;
  }
  function follow(pre, src) {
    var events = new EventSource(src);
    events.addEventListener("log", function (e) {
      var text;
      try { text = JSON.parse(e.data); } catch (err) { return; }
      var atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      pre.appendChild(document.createTextNode(text));
      if (atEnd) pre.scrollTop = pre.scrollHeight;
    });
    return events;
  }
  // A job's part: its live output while it is open.
  var streams = {};
  function attach(part) {
    if (!part.open || !part.dataset.log || streams[part.id]) return;
    var pre = part.querySelector("pre.live");
    if (pre) streams[part.id] = follow(pre, part.dataset.log);
  }
  function detach(id) {
    if (streams[id]) { streams[id].close(); delete streams[id]; }
  }
  document.addEventListener("toggle", function (e) {
    var part = e.target;
    if (!part || part.tagName !== "DETAILS" || !part.id) return;
    if (part.open) attach(part); else detach(part.id);
  }, true);
  function openTarget() {
    var id = decodeURIComponent(location.hash.slice(1));
    var part = id && document.getElementById(id);
    if (part && part.tagName === "DETAILS") { part.open = true; attach(part); }
  }
  window.addEventListener("hashchange", openTarget);
  openTarget();
  // Replaces each changed part; false when the page's parts are not the same ones (reload).
  function swap(doc) {
    var fresh = doc.querySelectorAll("[data-swap]");
    if (fresh.length !== document.querySelectorAll("[data-swap]").length) return false;
    var i, f, old;
    for (i = 0; i < fresh.length; i++) {
      if (!fresh[i].id || !document.getElementById(fresh[i].id)) return false;
    }
    for (i = 0; i < fresh.length; i++) {
      f = document.adoptNode(fresh[i]);
      old = document.getElementById(f.id);
      if (old.dataset.swap === f.dataset.swap) continue;
      if (old.tagName === "DETAILS") f.open = old.open;
      detach(old.id);
      old.replaceWith(f);
      if (f.tagName === "DETAILS") attach(f);
    }
    return true;
  }
  function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    fetch(location.href, { headers: { "Accept": "text/html" } })
      .then(function (r) { return r.text(); })
      .then(function (text) {
        var doc = new DOMParser().parseFromString(text, "text/html");
        if (page === "commit") {
          if (doc.body.dataset.phase !== body.dataset.phase || !swap(doc)) location.reload();
          return;
        }
        var fresh = doc.getElementById("main"), old = document.getElementById("main");
        if (fresh && old) old.replaceWith(fresh);
      })
      .catch(function () {})
      .then(function () {
        busy = false;
        if (again) { again = false; setTimeout(refresh, 300); }
      });
  }
  var events = new EventSource("/events");
  events.addEventListener("change", function (e) {
    var c;
    try { c = JSON.parse(e.data); } catch (err) { return; }
    if (!relevant(c)) return;
    if (page === "commit" && c.kind === "result") { location.reload(); return; }
    refresh();
  });
  // A single job's live output, always open.
  Array.prototype.forEach.call(document.querySelectorAll("pre[data-log]"), function (pre) {
    follow(pre, pre.dataset.log);
  });
})();
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::tests::result;
    use crate::view::View;

    #[test]
    fn everything_from_a_repository_is_escaped() {
        let mut v = View::new(10);
        let mut r = result("app", "x<script>alert(1)</script>", 1, 1, 1, Status::Failed);
        r.summary = "<script>alert(1)</script> & \"quotes\"".into();
        r.author = "<img src=x onerror=alert(1)> <a@x>".into();
        r.output_tail = "<b>bold</b>\x1b[31mred\x1b[0m\n".into();
        r.reason = Some("<i>why</i>".into());
        r.tests = Some(TestCounts {
            tests: 2,
            passed: 1,
            failed: 1,
            skipped: 0,
            failures: vec!["test_<x>".into()],
        });
        v.add_result(1, false, r.clone());
        let repos = vec![("app".to_string(), v.branches("app"))];
        let now = OffsetDateTime::now_utc();
        let pages = [
            dashboard(&repos, &[], &v.recent(None, None, 10), now).into_string(),
            repo_page(
                "app",
                &v.branches("app")
                    .into_iter()
                    .map(|b| {
                        let c = v.branch_commits("app", &b.name, 10);
                        (b, c)
                    })
                    .collect::<Vec<_>>(),
                Some("x<script>alert(1)</script>"),
                &[],
                now,
            )
            .into_string(),
            commit_page(
                "app",
                &r.sha,
                &v.commit("app", &r.sha),
                &[crate::graph::pipeline(
                    2,
                    None,
                    Some(&[jetci::messages::JobPlan {
                        name: "<script>alert(3)</script>".into(),
                        job: "j".into(),
                        needs: vec![],
                        labels: vec![],
                        allow_failure: false,
                        carried: None,
                    }]),
                    &[],
                    &[],
                )],
                &[Log::Text("<script>alert(2)</script>".into(), false)],
                now,
            )
            .into_string(),
        ];
        for page in &pages {
            assert!(!page.contains("<script>alert"), "{page}");
            assert!(!page.contains("<img src=x"), "{page}");
            assert!(!page.contains("<b>bold"), "{page}");
            assert!(!page.contains("<i>why"), "{page}");
            assert!(
                page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
                "{page}"
            );
        }
        assert!(
            pages[2].contains("&lt;b&gt;bold&lt;/b&gt;red\n"),
            "{}",
            pages[2]
        );
        assert!(pages[2].contains("test_&lt;x&gt;"));
        assert!(pages[2].contains("&lt;script&gt;alert(2)"));
        // A pipeline's job names, in its graph and its parts.
        assert_eq!(
            pages[2]
                .matches("&lt;script&gt;alert(3)&lt;/script&gt;")
                .count(),
            4,
            "{}",
            pages[2]
        );
        // Branch links are percent-encoded.
        assert!(pages[0].contains("/repo/app?branch=x%3Cscript%3Ealert%281%29%3C%2Fscript%3E"));
    }

    #[test]
    fn helpers() {
        assert_eq!(enc("feat/a b<"), "feat%2Fa%20b%3C");
        assert_eq!(enc("ü"), "%C3%BC");
        assert_eq!(short("0123456789"), "01234567");
        assert_eq!(short("01"), "01");
        assert_eq!(duration_ms(1234), "1.2s");
        assert_eq!(duration_ms(125_000), "2m05s");
        assert_eq!(ago(Duration::from_secs(5)), "5s");
        assert_eq!(ago(Duration::from_secs(7200)), "2h");
        assert_eq!(clean_output("a\x1b[1;31mb\x1b[0m\x07c\r\n"), "abc\n");
        assert_eq!(when(OffsetDateTime::UNIX_EPOCH), "1970-01-01 00:00:00 UTC");
        assert_eq!(tests_text(None), "-");
        let one = TestCounts {
            tests: 1,
            passed: 1,
            ..Default::default()
        };
        assert_eq!(tests_text(Some(&one)), "1 test: 1 passed, 0 failed");
    }
}
