//! The `EventEnvelope`: the one shape every event takes, in the log and on Kafka.
//!
//! Field for field the seed's schema. The envelope's JSON bytes are written to the log once and
//! published unchanged, so a consumer sees exactly what the writer stored.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

/// Schema version written into every envelope this build produces.
pub const SCHEMA_VERSION: &str = "1";

/// One event: a command request (`metadata.kind = "command"`) or a domain outcome
/// (`metadata.kind = "domain"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventEnvelope {
    /// Idempotency key of the event; for a command, its command id.
    pub event_id: Uuid,
    /// `<COMMAND_TYPE>_REQUESTED` for commands, the domain event name otherwise.
    pub event_type: String,
    /// `Database`, `OntologyClass` or `Instance`.
    pub aggregate_type: String,
    /// The aggregate's id, e.g. `{db}:{branch}:{class_id}`.
    pub aggregate_id: String,
    /// When the event was accepted (UTC).
    pub occurred_at: DateTime<Utc>,
    /// Who asked for it, when known.
    pub actor: Option<String>,
    /// Event body: for a command `{command_id, command_type, payload, expected_seq, ...}`.
    pub data: Map<String, Value>,
    /// Routing and classification: `kind`, `kafka_topic`, optionally `ordering_key`, `service`.
    pub metadata: Map<String, Value>,
    /// Envelope schema version, `"1"`.
    pub schema_version: String,
    /// Per-aggregate sequence: the aggregate's count of accepted commands. `None` only before
    /// allocation; every envelope in the log has one.
    pub sequence_number: Option<u64>,
}

/// The two kinds of envelope, read from `metadata.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Command,
    Domain,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Command => "command",
            Kind::Domain => "domain",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "command" => Some(Kind::Command),
            "domain" => Some(Kind::Domain),
            _ => None,
        }
    }
}

impl EventEnvelope {
    /// `metadata.kind`, if present and known.
    pub fn kind(&self) -> Option<Kind> {
        self.metadata.get("kind").and_then(Value::as_str).and_then(Kind::parse)
    }

    /// `metadata.kafka_topic`, if present.
    pub fn kafka_topic(&self) -> Option<&str> {
        self.metadata.get("kafka_topic").and_then(Value::as_str)
    }

    /// The Kafka key: `metadata.ordering_key` if present, else the aggregate id, so that one
    /// aggregate always lands in one partition.
    pub fn ordering_key(&self) -> &str {
        self.metadata
            .get("ordering_key")
            .and_then(Value::as_str)
            .unwrap_or(&self.aggregate_id)
    }

    /// `data.command_id` for command envelopes (equal to `event_id`), or the command an outcome
    /// answers for domain envelopes.
    pub fn command_id(&self) -> Option<Uuid> {
        self.data
            .get("command_id")
            .and_then(Value::as_str)
            .and_then(|s| Uuid::parse_str(s).ok())
    }
}

/// The deterministic id of a domain (outcome) event, so that a retried command produces the
/// same outcome id and the log stores it once.
pub fn domain_event_id(command_id: Uuid, event_type: &str, aggregate_id: &str) -> Uuid {
    let name = format!("spiced:{command_id}:{event_type}:{aggregate_id}");
    Uuid::new_v5(&Uuid::NAMESPACE_URL, name.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> EventEnvelope {
        let id = Uuid::new_v4();
        EventEnvelope {
            event_id: id,
            event_type: "CREATE_INSTANCE_REQUESTED".into(),
            aggregate_type: "Instance".into(),
            aggregate_id: "db:main:Product:p1".into(),
            occurred_at: "2025-12-17T00:00:00Z".parse().unwrap(),
            actor: Some("alice".into()),
            data: json!({"command_id": id, "command_type": "CREATE_INSTANCE",
                         "expected_seq": 0, "payload": {"name": "x"}})
            .as_object()
            .unwrap()
            .clone(),
            metadata: json!({"kind": "command", "kafka_topic": "instance_commands"})
                .as_object()
                .unwrap()
                .clone(),
            schema_version: SCHEMA_VERSION.into(),
            sequence_number: Some(1),
        }
    }

    #[test]
    fn round_trips_through_json() {
        let env = sample();
        let text = serde_json::to_string(&env).unwrap();
        let back: EventEnvelope = serde_json::from_str(&text).unwrap();
        assert_eq!(env, back);
    }

    #[test]
    fn serialises_exactly_the_seed_fields() {
        let value = serde_json::to_value(sample()).unwrap();
        let mut keys: Vec<_> = value.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "actor", "aggregate_id", "aggregate_type", "data", "event_id", "event_type",
                "metadata", "occurred_at", "schema_version", "sequence_number"
            ]
        );
        assert_eq!(value["occurred_at"], "2025-12-17T00:00:00Z");
        assert_eq!(value["schema_version"], "1");
    }

    #[test]
    fn parses_the_seed_example() {
        let seed = r#"{
          "event_id": "7b0f3c55-8a39-4c65-9a53-6d1e8e2c1a11",
          "event_type": "CREATE_INSTANCE_REQUESTED",
          "aggregate_type": "Instance",
          "aggregate_id": "db:Class:instance_id",
          "occurred_at": "2025-12-17T00:00:00Z",
          "actor": "user_id",
          "data": { "command_id": "7b0f3c55-8a39-4c65-9a53-6d1e8e2c1a11",
                    "command_type": "CREATE_INSTANCE", "expected_seq": 0, "payload": { } },
          "metadata": { "kind": "command", "kafka_topic": "instance_commands", "service": "oms" },
          "schema_version": "1",
          "sequence_number": 1
        }"#;
        let env: EventEnvelope = serde_json::from_str(seed).unwrap();
        assert_eq!(env.kind(), Some(Kind::Command));
        assert_eq!(env.kafka_topic(), Some("instance_commands"));
        assert_eq!(env.command_id(), Some(env.event_id));
        assert_eq!(env.ordering_key(), "db:Class:instance_id");
    }

    #[test]
    fn rejects_unknown_fields() {
        let mut value = serde_json::to_value(sample()).unwrap();
        value["extra"] = json!(1);
        assert!(serde_json::from_value::<EventEnvelope>(value).is_err());
    }

    #[test]
    fn domain_event_ids_are_deterministic() {
        let c = Uuid::new_v4();
        assert_eq!(
            domain_event_id(c, "INSTANCE_CREATED", "a"),
            domain_event_id(c, "INSTANCE_CREATED", "a")
        );
        assert_ne!(
            domain_event_id(c, "INSTANCE_CREATED", "a"),
            domain_event_id(c, "INSTANCE_UPDATED", "a")
        );
    }
}
