//! Carrying out one command message, exactly once in effect.
//!
//! The effect of a command is its outcome envelope in the log, whose `event_id` is derived
//! from the command, so it is stored at most once however often the command runs. The
//! registry makes sure it normally runs once: claim (with a lease kept alive by heartbeats),
//! decide from the state in the log, append the outcome, mark done. A worker whose lease is
//! lost stops before appending; if it was already appending, its outcome has the same id as
//! its successor's and the log keeps one.
//!
//! At shutdown ([`Graceful`]) waits end at once and running effects get the grace period;
//! either way an unfinished command's claim is released, so another worker takes it at once.
//!
//! A statement the database refuses for the command's data (`DbError::refuses_content`) is
//! not retried: the command is dead-lettered at its first attempt, never retried for ever.

use super::facts::{FactsError, LogState};
use super::lanes::Slot;
use super::lease::{self, Confirmed};
use super::Role;
use crate::config::{Config, WorkerCrash};
use crate::db::registry::{Claim, Registry, Work};
use crate::db::storable;
use crate::domain::commands::{outcome_envelope, OutcomeRouting};
use crate::domain::rules::{Decision, Facts};
use crate::domain::{AggregateKey, AggregateType, CommandType};
use crate::envelope::{EventEnvelope, Kind};
use crate::log::plan::{AppendCommand, AppendOutcome};
use crate::log::writer::LogWriter;
use crate::shutdown::Graceful;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// What became of a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Disposition {
    /// Done now, done before, or someone else's to finish: move past it.
    Done,
    /// Could not be processed: publish it to the dead-letter topic, then move past it.
    DeadLetter { reason: String, attempts: u32 },
}

/// The handler was asked to stop before the message was finished; it must not be committed.
#[derive(Debug)]
pub struct Interrupted;

/// Why a message on a command topic is no command this worker can carry out: it goes to the
/// dead-letter topic at once, with this as its reason.
#[derive(Debug, thiserror::Error)]
enum Unusable {
    #[error("not an EventEnvelope: {0}")]
    NotAnEnvelope(serde_json::Error),
    #[error("metadata.kind is {0:?}, not \"command\"")]
    Kind(Option<Value>),
    #[error("data.command_type is missing or unknown")]
    CommandType,
    #[error("{} is not a {} command", command_type.as_str(), role.name())]
    OtherRole { command_type: CommandType, role: Role },
    #[error("aggregate_type {aggregate_type} does not fit {}", command_type.as_str())]
    AggregateType { aggregate_type: String, command_type: CommandType },
    #[error("sequence_number is missing")]
    SequenceNumber,
    #[error("data.command_id is missing")]
    CommandId,
}

enum Failure {
    Retryable(String),
    /// The database refused a statement for the data the command carries (e.g. a payload id
    /// holding a NUL): every attempt would fail alike, so the first is the last.
    Refused(String),
    LeaseLost,
    /// Shutdown: a wait was cut short, or the grace period ran out during the effect.
    Interrupted,
}

impl From<FactsError> for Failure {
    fn from(e: FactsError) -> Self {
        match e {
            FactsError::Db(e) => e.into(),
            FactsError::Interrupted => Failure::Interrupted,
            other => Failure::Retryable(other.to_string()),
        }
    }
}

impl From<crate::db::DbError> for Failure {
    fn from(e: crate::db::DbError) -> Self {
        if e.refuses_content() {
            Failure::Refused(e.to_string())
        } else {
            Failure::Retryable(e.to_string())
        }
    }
}

fn claim_name(claim: &Claim) -> &'static str {
    match claim {
        Claim::Claimed { .. } => "claimed",
        Claim::DuplicateDone => "duplicate",
        Claim::InProgress => "in_progress",
        Claim::Stale => "stale",
        Claim::Failed => "failed",
    }
}

/// Where a command's aggregate stands once its predecessor's outcome is in the log.
enum Predecessor {
    /// The state the predecessor left: the command can be decided.
    Ready(Option<Value>),
    /// This command's own outcome is there too: it was answered before.
    Answered,
}

/// A command message, checked.
struct Parsed {
    envelope: EventEnvelope,
    command_type: CommandType,
    key: AggregateKey,
    seq: u64,
}

pub struct CommandHandler {
    pub role: Role,
    pub owner: String,
    config: Arc<Config>,
    registry: Arc<dyn Registry>,
    state: LogState,
    writer: LogWriter,
    /// The highest log position of a command this handler finished (relay header), for the
    /// processed clock of the end-to-end watermark.
    processed: std::sync::atomic::AtomicU64,
}

impl CommandHandler {
    pub fn new(
        role: Role,
        owner: String,
        config: Arc<Config>,
        registry: Arc<dyn Registry>,
        state: LogState,
        writer: LogWriter,
    ) -> Self {
        CommandHandler { role, owner, config, registry, state, writer, processed: Default::default() }
    }

    /// Records that the command at log `position` is finished (done or dead-lettered).
    pub fn note_processed(&self, position: u64) {
        let before = self.processed.fetch_max(position, std::sync::atomic::Ordering::Relaxed);
        metrics::gauge!("spiced_worker_processed_position", "handler" => self.role.handler()).set(before.max(position) as f64);
    }

    /// Processes one message until it is done or dead-lettered; `Interrupted` on shutdown,
    /// with the claim (if it held one) released.
    pub async fn handle(&self, raw: &[u8], slot: &Slot, shutdown: &Graceful) -> Result<Disposition, Interrupted> {
        let parsed = match self.parse(raw) {
            Ok(p) => p,
            Err(unusable) => return Ok(Disposition::DeadLetter { reason: unusable.to_string(), attempts: 0 }),
        };
        let span = tracing::info_span!("command",
            handler = self.role.handler(), event_id = %parsed.envelope.event_id, command_id = parsed.envelope.command_id().map(tracing::field::display),
            aggregate_id = %parsed.key.aggregate_id, sequence_number = parsed.seq);
        self.handle_parsed(&parsed, slot, shutdown).instrument(span).await
    }

    async fn handle_parsed(&self, parsed: &Parsed, slot: &Slot, shutdown: &Graceful) -> Result<Disposition, Interrupted> {
        let work = Work {
            handler: self.role.handler(),
            event_id: parsed.envelope.event_id,
            aggregate_id: &parsed.key.aggregate_id,
            seq: parsed.seq,
            owner: &self.owner,
        };
        let lease = Duration::from_millis(self.config.worker.lease_ms);
        let mut waits = 0u32;
        loop {
            if shutdown.stop.is_cancelled() {
                return Err(Interrupted);
            }
            let sent = lease::now();
            let claim = self.registry.claim(&work, lease).await;
            if let Ok(c) = &claim {
                metrics::counter!("spiced_worker_claims_total", "handler" => self.role.handler(), "outcome" => claim_name(c)).increment(1);
            }
            let attempt = match claim {
                Ok(Claim::Claimed { attempt }) => attempt,
                Ok(Claim::DuplicateDone | Claim::Stale) => {
                    tracing::debug!("done before: nothing to do");
                    return Ok(Disposition::Done);
                }
                // Failed before, and delivered again: the dead letter may never have gone out
                // (a crash or a shutdown between marking it failed and publishing it), so send
                // it again. A second letter is harmless; a missing one would lose the command.
                Ok(Claim::Failed) => {
                    let reason = "failed after its last attempt (dead letter sent again on redelivery)".to_string();
                    return Ok(Disposition::DeadLetter { reason, attempts: self.config.worker.max_attempts });
                }
                Ok(Claim::InProgress) => {
                    // Another worker holds it; wait for it to finish or for its lease to lapse.
                    waits += 1;
                    self.pause(waits, &shutdown.stop).await;
                    continue;
                }
                // Not even a registry row can hold it (an id with a NUL, from a producer other
                // than the relay: the log index could not have stored it either).
                Err(e) if e.refuses_content() => {
                    tracing::error!(error = %e, "the registry refuses this command; dead-lettered without a claim");
                    return Ok(Disposition::DeadLetter { reason: format!("the registry refuses this command: {e}"), attempts: 0 });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "claim failed; retrying");
                    waits += 1;
                    self.pause(waits, &shutdown.stop).await;
                    continue;
                }
            };
            self.crash_point(WorkerCrash::AfterClaim);
            match self.run_leased(parsed, &work, &Confirmed::at(sent), slot, shutdown).await {
                Ok(()) => {
                    tracing::debug!(attempt, "outcome in the log");
                    return Ok(Disposition::Done);
                }
                Err(Failure::Interrupted) => {
                    self.release(&work).await;
                    return Err(Interrupted);
                }
                Err(Failure::LeaseLost) => {
                    // Not done until the registry says so: claim again, which waits while the
                    // new owner works, reports it done, or hands it back if that owner died.
                    metrics::counter!("spiced_worker_leases_lost_total", "handler" => self.role.handler()).increment(1);
                    tracing::warn!("lease lost; waiting for the new owner to finish the command");
                    waits += 1;
                    self.pause(waits, &shutdown.stop).await;
                }
                Err(Failure::Retryable(error)) if attempt >= self.config.worker.max_attempts => {
                    tracing::error!(attempt, error, "command failed after its last attempt");
                    return Ok(self.give_up(&work, attempt, error).await);
                }
                // A dead letter, not a COMMAND_FAILED outcome: an outcome is for ever, and the
                // refusal may be spiced's own fault (a bug, a schema), which a re-drive after
                // the fix can undo.
                Err(Failure::Refused(error)) => {
                    tracing::error!(attempt, error, "the database refuses this command's data; not retried");
                    return Ok(self.give_up(&work, attempt, error).await);
                }
                Err(Failure::Retryable(error)) => {
                    metrics::counter!("spiced_worker_retries_total", "handler" => self.role.handler()).increment(1);
                    tracing::warn!(attempt, error, "attempt failed; will retry");
                    if let Err(e) = self.registry.mark_retrying(&work, &storable(&error)).await {
                        tracing::warn!(error = %e, "could not mark the command retrying");
                    }
                    self.pause(attempt, &shutdown.stop).await;
                }
            }
        }
    }

    /// Marks the command failed and hands it to the dead-letter topic.
    async fn give_up(&self, work: &Work<'_>, attempt: u32, error: String) -> Disposition {
        metrics::counter!("spiced_worker_dead_letters_total", "handler" => self.role.handler()).increment(1);
        if let Err(e) = self.registry.mark_failed(work, &storable(&error)).await {
            tracing::warn!(error = %e, "could not mark the command failed");
        }
        Disposition::DeadLetter { reason: error, attempts: attempt }
    }

    fn parse(&self, raw: &[u8]) -> Result<Parsed, Unusable> {
        let envelope: EventEnvelope = serde_json::from_slice(raw).map_err(Unusable::NotAnEnvelope)?;
        if envelope.kind() != Some(Kind::Command) {
            return Err(Unusable::Kind(envelope.metadata.get("kind").cloned()));
        }
        let command_type = envelope
            .data
            .get("command_type")
            .and_then(Value::as_str)
            .and_then(CommandType::parse)
            .ok_or(Unusable::CommandType)?;
        if !self.role.handles(command_type) {
            return Err(Unusable::OtherRole { command_type, role: self.role });
        }
        let aggregate_type = AggregateType::parse(&envelope.aggregate_type)
            .filter(|t| *t == command_type.aggregate_type())
            .ok_or_else(|| Unusable::AggregateType { aggregate_type: envelope.aggregate_type.clone(), command_type })?;
        let seq = envelope.sequence_number.filter(|s| *s >= 1).ok_or(Unusable::SequenceNumber)?;
        if envelope.command_id().is_none() {
            return Err(Unusable::CommandId);
        }
        let key = AggregateKey::new(aggregate_type, envelope.aggregate_id.clone());
        Ok(Parsed { envelope, command_type, key, seq })
    }

    /// Gives the claim back so another worker can take the command now rather than after the
    /// lease. The interrupted attempt does not count against `max_attempts`.
    async fn release(&self, work: &Work<'_>) {
        match self.registry.release(work).await {
            Ok(true) => tracing::info!("shutdown: claim released for another worker to take over"),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "shutdown: could not release the claim; it lapses with its lease"),
        }
    }

    /// Runs the command while heartbeats keep the lease; stops if the lease is lost, or at
    /// shutdown (waits at once, the effect at the end of the grace period).
    async fn run_leased(&self, parsed: &Parsed, work: &Work<'_>, confirmed: &Confirmed, slot: &Slot, shutdown: &Graceful) -> Result<(), Failure> {
        let lost = CancellationToken::new();
        let heartbeat = async {
            let every = Duration::from_millis(self.config.worker.heartbeat_ms);
            loop {
                tokio::time::sleep(every).await;
                match self.confirm(work, confirmed).await {
                    Ok(true) => {}
                    Ok(false) => {
                        lost.cancel();
                        return;
                    }
                    Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
                }
            }
        };
        tokio::select! {
            result = self.execute(parsed, work, confirmed, slot, &lost, &shutdown.stop) => result,
            _ = async { heartbeat.await; std::future::pending::<()>().await } => unreachable!(),
            // Dropping the effect mid-way is safe: the outcome's event_id is derived from the
            // command and the index stores an event_id once and one outcome per (aggregate,
            // sequence), so if the append still lands, whoever takes the command over finds
            // the outcome (or a refused duplicate) rather than writing a second effect
            // (docs/design.md, "The effect is the outcome").
            _ = shutdown.deadline.cancelled() => {
                tracing::warn!("shutdown grace period over: abandoning the command mid-effect");
                Err(Failure::Interrupted)
            }
        }
    }

    async fn execute(
        &self,
        p: &Parsed,
        work: &Work<'_>,
        confirmed: &Confirmed,
        slot: &Slot,
        lost: &CancellationToken,
        stop: &CancellationToken,
    ) -> Result<(), Failure> {
        let current = match self.wait_for_predecessor(p, slot, stop).await? {
            Predecessor::Ready(state) => state,
            // The outcome is already in the log (an earlier run appended it): just record it.
            Predecessor::Answered => return self.finish(work).await,
        };
        let payload = p.envelope.data.get("payload").cloned().unwrap_or(Value::Null);
        // Other aggregates as of this command's place in the log (waiting, bounded, for an
        // earlier command's outcome), so the decision follows log order, not timing.
        let wait = Duration::from_millis(self.config.worker.gap_wait_ms);
        let log = self.state.as_of(p.envelope.event_id, wait, slot, stop);
        let facts = p.command_type.facts(&payload, current, &log).await?;
        let decision = p.command_type.decide(&payload, &facts);
        self.crash_point(WorkerCrash::AfterEffect);
        if lost.is_cancelled() || !self.lease_holds(work, confirmed).await? {
            return Err(Failure::LeaseLost);
        }
        // A failed command keeps the state as the decision saw it: `null` for a class or
        // instance of a database deleted with cascade, never its last live state again.
        let outcome = self.outcome_envelope(p, decision, facts);
        let append = AppendCommand::outcome(outcome).map_err(|e| Failure::Retryable(e.to_string()))?;
        match self.writer.append(append).await {
            Ok(AppendOutcome::Accepted { .. }) => {}
            Ok(other) => {
                // Another outcome holds this sequence: the command is answered already.
                tracing::warn!(?other, "an outcome for this sequence already exists");
            }
            Err(e) => return Err(Failure::Retryable(e.to_string())),
        }
        self.crash_point(WorkerCrash::AfterOutcome);
        self.finish(work).await
    }

    /// Fencing, right before the effect, so that a worker frozen past its lease (and not yet
    /// told by its heartbeat) commits nothing. A confirmation sent less than `heartbeat_ms`
    /// ago (under half the lease) leaves more than half the lease to run, as the heartbeats
    /// themselves assume between two beats, so it needs no registry write; an older one (a
    /// slow decision, or a process stopped or suspended meanwhile) is renewed first.
    async fn lease_holds(&self, work: &Work<'_>, confirmed: &Confirmed) -> Result<bool, crate::db::DbError> {
        let age = confirmed.age();
        let fresh = age < Duration::from_millis(self.config.worker.heartbeat_ms);
        metrics::counter!("spiced_worker_fences_total", "handler" => self.role.handler(), "by" => if fresh { "clock" } else { "registry" })
            .increment(1);
        if fresh {
            return Ok(true);
        }
        tracing::info!(age_ms = age.as_millis() as u64, "lease last confirmed over heartbeat_ms ago: confirming it with the registry before the effect");
        self.confirm(work, confirmed).await
    }

    /// A heartbeat; when the lease is still ours, `confirmed` moves to the heartbeat's
    /// sending (see `lease`), not its answer.
    async fn confirm(&self, work: &Work<'_>, confirmed: &Confirmed) -> Result<bool, crate::db::DbError> {
        let sent = lease::now();
        let holds = self.registry.heartbeat(work).await?;
        if holds {
            confirmed.renew(sent);
        }
        Ok(holds)
    }

    async fn finish(&self, work: &Work<'_>) -> Result<(), Failure> {
        if self.registry.mark_done(work).await? {
            Ok(())
        } else {
            Err(Failure::LeaseLost)
        }
    }

    /// Waits (bounded, stepping aside) until the aggregate's previous command has its
    /// outcome.
    async fn wait_for_predecessor(&self, p: &Parsed, slot: &Slot, stop: &CancellationToken) -> Result<Predecessor, Failure> {
        if let Some(found) = self.predecessor(p).await? {
            return Ok(found);
        }
        metrics::counter!("spiced_worker_gap_waits_total", "handler" => self.role.handler()).increment(1);
        tracing::info!("waiting for the outcome of sequence {}", p.seq - 1);
        let deadline = tokio::time::Instant::now() + Duration::from_millis(self.config.worker.gap_wait_ms);
        super::facts::poll_aside(slot, stop, deadline, || self.predecessor(p)).await?.ok_or_else(|| {
            Failure::Retryable(format!("sequence {} has no outcome yet; not applying {} out of order", p.seq - 1, p.seq))
        })
    }

    /// Where the aggregate's outcomes stand for this command; `None` while its predecessor's
    /// is missing.
    async fn predecessor(&self, p: &Parsed) -> Result<Option<Predecessor>, FactsError> {
        let (last, state) = self.state.state(&p.key).await?;
        Ok(if last >= p.seq {
            Some(Predecessor::Answered)
        } else if last + 1 == p.seq {
            Some(Predecessor::Ready(state))
        } else {
            None
        })
    }

    fn outcome_envelope(&self, p: &Parsed, decision: Decision, facts: Facts) -> EventEnvelope {
        let topic = self.role.events_topic(&self.config);
        let routing = OutcomeRouting { kafka_topic: topic, service: self.role.handler(), worker: &self.owner };
        outcome_envelope(&p.envelope, p.command_type, p.seq, decision, facts, &routing)
    }

    /// Exponential backoff with jitter, or until shutdown.
    async fn pause(&self, attempt: u32, shutdown: &CancellationToken) {
        let w = &self.config.worker;
        let (base, cap) = (Duration::from_millis(w.backoff_base_ms), Duration::from_millis(w.backoff_cap_ms));
        crate::backoff::pause(shutdown, crate::backoff::delay(base, cap, attempt.saturating_sub(1))).await;
    }

    pub fn crash_point(&self, point: WorkerCrash) {
        if point == WorkerCrash::AfterClaim && self.config.worker.crash_at == WorkerCrash::StopAfterClaim {
            // Testing only: freeze this process (SIGSTOP) while it holds a claim.
            eprintln!("spiced: worker.crash_at = stop_after_claim: stopping as configured (testing only)");
            let _ = std::process::Command::new("kill").args(["-STOP", &std::process::id().to_string()]).status();
            return;
        }
        if self.config.worker.crash_at == point {
            eprintln!("spiced: worker.crash_at = {point:?}: aborting as configured (testing only)");
            std::process::abort();
        }
    }
}


#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::DbError;

    #[test]
    fn a_refusal_of_the_data_is_not_retried() {
        let refused = DbError::Sqlite(rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_TOOBIG), None));
        assert!(matches!(Failure::from(FactsError::Db(refused)), Failure::Refused(_)));
        let busy = DbError::Sqlite(rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY), None));
        assert!(matches!(Failure::from(busy), Failure::Retryable(_)));
        assert!(matches!(Failure::from(FactsError::Missing(3)), Failure::Retryable(_)));
    }
}
