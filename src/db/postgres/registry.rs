//! The `processed_events` registry on PostgreSQL: a claim is one statement.

use crate::db::registry::{Claim, Failed, Processed, Registry, Work};
use crate::db::DbError;
use async_trait::async_trait;
use std::time::Duration;
use uuid::Uuid;
use deadpool_postgres::{GenericClient, Pool};

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
const FAILED: &str = "SELECT event_id, aggregate_id, sequence_number, attempt_count, last_error, processed_at \
    FROM processed_events WHERE handler = $1 AND status = 'failed' AND event_id > $2 \
    ORDER BY event_id LIMIT $3";
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
        let stmt = client.prepare_cached(HEARTBEAT).await?;
        Ok(client.execute(&stmt, &[&w.handler, &w.event_id, &w.owner]).await? == 1)
    }

    async fn mark_done(&self, w: &Work<'_>) -> Result<bool, DbError> {
        finish(&self.pool.get().await?, w, "done", None).await
    }

    async fn mark_failed(&self, w: &Work<'_>, error: &str) -> Result<bool, DbError> {
        let mut client = self.pool.get().await?;
        let tx = flushed(&mut client).await?;
        let finished = finish(&tx, w, "failed", Some(error)).await?;
        tx.commit().await?;
        Ok(finished)
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

    async fn failed(&self, handler: &str, after: Option<Uuid>, limit: usize) -> Result<Vec<Failed>, DbError> {
        let client = self.pool.get().await?;
        let rows = client.query(FAILED, &[&handler, &after.unwrap_or(Uuid::nil()), &(limit as i64)]).await?;
        Ok(rows
            .iter()
            .map(|r| Failed {
                event_id: r.get(0),
                aggregate_id: r.get(1),
                seq: r.get::<_, i64>(2) as u64,
                attempt_count: r.get::<_, i32>(3) as u32,
                last_error: r.get(4),
                failed_at: r.get(5),
            })
            .collect())
    }

    async fn redrive(&self, handler: &str, event_id: Uuid) -> Result<bool, DbError> {
        let mut client = self.pool.get().await?;
        let tx = flushed(&mut client).await?;
        let redriven = tx.execute(REDRIVE, &[&handler, &event_id]).await? == 1;
        tx.commit().await?;
        Ok(redriven)
    }
}

/// Ends a claim as `status`; `false` when it is not ours any more.
async fn finish(db: &impl GenericClient, w: &Work<'_>, status: &str, error: Option<&str>) -> Result<bool, DbError> {
    let stmt = db.prepare_cached(FINISH).await?;
    let row = db.query_one(&stmt, &[&w.handler, &w.event_id, &w.owner, &status, &error]).await?;
    Ok(row.get::<_, i64>(0) == 1)
}

/// A transaction whose commit waits for the WAL flush, whatever the pool's connections do
/// (`Commits`): a terminal failure is not in the log, and the operator's re-drive list and the
/// aggregate's later commands (which wait behind it) read it from the registry alone.
async fn flushed(client: &mut deadpool_postgres::Client) -> Result<deadpool_postgres::Transaction<'_>, DbError> {
    let tx = client.transaction().await?;
    tx.batch_execute("SET LOCAL synchronous_commit TO on").await?;
    Ok(tx)
}
