//! The small stores on SQLite: named checkpoints and the relay's lease (both in
//! `relay_state`), and the stages' liveness reports. Lease times are fixed-width UTC text from
//! SQLite's own clock, so text order is time order, as on PostgreSQL's server clock.

use super::Lite;
use crate::db::lease::Move;
use crate::db::{Checkpoints, DbError, Holder, LeaseTable, StageReport, StageTable};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{params, OptionalExtension};
use std::time::Duration;

const READ_CHECKPOINT: &str = "SELECT position FROM relay_state WHERE name = ?1";
const ADVANCE_CHECKPOINT: &str = "INSERT INTO relay_state (name, position) VALUES (?1, ?2) \
     ON CONFLICT (name) DO UPDATE SET position = max(position, excluded.position)";

const ACQUIRE: &str = "INSERT INTO relay_state AS r (name, epoch, leader, lease_until) \
     VALUES (?1, 1, ?2, strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?3)) \
     ON CONFLICT (name) DO UPDATE SET epoch = r.epoch + 1, leader = excluded.leader, \
         lease_until = excluded.lease_until, updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') \
     WHERE r.lease_until IS NULL OR r.lease_until < strftime('%Y-%m-%dT%H:%M:%fZ', 'now') OR r.leader = excluded.leader \
     RETURNING epoch, position";
const RENEW: &str = "UPDATE relay_state SET lease_until = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?4) \
     WHERE name = ?1 AND leader = ?2 AND epoch = ?3 AND lease_until > strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";
const CHECKPOINT_FORWARD: &str = "UPDATE relay_state SET position = ?4, updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') \
     WHERE name = ?1 AND leader = ?2 AND epoch = ?3 AND lease_until > strftime('%Y-%m-%dT%H:%M:%fZ', 'now') AND position <= ?4";
const CHECKPOINT_ANYWHERE: &str = "UPDATE relay_state SET position = ?4, updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') \
     WHERE name = ?1 AND leader = ?2 AND epoch = ?3 AND lease_until > strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";
const RELEASE: &str = "UPDATE relay_state SET lease_until = NULL WHERE name = ?1 AND leader = ?2 AND epoch = ?3";

const REPORT: &str = "INSERT INTO stage_liveness \
     (stage, instance, progressed_at, work_waiting, stalled, last_error, reported_at, position) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (stage, instance) DO UPDATE SET \
     progressed_at = excluded.progressed_at, work_waiting = excluded.work_waiting, \
     stalled = excluded.stalled, last_error = excluded.last_error, reported_at = excluded.reported_at, \
     position = excluded.position";
const REPORTS: &str = "SELECT stage, instance, progressed_at, work_waiting, stalled, last_error, reported_at, position \
     FROM stage_liveness ORDER BY stage, instance";

/// SQLite's date modifier for "`d` from now", to the millisecond.
fn later(d: Duration) -> String {
    format!("+{}.{:03} seconds", d.as_secs(), d.subsec_millis())
}

#[async_trait]
impl Checkpoints for Lite {
    async fn get(&self, name: &str) -> Result<Option<u64>, DbError> {
        let conn = self.conn.lock().await;
        let p: Option<i64> = conn.query_row(READ_CHECKPOINT, [name], |r| r.get(0)).optional()?;
        Ok(p.map(|p| p as u64))
    }

    async fn advance(&self, name: &str, position: u64) -> Result<(), DbError> {
        let conn = self.conn.lock().await;
        conn.execute(ADVANCE_CHECKPOINT, params![name, position as i64])?;
        Ok(())
    }
}

#[async_trait]
impl LeaseTable for Lite {
    async fn acquire(&self, name: &str, me: &str, lease: Duration) -> Result<Option<(i64, u64)>, DbError> {
        let conn = self.conn.lock().await;
        let row = conn
            .query_row(ACQUIRE, params![name, me, later(lease)], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)? as u64)))
            .optional()?;
        Ok(row)
    }

    async fn renew(&self, h: Holder<'_>, lease: Duration) -> Result<bool, DbError> {
        let conn = self.conn.lock().await;
        Ok(conn.execute(RENEW, params![h.name, h.me, h.epoch, later(lease)])? == 1)
    }

    async fn write_checkpoint(&self, h: Holder<'_>, position: u64, how: Move, before_commit: &(dyn Fn() + Sync)) -> Result<bool, DbError> {
        let mut conn = self.conn.lock().await;
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let sql = match how {
            Move::Forward => CHECKPOINT_FORWARD,
            Move::Anywhere => CHECKPOINT_ANYWHERE,
        };
        let n = tx.execute(sql, params![h.name, h.me, h.epoch, position as i64])?;
        before_commit();
        tx.commit()?;
        Ok(n == 1)
    }

    async fn release(&self, h: Holder<'_>) -> Result<(), DbError> {
        let conn = self.conn.lock().await;
        conn.execute(RELEASE, params![h.name, h.me, h.epoch])?;
        Ok(())
    }
}

#[async_trait]
impl StageTable for Lite {
    async fn report(&self, reports: &[StageReport]) -> Result<(), DbError> {
        let conn = self.conn.lock().await;
        for r in reports {
            conn.execute(
                REPORT,
                params![
                    r.stage,
                    r.instance,
                    r.progressed_at.to_rfc3339(),
                    r.work_waiting,
                    r.stalled,
                    r.last_error,
                    r.reported_at.to_rfc3339(),
                    r.position.map(|p| p as i64),
                ],
            )?;
        }
        Ok(())
    }

    async fn forget(&self, instance: &str) -> Result<(), DbError> {
        let conn = self.conn.lock().await;
        conn.execute("DELETE FROM stage_liveness WHERE instance = ?1", [instance])?;
        Ok(())
    }

    async fn all(&self) -> Result<Vec<StageReport>, DbError> {
        let conn = self.conn.lock().await;
        let mut statement = conn.prepare(REPORTS)?;
        let rows = statement.query_map([], |r| {
            Ok(StageReport {
                stage: r.get(0)?,
                instance: r.get(1)?,
                progressed_at: stored_time(r.get::<_, String>(2)?),
                work_waiting: r.get(3)?,
                stalled: r.get(4)?,
                last_error: r.get(5)?,
                reported_at: stored_time(r.get::<_, String>(6)?),
                position: r.get::<_, Option<i64>>(7)?.map(|p| p as u64),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// A time this module wrote; the epoch if the row was edited by hand into something else.
fn stored_time(text: String) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(&text).map(|t| t.with_timezone(&Utc)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_lengths_are_sqlite_modifiers_to_the_millisecond() {
        assert_eq!(later(Duration::from_millis(10_250)), "+10.250 seconds");
        assert_eq!(later(Duration::from_millis(7)), "+0.007 seconds");
    }
}
