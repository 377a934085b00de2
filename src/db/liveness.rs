//! The `stage_liveness` table: what each running stage of each process last reported about
//! its progress, so `spiced status` can show every role of a deployment from one place.

use super::{Backend, Database, DbError};
use chrono::{DateTime, Utc};

/// One stage of one process, as last reported.
#[derive(Debug, Clone, PartialEq)]
pub struct StageReport {
    pub stage: String,
    /// The process: `host-pid`.
    pub instance: String,
    pub progressed_at: DateTime<Utc>,
    pub work_waiting: bool,
    pub stalled: bool,
    pub last_error: Option<String>,
    pub reported_at: DateTime<Utc>,
}

const PG_UPSERT: &str = "INSERT INTO stage_liveness AS s \
     (stage, instance, progressed_at, work_waiting, stalled, last_error, reported_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (stage, instance) DO UPDATE SET \
     progressed_at = EXCLUDED.progressed_at, work_waiting = EXCLUDED.work_waiting, \
     stalled = EXCLUDED.stalled, last_error = EXCLUDED.last_error, reported_at = EXCLUDED.reported_at";
const LITE_UPSERT: &str = "INSERT INTO stage_liveness \
     (stage, instance, progressed_at, work_waiting, stalled, last_error, reported_at) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (stage, instance) DO UPDATE SET \
     progressed_at = excluded.progressed_at, work_waiting = excluded.work_waiting, \
     stalled = excluded.stalled, last_error = excluded.last_error, reported_at = excluded.reported_at";
const SELECT: &str = "SELECT stage, instance, progressed_at, work_waiting, stalled, last_error, reported_at \
     FROM stage_liveness ORDER BY stage, instance";

impl Database {
    /// Records what `reports` say (one row per stage and process, replaced each time).
    pub async fn report_stages(&self, reports: &[StageReport]) -> Result<(), DbError> {
        match &self.backend {
            Backend::Postgres(pg) => {
                let client = pg.pool().get().await?;
                for r in reports {
                    client
                        .execute(PG_UPSERT, &[&r.stage, &r.instance, &r.progressed_at, &r.work_waiting, &r.stalled, &r.last_error, &r.reported_at])
                        .await?;
                }
            }
            Backend::Sqlite(lite) => {
                let conn = lite.connection();
                let conn = conn.lock().await;
                for r in reports {
                    conn.execute(LITE_UPSERT, rusqlite::params![
                        r.stage, r.instance, r.progressed_at.to_rfc3339(), r.work_waiting, r.stalled,
                        r.last_error, r.reported_at.to_rfc3339(),
                    ])?;
                }
            }
        }
        Ok(())
    }

    /// Removes a stopped process's rows.
    pub async fn forget_stages(&self, instance: &str) -> Result<(), DbError> {
        match &self.backend {
            Backend::Postgres(pg) => {
                let client = pg.pool().get().await?;
                client.execute("DELETE FROM stage_liveness WHERE instance = $1", &[&instance]).await?;
            }
            Backend::Sqlite(lite) => {
                let conn = lite.connection();
                let conn = conn.lock().await;
                conn.execute("DELETE FROM stage_liveness WHERE instance = ?1", [instance])?;
            }
        }
        Ok(())
    }

    /// Every reported stage, by stage and process.
    pub async fn stage_reports(&self) -> Result<Vec<StageReport>, DbError> {
        match &self.backend {
            Backend::Postgres(pg) => {
                let client = pg.pool().get().await?;
                let rows = client.query(SELECT, &[]).await?;
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
                    })
                    .collect())
            }
            Backend::Sqlite(lite) => {
                let conn = lite.connection();
                let conn = conn.lock().await;
                let mut statement = conn.prepare(SELECT)?;
                let rows = statement.query_map([], |r| {
                    Ok(StageReport {
                        stage: r.get(0)?,
                        instance: r.get(1)?,
                        progressed_at: lite_time(r.get::<_, String>(2)?),
                        work_waiting: r.get(3)?,
                        stalled: r.get(4)?,
                        last_error: r.get(5)?,
                        reported_at: lite_time(r.get::<_, String>(6)?),
                    })
                })?;
                Ok(rows.collect::<Result<_, _>>()?)
            }
        }
    }
}

/// A time this module wrote; the epoch if the row was edited by hand into something else.
fn lite_time(text: String) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(&text).map(|t| t.with_timezone(&Utc)).unwrap_or_default()
}
