//! Where each kind of message goes: the worker role that carries out a command, the topic a
//! command is published to (`metadata.kafka_topic`), each role's event and dead-letter topics,
//! and every topic spiced produces to. One place, so the API, the relay, the workers and the
//! tools cannot disagree.

use crate::config::Config;
use crate::domain::{AggregateType, CommandType};

/// A worker role: which commands it carries out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Databases and ontology classes.
    Ontology,
    /// Instances.
    Instance,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "ontology" => Some(Role::Ontology),
            "instance" => Some(Role::Instance),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Ontology => "ontology",
            Role::Instance => "instance",
        }
    }

    /// The registry's handler name.
    pub fn handler(self) -> &'static str {
        match self {
            Role::Ontology => "ontology-worker",
            Role::Instance => "instance-worker",
        }
    }

    pub fn handles(self, command_type: CommandType) -> bool {
        let instance = command_type.aggregate_type() == AggregateType::Instance;
        instance == (self == Role::Instance)
    }

    pub fn for_command(command_type: CommandType) -> Role {
        if Role::Instance.handles(command_type) { Role::Instance } else { Role::Ontology }
    }

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
