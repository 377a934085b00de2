//! Events a read-model schema could not apply because the read store refused their content (a
//! NUL in jsonb, a row over a size limit, a constraint): set aside in `projection_failures`,
//! one row per schema and event with its log position, aggregate, error, attempts and when it
//! was first and last refused, so that the projection goes on with the events after it.
//!
//! Such an event is missing from that schema's read models until [`Database::reapply`] applies
//! it again (the caller reads it from the log, which keeps it) through the same versioned
//! upsert as any late event: a newer version of the row already applied wins. Success deletes
//! the row; another refusal keeps it with one more attempt.

use super::apply::{lite_apply_change, lite_record, lite_settle, pg_apply_change, pg_record, pg_settle, Change, Refused, Tried};
use super::ReadSchema;
use crate::db::{Backend, Database, DbError};
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// A recorded failure.
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectionFailure {
    /// The read-model schema missing the event (`spiced_read` is the live one).
    pub schema: String,
    pub event_id: Uuid,
    pub position: u64,
    pub aggregate_id: String,
    /// The read store's last refusal.
    pub error: String,
    /// How many times it was refused.
    pub attempts: u32,
    pub first_seen_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
}

const PG_LIST: &str = "SELECT schema_name, event_id, position, aggregate_id, error, attempts, first_seen_at, last_seen_at \
     FROM projection_failures WHERE schema_name = $1 ORDER BY position, event_id";
const LITE_LIST: &str = "SELECT schema_name, event_id, position, aggregate_id, error, attempts, first_seen_at, last_seen_at \
     FROM projection_failures WHERE schema_name = ?1 ORDER BY position, event_id";
const PG_DELETE: &str = "DELETE FROM projection_failures WHERE schema_name = $1 AND event_id = $2";
const LITE_DELETE: &str = "DELETE FROM projection_failures WHERE schema_name = ?1 AND event_id = ?2";

/// The swap's renaming of the two schemas' failures, as of the schemas themselves (names are
/// checked identifiers, see [`ReadSchema::named`]). Same SQL on both backends.
pub(super) fn exchange(live: &ReadSchema, target: &ReadSchema) -> String {
    let (l, t) = (live.name(), target.name());
    format!(
        "UPDATE projection_failures SET schema_name = '{t}__swapping' WHERE schema_name = '{l}';
         UPDATE projection_failures SET schema_name = '{l}' WHERE schema_name = '{t}';
         UPDATE projection_failures SET schema_name = '{t}' WHERE schema_name = '{t}__swapping';"
    )
}

impl Database {
    /// The events `schema` is missing because the read store refused them, in log order.
    pub async fn projection_failures(&self, schema: &ReadSchema) -> Result<Vec<ProjectionFailure>, DbError> {
        match &self.backend {
            Backend::Postgres(pg) => {
                let client = pg.pool().get().await?;
                let rows = client.query(PG_LIST, &[&schema.name()]).await?;
                Ok(rows.iter().map(pg_failure).collect())
            }
            Backend::Sqlite(lite) => {
                let conn = lite.connection();
                let conn = conn.lock().await;
                let mut stmt = conn.prepare(LITE_LIST)?;
                let rows = stmt.query_map([schema.name()], lite_failure)?.collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            }
        }
    }

    /// Applies a set-aside event again to `schema`; `None` when it applied (its failure row is
    /// deleted), else the new refusal (its row keeps it, one attempt more).
    pub async fn reapply(&self, schema: &ReadSchema, change: &Change) -> Result<Option<Refused>, DbError> {
        match &self.backend {
            Backend::Postgres(pg) => {
                let mut client = pg.pool().get().await?;
                let tx = client.transaction().await?;
                tx.batch_execute("SAVEPOINT change").await?;
                let refused = match pg_settle(&tx, pg_apply_change(&tx, schema, change).await).await? {
                    Tried::Done(()) => {
                        tx.execute(PG_DELETE, &[&schema.name(), &change.event_id]).await?;
                        None
                    }
                    Tried::Refused(e) => {
                        let refused = Refused::of(change, &e);
                        pg_record(&tx, schema, std::slice::from_ref(&refused)).await?;
                        Some(refused)
                    }
                };
                tx.commit().await?;
                Ok(refused)
            }
            Backend::Sqlite(lite) => {
                let conn = lite.connection();
                let mut conn = conn.lock().await;
                let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                tx.execute_batch("SAVEPOINT change")?;
                let refused = match lite_settle(&tx, lite_apply_change(&tx, schema, change))? {
                    Tried::Done(()) => {
                        tx.execute(LITE_DELETE, rusqlite::params![schema.name(), change.event_id.to_string()])?;
                        None
                    }
                    Tried::Refused(e) => {
                        let refused = Refused::of(change, &e);
                        lite_record(&tx, schema, std::slice::from_ref(&refused))?;
                        Some(refused)
                    }
                };
                tx.commit()?;
                Ok(refused)
            }
        }
    }
}

fn pg_failure(r: &tokio_postgres::Row) -> ProjectionFailure {
    ProjectionFailure {
        schema: r.get(0),
        event_id: r.get(1),
        position: r.get::<_, i64>(2) as u64,
        aggregate_id: r.get(3),
        error: r.get(4),
        attempts: r.get::<_, i32>(5) as u32,
        first_seen_at: r.get(6),
        last_seen_at: r.get(7),
    }
}

fn lite_failure(r: &rusqlite::Row<'_>) -> rusqlite::Result<ProjectionFailure> {
    let conversion = |i: usize, e: Box<dyn std::error::Error + Send + Sync>| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, e)
    };
    let time = |i: usize| -> rusqlite::Result<DateTime<Utc>> {
        let s: String = r.get(i)?;
        DateTime::parse_from_rfc3339(&s).map(|t| t.with_timezone(&Utc)).map_err(|e| conversion(i, Box::new(e)))
    };
    let event_id: String = r.get(1)?;
    Ok(ProjectionFailure {
        schema: r.get(0)?,
        event_id: event_id.parse().map_err(|e| conversion(1, Box::new(e)))?,
        position: r.get::<_, i64>(2)? as u64,
        aggregate_id: r.get(3)?,
        error: r.get(4)?,
        attempts: r.get::<_, i64>(5)? as u32,
        first_seen_at: time(6)?,
        last_seen_at: time(7)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_swap_exchanges_the_failures_of_the_two_schemas() {
        let target = ReadSchema::named("rebuilt").unwrap();
        let sql = exchange(&ReadSchema::live(), &target);
        let steps: Vec<&str> = sql.lines().map(str::trim).collect();
        assert_eq!(
            steps,
            [
                "UPDATE projection_failures SET schema_name = 'rebuilt__swapping' WHERE schema_name = 'spiced_read';",
                "UPDATE projection_failures SET schema_name = 'spiced_read' WHERE schema_name = 'rebuilt';",
                "UPDATE projection_failures SET schema_name = 'rebuilt' WHERE schema_name = 'rebuilt__swapping';",
            ]
        );
    }
}
