//! SVG status badges: `build | passing` in the usual two-part shape.
//!
//! The only free text is the repository and branch in the `<title>` and `aria-label`; it is
//! escaped with maud like every page, so a branch named `"><script>` stays text.

use jetci::messages::Status;
use maud::html;

/// The right-hand word and its colour for a status (`None`: no result known).
pub fn look(status: Option<Status>) -> (&'static str, &'static str) {
    match status {
        Some(Status::Passed) => ("passing", "#2e8b3a"),
        Some(Status::Failed) => ("failing", "#c4302b"),
        Some(Status::TimedOut) => ("timed out", "#c4302b"),
        Some(Status::Error) => ("error", "#d9822b"),
        Some(Status::Cancelled) => ("cancelled", "#9f9f9f"),
        Some(Status::Skipped) => ("skipped", "#9f9f9f"),
        None => ("unknown", "#9f9f9f"),
    }
}

/// Text width in pixels at 11px Verdana, roughly (badges need no precision).
fn width(text: &str) -> usize {
    text.chars().count() * 7 + 12
}

/// The badge for `what` (e.g. `app main`) with `status`.
pub fn svg(what: &str, status: Option<Status>) -> String {
    let label = "build";
    let (word, colour) = look(status);
    let (lw, rw) = (width(label), width(word));
    let total = lw + rw;
    let title = format!("{what}: {word}");
    html! {
        svg xmlns="http://www.w3.org/2000/svg" width=(total) height="20" role="img" aria-label=(title) {
            title { (title) }
            rect width=(lw) height="20" fill="#555" {}
            rect x=(lw) width=(rw) height="20" fill=(colour) {}
            g fill="#fff" text-anchor="middle" font-family="Verdana,DejaVu Sans,sans-serif" font-size="11" {
                text x=(lw / 2) y="14" { (label) }
                text x=(lw + rw / 2) y="14" { (word) }
            }
        }
    }
    .into_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn badges_say_the_status_and_escape_the_name() {
        let s = svg("app x\"><script>alert(1)</script>", Some(Status::Passed));
        assert!(s.starts_with("<svg"), "{s}");
        assert!(s.contains(">passing<") && s.contains("#2e8b3a"), "{s}");
        assert!(!s.contains("<script>"), "{s}");
        assert!(s.contains("&lt;script&gt;"), "{s}");
        assert!(svg("a", Some(Status::Failed)).contains(">failing<"));
        assert!(svg("a", None).contains(">unknown<"));
    }
}
