//! The observer's memory: the last head handled per branch, in the `ci-observer` KV bucket.
//!
//! A mark moves only after the commit it points at was acknowledged by `CI_COMMITS` (DESIGN.md,
//! "One commit's life", step 1), so a crash between the two re-publishes that commit on restart
//! and the stream's duplicate window drops the copy (`Nats-Msg-Id`); nothing is lost (invariant
//! I4). Keys are `<repo>.<bytes_hash(branch)>`, a hash of the name's raw bytes: branch names hold
//! `/`, `.` and any character, and need not be UTF-8, so they travel in the value, never in the
//! key (a name that is not UTF-8 travels as hex in `branch_hex`, beside its text). One more key, `<repo>._seen`, records that a poll
//! of the repository completed, so an empty repository's first commits are not mistaken for a
//! repository jetci never saw (whose history it would skip).
//!
//! The marks are read once at start; after that this process is their only writer (one observer
//! per repository), so it keeps them in memory and writes each change through.

use std::collections::BTreeMap;

use crate::git::{bytes_hash, split_credentials, BranchName};
use crate::messages::{decode, encode, now, BranchMark, VERSION};
use crate::subjects::check_sha;
use async_nats::jetstream::kv;
use data_encoding::HEXLOWER;
use futures::TryStreamExt;
use git2::Oid;

use super::ObserveError;

/// The `ci-observer` key of one branch of `repo`, from the name's raw bytes.
pub fn mark_key(repo: &str, branch: &BranchName) -> String {
    format!("{repo}.{}", bytes_hash(branch.as_bytes()))
}

/// The `ci-observer` key saying a poll of `repo` completed at least once.
pub fn polled_key(repo: &str) -> String {
    format!("{repo}._seen")
}

/// The marks of one repository, mirrored in memory.
pub struct Marks {
    kv: kv::Store,
    repo: String,
    url: String,
    heads: BTreeMap<BranchName, Oid>,
    ever_polled: bool,
}

impl Marks {
    /// Reads every mark of `repo` from the bucket. A value that cannot be read is logged and
    /// ignored: its branch is then treated as new.
    ///
    /// Errors: the name `repo` already belongs to another repository than `url` (two
    /// repositories whose paths end alike): they would share marks, subjects and results.
    pub async fn load(kv: kv::Store, repo: &str, url: &str) -> Result<Marks, ObserveError> {
        let what = || format!("cannot read the marks of {repo} from the observer bucket");
        let prefix = format!("{repo}.");
        let keys: Vec<String> = kv
            .keys()
            .await
            .map_err(|e| ObserveError::new(what(), &e))?
            .try_collect()
            .await
            .map_err(|e| ObserveError::new(what(), &e))?;
        let mut marks = Marks {
            kv,
            repo: repo.to_string(),
            url: url.to_string(),
            heads: BTreeMap::new(),
            ever_polled: false,
        };
        for key in keys.into_iter().filter(|k| k.starts_with(&prefix)) {
            if key == polled_key(repo) {
                marks.ever_polled = true;
                let owner = marks
                    .kv
                    .get(&key)
                    .await
                    .map_err(|e| ObserveError::new(what(), &e))?
                    .and_then(|v| decode::<BranchMark>(&v).ok())
                    .and_then(|m| m.url);
                // An earlier jetci stored the URL with its credentials: compare without them,
                // and store it again without them.
                if let Some(owner) = owner.filter(|o| o != url) {
                    let owner = split_credentials(&owner).0;
                    if owner != url {
                        return Err(ObserveError(format!(
                            "the name {repo:?} is already used for the repository at {owner}; give this one another --name"
                        )));
                    }
                    marks.ever_polled = false;
                    marks.record_polled().await?;
                }
                continue;
            }
            let Some(value) = marks
                .kv
                .get(&key)
                .await
                .map_err(|e| ObserveError::new(what(), &e))?
            else {
                continue; // deleted since the listing
            };
            match read_mark(repo, &key, &value) {
                Ok((branch, head)) => {
                    marks.heads.insert(branch, head);
                }
                Err(why) => tracing::warn!(key, "ignoring an unreadable branch mark: {why}"),
            }
        }
        Ok(marks)
    }

    /// The last head handled per branch.
    pub fn heads(&self) -> &BTreeMap<BranchName, Oid> {
        &self.heads
    }

    /// True once a poll of this repository has completed (now or in an earlier run).
    pub fn ever_polled(&self) -> bool {
        self.ever_polled
    }

    /// Moves `branch`'s mark to `head`.
    pub async fn set(&mut self, branch: &BranchName, head: Oid) -> Result<(), ObserveError> {
        let mark = mark(&self.repo, branch, &head.to_string());
        self.kv
            .put(mark_key(&self.repo, branch), encode(&mark))
            .await
            .map_err(|e| {
                ObserveError::new(format!("cannot save the mark of branch {branch:?}"), &e)
            })?;
        self.heads.insert(branch.clone(), head);
        Ok(())
    }

    /// Deletes the mark of a branch that no longer exists.
    pub async fn forget(&mut self, branch: &BranchName) -> Result<(), ObserveError> {
        self.kv
            .delete(mark_key(&self.repo, branch))
            .await
            .map_err(|e| {
                ObserveError::new(format!("cannot delete the mark of branch {branch:?}"), &e)
            })?;
        self.heads.remove(branch);
        Ok(())
    }

    /// Records that a poll completed; writes once, then does nothing.
    pub async fn record_polled(&mut self) -> Result<(), ObserveError> {
        if !self.ever_polled {
            let mut seen = mark(&self.repo, &"".into(), "");
            seen.url = Some(self.url.clone());
            self.kv
                .put(polled_key(&self.repo), encode(&seen))
                .await
                .map_err(|e| {
                    ObserveError::new("cannot record the first poll in the observer bucket", &e)
                })?;
            self.ever_polled = true;
        }
        Ok(())
    }
}

fn mark(repo: &str, branch: &BranchName, sha: &str) -> BranchMark {
    BranchMark {
        v: VERSION,
        repo: repo.to_string(),
        branch: branch.text(),
        branch_hex: (!branch.is_utf8()).then(|| HEXLOWER.encode(branch.as_bytes())),
        sha: sha.to_string(),
        updated_at: now(),
        url: None,
    }
}

/// Decodes one mark and checks it belongs under `key`: `(branch, head)`.
fn read_mark(repo: &str, key: &str, value: &[u8]) -> Result<(BranchName, Oid), String> {
    let mark: BranchMark = decode(value).map_err(|e| e.to_string())?;
    let branch = match &mark.branch_hex {
        Some(hex) => BranchName::from_bytes(
            &HEXLOWER
                .decode(hex.as_bytes())
                .map_err(|e| format!("its branch_hex is not hex: {e}"))?,
        ),
        None => BranchName::from(mark.branch.as_str()),
    };
    if mark.repo != repo || mark_key(repo, &branch) != key {
        return Err(format!(
            "it names branch {:?} of {}, which has another key",
            mark.branch, mark.repo
        ));
    }
    check_sha(&mark.sha).map_err(|e| e.to_string())?;
    let head = Oid::from_str(&mark.sha).map_err(|e| e.message().to_string())?;
    Ok((branch, head))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_hide_branch_names() {
        let k = mark_key("app", &"feature/ä.b".into());
        assert!(k.starts_with("app."));
        assert_eq!(k.matches('.').count(), 1, "{k}");
        assert_ne!(k, mark_key("app", &"feature/ä-b".into()));
        assert_ne!(k, polled_key("app"));
    }

    #[test]
    fn names_that_are_not_utf8_keep_their_bytes() {
        let (e9, e8) = (
            BranchName::from_bytes(b"lat\xe9n1"),
            BranchName::from_bytes(b"lat\xe8n1"),
        );
        assert_eq!(e9.text(), e8.text(), "the same text...");
        assert_ne!(mark_key("app", &e9), mark_key("app", &e8), "...two keys");
        let sha = "0123456789abcdef0123456789abcdef01234567";
        let value = encode(&mark("app", &e9, sha));
        let (branch, _) = read_mark("app", &mark_key("app", &e9), &value).unwrap();
        assert_eq!(branch, e9);
        assert!(read_mark("app", &mark_key("app", &e8), &value).is_err());
        let plain = encode(&mark("app", &"main".into(), sha));
        assert!(!String::from_utf8_lossy(&plain).contains("branch_hex"));
    }

    #[test]
    fn marks_round_trip_and_bad_ones_are_refused() {
        let sha = "0123456789abcdef0123456789abcdef01234567";
        let key = mark_key("app", &"feature/ä.b".into());
        let good = encode(&mark("app", &"feature/ä.b".into(), sha));
        let (branch, head) = read_mark("app", &key, &good).unwrap();
        assert_eq!(branch, "feature/ä.b".into());
        assert_eq!(head.to_string(), sha);

        assert!(read_mark("app", &mark_key("app", &"main".into()), &good).is_err());
        assert!(read_mark("other", &key, &good).is_err());
        let short = encode(&mark("app", &"feature/ä.b".into(), "0123"));
        assert!(read_mark("app", &key, &short).is_err());
        assert!(read_mark("app", &key, b"{not json").is_err());
    }
}
