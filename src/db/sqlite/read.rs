//! The read models on SQLite: tables named `<schema>__*` in the one file, rows upserted one
//! statement each, a refused batch retried one change at a time in savepoints, and the
//! rebuild's swap as table renames under `BEGIN IMMEDIATE`.

use super::{position, table, time_text, Lite};
use crate::db::read::batch::{cascade_position, is_database, one_by_one, refuse, unapplied, Tried};
use crate::db::read::failures::exchange;
use crate::db::read::{release, spliced};
use crate::db::read::{Applied, CatchUp, Change, Page, Progress, ProjectionFailure, ReadBatch, ReadKind, ReadSchema, ReadStore, Reference, Refused, Snapshot, HANDLER};
use crate::db::DbError;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::Connection;

const UPSERT: &str = "INSERT INTO {rm} AS r (kind, key, parent, db, state, version, position, cascade_position, deleted, created_at, updated_at) \
     SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10 \
     WHERE NOT EXISTS (SELECT 1 FROM {rm} d WHERE d.kind = 'database' AND d.key = ?4 AND d.cascade_position > ?7) \
     ON CONFLICT (kind, key) DO UPDATE SET parent = excluded.parent, state = excluded.state, version = excluded.version, \
         position = excluded.position, cascade_position = max(r.cascade_position, excluded.cascade_position), \
         deleted = excluded.deleted, updated_at = excluded.updated_at \
     WHERE r.version < excluded.version";
const CASCADE: &str = "DELETE FROM {rm} WHERE db = ?1 AND kind <> 'database' AND position < ?2";
const CASCADE_SEARCH: &str = "DELETE FROM {search} WHERE rowid IN \
     (SELECT rowid FROM {rm} WHERE db = ?1 AND kind = 'instance' AND position < ?2)";
/// A row's entry in the search table: its rowid, and its data's strings while it is live.
const UNINDEX: &str = "DELETE FROM {search} WHERE rowid = (SELECT rowid FROM {rm} WHERE kind = 'instance' AND key = ?1)";
const INDEX: &str = "INSERT INTO {search} (rowid, body) SELECT rowid, \
     (SELECT group_concat(value, ' ') FROM json_tree(state, '$.data') WHERE type = 'text') \
     FROM {rm} WHERE kind = 'instance' AND key = ?1 AND deleted = 0";
const REFERRERS: &str = "SELECT key, state FROM {rm} WHERE kind = 'instance' AND parent = ?1 AND deleted = 0 \
     AND ((json_type(state, ?2) = 'text' AND json_extract(state, ?2) = ?3) \
          OR (json_type(state, ?2) = 'array' AND EXISTS (SELECT 1 FROM json_each(state, ?2) e WHERE e.value = ?3)))";
const DELETED: &str = "SELECT 1 FROM {rm} WHERE kind = 'instance' AND key = ?1 AND deleted = 1";
const SET_STATE: &str = "UPDATE {rm} SET state = ?2 WHERE kind = 'instance' AND key = ?1 AND version = ?3";
const RELEASE_ROW: &str = "UPDATE {rm} SET state = ?2 WHERE kind = 'instance' AND key = ?1";
const CLAIM: &str = "INSERT INTO processed_events (handler, event_id, aggregate_id, sequence_number, status, owner, processed_at) \
     VALUES (?1, ?2, ?3, ?4, 'done', ?1, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')) ON CONFLICT (handler, event_id) DO NOTHING";
const PARTITION: &str = "INSERT INTO {parts} (topic, partition, position) VALUES (?1, ?2, ?3) \
     ON CONFLICT (topic, partition) DO UPDATE SET position = max({parts}.position, excluded.position)";
const KAFKA_POSITION: &str = "UPDATE {proj} SET position = max(position, (SELECT coalesce(min(position), 0) FROM {parts})) WHERE id = 1";
const RECORD: &str = "INSERT INTO projection_failures (schema_name, event_id, position, aggregate_id, error) \
     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (schema_name, event_id) DO UPDATE \
     SET attempts = attempts + 1, error = excluded.error, last_seen_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";
const LIST_FAILURES: &str = "SELECT schema_name, event_id, position, aggregate_id, error, attempts, first_seen_at, last_seen_at \
     FROM projection_failures WHERE schema_name = ?1 ORDER BY position, event_id";
const DELETE_FAILURE: &str = "DELETE FROM projection_failures WHERE schema_name = ?1 AND event_id = ?2";

/// DDL creating the schema's tables if they do not exist (SQLite).
pub(super) fn ddl(schema: &ReadSchema) -> String {
    let s = schema.name();
    format!(
        "CREATE TABLE IF NOT EXISTS \"{s}__read_models\" (
             kind TEXT NOT NULL, key TEXT NOT NULL, parent TEXT NOT NULL, db TEXT NOT NULL,
             state TEXT, version INTEGER NOT NULL, position INTEGER NOT NULL,
             cascade_position INTEGER NOT NULL DEFAULT 0, deleted INTEGER NOT NULL DEFAULT 0,
             created_at TEXT NOT NULL, updated_at TEXT NOT NULL,
             PRIMARY KEY (kind, key));
         CREATE INDEX IF NOT EXISTS \"{s}__read_models_page\" ON \"{s}__read_models\" (kind, parent, key) WHERE deleted = 0;
         CREATE INDEX IF NOT EXISTS \"{s}__read_models_db\" ON \"{s}__read_models\" (db);
         CREATE TABLE IF NOT EXISTS \"{s}__projection\" (
             id INTEGER PRIMARY KEY CHECK (id = 1), position INTEGER NOT NULL);
         INSERT INTO \"{s}__projection\" VALUES (1, 0) ON CONFLICT DO NOTHING;
         CREATE TABLE IF NOT EXISTS \"{s}__projection_partitions\" (
             topic TEXT NOT NULL, partition INTEGER NOT NULL, position INTEGER NOT NULL,
             PRIMARY KEY (topic, partition));
         CREATE VIRTUAL TABLE IF NOT EXISTS \"{s}__search\" USING fts5(body, tokenize = 'unicode61 remove_diacritics 2');"
    )
}

fn sql(template: &str, schema: &ReadSchema) -> String {
    spliced(template, |t| table(schema, t)).replace("{search}", &table(schema, "search"))
}

/// Brings an instance row's search entry in line with the row (`q=`): FTS5 has no index on
/// JSON, so the projection keeps it, in the transaction that changed the row.
fn sync_search(tx: &Connection, schema: &ReadSchema, key: &str) -> Result<(), DbError> {
    tx.prepare_cached(&sql(UNINDEX, schema))?.execute([key])?;
    tx.prepare_cached(&sql(INDEX, schema))?.execute([key])?;
    Ok(())
}

/// A database's cascade: its classes and instances written before it go, with their search
/// entries.
fn cascade(tx: &Connection, schema: &ReadSchema, c: &Change) -> Result<(), DbError> {
    let params = rusqlite::params![c.row.key, c.row.position as i64];
    tx.execute(&sql(CASCADE_SEARCH, schema), params)?;
    tx.execute(&sql(CASCADE, schema), params)?;
    Ok(())
}

#[async_trait]
impl ReadStore for Lite {
    async fn apply(&self, schema: &ReadSchema, batch: &ReadBatch) -> Result<Applied, DbError> {
        let mut conn = self.conn.lock().await;
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let applied = apply_guarded(&tx, schema, batch)?;
        tx.commit()?;
        Ok(applied)
    }

    async fn one(&self, kind: ReadKind, key: &str) -> Result<Snapshot, DbError> {
        super::query::one(self, kind, key).await
    }

    async fn page(&self, page: &Page<'_>) -> Result<Snapshot, DbError> {
        super::query::page(self, page).await
    }

    async fn count(&self, page: &Page<'_>, bound: u64) -> Result<u64, DbError> {
        super::query::count(self, page, bound).await
    }

    async fn referencing(&self, refs: &[Reference], id: &str, after: Option<&str>, limit: usize) -> Result<Snapshot, DbError> {
        super::query::referencing(self, refs, id, after, limit).await
    }

    async fn position(&self, schema: &ReadSchema) -> Result<u64, DbError> {
        let conn = self.conn.lock().await;
        position(&conn, schema)
    }

    async fn failures(&self, schema: &ReadSchema) -> Result<Vec<ProjectionFailure>, DbError> {
        let conn = self.conn.lock().await;
        let mut stmt = conn.prepare(LIST_FAILURES)?;
        let rows = stmt.query_map([schema.name()], failure)?.collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    async fn reapply(&self, schema: &ReadSchema, change: &Change) -> Result<Option<Refused>, DbError> {
        let mut conn = self.conn.lock().await;
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute_batch("SAVEPOINT change")?;
        let refused = match settle(&tx, apply_change(&tx, schema, change))? {
            Tried::Done(()) => {
                tx.execute(DELETE_FAILURE, rusqlite::params![schema.name(), change.event_id.to_string()])?;
                None
            }
            Tried::Refused(e) => {
                let refused = Refused::of(change, &e);
                record(&tx, schema, std::slice::from_ref(&refused))?;
                Some(refused)
            }
        };
        tx.commit()?;
        Ok(refused)
    }

    async fn create_tables(&self, schema: &ReadSchema) -> Result<(), DbError> {
        let conn = self.conn.lock().await;
        conn.execute_batch(&ddl(schema))?;
        Ok(())
    }

    async fn schema_exists(&self, schema: &ReadSchema) -> Result<bool, DbError> {
        let conn = self.conn.lock().await;
        let name = format!("{}__projection", schema.name());
        let n: i64 = conn.query_row("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1", [name], |r| r.get(0))?;
        Ok(n > 0)
    }

    async fn swap(&self, target: &ReadSchema, catch_up: &CatchUp<'_>) -> Result<Applied, DbError> {
        let conn = self.conn.lock().await;
        // BEGIN IMMEDIATE stops every writer of the file, the log index's too, so the head
        // read here stays the head until the commit.
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let started = conn
            .query_row("SELECT position FROM log_head WHERE id = 1", [], |r| r.get::<_, i64>(0))
            .map_err(DbError::from)
            .and_then(|head| Ok((position(&conn, target)? + 1, head as u64)));
        let batches = match started {
            Ok((from, head)) => catch_up(from, head).await,
            Err(e) => Err(e),
        };
        let swapped = batches.and_then(|batches| {
            let applied = apply_all(&conn, target, &batches)?;
            conn.execute_batch(&swap_names(&ReadSchema::live(), target))?;
            Ok(applied)
        });
        match swapped {
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

/// [`apply_batch`] in a savepoint; when the read store refuses the batch for its content, the
/// savepoint is rolled back and the batch applied one change at a time.
fn apply_guarded(tx: &Connection, schema: &ReadSchema, batch: &ReadBatch) -> Result<Applied, DbError> {
    tx.execute_batch("SAVEPOINT batch")?;
    match apply_batch(tx, schema, batch) {
        Ok(position) => {
            tx.execute_batch("RELEASE SAVEPOINT batch")?;
            Ok(Applied { position, refused: Vec::new() })
        }
        Err(e) if e.refuses_content() => {
            tracing::warn!(error = %e, "the read store refused a batch; applying its changes one at a time");
            tx.execute_batch("ROLLBACK TO SAVEPOINT batch; RELEASE SAVEPOINT batch")?;
            apply_one_by_one(tx, schema, batch)
        }
        Err(e) => Err(e),
    }
}

/// Ends the savepoint `change` as [`crate::db::postgres`] does.
fn settle<T>(tx: &Connection, result: Result<T, DbError>) -> Result<Tried<T>, DbError> {
    match result {
        Ok(v) => {
            tx.execute_batch("RELEASE SAVEPOINT change")?;
            Ok(Tried::Done(v))
        }
        Err(e) if e.refuses_content() => {
            tx.execute_batch("ROLLBACK TO SAVEPOINT change; RELEASE SAVEPOINT change")?;
            Ok(Tried::Refused(e))
        }
        Err(e) => Err(e),
    }
}

/// The batch one change at a time, each claim and each change in a savepoint of its own;
/// the refused ones are recorded, the batch's progress is recorded as for a whole batch.
fn apply_one_by_one(tx: &Connection, schema: &ReadSchema, batch: &ReadBatch) -> Result<Applied, DbError> {
    let mut refused = Vec::new();
    let fresh: Vec<&Change> = match &batch.progress {
        Progress::Log { to } => match unapplied(position(tx, schema)?, *to, &batch.changes) {
            Some(changes) => changes,
            None => return Ok(Applied { position: position(tx, schema)?, refused }),
        },
        Progress::Kafka(_) => {
            let mut fresh = Vec::new();
            for c in &batch.changes {
                tx.execute_batch("SAVEPOINT change")?;
                match settle(tx, claim(tx, std::slice::from_ref(c)))? {
                    Tried::Done(claimed) => fresh.extend(claimed),
                    Tried::Refused(e) => refuse(&mut refused, c, &e),
                }
            }
            fresh
        }
    };
    for c in one_by_one(&fresh) {
        tx.execute_batch("SAVEPOINT change")?;
        if let Tried::Refused(e) = settle(tx, apply_change(tx, schema, c))? {
            refuse(&mut refused, c, &e);
        }
    }
    record(tx, schema, &refused)?;
    let position = progress(tx, schema, &batch.progress)?;
    Ok(Applied { position, refused })
}

/// One change alone: its row, and for a database deletion the cascade.
fn apply_change(tx: &Connection, schema: &ReadSchema, c: &Change) -> Result<(), DbError> {
    upsert(tx, schema, &sql(UPSERT, schema), c)?;
    if c.cascade {
        cascade(tx, schema, c)?;
    }
    apply_releases(tx, schema, &[c])
}

/// The rule of `db::read::release`, from both ends, for changes already applied.
fn apply_releases(tx: &Connection, schema: &ReadSchema, changes: &[&Change]) -> Result<(), DbError> {
    for c in changes {
        for (parent, property, id) in release::released_by(c) {
            let path = format!("$.data.\"{property}\"");
            let rows: Vec<(String, String)> = tx
                .prepare(&sql(REFERRERS, schema))?
                .query_map(rusqlite::params![parent, path, id], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            for (key, state) in rows {
                let state: serde_json::Value = serde_json::from_str(&state).map_err(|e| DbError::Inconsistent(format!("read model row {key}: {e}")))?;
                if let Some(state) = release::without(&state, &[(&property, &id)]) {
                    tx.execute(&sql(RELEASE_ROW, schema), rusqlite::params![key, state.to_string()])?;
                    sync_search(tx, schema, &key)?;
                }
            }
        }
        let refs = release::giving_way(c);
        let Some(state) = c.row.state.as_ref().filter(|_| !refs.is_empty()) else { continue };
        let mut released = Vec::new();
        for (property, id, target) in &refs {
            if tx.prepare_cached(&sql(DELETED, schema))?.exists([target])? {
                released.push((property.as_str(), id.as_str()));
            }
        }
        if let Some(state) = release::without(state, &released) {
            if tx.execute(&sql(SET_STATE, schema), rusqlite::params![c.row.key, state.to_string(), c.row.version as i64])? > 0 {
                sync_search(tx, schema, &c.row.key)?;
            }
        }
    }
    Ok(())
}

fn apply_batch(tx: &Connection, schema: &ReadSchema, batch: &ReadBatch) -> Result<u64, DbError> {
    let claimed: Vec<&Change> = match &batch.progress {
        Progress::Log { to } => {
            let stored = position(tx, schema)?;
            match unapplied(stored, *to, &batch.changes) {
                Some(changes) => changes,
                None => return Ok(stored),
            }
        }
        Progress::Kafka(_) => claim(tx, &batch.changes)?,
    };
    let statement = sql(UPSERT, schema);
    for c in claimed.iter().copied().filter(is_database) {
        upsert(tx, schema, &statement, c)?;
    }
    for c in claimed.iter().copied().filter(|c| c.cascade) {
        cascade(tx, schema, c)?;
    }
    for c in claimed.iter().copied().filter(|c| !is_database(c)) {
        upsert(tx, schema, &statement, c)?;
    }
    apply_releases(tx, schema, &claimed)?;
    progress(tx, schema, &batch.progress)
}

fn claim<'a>(tx: &Connection, changes: &'a [Change]) -> Result<Vec<&'a Change>, DbError> {
    let mut fresh = Vec::new();
    for c in changes {
        let n = tx.prepare_cached(CLAIM)?.execute(rusqlite::params![
            HANDLER,
            c.event_id.to_string(),
            c.row.key,
            c.row.version as i64
        ])?;
        if n == 1 {
            fresh.push(c);
        }
    }
    Ok(fresh)
}

fn upsert(tx: &Connection, schema: &ReadSchema, upsert: &str, c: &Change) -> Result<(), DbError> {
    let r = &c.row;
    let changed = tx.execute(
        upsert,
        rusqlite::params![
            r.kind.as_str(),
            r.key,
            r.parent,
            r.db,
            r.state.as_ref().map(serde_json::Value::to_string),
            r.version as i64,
            r.position as i64,
            cascade_position(c),
            r.deleted,
            time_text(&r.updated_at),
        ],
    )?;
    if changed > 0 && r.kind == ReadKind::Instance {
        sync_search(tx, schema, &r.key)?;
    }
    Ok(())
}

fn progress(tx: &Connection, schema: &ReadSchema, progress: &Progress) -> Result<u64, DbError> {
    match progress {
        Progress::Log { to } => {
            let update = format!("UPDATE {} SET position = ?1 WHERE id = 1", table(schema, "projection"));
            tx.execute(&update, [*to as i64])?;
        }
        Progress::Kafka(partitions) => {
            let partition_upsert = sql(PARTITION, schema);
            for (topic, partition, position) in partitions {
                tx.execute(&partition_upsert, rusqlite::params![topic, partition, *position as i64])?;
            }
            tx.execute(&sql(KAFKA_POSITION, schema), [])?;
        }
    }
    position(tx, schema)
}

/// Applies batches inside an open SQLite transaction.
fn apply_all(tx: &Connection, schema: &ReadSchema, batches: &[ReadBatch]) -> Result<Applied, DbError> {
    let mut all = Applied { position: position(tx, schema)?, refused: Vec::new() };
    for batch in batches {
        let applied = apply_guarded(tx, schema, batch)?;
        all.position = applied.position;
        all.refused.extend(applied.refused);
    }
    Ok(all)
}

fn record(tx: &Connection, schema: &ReadSchema, refused: &[Refused]) -> Result<(), DbError> {
    for r in refused {
        let params = rusqlite::params![schema.name(), r.event_id.to_string(), r.position as i64, r.aggregate_id, r.error];
        tx.execute(RECORD, params)?;
    }
    Ok(())
}

/// The live and target schemas exchange names, and the target takes the live Kafka positions.
fn swap_names(live: &ReadSchema, target: &ReadSchema) -> String {
    let (l, t) = (live.name(), target.name());
    let mut sql = format!(
        "INSERT INTO \"{t}__projection_partitions\" SELECT * FROM \"{l}__projection_partitions\" WHERE true \
             ON CONFLICT (topic, partition) DO UPDATE SET position = max(position, excluded.position);"
    );
    for table in ["read_models", "projection", "projection_partitions", "search"] {
        sql.push_str(&format!(
            "ALTER TABLE \"{l}__{table}\" RENAME TO \"{t}__swapping__{table}\";
             ALTER TABLE \"{t}__{table}\" RENAME TO \"{l}__{table}\";
             ALTER TABLE \"{t}__swapping__{table}\" RENAME TO \"{t}__{table}\";"
        ));
    }
    sql.push_str(&exchange(live, target));
    sql
}

fn failure(r: &rusqlite::Row<'_>) -> rusqlite::Result<ProjectionFailure> {
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
    fn statements_use_sqlite_placeholders_and_tables() {
        let s = sql(CASCADE, &ReadSchema::live());
        assert_eq!(s, "DELETE FROM \"spiced_read__read_models\" WHERE db = ?1 AND kind <> 'database' AND position < ?2");
    }
}
