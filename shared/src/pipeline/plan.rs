//! From the file's `[jobs.<name>]` tables to a run's jobs on one branch.
//!
//! Expansion, in the file's job order (by name):
//! - a job whose `branches` globs do not match the branch is not part of the run; a `needs` on
//!   such a job is dropped (the job needing it runs without it);
//! - a `matrix` gives one job per combination of its values (the cross product, keys in sorted
//!   order), and `parallel = N` splits each of those into N shards;
//! - a job's name is the table's name, with its matrix values and shard in parentheses:
//!   `test (python=3.11, 2/4)` (shards count from 1 in names, from 0 in `JETCI_SHARD`);
//! - `needs = ["lint"]` needs every job expanded from `lint`.
//!
//! Limits and errors (a cycle, an unknown need, more than [`MAX_JOBS`] jobs) are checked when
//! the file is parsed ([`RepoConfig::parse`]), whatever the branch; the plan's size (what the
//! commit message carries) when it is made, so that the message stays far below NATS'
//! `max_payload` however the jobs' needs multiply.

use std::time::Duration;

use crate::git::text_hash;
use crate::repo_config::{ConfigError, JobSpec, RepoConfig, FILE_NAME, MAX_JOBS};

/// One job of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedJob {
    /// What users see: `test (python=3.11, 2/4)`.
    pub name: String,
    /// Its token in keys and subjects ([`crate::subjects::JobRef::job`]): the table's name for
    /// a job that is not expanded, else the table's name and 10 hex digits of a hash of `name`.
    pub token: String,
    /// The `[jobs.<name>]` table it comes from.
    pub base: String,
    /// Tokens of the jobs that must pass before it starts.
    pub needs: Vec<String>,
    pub labels: Vec<String>,
    pub allow_failure: bool,
    /// Its matrix values, by key.
    pub matrix: Vec<(String, String)>,
    /// `(index, count)`, index from 0, when the job is one of `count` shards.
    pub shard: Option<(u32, u32)>,
    pub command: String,
    pub timeout: Option<Duration>,
    pub env: Vec<(String, String)>,
    pub junit: Vec<String>,
    /// Globs of the test files its shards share.
    pub shard_tests: Vec<String>,
}

/// The most bytes a plan's names, tokens, needs and labels may take (what a commit message
/// carries of it): a quarter of NATS' default `max_payload` of 1 MiB.
pub const MAX_PLAN_BYTES: usize = 256 * 1024;

/// The jobs of a run of `branch` under `config` (empty for a file without `[jobs]`).
///
/// Errors: the expanded plan takes more than [`MAX_PLAN_BYTES`] (many jobs that each need many
/// matrix or shard jobs).
pub fn plan(config: &RepoConfig, branch: &str) -> Result<Vec<PlannedJob>, ConfigError> {
    let jobs = expand_all(config, branch);
    let bytes: usize = jobs
        .iter()
        .map(|j| {
            j.name.len()
                + j.token.len()
                + j.needs.iter().map(|n| n.len() + 3).sum::<usize>()
                + j.labels.iter().map(|l| l.len() + 3).sum::<usize>()
                + 64
        })
        .sum();
    let mut tokens: Vec<&str> = jobs.iter().map(|j| j.token.as_str()).collect();
    tokens.sort_unstable();
    if let Some(w) = tokens.windows(2).find(|w| w[0] == w[1]) {
        return Err(ConfigError(format!(
            "two jobs would share the key {:?}: rename one",
            w[0]
        )));
    }
    if bytes > MAX_PLAN_BYTES {
        return Err(ConfigError(format!(
            "the pipeline's jobs and their needs take {bytes} bytes once expanded, more than \
             {MAX_PLAN_BYTES}: fewer jobs, or fewer needs on matrix and shard jobs"
        )));
    }
    Ok(jobs)
}

fn expand_all(config: &RepoConfig, branch: &str) -> Vec<PlannedJob> {
    let on_branch: Vec<&JobSpec> = config.jobs.iter().filter(|j| runs_on(j, branch)).collect();
    let expanded: Vec<Vec<PlannedJob>> = on_branch.iter().map(|j| expand(j)).collect();
    let mut jobs = Vec::with_capacity(expanded.iter().map(Vec::len).sum::<usize>().min(MAX_JOBS));
    for (spec, instances) in on_branch.iter().zip(&expanded) {
        let needs: Vec<String> = spec
            .needs
            .iter()
            .filter_map(|n| on_branch.iter().position(|j| &j.name == n))
            .flat_map(|i| expanded[i].iter().map(|j| j.token.clone()))
            .collect();
        for job in instances {
            jobs.push(PlannedJob {
                needs: needs.clone(),
                ..job.clone()
            });
        }
    }
    jobs
}

fn runs_on(job: &JobSpec, branch: &str) -> bool {
    job.branches.is_empty()
        || job.branches.iter().any(|g| {
            glob::Pattern::new(g)
                .map(|p| p.matches(branch))
                .unwrap_or(false)
        })
}

/// A job's matrix combinations times its shards, without `needs`.
fn expand(spec: &JobSpec) -> Vec<PlannedJob> {
    let mut combinations: Vec<Vec<(String, String)>> = vec![vec![]];
    for (key, values) in &spec.matrix {
        combinations = combinations
            .into_iter()
            .flat_map(|c| {
                values.iter().map(move |v| {
                    let mut c = c.clone();
                    c.push((key.clone(), v.clone()));
                    c
                })
            })
            .collect();
    }
    let mut jobs = vec![];
    for matrix in combinations {
        for index in 0..spec.parallel {
            let shard = (spec.parallel > 1).then_some((index, spec.parallel));
            let mut parts: Vec<String> = matrix.iter().map(|(k, v)| format!("{k}={v}")).collect();
            if let Some((i, n)) = shard {
                parts.push(format!("{}/{n}", i + 1));
            }
            let (name, token) = if parts.is_empty() {
                (spec.name.clone(), spec.name.clone())
            } else {
                let name = format!("{} ({})", spec.name, parts.join(", "));
                let token = format!("{}-{}", spec.name, &text_hash(&name)[..10]);
                (name, token)
            };
            let mut env: Vec<(String, String)> = spec
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            env.push(("JETCI_JOB".into(), name.clone()));
            env.extend(matrix.iter().map(|(k, v)| {
                (
                    format!("JETCI_MATRIX_{}", k.to_ascii_uppercase()),
                    v.clone(),
                )
            }));
            if let Some((i, n)) = shard {
                env.push(("JETCI_SHARD".into(), i.to_string()));
                env.push(("JETCI_SHARDS".into(), n.to_string()));
            }
            jobs.push(PlannedJob {
                name,
                token,
                base: spec.name.clone(),
                needs: vec![],
                labels: spec.labels.clone(),
                allow_failure: spec.allow_failure,
                matrix: matrix.clone(),
                shard,
                command: spec.command.clone(),
                timeout: spec.timeout,
                env,
                junit: spec.junit.clone(),
                shard_tests: spec.shard_tests.clone(),
            });
        }
    }
    jobs
}

/// What a runner runs for one job of a commit: its command (`None`: the runner's default),
/// timeout (`None`: the runner's default), environment from the file (with `JETCI_JOB`,
/// `JETCI_MATRIX_<KEY>`, `JETCI_SHARD` and `JETCI_SHARDS` for a pipeline's job) and JUnit globs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resolved {
    /// The job's name, for a pipeline's job.
    pub name: Option<String>,
    pub command: Option<String>,
    pub timeout: Option<Duration>,
    pub env: Vec<(String, String)>,
    pub junit: Vec<String>,
    /// Its `[jobs.<name>]` table, for a pipeline's job.
    pub base: Option<String>,
    /// `(index, count)`, index from 0, for one of several shards.
    pub shard: Option<(u32, u32)>,
    /// Globs of the test files its shards share (empty: no `JETCI_SHARD_TESTS`).
    pub shard_tests: Vec<String>,
}

/// The job `token` (`None`: the run's only job) of a run of `branch` under `config`.
///
/// Errors: the file names jobs but the job message names none (it was planned from something
/// else: an observer older than pipelines, or a file it could not read), or the token is not a
/// job of this file on this branch.
pub fn resolve(
    config: &RepoConfig,
    branch: &str,
    token: Option<&str>,
) -> Result<Resolved, ConfigError> {
    match token {
        None if config.is_pipeline() => Err(plan(config, branch).err().unwrap_or_else(|| ConfigError(format!(
            "this commit's {FILE_NAME} names jobs, but the run was planned as one job (was the file unreadable to the observer?)"
        )))),
        None => Ok(Resolved {
            name: None,
            command: config.command.clone(),
            timeout: config.timeout,
            env: config
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            junit: config.junit.clone(),
            ..Resolved::default()
        }),
        Some(token) => {
            let job = plan(config, branch)?
                .into_iter()
                .find(|j| j.token == token)
                .ok_or_else(|| {
                    ConfigError(format!(
                        "this commit's {FILE_NAME} has no job {token:?} on branch {branch:?}"
                    ))
                })?;
            Ok(Resolved {
                name: Some(job.name),
                command: Some(job.command),
                timeout: job.timeout,
                env: job.env,
                junit: job.junit,
                base: Some(job.base),
                shard: job.shard,
                shard_tests: job.shard_tests,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[jobs.lint]
command = "lint"

[jobs.test]
command = "test"
needs = ["lint"]
matrix = { python = ["3.11", "3.12"], os = ["a"] }
parallel = 2

[jobs.build]
command = "build"

[jobs.docs]
command = "docs"
needs = ["test"]
branches = ["main", "release/*"]
"#;

    #[test]
    fn matrix_and_shards_expand_and_needs_follow() {
        let config = RepoConfig::parse(FILE).unwrap();
        let jobs = plan(&config, "main").unwrap();
        let names: Vec<&str> = jobs.iter().map(|j| j.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "build",
                "docs",
                "lint",
                "test (os=a, python=3.11, 1/2)",
                "test (os=a, python=3.11, 2/2)",
                "test (os=a, python=3.12, 1/2)",
                "test (os=a, python=3.12, 2/2)",
            ]
        );
        let tests: Vec<&PlannedJob> = jobs.iter().filter(|j| j.base == "test").collect();
        assert!(tests.iter().all(|j| j.needs == ["lint"]));
        let docs = jobs.iter().find(|j| j.base == "docs").unwrap();
        let test_tokens: Vec<String> = tests.iter().map(|j| j.token.clone()).collect();
        assert_eq!(docs.needs, test_tokens);
        // Tokens are subject tokens, distinct, and the plain name for a plain job.
        let mut tokens: Vec<&str> = jobs.iter().map(|j| j.token.as_str()).collect();
        assert!(tokens.iter().all(|t| crate::subjects::is_token(t)));
        assert_eq!(tokens[0], "build");
        tokens.dedup();
        assert_eq!(tokens.len(), 7);
        let shard = tests[3];
        assert_eq!(shard.shard, Some((1, 2)));
        let env: std::collections::HashMap<_, _> = shard.env.iter().cloned().collect();
        assert_eq!(env["JETCI_JOB"], "test (os=a, python=3.12, 2/2)");
        assert_eq!(env["JETCI_MATRIX_PYTHON"], "3.12");
        assert_eq!(env["JETCI_MATRIX_OS"], "a");
        assert_eq!(
            (env["JETCI_SHARD"].as_str(), env["JETCI_SHARDS"].as_str()),
            ("1", "2")
        );
    }

    #[test]
    fn branch_filters_drop_jobs_and_their_needs() {
        let config = RepoConfig::parse(
            "[jobs.a]\ncommand = \"x\"\nbranches = [\"release/*\"]\n[jobs.b]\ncommand = \"y\"\nneeds = [\"a\"]\n",
        )
        .unwrap();
        let feature = plan(&config, "feature/x").unwrap();
        assert_eq!(feature.len(), 1);
        assert!(feature[0].needs.is_empty());
        let release = plan(&config, "release/1.0").unwrap();
        assert_eq!(release.len(), 2);
        assert_eq!(release[1].needs, ["a"]);
    }

    #[test]
    fn resolve_finds_the_job_the_message_names() {
        let config = RepoConfig::parse(FILE).unwrap();
        let token = plan(&config, "main").unwrap()[4].token.clone();
        let r = resolve(&config, "main", Some(&token)).unwrap();
        assert_eq!(r.name.as_deref(), Some("test (os=a, python=3.11, 2/2)"));
        assert_eq!(r.command.as_deref(), Some("test"));
        assert!(resolve(&config, "main", Some("nope")).is_err());
        assert!(resolve(&config, "feature", Some("docs")).is_err());
        assert!(resolve(&config, "main", None).is_err());
        let single = RepoConfig::parse("command = \"make\"\n[env]\nA = \"1\"\n").unwrap();
        let r = resolve(&single, "main", None).unwrap();
        assert_eq!(r.command.as_deref(), Some("make"));
        assert_eq!(r.env, [("A".to_string(), "1".to_string())]);
        assert_eq!(r.name, None);
    }

    #[test]
    fn a_plan_too_large_for_a_message_is_refused_by_both_sides() {
        // 128 shards, and 128 jobs that each need all of them: 16,384 needs.
        let mut file = String::from("[jobs.a]\ncommand = \"x\"\nparallel = 128\n");
        for i in 0..128 {
            file.push_str(&format!("[jobs.b{i}]\ncommand = \"y\"\nneeds = [\"a\"]\n"));
        }
        let config = RepoConfig::parse(&file).unwrap();
        let e = plan(&config, "main").unwrap_err().to_string();
        assert!(e.contains("more than 262144"), "{e}");
        // The observer then publishes one job; the runner says why.
        let e = resolve(&config, "main", None).unwrap_err().to_string();
        assert!(e.contains("more than 262144"), "{e}");
    }
}
