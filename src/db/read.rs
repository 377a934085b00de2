//! The read models: one row per database, class and instance, versioned by the aggregate's
//! sequence so that replays, duplicates and reordering converge on the same state.

use super::{Backend, Database, DbError};
use chrono::{DateTime, Utc};
use serde_json::Value;

/// What a row is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    pub key: String,
    pub parent: String,
    pub state: Option<Value>,
    pub version: u64,
    pub deleted: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum By {
    Key,
    Parent,
}

/// A segment's worth of changes, applied in one transaction with the projection's position.
#[derive(Debug, Default)]
pub struct ReadBatch {
    pub rows: Vec<ReadRow>,
    /// Aggregate-id prefixes whose classes and instances are deleted with their database.
    pub cascades: Vec<(String, u64, DateTime<Utc>)>,
}

const PG_UPSERT: &str = "INSERT INTO read_models AS r (kind, key, parent, state, version, deleted, created_at, updated_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $7) \
     ON CONFLICT (kind, key) DO UPDATE SET parent = EXCLUDED.parent, state = EXCLUDED.state, \
         version = EXCLUDED.version, deleted = EXCLUDED.deleted, updated_at = EXCLUDED.updated_at \
     WHERE r.version < EXCLUDED.version";
const PG_CASCADE: &str = "UPDATE read_models SET deleted = true, updated_at = $3 \
     WHERE kind IN ('class', 'instance') AND key COLLATE \"C\" >= $1 AND key COLLATE \"C\" < $2 AND NOT deleted";
const PG_CHECKPOINT: &str = "INSERT INTO relay_state (name, position) VALUES ($1, $2) \
     ON CONFLICT (name) DO UPDATE SET position = GREATEST(relay_state.position, EXCLUDED.position), updated_at = now()";
const LITE_UPSERT: &str = "INSERT INTO read_models (kind, key, parent, state, version, deleted, created_at, updated_at) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7) \
     ON CONFLICT (kind, key) DO UPDATE SET parent = excluded.parent, state = excluded.state, \
         version = excluded.version, deleted = excluded.deleted, updated_at = excluded.updated_at \
     WHERE read_models.version < excluded.version";
const LITE_CASCADE: &str = "UPDATE read_models SET deleted = 1, updated_at = ?3 \
     WHERE kind IN ('class', 'instance') AND key >= ?1 AND key < ?2 AND deleted = 0";
const LITE_CHECKPOINT: &str = "INSERT INTO relay_state (name, position) VALUES (?1, ?2) \
     ON CONFLICT (name) DO UPDATE SET position = max(position, excluded.position)";
// `$2` is the key for one row (`BY_KEY`) or the parent for a page (`BY_PARENT`).
const PG_BY_KEY: &str = "SELECT kind, key, parent, state, version, deleted, created_at, updated_at \
     FROM read_models WHERE kind = $1 AND key = $2 AND NOT deleted AND key > $3 ORDER BY key LIMIT $4";
const PG_BY_PARENT: &str = "SELECT kind, key, parent, state, version, deleted, created_at, updated_at \
     FROM read_models WHERE kind = $1 AND parent = $2 AND NOT deleted AND key > $3 ORDER BY key LIMIT $4";
const LITE_BY_KEY: &str = "SELECT kind, key, parent, state, version, deleted, created_at, updated_at \
     FROM read_models WHERE kind = ?1 AND key = ?2 AND deleted = 0 AND key > ?3 ORDER BY key LIMIT ?4";
const LITE_BY_PARENT: &str = "SELECT kind, key, parent, state, version, deleted, created_at, updated_at \
     FROM read_models WHERE kind = ?1 AND parent = ?2 AND deleted = 0 AND key > ?3 ORDER BY key LIMIT ?4";

impl Database {
    /// Applies a batch and moves the named checkpoint to `position`, atomically.
    pub async fn apply_read_batch(&self, batch: &ReadBatch, checkpoint: &str, position: u64) -> Result<(), DbError> {
        match &self.backend {
            Backend::Postgres(pg) => {
                let mut client = pg.pool().get().await?;
                let tx = client.transaction().await?;
                let upsert = tx.prepare_cached(PG_UPSERT).await?;
                for r in &batch.rows {
                    tx.execute(
                        &upsert,
                        &[&r.kind.as_str(), &r.key, &r.parent, &r.state, &(r.version as i64), &r.deleted, &r.created_at],
                    )
                    .await?;
                }
                for (prefix, _, at) in &batch.cascades {
                    let (low, high) = super::postgres::prefix_range(prefix);
                    tx.execute(PG_CASCADE, &[&low, &high, at]).await?;
                }
                tx.execute(PG_CHECKPOINT, &[&checkpoint, &(position as i64)]).await?;
                tx.commit().await?;
            }
            Backend::Sqlite(lite) => {
                let conn = lite.connection();
                let mut conn = conn.lock().await;
                let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                for r in &batch.rows {
                    tx.prepare_cached(LITE_UPSERT)?.execute(rusqlite::params![
                        r.kind.as_str(),
                        r.key,
                        r.parent,
                        r.state.as_ref().map(Value::to_string),
                        r.version as i64,
                        r.deleted,
                        r.created_at.to_rfc3339(),
                    ])?;
                }
                for (prefix, _, at) in &batch.cascades {
                    let (low, high) = super::postgres::prefix_range(prefix);
                    tx.execute(LITE_CASCADE, rusqlite::params![low, high, at.to_rfc3339()])?;
                }
                tx.execute(LITE_CHECKPOINT, rusqlite::params![checkpoint, position as i64])?;
                tx.commit()?;
            }
        }
        Ok(())
    }

    /// One live row.
    pub async fn read_one(&self, kind: ReadKind, key: &str) -> Result<Option<ReadRow>, DbError> {
        let rows = self.read_query(kind, By::Key, key, None, 1).await?;
        Ok(rows.into_iter().next())
    }

    /// Live rows under `parent`, keys after `after`, at most `limit`, in key order.
    pub async fn read_page(&self, kind: ReadKind, parent: &str, after: Option<&str>, limit: usize) -> Result<Vec<ReadRow>, DbError> {
        self.read_query(kind, By::Parent, parent, after, limit).await
    }

    async fn read_query(
        &self,
        kind: ReadKind,
        by: By,
        value: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ReadRow>, DbError> {
        let after = after.unwrap_or("");
        match &self.backend {
            Backend::Postgres(pg) => {
                let sql = if by == By::Key { PG_BY_KEY } else { PG_BY_PARENT };
                let client = pg.pool().get().await?;
                let stmt = client.prepare_cached(sql).await?;
                let rows = client.query(&stmt, &[&kind.as_str(), &value, &after, &(limit as i64)]).await?;
                Ok(rows
                    .iter()
                    .map(|r| ReadRow {
                        kind,
                        key: r.get(1),
                        parent: r.get(2),
                        state: r.get(3),
                        version: r.get::<_, i64>(4) as u64,
                        deleted: r.get(5),
                        created_at: r.get(6),
                        updated_at: r.get(7),
                    })
                    .collect())
            }
            Backend::Sqlite(lite) => {
                let sql = if by == By::Key { LITE_BY_KEY } else { LITE_BY_PARENT };
                let conn = lite.connection();
                let conn = conn.lock().await;
                let mut stmt = conn.prepare_cached(sql)?;
                let rows = stmt
                    .query_map(rusqlite::params![kind.as_str(), value, after, limit as i64], |r| {
                        Ok((
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, Option<String>>(3)?,
                            r.get::<_, i64>(4)?,
                            r.get::<_, bool>(5)?,
                            r.get::<_, String>(6)?,
                            r.get::<_, String>(7)?,
                        ))
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                let time = |s: &str| DateTime::parse_from_rfc3339(s).map(|t| t.with_timezone(&Utc)).unwrap_or_default();
                Ok(rows
                    .into_iter()
                    .map(|(key, parent, state, version, deleted, created, updated)| ReadRow {
                        kind,
                        key,
                        parent,
                        state: state.and_then(|s| serde_json::from_str(&s).ok()),
                        version: version as u64,
                        deleted,
                        created_at: time(&created),
                        updated_at: time(&updated),
                    })
                    .collect())
            }
        }
    }
}
