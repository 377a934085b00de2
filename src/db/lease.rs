//! The relay's leader lease, in its `relay_state` row: one leader per relay name at a time.
//!
//! Acquiring bumps the row's `epoch`; renewing and writing the checkpoint are conditional on
//! (leader, epoch) and an unexpired lease, judged by the database's clock, so a relay that lost
//! its lease can never move the checkpoint again. How long the holder itself trusts its lease
//! is the relay's business (`relay::lease`).

use super::DbError;
use async_trait::async_trait;
use std::time::Duration;

/// Who holds a lease: the relay name, the process, and the epoch it was granted.
#[derive(Debug, Clone, Copy)]
pub struct Holder<'a> {
    pub name: &'a str,
    pub me: &'a str,
    pub epoch: i64,
}

/// How a checkpoint write may move the position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Move {
    /// Never back (the relay's progress).
    Forward,
    /// Anywhere (the operator's `--from-position`).
    Anywhere,
}

#[async_trait]
pub trait LeaseTable: Send + Sync + 'static {
    /// Grants `me` the lease of `name` for `lease` when it is free, expired or already `me`'s,
    /// bumping its epoch: `(epoch, checkpoint)`; `None` while another process holds it.
    async fn acquire(&self, name: &str, me: &str, lease: Duration) -> Result<Option<(i64, u64)>, DbError>;
    /// Extends an unexpired lease by `lease` from now; `false` when the holder lost it.
    async fn renew(&self, holder: Holder<'_>, lease: Duration) -> Result<bool, DbError>;
    /// Writes the checkpoint under an unexpired lease; `false` when the holder lost it (or, for
    /// `Move::Forward`, the position would go back). `before_commit` runs with the write done
    /// but not committed (a crash point for tests).
    async fn write_checkpoint(
        &self,
        holder: Holder<'_>,
        position: u64,
        how: Move,
        before_commit: &(dyn Fn() + Sync),
    ) -> Result<bool, DbError>;
    /// Ends the lease at once, so a standby can take over.
    async fn release(&self, holder: Holder<'_>) -> Result<(), DbError>;
}
