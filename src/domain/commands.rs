//! Commands: what a client asks for, as it is stored in the log.

use super::ids::{AggregateKey, AggregateType};
use crate::envelope::{EventEnvelope, SCHEMA_VERSION};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use uuid::Uuid;

/// Every command the API accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CommandType {
    CreateDatabase,
    DeleteDatabase,
    CreateOntologyClass,
    UpdateOntologyClass,
    DeleteOntologyClass,
    CreateInstance,
    UpdateInstance,
    DeleteInstance,
    BulkCreateInstances,
}

impl CommandType {
    pub fn as_str(self) -> &'static str {
        match self {
            CommandType::CreateDatabase => "CREATE_DATABASE",
            CommandType::DeleteDatabase => "DELETE_DATABASE",
            CommandType::CreateOntologyClass => "CREATE_ONTOLOGY_CLASS",
            CommandType::UpdateOntologyClass => "UPDATE_ONTOLOGY_CLASS",
            CommandType::DeleteOntologyClass => "DELETE_ONTOLOGY_CLASS",
            CommandType::CreateInstance => "CREATE_INSTANCE",
            CommandType::UpdateInstance => "UPDATE_INSTANCE",
            CommandType::DeleteInstance => "DELETE_INSTANCE",
            CommandType::BulkCreateInstances => "BULK_CREATE_INSTANCES",
        }
    }

    pub fn parse(s: &str) -> Option<CommandType> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
    }

    /// The aggregate type the command acts on.
    pub fn aggregate_type(self) -> AggregateType {
        match self {
            CommandType::CreateDatabase | CommandType::DeleteDatabase => AggregateType::Database,
            CommandType::CreateOntologyClass
            | CommandType::UpdateOntologyClass
            | CommandType::DeleteOntologyClass => AggregateType::OntologyClass,
            CommandType::CreateInstance
            | CommandType::UpdateInstance
            | CommandType::DeleteInstance
            | CommandType::BulkCreateInstances => AggregateType::Instance,
        }
    }
}

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
