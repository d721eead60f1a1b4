//! Clean shutdown: one [`CancellationToken`] per process, cancelled by SIGINT or SIGTERM.
//!
//! Every loop selects on the token (mini-redis' `shutdown.rs` does the same with a broadcast
//! channel). A second signal is reported on [`Shutdown::again`], for processes that stop gently
//! first and hurry on a repeat (a runner hands its job back at once).

use tokio::signal::unix::{signal, SignalKind};
pub use tokio_util::sync::CancellationToken;

/// The process's shutdown signals.
#[derive(Clone)]
pub struct Shutdown {
    /// Cancelled by the first SIGINT or SIGTERM.
    pub token: CancellationToken,
    /// Cancelled by the second.
    pub again: CancellationToken,
}

impl Shutdown {
    /// Installs the signal handlers; call once, from inside the tokio runtime.
    ///
    /// Errors: the OS refused the handler (practically never).
    pub fn install() -> std::io::Result<Shutdown> {
        let token = CancellationToken::new();
        let again = CancellationToken::new();
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        let (t, a) = (token.clone(), again.clone());
        tokio::spawn(async move {
            let mut count = 0;
            loop {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                count += 1;
                if count == 1 {
                    tracing::info!("shutdown requested; finishing up (signal again to hurry)");
                    t.cancel();
                } else {
                    a.cancel();
                }
            }
        });
        Ok(Shutdown { token, again })
    }
}
