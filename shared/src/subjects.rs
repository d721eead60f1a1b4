//! Every subject, stream, bucket and consumer name jetci uses, built in one place.
//!
//! DESIGN.md ("Streams, subjects, buckets") fixes the shapes; every name starts with a configurable
//! prefix (default `ci`) so two installations can share one NATS account. Free text such as branch
//! names never becomes a subject token: NATS forbids `.`, `*`, `>` and whitespace in tokens
//! (docs.nats.io, "Subject-Based Messaging"), so only slugs, hex commit ids and numbers appear here.

use std::fmt;

/// An invalid name given by a user or found in a message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    /// The token is empty or holds something other than ASCII letters, digits, `-` and `_`.
    #[error("{what} {value:?} is not a valid name: use only letters, digits, '-' and '_'")]
    BadToken { what: &'static str, value: String },
    /// A commit id that is not 40 lowercase hex digits (SHA-1, git's default object format).
    #[error("{0:?} is not a full commit id (40 hex digits)")]
    BadSha(String),
}

/// True when `s` can be one subject token and one KV key segment: `[A-Za-z0-9_-]+`.
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Checks a token, naming `what` it is in the error.
pub fn check_token(what: &'static str, value: &str) -> Result<(), NameError> {
    if is_token(value) {
        Ok(())
    } else {
        Err(NameError::BadToken {
            what,
            value: value.to_string(),
        })
    }
}

/// Checks a full SHA-1 commit id in lowercase hex (what git2's `Oid::to_string` prints).
pub fn check_sha(sha: &str) -> Result<(), NameError> {
    if sha.len() == 40 && sha.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(NameError::BadSha(sha.to_string()))
    }
}

/// Turns any repository name or path into a subject-safe slug: the last path component without a
/// `.git` suffix, with every character outside `[A-Za-z0-9_-]` replaced by `-`.
///
/// `/srv/git/My.App.git` → `My-App`; `https://host/org/x.y.git` → `x-y`. Never empty (`repo`).
pub fn repo_slug(name_or_path: &str) -> String {
    let trimmed = name_or_path.trim_end_matches(['/', '\\']);
    let last = trimmed.rsplit(['/', '\\', ':']).next().unwrap_or(trimmed);
    let last = last.strip_suffix(".git").unwrap_or(last);
    let slug: String = last
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let slug = slug.trim_matches('-').to_string();
    if slug.is_empty() {
        "repo".to_string()
    } else {
        slug.chars().take(64).collect()
    }
}

/// The key of one run of one commit: `<repo>.<sha>.<run>`. Used as the commit's `Nats-Msg-Id`
/// and the last three tokens of its result subject (a run has one result, whatever its jobs).
pub fn run_key(repo: &str, sha: &str, run: u32) -> String {
    format!("{repo}.{sha}.{run}")
}

/// Which job of which run: the unit a dispatcher assigns and leases and a runner attempts
/// (DESIGN.md, "Runs and jobs"; a run is one commit tested once).
///
/// `job` is `None` for the one job of a run whose repository gives a single `command` (every run
/// today), and then every name keeps the shape it had before runs had jobs: the `ci-jobs` key is
/// `<repo>.<sha>.<run>`, an attempt is `<repo>.<sha>.<run>.<attempt>`. A named job of a pipeline
/// adds its token after the run: `<repo>.<sha>.<run>.<job>` and `<repo>.<sha>.<run>.<job>.<attempt>`
/// (a job token is never all digits, so the two shapes cannot be confused).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobRef {
    pub repo: String,
    pub sha: String,
    pub run: u32,
    /// The job's token within its run; `None` for a run's only job.
    pub job: Option<String>,
}

impl JobRef {
    /// Job `job` (`None`: the only one) of run `run` of `sha` in `repo`.
    pub fn new(repo: &str, sha: &str, run: u32, job: Option<&str>) -> JobRef {
        JobRef {
            repo: repo.to_string(),
            sha: sha.to_string(),
            run,
            job: job.map(str::to_string),
        }
    }

    /// The only job of run `run` of `sha` in `repo`.
    pub fn only(repo: &str, sha: &str, run: u32) -> JobRef {
        JobRef::new(repo, sha, run, None)
    }

    /// `<repo>.<sha>.<run>`: the run this job belongs to.
    pub fn run_key(&self) -> String {
        run_key(&self.repo, &self.sha, self.run)
    }

    /// The job's `ci-jobs` key: `<repo>.<sha>.<run>[.<job>]`.
    pub fn key(&self) -> String {
        match &self.job {
            None => self.run_key(),
            Some(job) => format!("{}.{job}", self.run_key()),
        }
    }

    /// One attempt of the job: `<key>.<attempt>` (DESIGN.md: "A job is named by ..."). The
    /// attempt's job message id, log subject suffix and the `job_id` field of its result.
    pub fn attempt_id(&self, attempt: u32) -> String {
        format!("{}.{attempt}", self.key())
    }
}

impl fmt::Display for JobRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key())
    }
}

/// Every name of one jetci installation, derived from its prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    prefix: String,
    upper: String,
}

impl Default for Names {
    fn default() -> Self {
        Names::new("ci").expect("the default prefix is a valid token")
    }
}

impl fmt::Display for Names {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.prefix)
    }
}

impl Names {
    /// Names under `prefix` (a token: letters, digits, `-`, `_`).
    pub fn new(prefix: &str) -> Result<Names, NameError> {
        check_token("prefix", prefix)?;
        Ok(Names {
            prefix: prefix.to_string(),
            upper: prefix.to_ascii_uppercase().replace('-', "_"),
        })
    }

    /// The prefix itself, such as `ci`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `CI_COMMITS`: work queue of commits to test.
    pub fn commits_stream(&self) -> String {
        format!("{}_COMMITS", self.upper)
    }
    /// `CI_JOBS`: work queue of jobs assigned to runners.
    pub fn jobs_stream(&self) -> String {
        format!("{}_JOBS", self.upper)
    }
    /// `CI_RESULTS`: final results (limits retention).
    pub fn results_stream(&self) -> String {
        format!("{}_RESULTS", self.upper)
    }
    /// `CI_LOGS`: job output in ordered chunks (limits retention).
    pub fn logs_stream(&self) -> String {
        format!("{}_LOGS", self.upper)
    }

    /// `ci.commits.<repo>`.
    pub fn commits_subject(&self, repo: &str) -> String {
        format!("{}.commits.{repo}", self.prefix)
    }
    /// `ci.commits.>`.
    pub fn commits_filter(&self) -> String {
        format!("{}.commits.>", self.prefix)
    }
    /// `ci.jobs.<runner-id>`.
    pub fn jobs_subject(&self, runner: &str) -> String {
        format!("{}.jobs.{runner}", self.prefix)
    }
    /// `ci.jobs.>`.
    pub fn jobs_filter(&self) -> String {
        format!("{}.jobs.>", self.prefix)
    }
    /// `ci.results.<repo>.<sha>.<run>`: exactly one final result per run.
    pub fn results_subject(&self, repo: &str, sha: &str, run: u32) -> String {
        format!("{}.results.{}", self.prefix, run_key(repo, sha, run))
    }
    /// `ci.results.<repo>.<sha>.<run>[.<job>]`: the result of one job; for a run's only job
    /// ([`JobRef::only`]) the run's result. A pipeline's job results are one token longer than
    /// run results, so [`Names::run_results_filter`] takes run results alone.
    pub fn job_results_subject(&self, job: &JobRef) -> String {
        format!("{}.results.{}", self.prefix, job.key())
    }
    /// `ci.results.*.*.*`: run results only (not a pipeline's job results).
    pub fn run_results_filter(&self) -> String {
        format!("{}.results.*.*.*", self.prefix)
    }
    /// `ci.results.>`: run results and a pipeline's job results.
    pub fn results_filter(&self) -> String {
        format!("{}.results.>", self.prefix)
    }
    /// `ci.superseded.<repo>.<sha>.<run>.<attempt>`: a fenced result of an attempt that lost its
    /// lease, kept for the record in `CI_RESULTS` but never the verdict (DESIGN.md, "Deadlines").
    pub fn superseded_subject(&self, job: &JobRef, attempt: u32) -> String {
        format!("{}.superseded.{}", self.prefix, job.attempt_id(attempt))
    }
    /// `ci.superseded.>`.
    pub fn superseded_filter(&self) -> String {
        format!("{}.superseded.>", self.prefix)
    }
    /// `ci.logs.<repo>.<sha>.<run>.<attempt>`: one attempt's output (see [`JobRef::attempt_id`]).
    pub fn logs_subject(&self, job: &JobRef, attempt: u32) -> String {
        format!("{}.logs.{}", self.prefix, job.attempt_id(attempt))
    }
    /// `ci.logs.>`.
    pub fn logs_filter(&self) -> String {
        format!("{}.logs.>", self.prefix)
    }
    /// `ci.control.<runner-id>`: core-NATS requests to one runner (liveness probe).
    pub fn control_subject(&self, runner: &str) -> String {
        format!("{}.control.{runner}", self.prefix)
    }

    /// `ci.notify.<repo>`: core-NATS requests (never stored) that tell the observer of `repo` to
    /// poll now, sent by `jetci notify` from a git `post-receive` hook. Losing one costs only
    /// latency: the observer's poll still finds the commit, and its marks keep a notify from
    /// publishing anything twice.
    pub fn notify_subject(&self, repo: &str) -> String {
        format!("{}.notify.{repo}", self.prefix)
    }

    /// KV bucket `ci-observer`: last head seen per `<repo>.<branch-hash>`.
    pub fn observer_bucket(&self) -> String {
        format!("{}-observer", self.prefix)
    }
    /// KV bucket `ci-jobs`: job state per job key ([`JobRef::key`]).
    pub fn jobs_bucket(&self) -> String {
        format!("{}-jobs", self.prefix)
    }
    /// KV bucket `ci-runners`: runner presence per runner id.
    pub fn runners_bucket(&self) -> String {
        format!("{}-runners", self.prefix)
    }
    /// KV bucket `ci-timings`: recorded test file durations per `<repo>`, by job, for balancing
    /// shards ([`crate::pipeline::timings`]).
    pub fn timings_bucket(&self) -> String {
        format!("{}-timings", self.prefix)
    }
    /// KV bucket `ci-shards`: the split of a job's tests per `<repo>.<sha>.<job>`, written once
    /// by the first of its shards to start ([`crate::pipeline::timings`]).
    pub fn shards_bucket(&self) -> String {
        format!("{}-shards", self.prefix)
    }

    /// The durable consumer all dispatchers share on `CI_COMMITS`.
    pub fn dispatcher_consumer(&self) -> String {
        "dispatcher".to_string()
    }
    /// The durable consumer of one runner on `CI_JOBS`, filtered on its own subject.
    pub fn runner_consumer(&self, runner: &str) -> String {
        format!("runner-{runner}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_follow_design() {
        let n = Names::default();
        assert_eq!(n.commits_stream(), "CI_COMMITS");
        assert_eq!(n.commits_subject("app"), "ci.commits.app");
        assert_eq!(n.jobs_subject("r1"), "ci.jobs.r1");
        let sha = "a".repeat(40);
        assert_eq!(
            n.results_subject("app", &sha, 2),
            format!("ci.results.app.{sha}.2")
        );
        assert_eq!(
            n.logs_subject(&JobRef::only("app", &sha, 2), 3),
            format!("ci.logs.app.{sha}.2.3")
        );
        let named = JobRef {
            job: Some("lint".into()),
            ..JobRef::only("app", &sha, 2)
        };
        assert_eq!(named.key(), format!("app.{sha}.2.lint"));
        assert_eq!(
            n.superseded_subject(&named, 1),
            format!("ci.superseded.app.{sha}.2.lint.1")
        );
        assert_eq!(n.jobs_bucket(), "ci-jobs");
    }

    #[test]
    fn notify_subject_is_per_repo_and_prefixed() {
        assert_eq!(Names::default().notify_subject("app"), "ci.notify.app");
        let n = Names::new("t1").unwrap();
        assert_eq!(
            n.notify_subject(&repo_slug("/srv/git/app.git")),
            "t1.notify.app"
        );
        // Not under `ci.commits.>` or any stream's subjects: a notify is never stored.
        assert!(!n.notify_subject("app").starts_with("t1.commits."));
    }

    #[test]
    fn prefix_is_validated_and_upper_cased_for_streams() {
        let n = Names::new("ci-test_2").unwrap();
        assert_eq!(n.results_stream(), "CI_TEST_2_RESULTS");
        assert!(Names::new("ci.x").is_err());
        assert!(Names::new("").is_err());
        assert!(Names::new("a>").is_err());
    }

    #[test]
    fn slugs_are_subject_safe() {
        assert_eq!(repo_slug("/srv/git/My.App.git"), "My-App");
        assert_eq!(repo_slug("https://example.com/org/x.y.git"), "x-y");
        assert_eq!(repo_slug("git@host:org/proj"), "proj");
        assert_eq!(repo_slug("/tmp/dir/"), "dir");
        assert_eq!(repo_slug("/"), "repo");
        assert_eq!(repo_slug("/x/ünïcode repo"), "n-code-repo");
        for s in ["a b", "a.b", "a*b", "a>b", "ü"] {
            assert!(is_token(&repo_slug(s)), "{s}");
        }
    }

    #[test]
    fn sha_check() {
        assert!(check_sha(&"0123456789abcdef".repeat(3)[..40]).is_ok());
        assert!(check_sha("abc").is_err());
        assert!(check_sha(&"G".repeat(40)).is_err());
    }
}
