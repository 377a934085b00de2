//! systemd integration: readiness (`Type=notify`), stopping, and watchdog keep-alives, sent as
//! datagrams to `$NOTIFY_SOCKET`. Outside systemd (no socket) every call does nothing.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Sends one notification; `false` when not under systemd or the send failed.
pub fn notify(state: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return false };
    let path = path.to_string_lossy().into_owned();
    let addr = match path.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(&path),
    };
    let sent = addr.and_then(|addr| UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr));
    if let Err(e) = &sent {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
    sent.is_ok()
}

/// The role is up and serving.
pub fn ready() {
    notify("READY=1");
}

/// The role is shutting down.
pub fn stopping() {
    notify("STOPPING=1");
}

/// Keeps systemd's watchdog fed (every half of `WATCHDOG_USEC`) until `shutdown`, from the
/// async runtime itself, so a wedged runtime stops the keep-alives and systemd restarts it. A
/// keep-alive is sent only while no stage of the process is stalled ([`crate::liveness`]): a
/// role that has work and makes no progress is restarted too.
pub fn spawn_watchdog(shutdown: CancellationToken) {
    let Some(usec) = std::env::var("WATCHDOG_USEC").ok().and_then(|v| v.parse::<u64>().ok()) else {
        return;
    };
    let every = Duration::from_micros(usec / 2);
    tokio::spawn(async move {
        let mut withheld = false;
        loop {
            let stalled = crate::liveness::stalled();
            if stalled.is_empty() {
                notify("WATCHDOG=1");
                withheld = false;
            } else if !withheld {
                tracing::error!(stalled = ?stalled, "not feeding the systemd watchdog: a stage is stalled");
                withheld = true;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    });
}
