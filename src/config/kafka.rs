//! The Kafka sections: the cluster and client settings every Kafka role shares (`kafka`) and
//! the topic names (`topics`).

use super::names_a_secret;
use super::{at_least_one, invalid, ConfigError};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Kafka connection and client settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port...]`.
    pub brokers: String,
    /// `client.id` reported to the brokers.
    pub client_id: String,
    /// Producer compression: `none`, `gzip`, `snappy`, `lz4` or `zstd`.
    pub compression: Compression,
    /// Milliseconds the producer waits to fill a batch (`linger.ms`).
    pub linger_ms: u64,
    /// Milliseconds before an undelivered message fails (`message.timeout.ms`). Must be under
    /// half of `relay.lease_ms`, so a relay's messages are settled before its lease can pass on.
    pub message_timeout_ms: u64,
    /// In-flight requests per broker connection (1 to 5; idempotence keeps order up to 5).
    pub max_in_flight: u32,
    /// Partitions of topics created at start.
    pub partitions: i32,
    /// Replication factor of topics created at start.
    pub replication_factor: i32,
    /// `retention.ms` of topics created at start; -1 keeps forever.
    pub retention_ms: i64,
    /// Extra librdkafka properties, applied last (e.g. `security.protocol`, `ssl.ca.location`,
    /// `sasl.mechanism`, `sasl.username`, `sasl.password`). From the environment:
    /// `SPICED_KAFKA__PROPERTIES__SASL_PASSWORD` sets `sasl.password` (`_` stands for `.`).
    /// Values of keys that name a secret are redacted wherever the config is shown.
    pub properties: KafkaProperties,
}

/// Kafka topic names.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicsConfig {
    /// Database and class commands: one topic, keyed by database, so a database's commands
    /// and its classes' stay in one partition in log order.
    pub ontology_commands: String,
    pub instance_commands: String,
    pub ontology_events: String,
    pub instance_events: String,
}

/// `kafka.properties`: shown (serialised, debug-printed) with secret values redacted.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct KafkaProperties(pub std::collections::BTreeMap<String, String>);

impl std::ops::Deref for KafkaProperties {
    type Target = std::collections::BTreeMap<String, String>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for KafkaProperties {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl KafkaProperties {
    fn shown(&self) -> impl Iterator<Item = (&String, &str)> {
        self.0.iter().map(|(k, v)| (k, if names_a_secret(k) { "<redacted>" } else { v.as_str() }))
    }
}

impl Serialize for KafkaProperties {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.shown())
    }
}

impl fmt::Debug for KafkaProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.shown()).finish()
    }
}

/// `kafka.compression`: only the codecs librdkafka is built with here (a test holds them
/// against the library's `builtin.features`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl Compression {
    /// The codecs, as librdkafka names them (`compression.type`, `builtin.features`).
    pub const CODECS: [Compression; 4] = [Compression::Gzip, Compression::Snappy, Compression::Lz4, Compression::Zstd];

    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

impl KafkaConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.brokers.trim().is_empty() {
            return Err(invalid("kafka.brokers", "must name at least one broker"));
        }
        if !(1..=5).contains(&self.max_in_flight) {
            return Err(invalid("kafka.max_in_flight", "must be 1 to 5"));
        }
        at_least_one("kafka.partitions", self.partitions.max(0) as u64)?;
        at_least_one("kafka.replication_factor", self.replication_factor.max(0) as u64)?;
        at_least_one("kafka.message_timeout_ms", self.message_timeout_ms)
    }
}
