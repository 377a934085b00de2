//! Planning one group-commit batch: idempotency and optimistic concurrency, decided in memory
//! against the index state read under the log-head lock.
//!
//! Pure functions, so every rule here is unit-tested without a database.

use crate::db::IndexRow;
use crate::domain::AggregateKey;
use crate::envelope::{EventEnvelope, Kind};
use std::collections::HashMap;
use uuid::Uuid;

/// One command to append: one envelope, or several for a bulk command, all or nothing.
#[derive(Debug, Clone)]
pub struct AppendCommand {
    pub command_id: Uuid,
    /// Whether the id came from the client (`Idempotency-Key`) and may have been used before.
    /// A server-generated random id is new by construction and needs no look-up.
    pub id_from_client: bool,
    /// Hash of the request that produced the command; a repeat of the same command id must
    /// carry the same fingerprint.
    pub fingerprint: String,
    pub events: Vec<PendingEvent>,
}

/// One envelope of a command, with the sequence its aggregate must be at.
///
/// An outcome (`metadata.kind = "domain"`) carries its command's `sequence_number` already and
/// ignores `expected_seq`: it is stored once per `event_id`, and only after the aggregate's
/// previous outcome.
#[derive(Debug, Clone)]
pub struct PendingEvent {
    pub key: AggregateKey,
    pub expected_seq: u64,
    pub envelope: EventEnvelope,
}

/// Why an envelope cannot be appended as an outcome.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotAnOutcome {
    #[error("unknown aggregate type {0}")]
    AggregateType(String),
    #[error("an outcome is a domain envelope with a sequence number")]
    Kind,
    #[error("an outcome names its command_id")]
    CommandId,
}

impl AppendCommand {
    /// An outcome envelope answering a command, as its own append.
    pub fn outcome(envelope: EventEnvelope) -> Result<AppendCommand, NotAnOutcome> {
        let aggregate_type = crate::domain::AggregateType::parse(&envelope.aggregate_type)
            .ok_or_else(|| NotAnOutcome::AggregateType(envelope.aggregate_type.clone()))?;
        if envelope.kind() != Some(Kind::Domain) || envelope.sequence_number.is_none() {
            return Err(NotAnOutcome::Kind);
        }
        let command_id = envelope.command_id().ok_or(NotAnOutcome::CommandId)?;
        let key = AggregateKey::new(aggregate_type, envelope.aggregate_id.clone());
        Ok(AppendCommand {
            command_id,
            id_from_client: true,
            fingerprint: String::new(),
            events: vec![PendingEvent { key, expected_seq: 0, envelope }],
        })
    }

    fn is_outcome(&self) -> bool {
        self.events.iter().all(|e| e.envelope.kind() == Some(Kind::Domain))
    }
}

/// What to read from the index before planning `commands`. Server-generated command ids are
/// new by construction and skipped unless `check_all_ids` (after a repair).
pub fn lookup_request<'a>(commands: impl IntoIterator<Item = &'a AppendCommand>, check_all_ids: bool) -> crate::db::LookupRequest {
    use std::collections::BTreeSet;
    let (mut command_ids, mut event_ids) = (BTreeSet::new(), BTreeSet::new());
    let (mut command_keys, mut outcome_keys) = (BTreeSet::new(), BTreeSet::new());
    for c in commands {
        if c.is_outcome() {
            event_ids.extend(c.events.iter().map(|e| e.envelope.event_id));
            outcome_keys.extend(c.events.iter().map(|e| e.key.clone()));
        } else {
            if c.id_from_client || check_all_ids {
                command_ids.insert(c.command_id);
            }
            command_keys.extend(c.events.iter().map(|e| e.key.clone()));
        }
    }
    crate::db::LookupRequest {
        command_ids: command_ids.into_iter().collect(),
        event_ids: event_ids.into_iter().collect(),
        command_keys: command_keys.into_iter().collect(),
        outcome_keys: outcome_keys.into_iter().collect(),
    }
}

/// The sequence an accepted envelope received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub key: AggregateKey,
    pub seq: u64,
    pub event_id: Uuid,
}

/// An aggregate that is not at the sequence a command expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqConflict {
    pub key: AggregateKey,
    pub expected: u64,
    pub actual: u64,
}

/// What happened to one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendOutcome {
    /// In the log at `position`; `duplicate` when an earlier append of the same command id
    /// already put it there.
    Accepted { position: u64, events: Vec<Appended>, duplicate: bool },
    /// `expected_seq` did not match, for each aggregate listed (a bulk command names every
    /// one): nothing appended.
    Conflict(Vec<SeqConflict>),
    /// The command id was used before for a different request: nothing appended.
    KeyReused { command_id: Uuid },
}

/// The decisions for a batch, the envelopes to write, and their index rows.
#[derive(Debug)]
pub struct Plan {
    pub outcomes: Vec<AppendOutcome>,
    pub envelopes: Vec<EventEnvelope>,
    pub rows: Vec<IndexRow>,
}

/// Decides each command of a batch that will be written at `position`, given what the index
/// already holds ([`crate::db::Lookup`]).
pub fn plan<'a>(position: u64, commands: impl IntoIterator<Item = &'a AppendCommand>, state: &crate::db::Lookup) -> Plan {
    let mut known: HashMap<Uuid, (String, AppendOutcome)> = HashMap::new();
    for (command_id, rows) in group_by_command(&state.rows) {
        let outcome = AppendOutcome::Accepted {
            position: rows[0].position,
            events: rows.iter().map(|r| appended(r)).collect(),
            duplicate: true,
        };
        known.insert(command_id, (rows[0].fingerprint.clone(), outcome));
    }
    let mut versions = state.versions.clone();
    let mut outcome_heads = state.outcomes.clone();
    let mut stored: HashMap<Uuid, AppendOutcome> = state
        .rows
        .iter()
        .filter(|r| r.kind == Kind::Domain)
        .map(|r| (r.event_id, accepted_duplicate(r)))
        .collect();
    let mut plan = Plan { outcomes: Vec::new(), envelopes: Vec::new(), rows: Vec::new() };
    for command in commands {
        if command.is_outcome() {
            let outcome = plan_outcome(position, command, &mut stored, &mut outcome_heads, &mut plan);
            plan.outcomes.push(outcome);
            continue;
        }
        if let Some((fingerprint, outcome)) = known.get(&command.command_id) {
            plan.outcomes.push(if *fingerprint == command.fingerprint {
                as_duplicate(outcome.clone())
            } else {
                AppendOutcome::KeyReused { command_id: command.command_id }
            });
            continue;
        }
        let outcome = match check_sequences(command, &versions) {
            Err(conflict) => conflict,
            Ok(()) => accept(position, command, &mut versions, &mut plan),
        };
        if matches!(outcome, AppendOutcome::Accepted { .. }) {
            known.insert(command.command_id, (command.fingerprint.clone(), outcome.clone()));
        }
        plan.outcomes.push(outcome);
    }
    plan
}

fn accepted_duplicate(row: &IndexRow) -> AppendOutcome {
    AppendOutcome::Accepted { position: row.position, events: vec![appended(row)], duplicate: true }
}

/// An outcome is stored once per event id, and only past the aggregate's last outcome: a
/// second, different outcome for the same command sequence is refused, never stored.
fn plan_outcome(
    position: u64,
    command: &AppendCommand,
    stored: &mut HashMap<Uuid, AppendOutcome>,
    heads: &mut HashMap<AggregateKey, u64>,
    plan: &mut Plan,
) -> AppendOutcome {
    let event = &command.events[0];
    let envelope = &event.envelope;
    if let Some(existing) = stored.get(&envelope.event_id) {
        return existing.clone();
    }
    let seq = envelope.sequence_number.unwrap_or(0);
    let head = heads.get(&event.key).copied().unwrap_or(0);
    if seq <= head {
        return AppendOutcome::Conflict(vec![SeqConflict { key: event.key.clone(), expected: seq - 1, actual: head }]);
    }
    heads.insert(event.key.clone(), seq);
    let row = IndexRow {
        event_id: envelope.event_id,
        command_id: command.command_id,
        fingerprint: String::new(),
        key: event.key.clone(),
        kind: Kind::Domain,
        seq,
        position,
    };
    let outcome = AppendOutcome::Accepted { position, events: vec![appended(&row)], duplicate: false };
    stored.insert(envelope.event_id, AppendOutcome::Accepted {
        position,
        events: vec![appended(&row)],
        duplicate: true,
    });
    plan.rows.push(row);
    plan.envelopes.push(envelope.clone());
    outcome
}

fn group_by_command(rows: &[IndexRow]) -> HashMap<Uuid, Vec<&IndexRow>> {
    let mut groups: HashMap<Uuid, Vec<&IndexRow>> = HashMap::new();
    for row in rows.iter().filter(|r| r.kind == Kind::Command) {
        groups.entry(row.command_id).or_default().push(row);
    }
    for rows in groups.values_mut() {
        rows.sort_by(|a, b| (&a.key, a.seq).cmp(&(&b.key, b.seq)));
    }
    groups
}

fn appended(row: &IndexRow) -> Appended {
    Appended { key: row.key.clone(), seq: row.seq, event_id: row.event_id }
}

fn as_duplicate(outcome: AppendOutcome) -> AppendOutcome {
    match outcome {
        AppendOutcome::Accepted { position, events, .. } => {
            AppendOutcome::Accepted { position, events, duplicate: true }
        }
        other => other,
    }
}

/// Every envelope's aggregate must be at its expected sequence; a bulk command naming one
/// aggregate twice conflicts with itself on the second. Every mismatch is reported.
fn check_sequences(
    command: &AppendCommand,
    versions: &HashMap<AggregateKey, u64>,
) -> Result<(), AppendOutcome> {
    let mut seen: HashMap<&AggregateKey, u64> = HashMap::new();
    let mut conflicts = Vec::new();
    for event in &command.events {
        let actual = *seen
            .get(&event.key)
            .unwrap_or(versions.get(&event.key).unwrap_or(&0));
        if actual != event.expected_seq {
            conflicts.push(SeqConflict { key: event.key.clone(), expected: event.expected_seq, actual });
        }
        seen.insert(&event.key, actual + 1);
    }
    if conflicts.is_empty() { Ok(()) } else { Err(AppendOutcome::Conflict(conflicts)) }
}

fn accept(
    position: u64,
    command: &AppendCommand,
    versions: &mut HashMap<AggregateKey, u64>,
    plan: &mut Plan,
) -> AppendOutcome {
    let mut events = Vec::with_capacity(command.events.len());
    for event in &command.events {
        let seq = versions.get(&event.key).copied().unwrap_or(0) + 1;
        versions.insert(event.key.clone(), seq);
        let mut envelope = event.envelope.clone();
        envelope.sequence_number = Some(seq);
        plan.rows.push(IndexRow {
            event_id: envelope.event_id,
            command_id: command.command_id,
            fingerprint: command.fingerprint.clone(),
            key: event.key.clone(),
            kind: Kind::Command,
            seq,
            position,
        });
        events.push(Appended { key: event.key.clone(), seq, event_id: envelope.event_id });
        plan.envelopes.push(envelope);
    }
    AppendOutcome::Accepted { position, events, duplicate: false }
}

/// The index rows a stored segment implies: used to repair the index when the log is ahead of
/// it (a writer died between its log write and its index commit).
pub fn rows_of_segment(segment: &crate::log::Segment) -> Vec<IndexRow> {
    segment
        .events
        .iter()
        .filter_map(|env| {
            let aggregate_type = crate::domain::AggregateType::parse(&env.aggregate_type)?;
            Some(IndexRow {
                event_id: env.event_id,
                command_id: env.command_id().unwrap_or(env.event_id),
                fingerprint: env
                    .metadata
                    .get(FINGERPRINT_KEY)
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_string(),
                key: AggregateKey::new(aggregate_type, env.aggregate_id.clone()),
                kind: env.kind().unwrap_or(Kind::Command),
                seq: env.sequence_number.unwrap_or(0),
                position: segment.position,
            })
        })
        .collect()
}

/// `metadata` key under which each command envelope carries its request fingerprint, so the
/// index (idempotency included) can be rebuilt from the log alone.
pub const FINGERPRINT_KEY: &str = "request_fingerprint";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::commands::Routing;
    use crate::domain::{Command, CommandType};
    use chrono::Utc;

    fn command(db: &str, expected: u64, fp: &str) -> AppendCommand {
        command_with_id(Uuid::new_v4(), db, expected, fp)
    }

    fn command_with_id(id: Uuid, db: &str, expected: u64, fp: &str) -> AppendCommand {
        let key = AggregateKey::database(db);
        let cmd = Command {
            command_type: CommandType::CreateDatabase,
            aggregate: key.clone(),
            expected_seq: expected,
            payload: serde_json::json!({}),
        };
        let routing = Routing { kafka_topic: "t".into(), service: "s".into() };
        AppendCommand {
            command_id: id,
            id_from_client: true,
            fingerprint: fp.into(),
            events: vec![PendingEvent {
                key,
                expected_seq: expected,
                envelope: cmd.to_envelope(id, id, None, Utc::now(), &routing),
            }],
        }
    }

    fn lookup(rows: Vec<IndexRow>, versions: HashMap<AggregateKey, u64>) -> crate::db::Lookup {
        crate::db::Lookup { rows, versions, outcomes: HashMap::new() }
    }

    fn outcome_of(command: &AppendCommand, seq: u64) -> AppendCommand {
        let mut env = command.events[0].envelope.clone();
        env.event_id = crate::envelope::domain_event_id(command.command_id, "DATABASE_CREATED", &env.aggregate_id);
        env.event_type = "DATABASE_CREATED".into();
        env.metadata.insert("kind".into(), serde_json::json!("domain"));
        env.sequence_number = Some(seq);
        AppendCommand::outcome(env).unwrap()
    }

    #[test]
    fn outcomes_are_stored_once_and_in_order() {
        let c = command("a", 0, "fp");
        let first = outcome_of(&c, 1);
        let p = plan(4, &[first.clone(), first.clone()], &lookup(vec![], HashMap::new()));
        assert!(matches!(p.outcomes[0], AppendOutcome::Accepted { duplicate: false, .. }));
        assert!(matches!(p.outcomes[1], AppendOutcome::Accepted { duplicate: true, .. }));
        assert_eq!(p.envelopes.len(), 1);
        assert_eq!(p.rows[0].kind, Kind::Domain);
        // Already stored: the stored one is the answer, nothing new is written.
        let stored = p.rows[0].clone();
        let p = plan(5, &[first], &lookup(vec![stored], HashMap::new()));
        assert!(matches!(p.outcomes[0], AppendOutcome::Accepted { position: 4, duplicate: true, .. }));
        assert!(p.envelopes.is_empty());
        // A different outcome at a sequence that already has one is refused.
        let other = outcome_of(&command("a", 0, "fp"), 1);
        let mut state = lookup(vec![], HashMap::new());
        state.outcomes.insert(AggregateKey::database("a"), 1);
        let p = plan(6, &[other], &state);
        assert!(matches!(&p.outcomes[0], AppendOutcome::Conflict(c) if c[0].actual == 1));
    }

    fn seq_of(outcome: &AppendOutcome) -> u64 {
        match outcome {
            AppendOutcome::Accepted { events, .. } => events[0].seq,
            other => panic!("not accepted: {other:?}"),
        }
    }

    #[test]
    fn assigns_next_sequence_and_rejects_stale_expectations() {
        let versions = HashMap::from([(AggregateKey::database("a"), 3)]);
        let cmds = [command("a", 3, "x"), command("a", 3, "y"), command("a", 4, "z")];
        let p = plan(9, &cmds, &lookup(vec![], versions));
        assert_eq!(seq_of(&p.outcomes[0]), 4);
        assert_eq!(
            p.outcomes[1],
            AppendOutcome::Conflict(vec![SeqConflict { key: AggregateKey::database("a"), expected: 3, actual: 4 }])
        );
        assert_eq!(seq_of(&p.outcomes[2]), 5);
        assert_eq!(p.envelopes.len(), 2);
        assert_eq!(p.envelopes[1].sequence_number, Some(5));
        assert!(p.rows.iter().all(|r| r.position == 9));
    }

    #[test]
    fn repeated_command_id_returns_the_original_or_reports_reuse() {
        let id = Uuid::new_v4();
        let stored = IndexRow {
            event_id: id,
            command_id: id,
            fingerprint: "fp".into(),
            key: AggregateKey::database("a"),
            kind: Kind::Command,
            seq: 1,
            position: 2,
        };
        let cmds = [command_with_id(id, "a", 0, "fp"), command_with_id(id, "a", 0, "other")];
        let p = plan(5, &cmds, &lookup(vec![stored], HashMap::new()));
        assert!(matches!(&p.outcomes[0],
            AppendOutcome::Accepted { position: 2, duplicate: true, events } if events[0].seq == 1));
        assert_eq!(p.outcomes[1], AppendOutcome::KeyReused { command_id: id });
        assert!(p.envelopes.is_empty());
    }

    #[test]
    fn repeats_inside_one_batch_are_stored_once() {
        let id = Uuid::new_v4();
        let cmds = [
            command_with_id(id, "a", 0, "fp"),
            command_with_id(id, "a", 0, "fp"),
            command_with_id(id, "a", 0, "changed"),
        ];
        let p = plan(1, &cmds, &lookup(vec![], HashMap::new()));
        assert_eq!(p.envelopes.len(), 1);
        assert!(matches!(p.outcomes[1], AppendOutcome::Accepted { duplicate: true, .. }));
        assert_eq!(p.outcomes[2], AppendOutcome::KeyReused { command_id: id });
    }

    #[test]
    fn bulk_is_all_or_nothing() {
        let mut bulk = command("a", 0, "fp");
        let mut second = command("b", 0, "fp").events.remove(0);
        second.envelope.event_id = Uuid::new_v4();
        bulk.events.push(second);
        let mut third = command("c", 0, "fp").events.remove(0);
        third.envelope.event_id = Uuid::new_v4();
        bulk.events.push(third);
        let versions = HashMap::from([(AggregateKey::database("b"), 1), (AggregateKey::database("c"), 2)]);
        let p = plan(1, &[bulk], &lookup(vec![], versions));
        let AppendOutcome::Conflict(conflicts) = &p.outcomes[0] else { panic!("{:?}", p.outcomes[0]) };
        let named: Vec<(&str, u64)> = conflicts.iter().map(|c| (c.key.aggregate_id.as_str(), c.actual)).collect();
        assert_eq!(named, [("b", 1), ("c", 2)], "every conflicting member is named");
        assert!(p.envelopes.is_empty() && p.rows.is_empty());
    }
}
