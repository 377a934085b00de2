//! Reading aggregate state from the log for the commands' decisions (`StateReader`): an
//! aggregate's state is its last outcome's `data.state`. Segments never change, so they are
//! cached.

use crate::db::LogIndex;
use crate::domain::commands::StateReader;
use crate::domain::{AggregateKey, AggregateType};
use crate::envelope::Kind;
use crate::log::{EventLog, LogError, Segment};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

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
        let segment = self.segment(position).await?;
        let envelope = segment
            .events
            .iter()
            .find(|e| {
                e.aggregate_id == key.aggregate_id
                    && e.aggregate_type == key.aggregate_type.as_str()
                    && e.kind() == Some(Kind::Domain)
                    && e.sequence_number == Some(seq)
            })
            .ok_or(FactsError::Missing(position))?;
        let state = envelope.data.get("state").cloned().unwrap_or(Value::Null);
        Ok((seq, (!state.is_null()).then_some(state)))
    }

    /// Whether every command on `dependency` accepted before log position `position` has its
    /// outcome.
    pub async fn caught_up(&self, dependency: &AggregateKey, position: u64) -> Result<bool, FactsError> {
        let needed = self.index.command_seq_before(dependency, position).await?;
        if needed == 0 {
            return Ok(true);
        }
        let done = self.index.last(dependency, Kind::Domain).await?.map(|(s, _)| s).unwrap_or(0);
        Ok(done >= needed)
    }
}

#[async_trait::async_trait]
impl StateReader for LogState {
    type Error = FactsError;

    async fn state(&self, key: &AggregateKey) -> Result<Option<Value>, FactsError> {
        Ok(LogState::state(self, key).await?.1)
    }

    async fn aggregates_with_prefix(&self, aggregate_type: AggregateType, prefix: &str) -> Result<Vec<String>, FactsError> {
        Ok(self.index.aggregates_with_prefix(aggregate_type, prefix).await?)
    }
}
