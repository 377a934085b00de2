//! Waiting before a retry: exponential backoff with jitter, cut short by shutdown. Every retry
//! loop (relay, workers, projection, log follower, log writer, topic set-up) waits through
//! here, so none hammers a failing dependency in step with its peers, and none outlives a
//! stop.

use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Retry delays from `base` doubling to `cap`, each between half of it and all of it.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

/// The retry of a storage step (a read of the log, a database transaction): 100 ms, doubling
/// to 1 s, so a dependency that comes back is used again within a second.
pub const STORAGE: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));

impl Backoff {
    pub const fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff { base, cap, attempt: 0 }
    }

    /// Waits the next delay, or until `shutdown`.
    pub async fn wait(&mut self, shutdown: &CancellationToken) {
        pause(shutdown, self.next_delay()).await;
    }

    /// The next delay, for a loop that no shutdown ends early.
    pub fn next_delay(&mut self) -> Duration {
        let d = delay(self.base, self.cap, self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    /// After a success: the next failure waits `base` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// The delay before retry number `attempt` (0 for the first): `base * 2^attempt` capped at
/// `cap`, the upper half of it drawn at random so that peers retrying together spread out.
pub fn delay(base: Duration, cap: Duration, attempt: u32) -> Duration {
    let full = base.saturating_mul(1u32 << attempt.min(16)).min(cap);
    let half = full.as_millis() as u64 / 2;
    Duration::from_millis(half + jitter(half))
}

/// Sleeps for `duration`, or until `shutdown`.
pub async fn pause(shutdown: &CancellationToken, duration: Duration) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(duration) => {}
    }
}

/// A cheap jitter in `0..=max` from the clock's nanoseconds; no RNG dependency needed.
fn jitter(max: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    if max == 0 { 0 } else { nanos % (max + 1) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_within_their_upper_half() {
        let (base, cap) = (Duration::from_millis(100), Duration::from_secs(5));
        for (attempt, full) in [(0, 100), (1, 200), (3, 800), (6, 5000), (40, 5000)] {
            let d = delay(base, cap, attempt).as_millis() as u64;
            assert!((full / 2..=full).contains(&d), "attempt {attempt}: {d} ms, not in {}..={full}", full / 2);
        }
    }
}
