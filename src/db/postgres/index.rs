//! The log index on PostgreSQL.
//!
//! A batch is one transaction on one pooled connection: `BEGIN`, the `FOR UPDATE` read of the
//! head and the look-ups are pipelined (`begin_lookup`), and so are the three writes
//! (`record`, sent while the segment is written), then `COMMIT`; a repair sends its writes
//! with the `COMMIT` (`record_and_commit`). That is per segment, not per command.

use super::Pg;
use crate::db::{prefix_range, DbError, IndexRow, IndexTx, LogIndex, Lookup, LookupRequest};
use crate::domain::{AggregateKey, AggregateType};
use crate::envelope::Kind;
use async_trait::async_trait;
use deadpool_postgres::Object;
use std::collections::HashMap;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;
use uuid::Uuid;

// Both rows: while a batch of the serial protocol holds them, no position can be reserved.
const LOCK_HEAD: &str = "SELECT h.position, r.position FROM log_head h, log_reserved r \
     WHERE h.id = 1 AND r.id = 1 FOR UPDATE";
const SELECT_HEAD: &str = "SELECT position FROM log_head WHERE id = 1";
const SELECT_COMMAND_ROWS: &str = "SELECT event_id, command_id, fingerprint, aggregate_type, \
     aggregate_id, kind, seq, position FROM log_index \
     WHERE command_id = ANY($1) AND kind = 'command' ORDER BY aggregate_type, aggregate_id, seq";
const SELECT_OUTCOME_ROWS: &str = "SELECT event_id, command_id, fingerprint, aggregate_type, \
     aggregate_id, kind, seq, position FROM log_index \
     WHERE command_id = $1 AND kind = 'domain' ORDER BY aggregate_type, aggregate_id, seq";
const SELECT_EVENT_ROWS: &str = "SELECT event_id, command_id, fingerprint, aggregate_type, \
     aggregate_id, kind, seq, position FROM log_index WHERE event_id = ANY($1)";
const SELECT_OUTCOME_HEADS: &str = "SELECT k.t, k.i, v.seq \
     FROM unnest($1::text[], $2::text[]) AS k(t, i) \
     CROSS JOIN LATERAL (SELECT max(seq) AS seq FROM log_index \
         WHERE aggregate_type = k.t AND aggregate_id = k.i AND kind = 'domain') v \
     WHERE v.seq IS NOT NULL";
const SELECT_LAST: &str = "SELECT seq, position FROM log_index \
     WHERE aggregate_type = $1 AND aggregate_id = $2 AND kind = $3 ORDER BY seq DESC LIMIT 1";
// A byte-order range instead of LIKE, so '_' and '%' in names mean themselves; COLLATE "C"
// because the range is computed in byte order, whatever the database's collation.
const SELECT_PREFIXED: &str = "SELECT aggregate_id FROM aggregate_versions \
     WHERE aggregate_type = $1 AND aggregate_id COLLATE \"C\" >= $2 AND aggregate_id COLLATE \"C\" < $3 \
     ORDER BY aggregate_id";
// A primary-key lookup per key. PostgreSQL flattens the lateral subquery into a join, so it is
// the custom plans (see `Pg::connect`) that keep this an index scan as the table grows.
pub const SELECT_VERSIONS: &str = "SELECT k.t, k.i, v.last_seq \
     FROM unnest($1::text[], $2::text[]) AS k(t, i) \
     CROSS JOIN LATERAL (SELECT last_seq FROM aggregate_versions \
         WHERE aggregate_type = k.t AND aggregate_id = k.i) v";
const SELECT_VERSION: &str =
    "SELECT last_seq FROM aggregate_versions WHERE aggregate_type = $1 AND aggregate_id = $2";
const SELECT_POSITIONS: &str = "SELECT seq, position FROM log_index \
     WHERE aggregate_type = $1 AND aggregate_id = $2 AND kind = $3 AND seq BETWEEN $4 AND $5 \
     ORDER BY seq";
const ADVANCE_HEAD: &str =
    "UPDATE log_head SET position = $1::int8 WHERE id = 1 AND position = $1::int8 - 1";
// The same move, failing when the head is elsewhere, so that it can be sent with the `COMMIT`
// in one round trip: the error aborts the transaction and the `COMMIT` then rolls it back.
// The cast is how plain SQL raises an error with a message; it reads the head's column so
// that the planner cannot fold it into a constant, and fail, before the move has been tried.
const ADVANCE_HEAD_OR_FAIL: &str = "WITH moved AS (UPDATE log_head SET position = $1::int8 \
     WHERE id = 1 AND position = $1::int8 - 1 RETURNING position) \
     SELECT CASE WHEN EXISTS (SELECT 1 FROM moved) THEN 0 \
     ELSE (SELECT ('spiced: log head is at ' || position || ', not at position ' || $1::int8 || ' - 1 inside its own lock')::int \
     FROM log_head WHERE id = 1) END";
const INSERT_ROWS: &str = "INSERT INTO log_index (event_id, command_id, fingerprint, \
     aggregate_type, aggregate_id, kind, seq, position) \
     SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], \
     $6::text[], $7::int8[], $8::int8[])";
const RAISE_VERSIONS: &str = "INSERT INTO aggregate_versions (aggregate_type, aggregate_id, last_seq) \
     SELECT t, i, max(s) FROM unnest($1::text[], $2::text[], $3::int8[]) AS u(t, i, s) \
     GROUP BY t, i \
     ON CONFLICT (aggregate_type, aggregate_id) \
     DO UPDATE SET last_seq = GREATEST(aggregate_versions.last_seq, EXCLUDED.last_seq)";

pub(super) fn key_arrays(keys: &[AggregateKey]) -> (Vec<&str>, Vec<&str>) {
    keys.iter().map(|k| (k.aggregate_type.as_str(), k.aggregate_id.as_str())).unzip()
}

/// The serial protocol's next position, refused while positions are reserved: a writer of the
/// pipelined commit (`writer.max_in_flight` above 1) is at work on this database, and the
/// serial protocol does not defer the commands its batches hold.
fn next_serial_position(row: &Row) -> Result<u64, DbError> {
    let (head, reserved) = (row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64);
    if reserved > head {
        return Err(DbError::Inconsistent(format!(
            "log positions {}..={reserved} are reserved by a pipelined writer: every serve process on one \
             database must run the same writer protocol (writer.max_in_flight 1, or above 1 on each)",
            head + 1
        )));
    }
    Ok(head + 1)
}

/// Rows of (aggregate_type, aggregate_id, number) as a map.
pub(super) fn key_map(rows: &[Row]) -> HashMap<AggregateKey, u64> {
    rows.iter()
        .filter_map(|r| {
            let ty = AggregateType::parse(r.get::<_, &str>(0))?;
            Some((AggregateKey::new(ty, r.get(1)), r.get::<_, i64>(2) as u64))
        })
        .collect()
}


pub(super) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).expect("positions and sequences stay below 2^63")
}

fn row_to_index(row: &Row) -> Result<IndexRow, DbError> {
    let ty: String = row.get(3);
    let kind: String = row.get(5);
    Ok(IndexRow {
        event_id: row.get(0),
        command_id: row.get(1),
        fingerprint: row.get(2),
        key: AggregateKey::new(
            AggregateType::parse(&ty)
                .ok_or_else(|| DbError::Inconsistent(format!("unknown aggregate type {ty}")))?,
            row.get(4),
        ),
        kind: Kind::parse(&kind)
            .ok_or_else(|| DbError::Inconsistent(format!("unknown kind {kind}")))?,
        seq: row.get::<_, i64>(6) as u64,
        position: row.get::<_, i64>(7) as u64,
    })
}

#[async_trait]
impl LogIndex for Pg {
    async fn begin(&self) -> Result<Box<dyn IndexTx>, DbError> {
        let client = self.pool.get().await?;
        let mut tx = PgTx { client: Some(client), next: 0, commit: self.index_commit };
        let client = tx.client();
        let lock = client.prepare_cached(LOCK_HEAD).await?;
        let (begin, row) = tokio::join!(client.batch_execute("BEGIN"), client.query_one(&lock, &[]));
        begin?;
        tx.next = next_serial_position(&row?)?;
        Ok(Box::new(tx))
    }

    /// `BEGIN`, the lock and the look-ups in one round trip: the look-ups run after the lock
    /// is granted (the server runs them in order), so they read what every earlier batch
    /// committed.
    async fn begin_lookup(&self, request: &LookupRequest) -> Result<(Box<dyn IndexTx>, Lookup), DbError> {
        let client = self.pool.get().await?;
        let mut tx = PgTx { client: Some(client), next: 0, commit: self.index_commit };
        let client = tx.client();
        let lock = client.prepare_cached(LOCK_HEAD).await?;
        let (begin, row, lookup) = tokio::join!(client.batch_execute("BEGIN"), client.query_one(&lock, &[]), lookup(client, request));
        begin?;
        tx.next = next_serial_position(&row?)?;
        Ok((Box::new(tx), to_lookup(lookup?)?))
    }

    async fn head(&self) -> Result<u64, DbError> {
        let client = self.pool.get().await?;
        let row = client.query_one(SELECT_HEAD, &[]).await?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    async fn version(&self, key: &AggregateKey) -> Result<u64, DbError> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(SELECT_VERSION).await?;
        let row = client
            .query_opt(&stmt, &[&key.aggregate_type.as_str(), &key.aggregate_id])
            .await?;
        Ok(row.map(|r| r.get::<_, i64>(0) as u64).unwrap_or(0))
    }

    async fn positions(
        &self,
        key: &AggregateKey,
        kind: Kind,
        from: u64,
        to: u64,
    ) -> Result<Vec<(u64, u64)>, DbError> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(SELECT_POSITIONS).await?;
        let rows = client
            .query(
                &stmt,
                &[
                    &key.aggregate_type.as_str(),
                    &key.aggregate_id,
                    &kind.as_str(),
                    &to_i64(from),
                    &to_i64(to.min(i64::MAX as u64)),
                ],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u64))
            .collect())
    }

    async fn command(&self, command_id: Uuid) -> Result<Vec<IndexRow>, DbError> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(SELECT_COMMAND_ROWS).await?;
        let rows = client.query(&stmt, &[&vec![command_id]]).await?;
        rows.iter().map(row_to_index).collect()
    }

    async fn outcomes(&self, command_id: Uuid) -> Result<Vec<IndexRow>, DbError> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(SELECT_OUTCOME_ROWS).await?;
        let rows = client.query(&stmt, &[&command_id]).await?;
        rows.iter().map(row_to_index).collect()
    }

    async fn position_of(&self, event_id: Uuid) -> Result<Option<u64>, DbError> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached("SELECT position FROM log_index WHERE event_id = $1").await?;
        let row = client.query_opt(&stmt, &[&event_id]).await?;
        Ok(row.map(|r| r.get::<_, i64>(0) as u64))
    }

    async fn command_seq_before(&self, key: &AggregateKey, position: u64) -> Result<u64, DbError> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(
                "SELECT coalesce(max(seq), 0) FROM log_index \
                 WHERE aggregate_type = $1 AND aggregate_id = $2 AND kind = 'command' AND position < $3",
            )
            .await?;
        let row = client
            .query_one(&stmt, &[&key.aggregate_type.as_str(), &key.aggregate_id, &to_i64(position)])
            .await?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    async fn last(&self, key: &AggregateKey, kind: Kind) -> Result<Option<(u64, u64)>, DbError> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(SELECT_LAST).await?;
        let row = client
            .query_opt(&stmt, &[&key.aggregate_type.as_str(), &key.aggregate_id, &kind.as_str()])
            .await?;
        Ok(row.map(|r| (r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u64)))
    }

    async fn aggregates_with_prefix(
        &self,
        aggregate_type: AggregateType,
        prefix: &str,
    ) -> Result<Vec<String>, DbError> {
        let client = self.pool.get().await?;
        let (low, high) = prefix_range(prefix);
        let rows = client
            .query(SELECT_PREFIXED, &[&aggregate_type.as_str(), &low, &high])
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn ping(&self) -> Result<(), DbError> {
        let client = self.pool.get().await?;
        client.simple_query("SELECT 1").await?;
        Ok(())
    }

    async fn events_after(&self, position: u64) -> Result<u64, DbError> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached("SELECT count(*) FROM log_index WHERE position > $1").await?;
        Ok(client.query_one(&stmt, &[&(position as i64)]).await?.get::<_, i64>(0) as u64)
    }

    async fn all_rows(&self) -> Result<Vec<IndexRow>, DbError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT event_id, command_id, fingerprint, aggregate_type, aggregate_id, kind, seq, position \
                 FROM log_index ORDER BY position, aggregate_type, aggregate_id, kind, seq",
                &[],
            )
            .await?;
        rows.iter().map(row_to_index).collect()
    }

    async fn all_versions(&self) -> Result<HashMap<AggregateKey, u64>, DbError> {
        let client = self.pool.get().await?;
        let rows = client
            .query("SELECT aggregate_type, aggregate_id, last_seq FROM aggregate_versions", &[])
            .await?;
        Ok(key_map(&rows))
    }

    fn reservations(&self) -> Option<&dyn crate::db::Reservations> {
        Some(self)
    }
}

/// A batch's look-ups, pipelined: only the statements with something to ask are sent. The
/// rows are [`to_lookup`]'s to read.
pub(super) async fn lookup(client: &Object, request: &LookupRequest) -> Result<[Vec<Row>; 4], tokio_postgres::Error> {
    let (commands_stmt, events_stmt, versions_stmt, outcomes_stmt) = tokio::try_join!(
        client.prepare_cached(SELECT_COMMAND_ROWS),
        client.prepare_cached(SELECT_EVENT_ROWS),
        client.prepare_cached(SELECT_VERSIONS),
        client.prepare_cached(SELECT_OUTCOME_HEADS),
    )?;
    let (v_types, v_ids) = key_arrays(&request.command_keys);
    let (o_types, o_ids) = key_arrays(&request.outcome_keys);
    let command_params: [&(dyn ToSql + Sync); 1] = [&request.command_ids];
    let event_params: [&(dyn ToSql + Sync); 1] = [&request.event_ids];
    let version_params: [&(dyn ToSql + Sync); 2] = [&v_types, &v_ids];
    let outcome_params: [&(dyn ToSql + Sync); 2] = [&o_types, &o_ids];
    let ask = |stmt, params, needed: bool| async move {
        if needed { client.query(stmt, params).await } else { Ok(Vec::new()) }
    };
    let (commands, events, versions, outcomes) = tokio::join!(
        ask(&commands_stmt, &command_params[..], !request.command_ids.is_empty()),
        ask(&events_stmt, &event_params[..], !request.event_ids.is_empty()),
        ask(&versions_stmt, &version_params[..], !request.command_keys.is_empty()),
        ask(&outcomes_stmt, &outcome_params[..], !request.outcome_keys.is_empty()),
    );
    Ok([commands?, events?, versions?, outcomes?])
}

pub(super) fn to_lookup([commands, events, versions, outcomes]: [Vec<Row>; 4]) -> Result<Lookup, DbError> {
    let mut rows = commands.iter().chain(&events).map(row_to_index).collect::<Result<Vec<_>, _>>()?;
    rows.dedup_by_key(|r| r.event_id);
    Ok(Lookup { rows, versions: key_map(&versions), outcomes: key_map(&outcomes) })
}

/// The parameters of a segment's three writes (head, index rows, versions), as arrays.
pub(super) struct Writes<'a> {
    position: i64,
    event_ids: Vec<Uuid>,
    command_ids: Vec<Uuid>,
    fingerprints: Vec<&'a str>,
    types: Vec<&'a str>,
    ids: Vec<&'a str>,
    kinds: Vec<&'a str>,
    seqs: Vec<i64>,
    positions: Vec<i64>,
    command_types: Vec<&'a str>,
    command_ids_of_keys: Vec<&'a str>,
    command_seqs: Vec<i64>,
}

impl<'a> Writes<'a> {
    pub(super) fn of(position: u64, rows: &'a [IndexRow]) -> Writes<'a> {
        let commands: Vec<&IndexRow> = rows.iter().filter(|r| r.kind == Kind::Command).collect();
        Writes {
            position: to_i64(position),
            event_ids: rows.iter().map(|r| r.event_id).collect(),
            command_ids: rows.iter().map(|r| r.command_id).collect(),
            fingerprints: rows.iter().map(|r| r.fingerprint.as_str()).collect(),
            types: rows.iter().map(|r| r.key.aggregate_type.as_str()).collect(),
            ids: rows.iter().map(|r| r.key.aggregate_id.as_str()).collect(),
            kinds: rows.iter().map(|r| r.kind.as_str()).collect(),
            seqs: rows.iter().map(|r| to_i64(r.seq)).collect(),
            positions: rows.iter().map(|r| to_i64(r.position)).collect(),
            command_types: commands.iter().map(|r| r.key.aggregate_type.as_str()).collect(),
            command_ids_of_keys: commands.iter().map(|r| r.key.aggregate_id.as_str()).collect(),
            command_seqs: commands.iter().map(|r| to_i64(r.seq)).collect(),
        }
    }

    fn head(&self) -> [&(dyn ToSql + Sync); 1] {
        [&self.position]
    }

    fn rows(&self) -> [&(dyn ToSql + Sync); 8] {
        [&self.event_ids, &self.command_ids, &self.fingerprints, &self.types, &self.ids, &self.kinds, &self.seqs, &self.positions]
    }

    fn versions(&self) -> [&(dyn ToSql + Sync); 3] {
        [&self.command_types, &self.command_ids_of_keys, &self.command_seqs]
    }

    /// The three writes' parameters in one list, for the single-statement publish.
    pub(super) fn all(&self) -> [&(dyn ToSql + Sync); 12] {
        let ([head], [e, c, f, t, i, k, s, p], [vt, vi, vs]) = (self.head(), self.rows(), self.versions());
        [head, e, c, f, t, i, k, s, p, vt, vi, vs]
    }
}

/// A segment's three writes, pipelined (`head` moves the head; `commit`, the SQL that ends the
/// transaction, follows them in the same round trip when given). Returns the head statement's
/// row count.
///
/// Every pipeline here is `join!`ed and its results read in statement order, never
/// `try_join!`ed: once a statement fails, the server answers each later one with 25P02
/// (transaction aborted), and `try_join!` returns whichever error it polls first, which can
/// be a 25P02 that hides the cause.
async fn write(client: &Object, head: &str, position: u64, rows: &[IndexRow], commit: Option<&str>) -> Result<u64, tokio_postgres::Error> {
    let (head_stmt, rows_stmt, versions_stmt) = tokio::try_join!(
        client.prepare_cached(head),
        client.prepare_cached(INSERT_ROWS),
        client.prepare_cached(RAISE_VERSIONS)
    )?;
    let w = Writes::of(position, rows);
    let (head, rows, versions) = (w.head(), w.rows(), w.versions());
    let commit = async {
        match commit {
            Some(sql) => client.batch_execute(sql).await,
            None => Ok(()),
        }
    };
    let (moved, rows, versions, commit) = tokio::join!(
        client.execute(&head_stmt, &head),
        client.execute(&rows_stmt, &rows),
        client.execute(&versions_stmt, &versions),
        commit
    );
    let moved = moved?;
    rows?;
    versions?;
    commit?;
    Ok(moved)
}

/// A batch transaction. The connection is only returned to the pool after `COMMIT` or
/// `ROLLBACK`; if the batch is dropped half-way, the connection is closed instead, which makes
/// the server roll back and release the head lock.
pub(super) struct PgTx {
    pub(super) client: Option<Object>,
    pub(super) next: u64,
    /// How `commit` and `record_and_commit` end the transaction ([`super::SYNCHRONOUS_COMMIT`]
    /// or not).
    pub(super) commit: &'static str,
}

impl PgTx {
    pub(super) fn client(&self) -> &Object {
        self.client.as_ref().expect("client is present until commit or rollback")
    }

    pub(super) async fn finish(mut self: Box<Self>, sql: &str) -> Result<(), DbError> {
        let result = self.client().batch_execute(sql).await;
        if result.is_ok() {
            // Back to the pool only in a clean state.
            drop(self.client.take());
        }
        Ok(result?)
    }
}

impl Drop for PgTx {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            drop(Object::take(client));
        }
    }
}

#[async_trait]
impl IndexTx for PgTx {
    fn next_position(&self) -> u64 {
        self.next
    }

    async fn lookup(&mut self, request: &LookupRequest) -> Result<Lookup, DbError> {
        to_lookup(lookup(self.client(), request).await?)
    }

    async fn record(&mut self, position: u64, rows: &[IndexRow]) -> Result<(), DbError> {
        let moved = write(self.client(), ADVANCE_HEAD, position, rows, None).await?;
        if moved != 1 {
            return Err(DbError::Inconsistent(format!(
                "log head is not at position {} - 1 inside its own lock",
                position
            )));
        }
        Ok(())
    }

    /// The three writes and `COMMIT` in one round trip; the head's move checks itself in SQL
    /// ([`ADVANCE_HEAD_OR_FAIL`]), since its row count comes back only with the `COMMIT`'s.
    async fn record_and_commit(mut self: Box<Self>, position: u64, rows: &[IndexRow]) -> Result<(), DbError> {
        write(self.client(), ADVANCE_HEAD_OR_FAIL, position, rows, Some(self.commit)).await?;
        // Back to the pool only in a clean state (on error, `Drop` closes the connection).
        drop(self.client.take());
        Ok(())
    }

    async fn commit(self: Box<Self>) -> Result<(), DbError> {
        let sql = self.commit;
        self.finish(sql).await
    }

    async fn rollback(self: Box<Self>) -> Result<(), DbError> {
        self.finish("ROLLBACK").await
    }
}
