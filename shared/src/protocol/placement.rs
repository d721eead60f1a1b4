//! Which runner gets a job: pure functions over the runners a dispatcher sees in `ci-runners`
//! and the jobs it sees on them in `ci-jobs`.

use std::collections::HashMap;

/// A runner as the dispatcher sees it.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    pub id: &'a str,
    pub labels: &'a [String],
    pub capacity: u32,
    /// Jobs it holds now (from `ci-jobs`: assigned or running on it).
    pub busy: u32,
    /// Alive (presence refreshed within the lease) and not draining.
    pub available: bool,
}

/// Picks the runner for a job that needs `labels`: an available runner whose labels cover them
/// and that has a free slot, the one with the most free slots first, then the one assigned least
/// recently (`last_pick`, a counter per runner), so equal runners take turns.
pub fn pick_runner<'a>(
    candidates: &[Candidate<'a>],
    labels: &[String],
    last_pick: &HashMap<String, u64>,
) -> Option<&'a str> {
    candidates
        .iter()
        .filter(|c| c.available && c.busy < c.capacity)
        .filter(|c| labels.iter().all(|l| c.labels.contains(l)))
        .max_by_key(|c| {
            let free = c.capacity - c.busy;
            let recency = last_pick.get(c.id).copied().unwrap_or(0);
            (free, std::cmp::Reverse(recency), std::cmp::Reverse(c.id))
        })
        .map(|c| c.id)
}

/// True when no candidate could ever take a job with `labels`, free or busy: the job waits for a
/// runner with those labels to register.
pub fn nobody_has_labels(candidates: &[Candidate<'_>], labels: &[String]) -> bool {
    !candidates
        .iter()
        .filter(|c| c.available)
        .any(|c| labels.iter().all(|l| c.labels.contains(l)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_free_matching_runner_in_turn() {
        let linux = vec!["linux".to_string()];
        let none: Vec<String> = vec![];
        let c = vec![
            Candidate {
                id: "a",
                labels: &linux,
                capacity: 1,
                busy: 1,
                available: true,
            },
            Candidate {
                id: "b",
                labels: &none,
                capacity: 1,
                busy: 0,
                available: true,
            },
            Candidate {
                id: "c",
                labels: &linux,
                capacity: 1,
                busy: 0,
                available: true,
            },
            Candidate {
                id: "d",
                labels: &linux,
                capacity: 4,
                busy: 0,
                available: false,
            },
        ];
        let mut last = HashMap::new();
        assert_eq!(pick_runner(&c, &linux, &last), Some("c"));
        assert_eq!(pick_runner(&c, &none, &last), Some("b"));
        last.insert("b".to_string(), 5);
        assert_eq!(pick_runner(&c, &none, &last), Some("c"));
        assert_eq!(pick_runner(&c, &["gpu".to_string()], &last), None);
        assert!(nobody_has_labels(&c, &["gpu".to_string()]));
        assert!(!nobody_has_labels(&c, &linux));
    }
}
