//! Reading the read models: one row, keyset pages (optionally filtered), the position.

use super::apply::lite_position;
use super::filter::{render, Condition, Param};
use super::{ReadKind, ReadRow, ReadSchema};
use crate::db::{Backend, Database, DbError};
use chrono::{DateTime, Utc};
use tokio_postgres::types::ToSql;

const COLUMNS: &str = "kind, key, parent, db, state, version, position, deleted, created_at, updated_at";

/// Rows read together with the projection position they reflect (one snapshot).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Every outcome event at or below this log position is in `rows`' schema, but those the
    /// read store refused (recorded in `projection_failures`).
    pub position: u64,
    pub rows: Vec<ReadRow>,
}

/// Wraps a row query so that one statement (one snapshot) also returns the position, even
/// when no row matches.
fn pg_with_position(schema: &ReadSchema, rows_sql: &str) -> String {
    format!(
        "SELECT p.position, r.* FROM {} p LEFT JOIN LATERAL ({rows_sql}) r ON true WHERE p.id = 1 ORDER BY r.key",
        schema.pg("projection")
    )
}

/// A keyset page: rows under `parent` with keys after `after`, in key (byte) order.
#[derive(Debug, Clone)]
pub struct Page<'a> {
    pub kind: ReadKind,
    pub parent: &'a str,
    pub after: Option<&'a str>,
    pub limit: usize,
    pub filter: &'a [Condition],
}

impl Database {
    /// One row of the live schema, deleted or not (a deleted row still has its version).
    pub async fn read_one(&self, kind: ReadKind, key: &str) -> Result<Snapshot, DbError> {
        let schema = ReadSchema::live();
        match &self.backend {
            Backend::Postgres(_) => {
                let rows = format!("SELECT {COLUMNS} FROM {} WHERE kind = $1 AND key = $2", schema.pg("read_models"));
                self.pg_rows(&pg_with_position(&schema, &rows), vec![Box::new(kind.as_str()), Box::new(key.to_string())]).await
            }
            Backend::Sqlite(_) => {
                let sql = format!("SELECT {COLUMNS} FROM {} WHERE kind = ?1 AND key = ?2", schema.lite("read_models"));
                self.lite_rows(sql, vec![kind.as_str().to_string().into(), key.to_string().into()]).await
            }
        }
    }

    /// A page of the live schema.
    pub async fn read_page(&self, page: &Page<'_>) -> Result<Snapshot, DbError> {
        let schema = ReadSchema::live();
        let after = page.after.unwrap_or("").to_string();
        match &self.backend {
            Backend::Postgres(_) => {
                let (filter, params) = render(page.filter, true, 5);
                let rows = format!(
                    "SELECT {COLUMNS} FROM {} WHERE kind = $1 AND parent = $2 AND NOT deleted AND key > $3{filter} ORDER BY key LIMIT $4",
                    schema.pg("read_models")
                );
                let sql = pg_with_position(&schema, &rows);
                let mut bound: Vec<Box<dyn ToSql + Sync + Send>> =
                    vec![Box::new(page.kind.as_str()), Box::new(page.parent.to_string()), Box::new(after), Box::new(page.limit as i64)];
                bound.extend(params.into_iter().map(pg_param));
                self.pg_rows(&sql, bound).await
            }
            Backend::Sqlite(_) => {
                let (filter, params) = render(page.filter, false, 5);
                let sql = format!(
                    "SELECT {COLUMNS} FROM {} WHERE kind = ?1 AND parent = ?2 AND deleted = 0 AND key > ?3{filter} ORDER BY key LIMIT ?4",
                    schema.lite("read_models")
                );
                let mut bound: Vec<rusqlite::types::Value> =
                    vec![page.kind.as_str().to_string().into(), page.parent.to_string().into(), after.into(), (page.limit as i64).into()];
                bound.extend(params.into_iter().map(lite_param));
                self.lite_rows(sql, bound).await
            }
        }
    }

    /// How far the live read models have applied the log: every outcome event at or below this
    /// position is in them, or recorded as refused in `projection_failures`.
    pub async fn projection_position(&self) -> Result<u64, DbError> {
        self.schema_position(&ReadSchema::live()).await
    }

    /// The position of any read-model schema.
    pub async fn schema_position(&self, schema: &ReadSchema) -> Result<u64, DbError> {
        match &self.backend {
            Backend::Postgres(pg) => {
                let client = pg.pool().get().await?;
                let sql = format!("SELECT position FROM {} WHERE id = 1", schema.pg("projection"));
                Ok(client.query_one(&sql, &[]).await?.get::<_, i64>(0) as u64)
            }
            Backend::Sqlite(lite) => {
                let conn = lite.connection();
                let conn = conn.lock().await;
                lite_position(&conn, schema)
            }
        }
    }

    async fn pg_rows(&self, sql: &str, params: Vec<Box<dyn ToSql + Sync + Send>>) -> Result<Snapshot, DbError> {
        let Backend::Postgres(pg) = &self.backend else { unreachable!("called on PostgreSQL only") };
        let client = pg.pool().get().await?;
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect();
        let found = client.query(sql, &refs).await?;
        let position = found.first().map(|r| r.get::<_, i64>(0) as u64).unwrap_or(0);
        // With no matching row, the one result row has the position and NULLs.
        let rows = found.iter().filter(|r| r.get::<_, Option<&str>>(1).is_some()).map(pg_row).collect::<Result<_, _>>()?;
        Ok(Snapshot { position, rows })
    }

    /// The position and the rows under one hold of the connection, so no write comes between.
    async fn lite_rows(&self, sql: String, params: Vec<rusqlite::types::Value>) -> Result<Snapshot, DbError> {
        let Backend::Sqlite(lite) = &self.backend else { unreachable!("called on SQLite only") };
        let conn = lite.connection();
        let conn = conn.lock().await;
        let position = lite_position(&conn, &ReadSchema::live())?;
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(params), lite_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Snapshot { position, rows })
    }
}

fn pg_param(p: Param) -> Box<dyn ToSql + Sync + Send> {
    match p {
        Param::Text(s) => Box::new(s),
        Param::Json(v) => Box::new(v),
        Param::Number(n) => Box::new(n),
    }
}

fn lite_param(p: Param) -> rusqlite::types::Value {
    match p {
        Param::Text(s) => s.into(),
        Param::Number(n) => n.into(),
        Param::Json(v) => v.to_string().into(),
    }
}

fn kind_of(s: &str) -> Result<ReadKind, DbError> {
    match s {
        "database" => Ok(ReadKind::Database),
        "class" => Ok(ReadKind::Class),
        "instance" => Ok(ReadKind::Instance),
        other => Err(DbError::Inconsistent(format!("read model row of unknown kind {other:?}"))),
    }
}

fn pg_row(r: &tokio_postgres::Row) -> Result<ReadRow, DbError> {
    Ok(ReadRow {
        kind: kind_of(r.get(1))?,
        key: r.get(2),
        parent: r.get(3),
        db: r.get(4),
        state: r.get(5),
        version: r.get::<_, i64>(6) as u64,
        position: r.get::<_, i64>(7) as u64,
        deleted: r.get(8),
        created_at: r.get(9),
        updated_at: r.get(10),
    })
}

fn lite_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ReadRow> {
    let time = |i: usize| -> rusqlite::Result<DateTime<Utc>> {
        let s: String = r.get(i)?;
        DateTime::parse_from_rfc3339(&s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e)))
    };
    let kind: String = r.get(0)?;
    let state: Option<String> = r.get(4)?;
    Ok(ReadRow {
        kind: kind_of(&kind).map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e)))?,
        key: r.get(1)?,
        parent: r.get(2)?,
        db: r.get(3)?,
        state: state
            .map(|s| serde_json::from_str(&s))
            .transpose()
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(4, rusqlite::types::Type::Text, Box::new(e)))?,
        version: r.get::<_, i64>(5)? as u64,
        position: r.get::<_, i64>(6)? as u64,
        deleted: r.get(7)?,
        created_at: time(8)?,
        updated_at: time(9)?,
    })
}
