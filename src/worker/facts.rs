//! Reading aggregate state from the log for the commands' decisions: an aggregate's state is
//! an outcome's `data.state`. A command is decided against the other aggregates *as of its
//! place in the log* ([`AsOf`]): for each, the outcome of its last command before that place,
//! waited for if it is not there yet, never a later one. Outcomes are then a function of the
//! command log, not of how fast the workers ran. Segments never change, so they are cached.

use crate::db::LogIndex;
use crate::domain::commands::StateReader;
use crate::domain::{AggregateKey, AggregateType};
use crate::envelope::Kind;
use super::lanes::Slot;
use crate::log::{EventLog, LogError, Segment};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The pause between two looks at the log while waiting for an outcome.
pub const POLL: Duration = Duration::from_millis(50);

/// Segments kept in memory; the newest positions are the likeliest to be read again.
const CACHED_SEGMENTS: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum FactsError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    #[error("the index names position {0} but the log has no such outcome there")]
    Missing(u64),
    #[error("the command is not in the log index yet")]
    NotIndexed,
    #[error("{key} sequence {seq} has no outcome yet; this command reads its state")]
    NotYet { key: AggregateKey, seq: u64 },
    #[error("interrupted by shutdown")]
    Interrupted,
}

#[derive(Clone)]
pub struct LogState {
    log: EventLog,
    index: Arc<dyn LogIndex>,
    cache: Arc<Mutex<BTreeMap<u64, Arc<Segment>>>>,
}

impl LogState {
    pub fn new(log: EventLog, index: Arc<dyn LogIndex>) -> Self {
        LogState { log, index, cache: Arc::default() }
    }

    pub fn index(&self) -> &Arc<dyn LogIndex> {
        &self.index
    }

    async fn segment(&self, position: u64) -> Result<Arc<Segment>, FactsError> {
        if let Some(s) = self.cache.lock().expect("cache mutex").get(&position) {
            return Ok(s.clone());
        }
        let segment = Arc::new(self.log.get_segment(position).await?.ok_or(FactsError::Missing(position))?);
        let mut cache = self.cache.lock().expect("cache mutex");
        cache.insert(position, segment.clone());
        while cache.len() > CACHED_SEGMENTS {
            cache.pop_first();
        }
        Ok(segment)
    }

    /// The sequence of the aggregate's last outcome (0 if none) and its state.
    pub async fn state(&self, key: &AggregateKey) -> Result<(u64, Option<Value>), FactsError> {
        let Some((seq, position)) = self.index.last(key, Kind::Domain).await? else {
            return Ok((0, None));
        };
        Ok((seq, self.outcome_at(key, seq, position).await?))
    }

    /// The state the outcome of the aggregate's command `seq` left, if that outcome is in the
    /// log yet.
    async fn outcome(&self, key: &AggregateKey, seq: u64) -> Result<Option<Option<Value>>, FactsError> {
        match self.index.positions(key, Kind::Domain, seq, seq).await?.first() {
            Some(&(_, position)) => Ok(Some(self.outcome_at(key, seq, position).await?)),
            None => Ok(None),
        }
    }

    async fn outcome_at(&self, key: &AggregateKey, seq: u64, position: u64) -> Result<Option<Value>, FactsError> {
        let segment = self.segment(position).await?;
        let envelope = segment
            .events
            .iter()
            .find(|e| is_event_of(e, key, Kind::Domain) && e.sequence_number == Some(seq))
            .ok_or(FactsError::Missing(position))?;
        let state = envelope.data.get("state").cloned().unwrap_or(Value::Null);
        Ok((!state.is_null()).then_some(state))
    }

    /// The states the command `event_id` is decided against; reads wait for a missing outcome
    /// (stepping aside) until `wait` has passed or `stop` is cancelled.
    pub fn as_of<'a>(&'a self, event_id: Uuid, wait: Duration, slot: &'a Slot, stop: &'a CancellationToken) -> AsOf<'a> {
        AsOf { log: self, event_id, deadline: Instant::now() + wait, slot, stop, place: tokio::sync::OnceCell::new() }
    }
}

/// Looks again every [`POLL`], with `slot` stepped aside, until `look` finds what it looks
/// for (`Some`), `deadline` passes (`None`) or `stop` fires (`Interrupted`): the one wait for
/// an outcome not in the log yet, whether another aggregate's or the command's predecessor's.
pub async fn poll_aside<T, F, Fut>(slot: &Slot, stop: &CancellationToken, deadline: Instant, mut look: F) -> Result<Option<T>, FactsError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>, FactsError>>,
{
    slot.aside(async {
        loop {
            if Instant::now() >= deadline {
                return Ok(None);
            }
            crate::backoff::pause(stop, POLL).await;
            if stop.is_cancelled() {
                return Err(FactsError::Interrupted);
            }
            if let Some(found) = look().await? {
                return Ok(Some(found));
            }
        }
    })
    .await
}

fn is_event_of(e: &crate::envelope::EventEnvelope, key: &AggregateKey, kind: Kind) -> bool {
    e.aggregate_id == key.aggregate_id && e.aggregate_type == key.aggregate_type.as_str() && e.kind() == Some(kind)
}

/// The log as one command sees it: each aggregate at the outcome of its last command before
/// the command's place (its segment's position, and its index within that segment).
pub struct AsOf<'a> {
    log: &'a LogState,
    event_id: Uuid,
    deadline: Instant,
    /// Given back while waiting, so what this command waits for can run.
    slot: &'a Slot,
    stop: &'a CancellationToken,
    place: tokio::sync::OnceCell<Place>,
}

/// Where a command sits: its segment, and the last sequence of each aggregate commanded
/// earlier in that same segment.
struct Place {
    position: u64,
    earlier_in_segment: HashMap<AggregateKey, u64>,
}

impl AsOf<'_> {
    /// Read on first use: a command that reads no other aggregate costs no look-up.
    async fn place(&self) -> Result<&Place, FactsError> {
        self.place
            .get_or_try_init(|| async {
                let position = self.log.index.position_of(self.event_id).await?.ok_or(FactsError::NotIndexed)?;
                let segment = self.log.segment(position).await?;
                let mut earlier_in_segment = HashMap::new();
                for e in segment.events.iter().take_while(|e| e.event_id != self.event_id) {
                    let (Some(seq), Some(aggregate_type)) = (e.sequence_number, AggregateType::parse(&e.aggregate_type)) else {
                        continue;
                    };
                    if e.kind() == Some(Kind::Command) {
                        let key = AggregateKey::new(aggregate_type, e.aggregate_id.clone());
                        let last = earlier_in_segment.entry(key).or_insert(0);
                        *last = seq.max(*last);
                    }
                }
                Ok(Place { position, earlier_in_segment })
            })
            .await
    }

    /// The sequence of the aggregate's last command before this one (0 if none).
    async fn seq_before(&self, key: &AggregateKey) -> Result<u64, FactsError> {
        let place = self.place().await?;
        match place.earlier_in_segment.get(key) {
            Some(seq) => Ok(*seq),
            None => Ok(self.log.index.command_seq_before(key, place.position).await?),
        }
    }
}

#[async_trait::async_trait]
impl StateReader for AsOf<'_> {
    type Error = FactsError;

    async fn state(&self, key: &AggregateKey) -> Result<Option<Value>, FactsError> {
        let seq = self.seq_before(key).await?;
        if seq == 0 {
            return Ok(None);
        }
        if let Some(state) = self.log.outcome(key, seq).await? {
            return Ok(state);
        }
        tracing::info!(dependency = %key, seq, "waiting for the outcome of an earlier command this one reads");
        poll_aside(self.slot, self.stop, self.deadline, || self.log.outcome(key, seq))
            .await?
            .ok_or_else(|| FactsError::NotYet { key: key.clone(), seq })
    }

    async fn aggregates_with_prefix(&self, aggregate_type: AggregateType, prefix: &str) -> Result<Vec<String>, FactsError> {
        // Aggregates first commanded after this command come back too; as of its place they
        // have no state, which `state` answers.
        Ok(self.log.index.aggregates_with_prefix(aggregate_type, prefix).await?)
    }
}
