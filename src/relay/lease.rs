//! The relay's checkpoint and leader lease, in one row per relay name ([`LeaseTable`]).
//!
//! Acquiring bumps the row's `epoch`; renewing and checkpointing are conditional on
//! (leader, epoch) and an unexpired lease, so a relay that lost its lease can never move the
//! checkpoint again. Locally, the leader treats its lease as valid only until
//! `sent + lease - margin`, where `sent` is when its last successful renewal was *sent*, so it
//! stops producing before PostgreSQL can hand the lease to a standby.

use crate::db::lease::Move;
use crate::db::{DbError, Holder, LeaseTable};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The lease table for one relay name, as seen by one relay process (`me`).
pub struct LeaseStore {
    table: Arc<dyn LeaseTable>,
    name: String,
    me: String,
    lease: Duration,
    margin: Duration,
}

/// A held lease: its epoch and how long this process may act on it.
#[derive(Debug)]
pub struct Lease {
    pub epoch: i64,
    /// The checkpoint when the lease was taken.
    pub position: u64,
    valid_until: Mutex<Instant>,
}

impl Lease {
    /// Whether this process may still produce under the lease.
    pub fn valid(&self) -> bool {
        Instant::now() < *self.valid_until.lock().expect("lease mutex")
    }

    fn extend_from(&self, sent: Instant, lease: Duration, margin: Duration) {
        *self.valid_until.lock().expect("lease mutex") = sent + lease - margin;
    }

    fn revoke(&self) {
        *self.valid_until.lock().expect("lease mutex") = Instant::now();
    }
}

impl LeaseStore {
    /// `margin` is how much before the lease's end this process stops producing: at least the
    /// producer's message timeout, so every message it sent is settled before a standby starts.
    pub fn new(table: Arc<dyn LeaseTable>, name: &str, me: String, lease: Duration, margin: Duration) -> Self {
        LeaseStore { table, name: name.to_string(), me, lease, margin }
    }

    pub fn lease_duration(&self) -> Duration {
        self.lease
    }

    fn holder<'a>(&'a self, lease: &Lease) -> Holder<'a> {
        Holder { name: &self.name, me: &self.me, epoch: lease.epoch }
    }

    /// Takes the lease if it is free or expired (or already ours).
    pub async fn try_acquire(&self) -> Result<Option<Lease>, DbError> {
        let sent = Instant::now();
        let granted = self.table.acquire(&self.name, &self.me, self.lease).await?;
        Ok(granted.map(|(epoch, position)| {
            let lease = Lease { epoch, position, valid_until: Mutex::new(sent) };
            lease.extend_from(sent, self.lease, self.margin);
            lease
        }))
    }

    /// Extends the lease; `false` when it was lost (another relay took it, or it expired).
    pub async fn renew(&self, lease: &Lease) -> Result<bool, DbError> {
        let sent = Instant::now();
        let renewed = self.table.renew(self.holder(lease), self.lease).await?;
        if renewed {
            lease.extend_from(sent, self.lease, self.margin);
        } else {
            lease.revoke();
        }
        Ok(renewed)
    }

    /// Moves the checkpoint forward to `position` (never back); `false` when the lease is lost.
    /// `before_commit` runs with the write done but not committed (a crash point for tests).
    pub async fn checkpoint(&self, lease: &Lease, position: u64, before_commit: &(dyn Fn() + Sync)) -> Result<bool, DbError> {
        self.write_position(lease, position, Move::Forward, before_commit).await
    }

    /// Sets the checkpoint to `position`, backwards too: the operator's `--from-position`.
    pub async fn reset(&self, lease: &Lease, position: u64) -> Result<bool, DbError> {
        self.write_position(lease, position, Move::Anywhere, &|| {}).await
    }

    async fn write_position(&self, lease: &Lease, position: u64, how: Move, before_commit: &(dyn Fn() + Sync)) -> Result<bool, DbError> {
        let written = self.table.write_checkpoint(self.holder(lease), position, how, before_commit).await?;
        if !written {
            lease.revoke();
        }
        Ok(written)
    }

    /// Gives the lease up so a standby can take over at once.
    pub async fn release(&self, lease: &Lease) -> Result<(), DbError> {
        self.table.release(self.holder(lease)).await?;
        lease.revoke();
        Ok(())
    }
}
