//! Repository access with git2; jetci runs no `git` binary.
//!
//! The observer opens the watched repository ([`Watched`]): a local path directly, a URL through
//! a bare mirror it fetches on every poll. The runner keeps one bare [`Mirror`] per repository,
//! fetched only when a job's commit is missing, and checks each job's commit out of it into a
//! fresh directory (libgit2's checkout `target_directory`), so a job costs one checkout, not a
//! clone.

use std::path::{Path, PathBuf};

use git2::{build::CheckoutBuilder, FetchOptions, ObjectType, Oid, Repository, Sort};

use crate::subjects::repo_slug;

/// A git operation failed; the message says which and on what.
#[derive(Debug, thiserror::Error)]
#[error("{context}: {message}")]
pub struct GitError {
    pub context: String,
    pub message: String,
}

fn err(context: impl Into<String>) -> impl FnOnce(git2::Error) -> GitError {
    let context = context.into();
    move |e| GitError {
        context,
        message: e.message().to_string(),
    }
}

/// True when `spec` names a remote repository rather than a local path: `scheme://...` or the
/// scp-like `user@host:path`.
pub fn is_url(spec: &str) -> bool {
    if spec.contains("://") {
        return true;
    }
    match (spec.find('@'), spec.find(':')) {
        (Some(at), Some(colon)) => at < colon && !spec[..colon].contains('/'),
        _ => false,
    }
}

/// A short stable hash of any bytes (git's blob id), for keys and directory names derived from
/// free text such as branch names and URLs.
pub fn text_hash(text: &str) -> String {
    Oid::hash_object(ObjectType::Blob, text.as_bytes())
        .map(|o| o.to_string()[..16].to_string())
        .unwrap_or_else(|_| "0".repeat(16))
}

/// The bits of a commit that travel with it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CommitInfo {
    /// `Name <email>`.
    pub author: String,
    /// First line of the message.
    pub summary: String,
}

/// The repository an observer watches.
pub struct Watched {
    repo: Repository,
    /// What runners fetch from: the URL, or the canonical local path.
    pub url: String,
    remote: bool,
}

impl Watched {
    /// Opens a local repository (bare or not) or mirrors a URL under `mirror_root`.
    ///
    /// Errors: the path is not a git repository; the URL cannot be fetched.
    pub fn open(spec: &str, mirror_root: &Path) -> Result<Watched, GitError> {
        if is_url(spec) {
            let path = mirror_root.join(format!("{}-{}.git", repo_slug(spec), text_hash(spec)));
            let repo = open_or_init_bare(&path)?;
            let w = Watched {
                repo,
                url: spec.to_string(),
                remote: true,
            };
            w.refresh()?;
            Ok(w)
        } else {
            let path = std::fs::canonicalize(spec).map_err(|e| GitError {
                context: format!("cannot open repository {spec}"),
                message: e.to_string(),
            })?;
            let repo =
                Repository::open(&path).map_err(err(format!("cannot open repository {spec}")))?;
            Ok(Watched {
                repo,
                url: path.to_string_lossy().into_owned(),
                remote: false,
            })
        }
    }

    /// Brings a mirrored URL up to date (all branches, pruning deleted ones); a no-op for a
    /// local repository, which git2 reads fresh on every call.
    pub fn refresh(&self) -> Result<(), GitError> {
        if self.remote {
            fetch_all(&self.repo, &self.url, true)?;
        }
        Ok(())
    }

    /// Every branch (`refs/heads/*`) and its head commit. Branches whose name is not UTF-8 or
    /// whose head is not a commit are skipped.
    pub fn branches(&self) -> Result<Vec<(String, Oid)>, GitError> {
        let mut out = Vec::new();
        let refs = self
            .repo
            .references_glob("refs/heads/*")
            .map_err(err("cannot list branches"))?;
        for r in refs {
            let r = r.map_err(err("cannot read a branch"))?;
            let Some(name) = r.name().ok().and_then(|n| n.strip_prefix("refs/heads/")) else {
                continue;
            };
            let Ok(commit) = r.peel_to_commit() else {
                continue;
            };
            out.push((name.to_string(), commit.id()));
        }
        out.sort();
        Ok(out)
    }

    /// The branch the repository's `HEAD` names: the checked-out branch of a working repository,
    /// the default branch of a bare one. `None` when `HEAD` is detached or names no branch. For a
    /// mirrored URL this is the mirror's own `HEAD`, which fetching does not move. The observer
    /// handles this branch first, so a commit on several branches is attributed to it.
    pub fn head_branch(&self) -> Option<String> {
        let head = self.repo.find_reference("HEAD").ok()?;
        let target = head.symbolic_target().ok()??;
        target.strip_prefix("refs/heads/").map(str::to_string)
    }

    /// Commits reachable from `head` but from none of `seen`, oldest first (topological order,
    /// parents before children). Ids in `seen` that no longer exist are ignored.
    pub fn new_commits(&self, head: Oid, seen: &[Oid]) -> Result<Vec<Oid>, GitError> {
        let mut walk = self.repo.revwalk().map_err(err("cannot walk history"))?;
        walk.set_sorting(Sort::TOPOLOGICAL | Sort::REVERSE)
            .map_err(err("cannot walk history"))?;
        walk.push(head)
            .map_err(err(format!("cannot walk from {head}")))?;
        for s in seen {
            // A mark left by a force-push may have been garbage collected: nothing to hide then.
            let _ = walk.hide(*s);
        }
        walk.map(|r| r.map_err(err("cannot walk history")))
            .collect()
    }

    /// True when `ancestor` is `commit` or one of its ancestors.
    pub fn is_ancestor(&self, ancestor: Oid, commit: Oid) -> bool {
        ancestor == commit
            || self
                .repo
                .graph_descendant_of(commit, ancestor)
                .unwrap_or(false)
    }

    /// Author and summary of a commit.
    pub fn commit_info(&self, oid: Oid) -> Result<CommitInfo, GitError> {
        let c = self
            .repo
            .find_commit(oid)
            .map_err(err(format!("cannot read commit {oid}")))?;
        let a = c.author();
        Ok(CommitInfo {
            author: format!(
                "{} <{}>",
                String::from_utf8_lossy(a.name_bytes()),
                String::from_utf8_lossy(a.email_bytes())
            ),
            summary: String::from_utf8_lossy(c.summary_bytes().unwrap_or_default()).into_owned(),
        })
    }

    /// The content of `path` in the tree of commit `oid`, or `None` when there is no such file.
    pub fn file_at(&self, oid: Oid, path: &str) -> Result<Option<Vec<u8>>, GitError> {
        let tree = self
            .repo
            .find_commit(oid)
            .and_then(|c| c.tree())
            .map_err(err(format!("cannot read the tree of {oid}")))?;
        let Ok(entry) = tree.get_path(Path::new(path)) else {
            return Ok(None);
        };
        match entry
            .to_object(&self.repo)
            .ok()
            .and_then(|o| o.into_blob().ok())
        {
            Some(blob) => Ok(Some(blob.content().to_vec())),
            None => Ok(None),
        }
    }
}

fn open_or_init_bare(path: &Path) -> Result<Repository, GitError> {
    match Repository::open_bare(path) {
        Ok(r) => Ok(r),
        Err(_) => {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| GitError {
                    context: format!("cannot create {}", parent.display()),
                    message: e.to_string(),
                })?;
            }
            Repository::init_bare(path)
                .map_err(err(format!("cannot create mirror {}", path.display())))
        }
    }
}

/// Fetches every branch and tag of `url` into `repo`'s own `refs/heads` and `refs/tags`.
fn fetch_all(repo: &Repository, url: &str, prune: bool) -> Result<(), GitError> {
    let mut remote = repo
        .remote_anonymous(url)
        .map_err(err(format!("cannot fetch {url}")))?;
    let mut opts = FetchOptions::new();
    if prune {
        opts.prune(git2::FetchPrune::On);
    }
    opts.download_tags(git2::AutotagOption::All);
    remote
        .fetch(
            &["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"],
            Some(&mut opts),
            None,
        )
        .map_err(err(format!("cannot fetch {url}")))
}

/// A runner's bare copy of one repository, fetched only when a job needs a commit it lacks.
pub struct Mirror {
    repo: Repository,
    url: String,
}

impl Mirror {
    /// Opens (or creates) the mirror of `url` under `root`.
    pub fn open(url: &str, root: &Path) -> Result<Mirror, GitError> {
        let path = Mirror::path_for(url, root);
        Ok(Mirror {
            repo: open_or_init_bare(&path)?,
            url: url.to_string(),
        })
    }

    /// Where the mirror of `url` lives under `root`: `<slug>-<hash>.git`.
    pub fn path_for(url: &str, root: &Path) -> PathBuf {
        root.join(format!("{}-{}.git", repo_slug(url), text_hash(url)))
    }

    /// Makes sure `sha` is in the mirror, fetching when it is not (an incremental fetch: git
    /// sends only what the mirror lacks).
    ///
    /// Errors: the fetch fails, or the commit is not in the repository after it.
    pub fn ensure_commit(&self, sha: &str) -> Result<Oid, GitError> {
        let oid = Oid::from_str(sha).map_err(err(format!("{sha} is not a commit id")))?;
        if self.repo.find_commit(oid).is_ok() {
            return Ok(oid);
        }
        fetch_all(&self.repo, &self.url, false)?;
        self.repo
            .find_commit(oid)
            .map(|c| c.id())
            .map_err(|_| GitError {
                context: format!("commit {sha}"),
                message: format!(
                    "not found in {} (was the branch force-pushed away?)",
                    self.url
                ),
            })
    }

    /// Writes the tree of commit `oid` into the empty directory `dest` (no `.git` inside).
    pub fn checkout(&self, oid: Oid, dest: &Path) -> Result<(), GitError> {
        let commit = self
            .repo
            .find_commit(oid)
            .map_err(err(format!("cannot read commit {oid}")))?;
        let tree = commit
            .tree()
            .map_err(err(format!("cannot read the tree of {oid}")))?;
        let mut cb = CheckoutBuilder::new();
        cb.target_dir(dest)
            .force()
            .recreate_missing(true)
            .update_index(false);
        self.repo
            .checkout_tree(tree.as_object(), Some(&mut cb))
            .map_err(err(format!(
                "cannot check out {oid} into {}",
                dest.display()
            )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit_file(
        repo: &Repository,
        branch: &str,
        name: &str,
        content: &str,
        parents: &[Oid],
    ) -> Oid {
        let blob = repo.blob(content.as_bytes()).unwrap();
        let mut tb = repo.treebuilder(None).unwrap();
        tb.insert(name, blob, 0o100644).unwrap();
        let tree = repo.find_tree(tb.write().unwrap()).unwrap();
        let sig = git2::Signature::now("T", "t@x").unwrap();
        let parents: Vec<_> = parents
            .iter()
            .map(|p| repo.find_commit(*p).unwrap())
            .collect();
        let refs: Vec<_> = parents.iter().collect();
        repo.commit(
            Some(&format!("refs/heads/{branch}")),
            &sig,
            &sig,
            name,
            &tree,
            &refs,
        )
        .unwrap()
    }

    #[test]
    fn urls_and_paths() {
        assert!(is_url("https://x/y.git"));
        assert!(is_url("git@github.com:a/b"));
        assert!(is_url("file:///srv/x"));
        assert!(!is_url("/srv/x"));
        assert!(!is_url("./a:b"));
        assert_ne!(text_hash("main"), text_hash("main2"));
        assert_eq!(text_hash("x").len(), 16);
    }

    #[test]
    fn new_commits_oldest_first_and_checkout() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init_bare(dir.path().join("r.git")).unwrap();
        let a = commit_file(&repo, "main", "a.txt", "1", &[]);
        let b = commit_file(&repo, "main", "b.txt", "2", &[a]);
        let c = commit_file(&repo, "main", "c.txt", "3", &[b]);
        let f = commit_file(&repo, "feature/x.y", "f.txt", "4", &[b]);
        let w = Watched::open(dir.path().join("r.git").to_str().unwrap(), dir.path()).unwrap();
        let branches = w.branches().unwrap();
        assert_eq!(
            branches,
            vec![("feature/x.y".to_string(), f), ("main".to_string(), c)]
        );
        assert_eq!(w.new_commits(c, &[a]).unwrap(), vec![b, c]);
        assert_eq!(w.new_commits(f, &[c]).unwrap(), vec![f]);
        assert_eq!(w.file_at(b, "b.txt").unwrap().as_deref(), Some(&b"2"[..]));
        assert_eq!(w.file_at(c, "nope").unwrap(), None);
        assert!(w.is_ancestor(a, c));
        assert!(!w.is_ancestor(f, c));
        repo.set_head("refs/heads/feature/x.y").unwrap();
        assert_eq!(w.head_branch().as_deref(), Some("feature/x.y"));
        repo.set_head_detached(c).unwrap();
        assert_eq!(w.head_branch(), None);

        let mirrors = dir.path().join("mirrors");
        let m = Mirror::open(&w.url, &mirrors).unwrap();
        let oid = m.ensure_commit(&f.to_string()).unwrap();
        let dest = dir.path().join("job");
        std::fs::create_dir(&dest).unwrap();
        m.checkout(oid, &dest).unwrap();
        assert_eq!(std::fs::read_to_string(dest.join("f.txt")).unwrap(), "4");
        assert!(m.ensure_commit(&"1".repeat(40)).is_err());
    }
}
