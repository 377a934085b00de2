//! Applying changes to a read-model schema, with the projection's progress, in one transaction.
//!
//! Equivalent to applying the events one by one in log order, whatever order batches arrive in
//! (Kafka partitions interleave): within a batch, databases first (a deleted database records
//! the log position of its deletion), then the deletion cascades (classes and instances of that
//! database written before it are removed), then classes and instances, each refused when its
//! database was deleted after it. Several changes to one row go in rounds, in order, so each
//! statement touches a row at most once.
//!
//! A batch the read store refuses for its content ([`DbError::refuses_content`]) is applied
//! again in the same transaction one change at a time, each in a savepoint, in the same order;
//! the changes it refuses are set aside in `projection_failures` ([`super::failures`]) and the
//! rest commits with the batch's progress, so one event can never hold the projection back.
//! Any other error fails the batch as before (the caller retries it whole).

use super::{ReadKind, ReadRow, ReadSchema, HANDLER};
use crate::db::{Backend, Database, DbError};
use chrono::SecondsFormat;
use std::collections::{HashMap, HashSet};
use tokio_postgres::types::ToSql;
use uuid::Uuid;

/// One outcome event as a row change.
#[derive(Debug, Clone)]
pub struct Change {
    pub event_id: Uuid,
    pub row: ReadRow,
    /// A database deletion: its classes and instances go with it.
    pub cascade: bool,
}

/// How far a batch takes the projection.
#[derive(Debug, Clone)]
pub enum Progress {
    /// Following the log: the batch holds every outcome of the segments up to `to` that come
    /// after the schema's position.
    Log { to: u64 },
    /// Consuming Kafka: per (topic, partition), every event up to this log position is applied.
    /// Each event is claimed in `processed_events`, so a redelivery changes nothing.
    Kafka(Vec<(String, i32, u64)>),
}

#[derive(Debug, Clone)]
pub struct ReadBatch {
    pub changes: Vec<Change>,
    pub progress: Progress,
}

/// What applying a batch did.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    /// The schema's position afterwards.
    pub position: u64,
    /// Events the read store refused for their content: recorded in `projection_failures`,
    /// not in the read models; the rest of the batch and its progress are committed.
    pub refused: Vec<Refused>,
}

const PG_UPSERT: &str = "INSERT INTO {rm} AS r (kind, key, parent, db, state, version, position, cascade_position, deleted, created_at, updated_at) \
     SELECT u.kind, u.key, u.parent, u.db, u.state, u.version, u.position, u.cascade, u.deleted, u.at, u.at \
     FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::int8[], $7::int8[], $8::int8[], $9::bool[], $10::timestamptz[]) \
         AS u(kind, key, parent, db, state, version, position, cascade, deleted, at) \
     WHERE NOT EXISTS (SELECT 1 FROM {rm} d WHERE d.kind = 'database' AND d.key = u.db AND d.cascade_position > u.position) \
     ON CONFLICT (kind, key) DO UPDATE SET parent = EXCLUDED.parent, state = EXCLUDED.state, version = EXCLUDED.version, \
         position = EXCLUDED.position, cascade_position = GREATEST(r.cascade_position, EXCLUDED.cascade_position), \
         deleted = EXCLUDED.deleted, updated_at = EXCLUDED.updated_at \
     WHERE r.version < EXCLUDED.version";
const LITE_UPSERT: &str = "INSERT INTO {rm} AS r (kind, key, parent, db, state, version, position, cascade_position, deleted, created_at, updated_at) \
     SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10 \
     WHERE NOT EXISTS (SELECT 1 FROM {rm} d WHERE d.kind = 'database' AND d.key = ?4 AND d.cascade_position > ?7) \
     ON CONFLICT (kind, key) DO UPDATE SET parent = excluded.parent, state = excluded.state, version = excluded.version, \
         position = excluded.position, cascade_position = max(r.cascade_position, excluded.cascade_position), \
         deleted = excluded.deleted, updated_at = excluded.updated_at \
     WHERE r.version < excluded.version";
const CASCADE: &str = "DELETE FROM {rm} WHERE db = $1 AND kind <> 'database' AND position < $2";
const PG_CLAIM: &str = "INSERT INTO processed_events (handler, event_id, aggregate_id, sequence_number, status, owner, processed_at) \
     SELECT $1, u.e, u.a, u.s, 'done', $1, now() FROM UNNEST($2::uuid[], $3::text[], $4::int8[]) AS u(e, a, s) \
     ON CONFLICT (handler, event_id) DO NOTHING RETURNING event_id";
const LITE_CLAIM: &str = "INSERT INTO processed_events (handler, event_id, aggregate_id, sequence_number, status, owner, processed_at) \
     VALUES (?1, ?2, ?3, ?4, 'done', ?1, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')) ON CONFLICT (handler, event_id) DO NOTHING";
const PARTITION: &str = "INSERT INTO {parts} (topic, partition, position) VALUES ($1, $2, $3) \
     ON CONFLICT (topic, partition) DO UPDATE SET position = {greatest}({parts}.position, excluded.position)";
const KAFKA_POSITION: &str = "UPDATE {proj} SET position = {greatest}(position, (SELECT coalesce(min(position), 0) FROM {parts})) WHERE id = 1";

impl Database {
    /// Applies a batch to `schema` and records its progress, atomically. Returns the schema's
    /// position afterwards; the part of a `Progress::Log` batch at or below it is skipped
    /// (already applied, or a rebuilt schema was swapped in ahead of this follower). Events the
    /// read store refuses are set aside and returned; the rest is applied.
    pub async fn apply_read_batch(&self, schema: &ReadSchema, batch: &ReadBatch) -> Result<Applied, DbError> {
        match &self.backend {
            Backend::Postgres(pg) => {
                let mut client = pg.pool().get().await?;
                let tx = client.transaction().await?;
                let applied = pg_apply_guarded(&tx, schema, batch).await?;
                tx.commit().await?;
                Ok(applied)
            }
            Backend::Sqlite(lite) => {
                let conn = lite.connection();
                let mut conn = conn.lock().await;
                let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let applied = lite_apply_guarded(&tx, schema, batch)?;
                tx.commit()?;
                Ok(applied)
            }
        }
    }
}

/// A statement tried in a savepoint.
pub(super) enum Tried<T> {
    Done(T),
    /// The read store refused it for its content; the savepoint is rolled back.
    Refused(DbError),
}

/// The changes of a `Progress::Log` batch not yet applied, or `None` when the schema's
/// position `stored` is already at or past the batch.
fn unapplied(stored: u64, to: u64, changes: &[Change]) -> Option<Vec<&Change>> {
    (stored < to).then(|| changes.iter().filter(|c| c.row.position > stored).collect())
}

/// The changes one at a time in the order a batch applies them: databases (each with its own
/// cascade, which touches only other rows), then classes and instances, each in batch order.
fn one_by_one<'a>(changes: &[&'a Change]) -> Vec<&'a Change> {
    let (databases, children): (Vec<&Change>, Vec<&Change>) = changes.iter().copied().partition(is_database);
    databases.into_iter().chain(children).collect()
}

/// Adds `c` to the refused events, once per event (Kafka may deliver one twice in a batch).
fn refuse(refused: &mut Vec<Refused>, c: &Change, e: &DbError) {
    if !refused.iter().any(|r| r.event_id == c.event_id) {
        refused.push(Refused::of(c, e));
    }
}

/// Changes grouped so that each group holds a row at most once, in order.
fn rounds<'a>(changes: impl Iterator<Item = &'a Change>) -> Vec<Vec<&'a Change>> {
    let mut seen: HashMap<(ReadKind, &str), usize> = HashMap::new();
    let mut rounds: Vec<Vec<&Change>> = Vec::new();
    for c in changes {
        let n = seen.entry((c.row.kind, c.row.key.as_str())).or_default();
        if rounds.len() <= *n {
            rounds.push(Vec::new());
        }
        rounds[*n].push(c);
        *n += 1;
    }
    rounds
}

fn is_database(c: &&Change) -> bool {
    c.row.kind == ReadKind::Database
}

fn cascade_position(c: &Change) -> i64 {
    if c.cascade {
        c.row.position as i64
    } else {
        0
    }
}

fn sql(template: &str, schema: &ReadSchema, pg: bool) -> String {
    let table = |t: &str| if pg { schema.pg(t) } else { schema.lite(t) };
    let s = template
        .replace("{rm}", &table("read_models"))
        .replace("{proj}", &table("projection"))
        .replace("{parts}", &table("projection_partitions"))
        .replace("{greatest}", if pg { "GREATEST" } else { "max" });
    if pg {
        s
    } else {
        s.replace('$', "?")
    }
}

/// [`pg_apply`] in a savepoint; when the read store refuses the batch for its content, the
/// savepoint is rolled back and the batch applied one change at a time.
async fn pg_apply_guarded(tx: &tokio_postgres::Transaction<'_>, schema: &ReadSchema, batch: &ReadBatch) -> Result<Applied, DbError> {
    tx.batch_execute("SAVEPOINT batch").await?;
    match pg_apply(tx, schema, batch).await {
        Ok(position) => {
            tx.batch_execute("RELEASE SAVEPOINT batch").await?;
            Ok(Applied { position, refused: Vec::new() })
        }
        Err(e) if e.refuses_content() => {
            tracing::warn!(error = %e, "the read store refused a batch; applying its changes one at a time");
            tx.batch_execute("ROLLBACK TO SAVEPOINT batch; RELEASE SAVEPOINT batch").await?;
            pg_apply_one_by_one(tx, schema, batch).await
        }
        Err(e) => Err(e),
    }
}

/// Ends the savepoint `change` around the statement that gave `result`: kept when it
/// succeeded, rolled back when the read store refused it (a savepoint rolled back to stays
/// open until released); any other error fails the transaction.
pub(super) async fn pg_settle<T>(tx: &tokio_postgres::Transaction<'_>, result: Result<T, DbError>) -> Result<Tried<T>, DbError> {
    match result {
        Ok(v) => {
            tx.batch_execute("RELEASE SAVEPOINT change").await?;
            Ok(Tried::Done(v))
        }
        Err(e) if e.refuses_content() => {
            tx.batch_execute("ROLLBACK TO SAVEPOINT change; RELEASE SAVEPOINT change").await?;
            Ok(Tried::Refused(e))
        }
        Err(e) => Err(e),
    }
}

/// The batch one change at a time, each claim and each change in a savepoint of its own;
/// the refused ones are recorded, the batch's progress is recorded as for a whole batch.
async fn pg_apply_one_by_one(tx: &tokio_postgres::Transaction<'_>, schema: &ReadSchema, batch: &ReadBatch) -> Result<Applied, DbError> {
    let mut refused = Vec::new();
    let fresh: Vec<&Change> = match &batch.progress {
        Progress::Log { to } => match unapplied(pg_position(tx, schema, true).await?, *to, &batch.changes) {
            Some(changes) => changes,
            None => return Ok(Applied { position: pg_position(tx, schema, false).await?, refused }),
        },
        Progress::Kafka(_) => {
            let mut fresh = Vec::new();
            for c in &batch.changes {
                tx.batch_execute("SAVEPOINT change").await?;
                match pg_settle(tx, pg_claim(tx, std::slice::from_ref(c)).await).await? {
                    Tried::Done(claimed) => fresh.extend(claimed),
                    Tried::Refused(e) => refuse(&mut refused, c, &e),
                }
            }
            fresh
        }
    };
    for c in one_by_one(&fresh) {
        tx.batch_execute("SAVEPOINT change").await?;
        if let Tried::Refused(e) = pg_settle(tx, pg_apply_change(tx, schema, c).await).await? {
            refuse(&mut refused, c, &e);
        }
    }
    pg_record(tx, schema, &refused).await?;
    let position = pg_progress(tx, schema, &batch.progress).await?;
    Ok(Applied { position, refused })
}

/// One change alone: its row, and for a database deletion the cascade.
pub(super) async fn pg_apply_change(tx: &tokio_postgres::Transaction<'_>, schema: &ReadSchema, c: &Change) -> Result<(), DbError> {
    pg_upsert(tx, schema, &[c]).await?;
    if c.cascade {
        tx.execute(&sql(CASCADE, schema, true), &[&c.row.key, &(c.row.position as i64)]).await?;
    }
    Ok(())
}

async fn pg_apply(tx: &tokio_postgres::Transaction<'_>, schema: &ReadSchema, batch: &ReadBatch) -> Result<u64, DbError> {
    let claimed: Vec<&Change> = match &batch.progress {
        Progress::Log { to } => {
            let stored = pg_position(tx, schema, true).await?;
            match unapplied(stored, *to, &batch.changes) {
                Some(changes) => changes,
                None => return Ok(stored),
            }
        }
        Progress::Kafka(_) => pg_claim(tx, &batch.changes).await?,
    };
    for round in rounds(claimed.iter().copied().filter(is_database)) {
        pg_upsert(tx, schema, &round).await?;
    }
    let cascade = sql(CASCADE, schema, true);
    for c in claimed.iter().filter(|c| c.cascade) {
        tx.execute(&cascade, &[&c.row.key, &(c.row.position as i64)]).await?;
    }
    for round in rounds(claimed.iter().copied().filter(|c| !is_database(c))) {
        pg_upsert(tx, schema, &round).await?;
    }
    pg_progress(tx, schema, &batch.progress).await
}

/// The events of the batch not applied before; records them done.
async fn pg_claim<'a>(tx: &tokio_postgres::Transaction<'_>, changes: &'a [Change]) -> Result<Vec<&'a Change>, DbError> {
    let ids: Vec<Uuid> = changes.iter().map(|c| c.event_id).collect();
    let aggregates: Vec<&str> = changes.iter().map(|c| c.row.key.as_str()).collect();
    let seqs: Vec<i64> = changes.iter().map(|c| c.row.version as i64).collect();
    let rows = tx.query(PG_CLAIM, &[&HANDLER, &ids, &aggregates, &seqs]).await?;
    let fresh: HashSet<Uuid> = rows.iter().map(|r| r.get(0)).collect();
    Ok(changes.iter().filter(|c| fresh.contains(&c.event_id)).collect())
}

async fn pg_upsert(tx: &tokio_postgres::Transaction<'_>, schema: &ReadSchema, round: &[&Change]) -> Result<(), DbError> {
    let col = |f: fn(&Change) -> String| round.iter().map(|c| f(c)).collect::<Vec<String>>();
    let kinds = col(|c| c.row.kind.as_str().to_string());
    let keys = col(|c| c.row.key.clone());
    let parents = col(|c| c.row.parent.clone());
    let dbs = col(|c| c.row.db.clone());
    let states: Vec<Option<serde_json::Value>> = round.iter().map(|c| c.row.state.clone()).collect();
    let versions: Vec<i64> = round.iter().map(|c| c.row.version as i64).collect();
    let positions: Vec<i64> = round.iter().map(|c| c.row.position as i64).collect();
    let cascades: Vec<i64> = round.iter().map(|c| cascade_position(c)).collect();
    let deleted: Vec<bool> = round.iter().map(|c| c.row.deleted).collect();
    let at: Vec<chrono::DateTime<chrono::Utc>> = round.iter().map(|c| c.row.updated_at).collect();
    let params: [&(dyn ToSql + Sync); 10] =
        [&kinds, &keys, &parents, &dbs, &states, &versions, &positions, &cascades, &deleted, &at];
    tx.execute(&sql(PG_UPSERT, schema, true), &params).await?;
    Ok(())
}

pub(super) async fn pg_position(tx: &tokio_postgres::Transaction<'_>, schema: &ReadSchema, lock: bool) -> Result<u64, DbError> {
    let suffix = if lock { " FOR UPDATE" } else { "" };
    let row = tx
        .query_one(&format!("SELECT position FROM {} WHERE id = 1{suffix}", schema.pg("projection")), &[])
        .await?;
    Ok(row.get::<_, i64>(0) as u64)
}

async fn pg_progress(tx: &tokio_postgres::Transaction<'_>, schema: &ReadSchema, progress: &Progress) -> Result<u64, DbError> {
    match progress {
        Progress::Log { to } => {
            let update = format!("UPDATE {} SET position = $1 WHERE id = 1", schema.pg("projection"));
            tx.execute(&update, &[&(*to as i64)]).await?;
        }
        Progress::Kafka(partitions) => {
            let upsert = sql(PARTITION, schema, true);
            for (topic, partition, position) in partitions {
                tx.execute(&upsert, &[topic, partition, &(*position as i64)]).await?;
            }
            tx.execute(&sql(KAFKA_POSITION, schema, true), &[]).await?;
        }
    }
    pg_position(tx, schema, false).await
}

/// [`lite_apply`] in a savepoint; when the read store refuses the batch for its content, the
/// savepoint is rolled back and the batch applied one change at a time.
fn lite_apply_guarded(tx: &rusqlite::Connection, schema: &ReadSchema, batch: &ReadBatch) -> Result<Applied, DbError> {
    tx.execute_batch("SAVEPOINT batch")?;
    match lite_apply(tx, schema, batch) {
        Ok(position) => {
            tx.execute_batch("RELEASE SAVEPOINT batch")?;
            Ok(Applied { position, refused: Vec::new() })
        }
        Err(e) if e.refuses_content() => {
            tracing::warn!(error = %e, "the read store refused a batch; applying its changes one at a time");
            tx.execute_batch("ROLLBACK TO SAVEPOINT batch; RELEASE SAVEPOINT batch")?;
            lite_apply_one_by_one(tx, schema, batch)
        }
        Err(e) => Err(e),
    }
}

/// [`pg_settle`] on SQLite.
pub(super) fn lite_settle<T>(tx: &rusqlite::Connection, result: Result<T, DbError>) -> Result<Tried<T>, DbError> {
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

/// [`pg_apply_one_by_one`] on SQLite.
fn lite_apply_one_by_one(tx: &rusqlite::Connection, schema: &ReadSchema, batch: &ReadBatch) -> Result<Applied, DbError> {
    let mut refused = Vec::new();
    let fresh: Vec<&Change> = match &batch.progress {
        Progress::Log { to } => match unapplied(lite_position(tx, schema)?, *to, &batch.changes) {
            Some(changes) => changes,
            None => return Ok(Applied { position: lite_position(tx, schema)?, refused }),
        },
        Progress::Kafka(_) => {
            let mut fresh = Vec::new();
            for c in &batch.changes {
                tx.execute_batch("SAVEPOINT change")?;
                match lite_settle(tx, lite_claim(tx, std::slice::from_ref(c)))? {
                    Tried::Done(claimed) => fresh.extend(claimed),
                    Tried::Refused(e) => refuse(&mut refused, c, &e),
                }
            }
            fresh
        }
    };
    for c in one_by_one(&fresh) {
        tx.execute_batch("SAVEPOINT change")?;
        if let Tried::Refused(e) = lite_settle(tx, lite_apply_change(tx, schema, c))? {
            refuse(&mut refused, c, &e);
        }
    }
    lite_record(tx, schema, &refused)?;
    let position = lite_progress(tx, schema, &batch.progress)?;
    Ok(Applied { position, refused })
}

/// One change alone: its row, and for a database deletion the cascade.
pub(super) fn lite_apply_change(tx: &rusqlite::Connection, schema: &ReadSchema, c: &Change) -> Result<(), DbError> {
    lite_upsert(tx, &sql(LITE_UPSERT, schema, false), c)?;
    if c.cascade {
        tx.execute(&sql(CASCADE, schema, false), rusqlite::params![c.row.key, c.row.position as i64])?;
    }
    Ok(())
}

fn lite_apply(tx: &rusqlite::Connection, schema: &ReadSchema, batch: &ReadBatch) -> Result<u64, DbError> {
    let claimed: Vec<&Change> = match &batch.progress {
        Progress::Log { to } => {
            let stored = lite_position(tx, schema)?;
            match unapplied(stored, *to, &batch.changes) {
                Some(changes) => changes,
                None => return Ok(stored),
            }
        }
        Progress::Kafka(_) => lite_claim(tx, &batch.changes)?,
    };
    let upsert = sql(LITE_UPSERT, schema, false);
    for c in claimed.iter().copied().filter(is_database) {
        lite_upsert(tx, &upsert, c)?;
    }
    let cascade = sql(CASCADE, schema, false);
    for c in claimed.iter().copied().filter(|c| c.cascade) {
        tx.execute(&cascade, rusqlite::params![c.row.key, c.row.position as i64])?;
    }
    for c in claimed.iter().copied().filter(|c| !is_database(c)) {
        lite_upsert(tx, &upsert, c)?;
    }
    lite_progress(tx, schema, &batch.progress)
}

fn lite_claim<'a>(tx: &rusqlite::Connection, changes: &'a [Change]) -> Result<Vec<&'a Change>, DbError> {
    let mut fresh = Vec::new();
    for c in changes {
        let n = tx.prepare_cached(LITE_CLAIM)?.execute(rusqlite::params![
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

/// The timestamp format stored on SQLite: fixed width, so text order is time order.
pub(super) fn lite_time(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn lite_upsert(tx: &rusqlite::Connection, upsert: &str, c: &Change) -> Result<(), DbError> {
    let r = &c.row;
    tx.execute(
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
            lite_time(&r.updated_at),
        ],
    )?;
    Ok(())
}

pub(super) fn lite_position(tx: &rusqlite::Connection, schema: &ReadSchema) -> Result<u64, DbError> {
    let sql = format!("SELECT position FROM {} WHERE id = 1", schema.lite("projection"));
    Ok(tx.query_row(&sql, [], |r| r.get::<_, i64>(0))? as u64)
}

fn lite_progress(tx: &rusqlite::Connection, schema: &ReadSchema, progress: &Progress) -> Result<u64, DbError> {
    match progress {
        Progress::Log { to } => {
            let update = format!("UPDATE {} SET position = ?1 WHERE id = 1", schema.lite("projection"));
            tx.execute(&update, [*to as i64])?;
        }
        Progress::Kafka(partitions) => {
            let upsert = sql(PARTITION, schema, false);
            for (topic, partition, position) in partitions {
                tx.execute(&upsert, rusqlite::params![topic, partition, *position as i64])?;
            }
            tx.execute(&sql(KAFKA_POSITION, schema, false), [])?;
        }
    }
    lite_position(tx, schema)
}

/// Applies batches inside an open PostgreSQL transaction (the swap catches up under its lock).
pub(super) async fn pg_apply_all(
    tx: &tokio_postgres::Transaction<'_>,
    schema: &ReadSchema,
    batches: &[ReadBatch],
) -> Result<Applied, DbError> {
    let mut all = Applied { position: pg_position(tx, schema, false).await?, refused: Vec::new() };
    for batch in batches {
        let applied = pg_apply_guarded(tx, schema, batch).await?;
        all.position = applied.position;
        all.refused.extend(applied.refused);
    }
    Ok(all)
}

/// Applies batches inside an open SQLite transaction.
pub(super) fn lite_apply_all(tx: &rusqlite::Connection, schema: &ReadSchema, batches: &[ReadBatch]) -> Result<Applied, DbError> {
    let mut all = Applied { position: lite_position(tx, schema)?, refused: Vec::new() };
    for batch in batches {
        let applied = lite_apply_guarded(tx, schema, batch)?;
        all.position = applied.position;
        all.refused.extend(applied.refused);
    }
    Ok(all)
}


// Refused events are recorded in `projection_failures` ([`super::failures`] lists and
// re-applies them) in the transaction of the batch that refused them.

/// An event the read store refused, as the projection saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    pub event_id: Uuid,
    pub position: u64,
    pub aggregate_id: String,
    pub error: String,
}

impl Refused {
    pub(super) fn of(c: &Change, e: &DbError) -> Refused {
        Refused { event_id: c.event_id, position: c.row.position, aggregate_id: c.row.key.clone(), error: e.to_string() }
    }
}

const PG_RECORD: &str = "INSERT INTO projection_failures (schema_name, event_id, position, aggregate_id, error) \
     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (schema_name, event_id) DO UPDATE \
     SET attempts = projection_failures.attempts + 1, error = EXCLUDED.error, last_seen_at = now()";
const LITE_RECORD: &str = "INSERT INTO projection_failures (schema_name, event_id, position, aggregate_id, error) \
     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (schema_name, event_id) DO UPDATE \
     SET attempts = attempts + 1, error = excluded.error, last_seen_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";
/// Records refused events in the open transaction of the batch that refused them.
pub(super) async fn pg_record(tx: &tokio_postgres::Transaction<'_>, schema: &ReadSchema, refused: &[Refused]) -> Result<(), DbError> {
    for r in refused {
        // The error and the id may echo the very NUL that was refused.
        let (aggregate, error) = (crate::db::storable(&r.aggregate_id), crate::db::storable(&r.error));
        tx.execute(PG_RECORD, &[&schema.name(), &r.event_id, &(r.position as i64), &aggregate.as_ref(), &error.as_ref()]).await?;
    }
    Ok(())
}

pub(super) fn lite_record(tx: &rusqlite::Connection, schema: &ReadSchema, refused: &[Refused]) -> Result<(), DbError> {
    for r in refused {
        let params = rusqlite::params![schema.name(), r.event_id.to_string(), r.position as i64, r.aggregate_id, r.error];
        tx.execute(LITE_RECORD, params)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn change(key: &str, version: u64) -> Change {
        Change {
            event_id: Uuid::new_v4(),
            cascade: false,
            row: ReadRow {
                kind: ReadKind::Instance,
                key: key.into(),
                parent: String::new(),
                db: "d".into(),
                state: None,
                version,
                position: version,
                deleted: false,
                created_at: Utc::now(),
                updated_at: Utc::now(),
            },
        }
    }

    #[test]
    fn rounds_hold_each_row_once_and_keep_its_order() {
        let changes = [change("a", 1), change("b", 1), change("a", 2), change("a", 3), change("b", 2)];
        let rounds = rounds(changes.iter());
        let shape: Vec<Vec<(&str, u64)>> = rounds
            .iter()
            .map(|r| r.iter().map(|c| (c.row.key.as_str(), c.row.version)).collect())
            .collect();
        assert_eq!(shape, vec![vec![("a", 1), ("b", 1)], vec![("a", 2), ("b", 2)], vec![("a", 3)]]);
    }

    #[test]
    fn one_by_one_puts_databases_first_and_keeps_batch_order() {
        let mut db = change("d", 1);
        db.row.kind = ReadKind::Database;
        let changes = [change("a", 1), db.clone(), change("b", 1), change("a", 2)];
        let refs: Vec<&Change> = changes.iter().collect();
        let order: Vec<(&str, u64)> = one_by_one(&refs).iter().map(|c| (c.row.key.as_str(), c.row.version)).collect();
        assert_eq!(order, [("d", 1), ("a", 1), ("b", 1), ("a", 2)]);
    }

    #[test]
    fn a_log_batch_skips_what_the_schema_holds() {
        let changes = [change("a", 1), change("a", 2), change("a", 3)];
        let left: Vec<u64> = unapplied(1, 3, &changes).unwrap().iter().map(|c| c.row.position).collect();
        assert_eq!(left, [2, 3]);
        assert!(unapplied(3, 3, &changes).is_none());
    }

    #[test]
    fn sqlite_statements_use_sqlite_placeholders_and_tables() {
        let s = sql(CASCADE, &ReadSchema::live(), false);
        assert_eq!(s, "DELETE FROM \"spiced_read__read_models\" WHERE db = ?1 AND kind <> 'database' AND position < ?2");
    }
}
