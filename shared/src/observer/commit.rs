//! One commit's message: what git says about it (published to `CI_COMMITS` by
//! [`crate::protocol::commit::publish_commit`]).
//!
//! The message carries the runner labels the commit's own `.jetci.toml` asks for, so a dispatcher
//! places the job without touching git (DESIGN.md, "The watched repository's own settings").

use crate::git::Watched;
use crate::limits::clip;
use crate::messages::{now, CommitMsg, JobPlan, Wire, VERSION};
use crate::pipeline::plan;
use crate::repo_config::{RepoConfig, FILE_NAME, MAX_FILE_BYTES};
use git2::Oid;

/// Longest author and summary carried, in characters (a longer one is clipped and says so): a
/// commit is input, and a megabyte-long first line must not make the message too large to
/// publish (invariant I5).
const MAX_AUTHOR: usize = 256;
const MAX_SUMMARY: usize = 1000;

/// The first characters of a commit id, for logs.
pub fn short(sha: &str) -> &str {
    &sha[..sha.len().min(10)]
}

/// The message for run 1 of `commit` on `branch`.
pub fn message(watched: &Watched, repo: &str, branch: &str, commit: Oid) -> CommitMsg {
    let sha = commit.to_string();
    let info = watched.commit_info(commit).unwrap_or_else(|e| {
        tracing::warn!(repo, branch, sha = short(&sha), "no author or summary: {e}");
        Default::default()
    });
    let config = settings(watched, repo, branch, commit);
    let jobs = match plan(&config, branch) {
        Ok(jobs) => jobs.iter().map(JobPlan::from).collect(),
        Err(e) => {
            tracing::warn!(
                repo,
                branch,
                sha = short(&sha),
                "{e}; publishing as one job (the runner will report it)"
            );
            vec![]
        }
    };
    let mut msg = CommitMsg {
        v: VERSION,
        repo: repo.to_string(),
        url: watched.url.clone(),
        branch: branch.to_string(),
        labels: config.labels.clone(),
        author: clip(&info.author, MAX_AUTHOR),
        summary: clip(&info.summary, MAX_SUMMARY),
        jobs,
        fail_fast: config.fail_fast,
        sha,
        run: 1,
        published_at: now(),
    };
    if let Err(e) = msg.validate() {
        // The dispatchers would refuse it and the commit would get no result: published as one
        // job, its runner reports the file's problem instead.
        tracing::warn!(
            repo,
            branch,
            sha = short(&msg.sha),
            "{e}; publishing as one job (the runner will report it)"
        );
        msg.jobs.clear();
        msg.fail_fast = false;
    }
    msg
}

/// The commit's `.jetci.toml` as far as a dispatcher needs it: the runner labels it asks for and
/// the pipeline's jobs. An invalid file gives the defaults (one job, no labels): the runner
/// parses it again and reports the problem as the run's `error` result, with the line, before
/// any command runs.
fn settings(watched: &Watched, repo: &str, branch: &str, commit: Oid) -> RepoConfig {
    config_at(watched, commit).unwrap_or_else(|e| {
        tracing::warn!(
            repo,
            branch,
            sha = short(&commit.to_string()),
            "{e}; publishing as one job without labels (the runner will report it)"
        );
        RepoConfig::default()
    })
}

/// The `.jetci.toml` at `commit`, parsed; the defaults when it has none.
///
/// Errors (as one line): the file cannot be read, is larger than [`MAX_FILE_BYTES`] (its size
/// is read from the object's header, so it is never inflated), is not UTF-8, or does not parse.
pub fn config_at(watched: &Watched, commit: Oid) -> Result<RepoConfig, String> {
    let text = match watched.file_at(commit, FILE_NAME, MAX_FILE_BYTES) {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return Ok(RepoConfig::default()),
        Err(e) => return Err(format!("cannot read {FILE_NAME}: {e}")),
    };
    let text = std::str::from_utf8(&text).map_err(|_| format!("{FILE_NAME} is not UTF-8"))?;
    RepoConfig::parse(text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use git2::{Repository, Signature};

    fn commit_with(repo: &Repository, files: &[(&str, &str)], summary: &str) -> Oid {
        let mut tb = repo.treebuilder(None).unwrap();
        for (name, content) in files {
            let blob = repo.blob(content.as_bytes()).unwrap();
            tb.insert(name, blob, 0o100644).unwrap();
        }
        let tree = repo.find_tree(tb.write().unwrap()).unwrap();
        let sig = Signature::now("Ann Ärger", "ann@x").unwrap();
        repo.commit(None, &sig, &sig, summary, &tree, &[]).unwrap()
    }

    #[test]
    fn messages_carry_labels_author_and_summary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.git");
        let repo = Repository::init_bare(&path).unwrap();
        let w = Watched::open(path.to_str().unwrap(), dir.path()).unwrap();

        let good = commit_with(
            &repo,
            &[(FILE_NAME, "labels = [\"linux\", \"gpu\"]\n")],
            "add config\n\nbody",
        );
        let msg = message(&w, "app", "feature/ä.b", good);
        assert_eq!(msg.labels, vec!["linux", "gpu"]);
        assert_eq!(msg.author, "Ann Ärger <ann@x>");
        assert_eq!(msg.summary, "add config");
        assert_eq!(msg.key(), format!("app.{good}.1"));
        assert_eq!(msg.url, w.url);
        // What goes on the wire passes the readers' strict checks.
        let back: CommitMsg = crate::messages::decode(&crate::messages::encode(&msg)).unwrap();
        assert_eq!(back, msg);

        let bad = commit_with(&repo, &[(FILE_NAME, "labels = [\"a b\"]\n")], "x");
        assert!(message(&w, "app", "main", bad).labels.is_empty());
        let garbage = commit_with(&repo, &[(FILE_NAME, "\u{0}\u{ff}")], "x");
        assert!(message(&w, "app", "main", garbage).labels.is_empty());
        // A file over the cap is not read (its size comes from the object header): no labels.
        let padding = "# padding\n".repeat(MAX_FILE_BYTES as usize / 10);
        let huge = format!("labels = [\"linux\"]\n{padding}");
        let huge = commit_with(&repo, &[(FILE_NAME, &huge)], "x");
        assert!(message(&w, "app", "main", huge).labels.is_empty());
        let none = commit_with(&repo, &[("a", "1")], &"long ".repeat(1000));
        let msg = message(&w, "app", "main", none);
        assert!(msg.labels.is_empty());
        assert!(
            msg.summary.starts_with(&"long ".repeat(200)),
            "{}",
            msg.summary
        );
        assert!(
            msg.summary.ends_with("… [4999 bytes in all]"),
            "{}",
            msg.summary
        );
    }
}
