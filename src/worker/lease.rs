//! How long a claim's lease is known to hold, without asking the registry.
//!
//! A lease is the registry row's `heartbeat_at` plus `worker.lease_ms`; another worker may take
//! the command only once the server's clock passes it. The claim or heartbeat that set
//! `heartbeat_at` ran on the server after this process sent it, so the lease holds for at least
//! `lease_ms` from the moment of sending. [`Confirmed`] keeps that moment, on a clock that also
//! runs while the process is stopped (SIGSTOP) or the machine is suspended, so a worker frozen
//! past its lease finds its confirmation old, not fresh.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// When the lease was last confirmed: the sending time of the last claim or heartbeat the
/// registry accepted.
pub struct Confirmed(AtomicU64);

impl Confirmed {
    /// Confirmed by a statement sent at `sent`.
    pub fn at(sent: Duration) -> Self {
        Confirmed(AtomicU64::new(sent.as_nanos() as u64))
    }

    /// A later confirmation, sent at `sent`; an earlier one arriving late changes nothing.
    pub fn renew(&self, sent: Duration) {
        self.0.fetch_max(sent.as_nanos() as u64, Ordering::Relaxed);
    }

    /// How long ago the last confirmation was sent.
    pub fn age(&self) -> Duration {
        now().saturating_sub(Duration::from_nanos(self.0.load(Ordering::Relaxed)))
    }
}

/// The time since boot, counting time suspended (`CLOCK_BOOTTIME`). Only differences of it
/// mean anything.
#[cfg(target_os = "linux")]
pub fn now() -> Duration {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `t` is a valid timespec for the call to fill; CLOCK_BOOTTIME exists on every
    // Linux spiced supports (2.6.39 and later).
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut t) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_BOOTTIME) failed");
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// Elsewhere the monotonic clock, which runs while the process is stopped.
#[cfg(not(target_os = "linux"))]
pub fn now() -> Duration {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_confirmation_ages_from_its_sending_and_only_a_later_one_renews_it() {
        let sent = now();
        let confirmed = Confirmed::at(sent);
        std::thread::sleep(Duration::from_millis(20));
        assert!(confirmed.age() >= Duration::from_millis(20), "{:?}", confirmed.age());
        confirmed.renew(sent.saturating_sub(Duration::from_secs(60)));
        assert!(confirmed.age() >= Duration::from_millis(20), "an older confirmation does not renew");
        let old = confirmed.age();
        confirmed.renew(now());
        assert!(confirmed.age() < old, "{:?} then {:?}", old, confirmed.age());
    }
}
