//! The log index on SQLite, for the embedded single-node default.
//!
//! One connection behind an async mutex: a batch holds the mutex and a `BEGIN IMMEDIATE`
//! transaction (SQLite's write lock, which also serialises other processes on the same file)
//! for the length of one segment write, mirroring the PostgreSQL head lock. Calls are made on
//! the async thread: they are local and sub-millisecond in WAL mode.

use super::Lite;
use crate::db::{prefix_range, DbError, IndexRow, IndexTx, LogIndex, Lookup, LookupRequest};
use crate::domain::{AggregateKey, AggregateType};
use crate::envelope::Kind;
use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::HashMap;
use tokio::sync::OwnedMutexGuard;
use uuid::Uuid;

const SELECT_HEAD: &str = "SELECT position FROM log_head WHERE id = 1";
const SELECT_COMMAND_ROWS: &str = "SELECT event_id, command_id, fingerprint, aggregate_type, \
     aggregate_id, kind, seq, position FROM log_index WHERE command_id = ?1 AND kind = 'command' \
     ORDER BY aggregate_type, aggregate_id, seq";
const SELECT_OUTCOME_ROWS: &str = "SELECT event_id, command_id, fingerprint, aggregate_type, \
     aggregate_id, kind, seq, position FROM log_index WHERE command_id = ?1 AND kind = 'domain' \
     ORDER BY aggregate_type, aggregate_id, seq";
const SELECT_ALL_OF_COMMAND: &str = "SELECT event_id, command_id, fingerprint, aggregate_type, \
     aggregate_id, kind, seq, position FROM log_index WHERE command_id = ?1";
const SELECT_EVENT_ROW: &str = "SELECT event_id, command_id, fingerprint, aggregate_type, \
     aggregate_id, kind, seq, position FROM log_index WHERE event_id = ?1";
const SELECT_LAST: &str = "SELECT seq, position FROM log_index \
     WHERE aggregate_type = ?1 AND aggregate_id = ?2 AND kind = ?3 ORDER BY seq DESC LIMIT 1";
const SELECT_PREFIXED: &str = "SELECT aggregate_id FROM aggregate_versions \
     WHERE aggregate_type = ?1 AND aggregate_id >= ?2 AND aggregate_id < ?3 ORDER BY aggregate_id";
const SELECT_VERSION: &str =
    "SELECT last_seq FROM aggregate_versions WHERE aggregate_type = ?1 AND aggregate_id = ?2";
const SELECT_POSITIONS: &str = "SELECT seq, position FROM log_index \
     WHERE aggregate_type = ?1 AND aggregate_id = ?2 AND kind = ?3 AND seq BETWEEN ?4 AND ?5 \
     ORDER BY seq";
const ADVANCE_HEAD: &str = "UPDATE log_head SET position = ?1 WHERE id = 1 AND position = ?1 - 1";
const INSERT_ROW: &str = "INSERT INTO log_index (event_id, command_id, fingerprint, \
     aggregate_type, aggregate_id, kind, seq, position) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";
const RAISE_VERSION: &str = "INSERT INTO aggregate_versions (aggregate_type, aggregate_id, last_seq) \
     VALUES (?1, ?2, ?3) ON CONFLICT (aggregate_type, aggregate_id) \
     DO UPDATE SET last_seq = max(last_seq, excluded.last_seq)";

fn parse_uuid(s: String) -> Result<Uuid, DbError> {
    Uuid::parse_str(&s).map_err(|e| DbError::Inconsistent(format!("bad uuid {s:?}: {e}")))
}

fn command_rows(conn: &Connection, command_id: Uuid) -> Result<Vec<IndexRow>, DbError> {
    index_rows(conn, SELECT_COMMAND_ROWS, command_id)
}

/// Rows of `sql`, a query of the index's columns taking one UUID.
fn index_rows(conn: &Connection, sql: &str, id: Uuid) -> Result<Vec<IndexRow>, DbError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let raw = stmt
        .query_map([id.to_string()], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, i64>(7)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    raw.into_iter()
        .map(|(event_id, command_id, fingerprint, ty, id, kind, seq, position)| {
            Ok(IndexRow {
                event_id: parse_uuid(event_id)?,
                command_id: parse_uuid(command_id)?,
                fingerprint,
                key: AggregateKey::new(
                    AggregateType::parse(&ty)
                        .ok_or_else(|| DbError::Inconsistent(format!("unknown type {ty}")))?,
                    id,
                ),
                kind: Kind::parse(&kind)
                    .ok_or_else(|| DbError::Inconsistent(format!("unknown kind {kind}")))?,
                seq: seq as u64,
                position: position as u64,
            })
        })
        .collect()
}

fn last_of(conn: &Connection, key: &AggregateKey, kind: Kind) -> Result<Option<(u64, u64)>, DbError> {
    let mut stmt = conn.prepare_cached(SELECT_LAST)?;
    Ok(stmt
        .query_row(params![key.aggregate_type.as_str(), key.aggregate_id, kind.as_str()], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
        })
        .optional()?)
}

fn version_of(conn: &Connection, key: &AggregateKey) -> Result<u64, DbError> {
    let mut stmt = conn.prepare_cached(SELECT_VERSION)?;
    let v: Option<i64> = stmt
        .query_row(params![key.aggregate_type.as_str(), key.aggregate_id], |r| r.get(0))
        .optional()?;
    Ok(v.unwrap_or(0) as u64)
}

#[async_trait]
impl LogIndex for Lite {
    async fn begin(&self) -> Result<Box<dyn IndexTx>, DbError> {
        let conn = self.conn.clone().lock_owned().await;
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let mut tx = LiteTx { conn: Some(conn), next: 0 };
        // On error `tx` drops here and rolls back.
        let head: i64 = tx.conn().query_row(SELECT_HEAD, [], |r| r.get(0))?;
        tx.next = head as u64 + 1;
        Ok(Box::new(tx))
    }

    async fn head(&self) -> Result<u64, DbError> {
        let conn = self.conn.lock().await;
        Ok(conn.query_row(SELECT_HEAD, [], |r| r.get::<_, i64>(0))? as u64)
    }

    async fn version(&self, key: &AggregateKey) -> Result<u64, DbError> {
        version_of(&*self.conn.lock().await, key)
    }

    async fn positions(
        &self,
        key: &AggregateKey,
        kind: Kind,
        from: u64,
        to: u64,
    ) -> Result<Vec<(u64, u64)>, DbError> {
        let conn = self.conn.lock().await;
        let mut stmt = conn.prepare_cached(SELECT_POSITIONS)?;
        let to = to.min(i64::MAX as u64) as i64;
        let rows = stmt
            .query_map(
                params![key.aggregate_type.as_str(), key.aggregate_id, kind.as_str(), from as i64, to],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
            )?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    async fn command(&self, command_id: Uuid) -> Result<Vec<IndexRow>, DbError> {
        command_rows(&*self.conn.lock().await, command_id)
    }

    async fn outcomes(&self, command_id: Uuid) -> Result<Vec<IndexRow>, DbError> {
        index_rows(&*self.conn.lock().await, SELECT_OUTCOME_ROWS, command_id)
    }

    async fn position_of(&self, event_id: Uuid) -> Result<Option<u64>, DbError> {
        let conn = self.conn.lock().await;
        let p: Option<i64> = conn
            .query_row("SELECT position FROM log_index WHERE event_id = ?1", [event_id.to_string()], |r| r.get(0))
            .optional()?;
        Ok(p.map(|p| p as u64))
    }

    async fn command_seq_before(&self, key: &AggregateKey, position: u64) -> Result<u64, DbError> {
        let conn = self.conn.lock().await;
        let seq: i64 = conn.query_row(
            "SELECT coalesce(max(seq), 0) FROM log_index \
             WHERE aggregate_type = ?1 AND aggregate_id = ?2 AND kind = 'command' AND position < ?3",
            params![key.aggregate_type.as_str(), key.aggregate_id, position as i64],
            |r| r.get(0),
        )?;
        Ok(seq as u64)
    }

    async fn last(&self, key: &AggregateKey, kind: Kind) -> Result<Option<(u64, u64)>, DbError> {
        last_of(&*self.conn.lock().await, key, kind)
    }

    async fn aggregates_with_prefix(
        &self,
        aggregate_type: AggregateType,
        prefix: &str,
    ) -> Result<Vec<String>, DbError> {
        let conn = self.conn.lock().await;
        let (low, high) = prefix_range(prefix);
        let mut stmt = conn.prepare_cached(SELECT_PREFIXED)?;
        let ids = stmt
            .query_map(params![aggregate_type.as_str(), low, high], |r| r.get(0))?
            .collect::<Result<Vec<String>, _>>()?;
        Ok(ids)
    }

    async fn ping(&self) -> Result<(), DbError> {
        let conn = self.conn.lock().await;
        conn.query_row("SELECT 1", [], |_| Ok(()))?;
        Ok(())
    }

    async fn events_after(&self, position: u64) -> Result<u64, DbError> {
        let conn = self.conn.lock().await;
        let n = conn.query_row("SELECT count(*) FROM log_index WHERE position > ?1", [position as i64], |r| r.get::<_, i64>(0))?;
        Ok(n as u64)
    }

    async fn all_rows(&self) -> Result<Vec<IndexRow>, DbError> {
        let conn = self.conn.lock().await;
        let ids: Vec<String> = conn
            .prepare("SELECT DISTINCT command_id FROM log_index")?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let mut rows = Vec::new();
        for id in ids {
            let id = parse_uuid(id)?;
            rows.extend(index_rows(&conn, SELECT_ALL_OF_COMMAND, id)?);
        }
        rows.sort_by(|a, b| (a.position, &a.key, a.kind.as_str(), a.seq).cmp(&(b.position, &b.key, b.kind.as_str(), b.seq)));
        Ok(rows)
    }

    async fn all_versions(&self) -> Result<HashMap<AggregateKey, u64>, DbError> {
        let conn = self.conn.lock().await;
        let mut stmt = conn.prepare("SELECT aggregate_type, aggregate_id, last_seq FROM aggregate_versions")?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows
            .into_iter()
            .filter_map(|(t, i, v)| Some((AggregateKey::new(AggregateType::parse(&t)?, i), v as u64)))
            .collect())
    }
}

/// A batch: the connection's mutex and an open `BEGIN IMMEDIATE`. Dropped unfinished, it
/// rolls back.
struct LiteTx {
    conn: Option<OwnedMutexGuard<Connection>>,
    next: u64,
}

impl LiteTx {
    fn conn(&self) -> &Connection {
        self.conn.as_ref().expect("connection is present until commit or rollback")
    }

    fn finish(mut self, sql: &str) -> Result<(), DbError> {
        let conn = self.conn.take().expect("finished once");
        let result = conn.execute_batch(sql);
        if result.is_err() {
            // Leave no transaction open on the shared connection.
            let _ = conn.execute_batch("ROLLBACK");
        }
        Ok(result?)
    }
}

impl Drop for LiteTx {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            let _ = conn.execute_batch("ROLLBACK");
        }
    }
}

#[async_trait]
impl IndexTx for LiteTx {
    fn next_position(&self) -> u64 {
        self.next
    }

    async fn lookup(&mut self, request: &LookupRequest) -> Result<Lookup, DbError> {
        let conn = self.conn();
        let mut lookup = Lookup::default();
        for id in &request.command_ids {
            lookup.rows.extend(command_rows(conn, *id)?);
        }
        for id in &request.event_ids {
            lookup.rows.extend(index_rows(conn, SELECT_EVENT_ROW, *id)?);
        }
        lookup.rows.dedup_by_key(|r| r.event_id);
        for key in &request.command_keys {
            let v = version_of(conn, key)?;
            if v > 0 {
                lookup.versions.insert(key.clone(), v);
            }
        }
        for key in &request.outcome_keys {
            if let Some((seq, _)) = last_of(conn, key, Kind::Domain)? {
                lookup.outcomes.insert(key.clone(), seq);
            }
        }
        Ok(lookup)
    }

    async fn record(&mut self, position: u64, rows: &[IndexRow]) -> Result<(), DbError> {
        let conn = self.conn();
        let moved = conn.prepare_cached(ADVANCE_HEAD)?.execute([position as i64])?;
        if moved != 1 {
            return Err(DbError::Inconsistent(format!(
                "log head is not at position {position} - 1 inside its own lock"
            )));
        }
        let mut insert = conn.prepare_cached(INSERT_ROW)?;
        let mut raise = conn.prepare_cached(RAISE_VERSION)?;
        for r in rows {
            insert.execute(params![
                r.event_id.to_string(),
                r.command_id.to_string(),
                r.fingerprint,
                r.key.aggregate_type.as_str(),
                r.key.aggregate_id,
                r.kind.as_str(),
                r.seq as i64,
                r.position as i64
            ])?;
            if r.kind == Kind::Command {
                raise.execute(params![r.key.aggregate_type.as_str(), r.key.aggregate_id, r.seq as i64])?;
            }
        }
        Ok(())
    }

    async fn commit(self: Box<Self>) -> Result<(), DbError> {
        (*self).finish("COMMIT")
    }

    async fn rollback(self: Box<Self>) -> Result<(), DbError> {
        (*self).finish("ROLLBACK")
    }
}
