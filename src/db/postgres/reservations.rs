//! The pipelined commit's steps on PostgreSQL ([`Reservations`]): a reservation is one short
//! transaction in two round trips, a publish is one statement.

use super::index::{key_arrays, lookup, to_i64, to_lookup, PgTx, Writes};
use super::Pg;
use crate::db::{DbError, IndexRow, Lookup, LookupRequest, Published, Reservation, Reservations, ReserveTx};
use crate::domain::{AggregateKey, AggregateType};
use async_trait::async_trait;
use std::time::Duration;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;
use uuid::Uuid;

const LOCK_RESERVED: &str = "SELECT GREATEST(r.position, h.position) FROM log_reserved r, log_head h \
     WHERE r.id = 1 AND h.id = 1 FOR UPDATE OF r";
const SELECT_OPEN: &str = "SELECT position, owner, expires_at < now(), command_ids, \
     aggregate_types, aggregate_ids FROM log_reservations \
     WHERE position > (SELECT position FROM log_head WHERE id = 1) ORDER BY position";
const INSERT_RESERVATION: &str = "INSERT INTO log_reservations \
     (position, owner, expires_at, command_ids, aggregate_types, aggregate_ids) \
     VALUES ($1, $2, now() + $3::int8 * interval '1 millisecond', $4, $5, $6)";
const SET_RESERVED: &str = "UPDATE log_reserved SET position = $1 WHERE id = 1";
// Every write depends on the head's compare-and-set through `moved` (zero or one row), so a
// head elsewhere changes nothing; one statement is atomic without BEGIN and COMMIT. The head
// read at the end sees the statement's snapshot, from before the move.
const PUBLISH: &str = "WITH moved AS (UPDATE log_head SET position = $1::int8 \
         WHERE id = 1 AND position = $1::int8 - 1 RETURNING position), \
     rows AS (INSERT INTO log_index (event_id, command_id, fingerprint, aggregate_type, \
         aggregate_id, kind, seq, position) \
         SELECT u.* FROM unnest($2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::text[], \
             $7::text[], $8::int8[], $9::int8[]) AS u, moved), \
     versions AS (INSERT INTO aggregate_versions (aggregate_type, aggregate_id, last_seq) \
         SELECT t, i, max(s) FROM unnest($10::text[], $11::text[], $12::int8[]) AS u(t, i, s), moved \
         GROUP BY t, i \
         ON CONFLICT (aggregate_type, aggregate_id) \
         DO UPDATE SET last_seq = GREATEST(aggregate_versions.last_seq, EXCLUDED.last_seq)), \
     done AS (DELETE FROM log_reservations r USING moved WHERE r.position <= moved.position) \
     SELECT EXISTS (SELECT 1 FROM moved), (SELECT position FROM log_head WHERE id = 1)";

#[async_trait]
impl Reservations for Pg {
    /// `BEGIN`, the lock, the open reservations and the look-ups in one round trip. The server
    /// runs them in that order, each statement on a fresh snapshot: a reservation absent from
    /// the second was published before it, so the look-ups after it see what it published.
    async fn begin_reserve(&self, request: &LookupRequest) -> Result<(Box<dyn ReserveTx>, Lookup, Vec<Reservation>), DbError> {
        let client = self.pool.get().await?;
        // Always flushed: a lost reservation could hand its position out twice (docs/design.md).
        let mut tx = PgTx { client: Some(client), next: 0, commit: super::SYNCHRONOUS_COMMIT };
        let client = tx.client();
        let (lock, open) = tokio::try_join!(client.prepare_cached(LOCK_RESERVED), client.prepare_cached(SELECT_OPEN))?;
        let (begin, row, open, lookup) = tokio::join!(
            client.batch_execute("BEGIN"),
            client.query_one(&lock, &[]),
            client.query(&open, &[]),
            lookup(client, request)
        );
        begin?;
        tx.next = row?.get::<_, i64>(0) as u64 + 1;
        let open = open?.iter().map(to_reservation).collect();
        let lookup = to_lookup(lookup?)?;
        Ok((Box::new(tx), lookup, open))
    }

    async fn publish(&self, position: u64, rows: &[IndexRow]) -> Result<Published, DbError> {
        let client = self.pool.get().await?;
        let publish = client.prepare_cached(PUBLISH).await?;
        let row = client.query_one(&publish, &Writes::of(position, rows).all()).await?;
        if row.get::<_, bool>(0) {
            return Ok(Published::Now);
        }
        Ok(Published::HeadAt(row.get::<_, i64>(1) as u64))
    }

    async fn open_reservations(&self) -> Result<Vec<Reservation>, DbError> {
        let client = self.pool.get().await?;
        Ok(client.query(SELECT_OPEN, &[]).await?.iter().map(to_reservation).collect())
    }
}

#[async_trait]
impl ReserveTx for PgTx {
    fn position(&self) -> u64 {
        self.next
    }

    /// The reservation, the new last position and `COMMIT` in one round trip.
    async fn reserve(mut self: Box<Self>, owner: &str, lease: Duration, command_ids: &[Uuid], keys: &[AggregateKey]) -> Result<(), DbError> {
        let client = self.client();
        let (insert, set) = tokio::try_join!(client.prepare_cached(INSERT_RESERVATION), client.prepare_cached(SET_RESERVED))?;
        let (position, lease_ms) = (to_i64(self.next), i64::try_from(lease.as_millis()).unwrap_or(i64::MAX));
        let (types, ids) = key_arrays(keys);
        let reservation: [&(dyn ToSql + Sync); 6] = [&position, &owner, &lease_ms, &command_ids, &types, &ids];
        let last: [&(dyn ToSql + Sync); 1] = [&position];
        let (inserted, set, commit) = tokio::join!(
            client.execute(&insert, &reservation),
            client.execute(&set, &last),
            client.batch_execute("COMMIT")
        );
        inserted?;
        set?;
        commit?;
        // Back to the pool only in a clean state (on error, `Drop` closes the connection).
        drop(self.client.take());
        Ok(())
    }

    async fn rollback(self: Box<Self>) -> Result<(), DbError> {
        self.finish("ROLLBACK").await
    }
}

fn to_reservation(row: &Row) -> Reservation {
    let types: Vec<&str> = row.get(4);
    let ids: Vec<String> = row.get(5);
    Reservation {
        position: row.get::<_, i64>(0) as u64,
        owner: row.get(1),
        expired: row.get(2),
        command_ids: row.get(3),
        // Only this code writes the column, from parsed types.
        keys: types
            .iter()
            .zip(ids)
            .filter_map(|(t, id)| Some(AggregateKey::new(AggregateType::parse(t)?, id)))
            .collect(),
    }
}
