//! The envelopes of the domain: a command as the API stores it in the log, and the outcome a
//! worker appends for it. Both are built here, so their fields are named in one place.

use super::CommandType;
use crate::domain::ids::AggregateKey;
use crate::domain::rules::{Decision, Facts};
use crate::envelope::{domain_event_id, EventEnvelope, SCHEMA_VERSION};
use chrono::{DateTime, Utc};
use serde_json::{json, Map, Value};
use uuid::Uuid;

/// One command against one aggregate, before it has a sequence number.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub command_type: CommandType,
    pub aggregate: AggregateKey,
    /// The sequence the client believes the aggregate is at; 0 for creates.
    pub expected_seq: u64,
    pub payload: Value,
}

/// Where a command envelope is published and under which service name.
#[derive(Debug, Clone)]
pub struct Routing {
    pub kafka_topic: String,
    pub service: String,
}

impl Command {
    /// The command envelope as stored in the log. `event_id` is the command's own id, except in
    /// a bulk command, where each instance's envelope gets an id derived from the bulk command's
    /// id (`data.command_id` still names the bulk command).
    pub fn to_envelope(
        &self,
        event_id: Uuid,
        command_id: Uuid,
        actor: Option<String>,
        occurred_at: DateTime<Utc>,
        routing: &Routing,
    ) -> EventEnvelope {
        let mut data = Map::new();
        data.insert("command_id".into(), json!(command_id));
        data.insert("command_type".into(), json!(self.command_type.as_str()));
        data.insert("aggregate_type".into(), json!(self.aggregate.aggregate_type.as_str()));
        data.insert("aggregate_id".into(), json!(self.aggregate.aggregate_id));
        data.insert("expected_seq".into(), json!(self.expected_seq));
        data.insert("payload".into(), self.payload.clone());
        let mut metadata = Map::new();
        metadata.insert("kind".into(), json!("command"));
        metadata.insert("kafka_topic".into(), json!(routing.kafka_topic));
        metadata.insert("service".into(), json!(routing.service));
        EventEnvelope {
            event_id,
            event_type: format!("{}_REQUESTED", self.command_type.as_str()),
            aggregate_type: self.aggregate.aggregate_type.as_str().to_string(),
            aggregate_id: self.aggregate.aggregate_id.clone(),
            occurred_at,
            actor,
            data,
            metadata,
            schema_version: SCHEMA_VERSION.to_string(),
            sequence_number: None,
        }
    }
}

/// The event id of one instance's envelope inside a bulk command.
pub fn bulk_member_event_id(command_id: Uuid, aggregate_id: &str) -> Uuid {
    Uuid::new_v5(&command_id, aggregate_id.as_bytes())
}

/// Where an outcome is published and who decided it.
#[derive(Debug, Clone)]
pub struct OutcomeRouting<'a> {
    pub kafka_topic: &'a str,
    pub service: &'a str,
    pub worker: &'a str,
}

/// The outcome of the command in `command` (its `sequence_number` set): the domain event with
/// the aggregate's full resulting state, or `COMMAND_FAILED` with the error and the state left
/// as it was (`current`). Its event id is derived from the command id, so a retry appends the
/// same outcome, which the index refuses as a duplicate.
pub fn outcome_envelope(
    command: &EventEnvelope,
    command_type: CommandType,
    seq: u64,
    decision: Decision,
    facts: Facts,
    routing: &OutcomeRouting<'_>,
) -> EventEnvelope {
    let command_id = command.command_id().expect("a command envelope names its command");
    let (current, mut data) = (facts.current, facts.notes);
    data.insert("command_id".into(), json!(command_id));
    data.insert("command_type".into(), json!(command_type.as_str()));
    data.insert("command_event_id".into(), json!(command.event_id));
    let event_type = match decision {
        Decision::Event { event_type, state } => {
            data.insert("state".into(), state);
            event_type
        }
        Decision::Failed { code, message } => {
            data.insert("error".into(), json!({"code": code, "message": message}));
            data.insert("state".into(), current.unwrap_or(Value::Null));
            "COMMAND_FAILED"
        }
    };
    let mut metadata = Map::new();
    metadata.insert("kind".into(), json!("domain"));
    metadata.insert("kafka_topic".into(), json!(routing.kafka_topic));
    metadata.insert("service".into(), json!(routing.service));
    metadata.insert("worker".into(), json!(routing.worker));
    EventEnvelope {
        event_id: domain_event_id(command_id, event_type, &command.aggregate_id),
        event_type: event_type.to_string(),
        aggregate_type: command.aggregate_type.clone(),
        aggregate_id: command.aggregate_id.clone(),
        occurred_at: chrono::Utc::now(),
        actor: command.actor.clone(),
        data,
        metadata,
        schema_version: SCHEMA_VERSION.to_string(),
        sequence_number: Some(seq),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_envelope_follows_the_contract() {
        let cmd = Command {
            command_type: CommandType::CreateInstance,
            aggregate: AggregateKey::instance("db", "main", "C", "i1"),
            expected_seq: 0,
            payload: json!({"data": {"name": "x"}}),
        };
        let id = Uuid::new_v4();
        let routing = Routing { kafka_topic: "instance_commands".into(), service: "spiced".into() };
        let env = cmd.to_envelope(id, id, None, Utc::now(), &routing);
        assert_eq!(env.event_id, id);
        assert_eq!(env.event_type, "CREATE_INSTANCE_REQUESTED");
        assert_eq!(env.aggregate_type, "Instance");
        assert_eq!(env.aggregate_id, "db:main:C:i1");
        assert_eq!(env.command_id(), Some(id));
        assert_eq!(env.data["command_type"], "CREATE_INSTANCE");
        assert_eq!(env.data["expected_seq"], 0);
        assert_eq!(env.data["payload"]["data"]["name"], "x");
        assert_eq!(env.metadata["kind"], "command");
        assert_eq!(env.kafka_topic(), Some("instance_commands"));
    }
}
