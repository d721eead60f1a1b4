//! Deciding what one poll publishes: the pure part of the observer.
//!
//! Input: the branches git shows now, the marks (last head handled per branch, from the
//! `ci-observer` bucket), and whether the repository was ever polled. Output: an ordered list of
//! [`Step`]s. Each step either publishes a commit and then moves its branch's mark to it, or only
//! moves the mark (a commit already published from elsewhere, a branch reset backwards).
//!
//! The rules (DESIGN.md, "One commit's life", step 1):
//! - Every commit new since the head last seen on a branch is published, oldest first, so a
//!   push of five commits gets five results, not one.
//! - "New" means reachable from the branch's head but from none of the marks of any branch (this
//!   one included) and none of the heads handled earlier in this poll: a commit already reachable
//!   from another branch jetci has seen is never published twice, and a force-push publishes just
//!   the rewritten commits.
//! - A repository never polled before publishes only each branch's current head, once per
//!   distinct head, instead of flooding the runners with its whole history. Once a poll has
//!   completed, even an empty repository counts as seen, so its first pushed commits are
//!   published like any others.
//! - A branch jetci has no mark for (new, or deleted and re-created) in a seen repository
//!   publishes everything not reachable from the other marks.
//! - A branch whose head's `.jetci.toml` says `history = "first-parent"` publishes only the new
//!   commits on its first-parent chain: from its head, first parent after first parent, down to
//!   the first commit that is not new (a mark reaches it, or an earlier branch of this poll
//!   claimed it). A merge commit is tested, the commits it brought in are not (unless another
//!   branch's own history has them). The same rules hold otherwise: a branch rewritten by a
//!   force-push or a rebase publishes the new commits of its chain, down to where the chain meets
//!   history a mark reaches; a new branch, the chain's commits no other mark reaches.
//!
//! Branches are handled in a fixed order: branches with a mark first, then new branches; in each
//! group the repository's `HEAD` branch first, then by name. So a commit that shows up on `main`
//! and on a new branch made from it is attributed to `main`, even when a working repository's
//! `HEAD` already points at the new branch.
//!
//! Marks move one commit at a time, and commits come parents first, so an observer that stops
//! half-way (NATS down, killed) resumes from the last acknowledged commit and publishes each
//! commit once (invariant I4).

use std::collections::{BTreeMap, HashSet};

use crate::git::{BranchName, GitError, History, Watched};
use crate::repo_config::HistoryMode;
use git2::Oid;

/// One thing a poll does to one branch, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// The branch, without `refs/heads/`.
    pub branch: BranchName,
    /// The commit to publish (when `publish`) and then the branch's new mark.
    pub commit: Oid,
    /// False when the mark only moves: nothing new to test.
    pub publish: bool,
}

/// What a poll found to do.
#[derive(Debug, Default)]
pub struct Plan {
    /// Publish-and-mark steps, in order.
    pub steps: Vec<Step>,
    /// Branches with a mark that no longer exist: their marks are deleted after the steps.
    pub gone: Vec<BranchName>,
    /// Branches git could not walk this time (logged, retried next poll).
    pub failed: Vec<(BranchName, GitError)>,
}

/// Plans one poll.
///
/// `branches` are the branches to watch (already filtered by `--branches`); `all_branches` every
/// branch that exists, so a mark is deleted only when its branch is really gone. `marks` are the
/// last heads handled per branch; `ever_polled` is false until one poll of this repository has
/// completed. `history_at` says which history a branch tests, given its name and its head (the
/// observer reads it from the head's `.jetci.toml`); it is asked only for branches whose new
/// commits are walked. Errors of one branch land in [`Plan::failed`] and do not stop the others.
pub fn plan(
    watched: &Watched,
    branches: &[(BranchName, Oid)],
    all_branches: &[(BranchName, Oid)],
    marks: &BTreeMap<BranchName, Oid>,
    ever_polled: bool,
    history_at: &mut dyn FnMut(&BranchName, Oid) -> HistoryMode,
) -> Plan {
    let mut plan = Plan::default();
    let head_branch = watched.head_branch();
    let mut ordered: Vec<&(BranchName, Oid)> = branches.iter().collect();
    ordered.sort_by_key(|(name, _)| {
        (
            !marks.contains_key(name),
            Some(name) != head_branch.as_ref(),
            name,
        )
    });

    // How each branch is read, before any history is walked: the walk is one for all branches.
    let reads: Vec<(&BranchName, Oid, Read)> = ordered
        .into_iter()
        .filter_map(|(name, head)| {
            let mark = marks.get(name).copied();
            if mark == Some(*head) {
                return None;
            }
            // A mark whose commit is gone (force-push, then garbage collection): what was tested
            // is unknown, so this branch starts over like a first sight instead of flooding the
            // runners with its whole history.
            let lost = mark.is_some_and(|m| !watched.has_commit(m));
            if lost {
                tracing::warn!(branch = ?name, "the branch's last seen commit is gone from the repository; testing only its head");
            }
            let read = if (!ever_polled && mark.is_none()) || lost {
                Read::HeadOnly
            } else {
                Read::Walk(history_at(name, *head))
            };
            Some((name, *head, read))
        })
        .collect();

    // Every commit that is new on some walked branch: reachable from its head, from no mark.
    let walked: Vec<Oid> = reads
        .iter()
        .filter(|(_, _, read)| matches!(read, Read::Walk(_)))
        .map(|(_, head, _)| *head)
        .collect();
    let marked: Vec<Oid> = marks.values().copied().collect();
    let history = if walked.is_empty() {
        Ok(History::default())
    } else {
        watched.new_history(&walked, &marked)
    };
    let (history, walk_error) = match history {
        Ok(history) => (history, None),
        Err(e) => (History::default(), Some(e)),
    };

    // Each new commit goes to the first branch, in order, whose head reaches it: a commit that
    // an earlier branch's head reaches (its own or one that branch only marked) is not new for
    // a later one. Each commit is claimed once, so the whole poll stays linear in the new
    // commits and the branches. A first-parent branch claims only its chain: the commits a
    // merge brought in stay free for a later branch whose own history has them.
    let mut claimed = vec![false; history.commits.len()];
    // The exact heads handled so far (and every mark): a first-sight head among them is not
    // published again.
    let mut seen: HashSet<Oid> = marked.iter().copied().collect();
    for (name, head, read) in reads {
        let reached = match read {
            Read::Walk(HistoryMode::FirstParent) => {
                claim_first_parents(&history, &mut claimed, head)
            }
            Read::HeadOnly | Read::Walk(HistoryMode::All) => claim(&history, &mut claimed, head),
        };
        let new = match read {
            Read::HeadOnly if seen.contains(&head) => vec![],
            Read::HeadOnly => vec![head],
            Read::Walk(_) => {
                if let Some(e) = &walk_error {
                    plan.failed.push((name.clone(), e.clone()));
                    continue;
                }
                reached.into_iter().map(|i| history.commits[i]).collect()
            }
        };
        let step = |commit: Oid, publish: bool| Step {
            branch: name.clone(),
            commit,
            publish,
        };
        plan.steps.extend(new.iter().map(|c| step(*c, true)));
        if new.last() != Some(&head) {
            plan.steps.push(step(head, false));
        }
        seen.insert(head);
    }

    let existing: HashSet<&BranchName> = all_branches.iter().map(|(name, _)| name).collect();
    plan.gone = marks
        .keys()
        .filter(|m| !existing.contains(m))
        .cloned()
        .collect();
    plan
}

/// How a poll reads one branch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Read {
    /// First sight (or a lost mark): its head only.
    HeadOnly,
    /// What is new since the marks: all of it, or its first-parent chain.
    Walk(HistoryMode),
}

/// Claims the commits of `history` that `head` reaches and no earlier call claimed; returns
/// their positions, oldest first (the history's order puts parents first). A claimed commit's
/// ancestors in the history are claimed too, so the search stops at one.
fn claim(history: &History, claimed: &mut [bool], head: Oid) -> Vec<usize> {
    let mut reached = Vec::new();
    let mut stack: Vec<usize> = history.index.get(&head).copied().into_iter().collect();
    while let Some(i) = stack.pop() {
        if std::mem::replace(&mut claimed[i], true) {
            continue;
        }
        reached.push(i);
        stack.extend(history.parents[i].iter().copied().filter(|p| !claimed[*p]));
    }
    reached.sort_unstable();
    reached
}

/// Claims the commits of `history` on `head`'s first-parent chain, from `head` down to the first
/// one that is not in the history (a mark reaches it) or that an earlier call claimed; returns
/// their positions, oldest first. Linear in the chain's length.
fn claim_first_parents(history: &History, claimed: &mut [bool], head: Oid) -> Vec<usize> {
    let mut chain = Vec::new();
    let mut next = history.index.get(&head).copied();
    while let Some(i) = next {
        if std::mem::replace(&mut claimed[i], true) {
            break;
        }
        chain.push(i);
        next = history.first_parent[i];
    }
    chain.reverse();
    chain
}

#[cfg(test)]
mod tests {
    use super::*;
    use git2::{Repository, Signature};

    /// A bare repository in a temporary directory, with helpers to commit and move branches.
    struct Repo {
        dir: tempfile::TempDir,
        repo: Repository,
        n: u32,
    }

    impl Repo {
        fn new() -> Repo {
            let dir = tempfile::tempdir().unwrap();
            let repo = Repository::init_bare(dir.path().join("r.git")).unwrap();
            repo.set_head("refs/heads/main").unwrap();
            Repo { dir, repo, n: 0 }
        }

        /// A new commit on top of `parent` (or a root commit), made the head of `branch`.
        fn commit(&mut self, branch: &str, parent: Option<Oid>) -> Oid {
            self.commit_on(branch, parent.as_slice())
        }

        /// A merge of `second` into `first` (its first parent), made the head of `branch`.
        fn merge(&mut self, branch: &str, first: Oid, second: Oid) -> Oid {
            self.commit_on(branch, &[first, second])
        }

        /// A new commit with `parents` (none: a root commit), made the head of `branch`.
        fn commit_on(&mut self, branch: &str, parents: &[Oid]) -> Oid {
            self.n += 1;
            let blob = self.repo.blob(self.n.to_string().as_bytes()).unwrap();
            let mut tb = self.repo.treebuilder(None).unwrap();
            tb.insert("f", blob, 0o100644).unwrap();
            let tree = self.repo.find_tree(tb.write().unwrap()).unwrap();
            let sig = Signature::now("T", "t@x").unwrap();
            let parents: Vec<_> = parents
                .iter()
                .map(|p| self.repo.find_commit(*p).unwrap())
                .collect();
            let parents: Vec<_> = parents.iter().collect();
            let oid = self
                .repo
                .commit(None, &sig, &sig, &format!("c{}", self.n), &tree, &parents)
                .unwrap();
            self.set(branch, oid);
            oid
        }

        /// Commits `n` times on `branch`, starting from `parent`; returns them oldest first.
        fn commits(&mut self, branch: &str, mut parent: Option<Oid>, n: usize) -> Vec<Oid> {
            (0..n)
                .map(|_| {
                    let c = self.commit(branch, parent);
                    parent = Some(c);
                    c
                })
                .collect()
        }

        fn set(&self, branch: &str, oid: Oid) {
            self.repo
                .reference(&format!("refs/heads/{branch}"), oid, true, "test")
                .unwrap();
        }

        fn delete(&self, branch: &str) {
            self.repo
                .find_reference(&format!("refs/heads/{branch}"))
                .unwrap()
                .delete()
                .unwrap();
        }

        fn watched(&self) -> Watched {
            let path = self.dir.path().join("r.git");
            Watched::open(path.to_str().unwrap(), self.dir.path()).unwrap()
        }
    }

    /// Plans a poll over every branch, then applies it to `marks` as a successful poll would.
    fn poll(w: &Watched, marks: &mut BTreeMap<BranchName, Oid>, ever_polled: bool) -> Vec<Step> {
        poll_with(w, marks, ever_polled, &mut history_all)
    }

    /// Every branch tests all of its history (the default).
    fn history_all(_: &BranchName, _: Oid) -> HistoryMode {
        HistoryMode::All
    }

    /// Every branch tests its first-parent chain.
    fn history_first_parent(_: &BranchName, _: Oid) -> HistoryMode {
        HistoryMode::FirstParent
    }

    /// [`poll`] with each branch's history chosen by `history_at`.
    fn poll_with(
        w: &Watched,
        marks: &mut BTreeMap<BranchName, Oid>,
        ever_polled: bool,
        history_at: &mut dyn FnMut(&BranchName, Oid) -> HistoryMode,
    ) -> Vec<Step> {
        let branches = w.branches().unwrap();
        let p = plan(w, &branches, &branches, marks, ever_polled, history_at);
        assert!(p.failed.is_empty(), "{:?}", p.failed);
        for s in &p.steps {
            marks.insert(s.branch.clone(), s.commit);
        }
        for g in &p.gone {
            marks.remove(g);
        }
        p.steps
    }

    /// The `(branch, commit)` pairs that a list of steps publishes.
    fn published(steps: &[Step]) -> Vec<(&str, Oid)> {
        steps
            .iter()
            .filter(|s| s.publish)
            .map(|s| (std::str::from_utf8(s.branch.as_bytes()).unwrap(), s.commit))
            .collect()
    }

    #[test]
    fn new_commits_are_published_oldest_first_and_once() {
        let mut r = Repo::new();
        let w = r.watched();
        let mut marks = BTreeMap::new();
        // An empty repository: nothing to do, but it now counts as polled.
        assert!(poll(&w, &mut marks, false).is_empty());

        let c = r.commits("main", None, 3);
        let steps = poll(&w, &mut marks, true);
        assert_eq!(
            published(&steps),
            vec![("main", c[0]), ("main", c[1]), ("main", c[2])]
        );
        assert!(poll(&w, &mut marks, true).is_empty(), "nothing new");

        let more = r.commits("main", Some(c[2]), 2);
        let steps = poll(&w, &mut marks, true);
        assert_eq!(
            published(&steps),
            vec![("main", more[0]), ("main", more[1])]
        );
    }

    #[test]
    fn first_sight_publishes_each_distinct_head_once() {
        let mut r = Repo::new();
        let main = r.commits("main", None, 5);
        r.set("a-copy", main[4]);
        let old = main[1];
        r.set("old", old);
        let side = r.commits("feature/ä.b", Some(main[2]), 2);
        let w = r.watched();
        let mut marks = BTreeMap::new();
        let steps = poll(&w, &mut marks, false);
        // `main` first (HEAD), then the rest by name; `a-copy` shares main's head.
        assert_eq!(
            published(&steps),
            vec![("main", main[4]), ("feature/ä.b", side[1]), ("old", old)]
        );
        assert!(steps.contains(&Step {
            branch: "a-copy".into(),
            commit: main[4],
            publish: false
        }));
        assert_eq!(marks.len(), 4);
        assert!(poll(&w, &mut marks, true).is_empty());
    }

    #[test]
    fn a_new_branch_publishes_only_what_no_other_branch_has() {
        let mut r = Repo::new();
        let main = r.commits("main", None, 3);
        let w = r.watched();
        let mut marks = BTreeMap::new();
        poll(&w, &mut marks, false);

        // A branch made from main's head with two commits of its own, while main moves on too.
        let feature = r.commits("feature/a.b", Some(main[2]), 2);
        let next = r.commit("main", Some(main[2]));
        let steps = poll(&w, &mut marks, true);
        assert_eq!(
            published(&steps),
            vec![
                ("main", next),
                ("feature/a.b", feature[0]),
                ("feature/a.b", feature[1])
            ]
        );

        // A branch at a commit jetci has already published: only a mark.
        r.set("release", main[1]);
        let steps = poll(&w, &mut marks, true);
        assert!(published(&steps).is_empty(), "{steps:?}");
        assert_eq!(marks[&BranchName::from("release")], main[1]);

        // A commit lands on the feature and main fast-forwards to it: published once, for main
        // (the HEAD branch goes first), and the feature's mark just follows.
        let merged = r.commit("feature/a.b", Some(feature[1]));
        r.set("main", merged);
        let steps = poll(&w, &mut marks, true);
        assert_eq!(published(&steps), vec![("main", merged)]);
        assert!(steps
            .iter()
            .any(|s| s.branch == "feature/a.b".into() && !s.publish));
    }

    #[test]
    fn a_known_branch_keeps_its_commits_when_a_new_branch_sorts_first() {
        let mut r = Repo::new();
        let main = r.commits("main", None, 1);
        let w = r.watched();
        let mut marks = BTreeMap::new();
        poll(&w, &mut marks, false);
        // Someone pushes two commits to `zeta`, known, and branches `alpha` off its tip.
        r.set("zeta", main[0]);
        poll(&w, &mut marks, true);
        let z = r.commits("zeta", Some(main[0]), 2);
        r.set("alpha", z[1]);
        let steps = poll(&w, &mut marks, true);
        assert_eq!(published(&steps), vec![("zeta", z[0]), ("zeta", z[1])]);
    }

    #[test]
    fn a_mark_whose_commit_is_gone_tests_only_the_head() {
        let mut r = Repo::new();
        let history = r.commits("main", None, 5);
        let w = r.watched();
        // As after a force-push and a garbage collection: the mark names a commit the
        // repository no longer has.
        let gone = Oid::from_str("1111111111111111111111111111111111111111").unwrap();
        let mut marks = BTreeMap::from([("main".into(), gone)]);
        let steps = poll(&w, &mut marks, true);
        assert_eq!(published(&steps), vec![("main", history[4])]);
    }

    #[test]
    fn force_push_publishes_the_rewritten_commits() {
        let mut r = Repo::new();
        let base = r.commits("main", None, 2);
        let w = r.watched();
        let mut marks = BTreeMap::new();
        poll(&w, &mut marks, false);
        let old = r.commits("main", Some(base[1]), 2);
        poll(&w, &mut marks, true);
        assert_eq!(marks[&BranchName::from("main")], old[1]);

        // Rewrite the last two commits.
        let new = r.commits("main", Some(base[1]), 3);
        let steps = poll(&w, &mut marks, true);
        assert_eq!(
            published(&steps),
            vec![("main", new[0]), ("main", new[1]), ("main", new[2])]
        );

        // Reset backwards: nothing to test, the mark follows.
        r.set("main", base[0]);
        let steps = poll(&w, &mut marks, true);
        assert_eq!(
            steps,
            vec![Step {
                branch: "main".into(),
                commit: base[0],
                publish: false
            }]
        );
    }

    #[test]
    fn deleted_branches_lose_their_marks_and_come_back_as_new() {
        let mut r = Repo::new();
        let main = r.commits("main", None, 2);
        let w = r.watched();
        let mut marks = BTreeMap::new();
        poll(&w, &mut marks, false);
        let topic = r.commits("topic", Some(main[1]), 2);
        poll(&w, &mut marks, true);
        assert_eq!(marks[&BranchName::from("topic")], topic[1]);

        r.delete("topic");
        let branches = w.branches().unwrap();
        let p = plan(&w, &branches, &branches, &marks, true, &mut history_all);
        assert_eq!(p.gone, vec![BranchName::from("topic")]);
        assert!(p.steps.is_empty());
        marks.remove(&BranchName::from("topic"));

        // Re-created with one more commit: not reachable from any mark left, so all of it.
        let again = r.commit("topic", Some(topic[1]));
        let steps = poll(&w, &mut marks, true);
        assert_eq!(
            published(&steps),
            vec![("topic", topic[0]), ("topic", topic[1]), ("topic", again)]
        );
    }

    #[test]
    fn filtered_out_branches_keep_their_marks() {
        let mut r = Repo::new();
        let main = r.commits("main", None, 1);
        r.set("other", main[0]);
        let w = r.watched();
        let all = w.branches().unwrap();
        let watched: Vec<_> = all
            .iter()
            .filter(|(n, _)| n.as_bytes() == b"main")
            .cloned()
            .collect();
        let mut marks = BTreeMap::from([("other".into(), main[0])]);
        let p = plan(&w, &watched, &all, &marks, false, &mut history_all);
        assert!(p.gone.is_empty());
        assert_eq!(
            p.steps,
            vec![Step {
                branch: "main".into(),
                commit: main[0],
                publish: false
            }]
        );
        marks.clear();
        let p = plan(&w, &watched, &all, &marks, false, &mut history_all);
        assert_eq!(published(&p.steps), vec![("main", main[0])]);
    }

    #[test]
    fn branches_whose_names_are_not_utf8_are_planned_by_their_bytes() {
        use std::os::unix::ffi::OsStrExt;
        let mut r = Repo::new();
        let main = r.commits("main", None, 1);
        let w = r.watched();
        let mut marks = BTreeMap::new();
        poll(&w, &mut marks, false);
        // Two names that read the same once their bytes that are not UTF-8 become U+FFFD (git
        // accepts both; libgit2's API only takes UTF-8, so the loose refs are written directly).
        let a = r.commit("tmp", Some(main[0]));
        let b = r.commit("tmp", Some(main[0]));
        r.delete("tmp");
        let heads = r.dir.path().join("r.git/refs/heads");
        for (name, oid) in [(&b"lat\xe9n1"[..], a), (&b"lat\xe8n1"[..], b)] {
            let file = heads.join(std::ffi::OsStr::from_bytes(name));
            std::fs::write(file, format!("{oid}\n")).unwrap();
        }
        let steps = poll(&w, &mut marks, true);
        let e8 = BranchName::from_bytes(b"lat\xe8n1");
        let e9 = BranchName::from_bytes(b"lat\xe9n1");
        let published: Vec<_> = steps.iter().filter(|s| s.publish).collect();
        assert_eq!(published.len(), 2, "{steps:?}");
        assert_eq!((&published[0].branch, published[0].commit), (&e8, b));
        assert_eq!((&published[1].branch, published[1].commit), (&e9, a));
        assert_eq!(published[0].branch.text(), "lat\u{fffd}n1");
        assert_eq!((marks[&e8], marks[&e9]), (b, a));
    }

    #[test]
    fn first_parent_publishes_the_main_line_and_not_the_merged_side_commits() {
        for mode in [HistoryMode::FirstParent, HistoryMode::All] {
            let mut r = Repo::new();
            let base = r.commit("main", None);
            let w = r.watched();
            let mut marks = BTreeMap::new();
            poll(&w, &mut marks, false);
            // main: m1, then a side branch of three commits (never seen: it is merged and
            // deleted between two polls), m2, the merge (`--no-ff`: main is its first parent),
            // and m3.
            let m1 = r.commit("main", Some(base));
            let side = r.commits("side", Some(m1), 3);
            r.delete("side");
            let m2 = r.commit("main", Some(m1));
            let merge = r.merge("main", m2, side[2]);
            let m3 = r.commit("main", Some(merge));
            let steps = poll_with(&w, &mut marks, true, &mut |_, _| mode);
            let got: Vec<Oid> = published(&steps).iter().map(|(_, c)| *c).collect();
            if mode == HistoryMode::FirstParent {
                assert_eq!(got, vec![m1, m2, merge, m3], "oldest first, the chain only");
            } else {
                let mut want = vec![m1, m2, merge, m3];
                want.extend(&side);
                assert_eq!(
                    got.iter().copied().collect::<HashSet<_>>(),
                    want.iter().copied().collect::<HashSet<_>>()
                );
                assert_eq!(got.len(), want.len(), "each once: {got:?}");
            }
            assert_eq!(marks[&BranchName::from("main")], m3);
            assert!(poll_with(&w, &mut marks, true, &mut |_, _| mode).is_empty());
        }
    }

    #[test]
    fn a_merged_branch_that_is_watched_keeps_its_own_commits_under_first_parent() {
        let mut r = Repo::new();
        let base = r.commit("main", None);
        let w = r.watched();
        let mut marks = BTreeMap::new();
        poll(&w, &mut marks, false);
        // A topic branch pushed with two commits and merged into main in the same poll: main
        // (marked, and the HEAD branch) goes first and takes the merge only; the topic's own
        // first-parent chain is its two commits.
        let topic = r.commits("topic", Some(base), 2);
        let m1 = r.commit("main", Some(base));
        let merge = r.merge("main", m1, topic[1]);
        let steps = poll_with(&w, &mut marks, true, &mut history_first_parent);
        assert_eq!(
            published(&steps),
            vec![
                ("main", m1),
                ("main", merge),
                ("topic", topic[0]),
                ("topic", topic[1])
            ]
        );

        // The topic goes on and is merged again: only the new topic commit and the new merge.
        let more = r.commit("topic", Some(topic[1]));
        let again = r.merge("main", merge, more);
        let steps = poll_with(&w, &mut marks, true, &mut history_first_parent);
        assert_eq!(published(&steps), vec![("main", again), ("topic", more)]);
    }

    #[test]
    fn first_parent_on_a_rewritten_branch_publishes_the_new_chain_down_to_known_history() {
        let mut r = Repo::new();
        let base = r.commits("main", None, 2);
        let w = r.watched();
        let mut marks = BTreeMap::new();
        poll(&w, &mut marks, false);
        let old = r.commits("main", Some(base[1]), 2);
        poll_with(&w, &mut marks, true, &mut history_first_parent);
        assert_eq!(marks[&BranchName::from("main")], old[1]);

        // Rebased: the mark is on no chain of the new head; the chain meets known history at
        // the base, as today's rule for a rewritten branch.
        let new = r.commits("main", Some(base[1]), 3);
        let steps = poll_with(&w, &mut marks, true, &mut history_first_parent);
        assert_eq!(
            published(&steps),
            vec![("main", new[0]), ("main", new[1]), ("main", new[2])]
        );

        // Rewritten again from the base, merging the last head as a second parent (as
        // `git pull` does from a stale clone): the mark is off the chain, which runs down to
        // the base; what the mark reaches is not new.
        let local = r.commits("main", Some(base[0]), 2);
        let merge = r.merge("main", local[1], new[2]);
        let steps = poll_with(&w, &mut marks, true, &mut history_first_parent);
        assert_eq!(
            published(&steps),
            vec![("main", local[0]), ("main", local[1]), ("main", merge)]
        );

        // Reset backwards: nothing to test, the mark follows.
        r.set("main", new[0]);
        let steps = poll_with(&w, &mut marks, true, &mut history_first_parent);
        assert_eq!(published(&steps), vec![]);
        assert_eq!(marks[&BranchName::from("main")], new[0]);
    }

    #[test]
    fn history_is_chosen_per_branch_and_asked_only_for_walked_branches() {
        let mut r = Repo::new();
        let base = r.commit("main", None);
        r.set("release", base);
        let w = r.watched();
        let mut marks = BTreeMap::new();
        let mut asked = vec![];
        // First sight: heads only, nothing is walked, so nothing is asked.
        poll_with(&w, &mut marks, false, &mut |name, head| {
            asked.push((name.clone(), head));
            HistoryMode::All
        });
        assert!(asked.is_empty(), "{asked:?}");

        // The same merge on main (first-parent) and on release (all).
        let side = r.commits("side", Some(base), 2);
        r.delete("side");
        let merge = r.merge("main", base, side[1]);
        r.set("release", merge);
        // main goes first and takes the merge; release reaches nothing new through it.
        let steps = poll_with(&w, &mut marks, true, &mut |name, head| {
            asked.push((name.clone(), head));
            if *name == BranchName::from("main") {
                HistoryMode::FirstParent
            } else {
                HistoryMode::All
            }
        });
        assert_eq!(published(&steps), vec![("main", merge)]);
        assert_eq!(
            asked,
            vec![("main".into(), merge), ("release".into(), merge)]
        );
    }
}
