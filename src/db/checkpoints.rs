//! Named cursors over the log, in `relay_state`: the relay's checkpoint (written under its
//! lease, see [`super::lease`]) and the embedded workers' cursor. A cursor only moves forward.

use super::DbError;
use async_trait::async_trait;

/// The embedded workers' cursor over the log (`spiced dev`).
pub const EMBEDDED_WORKERS_CHECKPOINT: &str = "embedded-workers";

#[async_trait]
pub trait Checkpoints: Send + Sync + 'static {
    /// The cursor's position; `None` when it was never set.
    async fn get(&self, name: &str) -> Result<Option<u64>, DbError>;
    /// Moves the cursor forward to `position` (never back), creating it if needed.
    async fn advance(&self, name: &str, position: u64) -> Result<(), DbError>;
    /// The cursor's position, 0 when never set.
    async fn position(&self, name: &str) -> Result<u64, DbError> {
        Ok(self.get(name).await?.unwrap_or(0))
    }
}
