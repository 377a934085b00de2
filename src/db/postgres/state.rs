//! The small stores on PostgreSQL: named checkpoints and the relay's lease (both in
//! `relay_state`, judged by the server's clock), and the stages' liveness reports.

use super::Pg;
use crate::db::lease::Move;
use crate::db::{Checkpoints, DbError, Holder, LeaseTable, StageReport, StageTable};
use async_trait::async_trait;
use std::time::Duration;

const READ_CHECKPOINT: &str = "SELECT position FROM relay_state WHERE name = $1";
const ADVANCE_CHECKPOINT: &str = "INSERT INTO relay_state (name, position) VALUES ($1, $2) \
     ON CONFLICT (name) DO UPDATE SET position = GREATEST(relay_state.position, EXCLUDED.position), updated_at = now()";

const ACQUIRE: &str = "INSERT INTO relay_state AS r (name, epoch, leader, lease_until) \
     VALUES ($1, 1, $2, now() + $3::int8 * interval '1 millisecond') \
     ON CONFLICT (name) DO UPDATE SET epoch = r.epoch + 1, leader = EXCLUDED.leader, \
         lease_until = EXCLUDED.lease_until, updated_at = now() \
     WHERE r.lease_until IS NULL OR r.lease_until < now() OR r.leader = EXCLUDED.leader \
     RETURNING epoch, position";
const RENEW: &str = "UPDATE relay_state SET lease_until = now() + $4::int8 * interval '1 millisecond' \
     WHERE name = $1 AND leader = $2 AND epoch = $3 AND lease_until > now()";
const CHECKPOINT_FORWARD: &str = "UPDATE relay_state SET position = $4, updated_at = now() \
     WHERE name = $1 AND leader = $2 AND epoch = $3 AND lease_until > now() AND position <= $4";
const CHECKPOINT_ANYWHERE: &str = "UPDATE relay_state SET position = $4, updated_at = now() \
     WHERE name = $1 AND leader = $2 AND epoch = $3 AND lease_until > now()";
const RELEASE: &str = "UPDATE relay_state SET lease_until = NULL WHERE name = $1 AND leader = $2 AND epoch = $3";

const REPORT: &str = "INSERT INTO stage_liveness AS s \
     (stage, instance, progressed_at, work_waiting, stalled, last_error, reported_at, position) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (stage, instance) DO UPDATE SET \
     progressed_at = EXCLUDED.progressed_at, work_waiting = EXCLUDED.work_waiting, \
     stalled = EXCLUDED.stalled, last_error = EXCLUDED.last_error, reported_at = EXCLUDED.reported_at, \
     position = EXCLUDED.position";
const REPORTS: &str = "SELECT stage, instance, progressed_at, work_waiting, stalled, last_error, reported_at, position \
     FROM stage_liveness ORDER BY stage, instance";

fn millis(d: Duration) -> i64 {
    d.as_millis() as i64
}

#[async_trait]
impl Checkpoints for Pg {
    async fn get(&self, name: &str) -> Result<Option<u64>, DbError> {
        let client = self.pool.get().await?;
        let row = client.query_opt(READ_CHECKPOINT, &[&name]).await?;
        Ok(row.map(|r| r.get::<_, i64>(0) as u64))
    }

    async fn advance(&self, name: &str, position: u64) -> Result<(), DbError> {
        let client = self.pool.get().await?;
        client.execute(ADVANCE_CHECKPOINT, &[&name, &(position as i64)]).await?;
        Ok(())
    }
}

#[async_trait]
impl LeaseTable for Pg {
    async fn acquire(&self, name: &str, me: &str, lease: Duration) -> Result<Option<(i64, u64)>, DbError> {
        let client = self.pool.get().await?;
        let row = client.query_opt(ACQUIRE, &[&name, &me, &millis(lease)]).await?;
        Ok(row.map(|r| (r.get(0), r.get::<_, i64>(1) as u64)))
    }

    async fn renew(&self, h: Holder<'_>, lease: Duration) -> Result<bool, DbError> {
        let client = self.pool.get().await?;
        Ok(client.execute(RENEW, &[&h.name, &h.me, &h.epoch, &millis(lease)]).await? == 1)
    }

    async fn write_checkpoint(&self, h: Holder<'_>, position: u64, how: Move, before_commit: &(dyn Fn() + Sync)) -> Result<bool, DbError> {
        let sql = match how {
            Move::Forward => CHECKPOINT_FORWARD,
            Move::Anywhere => CHECKPOINT_ANYWHERE,
        };
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let n = tx.execute(sql, &[&h.name, &h.me, &h.epoch, &(position as i64)]).await?;
        before_commit();
        tx.commit().await?;
        Ok(n == 1)
    }

    async fn release(&self, h: Holder<'_>) -> Result<(), DbError> {
        let client = self.pool.get().await?;
        client.execute(RELEASE, &[&h.name, &h.me, &h.epoch]).await?;
        Ok(())
    }
}

#[async_trait]
impl StageTable for Pg {
    async fn report(&self, reports: &[StageReport]) -> Result<(), DbError> {
        let client = self.pool.get().await?;
        for r in reports {
            client
                .execute(REPORT, &[&r.stage, &r.instance, &r.progressed_at, &r.work_waiting, &r.stalled, &r.last_error, &r.reported_at, &r.position.map(|p| p as i64)])
                .await?;
        }
        Ok(())
    }

    async fn forget(&self, instance: &str) -> Result<(), DbError> {
        let client = self.pool.get().await?;
        client.execute("DELETE FROM stage_liveness WHERE instance = $1", &[&instance]).await?;
        Ok(())
    }

    async fn all(&self) -> Result<Vec<StageReport>, DbError> {
        let client = self.pool.get().await?;
        let rows = client.query(REPORTS, &[]).await?;
        Ok(rows
            .iter()
            .map(|r| StageReport {
                stage: r.get(0),
                instance: r.get(1),
                progressed_at: r.get(2),
                work_waiting: r.get(3),
                stalled: r.get(4),
                last_error: r.get(5),
                reported_at: r.get(6),
                position: r.get::<_, Option<i64>>(7).map(|p| p as u64),
            })
            .collect())
    }
}
