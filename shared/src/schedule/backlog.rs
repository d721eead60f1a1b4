//! Which commit of one branch's backlog is tested next, and which commit broke the branch.
//!
//! A backlog is a branch's untested commits in the order the observer published them (oldest
//! first: parents before children), numbered from 0. The repository's `order` says how they are
//! taken: `oldest-first` in that order, `newest-first` from the head down. With newest-first, when
//! the branch's tip is red and a commit below the red streak passed (or the last commit tested
//! before the backlog did: its `base`), the commits between them are tested by bisection: the one
//! in the middle of the largest untested stretch first, so the first failing commit (the culprit)
//! is known after about log2(n) results instead of n (as `git bisect` does, on the published
//! order). Every commit is still tested exactly once: once the culprit is known, or when there is
//! nothing to bisect, the rest is backfilled newest first.
//!
//! Pure: the caller says which commits started and how they ended, and asks for the next one.
//! Memory is one byte per commit of the backlog; every decision is `O(log n)` plus the length of
//! the tip's red streak.

use std::collections::{BTreeMap, BTreeSet};

/// The order a repository's branches are tested in (`order` in `.jetci.toml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Order {
    /// The order the commits were published in: history from old to new (the default).
    #[default]
    OldestFirst,
    /// The head first, then the backlog from new to old, by bisection when the head is red.
    NewestFirst,
}

/// How a tested commit ended, as far as the branch's health goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Its run passed.
    Passed,
    /// Its run failed (a test failed; an `error`, `timed_out` or `cancelled` run says nothing of
    /// the commit and is better reported as neither: see [`Backlog::forget`]).
    Failed,
}

/// One branch's backlog: positions `0..len()` oldest first, each untested, running or tested.
#[derive(Debug, Clone, Default)]
pub struct Backlog {
    order: Order,
    /// How the last commit tested before the backlog ended, when known.
    base: Option<Verdict>,
    untested: BTreeSet<u64>,
    running: BTreeSet<u64>,
    tested: BTreeMap<u64, Verdict>,
    len: u64,
    /// The culprit last returned by [`Backlog::end`], so each is named once.
    named: Option<u64>,
}

impl Backlog {
    /// An empty backlog whose branch was last tested with `base` (`None`: never, or unknown).
    pub fn new(order: Order, base: Option<Verdict>) -> Backlog {
        Backlog {
            order,
            base,
            ..Backlog::default()
        }
    }

    /// Adds the branch's next commit (newer than every commit in it); returns its position.
    pub fn push(&mut self) -> u64 {
        let at = self.len;
        self.len += 1;
        self.untested.insert(at);
        at
    }

    /// How many commits were pushed.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when no commit was pushed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True when every commit pushed is tested (or forgotten): the caller may drop the backlog
    /// and start the next one with the newest verdict as its base.
    pub fn is_done(&self) -> bool {
        self.untested.is_empty() && self.running.is_empty()
    }

    /// The verdict of the newest tested commit, else the base: the next backlog's base.
    pub fn tip(&self) -> Option<Verdict> {
        self.tested.last_key_value().map(|(_, v)| *v).or(self.base)
    }

    /// The commits started and not ended yet, oldest first.
    pub fn started(&self) -> impl Iterator<Item = u64> + '_ {
        self.running.iter().copied()
    }

    /// The commit at `at` started: it is not offered again unless [`Backlog::requeue`]d.
    pub fn start(&mut self, at: u64) {
        if self.untested.remove(&at) {
            self.running.insert(at);
        }
    }

    /// The commit at `at` was handed back before it ended (its run was lost): offered again.
    pub fn requeue(&mut self, at: u64) {
        if self.running.remove(&at) {
            self.untested.insert(at);
        }
    }

    /// The commit at `at` ended with `verdict`. Returns the culprit (the position of the first
    /// failing commit of the tip's red streak) when this result is the one that names it.
    pub fn end(&mut self, at: u64, verdict: Verdict) -> Option<u64> {
        if at >= self.len {
            return None;
        }
        self.running.remove(&at);
        self.untested.remove(&at);
        self.tested.insert(at, verdict);
        let culprit = self.culprit();
        if culprit.is_some() && culprit != self.named {
            self.named = culprit;
            return culprit;
        }
        None
    }

    /// The commit at `at` ended without a verdict on the commit (an `error`, a cancel): it is
    /// neither offered again nor counted as passed or failed.
    pub fn forget(&mut self, at: u64) {
        self.running.remove(&at);
        self.untested.remove(&at);
    }

    /// The first failing commit of the tip's red streak, once the commit below it passed (or it
    /// is the first of the backlog and the base passed); `None` while unknown or the tip is green.
    pub fn culprit(&self) -> Option<u64> {
        let (good, bad) = self.streak()?;
        let between = match good {
            Some(g) => g + 1..bad,
            None => 0..bad,
        };
        let open = self.untested.range(between.clone()).next().is_some()
            || self.running.range(between).next().is_some();
        (!open).then_some(bad)
    }

    /// The tip's red streak: the lowest tested commit from which every tested commit up to the
    /// newest failed (`bad`), and the tested commit below it (`good`, which passed), `None`
    /// standing for the base when it passed. `None` when the tip is green or nothing below the
    /// streak is known to have passed.
    fn streak(&self) -> Option<(Option<u64>, u64)> {
        let mut bad = None;
        for (&at, verdict) in self.tested.iter().rev() {
            match verdict {
                Verdict::Failed => bad = Some(at),
                Verdict::Passed => return bad.map(|b| (Some(at), b)),
            }
        }
        let bad = bad?;
        (self.base == Some(Verdict::Passed)).then_some((None, bad))
    }

    /// The next commit to test among those `can_take` accepts (the caller's filter: a commit
    /// whose job the free runner can take), or `None` when none is left.
    pub fn next(&self, can_take: impl Fn(u64) -> bool) -> Option<u64> {
        match self.order {
            Order::OldestFirst => self.untested.iter().copied().find(|&at| can_take(at)),
            Order::NewestFirst => {
                // The head first: the branch's current state is what users wait for.
                if let Some(&head) = self.untested.last() {
                    if head + 1 == self.len && can_take(head) {
                        return Some(head);
                    }
                }
                self.bisect(&can_take)
                    .or_else(|| self.untested.iter().rev().copied().find(|&at| can_take(at)))
            }
        }
    }

    /// While the culprit is unknown: the untested commit in the middle of the largest untested
    /// stretch between the streak's `good` and `bad` (running commits split stretches, so several
    /// runners bisect at once).
    fn bisect(&self, can_take: &impl Fn(u64) -> bool) -> Option<u64> {
        let (good, bad) = self.streak()?;
        let low = good.map_or(0, |g| g + 1);
        // Stretches [from, to) of the interval between running commits.
        let mut stretches = Vec::new();
        let mut from = low;
        for &r in self.running.range(low..bad) {
            stretches.push((from, r));
            from = r + 1;
        }
        stretches.push((from, bad));
        stretches.sort_by_key(|&(f, t)| std::cmp::Reverse(t.saturating_sub(f)));
        for (from, to) in stretches {
            if from >= to {
                continue;
            }
            let middle = from + (to - from) / 2;
            let above = self.untested.range(middle..to).copied();
            let below = self.untested.range(from..middle).rev().copied();
            if let Some(at) = above.chain(below).find(|&at| can_take(at)) {
                return Some(at);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backlog(order: Order, base: Option<Verdict>, n: u64) -> Backlog {
        let mut b = Backlog::new(order, base);
        for _ in 0..n {
            b.push();
        }
        b
    }

    /// Tests the backlog one commit at a time, commit `i` failing from `breaks` on; returns the
    /// order tested and the culprit with the number of results it took.
    fn run_one_at_a_time(mut b: Backlog, breaks: u64) -> (Vec<u64>, Option<(u64, usize)>) {
        let mut tested = Vec::new();
        let mut named = None;
        while let Some(at) = b.next(|_| true) {
            b.start(at);
            tested.push(at);
            let verdict = if at >= breaks {
                Verdict::Failed
            } else {
                Verdict::Passed
            };
            if let Some(c) = b.end(at, verdict) {
                assert!(named.is_none(), "a culprit is named once");
                named = Some((c, tested.len()));
            }
        }
        assert!(b.is_done());
        (tested, named)
    }

    #[test]
    fn oldest_first_tests_in_published_order_and_names_the_first_failure() {
        let b = backlog(Order::OldestFirst, Some(Verdict::Passed), 5);
        let (tested, culprit) = run_one_at_a_time(b, 3);
        assert_eq!(tested, vec![0, 1, 2, 3, 4]);
        assert_eq!(culprit, Some((3, 4)));
    }

    #[test]
    fn newest_first_on_a_green_head_backfills_from_new_to_old() {
        let b = backlog(Order::NewestFirst, Some(Verdict::Passed), 5);
        let (tested, culprit) = run_one_at_a_time(b, 99);
        assert_eq!(tested, vec![4, 3, 2, 1, 0]);
        assert_eq!(culprit, None);
    }

    #[test]
    fn a_red_head_over_a_green_base_is_bisected_in_log2_n_results_then_backfilled() {
        for n in [8u64, 32, 128] {
            let bound = (n as f64).log2().ceil() as usize + 1;
            for breaks in 0..n {
                let b = backlog(Order::NewestFirst, Some(Verdict::Passed), n);
                let (tested, culprit) = run_one_at_a_time(b, breaks);
                let (c, after) = culprit.expect("a culprit");
                assert_eq!(c, breaks, "n {n}");
                assert!(after <= bound, "n {n}, break at {breaks}: {after} results");
                assert_eq!(tested[0], n - 1, "the head first");
                let mut sorted = tested.clone();
                sorted.sort();
                assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "each exactly once");
            }
        }
    }

    #[test]
    fn without_a_known_good_commit_below_a_red_head_nothing_is_bisected() {
        let b = backlog(Order::NewestFirst, None, 8);
        let (tested, culprit) = run_one_at_a_time(b, 3);
        assert_eq!(tested, vec![7, 6, 5, 4, 3, 2, 1, 0]);
        // Found by the backfill: 2 passed below 3.
        assert_eq!(culprit, Some((3, 6)));
        let b = backlog(Order::NewestFirst, Some(Verdict::Failed), 4);
        let (tested, culprit) = run_one_at_a_time(b, 0);
        assert_eq!(tested, vec![3, 2, 1, 0]);
        assert_eq!(culprit, None, "the break is older than the backlog");
    }

    #[test]
    fn several_runners_bisect_different_stretches_at_once() {
        let mut b = backlog(Order::NewestFirst, Some(Verdict::Passed), 16);
        let head = b.next(|_| true).unwrap();
        b.start(head);
        b.end(head, Verdict::Failed);
        let first = b.next(|_| true).unwrap();
        b.start(first);
        let second = b.next(|_| true).unwrap();
        b.start(second);
        assert_eq!(first, 7, "the middle of 0..15");
        assert_eq!(second, 3, "the middle of 0..7, as long as 8..15");
        let third = b.next(|_| true).unwrap();
        assert_eq!(third, 11, "the middle of 8..15, now the longest");
    }

    #[test]
    fn a_new_head_goes_first_then_the_hunt_resumes() {
        let mut b = backlog(Order::NewestFirst, Some(Verdict::Passed), 8);
        b.start(7);
        b.end(7, Verdict::Failed);
        let new_head = b.push();
        assert_eq!(b.next(|_| true), Some(new_head));
        b.start(new_head);
        b.end(new_head, Verdict::Failed);
        assert_eq!(
            b.next(|_| true),
            Some(3),
            "bisection of 0..7 below the red streak"
        );
    }

    #[test]
    fn a_green_tip_after_a_fix_stops_the_hunt() {
        let mut b = backlog(Order::NewestFirst, Some(Verdict::Passed), 8);
        b.start(7);
        b.end(7, Verdict::Passed);
        b.start(3);
        b.end(3, Verdict::Failed);
        assert_eq!(b.culprit(), None, "the tip is green");
        assert_eq!(b.next(|_| true), Some(6), "plain backfill, newest first");
    }

    #[test]
    fn the_filter_skips_commits_the_runner_cannot_take() {
        let mut b = backlog(Order::NewestFirst, Some(Verdict::Passed), 9);
        b.start(8);
        b.end(8, Verdict::Failed);
        assert_eq!(
            b.next(|at| at != 4),
            Some(5),
            "the nearest takeable in the stretch"
        );
        assert_eq!(b.next(|at| at > 8), None);
        let o = backlog(Order::OldestFirst, None, 3);
        assert_eq!(o.next(|at| at != 0), Some(1));
    }

    #[test]
    fn a_lost_run_is_offered_again_and_a_run_without_verdict_is_not() {
        let mut b = backlog(Order::OldestFirst, None, 3);
        b.start(0);
        assert_eq!(b.next(|_| true), Some(1));
        b.requeue(0);
        assert_eq!(b.next(|_| true), Some(0));
        b.start(0);
        b.forget(0);
        assert_eq!(b.next(|_| true), Some(1));
        b.start(1);
        b.end(1, Verdict::Passed);
        b.start(2);
        b.end(2, Verdict::Passed);
        assert!(b.is_done());
        assert_eq!(b.tip(), Some(Verdict::Passed));
        assert_eq!(b.end(7, Verdict::Failed), None, "out of range is ignored");
    }
}
