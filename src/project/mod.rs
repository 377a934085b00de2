//! `spiced project`: keeps the read models (databases, classes, instances) in step with the
//! outcome events.
//!
//! Live, it consumes the two event topics in its own consumer group ([`kafka`]), or follows
//! the log directly ([`follow`], what `spiced dev` does). Either way each batch and the
//! projection's progress commit in one transaction, and rows are versioned by the aggregate's
//! sequence, so replays, duplicates and reordering converge on the state the log describes.
//! [`rebuild`] builds a fresh schema from the log alone and swaps it in.
//!
//! An event the read store refuses for its content never holds the projection back: it is
//! recorded in `projection_failures` and the projection goes on (`crate::db::read` explains
//! how); [`failures`] lists those events and re-applies them once their cause is fixed.

pub mod failures;
pub mod kafka;
pub mod rebuild;

use tracing::Instrument;
use crate::config::{Config, ProjectSource};
use crate::db::read::{Change, Progress, ReadBatch, ReadKind, ReadRow, ReadSchema, Refused};
use crate::db::Database;
use crate::envelope::{EventEnvelope, Kind};
use crate::log::tail::{Follower, Tail};
use crate::liveness::Stage;
use crate::log::{EventLog, Segment};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (db, log) = crate::storage::open(&config).await?;
    let progress = register(&config);
    let _ops = crate::telemetry::start_ops(
        &config.metrics.project_listen,
        crate::telemetry::readiness(db.clone(), log.clone(), vec![progress.clone()]),
    )
    .await?;
    let reporting = crate::liveness::Reporting::start(db.clone(), vec![progress.clone()], &shutdown);
    let result = match config.project.source {
        ProjectSource::Kafka => kafka::consume(&db, &config, &progress, &shutdown).await,
        ProjectSource::Log => {
            crate::systemd::ready();
            follow(&db, &log, &config, &progress, &shutdown).await
        }
    };
    reporting.finish().await;
    result
}

/// The projection's liveness stage.
pub fn register(config: &Config) -> Arc<Stage> {
    crate::liveness::register("projection", Duration::from_millis(config.project.stall_timeout_ms))
}

/// Applies the log to the live read models until `shutdown`.
pub async fn follow(
    db: &Database,
    log: &EventLog,
    config: &Config,
    progress: &Arc<Stage>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let schema = ReadSchema::live();
    let tail = Tail::new(log.clone(), db.index.clone());
    let from = db.read.position(&schema).await? + 1;
    tracing::info!(from, "projection following the log");
    let poll = Duration::from_millis(config.project.poll_interval_ms);
    let mut follower = Follower::new(tail, from, 64, poll).reporting(progress.clone());
    let failures = spawn_failures_export(db.clone(), shutdown.clone());
    let mut retry = crate::backoff::STORAGE;
    while let Some(segments) = follower.next(shutdown).await {
        let batch = batch_of(&segments);
        match db.read.apply(&schema, &batch).instrument(batch.span()).await {
            // The schema's position, which a swapped-in rebuild may have moved past this batch.
            Ok(applied) => {
                retry.reset();
                note_refused(&applied.refused);
                follower.done(applied.position);
                progress.reached(applied.position);
                metrics::gauge!("spiced_projection_position").set(applied.position as f64);
            }
            Err(e) => {
                // Not applied: the follower reads these segments again after the pause.
                tracing::warn!(error = %e, "cannot apply to the read models; retrying");
                progress.failed(&e);
                retry.wait(shutdown).await;
            }
        }
    }
    let _ = failures.await;
    Ok(())
}

/// Reports the events a batch set aside: each one is logged as an error (an operator has to
/// act on it) and counted in `spiced_projection_failures_total`.
pub fn note_refused(refused: &[Refused]) {
    for r in refused {
        tracing::error!(
            event_id = %r.event_id, position = r.position, aggregate_id = %r.aggregate_id, error = %r.error,
            "the read store refused an event: it is missing from the read models until re-applied (`spiced project failures`)"
        );
    }
    metrics::counter!("spiced_projection_failures_total").increment(refused.len() as u64);
}

/// How often the number of recorded failures is exported.
const FAILURES_EVERY: Duration = Duration::from_secs(5);

/// Exports `spiced_projection_failures`, the number of events the live read models are
/// missing because the read store refused them, every [`FAILURES_EVERY`] until `shutdown`.
/// It reads the table rather than counting here: failures are re-applied (and their rows
/// deleted) by another process, `spiced project failures retry`.
fn spawn_failures_export(db: Database, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match db.read.failures(&ReadSchema::live()).await {
                Ok(recorded) => metrics::gauge!("spiced_projection_failures").set(recorded.len() as f64),
                Err(e) => tracing::warn!(error = %e, "cannot count the recorded projection failures"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(FAILURES_EVERY) => {}
            }
        }
    })
}

/// The read-model changes of consecutive segments.
pub fn batch_of(segments: &[Segment]) -> ReadBatch {
    let changes = segments
        .iter()
        .flat_map(|s| s.events.iter().filter_map(|e| change_of(e, s.position)))
        .collect();
    let to = segments.last().map(|s| s.position).unwrap_or(0);
    ReadBatch { changes, progress: Progress::Log { to } }
}

/// An outcome event at a log position as a row change; `None` for anything else.
/// `COMMAND_FAILED` carries the unchanged state, so it still moves the version (a client
/// waiting for its command's sequence sees it answered).
pub fn change_of(e: &EventEnvelope, position: u64) -> Option<Change> {
    if e.kind() != Some(Kind::Domain) {
        return None;
    }
    tracing::debug!(
        position, event_id = %e.event_id, command_id = e.command_id().map(tracing::field::display), aggregate_id = %e.aggregate_id,
        sequence_number = e.sequence_number, "outcome for the read models"
    );
    let kind = match e.aggregate_type.as_str() {
        "Database" => ReadKind::Database,
        "OntologyClass" => ReadKind::Class,
        "Instance" => ReadKind::Instance,
        _ => return None,
    };
    let (db, parent) = match kind {
        ReadKind::Database => (e.aggregate_id.clone(), String::new()),
        _ => {
            let parent = e.aggregate_id.rsplit_once(':')?.0.to_string();
            (e.aggregate_id.split(':').next()?.to_string(), parent)
        }
    };
    let state = e.data.get("state").filter(|s| !s.is_null()).cloned();
    let row = ReadRow {
        kind,
        key: e.aggregate_id.clone(),
        parent,
        db,
        deleted: state.is_none(),
        state,
        version: e.sequence_number?,
        position,
        created_at: e.occurred_at,
        updated_at: e.occurred_at,
    };
    let gives_way = pairs(&e.data, "gives_way", "property", "class_id");
    let released = pairs(&e.data, "released", "class_id", "property");
    Some(Change { event_id: e.event_id, cascade: e.event_type == "DATABASE_DELETED", gives_way, released, row })
}

/// An outcome note (`[{a, b}]` under `key`) as pairs; what is not of that shape is left out.
fn pairs(data: &serde_json::Map<String, serde_json::Value>, key: &str, a: &str, b: &str) -> Vec<(String, String)> {
    let items = data.get(key).and_then(|v| v.as_array()).into_iter().flatten();
    items.filter_map(|i| Some((i[a].as_str()?.to_string(), i[b].as_str()?.to_string()))).collect()
}
