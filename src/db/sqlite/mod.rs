//! The SQLite backend, for the embedded single-node default: every store of [`crate::db`] in
//! one file, over one connection per process behind an async mutex.
//!
//! Calls are made on the async thread: they are local and sub-millisecond in WAL mode. A write
//! transaction is `BEGIN IMMEDIATE`, SQLite's write lock, which also serialises other processes
//! on the same file.

mod index;
mod query;
mod read;
mod registry;
mod state;

use super::read::ReadSchema;
use super::{Database, DbError, Migration, Schema};
use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

/// The stores over the file at `path`, created if missing.
pub(super) fn open(path: &str) -> Result<Database, DbError> {
    let lite = Lite::open(path)?;
    let store = Arc::new(lite.clone());
    Ok(Database {
        index: store.clone(),
        registry: Arc::new(registry::LiteRegistry { conn: lite.connection() }),
        read: store.clone(),
        checkpoints: store.clone(),
        leases: store.clone(),
        stages: store.clone(),
        schema: store,
        postgres: None,
    })
}

/// The timestamp format stored on SQLite: fixed width, so text order is time order.
fn time_text(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        name: "0001_log_index",
        sql: include_str!("../../../migrations/sqlite/0001_log_index.sql"),
    },
    Migration {
        name: "0002_processed_events",
        sql: include_str!("../../../migrations/sqlite/0002_processed_events.sql"),
    },
    Migration {
        name: "0003_relay",
        sql: include_str!("../../../migrations/sqlite/0003_relay.sql"),
    },
    Migration {
        name: "0004_read_models",
        sql: include_str!("../../../migrations/sqlite/0004_read_models.sql"),
    },
    Migration {
        name: "0005_read_schema",
        sql: include_str!("../../../migrations/sqlite/0005_read_schema.sql"),
    },
    Migration {
        name: "0006_projection_failures",
        sql: include_str!("../../../migrations/sqlite/0006_projection_failures.sql"),
    },
    Migration {
        name: "0007_stage_liveness",
        sql: include_str!("../../../migrations/sqlite/0007_stage_liveness.sql"),
    },
    Migration {
        name: "0008_stage_position",
        sql: include_str!("../../../migrations/sqlite/0008_stage_position.sql"),
    },
    Migration {
        name: "0009_failed_events",
        sql: include_str!("../../../migrations/sqlite/0009_failed_events.sql"),
    },
];
/// The connections this process has open, by file.
static OPEN: std::sync::Mutex<BTreeMap<PathBuf, std::sync::Weak<Mutex<Connection>>>> = std::sync::Mutex::new(BTreeMap::new());

/// The file `path` names, however it is spelled (its directory exists by now).
fn file_key(path: &str) -> PathBuf {
    let path = Path::new(path);
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    match path.file_name() {
        Some(name) => dir.join(name),
        None => path.to_path_buf(),
    }
}

/// The SQLite database file.
#[derive(Clone)]
pub struct Lite {
    conn: Arc<Mutex<Connection>>,
}

/// `spiced_instant(text)`: the microseconds since 1970 of the instant a datetime names, or
/// NULL for text that is not one ([`crate::db::read::filter::instant`], the same test the
/// cursors use), for the read queries' datetime filters and sorts.
fn register_functions(conn: &Connection) -> rusqlite::Result<()> {
    use rusqlite::functions::FunctionFlags;
    let flags = FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC | FunctionFlags::SQLITE_INNOCUOUS;
    conn.create_scalar_function("spiced_instant", 1, flags, |ctx| {
        let text = ctx.get_raw(0).as_str().ok();
        Ok(text.and_then(crate::db::read::filter::instant).map(|t| t.timestamp_micros()))
    })
}

impl Lite {
    pub fn open(path: &str) -> Result<Lite, DbError> {
        if let Some(dir) = std::path::Path::new(path).parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| DbError::Setup(format!("cannot create {}: {e}", dir.display())))?;
            }
        }
        // One connection per file in a process, whatever number of roles open it: SQLite's
        // busy wait blocks the thread it runs on, so two connections of one process, one
        // holding the write lock across an await (the writer's segment PUT), could fill every
        // runtime thread with waits for a lock whose holder then cannot run (seen: a 10 s
        // stall, the busy timeout). The async mutex makes such waits cost no thread.
        let mut open = OPEN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let key = file_key(path);
        if let Some(conn) = open.get(&key).and_then(std::sync::Weak::upgrade) {
            return Ok(Lite { conn });
        }
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: a committed batch survives power loss, like the fsynced log segment it indexes.
        conn.pragma_update(None, "synchronous", "FULL")?;
        register_functions(&conn)?;
        let conn = Arc::new(Mutex::new(conn));
        open.retain(|_, c| c.strong_count() > 0);
        open.insert(key, Arc::downgrade(&conn));
        Ok(Lite { conn })
    }

    pub async fn migrate(&self) -> Result<Vec<String>, DbError> {
        let mut conn = self.conn.lock().await;
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS spiced_migrations (
                 name TEXT PRIMARY KEY,
                 applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')))",
        )?;
        let mut applied = Vec::new();
        for m in MIGRATIONS {
            let done: Option<String> = tx
                .query_row("SELECT name FROM spiced_migrations WHERE name = ?1", [m.name], |r| r.get(0))
                .optional()?;
            if done.is_none() {
                tx.execute_batch(m.sql)?;
                tx.execute("INSERT INTO spiced_migrations (name) VALUES (?1)", [m.name])?;
                applied.push(m.name.to_string());
            }
        }
        // The live read models are not a numbered migration: a rebuild creates the same tables
        // under another name.
        tx.execute_batch(&read::ddl(&ReadSchema::live()))?;
        tx.commit()?;
        Ok(applied)
    }

    /// Gives the connection to code outside this module (the registry) under the same lock.
    pub fn connection(&self) -> Arc<Mutex<Connection>> {
        self.conn.clone()
    }
}


#[async_trait]
impl Schema for Lite {
    fn backend_name(&self) -> &'static str {
        "sqlite"
    }

    async fn migrate(&self) -> Result<Vec<String>, DbError> {
        Lite::migrate(self).await
    }
}

/// The name of one of the schema's tables.
fn table(schema: &ReadSchema, table: &str) -> String {
    format!("\"{}__{table}\"", schema.name())
}

/// A read-model schema's position, inside the caller's transaction or hold.
fn position(tx: &Connection, schema: &ReadSchema) -> Result<u64, DbError> {
    let sql = format!("SELECT position FROM {} WHERE id = 1", table(schema, "projection"));
    Ok(tx.query_row(&sql, [], |r| r.get::<_, i64>(0))? as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_file_is_one_connection_in_a_process() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spiced.db");
        let a = Lite::open(path.to_str().unwrap()).unwrap();
        let spelled_otherwise = dir.path().join(".").join("spiced.db");
        let b = Lite::open(spelled_otherwise.to_str().unwrap()).unwrap();
        assert!(Arc::ptr_eq(&a.conn, &b.conn));
        let other = Lite::open(dir.path().join("other.db").to_str().unwrap()).unwrap();
        assert!(!Arc::ptr_eq(&a.conn, &other.conn));
        // Closed when the last user lets go; the next open is a new connection.
        let weak = Arc::downgrade(&a.conn);
        drop((a, b));
        assert!(weak.upgrade().is_none());
    }
}
