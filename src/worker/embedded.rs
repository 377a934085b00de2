//! Workers without Kafka, for `spiced dev`: the command envelopes are read straight from the
//! log, segment by segment, from a durable checkpoint, and run through the same handlers and
//! registry as in production. Within a segment, aggregates run concurrently and each one in
//! order; the checkpoint moves once the whole segment is done.
//!
//! There is no dead-letter topic here: a dead letter is logged, and its registry row (status
//! `failed`, with the error) is what `GET /commands/{id}` and `GET /api/v1/dead-letters/{role}`
//! report. The log is followed past it, so a re-drive (`bus::redrive`, which resets the row)
//! hands its envelope to the queue that [`run`] also serves.

use super::handler::{CommandHandler, Disposition, Interrupted};
use super::lanes::Slot;
use super::{Role, Shared};
use crate::bus::redrive::Redrive;
use crate::domain::CommandType;
use crate::envelope::Kind;
use crate::log::tail::{Follower, Tail};
use crate::log::Segment;
use futures::stream::{FuturesUnordered, StreamExt};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::db::EMBEDDED_WORKERS_CHECKPOINT as CHECKPOINT;

/// How many re-drives may wait for the embedded workers; more is a 503.
pub const REDRIVE_QUEUE: usize = 64;

/// Follows the log from the checkpoint, and runs the re-driven commands from `redrives`.
pub async fn run(shared: &Shared, shutdown: &CancellationToken, redrives: mpsc::Receiver<Redrive>) -> anyhow::Result<()> {
    let handlers = [shared.handler(Role::Ontology), shared.handler(Role::Instance)];
    let graceful = crate::shutdown::Graceful::new(shutdown.clone(), Duration::from_millis(shared.config.worker.shutdown_grace_ms));
    let (followed, ()) = tokio::join!(follow(shared, &handlers, &graceful), serve_redrives(&handlers, redrives, &graceful));
    followed
}

async fn follow(shared: &Shared, handlers: &[CommandHandler; 2], graceful: &crate::shutdown::Graceful) -> anyhow::Result<()> {
    let shutdown = &graceful.stop;
    let tail = Tail::new(shared.log.clone(), shared.state.index().clone());
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
    let poll = Duration::from_millis(shared.config.worker.poll_interval_ms);
    let mut follower = Follower::new(tail, from, 16, poll);
    while let Some(segments) = follower.next(shutdown).await {
        for segment in &segments {
            if process(segment, handlers, graceful).await.is_err() {
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

/// The handler of `role` among the two that [`run`] makes (ontology, then instance).
fn for_role(handlers: &[CommandHandler; 2], role: Role) -> &CommandHandler {
    &handlers[(role == Role::Instance) as usize]
}

/// Runs a segment's commands: one task per aggregate, each in sequence order.
async fn process(
    segment: &Segment,
    handlers: &[CommandHandler; 2],
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
            let handler = for_role(handlers, role);
            if let Disposition::DeadLetter { reason, attempts } = handler.handle(&segment.raw_event(i), &Slot::free(), shutdown).await? {
                tracing::error!(event_id = %envelope.event_id, attempts, reason, "command dead-lettered (embedded: no dead-letter topic)");
            }
        }
        Ok::<(), Interrupted>(())
    });
    futures::future::join_all(runs).await.into_iter().collect()
}

/// Runs each re-driven command, concurrently with the log and with each other, until shutdown.
/// One interrupted by shutdown keeps its claimable registry row: re-drive it again.
async fn serve_redrives(handlers: &[CommandHandler; 2], mut queue: mpsc::Receiver<Redrive>, shutdown: &crate::shutdown::Graceful) {
    let mut running = FuturesUnordered::new();
    loop {
        tokio::select! {
            next = queue.recv() => match next {
                Some(redrive) => running.push(run_redriven(handlers, redrive, shutdown)),
                None => break,
            },
            Some(()) = running.next(), if !running.is_empty() => {}
            () = shutdown.stop.cancelled() => break,
        }
    }
    while running.next().await.is_some() {}
}

async fn run_redriven(handlers: &[CommandHandler; 2], redrive: Redrive, shutdown: &crate::shutdown::Graceful) {
    let handler = for_role(handlers, redrive.role);
    match handler.handle(&redrive.raw, &Slot::free(), shutdown).await {
        Ok(Disposition::DeadLetter { reason, attempts }) => {
            tracing::error!(event_id = %redrive.event_id, attempts, reason, "re-driven command dead-lettered again");
        }
        Ok(_) => tracing::info!(event_id = %redrive.event_id, "re-driven command finished"),
        Err(Interrupted) => tracing::warn!(event_id = %redrive.event_id, "re-driven command interrupted by shutdown; re-drive it again"),
    }
}
