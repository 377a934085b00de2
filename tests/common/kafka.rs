//! Kafka helpers for tests: per-test topic names and a consumer that reads until a condition.

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{ClientConfig, Message};
use spiced::config::Config;
use spiced::envelope::EventEnvelope;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Points `config` at the test broker with topic names nobody else uses, a fast poll and a
/// short lease.
pub fn isolate_topics(config: &mut Config) {
    let p = format!("t{}", Uuid::new_v4().simple());
    let t = &mut config.topics;
    for topic in [
        &mut t.ontology_commands,
        &mut t.instance_commands,
        &mut t.ontology_events,
        &mut t.instance_events,
        &mut config.relay.dead_letter_topic,
        &mut config.worker.ontology_dead_letter_topic,
        &mut config.worker.instance_dead_letter_topic,
    ] {
        *topic = format!("{p}_{topic}");
    }
    config.kafka.brokers = std::env::var("SPICED_TEST_KAFKA_BROKERS")
        .expect("SPICED_TEST_KAFKA_BROKERS is not set: run the tests through scripts/test.sh");
    config.relay.poll_interval_ms = 50;
    config.relay.lease_ms = 3000;
    config.kafka.message_timeout_ms = 1000;
    config.worker.group_prefix = p.clone();
    config.project.group = format!("{p}-projection");
    config.worker.session_timeout_ms = 6000;
}

/// One consumed message.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: String,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

impl Received {
    pub fn envelope(&self) -> EventEnvelope {
        serde_json::from_slice(&self.payload).expect("payload is an EventEnvelope")
    }
}

/// Reads `topics` from the beginning in a fresh group until `done(&received)` holds, or panics
/// after `timeout`.
pub async fn consume_until(
    config: &Config,
    topics: &[&str],
    timeout: Duration,
    done: impl Fn(&[Received]) -> bool,
) -> Vec<Received> {
    consume(config, topics, timeout, done, Duration::ZERO).await
}

/// Like [`consume_until`], then goes on reading until nothing arrives for `quiet`: for counting
/// duplicates once the producer is known to be finished.
pub async fn consume_all(
    config: &Config,
    topics: &[&str],
    timeout: Duration,
    done: impl Fn(&[Received]) -> bool,
    quiet: Duration,
) -> Vec<Received> {
    consume(config, topics, timeout, done, quiet).await
}

async fn consume(
    config: &Config,
    topics: &[&str],
    timeout: Duration,
    done: impl Fn(&[Received]) -> bool,
    quiet: Duration,
) -> Vec<Received> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("group.id", format!("test-{}", Uuid::new_v4().simple()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .create()
        .expect("consumer");
    consumer.subscribe(topics).expect("subscribe");
    let deadline = Instant::now() + timeout;
    let mut received = Vec::new();
    let mut satisfied = false;
    loop {
        if !satisfied && done(&received) {
            if quiet.is_zero() {
                return received;
            }
            satisfied = true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "timed out after {timeout:?} with {} messages", received.len());
        let wait = if satisfied { quiet.min(left) } else { left };
        match tokio::time::timeout(wait, consumer.recv()).await {
            Ok(Ok(m)) => {
                use rdkafka::message::Headers;
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                (h.key.to_string(), String::from_utf8_lossy(h.value.unwrap_or(b"")).into_owned())
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                received.push(Received {
                    topic: m.topic().to_string(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: String::from_utf8_lossy(m.key().unwrap_or(b"")).into_owned(),
                    payload: m.payload().unwrap_or(b"").to_vec(),
                    headers,
                });
            }
            // The topic may not exist yet when the consumer subscribes before the relay made it.
            Ok(Err(rdkafka::error::KafkaError::MessageConsumption(
                rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition,
            ))) => continue,
            Ok(Err(e)) => panic!("consumer error: {e}"),
            Err(_) if satisfied => return received,
            Err(_) => continue,
        }
    }
}

/// The offsets `group` has committed, per (topic, partition). A blocking call, run off the
/// async threads.
pub async fn group_committed(config: &Config, group: &str, topics: &[String]) -> std::collections::BTreeMap<(String, i32), i64> {
    let (brokers, group, topics) = (config.kafka.brokers.clone(), group.to_string(), topics.to_vec());
    tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::BaseConsumer;
        use rdkafka::{Offset, TopicPartitionList};
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        for topic in &topics {
            let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).expect("metadata");
            for p in metadata.topics().iter().flat_map(|t| t.partitions()) {
                tpl.add_partition(topic, p.id());
            }
        }
        let committed = consumer.committed_offsets(tpl, Duration::from_secs(10)).expect("committed offsets");
        committed
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some(((e.topic().to_string(), e.partition()), o)),
                _ => None,
            })
            .collect()
    })
    .await
    .unwrap()
}
