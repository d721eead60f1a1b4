//! One poll of the watched repository: the git half on tokio's blocking pool, then publish and
//! mark, commit by commit.
//!
//! git2 is synchronous. The git half (fetch, branch list, each moved branch head's `history`,
//! history walk, reading each commit's `.jetci.toml`) runs on the blocking pool, so a slow fetch of a remote repository never stalls
//! the runtime, and a shutdown signal does not wait for it. Publishing is sequential: each
//! commit's ack is awaited before its branch mark moves (DESIGN.md, "One commit's life", step 1),
//! and the first NATS error ends the poll, leaving the remaining commits to the next one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::connect::Nats;
use crate::git::{BranchName, GitError, Watched};
use crate::messages::CommitMsg;
use crate::protocol::commit::publish_commit;
use crate::repo_config::HistoryMode;
use crate::shutdown::CancellationToken;
use git2::Oid;
use glob::Pattern;
use tracing::{debug, info, warn};

use super::commit::{self, short};
use super::marks::Marks;
use super::plan::{self, Step};
use super::ObserveError;
use crate::limits::MAX_BRANCH_BYTES;

/// One watched repository and where its commits go.
pub struct Observer {
    /// The repository's slug: the subject token and key prefix.
    pub repo: String,
    /// Behind a mutex only to move it onto the blocking pool; polls never overlap.
    pub watched: Arc<Mutex<Watched>>,
    /// Which branches to watch (`--branches`).
    pub branches: Pattern,
    pub nats: Nats,
    /// Branches refused for their name's length, by hash, so each is logged once.
    pub refused: Mutex<HashSet<String>>,
}

/// What the git half of a poll found.
struct Work {
    /// Each step, with its message when it publishes.
    steps: Vec<(Step, Option<CommitMsg>)>,
    /// Deleted branches whose marks go.
    gone: Vec<BranchName>,
    /// Branches git could not read.
    failed: Vec<(BranchName, GitError)>,
    /// Watched branches whose name is longer than [`MAX_BRANCH_BYTES`]: not watched.
    refused: Vec<String>,
}

/// What one poll did: the commits it published, and whether it finished.
pub struct Polled {
    /// Commits acknowledged by the stream in this poll (duplicates it dropped included).
    pub published: u32,
    /// `Err` when the poll stopped early; the next poll picks up where it stopped.
    pub outcome: Result<(), ObserveError>,
}

impl Observer {
    /// One poll: read git, then publish and mark step by step. Stops at the first NATS error,
    /// leaving the remaining steps to the next poll; stops between steps on shutdown.
    pub async fn poll(&self, marks: &mut Marks, shutdown: &CancellationToken) -> Polled {
        let mut published = 0;
        let outcome = self.poll_counting(marks, shutdown, &mut published).await;
        Polled { published, outcome }
    }

    async fn poll_counting(
        &self,
        marks: &mut Marks,
        shutdown: &CancellationToken,
        published: &mut u32,
    ) -> Result<(), ObserveError> {
        let work = tokio::select! {
            work = self.read_git(marks) => work?,
            _ = shutdown.cancelled() => return Ok(()),
        };
        self.warn_refused(&work.refused);
        for (step, msg) in &work.steps {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            if let Some(msg) = msg {
                self.publish(msg).await?;
                *published += 1;
            }
            marks.set(&step.branch, step.commit).await?;
        }
        for branch in &work.gone {
            marks.forget(branch).await?;
            info!(repo = self.repo, %branch, "branch deleted; its mark is gone");
        }
        marks.record_polled().await?;
        match work.failed.into_iter().next() {
            Some((branch, e)) => Err(ObserveError::new(
                format!("cannot read branch {branch:?}"),
                &e,
            )),
            None => Ok(()),
        }
    }

    /// The git half of a poll, on the blocking pool.
    async fn read_git(&self, marks: &Marks) -> Result<Work, ObserveError> {
        let watched = self.watched.clone();
        let repo = self.repo.clone();
        let branches = self.branches.clone();
        let heads = marks.heads().clone();
        let ever_polled = marks.ever_polled();
        tokio::task::spawn_blocking(move || {
            let watched = watched.lock().unwrap_or_else(PoisonError::into_inner);
            read_git(&watched, &repo, &branches, &heads, ever_polled)
        })
        .await
        .map_err(|e| ObserveError::new("the git task failed", &e))?
        .map_err(|e| ObserveError::new(format!("cannot poll {}", self.repo), &e))
    }

    /// Says once per branch that a name too long to send is not watched.
    fn warn_refused(&self, refused: &[String]) {
        let mut said = self.refused.lock().unwrap_or_else(PoisonError::into_inner);
        for name in refused {
            if said.insert(crate::git::text_hash(name)) {
                warn!(
                    repo = self.repo,
                    branch = crate::limits::clip(name, 100),
                    "not watching a branch whose name is longer than {MAX_BRANCH_BYTES} bytes: \
                     its commits could not be sent to runners; rename it to have it tested"
                );
            }
        }
    }

    /// Publishes one commit and waits for its ack (the caller moves the mark only after this).
    async fn publish(&self, msg: &CommitMsg) -> Result<(), ObserveError> {
        let ack = publish_commit(&self.nats, msg).await.map_err(|e| {
            let what = format!(
                "commit {} of branch {:?} is not published yet: waiting for NATS and the {} \
                 stream to acknowledge it (its branch mark stays put until then)",
                short(&msg.sha),
                msg.branch,
                self.nats.names.commits_stream()
            );
            ObserveError::new(what, &e)
        })?;
        let what = if ack.duplicate {
            "commit was already published (a duplicate the stream dropped)"
        } else {
            "published commit"
        };
        info!(
            repo = msg.repo,
            branch = msg.branch,
            sha = short(&msg.sha),
            seq = ack.sequence,
            "{what}"
        );
        Ok(())
    }
}

/// Fetches (for a URL), lists and filters branches, plans, and builds the messages.
fn read_git(
    watched: &Watched,
    repo: &str,
    branches: &Pattern,
    heads: &BTreeMap<BranchName, Oid>,
    ever_polled: bool,
) -> Result<Work, GitError> {
    watched.refresh()?;
    let all = watched.branches()?;
    let (chosen, refused): (Vec<_>, Vec<_>) = all
        .iter()
        .filter(|(name, _)| branches.matches(&name.text()))
        .cloned()
        .partition(|(name, _)| name.as_bytes().len() <= MAX_BRANCH_BYTES);
    let mut read: HashMap<Oid, HistoryMode> = HashMap::new();
    let mut history_at = |branch: &BranchName, head: Oid| {
        *read
            .entry(head)
            .or_insert_with(|| history_at(watched, repo, branch, head))
    };
    let plan = plan::plan(watched, &chosen, &all, heads, ever_polled, &mut history_at);
    let steps = plan
        .steps
        .into_iter()
        .map(|step| {
            let msg = step
                .publish
                .then(|| commit::message(watched, repo, &step.branch.text(), step.commit));
            (step, msg)
        })
        .collect();
    Ok(Work {
        steps,
        gone: plan.gone,
        failed: plan.failed,
        refused: refused.into_iter().map(|(name, _)| name.text()).collect(),
    })
}

/// Which history `branch` tests: the `history` of the `.jetci.toml` at its head `head`. A file
/// the observer cannot read or parse gives the default (`all`, which tests too much rather than
/// too little), with a warning; the runner reports the file's problem as the commit's result.
fn history_at(watched: &Watched, repo: &str, branch: &BranchName, head: Oid) -> HistoryMode {
    match commit::config_at(watched, head) {
        Ok(config) => config.history,
        Err(e) => {
            warn!(
                repo,
                %branch,
                sha = short(&head.to_string()),
                "{e}; testing all of the branch's new history (history = \"all\")"
            );
            HistoryMode::All
        }
    }
}

/// Keeps a failing poll from repeating the same warning every tick: a new error is a warning,
/// a repeat is debug, and the recovery is said once.
#[derive(Default)]
pub struct Trouble {
    last: Option<String>,
}

impl Trouble {
    /// Logs the outcome of one poll; `retry` is the poll interval.
    pub fn note(&mut self, outcome: Result<(), ObserveError>, retry: Duration) {
        match outcome {
            Ok(()) => {
                if self.last.take().is_some() {
                    info!("polling works again");
                }
            }
            Err(e) => {
                let message = e.to_string();
                let every = humantime::format_duration(retry);
                if self.last.as_ref() == Some(&message) {
                    debug!("{message}; still retrying every {every}");
                } else {
                    warn!("{message}; retrying every {every}");
                }
                self.last = Some(message);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo_config::{FILE_NAME, MAX_FILE_BYTES};
    use git2::{Repository, Signature};

    #[test]
    fn history_is_read_at_the_head_and_a_bad_file_gives_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.git");
        let repo = Repository::init_bare(&path).unwrap();
        let w = Watched::open(path.to_str().unwrap(), dir.path()).unwrap();
        let commit_with = |file: Option<&str>| {
            let mut tb = repo.treebuilder(None).unwrap();
            if let Some(text) = file {
                let blob = repo.blob(text.as_bytes()).unwrap();
                tb.insert(FILE_NAME, blob, 0o100644).unwrap();
            }
            let tree = repo.find_tree(tb.write().unwrap()).unwrap();
            let sig = Signature::now("T", "t@x").unwrap();
            repo.commit(None, &sig, &sig, "c", &tree, &[]).unwrap()
        };
        let history = |file| history_at(&w, "app", &"main".into(), commit_with(file));
        assert_eq!(
            history(Some("history = \"first-parent\"\n")),
            HistoryMode::FirstParent
        );
        assert_eq!(history(Some("history = \"all\"\n")), HistoryMode::All);
        assert_eq!(history(None), HistoryMode::All);
        // Unparsable, an unknown value, garbage, over the size cap: the default.
        assert_eq!(history(Some("history = first-parent\n")), HistoryMode::All);
        assert_eq!(history(Some("history = \"linear\"\n")), HistoryMode::All);
        assert_eq!(history(Some("\u{0}\u{ff}")), HistoryMode::All);
        let padding = "# padding\n".repeat(MAX_FILE_BYTES as usize / 10);
        let huge = format!("history = \"first-parent\"\n{padding}");
        assert_eq!(history(Some(&huge)), HistoryMode::All);
    }
}
