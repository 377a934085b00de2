//! Reading aggregate state from the log: an aggregate's state is its last outcome's
//! `data.state`. Segments never change, so they are cached.

use crate::db::LogIndex;
use crate::domain::apply::Facts;
use crate::domain::{AggregateKey, AggregateType, CommandType};
use crate::envelope::Kind;
use crate::log::{EventLog, LogError, Segment};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Segments kept in memory; the newest positions are the likeliest to be read again.
const CACHED_SEGMENTS: usize = 512;

/// Ancestor classes followed at most (a cycle in parent links stops here).
const MAX_CLASS_DEPTH: usize = 8;

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

    /// The other aggregates whose state `command_type` reads: commands on them that were
    /// accepted before this one must have their outcomes first (causal order across
    /// aggregates: an instance created right after its class sees the class).
    pub async fn dependencies(&self, command_type: CommandType, payload: &Value) -> Result<Vec<AggregateKey>, FactsError> {
        let text = |k: &str| payload[k].as_str().unwrap_or_default().to_string();
        let (db, branch) = (text("db"), text("branch"));
        Ok(match command_type {
            CommandType::CreateDatabase | CommandType::DeleteOntologyClass | CommandType::DeleteInstance => Vec::new(),
            CommandType::DeleteDatabase => self
                .index
                .aggregates_with_prefix(AggregateType::OntologyClass, &format!("{db}:"))
                .await?
                .into_iter()
                .map(|id| AggregateKey::new(AggregateType::OntologyClass, id))
                .collect(),
            CommandType::CreateOntologyClass | CommandType::UpdateOntologyClass => {
                let mut deps = vec![AggregateKey::database(&db)];
                let parent = payload
                    .get("parent_class")
                    .or_else(|| payload["patch"].get("parent_class"))
                    .and_then(Value::as_str);
                deps.extend(parent.map(|p| AggregateKey::class(&db, &branch, p)));
                deps
            }
            CommandType::CreateInstance | CommandType::BulkCreateInstances | CommandType::UpdateInstance => {
                vec![AggregateKey::class(&db, &branch, &text("class_id"))]
            }
        })
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

    /// Everything `command_type` needs besides the aggregate's own state.
    pub async fn facts(
        &self,
        command_type: CommandType,
        payload: &Value,
        current: Option<Value>,
    ) -> Result<Facts, FactsError> {
        let text = |k: &str| payload[k].as_str().unwrap_or_default().to_string();
        let (db, branch) = (text("db"), text("branch"));
        let mut facts = Facts { current, ..Default::default() };
        match command_type {
            CommandType::CreateDatabase => {}
            CommandType::DeleteDatabase => {
                facts.database_has_classes = self.has_live_classes(&db).await?;
            }
            CommandType::CreateOntologyClass | CommandType::UpdateOntologyClass => {
                facts.database = self.state(&AggregateKey::database(&db)).await?.1;
                let parent = payload
                    .get("parent_class")
                    .or_else(|| payload["patch"].get("parent_class"))
                    .and_then(Value::as_str);
                if let Some(parent) = parent {
                    facts.classes = self.class_chain(&db, &branch, parent).await?;
                }
            }
            CommandType::DeleteOntologyClass | CommandType::DeleteInstance => {}
            CommandType::CreateInstance
            | CommandType::BulkCreateInstances
            | CommandType::UpdateInstance => {
                facts.classes = self.class_chain(&db, &branch, &text("class_id")).await?;
            }
        }
        Ok(facts)
    }

    /// The class and its ancestors' states, nearest first; empty if the class does not exist.
    async fn class_chain(&self, db: &str, branch: &str, class_id: &str) -> Result<Vec<Value>, FactsError> {
        let mut chain = Vec::new();
        let mut next = Some(class_id.to_string());
        while let Some(id) = next.take() {
            if chain.len() >= MAX_CLASS_DEPTH {
                break;
            }
            let Some(state) = self.state(&AggregateKey::class(db, branch, &id)).await?.1 else {
                break;
            };
            next = state["parent_class"].as_str().map(str::to_string);
            chain.push(state);
        }
        Ok(chain)
    }

    async fn has_live_classes(&self, db: &str) -> Result<bool, FactsError> {
        let ids = self.index.aggregates_with_prefix(AggregateType::OntologyClass, &format!("{db}:")).await?;
        for id in ids {
            if self.state(&AggregateKey::new(AggregateType::OntologyClass, id)).await?.1.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }
}
