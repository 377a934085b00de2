//! Workers without Kafka, for `spiced dev`: the command envelopes are read straight from the
//! log, segment by segment, from a durable checkpoint, and run through the same handlers and
//! registry as in production. Within a segment, aggregates run concurrently and each one in
//! order; the checkpoint moves once the whole segment is done.
//!
//! There is no dead-letter topic here: a dead letter is logged, and its registry row (status
//! `failed`, with the error) is what `GET /commands/{id}` reports.

use super::handler::{Disposition, Interrupted};
use super::lanes::Slot;
use super::{Role, Shared};
use crate::domain::CommandType;
use crate::envelope::Kind;
use crate::log::tail::{Follower, Tail};
use crate::log::Segment;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::db::EMBEDDED_WORKERS_CHECKPOINT as CHECKPOINT;

pub async fn run(shared: &Shared, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let tail = Tail::new(shared.log.clone(), shared.state.index().clone());
    let handlers = [shared.handler(Role::Ontology), shared.handler(Role::Instance)];
    let mut retry = crate::backoff::STORAGE;
    let from = loop {
        match shared.db.checkpoints.position(CHECKPOINT).await {
            Ok(p) => break p + 1,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the workers' checkpoint; retrying");
                retry.wait(shutdown).await;
                if shutdown.is_cancelled() {
                    return Ok(());
                }
            }
        }
    };
    tracing::info!(from, "embedded workers following the log");
    let graceful = crate::shutdown::Graceful::new(shutdown.clone(), Duration::from_millis(shared.config.worker.shutdown_grace_ms));
    let poll = Duration::from_millis(shared.config.worker.poll_interval_ms);
    let mut follower = Follower::new(tail, from, 16, poll);
    while let Some(segments) = follower.next(shutdown).await {
        for segment in &segments {
            if process(segment, &handlers, &graceful).await.is_err() {
                return Ok(());
            }
            // The segment's commands are done; a checkpoint that cannot be written now is
            // written later (or the segment is re-run: the registry makes that harmless).
            if let Err(e) = shared.db.checkpoints.advance(CHECKPOINT, segment.position).await {
                tracing::warn!(error = %e, position = segment.position, "cannot record the workers' checkpoint");
            }
            follower.done(segment.position);
        }
    }
    Ok(())
}

/// Runs a segment's commands: one task per aggregate, each in sequence order.
async fn process(
    segment: &Segment,
    handlers: &[super::handler::CommandHandler; 2],
    shutdown: &crate::shutdown::Graceful,
) -> Result<(), Interrupted> {
    let mut by_aggregate: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, e) in segment.events.iter().enumerate() {
        if e.kind() == Some(Kind::Command) {
            by_aggregate.entry(&e.aggregate_id).or_default().push(i);
        }
    }
    let runs = by_aggregate.into_values().map(|indexes| async move {
        for i in indexes {
            let envelope = &segment.events[i];
            let role = envelope
                .data
                .get("command_type")
                .and_then(|v| v.as_str())
                .and_then(CommandType::parse)
                .map(Role::for_command)
                .unwrap_or(Role::Ontology);
            let handler = &handlers[(role == Role::Instance) as usize];
            if let Disposition::DeadLetter { reason, attempts } = handler.handle(&segment.raw_event(i), &Slot::free(), shutdown).await? {
                tracing::error!(event_id = %envelope.event_id, attempts, reason, "command dead-lettered (embedded: no dead-letter topic)");
            }
        }
        Ok::<(), Interrupted>(())
    });
    futures::future::join_all(runs).await.into_iter().collect()
}
