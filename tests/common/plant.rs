//! Events written to the log behind the API's back, as a buggy or older writer could have left
//! them: for the tests of what the pipeline does with content it cannot store.

use super::TestApp;
use serde_json::{json, Map, Value};
use spiced::config::Config;
use spiced::domain::commands::Routing;
use spiced::domain::{AggregateKey, AggregateType, Command, CommandType};
use spiced::envelope::{domain_event_id, EventEnvelope, SCHEMA_VERSION};
use spiced::log::Segment;
use uuid::Uuid;

fn instance(key: &AggregateKey) -> bool {
    key.aggregate_type == AggregateType::Instance
}

/// A command envelope as the API appends it, at sequence `seq`.
pub fn command(config: &Config, command_type: CommandType, key: AggregateKey, seq: u64, payload: Value) -> EventEnvelope {
    let t = &config.topics;
    let topic = if instance(&key) { &t.instance_commands } else { &t.ontology_commands };
    let routing = Routing { kafka_topic: topic.clone(), service: "planted".into() };
    let command = Command { command_type, aggregate: key, expected_seq: seq - 1, payload };
    let id = Uuid::new_v4();
    let mut envelope = command.to_envelope(id, id, None, chrono::Utc::now(), &routing);
    envelope.sequence_number = Some(seq);
    envelope.metadata.insert("request_fingerprint".into(), json!(format!("planted-{id}")));
    envelope
}

/// The outcome of `command` a worker would write, with the aggregate's resulting `state`.
pub fn outcome(config: &Config, command: &EventEnvelope, event_type: &str, state: Value) -> EventEnvelope {
    let command_id = command.command_id().expect("a planted command has its id");
    let mut data = Map::new();
    data.insert("command_id".into(), json!(command_id));
    data.insert("command_type".into(), command.data["command_type"].clone());
    data.insert("command_event_id".into(), json!(command.event_id));
    data.insert("state".into(), state);
    let t = &config.topics;
    let topic = if command.aggregate_type == "Instance" { &t.instance_events } else { &t.ontology_events };
    let mut metadata = Map::new();
    metadata.insert("kind".into(), json!("domain"));
    metadata.insert("kafka_topic".into(), json!(topic));
    metadata.insert("service".into(), json!("planted"));
    EventEnvelope {
        event_id: domain_event_id(command_id, event_type, &command.aggregate_id),
        event_type: event_type.into(),
        aggregate_type: command.aggregate_type.clone(),
        aggregate_id: command.aggregate_id.clone(),
        occurred_at: chrono::Utc::now(),
        actor: None,
        data,
        metadata,
        schema_version: SCHEMA_VERSION.into(),
        sequence_number: command.sequence_number,
    }
}

/// A CREATE_DATABASE command and its DATABASE_CREATED outcome with this description.
pub fn database(config: &Config, name: &str, description: &str) -> [EventEnvelope; 2] {
    let payload = json!({"db": name, "name": name, "description": description});
    let command = command(config, CommandType::CreateDatabase, AggregateKey::database(name), 1, payload.clone());
    let outcome = outcome(config, &command, "DATABASE_CREATED", payload);
    [command, outcome]
}

/// Writes `events` as one segment at the next log position, where the next write through the
/// API finds it and records it in the index (the writer repairs a log ahead of its index).
/// The pipeline must be idle, so that the position is free. Returns it.
pub async fn segment(app: &TestApp, events: &[EventEnvelope]) -> u64 {
    let (db, log) = app.storage().await;
    let position = db.index.head().await.unwrap() + 1;
    log.put_segment(position, Segment::encode(events)).await.unwrap();
    position
}
