//! The relay's checkpoint and leader lease, in one PostgreSQL row per relay name.
//!
//! Acquiring bumps the row's `epoch`; renewing and checkpointing are conditional on
//! (leader, epoch) and an unexpired lease, so a relay that lost its lease can never move the
//! checkpoint again. Locally, the leader treats its lease as valid only until
//! `sent + lease - margin`, where `sent` is when its last successful renewal was *sent*, so it
//! stops producing before PostgreSQL can hand the lease to a standby.

use crate::db::DbError;
use deadpool_postgres::Pool;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const ACQUIRE: &str = "INSERT INTO relay_state AS r (name, epoch, leader, lease_until) \
     VALUES ($1, 1, $2, now() + $3::int8 * interval '1 millisecond') \
     ON CONFLICT (name) DO UPDATE SET epoch = r.epoch + 1, leader = EXCLUDED.leader, \
         lease_until = EXCLUDED.lease_until, updated_at = now() \
     WHERE r.lease_until IS NULL OR r.lease_until < now() OR r.leader = EXCLUDED.leader \
     RETURNING epoch, position";
const RENEW: &str = "UPDATE relay_state SET lease_until = now() + $4::int8 * interval '1 millisecond' \
     WHERE name = $1 AND leader = $2 AND epoch = $3 AND lease_until > now()";
const CHECKPOINT: &str = "UPDATE relay_state SET position = $4, updated_at = now() \
     WHERE name = $1 AND leader = $2 AND epoch = $3 AND lease_until > now() AND position <= $4";
const SET_POSITION: &str = "UPDATE relay_state SET position = $4, updated_at = now() \
     WHERE name = $1 AND leader = $2 AND epoch = $3 AND lease_until > now()";
const RELEASE: &str =
    "UPDATE relay_state SET lease_until = NULL WHERE name = $1 AND leader = $2 AND epoch = $3";
const READ: &str = "SELECT position FROM relay_state WHERE name = $1";

/// The lease table for one relay name, as seen by one relay process (`me`).
pub struct LeaseStore {
    pool: Pool,
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
    pub fn new(pool: Pool, name: &str, me: String, lease: Duration, margin: Duration) -> Self {
        LeaseStore { pool, name: name.to_string(), me, lease, margin }
    }

    pub fn lease_duration(&self) -> Duration {
        self.lease
    }

    fn ms(&self) -> i64 {
        self.lease.as_millis() as i64
    }

    /// Takes the lease if it is free or expired (or already ours).
    pub async fn try_acquire(&self) -> Result<Option<Lease>, DbError> {
        let client = self.pool.get().await?;
        let sent = Instant::now();
        let row = client.query_opt(ACQUIRE, &[&self.name, &self.me, &self.ms()]).await?;
        Ok(row.map(|r| {
            let lease = Lease {
                epoch: r.get(0),
                position: r.get::<_, i64>(1) as u64,
                valid_until: Mutex::new(sent),
            };
            lease.extend_from(sent, self.lease, self.margin);
            lease
        }))
    }

    /// Extends the lease; `false` when it was lost (another relay took it, or it expired).
    pub async fn renew(&self, lease: &Lease) -> Result<bool, DbError> {
        let client = self.pool.get().await?;
        let sent = Instant::now();
        let n = client
            .execute(RENEW, &[&self.name, &self.me, &lease.epoch, &self.ms()])
            .await?;
        if n == 1 {
            lease.extend_from(sent, self.lease, self.margin);
        } else {
            lease.revoke();
        }
        Ok(n == 1)
    }

    /// Moves the checkpoint forward to `position` (never back); `false` when the lease is lost.
    /// `before_commit` runs with the write done but not committed (a crash point for tests).
    pub async fn checkpoint(
        &self,
        lease: &Lease,
        position: u64,
        before_commit: impl FnOnce(),
    ) -> Result<bool, DbError> {
        self.write_position(lease, CHECKPOINT, position, before_commit).await
    }

    /// Sets the checkpoint to `position`, backwards too: the operator's `--from-position`.
    pub async fn reset(&self, lease: &Lease, position: u64) -> Result<bool, DbError> {
        self.write_position(lease, SET_POSITION, position, || {}).await
    }

    async fn write_position(
        &self,
        lease: &Lease,
        sql: &str,
        position: u64,
        before_commit: impl FnOnce(),
    ) -> Result<bool, DbError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let n = tx
            .execute(sql, &[&self.name, &self.me, &lease.epoch, &(position as i64)])
            .await?;
        before_commit();
        tx.commit().await?;
        if n == 0 {
            lease.revoke();
        }
        Ok(n == 1)
    }

    /// Gives the lease up so a standby can take over at once.
    pub async fn release(&self, lease: &Lease) -> Result<(), DbError> {
        let client = self.pool.get().await?;
        client.execute(RELEASE, &[&self.name, &self.me, &lease.epoch]).await?;
        lease.revoke();
        Ok(())
    }

    /// The stored checkpoint, if any.
    pub async fn position(&self) -> Result<Option<u64>, DbError> {
        let client = self.pool.get().await?;
        let row = client.query_opt(READ, &[&self.name]).await?;
        Ok(row.map(|r| r.get::<_, i64>(0) as u64))
    }
}
