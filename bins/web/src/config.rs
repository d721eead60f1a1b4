//! The reporting settings: alerts and result files, from flags or a TOML file.
//!
//! ```toml
//! base_url     = "https://ci.example.com"          # links in alerts
//! results_dir  = "/var/lib/jetci/test_results"     # test_results/<sha> files (off without it)
//! webhook_urls = ["https://hooks.example.com/jetci"]
//! smtp_url     = "smtps://user:password@mail.example.com"
//! mail_from    = "jetci <ci@example.com>"
//! mail_to      = ["dev@example.com"]
//! ```
//!
//! A flag given on the command line wins over the file's value (a repeatable flag replaces the
//! file's whole list), so one file can serve several jetci-web with one setting changed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use serde::Deserialize;

use crate::alerts::AlertConfig;

/// Alert and result-file flags.
#[derive(Args, Debug, Default)]
pub struct ReportArgs {
    /// A TOML file with any of: base_url, results_dir, webhook_urls, smtp_url, mail_from,
    /// mail_to (flags given here win over it).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// POST a JSON message to this URL when a branch breaks or is fixed (repeatable).
    #[arg(long = "webhook-url", value_name = "URL")]
    pub webhook_urls: Vec<String>,
    /// Mail server for break/fix emails: smtp://HOST[:PORT] (no TLS, for a local relay),
    /// smtps://… (TLS) or smtp+starttls://…; USER:PASSWORD@ in the URL logs in.
    #[arg(
        long,
        env = "JETCI_SMTP_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub smtp_url: Option<String>,
    /// Sender of the emails (default: jetci <jetci@localhost>).
    #[arg(long, value_name = "ADDRESS")]
    pub mail_from: Option<String>,
    /// Recipient of the emails (repeatable).
    #[arg(long = "mail-to", value_name = "ADDRESS")]
    pub mail_to: Vec<String>,
    /// This jetci-web's address as people reach it, for links in alerts
    /// (default: http://<--listen>).
    #[arg(long, value_name = "URL")]
    pub base_url: Option<String>,
    /// Write a <DIR>/<sha> file for every result, as the original design's test_results/.
    #[arg(long, value_name = "DIR")]
    pub results_dir: Option<PathBuf>,
}

/// The config file.
#[derive(Deserialize, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    base_url: Option<String>,
    results_dir: Option<PathBuf>,
    #[serde(default)]
    webhook_urls: Vec<String>,
    smtp_url: Option<String>,
    mail_from: Option<String>,
    #[serde(default)]
    mail_to: Vec<String>,
}

/// The settings in force.
#[derive(Debug)]
pub struct Settings {
    pub alerts: AlertConfig,
    pub base_url: String,
    pub results_dir: Option<PathBuf>,
}

impl ReportArgs {
    /// Reads the config file, if any, and lets the flags win.
    ///
    /// Errors: the file cannot be read or is not valid.
    pub fn settings(self, listen: SocketAddr) -> anyhow::Result<Settings> {
        let file = match &self.config {
            Some(path) => read(path)?,
            None => FileConfig::default(),
        };
        Ok(merge(self, file, listen))
    }
}

fn read(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
}

fn merge(args: ReportArgs, file: FileConfig, listen: SocketAddr) -> Settings {
    let list = |flag: Vec<String>, file: Vec<String>| if flag.is_empty() { file } else { flag };
    Settings {
        alerts: AlertConfig {
            webhooks: list(args.webhook_urls, file.webhook_urls),
            smtp_url: args.smtp_url.or(file.smtp_url),
            mail_from: args.mail_from.or(file.mail_from),
            mail_to: list(args.mail_to, file.mail_to),
        },
        base_url: args
            .base_url
            .or(file.base_url)
            .unwrap_or_else(|| format!("http://{listen}")),
        results_dir: args.results_dir.or(file.results_dir),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file() {
        let file: FileConfig = toml::from_str(
            r#"
            base_url = "https://ci.example.com"
            results_dir = "/tmp/r"
            webhook_urls = ["https://a", "https://b"]
            smtp_url = "smtps://mail.example.com"
            mail_from = "ci@example.com"
            mail_to = ["x@example.com"]
            "#,
        )
        .unwrap();
        let listen: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let args = ReportArgs {
            webhook_urls: vec!["https://c".into()],
            mail_from: Some("other@example.com".into()),
            ..Default::default()
        };
        let s = merge(args, file, listen);
        assert_eq!(s.alerts.webhooks, ["https://c"]);
        assert_eq!(s.alerts.mail_from.as_deref(), Some("other@example.com"));
        assert_eq!(s.alerts.mail_to, ["x@example.com"]);
        assert_eq!(s.base_url, "https://ci.example.com");
        assert_eq!(s.results_dir, Some(PathBuf::from("/tmp/r")));

        let s = merge(ReportArgs::default(), FileConfig::default(), listen);
        assert_eq!(s.base_url, "http://127.0.0.1:8080");
        assert!(s.alerts.webhooks.is_empty() && s.results_dir.is_none());
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<FileConfig>("webhook_url = \"x\"").is_err());
    }
}
