//! Signal handling: the first SIGTERM or SIGINT cancels the token (graceful shutdown), a second
//! one exits at once.

use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Spawns the signal listener for `token`.
pub fn install(token: CancellationToken) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::info!("shutdown requested; finishing in-flight work (signal again to exit now)");
        crate::systemd::stopping();
        token.cancel();
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::warn!("second signal: exiting immediately");
        std::process::exit(130);
    });
    Ok(())
}

/// The two stages of a graceful stop. `stop` fires at the first signal: take no new work, and
/// end every wait or backoff (waiting is not progress). `deadline` fires a grace period later:
/// give up on effects still running, so a stuck dependency cannot hold the exit forever.
#[derive(Debug, Clone)]
pub struct Graceful {
    pub stop: CancellationToken,
    pub deadline: CancellationToken,
}

impl Graceful {
    /// Fires `deadline` once `grace` has passed after `stop` fires.
    pub fn new(stop: CancellationToken, grace: Duration) -> Graceful {
        let deadline = CancellationToken::new();
        let (s, d) = (stop.clone(), deadline.clone());
        tokio::spawn(async move {
            s.cancelled().await;
            tokio::time::sleep(grace).await;
            d.cancel();
        });
        Graceful { stop, deadline }
    }
}
