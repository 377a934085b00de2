//! The log index's contract: where each event is in the log, each aggregate's current
//! sequence, and the head position, changed only by one batch at a time under the head lock.
//! [`super::postgres`] and [`super::sqlite`] implement it; `tests/index_conformance.rs` holds
//! both to the same behaviour.

use super::DbError;
use crate::domain::AggregateKey;
use crate::envelope::Kind;
use async_trait::async_trait;
use std::collections::HashMap;
use uuid::Uuid;

/// The index of the log kept beside it: where each event is, each aggregate's current
/// sequence, and the head position. Writers change it only inside an [`IndexTx`].
#[async_trait]
pub trait LogIndex: Send + Sync + 'static {
    /// Starts a batch: takes the log-head lock (serialising every writer of every process) and
    /// reads the next free position.
    async fn begin(&self) -> Result<Box<dyn IndexTx>, DbError>;
    /// [`LogIndex::begin`] and [`IndexTx::lookup`] together: a batch's first step, which a
    /// backend with round trips sends as one.
    async fn begin_lookup(&self, request: &LookupRequest) -> Result<(Box<dyn IndexTx>, Lookup), DbError> {
        let mut tx = self.begin().await?;
        let lookup = tx.lookup(request).await?;
        Ok((tx, lookup))
    }
    /// The last position recorded in the index.
    async fn head(&self) -> Result<u64, DbError>;
    /// An aggregate's sequence: its count of accepted commands (0 if none).
    async fn version(&self, key: &AggregateKey) -> Result<u64, DbError>;
    /// `(seq, position)` of an aggregate's envelopes of one kind with seq in `from..=to`.
    async fn positions(
        &self,
        key: &AggregateKey,
        kind: Kind,
        from: u64,
        to: u64,
    ) -> Result<Vec<(u64, u64)>, DbError>;
    /// The index rows of a command (several for a bulk command), in (aggregate, seq) order.
    async fn command(&self, command_id: Uuid) -> Result<Vec<IndexRow>, DbError>;
    /// The outcome (domain) rows answering a command.
    async fn outcomes(&self, command_id: Uuid) -> Result<Vec<IndexRow>, DbError>;
    /// The log position of an event.
    async fn position_of(&self, event_id: Uuid) -> Result<Option<u64>, DbError>;
    /// The highest command sequence of an aggregate written before `position`.
    async fn command_seq_before(&self, key: &AggregateKey, position: u64) -> Result<u64, DbError>;
    /// `(seq, position)` of an aggregate's last envelope of `kind`.
    async fn last(&self, key: &AggregateKey, kind: Kind) -> Result<Option<(u64, u64)>, DbError>;
    /// Aggregates of a type whose id starts with `prefix`, with at least one envelope.
    async fn aggregates_with_prefix(
        &self,
        aggregate_type: crate::domain::AggregateType,
        prefix: &str,
    ) -> Result<Vec<String>, DbError>;
    /// Reachability, for readiness probes.
    async fn ping(&self) -> Result<(), DbError>;
    /// How many envelopes are at positions after `position` (the relay's lag in events). An
    /// index range scan: its cost grows with the answer, not with the log.
    async fn events_after(&self, position: u64) -> Result<u64, DbError>;
    /// Every index row, in position order (for `spiced verify`).
    async fn all_rows(&self) -> Result<Vec<IndexRow>, DbError>;
    /// Every aggregate's version (for `spiced verify`).
    async fn all_versions(&self) -> Result<HashMap<AggregateKey, u64>, DbError>;
    /// The steps of the pipelined commit, on a backend that has them (`None`: batches are
    /// written one at a time under the head lock, through [`IndexTx`]).
    fn reservations(&self) -> Option<&dyn Reservations> {
        None
    }
}

/// The pipelined commit (`docs/design.md`, "Pipelined commit"): a batch *reserves* its
/// position under a short lock, its segment is written outside any lock, and it is
/// *published* (head, index rows, versions) strictly in position order. Readers see only what
/// publishing changes.
#[async_trait]
pub trait Reservations: Send + Sync {
    /// A reservation's first step, under the reservation lock: the next free position, the
    /// open reservations, then the batch's look-ups. A command whose id or aggregate is in an
    /// open reservation must be deferred, not planned: the look-ups read published state only.
    async fn begin_reserve(&self, request: &LookupRequest) -> Result<(Box<dyn ReserveTx>, Lookup, Vec<Reservation>), DbError>;
    /// Publishes the segment at `position`: if the head is at `position - 1`, moves it, records
    /// the rows, raises the versions and deletes the position's reservation, all at once. A
    /// void segment publishes with no rows. Otherwise nothing changes and the answer says
    /// where the head was.
    async fn publish(&self, position: u64, rows: &[IndexRow]) -> Result<Published, DbError>;
    /// The open reservations, in position order.
    async fn open_reservations(&self) -> Result<Vec<Reservation>, DbError>;
}

/// A reservation in progress, holding the reservation lock until `reserve` or `rollback`.
#[async_trait]
pub trait ReserveTx: Send {
    /// The position this batch will write: one past every position reserved or published.
    fn position(&self) -> u64;
    /// Reserves the position for `lease` (server time) with what the batch holds, and commits.
    async fn reserve(self: Box<Self>, owner: &str, lease: std::time::Duration, command_ids: &[Uuid], keys: &[AggregateKey]) -> Result<(), DbError>;
    async fn rollback(self: Box<Self>) -> Result<(), DbError>;
}

/// What [`Reservations::publish`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// The head moved to the position.
    Now,
    /// The head was not at the position before it; nothing changed. At or past the position,
    /// someone published that segment already; one short, an earlier position is unpublished.
    HeadAt(u64),
}

/// A position reserved and not published yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub position: u64,
    pub owner: String,
    /// Whether its lease has passed (by the server's clock): anyone may void the position.
    pub expired: bool,
    pub command_ids: Vec<Uuid>,
    pub keys: Vec<AggregateKey>,
}

/// A batch in progress, holding the log-head lock until commit or rollback. Dropping it
/// without either rolls back.
#[async_trait]
pub trait IndexTx: Send {
    /// The position this batch will write: one past the recorded head.
    fn next_position(&self) -> u64;
    /// What a batch needs to know before it is planned, read under the head lock.
    async fn lookup(&mut self, request: &LookupRequest) -> Result<Lookup, DbError>;
    /// Records a written segment: head = `position`, index rows inserted, versions raised.
    async fn record(&mut self, position: u64, rows: &[IndexRow]) -> Result<(), DbError>;
    async fn commit(self: Box<Self>) -> Result<(), DbError>;
    /// [`IndexTx::record`] and [`IndexTx::commit`] together: a batch's last step, which a
    /// backend with round trips sends as one. On error nothing is recorded.
    async fn record_and_commit(mut self: Box<Self>, position: u64, rows: &[IndexRow]) -> Result<(), DbError> {
        self.record(position, rows).await?;
        self.commit().await
    }
    async fn rollback(self: Box<Self>) -> Result<(), DbError>;
}

/// The ids and aggregates a batch asks about.
#[derive(Debug, Default)]
pub struct LookupRequest {
    /// Command ids that may have been appended before (client-chosen ids).
    pub command_ids: Vec<Uuid>,
    /// Event ids of outcome envelopes, stored at most once.
    pub event_ids: Vec<Uuid>,
    /// Aggregates whose command version is needed.
    pub command_keys: Vec<AggregateKey>,
    /// Aggregates whose last outcome sequence is needed.
    pub outcome_keys: Vec<AggregateKey>,
}

/// The answer to a [`LookupRequest`].
#[derive(Debug, Default)]
pub struct Lookup {
    /// Command rows of `command_ids` and rows of any kind for `event_ids`.
    pub rows: Vec<IndexRow>,
    /// Command version per aggregate (absent = 0).
    pub versions: HashMap<AggregateKey, u64>,
    /// Sequence of the last outcome per aggregate (absent = none yet).
    pub outcomes: HashMap<AggregateKey, u64>,
}

/// One envelope's row in the log index: where it is, and what it answered for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexRow {
    pub event_id: Uuid,
    pub command_id: Uuid,
    pub fingerprint: String,
    pub key: AggregateKey,
    pub kind: Kind,
    pub seq: u64,
    pub position: u64,
}

/// `[prefix, prefix + 1)` in byte order: every string starting with `prefix`.
pub fn prefix_range(prefix: &str) -> (String, String) {
    let mut high = prefix.as_bytes().to_vec();
    while let Some(last) = high.pop() {
        if last < 0xff {
            high.push(last + 1);
            break;
        }
    }
    (prefix.to_string(), String::from_utf8_lossy(&high).into_owned())
}
