//! The `processed_events` registry: durable, handler-scoped idempotency with a lease.
//!
//! `claim` decides in one statement (PostgreSQL) or one transaction (SQLite) whether a handler
//! may process an event now. Every later write is guarded by the owner, so a worker that lost
//! its lease cannot overwrite its successor's row. `handler_positions` keeps, per handler and
//! aggregate, the highest sequence done or terminally failed.

use super::DbError;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use std::time::Duration;
use uuid::Uuid;

/// What a claim found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Ours to process; `attempt` counts from 1.
    Claimed { attempt: u32 },
    /// Already done by this handler.
    DuplicateDone,
    /// Someone else holds a fresh lease on it.
    InProgress,
    /// The handler already applied a sequence at or past this one for the aggregate.
    Stale,
    /// Failed after its last attempt: terminal until an operator re-drives it.
    Failed,
}

/// One event for one handler.
#[derive(Debug, Clone)]
pub struct Work<'a> {
    pub handler: &'a str,
    pub event_id: Uuid,
    pub aggregate_id: &'a str,
    pub seq: u64,
    pub owner: &'a str,
}

/// A registry row, for command status.
#[derive(Debug, Clone)]
pub struct Processed {
    pub handler: String,
    pub status: String,
    pub attempt_count: u32,
    pub last_error: Option<String>,
    pub heartbeat_at: Option<DateTime<Utc>>,
}

/// An event a handler gave up on after its last attempt: a dead letter.
#[derive(Debug, Clone, PartialEq)]
pub struct Failed {
    pub event_id: Uuid,
    pub aggregate_id: String,
    pub seq: u64,
    pub attempt_count: u32,
    pub last_error: Option<String>,
    pub failed_at: Option<DateTime<Utc>>,
}

#[async_trait]
pub trait Registry: Send + Sync + 'static {
    async fn claim(&self, work: &Work<'_>, lease: Duration) -> Result<Claim, DbError>;
    /// Refreshes the lease; `false` when it is no longer ours.
    async fn heartbeat(&self, work: &Work<'_>) -> Result<bool, DbError>;
    /// `done`, and the handler's position moves to `seq`; `false` when not ours any more.
    async fn mark_done(&self, work: &Work<'_>) -> Result<bool, DbError>;
    /// Terminal failure. The position does not move: later sequences of the aggregate stay
    /// blocked until an operator re-drives this one, so nothing is applied out of order.
    async fn mark_failed(&self, work: &Work<'_>, error: &str) -> Result<bool, DbError>;
    /// Will be tried again; keeps the claim's owner.
    async fn mark_retrying(&self, work: &Work<'_>, error: &str) -> Result<bool, DbError>;
    /// Gives the lease back at shutdown so another worker can take the event at once.
    async fn release(&self, work: &Work<'_>) -> Result<bool, DbError>;
    /// Every handler's row for an event.
    async fn rows(&self, event_id: Uuid) -> Result<Vec<Processed>, DbError>;
    /// A handler's dead letters by event id, after `after`, at most `limit`.
    async fn failed(&self, handler: &str, after: Option<Uuid>, limit: usize) -> Result<Vec<Failed>, DbError>;
    /// Makes a failed event claimable again (operator re-drive). `true` if it was failed.
    async fn redrive(&self, handler: &str, event_id: Uuid) -> Result<bool, DbError>;
}
