use super::*;

fn labels(l: &[&str]) -> Vec<String> {
    l.iter().map(|s| s.to_string()).collect()
}

/// Adds one single-job commit of `repo`'s `branch`; returns its job key.
fn push(s: &mut Schedule, repo: &str, branch: &str, needs: &[&str], since: u64) -> String {
    let position = s.commit(repo, branch, Some(Verdict::Passed));
    let key = format!("{repo}.{branch}.{position}.test");
    s.add(Ready {
        key: key.clone(),
        repo: repo.into(),
        branch: branch.into(),
        position,
        labels: labels(needs),
        since,
    });
    key
}

/// Picks and takes the next job for a runner with `l`.
fn take(s: &mut Schedule, l: &[&str]) -> Option<Pick> {
    let pick = s.pick(&labels(l))?;
    s.take(&pick);
    Some(pick)
}

#[test]
fn a_free_slot_goes_to_the_repository_with_the_fewest_jobs_running() {
    let mut s = Schedule::new();
    for i in 0..100 {
        push(&mut s, "a", "main", &[], i);
    }
    push(&mut s, "b", "main", &[], 100);
    assert_eq!(
        take(&mut s, &[]).unwrap().repo,
        "a",
        "ties: the oldest wait"
    );
    assert_eq!(take(&mut s, &[]).unwrap().repo, "b", "b has none running");
    // a's job ends: a and b have one running each again... b has nothing left.
    s.running("a", "main", -1);
    assert_eq!(take(&mut s, &[]).unwrap().repo, "a");
    assert_eq!(s.len(), 98);
}

#[test]
fn running_counts_of_other_dispatchers_count_too() {
    let mut s = Schedule::new();
    push(&mut s, "a", "main", &[], 0);
    push(&mut s, "b", "main", &[], 1);
    s.running("a", "main", 2);
    assert_eq!(s.pick(&[]).unwrap().repo, "b");
    s.running("a", "main", -2);
    assert_eq!(s.pick(&[]).unwrap().repo, "a");
}

#[test]
fn within_a_repository_branches_share_alike() {
    let mut s = Schedule::new();
    for i in 0..50 {
        push(&mut s, "a", "feature", &[], i);
    }
    push(&mut s, "a", "main", &[], 50);
    assert_eq!(take(&mut s, &[]).unwrap().branch, "feature");
    assert_eq!(take(&mut s, &[]).unwrap().branch, "main");
    assert_eq!(take(&mut s, &[]).unwrap().branch, "feature");
}

#[test]
fn a_job_no_runner_can_take_blocks_nothing_and_starts_on_a_runner_that_can() {
    let mut s = Schedule::new();
    for i in 0..6 {
        push(&mut s, "a", "main", &["gpu"], i);
    }
    for i in 0..3 {
        push(&mut s, "b", "main", &[], 10 + i);
    }
    for _ in 0..3 {
        assert_eq!(take(&mut s, &["linux"]).unwrap().repo, "b");
    }
    assert_eq!(s.pick(&labels(&["linux"])), None);
    let gpu = take(&mut s, &["gpu", "linux"]).unwrap();
    assert_eq!((gpu.repo.as_str(), gpu.position), ("a", 0));
}

#[test]
fn a_runner_with_labels_shares_across_label_sets_by_running_count() {
    let mut s = Schedule::new();
    push(&mut s, "a", "main", &["gpu"], 5);
    push(&mut s, "b", "main", &[], 0);
    s.running("b", "main", 1);
    assert_eq!(s.pick(&labels(&["gpu"])).unwrap().repo, "a");
}

#[test]
fn newest_first_takes_the_head_then_the_backlog_from_new_to_old() {
    let mut s = Schedule::new();
    s.set_order("a", Order::NewestFirst);
    for i in 0..4 {
        push(&mut s, "a", "main", &[], i);
    }
    let order: Vec<u64> = (0..4)
        .map(|_| take(&mut s, &[]).unwrap().position)
        .collect();
    assert_eq!(order, vec![3, 2, 1, 0]);
}

#[test]
fn a_red_head_finds_its_culprit_by_bisection_and_tests_every_commit_once() {
    let mut s = Schedule::new();
    s.set_order("a", Order::NewestFirst);
    let n = 32u64;
    let breaking = 19;
    for i in 0..n {
        push(&mut s, "a", "main", &[], i);
    }
    let mut tested = Vec::new();
    let mut culprit = None;
    while let Some(p) = take(&mut s, &[]) {
        tested.push(p.position);
        s.running("a", "main", -1);
        let verdict = if p.position >= breaking {
            Verdict::Failed
        } else {
            Verdict::Passed
        };
        if let Some(c) = s.ended("a", "main", p.position, Some(verdict)) {
            culprit = Some((c, tested.len()));
        }
    }
    let (c, after) = culprit.expect("named");
    assert_eq!(c, breaking);
    assert!(after <= 6, "named after {after} results");
    tested.sort();
    assert_eq!(tested, (0..n).collect::<Vec<_>>());
    assert!(s.is_empty());
}

#[test]
fn a_pipelines_later_jobs_go_before_new_commits() {
    let mut s = Schedule::new();
    let first = s.commit("a", "main", None);
    let second = s.commit("a", "main", None);
    let ready = |key: &str, position: u64, since: u64| Ready {
        key: key.into(),
        repo: "a".into(),
        branch: "main".into(),
        position,
        labels: vec![],
        since,
    };
    s.add(ready("build-1", first, 0));
    s.add(ready("build-2", second, 1));
    assert_eq!(take(&mut s, &[]).unwrap().key, "build-1");
    s.running("a", "main", -1);
    // build-1 passed; its test job is ready now, after build-2 waited.
    s.add(ready("test-1", first, 2));
    assert_eq!(take(&mut s, &[]).unwrap().key, "test-1");
    assert_eq!(take(&mut s, &[]).unwrap().key, "build-2");
}

#[test]
fn removed_jobs_are_not_offered_and_leave_nothing_behind() {
    let mut s = Schedule::new();
    let a = push(&mut s, "a", "main", &["gpu"], 0);
    let b = push(&mut s, "b", "dev", &[], 1);
    assert!(s.remove(&a).is_some());
    assert!(s.remove(&a).is_none());
    assert_eq!(s.pick(&labels(&["gpu"])).unwrap().key, b);
    s.remove(&b);
    assert!(s.is_empty());
    assert!(s.queues.is_empty() && s.repo_sets.is_empty());
    assert_eq!(s.pick(&[]), None);
}

#[test]
fn a_lost_commit_is_offered_again_in_its_place() {
    let mut s = Schedule::new();
    for i in 0..3 {
        push(&mut s, "a", "main", &[], i);
    }
    let p = take(&mut s, &[]).unwrap();
    assert_eq!(p.position, 0);
    s.running("a", "main", -1);
    s.requeued("a", "main", 0);
    s.add(Ready {
        key: p.key.clone(),
        repo: "a".into(),
        branch: "main".into(),
        position: 0,
        labels: vec![],
        since: 0,
    });
    assert_eq!(take(&mut s, &[]).unwrap().key, p.key);
}
