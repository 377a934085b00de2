//! The projection fed by Kafka: the two event topics in the projection's consumer group.
//!
//! A batch of messages is applied in one transaction that also claims each event in
//! `processed_events` (handler `projection`) and records, per partition, the log position
//! (relay header `spiced-log-position`) it has reached; offsets are committed after that
//! commit. A crash before the commit re-delivers the batch; a crash after it re-delivers
//! messages whose claims already exist, which change nothing.
//!
//! An event the read store refuses for its content is recorded in `projection_failures` inside
//! that same transaction and the batch goes on without it (progress, claims and offsets as for
//! any batch), so one event never stops the consumer.
//!
//! The projection position served to clients is the lowest position over all partitions. A
//! partition with nothing left to read is complete up to the relay's checkpoint, read before
//! the partition's high watermark is fetched (everything the relay checkpointed was delivered,
//! so it is below that watermark).

use tracing::Instrument;
use super::change_of;
use crate::bus::kafka::{base_config, ensure_topics, with_properties};
use crate::config::Config;
use crate::db::read::{Progress, ReadBatch, ReadSchema, HANDLER};
use crate::db::Database;
use crate::envelope::EventEnvelope;
use crate::liveness::Stage;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How long without messages before the partitions are checked for being caught up.
const IDLE: Duration = Duration::from_millis(200);

type Partitions = BTreeMap<(String, i32), u64>;

pub async fn consume(db: &Database, config: &Config, progress: &Arc<Stage>, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let topics = [config.topics.ontology_events.clone(), config.topics.instance_events.clone()];
    ensure_topics(&config.kafka, &topics).await?;
    let consumer = Arc::new(consumer(config)?);
    consumer.subscribe(&topics.iter().map(String::as_str).collect::<Vec<_>>())?;
    register_partitions(db, &consumer, &topics).await?;
    let lag = crate::bus::kafka::spawn_lag_export(consumer.clone(), HANDLER, Duration::from_secs(5), shutdown.clone(), progress.clone());
    let failures = super::spawn_failures_export(db.clone(), shutdown.clone());
    tracing::info!(group = %config.project.group, "projection consuming the event topics");
    crate::systemd::ready();
    let schema = ReadSchema::live();
    loop {
        let Some(messages) = next_batch(&consumer, config, shutdown).await else { break };
        let batch = if messages.is_empty() {
            caught_up(db, &consumer, config, progress).await
        } else {
            let Some(batch) = build(db, &messages, shutdown).await else { break };
            Some(batch)
        };
        let Some(batch) = batch else { continue };
        if !apply(db, &schema, &batch, progress, shutdown).await {
            break;
        }
        commit(&consumer, &messages);
        metrics::counter!("spiced_projection_events_total").increment(messages.len() as u64);
    }
    // No final commit of the consumer's position: messages received but not applied must
    // come again. Every applied batch committed its offsets already.
    let _ = lag.await;
    let _ = failures.await;
    Ok(())
}

fn consumer(config: &Config) -> anyhow::Result<StreamConsumer> {
    let mut c = base_config(&config.kafka);
    c.set("group.id", &config.project.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", config.project.session_timeout_ms.to_string());
    Ok(with_properties(c, &config.kafka).create()?)
}

/// One message as received, owned (the batch outlives the receive calls).
struct Received {
    topic: String,
    partition: i32,
    offset: i64,
    position: Option<u64>,
    envelope: Option<EventEnvelope>,
}

/// The next batch: up to `project.batch_events` messages, waiting at most
/// `project.batch_wait_ms` after the first; empty after [`IDLE`] without any; `None` on
/// shutdown.
async fn next_batch(consumer: &StreamConsumer, config: &Config, shutdown: &CancellationToken) -> Option<Vec<Received>> {
    let mut batch = Vec::new();
    let mut deadline = Instant::now() + IDLE;
    while batch.len() < config.project.batch_events {
        let wait = deadline.saturating_duration_since(Instant::now());
        let message = tokio::select! {
            _ = shutdown.cancelled() => return None,
            m = tokio::time::timeout(wait, consumer.recv()) => m,
        };
        match message {
            Err(_) => break,
            Ok(Err(e)) => tracing::warn!(error = %e, "projection consumer error"),
            Ok(Ok(m)) => {
                if batch.is_empty() {
                    deadline = Instant::now() + Duration::from_millis(config.project.batch_wait_ms);
                }
                batch.push(received(&m));
            }
        }
    }
    Some(batch)
}

fn received(m: &BorrowedMessage<'_>) -> Received {
    let position = crate::bus::kafka::log_position(m);
    let envelope = m.payload().and_then(|p| serde_json::from_slice::<EventEnvelope>(p).ok());
    if envelope.is_none() {
        // Not from the relay (which publishes the log's bytes): nothing to project.
        metrics::counter!("spiced_projection_skipped_total").increment(1);
        tracing::warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(), "message is not an EventEnvelope; skipped");
    }
    Received { topic: m.topic().to_string(), partition: m.partition(), offset: m.offset(), position, envelope }
}

/// The batch's changes, each at its log position: from the relay's header, else from the log
/// index (an envelope relayed without the header). An envelope the log does not hold is not
/// part of the truth and is skipped, loudly.
async fn batch_of(db: &Database, messages: &[Received]) -> Result<ReadBatch, crate::db::DbError> {
    let mut reached = Partitions::new();
    let mut changes = Vec::new();
    for m in messages {
        let Some(envelope) = &m.envelope else { continue };
        let position = match m.position {
            Some(p) => Some(p),
            None => db.index.position_of(envelope.event_id).await?,
        };
        let Some(position) = position else {
            metrics::counter!("spiced_projection_skipped_total").increment(1);
            tracing::warn!(event_id = %envelope.event_id, topic = %m.topic, "event is not in the log; skipped");
            continue;
        };
        let e = reached.entry((m.topic.clone(), m.partition)).or_default();
        *e = (*e).max(position);
        changes.extend(change_of(envelope, position));
    }
    Ok(ReadBatch { changes, progress: kafka_progress(reached) })
}

/// [`batch_of`], retried while the index cannot be read; `None` on shutdown (nothing applied
/// or committed, so the messages come again).
async fn build(db: &Database, messages: &[Received], shutdown: &CancellationToken) -> Option<ReadBatch> {
    let mut retry = crate::backoff::STORAGE;
    loop {
        match batch_of(db, messages).await {
            Ok(batch) => return Some(batch),
            Err(e) => tracing::warn!(error = %e, "cannot look up log positions; retrying"),
        }
        retry.wait(shutdown).await;
        if shutdown.is_cancelled() {
            return None;
        }
    }
}

fn kafka_progress(reached: Partitions) -> Progress {
    Progress::Kafka(reached.into_iter().map(|((t, p), pos)| (t, p, pos)).collect())
}

/// Applies a batch, retrying until it commits; `false` on shutdown (nothing committed, so the
/// messages come again).
async fn apply(db: &Database, schema: &ReadSchema, batch: &ReadBatch, progress: &Stage, shutdown: &CancellationToken) -> bool {
    // A batch being applied is work waiting: a database that never answers shows as a stall.
    progress.started();
    let applied = apply_until_done(db, schema, batch, progress, shutdown).await;
    progress.finished();
    applied
}

async fn apply_until_done(db: &Database, schema: &ReadSchema, batch: &ReadBatch, progress: &Stage, shutdown: &CancellationToken) -> bool {
    let mut retry = crate::backoff::STORAGE;
    loop {
        match db.read.apply(schema, batch).instrument(batch.span()).await {
            Ok(applied) => {
                super::note_refused(&applied.refused);
                progress.reached(applied.position);
                metrics::gauge!("spiced_projection_position").set(applied.position as f64);
                return true;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot apply to the read models; retrying");
                progress.failed(&e);
            }
        }
        retry.wait(shutdown).await;
        if shutdown.is_cancelled() {
            return false;
        }
    }
}

/// Commits the offsets after the last message of each partition.
fn commit(consumer: &StreamConsumer, messages: &[Received]) {
    let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for m in messages {
        let e = next.entry((m.topic.as_str(), m.partition)).or_default();
        *e = (*e).max(m.offset + 1);
    }
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in next {
        if tpl.add_partition_offset(topic, partition, Offset::Offset(offset)).is_err() {
            continue;
        }
    }
    if tpl.count() > 0 {
        if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
            // Harmless: the claims turn a re-delivery into a no-op.
            tracing::warn!(error = %e, "offset commit failed; the next commit covers it");
        }
    }
}

/// Every partition of the event topics has a row, so the minimum over them is the position.
async fn register_partitions(db: &Database, consumer: &Arc<StreamConsumer>, topics: &[String]) -> anyhow::Result<()> {
    let c = consumer.clone();
    let topics = topics.to_vec();
    let partitions = tokio::task::spawn_blocking(move || -> anyhow::Result<Partitions> {
        let mut all = Partitions::new();
        for topic in &topics {
            let metadata = c.fetch_metadata(Some(topic), Duration::from_secs(10))?;
            for t in metadata.topics() {
                for p in t.partitions() {
                    all.insert((t.name().to_string(), p.id()), 0);
                }
            }
        }
        Ok(all)
    })
    .await??;
    let batch = ReadBatch { changes: Vec::new(), progress: kafka_progress(partitions) };
    db.read.apply(&ReadSchema::live(), &batch).await?;
    Ok(())
}

/// With nothing to read: the assigned partitions that are at their high watermark are
/// complete up to the relay checkpoint read first.
async fn caught_up(db: &Database, consumer: &Arc<StreamConsumer>, config: &Config, progress: &Stage) -> Option<ReadBatch> {
    let relayed = match db.checkpoints.position(&config.relay.name).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the relay checkpoint");
            // The position cannot move without it: the projection is not idle.
            progress.failed(&e);
            return None;
        }
    };
    let c = consumer.clone();
    let done = tokio::task::spawn_blocking(move || at_high_watermark(&c)).await.ok()?;
    if done.is_empty() {
        return None;
    }
    let reached = done.into_iter().map(|tp| (tp, relayed)).collect();
    Some(ReadBatch { changes: Vec::new(), progress: kafka_progress(reached) })
}

/// Assigned partitions with nothing left to consume (blocking calls); none if the broker does
/// not answer.
fn at_high_watermark(consumer: &StreamConsumer) -> Vec<(String, i32)> {
    let backlog = crate::bus::kafka::backlog(consumer).unwrap_or_default();
    backlog.into_iter().filter(|(_, _, left)| *left == 0).map(|(t, p, _)| (t, p)).collect()
}
