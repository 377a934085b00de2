//! The read models on PostgreSQL: one schema per read-model set (`spiced_read` live), rows
//! upserted in rounds with `UNNEST` arrays, a refused batch retried one change at a time in
//! savepoints, and the rebuild's swap as three `ALTER SCHEMA … RENAME`s in one transaction.

use super::{table, Pg};
use crate::db::read::batch::{cascade_position, is_database, one_by_one, refuse, rounds, unapplied, Tried};
use crate::db::read::failures::exchange;
use crate::db::read::filter::ValueType;
use crate::db::read::search::valid_config_name;
use crate::db::read::sort::is_identifier;
use crate::db::read::{release, spliced};
use crate::db::read::{Applied, CatchUp, Change, Page, Progress, ProjectionFailure, ReadBatch, ReadKind, ReadSchema, ReadStore, Reference, Refused, Snapshot, HANDLER};
use crate::db::{storable, DbError};
use async_trait::async_trait;
use serde_json::json;
use std::collections::HashSet;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

const UPSERT: &str = "INSERT INTO {rm} AS r (kind, key, parent, db, state, version, position, cascade_position, deleted, created_at, updated_at) \
     SELECT u.kind, u.key, u.parent, u.db, u.state, u.version, u.position, u.cascade, u.deleted, u.at, u.at \
     FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::int8[], $7::int8[], $8::int8[], $9::bool[], $10::timestamptz[]) \
         AS u(kind, key, parent, db, state, version, position, cascade, deleted, at) \
     WHERE NOT EXISTS (SELECT 1 FROM {rm} d WHERE d.kind = 'database' AND d.key = u.db AND d.cascade_position > u.position) \
     ON CONFLICT (kind, key) DO UPDATE SET parent = EXCLUDED.parent, state = EXCLUDED.state, version = EXCLUDED.version, \
         position = EXCLUDED.position, cascade_position = GREATEST(r.cascade_position, EXCLUDED.cascade_position), \
         deleted = EXCLUDED.deleted, updated_at = EXCLUDED.updated_at \
     WHERE r.version < EXCLUDED.version";
const CASCADE: &str = "DELETE FROM {rm} WHERE db = $1 AND kind <> 'database' AND position < $2";
const REFERRERS: &str = "SELECT key, state FROM {rm} WHERE kind = 'instance' AND parent = $1 AND NOT deleted \
     AND ((state -> 'data') @> $2::jsonb OR (state -> 'data') @> $3::jsonb)";
const DELETED: &str = "SELECT key FROM {rm} WHERE kind = 'instance' AND key = ANY($1) AND deleted";
const SET_STATE: &str = "UPDATE {rm} SET state = $2 WHERE kind = 'instance' AND key = $1 AND version = $3";
const RELEASE_ROW: &str = "UPDATE {rm} SET state = $2 WHERE kind = 'instance' AND key = $1";
const CLAIM: &str = "INSERT INTO processed_events (handler, event_id, aggregate_id, sequence_number, status, owner, processed_at) \
     SELECT $1, u.e, u.a, u.s, 'done', $1, now() FROM UNNEST($2::uuid[], $3::text[], $4::int8[]) AS u(e, a, s) \
     ON CONFLICT (handler, event_id) DO NOTHING RETURNING event_id";
const PARTITION: &str = "INSERT INTO {parts} (topic, partition, position) VALUES ($1, $2, $3) \
     ON CONFLICT (topic, partition) DO UPDATE SET position = GREATEST({parts}.position, excluded.position)";
const KAFKA_POSITION: &str = "UPDATE {proj} SET position = GREATEST(position, (SELECT coalesce(min(position), 0) FROM {parts})) WHERE id = 1";
const RECORD: &str = "INSERT INTO projection_failures (schema_name, event_id, position, aggregate_id, error) \
     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (schema_name, event_id) DO UPDATE \
     SET attempts = projection_failures.attempts + 1, error = EXCLUDED.error, last_seen_at = now()";
const LIST_FAILURES: &str = "SELECT schema_name, event_id, position, aggregate_id, error, attempts, first_seen_at, last_seen_at \
     FROM projection_failures WHERE schema_name = $1 ORDER BY position, event_id";
const EXISTING_INDEXES: &str = "SELECT indexname::text FROM pg_indexes WHERE schemaname = $1 AND indexname = ANY($2)";
const DELETE_FAILURE: &str = "DELETE FROM projection_failures WHERE schema_name = $1 AND event_id = $2";

/// DDL creating the schema's tables if they do not exist (PostgreSQL), with a search column
/// per text search configuration in use ([`search_columns`]) and, for the live schema, the
/// indexes of queries ([`search_ddl`]; a rebuild target gets them when complete).
pub(super) fn ddl(schema: &ReadSchema, text_search: &[String]) -> String {
    let s = schema.name();
    let search = if schema.is_live() { search_ddl(schema, text_search) } else { String::new() };
    let tables = format!(
        "CREATE SCHEMA IF NOT EXISTS \"{s}\";
         CREATE TABLE IF NOT EXISTS \"{s}\".read_models (
             kind text COLLATE \"C\" NOT NULL,
             key text COLLATE \"C\" NOT NULL,
             parent text COLLATE \"C\" NOT NULL,
             db text COLLATE \"C\" NOT NULL,
             state jsonb,
             version bigint NOT NULL,
             position bigint NOT NULL,
             cascade_position bigint NOT NULL DEFAULT 0,
             deleted boolean NOT NULL DEFAULT false,
             created_at timestamptz NOT NULL,
             updated_at timestamptz NOT NULL,
             PRIMARY KEY (kind, key));
         CREATE INDEX IF NOT EXISTS read_models_page ON \"{s}\".read_models (kind, parent, key) WHERE NOT deleted;
         CREATE INDEX IF NOT EXISTS read_models_db ON \"{s}\".read_models (db);
         CREATE INDEX IF NOT EXISTS read_models_data ON \"{s}\".read_models
             USING gin ((state -> 'data') jsonb_path_ops) WHERE kind = 'instance';
         CREATE TABLE IF NOT EXISTS \"{s}\".projection (
             id int PRIMARY KEY CHECK (id = 1), position bigint NOT NULL);
         INSERT INTO \"{s}\".projection VALUES (1, 0) ON CONFLICT DO NOTHING;
         CREATE TABLE IF NOT EXISTS \"{s}\".projection_partitions (
             topic text NOT NULL, partition int NOT NULL, position bigint NOT NULL,
             PRIMARY KEY (topic, partition));"
    );
    format!("{tables}\n{}{search}", search_columns(schema, text_search))
}

/// One stored `tsvector` column per text search configuration in use (`search_<config>`,
/// `query::search_document`), and none for a configuration no longer in use. Stored, so that
/// ranking a match reads its document instead of recomputing it from the data, and so that
/// PostgreSQL keeps statistics of its words (an estimate of how many rows a word matches
/// lets the planner pick between the GIN index and a walk in id order). Adding one to a
/// filled table rewrites the table once (`spiced migrate`); dropping one does not.
fn search_columns(schema: &ReadSchema, text_search: &[String]) -> String {
    let s = schema.name();
    let configs: Vec<&String> = text_search.iter().filter(|c| valid_config_name(c)).collect();
    let added: String = configs
        .iter()
        .map(|c| {
            format!(
                "ALTER TABLE \"{s}\".read_models ADD COLUMN IF NOT EXISTS search_{c} tsvector GENERATED ALWAYS AS \
                 (CASE WHEN kind = 'instance' THEN jsonb_to_tsvector('{c}'::regconfig, state -> 'data', '[\"string\"]') END) STORED;\n"
            )
        })
        .collect();
    let kept: Vec<String> = configs.iter().map(|c| format!("'search_{c}'")).collect();
    format!(
        "{added}DO $$ DECLARE c text; BEGIN
             FOR c IN SELECT attname FROM pg_attribute WHERE attrelid = '\"{s}\".read_models'::regclass
                 AND attname LIKE 'search\\_%' AND NOT attisdropped AND attname <> ALL (ARRAY[{}]::text[]) LOOP
                 EXECUTE format('ALTER TABLE \"{s}\".read_models DROP COLUMN %I', c);
             END LOOP;
         END $$;\n",
        kept.join(", ")
    )
}

/// One GIN index per text search configuration in use, over its search column, so a search
/// is an index scan. (Before the stored columns, `read_models_search_<config>` indexed the
/// expression; it is dropped.)
fn search_ddl(schema: &ReadSchema, text_search: &[String]) -> String {
    let s = schema.name();
    text_search
        .iter()
        .filter(|c| valid_config_name(c))
        .map(|c| {
            format!(
                "DROP INDEX IF EXISTS \"{s}\".read_models_search_{c};
                 CREATE INDEX IF NOT EXISTS read_models_text_{c} ON \"{s}\".read_models USING gin ({});\n",
                super::query::search_document(c)
            )
        })
        .collect()
}

/// Every index of queries `schema` lacks: the search indexes and those of the `indexed`
/// properties its live classes declare.
async fn complete_indexes(client: &impl tokio_postgres::GenericClient, schema: &ReadSchema, text_search: &[String]) -> Result<(), DbError> {
    client.batch_execute(&search_ddl(schema, text_search)).await?;
    let classes = format!("SELECT state FROM {} WHERE kind = 'class' AND NOT deleted", table(schema, "read_models"));
    for row in client.query(&classes, &[]).await? {
        let state: Option<serde_json::Value> = row.get(0);
        for (name, ty) in indexed_properties(state.as_ref()) {
            client.batch_execute(&index_ddl(schema, name, ty)).await?;
        }
    }
    Ok(())
}

fn sql(template: &str, schema: &ReadSchema) -> String {
    spliced(template, |t| table(schema, t))
}

#[async_trait]
impl ReadStore for Pg {
    async fn apply(&self, schema: &ReadSchema, batch: &ReadBatch) -> Result<Applied, DbError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let applied = apply_guarded(&tx, schema, batch).await?;
        tx.commit().await?;
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
        let client = self.pool.get().await?;
        let sql = format!("SELECT position FROM {} WHERE id = 1", table(schema, "projection"));
        Ok(client.query_one(&sql, &[]).await?.get::<_, i64>(0) as u64)
    }

    async fn failures(&self, schema: &ReadSchema) -> Result<Vec<ProjectionFailure>, DbError> {
        let client = self.pool.get().await?;
        let rows = client.query(LIST_FAILURES, &[&schema.name()]).await?;
        Ok(rows.iter().map(failure).collect())
    }

    async fn reapply(&self, schema: &ReadSchema, change: &Change) -> Result<Option<Refused>, DbError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.batch_execute("SAVEPOINT change").await?;
        let refused = match settle(&tx, apply_change(&tx, schema, change).await).await? {
            Tried::Done(()) => {
                tx.execute(DELETE_FAILURE, &[&schema.name(), &change.event_id]).await?;
                None
            }
            Tried::Refused(e) => {
                let refused = Refused::of(change, &e);
                record(&tx, schema, std::slice::from_ref(&refused)).await?;
                Some(refused)
            }
        };
        tx.commit().await?;
        Ok(refused)
    }

    async fn create_tables(&self, schema: &ReadSchema) -> Result<(), DbError> {
        let client = self.pool.get().await?;
        client.batch_execute(&ddl(schema, &self.text_search)).await?;
        Ok(())
    }

    async fn complete(&self, schema: &ReadSchema) -> Result<(), DbError> {
        let client = self.pool.get().await?;
        complete_indexes(&**client, schema, &self.text_search).await
    }

    async fn schema_exists(&self, schema: &ReadSchema) -> Result<bool, DbError> {
        let client = self.pool.get().await?;
        let row = client.query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[&schema.name()]).await?;
        Ok(row.is_some())
    }

    async fn swap(&self, target: &ReadSchema, catch_up: &CatchUp<'_>) -> Result<Applied, DbError> {
        let live = ReadSchema::live();
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.batch_execute(&format!("LOCK TABLE {} IN EXCLUSIVE MODE", table(&live, "projection"))).await?;
        // The head as committed now: a batch committing later waits for the live projection,
        // which waits for this lock.
        let head = tx.query_one("SELECT position FROM log_head WHERE id = 1", &[]).await?.get::<_, i64>(0) as u64;
        let from = position(&tx, target, false).await? + 1;
        let applied = apply_all(&tx, target, &catch_up(from, head).await?).await?;
        // Those the catch-up's classes need (the rest were built when the target completed).
        complete_indexes(&*tx, target, &self.text_search).await?;
        tx.batch_execute(&swap_names(&live, target)).await?;
        tx.commit().await?;
        Ok(applied)
    }
}

/// [`apply_batch`] in a savepoint; when the read store refuses the batch for its content, the
/// savepoint is rolled back and the batch applied one change at a time.
async fn apply_guarded(tx: &tokio_postgres::Transaction<'_>, schema: &ReadSchema, batch: &ReadBatch) -> Result<Applied, DbError> {
    tx.batch_execute("SAVEPOINT batch").await?;
    match apply_batch(tx, schema, batch).await {
        Ok(position) => {
            tx.batch_execute("RELEASE SAVEPOINT batch").await?;
            Ok(Applied { position, refused: Vec::new() })
        }
        Err(e) if e.refuses_content() => {
            tracing::warn!(error = %e, "the read store refused a batch; applying its changes one at a time");
            tx.batch_execute("ROLLBACK TO SAVEPOINT batch; RELEASE SAVEPOINT batch").await?;
            apply_one_by_one(tx, schema, batch).await
        }
        Err(e) => Err(e),
    }
}

/// Ends the savepoint `change` around the statement that gave `result`: kept when it
/// succeeded, rolled back when the read store refused it (a savepoint rolled back to stays
/// open until released); any other error fails the transaction.
async fn settle<T>(tx: &tokio_postgres::Transaction<'_>, result: Result<T, DbError>) -> Result<Tried<T>, DbError> {
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
async fn apply_one_by_one(tx: &tokio_postgres::Transaction<'_>, schema: &ReadSchema, batch: &ReadBatch) -> Result<Applied, DbError> {
    let mut refused = Vec::new();
    let fresh: Vec<&Change> = match &batch.progress {
        Progress::Log { to } => match unapplied(position(tx, schema, true).await?, *to, &batch.changes) {
            Some(changes) => changes,
            None => return Ok(Applied { position: position(tx, schema, false).await?, refused }),
        },
        Progress::Kafka(_) => {
            let mut fresh = Vec::new();
            for c in &batch.changes {
                tx.batch_execute("SAVEPOINT change").await?;
                match settle(tx, claim(tx, std::slice::from_ref(c)).await).await? {
                    Tried::Done(claimed) => fresh.extend(claimed),
                    Tried::Refused(e) => refuse(&mut refused, c, &e),
                }
            }
            fresh
        }
    };
    for c in one_by_one(&fresh) {
        tx.batch_execute("SAVEPOINT change").await?;
        if let Tried::Refused(e) = settle(tx, apply_change(tx, schema, c).await).await? {
            refuse(&mut refused, c, &e);
        }
    }
    record(tx, schema, &refused).await?;
    let position = progress(tx, schema, &batch.progress).await?;
    Ok(Applied { position, refused })
}

/// One change alone: its row, and for a database deletion the cascade.
async fn apply_change(tx: &tokio_postgres::Transaction<'_>, schema: &ReadSchema, c: &Change) -> Result<(), DbError> {
    upsert(tx, schema, &[c]).await?;
    if c.cascade {
        tx.execute(&sql(CASCADE, schema), &[&c.row.key, &(c.row.position as i64)]).await?;
    }
    apply_releases(tx, schema, &[c]).await?;
    ensure_indexes(tx, schema, &[c]).await
}

/// The rule of `db::read::release`, from both ends, for changes already applied.
async fn apply_releases(tx: &tokio_postgres::Transaction<'_>, schema: &ReadSchema, changes: &[&Change]) -> Result<(), DbError> {
    for c in changes {
        for (parent, property, id) in release::released_by(c) {
            let (one, many) = (json!({ property.clone(): id }), json!({ property.clone(): [id] }));
            for row in tx.query(&sql(REFERRERS, schema), &[&parent, &one, &many]).await? {
                let (key, state): (String, serde_json::Value) = (row.get(0), row.get(1));
                if let Some(state) = release::without(&state, &[(&property, &id)]) {
                    tx.execute(&sql(RELEASE_ROW, schema), &[&key, &state]).await?;
                }
            }
        }
        let refs = release::giving_way(c);
        let (Some(state), false) = (&c.row.state, refs.is_empty()) else { continue };
        let targets: Vec<&str> = refs.iter().map(|(_, _, target)| target.as_str()).collect();
        let gone: HashSet<String> = tx.query(&sql(DELETED, schema), &[&targets]).await?.iter().map(|r| r.get(0)).collect();
        let released: Vec<(&str, &str)> = refs.iter().filter(|r| gone.contains(&r.2)).map(|(p, id, _)| (p.as_str(), id.as_str())).collect();
        if let Some(state) = release::without(state, &released) {
            tx.execute(&sql(SET_STATE, schema), &[&c.row.key, &state, &(c.row.version as i64)]).await?;
        }
    }
    Ok(())
}

async fn apply_batch(tx: &tokio_postgres::Transaction<'_>, schema: &ReadSchema, batch: &ReadBatch) -> Result<u64, DbError> {
    let claimed: Vec<&Change> = match &batch.progress {
        Progress::Log { to } => {
            let stored = position(tx, schema, true).await?;
            match unapplied(stored, *to, &batch.changes) {
                Some(changes) => changes,
                None => return Ok(stored),
            }
        }
        Progress::Kafka(_) => claim(tx, &batch.changes).await?,
    };
    for round in rounds(claimed.iter().copied().filter(is_database)) {
        upsert(tx, schema, &round).await?;
    }
    let cascade = sql(CASCADE, schema);
    for c in claimed.iter().filter(|c| c.cascade) {
        tx.execute(&cascade, &[&c.row.key, &(c.row.position as i64)]).await?;
    }
    for round in rounds(claimed.iter().copied().filter(|c| !is_database(c))) {
        upsert(tx, schema, &round).await?;
    }
    apply_releases(tx, schema, &claimed).await?;
    ensure_indexes(tx, schema, &claimed).await?;
    progress(tx, schema, &batch.progress).await
}

/// The btree index of each property the classes in `changes` declare `indexed`: one per
/// property name and type, over the rows of every class, by class, the property's typed value
/// ([`super::query::typed`], the expression filters on the property and sorts use), then the
/// id, so a class's filter, sort or keyset page on it is a range of the index. Built in the
/// batch's transaction, so on a large table the projection waits for the build (reads do not).
/// A rebuild target gets its indexes when complete. An index stays when the flag is taken
/// away (dropping it is the operator's call).
async fn ensure_indexes(tx: &tokio_postgres::Transaction<'_>, schema: &ReadSchema, changes: &[&Change]) -> Result<(), DbError> {
    if !schema.is_live() {
        return Ok(());
    }
    let wanted: Vec<(&str, ValueType)> =
        changes.iter().filter(|c| c.row.kind == ReadKind::Class).flat_map(|c| indexed_properties(c.row.state.as_ref())).collect();
    if wanted.is_empty() {
        return Ok(());
    }
    // Only the missing ones: `CREATE INDEX IF NOT EXISTS` takes a SHARE lock on the table even
    // when the index is there, and would hold back every other projection process's writes
    // until this batch commits, on every update of a class with an indexed property.
    let names: Vec<String> = wanted.iter().map(|(name, ty)| index_name(name, *ty)).collect();
    let present: HashSet<String> =
        tx.query(EXISTING_INDEXES, &[&schema.name(), &names]).await?.iter().map(|r| r.get(0)).collect();
    for ((name, ty), index) in wanted.into_iter().zip(&names) {
        if !present.contains(index) {
            tx.batch_execute(&index_ddl(schema, name, ty)).await?;
        }
    }
    Ok(())
}

/// The properties a class state declares `indexed`, with their filter types.
fn indexed_properties(class: Option<&serde_json::Value>) -> impl Iterator<Item = (&str, ValueType)> {
    let properties = class.and_then(|s| s["properties"].as_array());
    properties.into_iter().flatten().filter(|p| p["indexed"] == true).filter_map(|p| {
        let (name, ty) = (p["name"].as_str()?, ValueType::of_property(p["type"].as_str()?));
        // Checked when the class was submitted; a log written otherwise gets no index.
        (is_identifier(name) && ty != ValueType::Json).then_some((name, ty))
    })
}

/// The index of `property` as type `ty`: `read_models_ix_<n|t|b|i>_<name>`.
fn index_name(property: &str, ty: ValueType) -> String {
    let kind = match ty {
        ValueType::Number => "n",
        ValueType::Bool => "b",
        ValueType::Instant => "i",
        ValueType::Text | ValueType::Json => "t",
    };
    // PostgreSQL cuts names at 63 bytes: a long property name is shortened and told apart by
    // a hash of it, so two never share an index name.
    let short = match property.len() {
        0..=40 => property.to_string(),
        _ => format!("{}_{:016x}", &property[..24], fnv1a(property)),
    };
    format!("read_models_ix_{kind}_{short}")
}

fn index_ddl(schema: &ReadSchema, property: &str, ty: ValueType) -> String {
    // Not partial: PostgreSQL keeps statistics of an index's expressions only for an index
    // without a predicate, and without them it guesses every condition on the expression at
    // 0.5 % (seen: a `like` prefix matching 11 % planned as a value range and a sort, 110 ms
    // where the key walk takes 3). The few rows that are not live instances cost little.
    format!(
        "CREATE INDEX IF NOT EXISTS {} ON \"{}\".read_models (parent, {}, key)",
        index_name(property, ty),
        schema.name(),
        super::query::typed(property, ty)
    )
}

/// FNV-1a: a hash that is the same in every build, for names that must not change.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// The events of the batch not applied before; records them done.
async fn claim<'a>(tx: &tokio_postgres::Transaction<'_>, changes: &'a [Change]) -> Result<Vec<&'a Change>, DbError> {
    let ids: Vec<Uuid> = changes.iter().map(|c| c.event_id).collect();
    let aggregates: Vec<&str> = changes.iter().map(|c| c.row.key.as_str()).collect();
    let seqs: Vec<i64> = changes.iter().map(|c| c.row.version as i64).collect();
    let rows = tx.query(CLAIM, &[&HANDLER, &ids, &aggregates, &seqs]).await?;
    let fresh: HashSet<Uuid> = rows.iter().map(|r| r.get(0)).collect();
    Ok(changes.iter().filter(|c| fresh.contains(&c.event_id)).collect())
}

async fn upsert(tx: &tokio_postgres::Transaction<'_>, schema: &ReadSchema, round: &[&Change]) -> Result<(), DbError> {
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
    tx.execute(&sql(UPSERT, schema), &params).await?;
    Ok(())
}

async fn position(tx: &tokio_postgres::Transaction<'_>, schema: &ReadSchema, lock: bool) -> Result<u64, DbError> {
    let suffix = if lock { " FOR UPDATE" } else { "" };
    let row = tx
        .query_one(&format!("SELECT position FROM {} WHERE id = 1{suffix}", table(schema, "projection")), &[])
        .await?;
    Ok(row.get::<_, i64>(0) as u64)
}

async fn progress(tx: &tokio_postgres::Transaction<'_>, schema: &ReadSchema, progress: &Progress) -> Result<u64, DbError> {
    match progress {
        Progress::Log { to } => {
            let update = format!("UPDATE {} SET position = $1 WHERE id = 1", table(schema, "projection"));
            tx.execute(&update, &[&(*to as i64)]).await?;
        }
        Progress::Kafka(partitions) => {
            let upsert = sql(PARTITION, schema);
            for (topic, partition, position) in partitions {
                tx.execute(&upsert, &[topic, partition, &(*position as i64)]).await?;
            }
            tx.execute(&sql(KAFKA_POSITION, schema), &[]).await?;
        }
    }
    position(tx, schema, false).await
}

/// Applies batches inside an open PostgreSQL transaction (the swap catches up under its lock).
async fn apply_all(
    tx: &tokio_postgres::Transaction<'_>,
    schema: &ReadSchema,
    batches: &[ReadBatch],
) -> Result<Applied, DbError> {
    let mut all = Applied { position: position(tx, schema, false).await?, refused: Vec::new() };
    for batch in batches {
        let applied = apply_guarded(tx, schema, batch).await?;
        all.position = applied.position;
        all.refused.extend(applied.refused);
    }
    Ok(all)
}

/// Records refused events in the open transaction of the batch that refused them.
async fn record(tx: &tokio_postgres::Transaction<'_>, schema: &ReadSchema, refused: &[Refused]) -> Result<(), DbError> {
    for r in refused {
        // The error and the id may echo the very NUL that was refused.
        let (aggregate, error) = (storable(&r.aggregate_id), storable(&r.error));
        tx.execute(RECORD, &[&schema.name(), &r.event_id, &(r.position as i64), &aggregate.as_ref(), &error.as_ref()]).await?;
    }
    Ok(())
}

/// The live and target schemas exchange names, and the target takes the live Kafka positions.
fn swap_names(live: &ReadSchema, target: &ReadSchema) -> String {
    let (l, t) = (live.name(), target.name());
    format!(
        "INSERT INTO \"{t}\".projection_partitions SELECT * FROM \"{l}\".projection_partitions \
             ON CONFLICT (topic, partition) DO UPDATE SET position = GREATEST(\"{t}\".projection_partitions.position, EXCLUDED.position);
         ALTER SCHEMA \"{l}\" RENAME TO \"{t}__swapping\";
         ALTER SCHEMA \"{t}\" RENAME TO \"{l}\";
         ALTER SCHEMA \"{t}__swapping\" RENAME TO \"{t}\";
         {}",
        exchange(live, target)
    )
}

fn failure(r: &tokio_postgres::Row) -> ProjectionFailure {
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
