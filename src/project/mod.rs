//! `spiced project`: keeps the read models (databases, classes, instances) in step with the
//! outcome events in the log.
//!
//! This first version follows the log itself, like the embedded workers: segment by segment
//! from a durable checkpoint, each segment's changes and the new checkpoint in one
//! transaction, so the projection position is exact (the `X-Spiced-Projection-Position`
//! header). Rows are versioned by the aggregate's sequence and only ever replaced by a higher
//! one, so replays converge. Consuming the event topics through Kafka, filters, `min_version`,
//! the OpenAPI document and rebuilds are the rest of issue #5.

use crate::config::Config;
use crate::db::read::{ReadBatch, ReadKind, ReadRow};
use crate::db::Database;
use crate::envelope::{EventEnvelope, Kind};
use crate::log::tail::{pause, Follower, Tail};
use crate::log::{EventLog, Segment};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The projection's checkpoint in `relay_state`: the last log position applied.
pub const CHECKPOINT: &str = "projection";

pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (db, log) = crate::serve::open_storage(&config).await?;
    crate::systemd::ready();
    follow(&db, &log, &config, &shutdown).await
}

/// Applies the log to the read models until `shutdown`.
pub async fn follow(db: &Database, log: &EventLog, config: &Config, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let tail = Tail::new(log.clone(), db.index.clone());
    let from = db.checkpoint(CHECKPOINT).await? + 1;
    tracing::info!(from, "projection following the log");
    let poll = Duration::from_millis(config.relay.poll_interval_ms);
    let mut follower = Follower::new(tail, from, 64, poll);
    while let Some(segments) = follower.next(shutdown).await {
        for segment in &segments {
            if let Err(e) = db.apply_read_batch(&batch_of(segment), CHECKPOINT, segment.position).await {
                // Not applied: the follower reads this segment again after the pause.
                tracing::warn!(error = %e, position = segment.position, "cannot apply to the read models; retrying");
                pause(shutdown, Duration::from_secs(1)).await;
                break;
            }
            follower.done(segment.position);
            metrics::gauge!("spiced_projection_position").set(segment.position as f64);
        }
    }
    Ok(())
}

/// The read-model changes of one segment: one row per outcome event; a deleted database also
/// deletes its classes and instances.
pub fn batch_of(segment: &Segment) -> ReadBatch {
    let mut batch = ReadBatch::default();
    for e in segment.events.iter().filter(|e| e.kind() == Some(Kind::Domain)) {
        let Some(row) = row_of(e) else { continue };
        if e.event_type == "DATABASE_DELETED" {
            batch.cascades.push((format!("{}:", e.aggregate_id), row.version, e.occurred_at));
        }
        batch.rows.push(row);
    }
    batch
}

/// An outcome event as a row. `COMMAND_FAILED` carries the unchanged state, so it still moves
/// the version (a client waiting for its command's sequence sees it answered).
pub fn row_of(e: &EventEnvelope) -> Option<ReadRow> {
    let kind = match e.aggregate_type.as_str() {
        "Database" => ReadKind::Database,
        "OntologyClass" => ReadKind::Class,
        "Instance" => ReadKind::Instance,
        _ => return None,
    };
    let parent = match kind {
        ReadKind::Database => String::new(),
        _ => e.aggregate_id.rsplit_once(':')?.0.to_string(),
    };
    let state = e.data.get("state").filter(|s| !s.is_null()).cloned();
    Some(ReadRow {
        kind,
        key: e.aggregate_id.clone(),
        parent,
        deleted: state.is_none(),
        state,
        version: e.sequence_number?,
        created_at: e.occurred_at,
        updated_at: e.occurred_at,
    })
}
