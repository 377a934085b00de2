//! The `stage_liveness` table: what each running stage of each process last reported about
//! its progress, so `spiced status` can show every role of a deployment from one place.

use super::DbError;
use async_trait::async_trait;
use chrono::{DateTime, Utc};

/// One stage of one process, as last reported.
#[derive(Debug, Clone, PartialEq)]
pub struct StageReport {
    pub stage: String,
    /// The process: `host-pid`.
    pub instance: String,
    pub progressed_at: DateTime<Utc>,
    pub work_waiting: bool,
    pub stalled: bool,
    pub last_error: Option<String>,
    pub reported_at: DateTime<Utc>,
    /// The log position the stage has reached (relay: published; worker role: the last
    /// command it finished; projection: applied); `None` before it has one.
    pub position: Option<u64>,
}

#[async_trait]
pub trait StageTable: Send + Sync + 'static {
    /// Records what `reports` say (one row per stage and process, replaced each time).
    async fn report(&self, reports: &[StageReport]) -> Result<(), DbError>;
    /// Removes a stopped process's rows.
    async fn forget(&self, instance: &str) -> Result<(), DbError>;
    /// Every reported stage, by stage and process.
    async fn all(&self) -> Result<Vec<StageReport>, DbError>;
}
