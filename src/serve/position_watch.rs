//! One watcher of the read models' position per process, for `?min_version=N` reads.
//!
//! A waiting read checks its row once, then re-reads it only when the projection position
//! moves; the position is polled by one task for every waiter (every 20 ms, and only while
//! somebody waits), not by each request. So many waiters cost one position query per poll
//! plus one row read per waiter per move, and `serve.max_version_waiters` bounds how many
//! wait at once: past it a read gets 503 with `Retry-After` instead of a place in the queue.

use crate::db::Database;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};

/// How often the watcher asks the database for the position while someone waits.
const POLL: Duration = Duration::from_millis(20);

pub struct PositionWatch {
    position: watch::Sender<u64>,
    /// One permit per waiter: those taken are the reads waiting now.
    slots: Arc<Semaphore>,
    max_waiters: usize,
    wake: Arc<Notify>,
}

/// A waiter's place: it holds one of the slots, which keeps the watcher polling.
pub struct Waiter {
    pub moves: watch::Receiver<u64>,
    _slot: OwnedSemaphorePermit,
}

impl PositionWatch {
    /// Starts the watcher; it stops by itself once the returned handle is gone.
    pub fn start(db: Database, max_waiters: usize) -> Arc<PositionWatch> {
        let watch = Arc::new(PositionWatch {
            position: watch::channel(0).0,
            slots: Arc::new(Semaphore::new(max_waiters)),
            max_waiters,
            wake: Arc::new(Notify::new()),
        });
        tokio::spawn(poll(Arc::downgrade(&watch), db));
        watch
    }

    /// A place among the waiters; `None` when all `serve.max_version_waiters` are taken.
    pub fn join(&self) -> Option<Waiter> {
        let slot = self.slots.clone().try_acquire_owned().ok()?;
        self.wake.notify_one();
        Some(Waiter { moves: self.position.subscribe(), _slot: slot })
    }

    fn anyone_waiting(&self) -> bool {
        self.slots.available_permits() < self.max_waiters
    }
}

/// Polls the position while anyone waits, publishing each change; sleeps while nobody does.
async fn poll(watch: Weak<PositionWatch>, db: Database) {
    loop {
        let Some(w) = watch.upgrade() else { return };
        if !w.anyone_waiting() {
            let wake = w.wake.clone();
            drop(w);
            // A join in between left a permit, so this returns at once. Re-checked every
            // second, so a dropped handle ends the task.
            let _ = tokio::time::timeout(Duration::from_secs(1), wake.notified()).await;
            continue;
        }
        match db.read.live_position().await {
            Ok(p) => {
                w.position.send_if_modified(|old| std::mem::replace(old, p) != p);
            }
            Err(e) => tracing::debug!(error = %e, "cannot read the projection position this round"),
        }
        drop(w);
        tokio::time::sleep(POLL).await;
    }
}
