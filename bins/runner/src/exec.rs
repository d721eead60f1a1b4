//! Running a job's command: `sh -c COMMAND` in its own process group, output captured, with a
//! timeout and cancellation that stop the whole group.
//!
//! - The command gets a new process group (`setpgid(0, 0)`), so a signal to `-pgid` reaches
//!   every process it started, forked children included.
//! - stdout and stderr share one pipe, so the log keeps their interleaving in arrival order.
//! - On timeout or cancel: SIGTERM to the group, `grace` to exit, then SIGKILL.
//! - A job ends when its command exits, even if a background child still holds the pipe open:
//!   the group is killed then and the pipe is drained for at most [`DRAIN_AFTER_EXIT`].

use std::collections::VecDeque;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

/// How long the pipe is read after the command exited (and its group was killed).
pub const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

/// Bytes of output kept for the result's `output_tail`.
pub const TAIL_BYTES: usize = 4096;

/// What to run.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Shell command, given to `sh -c` as one argument (never spliced with repo data).
    pub command: String,
    /// Working directory: the checkout.
    pub dir: PathBuf,
    /// The whole environment; nothing is inherited.
    pub env: Vec<(String, String)>,
    pub timeout: Duration,
    /// Time between SIGTERM and SIGKILL.
    pub grace: Duration,
}

/// How the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// It exited with this code.
    Exited(i32),
    /// A signal it did not ask for ended it (9 is SIGKILL).
    Signaled(i32),
    /// It ran past the timeout; `signal` is the one that finally ended it.
    TimedOut { signal: Option<i32> },
    /// It was cancelled; `signal` is the one that finally ended it.
    Cancelled { signal: Option<i32> },
}

/// What a finished command left.
#[derive(Debug)]
pub struct Outcome {
    pub ended: Ended,
    /// Bytes it wrote to stdout and stderr.
    pub output_bytes: u64,
    /// The last [`TAIL_BYTES`] of that output.
    pub tail: Vec<u8>,
}

/// Runs `spec`, handing each piece of output to `sink` as it arrives.
///
/// Errors: only when the command cannot be started (`sh` missing, directory gone); everything
/// the command does is an [`Outcome`].
pub async fn run(
    spec: &Spec,
    sink: &mut (dyn FnMut(&[u8]) + Send),
    cancel: &CancellationToken,
) -> io::Result<Outcome> {
    let (reader, writer) = io::pipe()?;
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(&spec.command)
        .current_dir(&spec.dir)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::from(writer.try_clone()?))
        .stderr(Stdio::from(writer))
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    // The parent's copies of the pipe's write end must close, or the reader never sees EOF.
    drop(cmd);
    let pgid = Pid::from_raw(child.id().map(|p| p as i32).unwrap_or(0));
    let mut pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(reader.into())?;

    let mut tail = Tail::default();
    let mut total = 0u64;
    let mut buf = vec![0u8; 32 * 1024];
    let deadline = Instant::now() + spec.timeout;
    let far = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
    let mut kill_at = far;
    let mut drain_until = far;
    let mut eof = false;
    let mut status = None;
    let mut stopped: Option<fn(Option<i32>) -> Ended> = None;

    loop {
        if eof && status.is_some() {
            break;
        }
        tokio::select! {
            read = pipe.read(&mut buf), if !eof => match read {
                Ok(0) | Err(_) => eof = true,
                Ok(n) => {
                    total += n as u64;
                    tail.push(&buf[..n]);
                    sink(&buf[..n]);
                }
            },
            exit = child.wait(), if status.is_none() => {
                status = Some(exit?);
                // Whatever the command left behind in its group goes with it.
                let _ = killpg(pgid, Signal::SIGKILL);
                drain_until = Instant::now() + DRAIN_AFTER_EXIT;
            }
            _ = sleep_until(deadline), if status.is_none() && stopped.is_none() => {
                stopped = Some(|signal| Ended::TimedOut { signal });
                let _ = killpg(pgid, Signal::SIGTERM);
                kill_at = Instant::now() + spec.grace;
            }
            _ = cancel.cancelled(), if status.is_none() && stopped.is_none() => {
                stopped = Some(|signal| Ended::Cancelled { signal });
                let _ = killpg(pgid, Signal::SIGTERM);
                kill_at = Instant::now() + spec.grace;
            }
            _ = sleep_until(kill_at), if status.is_none() => {
                let _ = killpg(pgid, Signal::SIGKILL);
                kill_at = far;
            }
            _ = sleep_until(drain_until), if status.is_some() => break,
        }
    }
    let status = status.expect("the loop ends only after the command exited");
    let ended = match (stopped, status.code(), status.signal()) {
        (Some(stop), _, signal) => stop(signal),
        (None, Some(code), _) => Ended::Exited(code),
        (None, None, Some(signal)) => Ended::Signaled(signal),
        (None, None, None) => Ended::Exited(-1),
    };
    Ok(Outcome {
        ended,
        output_bytes: total,
        tail: tail.into_vec(),
    })
}

/// The last [`TAIL_BYTES`] of a byte stream.
#[derive(Default)]
struct Tail(VecDeque<u8>);

impl Tail {
    fn push(&mut self, bytes: &[u8]) {
        let bytes = &bytes[bytes.len().saturating_sub(TAIL_BYTES)..];
        let overflow = (self.0.len() + bytes.len()).saturating_sub(TAIL_BYTES);
        self.0.drain(..overflow);
        self.0.extend(bytes);
    }
    fn into_vec(self) -> Vec<u8> {
        self.0.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(command: &str, timeout: Duration) -> Spec {
        Spec {
            command: command.into(),
            dir: std::env::temp_dir(),
            env: vec![("PATH".into(), std::env::var("PATH").unwrap_or_default())],
            timeout,
            grace: Duration::from_millis(500),
        }
    }

    async fn run_collect(s: &Spec, cancel: &CancellationToken) -> (Outcome, Vec<u8>) {
        let mut out = Vec::new();
        let o = run(s, &mut |b: &[u8]| out.extend_from_slice(b), cancel)
            .await
            .unwrap();
        (o, out)
    }

    #[tokio::test]
    async fn exit_codes_output_and_env() {
        let never = CancellationToken::new();
        let (o, out) = run_collect(
            &spec("echo out; echo err >&2; exit 3", Duration::from_secs(30)),
            &never,
        )
        .await;
        assert_eq!(o.ended, Ended::Exited(3));
        assert_eq!(out, b"out\nerr\n");
        assert_eq!(o.output_bytes, 8);
        let mut s = spec("test -z \"$HOME\" && echo $X", Duration::from_secs(30));
        s.env.push(("X".into(), "from-spec".into()));
        let (o, out) = run_collect(&s, &never).await;
        assert_eq!((o.ended, out), (Ended::Exited(0), b"from-spec\n".to_vec()));
        let (o, _) = run_collect(&spec("kill -9 $$", Duration::from_secs(30)), &never).await;
        assert_eq!(o.ended, Ended::Signaled(9));
    }

    #[tokio::test]
    async fn timeout_kills_the_group_and_background_children_do_not_hold_the_job() {
        let never = CancellationToken::new();
        let started = std::time::Instant::now();
        let (o, _) = run_collect(
            &spec("sleep 1000 & sleep 1000", Duration::from_millis(300)),
            &never,
        )
        .await;
        assert!(matches!(o.ended, Ended::TimedOut { .. }), "{:?}", o.ended);
        assert!(started.elapsed() < Duration::from_secs(20));
        // The command exits at once, its background child holds the pipe: the job still ends.
        let (o, out) = run_collect(
            &spec("sleep 1000 & echo done", Duration::from_secs(60)),
            &never,
        )
        .await;
        assert_eq!(o.ended, Ended::Exited(0));
        assert_eq!(out, b"done\n");
    }

    #[tokio::test]
    async fn cancel_stops_it() {
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            c.cancel();
        });
        let (o, _) = run_collect(&spec("sleep 1000", Duration::from_secs(60)), &cancel).await;
        assert!(matches!(o.ended, Ended::Cancelled { .. }), "{:?}", o.ended);
    }

    #[test]
    fn tail_keeps_the_end() {
        let mut t = Tail::default();
        t.push(&vec![b'a'; TAIL_BYTES]);
        t.push(b"xyz");
        let v = t.into_vec();
        assert_eq!(v.len(), TAIL_BYTES);
        assert!(v.ends_with(b"axyz"));
        let mut t = Tail::default();
        t.push(&vec![b'b'; TAIL_BYTES * 3]);
        assert_eq!(t.into_vec().len(), TAIL_BYTES);
    }
}
