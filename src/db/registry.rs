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
    /// Makes a failed event claimable again (operator re-drive). `true` if it was failed.
    async fn redrive(&self, handler: &str, event_id: Uuid) -> Result<bool, DbError>;
}

pub(crate) mod pg {
    use super::*;
    use deadpool_postgres::Pool;

    const CLAIM: &str = "WITH applied AS ( \
          SELECT coalesce((SELECT last_seq FROM handler_positions \
                           WHERE handler = $1 AND aggregate_id = $3), 0) AS last_seq), \
        existing AS ( \
          SELECT status FROM processed_events WHERE handler = $1 AND event_id = $2), \
        claimed AS ( \
          INSERT INTO processed_events AS p (handler, event_id, aggregate_id, sequence_number, status, owner) \
          SELECT $1, $2, $3, $4, 'processing', $5 WHERE (SELECT last_seq FROM applied) < $4 \
          ON CONFLICT (handler, event_id) DO UPDATE \
             SET status = 'processing', owner = EXCLUDED.owner, started_at = now(), \
                 heartbeat_at = now(), attempt_count = p.attempt_count + 1 \
             WHERE p.status = 'retrying' \
                OR (p.status = 'processing' AND (p.owner = EXCLUDED.owner \
                    OR p.heartbeat_at < now() - $6::int8 * interval '1 millisecond')) \
          RETURNING p.attempt_count) \
        SELECT (SELECT attempt_count FROM claimed), (SELECT status FROM existing), \
               (SELECT last_seq FROM applied)";
    const HEARTBEAT: &str = "UPDATE processed_events SET heartbeat_at = now() \
        WHERE handler = $1 AND event_id = $2 AND owner = $3 AND status = 'processing'";
    const FINISH: &str = "WITH finished AS ( \
          UPDATE processed_events SET status = $4, processed_at = now(), last_error = $5 \
          WHERE handler = $1 AND event_id = $2 AND owner = $3 AND status = 'processing' \
          RETURNING aggregate_id, sequence_number), \
        moved AS ( \
          INSERT INTO handler_positions (handler, aggregate_id, last_seq) \
          SELECT $1, aggregate_id, sequence_number FROM finished WHERE $4 = 'done' \
          ON CONFLICT (handler, aggregate_id) \
          DO UPDATE SET last_seq = GREATEST(handler_positions.last_seq, EXCLUDED.last_seq)) \
        SELECT count(*) FROM finished";
    const RETRYING: &str = "UPDATE processed_events SET status = 'retrying', last_error = $4 \
        WHERE handler = $1 AND event_id = $2 AND owner = $3 AND status = 'processing'";
    const RELEASE: &str = "UPDATE processed_events SET status = 'retrying', attempt_count = attempt_count - 1 \
        WHERE handler = $1 AND event_id = $2 AND owner = $3 AND status = 'processing'";
    const ROWS: &str = "SELECT handler, status, attempt_count, last_error, heartbeat_at \
        FROM processed_events WHERE event_id = $1 ORDER BY handler";
    const REDRIVE: &str = "UPDATE processed_events SET status = 'retrying', attempt_count = 0 \
        WHERE handler = $1 AND event_id = $2 AND status = 'failed'";

    pub struct PgRegistry {
        pub pool: Pool,
    }

    fn interpret(attempt: Option<i32>, status: Option<String>, last_seq: i64, seq: u64) -> Claim {
        if let Some(attempt) = attempt {
            return Claim::Claimed { attempt: attempt.max(1) as u32 };
        }
        match status.as_deref() {
            Some("done") | Some("skipped_stale") => Claim::DuplicateDone,
            Some("failed") => Claim::Failed,
            _ if last_seq as u64 >= seq => Claim::Stale,
            // Fresh lease held elsewhere, or a concurrent claim inserted it first.
            _ => Claim::InProgress,
        }
    }

    #[async_trait]
    impl Registry for PgRegistry {
        async fn claim(&self, w: &Work<'_>, lease: Duration) -> Result<Claim, DbError> {
            let client = self.pool.get().await?;
            let stmt = client.prepare_cached(CLAIM).await?;
            let lease_ms = lease.as_millis() as i64;
            let row = client
                .query_one(&stmt, &[&w.handler, &w.event_id, &w.aggregate_id, &(w.seq as i64), &w.owner, &lease_ms])
                .await?;
            Ok(interpret(row.get(0), row.get(1), row.get(2), w.seq))
        }

        async fn heartbeat(&self, w: &Work<'_>) -> Result<bool, DbError> {
            let client = self.pool.get().await?;
            Ok(client.execute(HEARTBEAT, &[&w.handler, &w.event_id, &w.owner]).await? == 1)
        }

        async fn mark_done(&self, w: &Work<'_>) -> Result<bool, DbError> {
            self.finish(w, "done", None).await
        }

        async fn mark_failed(&self, w: &Work<'_>, error: &str) -> Result<bool, DbError> {
            self.finish(w, "failed", Some(error)).await
        }

        async fn mark_retrying(&self, w: &Work<'_>, error: &str) -> Result<bool, DbError> {
            let client = self.pool.get().await?;
            Ok(client.execute(RETRYING, &[&w.handler, &w.event_id, &w.owner, &error]).await? == 1)
        }

        async fn release(&self, w: &Work<'_>) -> Result<bool, DbError> {
            let client = self.pool.get().await?;
            Ok(client.execute(RELEASE, &[&w.handler, &w.event_id, &w.owner]).await? == 1)
        }

        async fn rows(&self, event_id: Uuid) -> Result<Vec<Processed>, DbError> {
            let client = self.pool.get().await?;
            let rows = client.query(ROWS, &[&event_id]).await?;
            Ok(rows
                .iter()
                .map(|r| Processed {
                    handler: r.get(0),
                    status: r.get(1),
                    attempt_count: r.get::<_, i32>(2) as u32,
                    last_error: r.get(3),
                    heartbeat_at: r.get(4),
                })
                .collect())
        }

        async fn redrive(&self, handler: &str, event_id: Uuid) -> Result<bool, DbError> {
            let client = self.pool.get().await?;
            Ok(client.execute(REDRIVE, &[&handler, &event_id]).await? == 1)
        }
    }

    impl PgRegistry {
        async fn finish(&self, w: &Work<'_>, status: &str, error: Option<&str>) -> Result<bool, DbError> {
            let client = self.pool.get().await?;
            let stmt = client.prepare_cached(FINISH).await?;
            let row = client
                .query_one(&stmt, &[&w.handler, &w.event_id, &w.owner, &status, &error])
                .await?;
            Ok(row.get::<_, i64>(0) == 1)
        }
    }
}

pub(crate) mod lite {
    use super::*;
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
}
