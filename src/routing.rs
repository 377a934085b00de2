//! Where each kind of message goes: the worker role that carries out a command, the topic a
//! command is published to (`metadata.kafka_topic`), each role's event and dead-letter topics,
//! and every topic spiced produces to. One place, so the API, the relay, the workers and the
//! tools cannot disagree.

use crate::config::Config;
use crate::domain::{AggregateType, CommandType};

pub use crate::domain::Role;

/// Each role's topics, from the config.
impl Role {
    pub fn command_topics(self, config: &Config) -> Vec<String> {
        let t = &config.topics;
        match self {
            Role::Ontology => vec![t.ontology_commands.clone()],
            Role::Instance => vec![t.instance_commands.clone()],
        }
    }

    pub fn events_topic(self, config: &Config) -> &str {
        match self {
            Role::Ontology => &config.topics.ontology_events,
            Role::Instance => &config.topics.instance_events,
        }
    }

    pub fn dead_letter_topic(self, config: &Config) -> &str {
        match self {
            Role::Ontology => &config.worker.ontology_dead_letter_topic,
            Role::Instance => &config.worker.instance_dead_letter_topic,
        }
    }
}

/// The topic a command is published to: database and class commands share one (keyed by
/// database, so a database's commands and its classes' stay in log order), instances another.
pub fn command_topic(config: &Config, command_type: CommandType) -> &str {
    let topics = &config.topics;
    match command_type.aggregate_type() {
        AggregateType::Database | AggregateType::OntologyClass => &topics.ontology_commands,
        AggregateType::Instance => &topics.instance_commands,
    }
}

/// Every topic a role may produce to, from the config.
pub fn all_topics(config: &Config) -> Vec<String> {
    let t = &config.topics;
    let mut topics = vec![
        t.ontology_commands.clone(),
        t.instance_commands.clone(),
        t.ontology_events.clone(),
        t.instance_events.clone(),
        config.relay.dead_letter_topic.clone(),
        config.worker.ontology_dead_letter_topic.clone(),
        config.worker.instance_dead_letter_topic.clone(),
    ];
    topics.sort();
    topics.dedup();
    topics
}
