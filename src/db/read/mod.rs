//! The read models: one row per database, class and instance, versioned by the aggregate's
//! sequence so that replays, duplicates and reordering converge on the same state.
//!
//! They live in a schema of their own (`spiced_read` on PostgreSQL; tables named
//! `spiced_read__*` on SQLite), never in the registry's tables: a rebuild fills a fresh schema
//! from the log and swaps it in by renaming, so every statement here names its tables through
//! [`ReadSchema`] and is sent unprepared (a cached plan could outlive the rename).

mod apply;
mod failures;
pub mod filter;
mod query;
mod swap;

pub use apply::{Applied, Change, Progress, ReadBatch};
pub use apply::Refused;
pub use failures::ProjectionFailure;
pub use query::{Page, Snapshot};

use super::DbError;
use chrono::{DateTime, Utc};
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

    /// The qualified name of one of the schema's tables.
    fn pg(&self, table: &str) -> String {
        format!("\"{}\".{table}", self.0)
    }

    fn lite(&self, table: &str) -> String {
        format!("\"{}__{table}\"", self.0)
    }

    /// DDL creating the schema's tables if they do not exist (PostgreSQL).
    pub fn pg_ddl(&self) -> String {
        let s = &self.0;
        format!(
            "CREATE SCHEMA IF NOT EXISTS \"{s}\";
             CREATE TABLE IF NOT EXISTS \"{s}\".read_models (
                 kind text COLLATE \"C\" NOT NULL,
                 key text COLLATE \"C\" NOT NULL,
                 parent text COLLATE \"C\" NOT NULL,
                 db text COLLATE \"C\" NOT NULL,
                 state jsonb,
                 version bigint NOT NULL,
                 position bigint NOT NULL,
                 cascade_position bigint NOT NULL DEFAULT 0,
                 deleted boolean NOT NULL DEFAULT false,
                 created_at timestamptz NOT NULL,
                 updated_at timestamptz NOT NULL,
                 PRIMARY KEY (kind, key));
             CREATE INDEX IF NOT EXISTS read_models_page ON \"{s}\".read_models (kind, parent, key) WHERE NOT deleted;
             CREATE INDEX IF NOT EXISTS read_models_db ON \"{s}\".read_models (db);
             CREATE INDEX IF NOT EXISTS read_models_data ON \"{s}\".read_models
                 USING gin ((state -> 'data') jsonb_path_ops) WHERE kind = 'instance';
             CREATE TABLE IF NOT EXISTS \"{s}\".projection (
                 id int PRIMARY KEY CHECK (id = 1), position bigint NOT NULL);
             INSERT INTO \"{s}\".projection VALUES (1, 0) ON CONFLICT DO NOTHING;
             CREATE TABLE IF NOT EXISTS \"{s}\".projection_partitions (
                 topic text NOT NULL, partition int NOT NULL, position bigint NOT NULL,
                 PRIMARY KEY (topic, partition));"
        )
    }

    /// DDL creating the schema's tables if they do not exist (SQLite).
    pub fn lite_ddl(&self) -> String {
        let s = &self.0;
        format!(
            "CREATE TABLE IF NOT EXISTS \"{s}__read_models\" (
                 kind TEXT NOT NULL, key TEXT NOT NULL, parent TEXT NOT NULL, db TEXT NOT NULL,
                 state TEXT, version INTEGER NOT NULL, position INTEGER NOT NULL,
                 cascade_position INTEGER NOT NULL DEFAULT 0, deleted INTEGER NOT NULL DEFAULT 0,
                 created_at TEXT NOT NULL, updated_at TEXT NOT NULL,
                 PRIMARY KEY (kind, key));
             CREATE INDEX IF NOT EXISTS \"{s}__read_models_page\" ON \"{s}__read_models\" (kind, parent, key) WHERE deleted = 0;
             CREATE INDEX IF NOT EXISTS \"{s}__read_models_db\" ON \"{s}__read_models\" (db);
             CREATE TABLE IF NOT EXISTS \"{s}__projection\" (
                 id INTEGER PRIMARY KEY CHECK (id = 1), position INTEGER NOT NULL);
             INSERT INTO \"{s}__projection\" VALUES (1, 0) ON CONFLICT DO NOTHING;
             CREATE TABLE IF NOT EXISTS \"{s}__projection_partitions\" (
                 topic TEXT NOT NULL, partition INTEGER NOT NULL, position INTEGER NOT NULL,
                 PRIMARY KEY (topic, partition));"
        )
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
