//! The message bus between the relay and the consumers: Kafka, through `rdkafka` with its
//! bundled librdkafka.

pub mod kafka;
pub mod redrive;
