//! `jetci notify`: tell a repository's observer to poll now, from a git `post-receive` hook.
//!
//! The notify is a core-NATS request on `ci.notify.<repo>`, never stored: the observer's regular
//! poll is the safety net for a notify that is lost, and its marks make a duplicate harmless
//! (DESIGN.md, I1). It is a request rather than a plain publish so that the pusher learns whether
//! an observer heard it: the observer answers once the poll that followed the notify published.
//!
//! Exit status: non-zero only when the notify could not be sent at all (bad arguments, NATS
//! unreachable). Nobody listening, a late answer or a failed poll are warnings on stderr with
//! exit 0, because in each case the commits still get published by a poll (once an observer runs,
//! or at its next poll), and a hook has nothing better to do than say so.

use std::time::Duration;

use anyhow::{Context, Result};
use async_nats::{Request, RequestErrorKind};
use jetci::connect::ConnectArgs;
use jetci::messages::{decode, encode, NotifyMsg, NotifyReply, VERSION};
use jetci::subjects::repo_slug;

/// `jetci notify` arguments.
#[derive(clap::Args, Debug)]
pub struct NotifyArgs {
    /// The repository: the observer's --name, or the repository's path or URL (named as the
    /// observer names it: the last component without '.git').
    #[arg(value_name = "REPO")]
    repo: String,
    /// The ref that moved, e.g. refs/heads/main (for the observer's log).
    #[arg(value_name = "REF")]
    git_ref: Option<String>,
    /// The ref's old commit id (as a post-receive hook reads it).
    #[arg(value_name = "OLD")]
    old: Option<String>,
    /// The ref's new commit id.
    #[arg(value_name = "NEW")]
    new: Option<String>,
    /// How long to wait for the observer's answer (it answers when its poll has published).
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = jetci::limits::interval)]
    timeout: Duration,
}

/// Sends the notify and prints what came of it: a line on stdout when the observer answered, a
/// warning on stderr otherwise.
pub async fn run(args: &NotifyArgs, connect: &ConnectArgs) -> Result<()> {
    let repo = repo_slug(&args.repo);
    let nats = connect.connect("jetci-notify").await?;
    let subject = nats.names.notify_subject(&repo);
    let msg = NotifyMsg {
        v: VERSION,
        repo: repo.clone(),
        git_ref: args.git_ref.clone(),
        old: args.old.clone(),
        new: args.new.clone(),
    };
    let request = Request::new()
        .payload(encode(&msg))
        .timeout(Some(args.timeout));
    match nats.client.send_request(subject.clone(), request).await {
        Ok(answer) => match decode::<NotifyReply>(&answer.payload) {
            Ok(reply) => match describe(&reply) {
                Ok(line) => println!("jetci: {line}"),
                Err(line) => eprintln!("jetci: warning: {line}"),
            },
            Err(e) => eprintln!(
                "jetci: warning: the observer of {repo} answered something unreadable: {e}"
            ),
        },
        Err(e) if e.kind() == RequestErrorKind::NoResponders => eprintln!(
            "jetci: warning: no observer watches {repo} (nobody listens on {subject}); \
             an observer started later publishes these commits at its first poll"
        ),
        Err(e) if e.kind() == RequestErrorKind::TimedOut => eprintln!(
            "jetci: warning: the observer of {repo} did not answer within {}; it publishes \
             the commits when its poll is done",
            humantime::format_duration(args.timeout)
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot notify the observer of {repo}")),
    }
    Ok(())
}

/// The line for an observer's answer: `Ok` when its poll went through, `Err` for a warning.
fn describe(reply: &NotifyReply) -> Result<String, String> {
    let published = match reply.published {
        0 => "nothing new".to_string(),
        1 => "1 new commit published".to_string(),
        n => format!("{n} new commits published"),
    };
    match &reply.error {
        None => Ok(format!("{}: {published}", reply.repo)),
        Some(e) => Err(format!(
            "{}: {published}, then the observer's poll failed: {e} (it retries at its next poll)",
            reply.repo
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_read_as_one_line() {
        let mut reply = NotifyReply {
            v: VERSION,
            repo: "app".into(),
            published: 0,
            error: None,
        };
        assert_eq!(describe(&reply), Ok("app: nothing new".into()));
        reply.published = 2;
        assert_eq!(describe(&reply), Ok("app: 2 new commits published".into()));
        reply.error = Some("NATS is away".into());
        let line = describe(&reply).unwrap_err();
        assert!(line.contains("2 new commits published, then"), "{line}");
        assert!(line.contains("NATS is away"), "{line}");
    }
}
