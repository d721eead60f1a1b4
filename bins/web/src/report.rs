//! What happens to each final result besides the view: its `test_results/<sha>` file
//! (`--results-dir`) and, when it flips its branch, a alert.
//!
//! The results feed calls [`Reporter::caught_up`] once, when the view is rebuilt from the stream,
//! and [`Reporter::result`] for every new final result. Before the catch-up results are history:
//! they get their files but never a alert; at the catch-up each branch's state is seeded
//! from the view, and only later results can flip it (`transitions.rs`).

use std::sync::Arc;

use crate::alerts::{Alert, Alerter};
use crate::results_dir::ResultFiles;
use crate::transitions::Transitions;
use crate::view::{Stored, View};

/// The reporting state of the results feed (owned by its task).
pub struct Reporter {
    alerter: Alerter,
    files: Option<ResultFiles>,
    /// Where links in alerts point (e.g. `https://ci.example.com`).
    base_url: String,
    transitions: Transitions,
    caught_up: bool,
}

impl Reporter {
    pub fn new(alerter: Alerter, files: Option<ResultFiles>, base_url: String) -> Reporter {
        Reporter {
            alerter,
            files,
            base_url,
            transitions: Transitions::default(),
            caught_up: false,
        }
    }

    /// The view is rebuilt: seed every branch's state from it.
    pub fn caught_up(&mut self, view: &View) {
        for head in view.heads() {
            let r = &head.result;
            self.transitions.seed(&r.repo, &r.branch, r.status);
        }
        self.caught_up = true;
    }

    /// A new final result, and the verdict of its branch's newest commit after it was added.
    pub async fn result(&mut self, stored: Arc<Stored>, head: Option<Arc<Stored>>) {
        if self.caught_up {
            if let Some(head) = head {
                let h = &head.result;
                if let Some(kind) = self
                    .transitions
                    .observe(&h.repo, &h.branch, &h.sha, h.status)
                {
                    self.alerter.send(Alert::new(kind, h, &self.base_url));
                }
            }
        }
        if let Some(files) = &self.files {
            files.write(stored).await;
        }
    }
}
