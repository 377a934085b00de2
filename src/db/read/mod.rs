//! The read models: one row per database, class and instance, versioned by the aggregate's
//! sequence so that replays, duplicates and reordering converge on the same state.
//!
//! They live in a schema of their own (`spiced_read` on PostgreSQL; tables named
//! `spiced_read__*` on SQLite), never in the registry's tables: a rebuild fills a fresh schema
//! from the log and swaps it in by renaming, so every statement names its tables through
//! [`ReadSchema`] and is sent unprepared (a cached plan could outlive the rename).
//!
//! This module holds the contract ([`ReadStore`]) and what does not depend on the backend (the
//! rows, the batch's order of application, the filter language); the SQL is in
//! [`crate::db::postgres`] and [`crate::db::sqlite`], held to the contract by
//! `tests/read_conformance.rs`.

pub(crate) mod batch;
pub(crate) mod failures;
pub mod filter;
pub(crate) mod query;
pub(crate) mod release;
pub mod search;
pub mod sort;

pub use batch::{Applied, Change, Progress, ReadBatch, Refused};
pub use failures::ProjectionFailure;
pub use query::{Page, Reference, Snapshot};

use super::DbError;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde_json::Value;

/// The schema the query API reads and the live projection writes.
pub const LIVE_SCHEMA: &str = "spiced_read";

/// The projection's handler name in `processed_events` (Kafka mode).
pub const HANDLER: &str = "projection";

/// What a row is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReadKind {
    Database,
    Class,
    Instance,
}

impl ReadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ReadKind::Database => "database",
            ReadKind::Class => "class",
            ReadKind::Instance => "instance",
        }
    }
}

/// One read-model row.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadRow {
    pub kind: ReadKind,
    /// The aggregate id.
    pub key: String,
    /// What the row is listed under: '' for databases, `db:branch` for classes,
    /// `db:branch:class` for instances.
    pub parent: String,
    /// The database the row belongs to (its own key for a database).
    pub db: String,
    /// The full state after the event; `None` once deleted.
    pub state: Option<Value>,
    /// The aggregate sequence of the last event applied.
    pub version: u64,
    /// The log position of that event.
    pub position: u64,
    pub deleted: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A named set of read-model tables: the live one or a rebuild's target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadSchema(String);

impl ReadSchema {
    pub fn live() -> Self {
        ReadSchema(LIVE_SCHEMA.into())
    }

    /// A schema name: lowercase letters, digits and `_`, starting with a letter, at most 48
    /// characters (it is spliced into SQL, so nothing else is accepted).
    pub fn named(name: &str) -> Result<Self, DbError> {
        let ok = name.len() <= 48
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !ok {
            return Err(DbError::Setup(format!(
                "schema name {name:?}: use 1-48 lowercase letters, digits or _, starting with a letter"
            )));
        }
        Ok(ReadSchema(name.into()))
    }

    pub fn name(&self) -> &str {
        &self.0
    }

    /// The schema queries read (any other is a rebuild's, until it is swapped in).
    pub fn is_live(&self) -> bool {
        self.0 == LIVE_SCHEMA
    }
}

/// `template` with its table placeholders (`{rm}` read models, `{proj}` projection, `{parts}`
/// partitions) replaced by a backend's names of the schema's tables.
pub(crate) fn spliced(template: &str, table: impl Fn(&str) -> String) -> String {
    template
        .replace("{rm}", &table("read_models"))
        .replace("{proj}", &table("projection"))
        .replace("{parts}", &table("projection_partitions"))
}

/// The rebuild's catch-up: the batches of the log positions `from..=to`.
pub type CatchUp<'a> = dyn Fn(u64, u64) -> BoxFuture<'a, Result<Vec<ReadBatch>, DbError>> + Send + Sync + 'a;

/// The read models of one backend.
///
/// Applying is equivalent to applying the events one by one in log order, whatever order
/// batches arrive in (Kafka partitions interleave): within a batch, databases first (a deleted
/// database records the log position of its deletion), then the deletion cascades (classes and
/// instances of that database written before it are removed), then classes and instances, each
/// refused when its database was deleted after it. A batch the store refuses for its content
/// ([`DbError::refuses_content`]) is applied again in the same transaction one change at a time,
/// each in a savepoint, in the same order; the changes it refuses are set aside in
/// `projection_failures` and the rest commits with the batch's progress, so one event can
/// never hold the projection back. Any other error fails the batch whole (the caller retries).
#[async_trait]
pub trait ReadStore: Send + Sync + 'static {
    /// Applies a batch to `schema` and records its progress, atomically. The part of a
    /// `Progress::Log` batch at or below the schema's position is skipped (already applied, or
    /// a rebuilt schema was swapped in ahead of this follower).
    async fn apply(&self, schema: &ReadSchema, batch: &ReadBatch) -> Result<Applied, DbError>;
    /// One row of the live schema, deleted or not (a deleted row still has its version).
    async fn one(&self, kind: ReadKind, key: &str) -> Result<Snapshot, DbError>;
    /// A page of the live schema.
    async fn page(&self, page: &Page<'_>) -> Result<Snapshot, DbError>;
    /// How many live rows the page's kind, parent and filter match (whatever its cursor and
    /// limit), counting no further than `bound + 1`: a count never reads the whole class.
    async fn count(&self, page: &Page<'_>, bound: u64) -> Result<u64, DbError>;
    /// A page, in key order after `after`, of the live instances whose data names `id` in one
    /// of `refs` (each the parent key of a class and one of its property names): the
    /// instances referencing `id`.
    async fn referencing(&self, refs: &[Reference], id: &str, after: Option<&str>, limit: usize) -> Result<Snapshot, DbError>;
    /// How far `schema` has applied the log: every outcome event at or below this position is
    /// in it, or recorded as refused in `projection_failures`.
    async fn position(&self, schema: &ReadSchema) -> Result<u64, DbError>;
    /// The events `schema` is missing because the store refused them, in log order.
    async fn failures(&self, schema: &ReadSchema) -> Result<Vec<ProjectionFailure>, DbError>;
    /// Applies a set-aside event again to `schema` (read from the log, which keeps it) through
    /// the same versioned upsert as any late event: a newer version of the row already applied
    /// wins. `None` when it applied (its failure row is deleted), else the new refusal (its row
    /// keeps it, one attempt more).
    async fn reapply(&self, schema: &ReadSchema, change: &Change) -> Result<Option<Refused>, DbError>;
    /// Creates the schema's tables where missing; a rebuild target's without the indexes only
    /// queries use, which [`ReadStore::complete`] builds.
    async fn create_tables(&self, schema: &ReadSchema) -> Result<(), DbError>;
    /// Builds the indexes only queries use on a rebuild target, once it is filled: one bulk
    /// build each instead of one insert per row (the swap builds any a late class needs).
    async fn complete(&self, _schema: &ReadSchema) -> Result<(), DbError> {
        Ok(())
    }
    async fn schema_exists(&self, schema: &ReadSchema) -> Result<bool, DbError>;
    /// Exchanges `target` and the live schema (the old live tables end up under the target's
    /// name), after catching the target up to the log head, in one transaction: it blocks the
    /// live projection, reads the log head, applies to the target what `catch_up` returns
    /// beyond the target's position (the live projection can only have applied events at or
    /// below that head), carries over the live Kafka partition positions, and exchanges the
    /// two names and those of their recorded failures (each schema keeps the list of events it
    /// is missing). Queries read the live schema until the commit. Returns the live position
    /// afterwards and the catch-up's refused events (recorded, like any).
    async fn swap(&self, target: &ReadSchema, catch_up: &CatchUp<'_>) -> Result<Applied, DbError>;

    /// Creates a rebuild target; refuses a name already in use.
    async fn create_schema(&self, schema: &ReadSchema) -> Result<(), DbError> {
        if self.schema_exists(schema).await? {
            return Err(DbError::Setup(format!(
                "schema {} already exists; pick another --target-schema or drop it first",
                schema.name()
            )));
        }
        self.create_tables(schema).await
    }

    /// The live schema's position.
    async fn live_position(&self) -> Result<u64, DbError> {
        self.position(&ReadSchema::live()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_checked_before_they_reach_sql() {
        assert!(ReadSchema::named("spiced_read_2026").is_ok());
        for bad in ["", "Spiced", "1abc", "a-b", "a\"; DROP TABLE x; --", &"a".repeat(49)] {
            assert!(ReadSchema::named(bad).is_err(), "{bad:?} accepted");
        }
    }
}
