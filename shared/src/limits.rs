//! Bounds on what users give jetci: every duration a flag or a `.jetci.toml` sets, and text
//! that goes into a message (RELIABILITY.md, "Input that wedges or floods").
//!
//! A duration is checked where it is parsed, so a value no process can use is a one-line error
//! at the flag or the config line instead of a panic later (`Instant + 9223372036854775807s`
//! overflows) or a timer that never fires. Text clipped to fit a message says that it was.

use std::time::Duration;

/// The longest a job may run, and a runner may drain: a `.jetci.toml` `timeout`, a runner's
/// `--timeout` and `--drain-timeout`. A week.
pub const MAX_JOB_TIME: Duration = Duration::from_secs(7 * 24 * 3600);

/// The longest any other duration a user gives may be: intervals, leases, heartbeats, waits.
/// A day.
pub const MAX_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// The longest branch name watched, in bytes. git takes longer ones (in packed refs), but every
/// message about their commits carries the name, twice in a job (its payload and its state in
/// the headers): the observer does not watch a branch with a longer name and says so once
/// (clipping it instead would make two such branches one), and a job's state carries at most
/// this much of a name another publisher sent.
pub const MAX_BRANCH_BYTES: usize = 1024;

/// The most jobs one runner may run at once (`jetci-runner --jobs`, `capacity` in its
/// `ci-runners` entry): a dispatcher pulls commits for every slot runners offer, so an entry
/// claiming billions of slots (a forged or mistyped one) would open the pull to the whole stream.
pub const MAX_RUNNER_SLOTS: u32 = 1024;

/// Parses a humantime duration (`90s`, `10m`, `1h 30m`) of at most `max`, and more than zero
/// when `positive`.
///
/// Errors, as one line naming the value and the bound: not a duration, zero when `positive`,
/// longer than `max`.
pub fn parse_duration(text: &str, positive: bool, max: Duration) -> Result<Duration, String> {
    let d = humantime::parse_duration(text)
        .map_err(|e| format!("{text:?} is not a duration such as 90s, 10m or 1h: {e}"))?;
    if positive && d.is_zero() {
        return Err(format!("{text:?} must be longer than zero"));
    }
    if d > max {
        return Err(format!(
            "{text:?} is longer than the limit of {}",
            humantime::format_duration(max)
        ));
    }
    Ok(d)
}

/// A flag's interval, lease, heartbeat or wait: more than zero, at most [`MAX_INTERVAL`]. For
/// clap's `value_parser`.
pub fn interval(text: &str) -> Result<Duration, String> {
    parse_duration(text, true, MAX_INTERVAL)
}

/// A job's timeout: more than zero, at most [`MAX_JOB_TIME`]. For clap's `value_parser`.
pub fn job_time(text: &str) -> Result<Duration, String> {
    parse_duration(text, true, MAX_JOB_TIME)
}

/// A drain timeout: zero (hand jobs back at once) up to [`MAX_JOB_TIME`]. For clap's
/// `value_parser`.
pub fn drain_time(text: &str) -> Result<Duration, String> {
    parse_duration(text, false, MAX_JOB_TIME)
}

/// `text` cut to at most `max` characters; a cut one ends with `… [N bytes in all]`, so a
/// reader knows it is not the whole of it.
pub fn clip(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        None => text.to_string(),
        Some((end, _)) => format!("{}… [{} bytes in all]", &text[..end], text.len()),
    }
}

/// The end of `text`, at most `max` bytes of it (on a character boundary); a cut one starts with
/// `[N bytes before] …`. For output tails, whose end is what matters.
pub fn clip_start(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("[{start} bytes before] …{}", &text[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_bounded_with_a_clear_error() {
        assert_eq!(interval("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(job_time("7days"), Ok(MAX_JOB_TIME));
        assert_eq!(drain_time("0s"), Ok(Duration::ZERO));
        let e = job_time("9223372036854775807s").unwrap_err();
        assert!(e.contains("longer than the limit of 7days"), "{e}");
        let e = interval("2days").unwrap_err();
        assert!(e.contains("limit of 1day"), "{e}");
        assert!(interval("0s").unwrap_err().contains("longer than zero"));
        let e = interval("99999999999999999999999s").unwrap_err();
        assert!(e.contains("not a duration"), "{e}");
        assert!(interval("soon").unwrap_err().contains("\"soon\""));
    }

    #[test]
    fn clipping_says_so() {
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("äbcdef", 2), "äb… [7 bytes in all]");
        assert_eq!(clip_start("short", 10), "short");
        let tail = clip_start("aaaaäb", 3);
        assert_eq!(tail, "[4 bytes before] …äb");
    }
}
