//! The database beside the log: sequence allocation and the log index, the processed-events
//! registry, the read models, named checkpoints, the relay's lease and the stages' liveness
//! reports. Each is a small trait ([`LogIndex`], [`Registry`], [`ReadStore`], [`Checkpoints`],
//! [`LeaseTable`], [`StageTable`]); [`postgres`] (production) and [`sqlite`] (embedded)
//! implement every one, and a conformance suite per trait in `tests/` holds both backends to
//! the same behaviour. [`Database::open`] is the one place that picks a backend.
//!
//! Nothing here is an event store: every row can be rebuilt from the log, which stays the truth.

pub mod checkpoints;
pub mod index;
pub mod lease;
pub mod postgres;
pub mod read;
pub mod registry;
pub mod sqlite;
pub mod stages;

pub use checkpoints::{Checkpoints, EMBEDDED_WORKERS_CHECKPOINT};
pub use index::{prefix_range, IndexRow, IndexTx, LogIndex, Lookup, LookupRequest, Published, Reservation, Reservations, ReserveTx};
pub use lease::{Holder, LeaseTable};
pub use read::ReadStore;
pub use registry::Registry;
pub use stages::{StageReport, StageTable};

use crate::config::DatabaseConfig;
use async_trait::async_trait;
use std::sync::Arc;

/// Database failures. All of them are infrastructure failures (retry or 503), except
/// `Inconsistent`, which means the index disagrees with the log and needs an operator.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("postgres: {}", postgres_detail(.0))]
    Postgres(tokio_postgres::Error),
    #[error("postgres pool: {0}")]
    Pool(deadpool_postgres::PoolError),
    #[error("sqlite: {0}")]
    Sqlite(rusqlite::Error),
    #[error("database setup: {0}")]
    Setup(String),
    #[error("index is inconsistent: {0}")]
    Inconsistent(String),
}

// Every driver error becomes a `DbError` through these, so they count it once for the
// dashboards (`spiced_database_errors_total`), whatever the caller then does with it.
impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> Self {
        counted("postgres");
        DbError::Postgres(e)
    }
}

impl From<deadpool_postgres::PoolError> for DbError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        counted("postgres");
        DbError::Pool(e)
    }
}

impl From<rusqlite::Error> for DbError {
    fn from(e: rusqlite::Error) -> Self {
        counted("sqlite");
        DbError::Sqlite(e)
    }
}

fn counted(backend: &'static str) {
    metrics::counter!("spiced_database_errors_total", "backend" => backend).increment(1);
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

/// An open database: every store over one backend, each behind its trait.
#[derive(Clone)]
pub struct Database {
    pub index: Arc<dyn LogIndex>,
    pub registry: Arc<dyn Registry>,
    pub read: Arc<dyn ReadStore>,
    pub checkpoints: Arc<dyn Checkpoints>,
    pub leases: Arc<dyn LeaseTable>,
    pub stages: Arc<dyn StageTable>,
    schema: Arc<dyn Schema>,
    /// The pool itself, for the tests and tools that check PostgreSQL's own state.
    postgres: Option<postgres::Pg>,
}

/// A backend's own set-up: its name and its migrations.
#[async_trait]
pub trait Schema: Send + Sync + 'static {
    fn backend_name(&self) -> &'static str;
    /// Applies pending migrations; returns the names of those applied now.
    async fn migrate(&self) -> Result<Vec<String>, DbError>;
}

impl Database {
    /// Connects (creating the SQLite file if needed) without touching the schema:
    /// `sqlite://PATH` is the embedded backend, anything else PostgreSQL.
    pub async fn open(config: &DatabaseConfig) -> Result<Database, DbError> {
        let url = config.url.expose();
        match url.strip_prefix("sqlite://") {
            Some(path) => sqlite::open(path),
            None => postgres::open(config),
        }
    }

    /// Applies pending migrations; returns the names of those applied now.
    pub async fn migrate(&self) -> Result<Vec<String>, DbError> {
        self.schema.migrate().await
    }

    pub fn backend_name(&self) -> &'static str {
        self.schema.backend_name()
    }

    /// The PostgreSQL pool, when the backend is PostgreSQL.
    pub fn postgres(&self) -> Option<&postgres::Pg> {
        self.postgres.as_ref()
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
