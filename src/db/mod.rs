//! The write-side database: sequence allocation, the log index and (for the workers) the
//! processed-events registry. PostgreSQL in production, SQLite embedded; both behind the same
//! traits and the same conformance tests.
//!
//! Nothing here is an event store: every row can be rebuilt from the log, which stays the truth.

pub mod liveness;
pub mod pg_tls;
pub mod postgres;
pub mod read;
pub mod registry;
pub mod sqlite;

use crate::config::DatabaseConfig;
use crate::domain::AggregateKey;
use crate::envelope::Kind;
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::Arc;
use uuid::Uuid;

/// Database failures. All of them are infrastructure failures (retry or 503), except
/// `Inconsistent`, which means the index disagrees with the log and needs an operator.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("postgres: {}", postgres_detail(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("postgres pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database setup: {0}")]
    Setup(String),
    #[error("index is inconsistent: {0}")]
    Inconsistent(String),
}

impl DbError {
    /// Whether the database refused the statement for the data it carries, so that sending it
    /// again fails the same way however long one waits: a NUL in text or jsonb, a value out of
    /// range, a constraint, a jsonb or index row over a size limit. A role that retries such a
    /// statement for ever stops on one event; it must set the event aside instead. Everything
    /// else (connection, pool, timeout, serialization failure, deadlock, disk full) may pass
    /// on a retry.
    pub fn refuses_content(&self) -> bool {
        match self {
            DbError::Postgres(e) => e.as_db_error().is_some_and(|db| refusing_sqlstate(db.code().code())),
            DbError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => refusing_sqlite(e.code),
            DbError::Sqlite(rusqlite::Error::ToSqlConversionFailure(_)) => true,
            _ => false,
        }
    }
}

/// PostgreSQL SQLSTATE classes 22 (data exception), 23 (integrity constraint violation), 42
/// (syntax or access rule) and 54 (program limit exceeded). A missing table, column, function
/// or privilege is class 42 too, but it is the schema or the grants that are wrong, not the
/// event: every event would fail alike, and setting them all aside would empty the read models.
fn refusing_sqlstate(code: &str) -> bool {
    use tokio_postgres::error::SqlState;
    let environment = [
        SqlState::UNDEFINED_TABLE,
        SqlState::UNDEFINED_COLUMN,
        SqlState::UNDEFINED_FUNCTION,
        SqlState::UNDEFINED_OBJECT,
        SqlState::INSUFFICIENT_PRIVILEGE,
    ];
    if environment.iter().any(|s| s.code() == code) {
        return false;
    }
    matches!(code.get(..2), Some("22" | "23" | "42" | "54"))
}

/// SQLite's equivalents: a constraint (or a trigger's `RAISE(ABORT, ...)`), a string or blob
/// over the length limit, a datatype mismatch.
fn refusing_sqlite(code: rusqlite::ErrorCode) -> bool {
    use rusqlite::ErrorCode;
    matches!(code, ErrorCode::ConstraintViolation | ErrorCode::TooBig | ErrorCode::TypeMismatch)
}

/// Text the database can store: PostgreSQL refuses U+0000 in `text`, so an error message or
/// an id that echoes one is stored with U+FFFD in its place.
pub fn storable(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        std::borrow::Cow::Owned(text.replace('\0', "\u{FFFD}"))
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

/// The server's message when there is one ("db error" alone says nothing).
fn postgres_detail(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

/// The index of the log kept beside it: where each event is, each aggregate's current
/// sequence, and the head position. Writers change it only inside an [`IndexTx`].
#[async_trait]
pub trait LogIndex: Send + Sync + 'static {
    /// Starts a batch: takes the log-head lock (serialising every writer of every process) and
    /// reads the next free position.
    async fn begin(&self) -> Result<Box<dyn IndexTx>, DbError>;
    /// The last position recorded in the index.
    async fn head(&self) -> Result<u64, DbError>;
    /// An aggregate's sequence: its count of accepted commands (0 if none).
    async fn version(&self, key: &AggregateKey) -> Result<u64, DbError>;
    /// `(seq, position)` of an aggregate's envelopes of one kind with seq in `from..=to`.
    async fn positions(
        &self,
        key: &AggregateKey,
        kind: Kind,
        from: u64,
        to: u64,
    ) -> Result<Vec<(u64, u64)>, DbError>;
    /// The index rows of a command (several for a bulk command), in (aggregate, seq) order.
    async fn command(&self, command_id: Uuid) -> Result<Vec<IndexRow>, DbError>;
    /// The outcome (domain) rows answering a command.
    async fn outcomes(&self, command_id: Uuid) -> Result<Vec<IndexRow>, DbError>;
    /// The log position of an event.
    async fn position_of(&self, event_id: Uuid) -> Result<Option<u64>, DbError>;
    /// The highest command sequence of an aggregate written before `position`.
    async fn command_seq_before(&self, key: &AggregateKey, position: u64) -> Result<u64, DbError>;
    /// `(seq, position)` of an aggregate's last envelope of `kind`.
    async fn last(&self, key: &AggregateKey, kind: Kind) -> Result<Option<(u64, u64)>, DbError>;
    /// Aggregates of a type whose id starts with `prefix`, with at least one envelope.
    async fn aggregates_with_prefix(
        &self,
        aggregate_type: crate::domain::AggregateType,
        prefix: &str,
    ) -> Result<Vec<String>, DbError>;
    /// Reachability, for readiness probes.
    async fn ping(&self) -> Result<(), DbError>;
    /// How many envelopes are at positions after `position` (the relay's lag in events). An
    /// index range scan: its cost grows with the answer, not with the log.
    async fn events_after(&self, position: u64) -> Result<u64, DbError>;
    /// Every index row, in position order (for `spiced verify`).
    async fn all_rows(&self) -> Result<Vec<IndexRow>, DbError>;
    /// Every aggregate's version (for `spiced verify`).
    async fn all_versions(&self) -> Result<HashMap<AggregateKey, u64>, DbError>;
}

/// A batch in progress, holding the log-head lock until commit or rollback. Dropping it
/// without either rolls back.
#[async_trait]
pub trait IndexTx: Send {
    /// The position this batch will write: one past the recorded head.
    fn next_position(&self) -> u64;
    /// What a batch needs to know before it is planned, read under the head lock.
    async fn lookup(&mut self, request: &LookupRequest) -> Result<Lookup, DbError>;
    /// Records a written segment: head = `position`, index rows inserted, versions raised.
    async fn record(&mut self, position: u64, rows: &[IndexRow]) -> Result<(), DbError>;
    async fn commit(self: Box<Self>) -> Result<(), DbError>;
    async fn rollback(self: Box<Self>) -> Result<(), DbError>;
}

/// The ids and aggregates a batch asks about.
#[derive(Debug, Default)]
pub struct LookupRequest {
    /// Command ids that may have been appended before (client-chosen ids).
    pub command_ids: Vec<Uuid>,
    /// Event ids of outcome envelopes, stored at most once.
    pub event_ids: Vec<Uuid>,
    /// Aggregates whose command version is needed.
    pub command_keys: Vec<AggregateKey>,
    /// Aggregates whose last outcome sequence is needed.
    pub outcome_keys: Vec<AggregateKey>,
}

/// The answer to a [`LookupRequest`].
#[derive(Debug, Default)]
pub struct Lookup {
    /// Command rows of `command_ids` and rows of any kind for `event_ids`.
    pub rows: Vec<IndexRow>,
    /// Command version per aggregate (absent = 0).
    pub versions: HashMap<AggregateKey, u64>,
    /// Sequence of the last outcome per aggregate (absent = none yet).
    pub outcomes: HashMap<AggregateKey, u64>,
}

/// One envelope's row in the log index: where it is, and what it answered for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexRow {
    pub event_id: Uuid,
    pub command_id: Uuid,
    pub fingerprint: String,
    pub key: AggregateKey,
    pub kind: Kind,
    pub seq: u64,
    pub position: u64,
}

/// `[prefix, prefix + 1)` in byte order: every string starting with `prefix`.
pub fn prefix_range(prefix: &str) -> (String, String) {
    let mut high = prefix.as_bytes().to_vec();
    while let Some(last) = high.pop() {
        if last < 0xff {
            high.push(last + 1);
            break;
        }
    }
    (prefix.to_string(), String::from_utf8_lossy(&high).into_owned())
}

/// The embedded workers' cursor over the log (`spiced dev`), a named checkpoint in
/// `relay_state`.
pub const EMBEDDED_WORKERS_CHECKPOINT: &str = "embedded-workers";

/// An open database: the log index over PostgreSQL or SQLite.
#[derive(Clone)]
pub struct Database {
    pub index: Arc<dyn LogIndex>,
    pub registry: Arc<dyn registry::Registry>,
    pub(crate) backend: Backend,
}

#[derive(Clone)]
pub(crate) enum Backend {
    Postgres(postgres::Pg),
    Sqlite(sqlite::Lite),
}

impl Database {
    /// Connects (creating the SQLite file if needed) without touching the schema.
    pub async fn open(config: &DatabaseConfig) -> Result<Database, DbError> {
        let url = config.url.expose();
        if let Some(path) = url.strip_prefix("sqlite://") {
            let lite = sqlite::Lite::open(path)?;
            let registry = Arc::new(registry::lite::LiteRegistry { conn: lite.connection() });
            Ok(Database { index: Arc::new(lite.clone()), registry, backend: Backend::Sqlite(lite) })
        } else {
            let pg = postgres::Pg::connect(url, config.pool_size)?;
            let registry = Arc::new(registry::pg::PgRegistry { pool: pg.pool().clone() });
            Ok(Database { index: Arc::new(pg.clone()), registry, backend: Backend::Postgres(pg) })
        }
    }

    /// Applies pending migrations; returns the names of those applied now.
    pub async fn migrate(&self) -> Result<Vec<String>, DbError> {
        match &self.backend {
            Backend::Postgres(pg) => pg.migrate().await,
            Backend::Sqlite(lite) => lite.migrate().await,
        }
    }

    /// A named cursor over the log (embedded workers and projections), 0 if never set.
    pub async fn checkpoint(&self, name: &str) -> Result<u64, DbError> {
        match &self.backend {
            Backend::Postgres(pg) => {
                let client = pg.pool().get().await?;
                let row = client
                    .query_opt("SELECT position FROM relay_state WHERE name = $1", &[&name])
                    .await?;
                Ok(row.map(|r| r.get::<_, i64>(0) as u64).unwrap_or(0))
            }
            Backend::Sqlite(lite) => {
                use rusqlite::OptionalExtension;
                let conn = lite.connection();
                let conn = conn.lock().await;
                let p: Option<i64> = conn
                    .query_row("SELECT position FROM relay_state WHERE name = ?1", [name], |r| r.get(0))
                    .optional()?;
                Ok(p.unwrap_or(0) as u64)
            }
        }
    }

    /// Moves a named cursor forward (never back).
    pub async fn set_checkpoint(&self, name: &str, position: u64) -> Result<(), DbError> {
        match &self.backend {
            Backend::Postgres(pg) => {
                let client = pg.pool().get().await?;
                client
                    .execute(
                        "INSERT INTO relay_state (name, position) VALUES ($1, $2) \
                         ON CONFLICT (name) DO UPDATE SET position = GREATEST(relay_state.position, EXCLUDED.position), updated_at = now()",
                        &[&name, &(position as i64)],
                    )
                    .await?;
            }
            Backend::Sqlite(lite) => {
                let conn = lite.connection();
                let conn = conn.lock().await;
                conn.execute(
                    "INSERT INTO relay_state (name, position) VALUES (?1, ?2) \
                     ON CONFLICT (name) DO UPDATE SET position = max(position, excluded.position)",
                    rusqlite::params![name, position as i64],
                )?;
            }
        }
        Ok(())
    }

    /// The PostgreSQL pool, for roles that need PostgreSQL itself (the relay's lease).
    pub fn postgres(&self) -> Option<&postgres::Pg> {
        match &self.backend {
            Backend::Postgres(pg) => Some(pg),
            Backend::Sqlite(_) => None,
        }
    }

    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::Postgres(_) => "postgres",
            Backend::Sqlite(_) => "sqlite",
        }
    }
}

/// A migration: a name and its SQL, applied once, in order, recorded in `spiced_migrations`.
pub struct Migration {
    pub name: &'static str,
    pub sql: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_errors_are_told_from_infrastructure_errors() {
        // NUL in jsonb, NUL in text, unique/check violation, too-big jsonb or index row.
        for code in ["22P05", "22021", "23505", "23514", "54000", "42804"] {
            assert!(refusing_sqlstate(code), "{code}");
        }
        // Serialization failure, deadlock, connection, admin shutdown, disk full, a missing
        // table or privilege (the schema, not the event).
        for code in ["40001", "40P01", "08006", "57P01", "53100", "42P01", "42703", "42501"] {
            assert!(!refusing_sqlstate(code), "{code}");
        }
        let sqlite = |code: i32| DbError::Sqlite(rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None));
        assert!(sqlite(rusqlite::ffi::SQLITE_CONSTRAINT_TRIGGER).refuses_content());
        assert!(sqlite(rusqlite::ffi::SQLITE_TOOBIG).refuses_content());
        assert!(sqlite(rusqlite::ffi::SQLITE_MISMATCH).refuses_content());
        assert!(!sqlite(rusqlite::ffi::SQLITE_BUSY).refuses_content());
        assert!(!sqlite(rusqlite::ffi::SQLITE_IOERR).refuses_content());
        assert!(!DbError::Setup("x".into()).refuses_content());
        assert!(!DbError::Inconsistent("x".into()).refuses_content());
    }

    #[test]
    fn storable_text_has_no_nul() {
        assert_eq!(storable("a\0b"), "a\u{FFFD}b");
        assert!(matches!(storable("plain"), std::borrow::Cow::Borrowed("plain")));
    }
}
