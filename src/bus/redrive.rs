//! Re-driving a dead letter: the command a worker role gave up on is made claimable again in
//! the registry and its envelope, read from the log (the truth, byte for byte what the relay
//! published), is published to its topic once more, with its log position, as the relay does.
//! Shared by `spiced dlq redrive` and `POST /api/v1/dead-letters/{role}/{event_id}/redrive`.
//! Under `spiced dev`, which has no Kafka and whose workers follow the log past the command,
//! the envelope goes to the embedded workers' re-drive queue instead (`worker::embedded`).
//!
//! The registry row is reset before the publish: published first, a worker could see the
//! message while the row still says `failed` and skip it for good. If the publish then fails,
//! the row stays claimable (`retrying`) and a second re-drive publishes again; a message that
//! arrives twice is claimed once. The same holds for the embedded queue: a full or closed
//! queue is a 503 and a `retrying` row that the next re-drive sends again.

use crate::config::KafkaConfig;
use crate::db::{Database, DbError};
use crate::domain::Role;
use crate::log::{EventLog, LogError, Segment};
use bytes::Bytes;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use std::time::Duration;
use tokio::sync::mpsc;
use uuid::Uuid;

/// How long a re-drive waits for the broker's acknowledgement.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum RedriveError {
    /// No dead letter of this role has this id (never failed, done, or another role's).
    #[error("{0}")]
    NotFound(String),
    /// The registry names an event the log does not hold where the index says.
    #[error("{0}")]
    Inconsistent(String),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Log(#[from] LogError),
    /// The broker (or the embedded workers' queue) did not take it; the row stays claimable.
    #[error("sending the re-driven command: {0}")]
    Unavailable(String),
}

/// A command for `spiced dev`'s embedded workers to run again: its envelope's bytes from the log.
#[derive(Debug)]
pub struct Redrive {
    pub role: Role,
    pub event_id: Uuid,
    pub raw: Bytes,
}

/// Where a re-driven command is sent.
pub enum Via<'a> {
    /// Its topic, with its log position, as the relay publishes it.
    Kafka(&'a KafkaConfig),
    /// `spiced dev`'s embedded workers.
    Embedded(&'a mpsc::Sender<Redrive>),
}

/// What a re-drive did.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Redriven {
    pub event_id: Uuid,
    /// The topic it was published to; null under `spiced dev`, whose embedded workers take it.
    pub topic: Option<String>,
    /// Its log position.
    pub position: u64,
    /// `true` when its registry row went from `failed` to claimable now; `false` when an
    /// earlier re-drive had already reset it (it is sent again).
    pub reset: bool,
}

pub async fn redrive(db: &Database, log: &EventLog, role: Role, event_id: Uuid, via: Via<'_>) -> Result<Redriven, RedriveError> {
    let handler = role.handler();
    let rows = db.registry.rows(event_id).await?;
    let status = rows.iter().find(|r| r.handler == handler).map(|r| r.status.clone());
    if !matches!(status.as_deref(), Some("failed") | Some("retrying")) {
        let why = status.map_or("it has no registry row".to_string(), |s| format!("its status is {s}"));
        return Err(RedriveError::NotFound(format!("no dead letter {event_id} for {handler}: {why}")));
    }
    let (position, segment, index) = locate(db, log, event_id).await?;
    let topic = match via {
        Via::Kafka(_) => Some(topic_of(&segment, index)?),
        Via::Embedded(_) => None,
    };
    let reset = db.registry.redrive(handler, event_id).await?;
    match via {
        Via::Kafka(kafka) => publish(kafka, topic.as_deref().unwrap_or_default(), &segment, index, position).await?,
        Via::Embedded(queue) => queue
            .try_send(Redrive { role, event_id, raw: segment.raw_event(index) })
            .map_err(|e| RedriveError::Unavailable(format!("the embedded workers' re-drive queue: {e}")))?,
    }
    tracing::info!(%event_id, handler, topic = topic.as_deref(), position, reset, "re-drove a dead letter");
    Ok(Redriven { event_id, topic, position, reset })
}

/// The command's log position, its segment and its index in the segment.
pub async fn locate(db: &Database, log: &EventLog, event_id: Uuid) -> Result<(u64, Segment, usize), RedriveError> {
    let position = db
        .index
        .position_of(event_id)
        .await?
        .ok_or_else(|| RedriveError::Inconsistent(format!("event {event_id} is in the registry but not in the log index")))?;
    let segment = log.get_segment(position).await?.ok_or_else(|| {
        RedriveError::Inconsistent(format!("the index puts event {event_id} at log position {position}, which is not written; run spiced verify"))
    })?;
    let index = segment.events.iter().position(|e| e.event_id == event_id).ok_or_else(|| {
        RedriveError::Inconsistent(format!("log position {position} does not hold event {event_id}; run spiced verify"))
    })?;
    Ok((position, segment, index))
}

fn topic_of(segment: &Segment, index: usize) -> Result<String, RedriveError> {
    let envelope = &segment.events[index];
    match envelope.metadata.get("kafka_topic").and_then(|t| t.as_str()) {
        Some(topic) if !topic.is_empty() => Ok(topic.to_string()),
        _ => Err(RedriveError::Inconsistent(format!("event {} names no kafka_topic", envelope.event_id))),
    }
}

async fn publish(kafka: &KafkaConfig, topic: &str, segment: &Segment, index: usize, position: u64) -> Result<(), RedriveError> {
    let producer = crate::bus::kafka::producer(kafka).map_err(|e| RedriveError::Unavailable(e.to_string()))?;
    let position_text = position.to_string();
    let headers = OwnedHeaders::new().insert(Header { key: crate::bus::kafka::POSITION_HEADER, value: Some(position_text.as_str()) });
    let payload = segment.raw_event(index);
    let record = FutureRecord::to(topic).key(segment.events[index].ordering_key()).payload(&payload[..]).headers(headers);
    let sent = producer.send(record, PUBLISH_TIMEOUT).await.map_err(|(e, _)| RedriveError::Unavailable(e.to_string()));
    // Dropping a producer flushes and joins librdkafka's threads: not on the async threads.
    tokio::task::spawn_blocking(move || drop(producer));
    sent.map(drop)
}
