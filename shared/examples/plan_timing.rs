//! How long the observer's planning takes against the number of branches:
//! `cargo run --release -p jetci --example plan_timing -- 1000 10000`.
//!
//! For each count N it builds a bare repository with `main` and N branches, each one commit of
//! its own on top of `main`, and times [`jetci::observer::plan::plan`] for: the first poll of a
//! repository never seen, a poll with nothing new, N new branches in a repository already seen,
//! and one commit pushed to `main` while every branch has a mark. Each walked branch's `history`
//! is read from the `.jetci.toml` at its head, as the observer does.

use std::collections::BTreeMap;
use std::time::Instant;

use git2::{Oid, Repository, Signature};
use jetci::git::BranchName;
use jetci::observer::commit::config_at;
use jetci::observer::plan::plan;
use jetci::repo_config::HistoryMode;

/// The `history` at `head`, as the observer reads it (the default when the file is bad).
fn history_at(w: &jetci::git::Watched, _: &BranchName, head: Oid) -> HistoryMode {
    config_at(w, head).map(|c| c.history).unwrap_or_default()
}

fn commit(repo: &Repository, branch: &str, parent: Option<Oid>, text: &str) -> Oid {
    let blob = repo.blob(text.as_bytes()).expect("blob");
    let mut tb = repo.treebuilder(None).expect("treebuilder");
    tb.insert("f", blob, 0o100644).expect("insert");
    let tree = repo.find_tree(tb.write().expect("tree")).expect("tree");
    let sig = Signature::now("T", "t@x").expect("signature");
    let parents: Vec<_> = parent
        .map(|p| repo.find_commit(p).expect("parent"))
        .into_iter()
        .collect();
    let parents: Vec<_> = parents.iter().collect();
    repo.commit(
        Some(&format!("refs/heads/{branch}")),
        &sig,
        &sig,
        text,
        &tree,
        &parents,
    )
    .expect("commit")
}

fn main() {
    let counts: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("a number of branches"))
        .collect();
    for n in counts {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("r.git");
        let repo = Repository::init_bare(&path).expect("init");
        repo.set_head("refs/heads/main").expect("HEAD");
        let root = commit(&repo, "main", None, "root");
        for i in 0..n {
            commit(&repo, &format!("b/{i}"), Some(root), &format!("b{i}"));
        }
        let w = jetci::git::Watched::open(path.to_str().expect("path"), dir.path()).expect("open");
        let b = w.branches().expect("branches");
        let time = |what: &str, marks: &BTreeMap<BranchName, Oid>, ever_polled: bool| {
            let t = Instant::now();
            let p = plan(&w, &b, &b, marks, ever_polled, &mut |n, h| {
                history_at(&w, n, h)
            });
            let publish = p.steps.iter().filter(|s| s.publish).count();
            println!(
                "{n:>6} branches, {what}: {publish} to publish, {:?}",
                t.elapsed()
            );
            p
        };
        let first = time("first poll", &BTreeMap::new(), false);
        let all: BTreeMap<_, _> = first
            .steps
            .iter()
            .map(|s| (s.branch.clone(), s.commit))
            .collect();
        time("nothing new", &all, true);
        let only_main = BTreeMap::from([(BranchName::from("main"), root)]);
        time("all branches new", &only_main, true);
        commit(&repo, "main", Some(root), "pushed");
        let b = w.branches().expect("branches");
        let t = Instant::now();
        let p = plan(&w, &b, &b, &all, true, &mut |n, h| history_at(&w, n, h));
        let publish = p.steps.iter().filter(|s| s.publish).count();
        println!(
            "{n:>6} branches, one push to main: {publish} to publish, {:?}",
            t.elapsed()
        );
    }
}
