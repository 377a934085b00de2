//! Rebuild targets: creating a fresh read-model schema and swapping it in for the live one.
//!
//! The swap is one transaction: it blocks the live projection (a lock on its position row's
//! table), reads the log head, applies to the target whatever the log holds beyond the
//! target's position (the live projection can only have applied events at or below that head),
//! carries over the live Kafka partition positions, and exchanges the two names (and those of
//! their recorded failures, so each schema keeps the list of events it is missing). Queries keep
//! reading the live schema until the commit; the live projection's next transaction finds the
//! new tables under the live name, at a position at least as far as its own.

use super::apply::{lite_apply_all, pg_apply_all};
use super::{Applied, ReadBatch, ReadSchema};
use crate::db::{Backend, Database, DbError};
use std::future::Future;

impl Database {
    /// Creates a rebuild target; refuses a name already in use.
    pub async fn create_read_schema(&self, schema: &ReadSchema) -> Result<(), DbError> {
        if self.read_schema_exists(schema).await? {
            return Err(DbError::Setup(format!(
                "schema {} already exists; pick another --target-schema or drop it first",
                schema.name()
            )));
        }
        match &self.backend {
            Backend::Postgres(pg) => {
                let client = pg.pool().get().await?;
                client.batch_execute(&schema.pg_ddl()).await?;
            }
            Backend::Sqlite(lite) => {
                let conn = lite.connection();
                let conn = conn.lock().await;
                conn.execute_batch(&schema.lite_ddl())?;
            }
        }
        Ok(())
    }

    pub async fn read_schema_exists(&self, schema: &ReadSchema) -> Result<bool, DbError> {
        match &self.backend {
            Backend::Postgres(pg) => {
                let client = pg.pool().get().await?;
                let row = client
                    .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[&schema.name()])
                    .await?;
                Ok(row.is_some())
            }
            Backend::Sqlite(lite) => {
                let conn = lite.connection();
                let conn = conn.lock().await;
                let name = format!("{}__projection", schema.name());
                let n: i64 = conn.query_row(
                    "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
                    [name],
                    |r| r.get(0),
                )?;
                Ok(n > 0)
            }
        }
    }

    /// Exchanges `target` and the live schema (the old live tables end up under the target's
    /// name), after catching the target up to the log head. `catch_up(from, to)` returns the
    /// batches of log positions `from..=to`. Returns the live position after the swap, and the
    /// catch-up's events the read store refused (recorded, like any).
    pub async fn swap_read_schema<F, Fut>(&self, target: &ReadSchema, catch_up: F) -> Result<Applied, DbError>
    where
        F: Fn(u64, u64) -> Fut,
        Fut: Future<Output = Result<Vec<ReadBatch>, DbError>>,
    {
        let live = ReadSchema::live();
        match &self.backend {
            Backend::Postgres(pg) => {
                let mut client = pg.pool().get().await?;
                let tx = client.transaction().await?;
                tx.batch_execute(&format!("LOCK TABLE {} IN EXCLUSIVE MODE", live.pg("projection"))).await?;
                let head = self.index.head().await?;
                let from = super::apply::pg_position(&tx, target, false).await? + 1;
                let applied = pg_apply_all(&tx, target, &catch_up(from, head).await?).await?;
                tx.batch_execute(&pg_exchange(&live, target)).await?;
                tx.commit().await?;
                Ok(applied)
            }
            Backend::Sqlite(lite) => {
                let conn = lite.connection();
                let conn = conn.lock().await;
                // BEGIN IMMEDIATE stops every writer of the file, the log index's too, so the
                // head read here stays the head until the commit.
                conn.execute_batch("BEGIN IMMEDIATE")?;
                let result = async {
                    let head = conn.query_row("SELECT position FROM log_head WHERE id = 1", [], |r| r.get::<_, i64>(0))? as u64;
                    let from = super::apply::lite_position(&conn, target)? + 1;
                    let batches = catch_up(from, head).await?;
                    let applied = lite_apply_all(&conn, target, &batches)?;
                    conn.execute_batch(&lite_exchange(&live, target))?;
                    Ok::<Applied, DbError>(applied)
                }
                .await;
                match result {
                    Ok(applied) => {
                        conn.execute_batch("COMMIT")?;
                        Ok(applied)
                    }
                    Err(e) => {
                        let _ = conn.execute_batch("ROLLBACK");
                        Err(e)
                    }
                }
            }
        }
    }
}

fn pg_exchange(live: &ReadSchema, target: &ReadSchema) -> String {
    let (l, t) = (live.name(), target.name());
    format!(
        "INSERT INTO \"{t}\".projection_partitions SELECT * FROM \"{l}\".projection_partitions \
             ON CONFLICT (topic, partition) DO UPDATE SET position = GREATEST(\"{t}\".projection_partitions.position, EXCLUDED.position);
         ALTER SCHEMA \"{l}\" RENAME TO \"{t}__swapping\";
         ALTER SCHEMA \"{t}\" RENAME TO \"{l}\";
         ALTER SCHEMA \"{t}__swapping\" RENAME TO \"{t}\";
         {}",
        super::failures::exchange(live, target)
    )
}

fn lite_exchange(live: &ReadSchema, target: &ReadSchema) -> String {
    let (l, t) = (live.name(), target.name());
    let mut sql = format!(
        "INSERT INTO \"{t}__projection_partitions\" SELECT * FROM \"{l}__projection_partitions\" WHERE true \
             ON CONFLICT (topic, partition) DO UPDATE SET position = max(position, excluded.position);"
    );
    for table in ["read_models", "projection", "projection_partitions"] {
        sql.push_str(&format!(
            "ALTER TABLE \"{l}__{table}\" RENAME TO \"{t}__swapping__{table}\";
             ALTER TABLE \"{t}__{table}\" RENAME TO \"{l}__{table}\";
             ALTER TABLE \"{t}__swapping__{table}\" RENAME TO \"{t}__{table}\";"
        ));
    }
    sql.push_str(&super::failures::exchange(live, target));
    sql
}
