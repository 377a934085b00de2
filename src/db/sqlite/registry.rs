//! The `processed_events` registry on SQLite: a claim is one `BEGIN IMMEDIATE` transaction
//! on the file's one connection.

use crate::db::registry::{Claim, Failed, Processed, Registry, Work};
use crate::db::DbError;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use std::time::Duration;
use uuid::Uuid;
use rusqlite::{params, Connection, OptionalExtension};
use std::sync::Arc;
use tokio::sync::Mutex;

pub struct LiteRegistry {
    pub conn: Arc<Mutex<Connection>>,
}

const NOW: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";

fn claim_in(conn: &Connection, w: &Work<'_>, lease: Duration) -> Result<Claim, DbError> {
    let last_seq: i64 = conn
        .query_row(
            "SELECT last_seq FROM handler_positions WHERE handler = ?1 AND aggregate_id = ?2",
            params![w.handler, w.aggregate_id],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0);
    let existing: Option<(String, String, String, i64)> = conn
        .query_row(
            "SELECT status, owner, heartbeat_at, attempt_count FROM processed_events \
             WHERE handler = ?1 AND event_id = ?2",
            params![w.handler, w.event_id.to_string()],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    let Some((status, owner, heartbeat_at, attempts)) = existing else {
        if last_seq as u64 >= w.seq {
            return Ok(Claim::Stale);
        }
        conn.execute(
            "INSERT INTO processed_events (handler, event_id, aggregate_id, sequence_number, status, owner) \
             VALUES (?1, ?2, ?3, ?4, 'processing', ?5)",
            params![w.handler, w.event_id.to_string(), w.aggregate_id, w.seq as i64, w.owner],
        )?;
        return Ok(Claim::Claimed { attempt: 1 });
    };
    let expired = DateTime::parse_from_rfc3339(&heartbeat_at)
        .map(|t| Utc::now() - t.with_timezone(&Utc) > chrono::Duration::from_std(lease).unwrap_or_default())
        .unwrap_or(true);
    let claimable = status == "retrying" || (status == "processing" && (owner == w.owner || expired));
    match status.as_str() {
        "done" | "skipped_stale" => Ok(Claim::DuplicateDone),
        "failed" => Ok(Claim::Failed),
        _ if last_seq as u64 >= w.seq => Ok(Claim::Stale),
        _ if claimable => {
            conn.execute(
                &format!(
                    "UPDATE processed_events SET status = 'processing', owner = ?3, started_at = {NOW}, \
                     heartbeat_at = {NOW}, attempt_count = attempt_count + 1 \
                     WHERE handler = ?1 AND event_id = ?2"
                ),
                params![w.handler, w.event_id.to_string(), w.owner],
            )?;
            Ok(Claim::Claimed { attempt: attempts as u32 + 1 })
        }
        _ => Ok(Claim::InProgress),
    }
}

#[async_trait]
impl Registry for LiteRegistry {
    async fn claim(&self, w: &Work<'_>, lease: Duration) -> Result<Claim, DbError> {
        let mut conn = self.conn.lock().await;
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let claim = claim_in(&tx, w, lease)?;
        tx.commit()?;
        Ok(claim)
    }

    async fn heartbeat(&self, w: &Work<'_>) -> Result<bool, DbError> {
        let conn = self.conn.lock().await;
        let n = conn.execute(
            &format!(
                "UPDATE processed_events SET heartbeat_at = {NOW} \
                 WHERE handler = ?1 AND event_id = ?2 AND owner = ?3 AND status = 'processing'"
            ),
            params![w.handler, w.event_id.to_string(), w.owner],
        )?;
        Ok(n == 1)
    }

    async fn mark_done(&self, w: &Work<'_>) -> Result<bool, DbError> {
        self.finish(w, "done", None).await
    }

    async fn mark_failed(&self, w: &Work<'_>, error: &str) -> Result<bool, DbError> {
        self.finish(w, "failed", Some(error)).await
    }

    async fn mark_retrying(&self, w: &Work<'_>, error: &str) -> Result<bool, DbError> {
        let conn = self.conn.lock().await;
        let n = conn.execute(
            "UPDATE processed_events SET status = 'retrying', last_error = ?4 \
             WHERE handler = ?1 AND event_id = ?2 AND owner = ?3 AND status = 'processing'",
            params![w.handler, w.event_id.to_string(), w.owner, error],
        )?;
        Ok(n == 1)
    }

    async fn release(&self, w: &Work<'_>) -> Result<bool, DbError> {
        let conn = self.conn.lock().await;
        let n = conn.execute(
            "UPDATE processed_events SET status = 'retrying', attempt_count = attempt_count - 1 \
             WHERE handler = ?1 AND event_id = ?2 AND owner = ?3 AND status = 'processing'",
            params![w.handler, w.event_id.to_string(), w.owner],
        )?;
        Ok(n == 1)
    }

    async fn rows(&self, event_id: Uuid) -> Result<Vec<Processed>, DbError> {
        let conn = self.conn.lock().await;
        let mut stmt = conn.prepare_cached(
            "SELECT handler, status, attempt_count, last_error, heartbeat_at \
             FROM processed_events WHERE event_id = ?1 ORDER BY handler",
        )?;
        let rows = stmt
            .query_map([event_id.to_string()], |r| {
                Ok(Processed {
                    handler: r.get(0)?,
                    status: r.get(1)?,
                    attempt_count: r.get::<_, i64>(2)? as u32,
                    last_error: r.get(3)?,
                    heartbeat_at: r
                        .get::<_, String>(4)
                        .ok()
                        .and_then(|s| DateTime::parse_from_rfc3339(&s).ok())
                        .map(|t| t.with_timezone(&Utc)),
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    async fn failed(&self, handler: &str, after: Option<Uuid>, limit: usize) -> Result<Vec<Failed>, DbError> {
        let conn = self.conn.lock().await;
        let mut stmt = conn.prepare_cached(
            "SELECT event_id, aggregate_id, sequence_number, attempt_count, last_error, processed_at \
             FROM processed_events WHERE handler = ?1 AND status = 'failed' AND event_id > ?2 \
             ORDER BY event_id LIMIT ?3",
        )?;
        // Event ids are stored as hyphenated lowercase text, which sorts as the UUIDs do.
        let after = after.unwrap_or(Uuid::nil()).to_string();
        let rows = stmt
            .query_map(params![handler, after, limit as i64], |r| {
                Ok(Failed {
                    event_id: r
                        .get::<_, String>(0)?
                        .parse()
                        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e)))?,
                    aggregate_id: r.get(1)?,
                    seq: r.get::<_, i64>(2)? as u64,
                    attempt_count: r.get::<_, i64>(3)? as u32,
                    last_error: r.get(4)?,
                    failed_at: r
                        .get::<_, Option<String>>(5)?
                        .and_then(|s| DateTime::parse_from_rfc3339(&s).ok())
                        .map(|t| t.with_timezone(&Utc)),
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    async fn redrive(&self, handler: &str, event_id: Uuid) -> Result<bool, DbError> {
        let conn = self.conn.lock().await;
        let n = conn.execute(
            "UPDATE processed_events SET status = 'retrying', attempt_count = 0 \
             WHERE handler = ?1 AND event_id = ?2 AND status = 'failed'",
            params![handler, event_id.to_string()],
        )?;
        Ok(n == 1)
    }
}

impl LiteRegistry {
    async fn finish(&self, w: &Work<'_>, status: &str, error: Option<&str>) -> Result<bool, DbError> {
        let mut conn = self.conn.lock().await;
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let n = tx.execute(
            &format!(
                "UPDATE processed_events SET status = ?4, processed_at = {NOW}, last_error = ?5 \
                 WHERE handler = ?1 AND event_id = ?2 AND owner = ?3 AND status = 'processing'"
            ),
            params![w.handler, w.event_id.to_string(), w.owner, status, error],
        )?;
        if n == 1 && status == "done" {
            tx.execute(
                "INSERT INTO handler_positions (handler, aggregate_id, last_seq) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (handler, aggregate_id) DO UPDATE SET last_seq = max(last_seq, excluded.last_seq)",
                params![w.handler, w.aggregate_id, w.seq as i64],
            )?;
        }
        tx.commit()?;
        Ok(n == 1)
    }
}
