//! Kafka clients built from `[kafka]`: the idempotent producer, topic bootstrap, and the
//! consumer-lag metric every consuming role exports.

use crate::config::KafkaConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::{ClientConfig, Offset};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Kafka client failures.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("kafka refused to create topic {topic}: {code}")]
    TopicRefused { topic: String, code: String },
    #[error("cannot reach a Kafka broker at {brokers} (kafka.brokers): {reason}")]
    Unreachable { brokers: String, reason: String },
}

/// Settings every client shares: brokers and client id.
pub fn base_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &kafka.brokers).set("client.id", &kafka.client_id);
    c
}

/// Applies `kafka.properties` last, so an operator's setting wins over spiced's.
pub fn with_properties(mut c: ClientConfig, kafka: &KafkaConfig) -> ClientConfig {
    for (k, v) in kafka.properties.iter() {
        c.set(k, v);
    }
    c
}

/// The producer: idempotent, `acks=all`, bounded in-flight, so retries neither duplicate nor
/// reorder within a partition.
pub fn producer(kafka: &KafkaConfig) -> Result<FutureProducer, BusError> {
    let mut c = base_config(kafka);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("max.in.flight.requests.per.connection", kafka.max_in_flight.to_string())
        .set("compression.type", kafka.compression.as_str())
        .set("linger.ms", kafka.linger_ms.to_string())
        .set("message.timeout.ms", kafka.message_timeout_ms.to_string());
    Ok(with_properties(c, kafka).create()?)
}

/// A producer that is replaced when it can no longer deliver.
///
/// After a stalled broker, librdkafka's idempotent producer can be left fenced or fatally
/// failed (seen: one `MessageTimedOut`, then `ProducerFenced` on every delivery for ever): a
/// producer id is bound to its sequence numbers, and a retry with the same producer cannot
/// repair them. A fresh producer starts with a new producer id. The caller re-sends what
/// failed (the relay re-publishes from its checkpoint), so nothing is lost.
pub struct Publisher {
    kafka: KafkaConfig,
    current: std::sync::RwLock<FutureProducer>,
}

impl Publisher {
    pub fn new(kafka: &KafkaConfig) -> Result<Publisher, BusError> {
        Ok(Publisher { kafka: kafka.clone(), current: std::sync::RwLock::new(producer(kafka)?) })
    }

    /// The producer to send with now.
    pub fn get(&self) -> FutureProducer {
        self.current.read().expect("publisher lock").clone()
    }

    /// After a failed delivery: replaces the producer if `error` (or the producer's own
    /// state) says it cannot deliver again.
    pub fn recover(&self, error: &KafkaError) {
        let fatal = self.get().client().fatal_error();
        if fatal.is_none() && !cured_by_new_producer(error) {
            return;
        }
        tracing::warn!(%error, fatal = ?fatal, "replacing the Kafka producer");
        self.replace();
    }

    /// Replaces the producer unconditionally (a role that steps down after a stall); keeps the
    /// old one if no new one can be made.
    pub fn replace(&self) {
        let fresh = match producer(&self.kafka) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "cannot create a new Kafka producer; keeping the old one");
                return;
            }
        };
        let old = std::mem::replace(&mut *self.current.write().expect("publisher lock"), fresh);
        metrics::counter!("spiced_kafka_producers_replaced_total").increment(1);
        // Dropping purges and flushes (up to 500 ms) and joins librdkafka's threads: off the
        // async threads.
        tokio::task::spawn_blocking(move || drop(old));
    }
}

/// Delivery errors after which an idempotent producer's state is suspect: its messages timed
/// out (so their sequence numbers are lost to it), or the broker refused its producer id or
/// epoch.
fn cured_by_new_producer(error: &KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    let code = match error {
        KafkaError::MessageProduction(code) => *code,
        _ => return false,
    };
    matches!(
        code,
        MessageTimedOut
            | ProducerFenced
            | InvalidProducerEpoch
            | UnknownProducerId
            | OutOfOrderSequenceNumber
            | InvalidProducerIdMapping
            | Fatal
            | PurgeQueue
            | PurgeInflight
    )
}

/// Checks that a broker of `kafka.brokers` answers, within `timeout`, quietly: an operator tool
/// run where there is no Kafka (a `spiced dev` directory) fails with one line naming the
/// brokers, not a screen of client errors.
pub async fn reachable(kafka: &KafkaConfig, timeout: Duration) -> Result<(), BusError> {
    use rdkafka::config::RDKafkaLogLevel;
    let mut c = with_properties(base_config(kafka), kafka);
    c.set_log_level(RDKafkaLogLevel::Emerg);
    let probe: rdkafka::consumer::BaseConsumer<LastError> = c.create_with_context(LastError::default())?;
    let brokers = kafka.brokers.clone();
    let answer = tokio::task::spawn_blocking(move || {
        let fetched = probe.fetch_metadata(None, timeout).map(|_| ());
        fetched.map_err(|e| {
            // The client's errors arrive as events, served by a poll.
            let _ = probe.poll(Duration::from_millis(100));
            probe.context().take().unwrap_or_else(|| e.to_string())
        })
    })
    .await;
    match answer {
        Ok(Ok(())) => Ok(()),
        Ok(Err(reason)) => Err(BusError::Unreachable { brokers, reason }),
        Err(e) => Err(BusError::Unreachable { brokers, reason: e.to_string() }),
    }
}

/// Keeps a client's last error, so a failed probe can say why (a refused SASL login, a TLS
/// certificate) rather than librdkafka's generic "broker transport failure".
#[derive(Default)]
struct LastError(std::sync::Mutex<Option<String>>);

impl LastError {
    fn take(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl rdkafka::client::ClientContext for LastError {
    fn log(&self, _level: rdkafka::config::RDKafkaLogLevel, _facility: &str, _message: &str) {}

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        let reason = if reason.is_empty() { error.to_string() } else { reason.to_string() };
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
    }
}

impl rdkafka::consumer::ConsumerContext for LastError {}

/// Creates the topics that do not exist yet; an existing topic is fine, any other refusal is
/// an error naming the topic. Another process may be creating the same topics at the same
/// moment, so a failed attempt is checked against the broker's metadata and retried.
pub async fn ensure_topics(kafka: &KafkaConfig, topics: &[String]) -> Result<(), BusError> {
    let admin: AdminClient<DefaultClientContext> =
        with_properties(base_config(kafka), kafka).create()?;
    let (mut last_error, mut retry) = (None, crate::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(2)));
    for attempt in 0..5u64 {
        let missing = missing_topics(&admin, topics)?;
        if missing.is_empty() {
            return Ok(());
        }
        match create(&admin, kafka, &missing).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, attempt, "topic creation failed; checking again");
                last_error = Some(e);
                tokio::time::sleep(retry.next_delay()).await;
            }
        }
    }
    Err(last_error.expect("an attempt failed"))
}

fn missing_topics(admin: &AdminClient<DefaultClientContext>, topics: &[String]) -> Result<Vec<String>, BusError> {
    let metadata = admin.inner().fetch_metadata(None, Duration::from_secs(10))?;
    let existing: std::collections::HashSet<&str> = metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none() && !t.partitions().is_empty())
        .map(|t| t.name())
        .collect();
    Ok(topics.iter().filter(|t| !existing.contains(t.as_str())).cloned().collect())
}

async fn create(
    admin: &AdminClient<DefaultClientContext>,
    kafka: &KafkaConfig,
    topics: &[String],
) -> Result<(), BusError> {
    let retention = kafka.retention_ms.to_string();
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| {
            NewTopic::new(t, kafka.partitions, TopicReplication::Fixed(kafka.replication_factor))
                .set("retention.ms", &retention)
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics(&new, &opts).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(BusError::TopicRefused { topic, code: code.to_string() })
            }
        }
    }
    Ok(())
}

/// How long one broker question of [`consumer_lag`] may take.
const LAG_TIMEOUT: Duration = Duration::from_secs(2);

/// Per partition assigned to `consumer`: (topic, partition, messages not yet consumed), that
/// is high watermark - position. A partition with no position yet (nothing consumed since the
/// assignment) counts from its committed offset, else from its low watermark. `None` if the
/// broker does not answer. Blocking (broker round trips): call it off the async threads.
pub fn backlog<X: ConsumerContext, C: Consumer<X>>(consumer: &C) -> Option<Vec<(String, i32, i64)>> {
    let positions = consumer.position().ok()?;
    let mut committed = None;
    let mut backlog = Vec::new();
    for p in positions.elements() {
        let (low, high) = consumer.fetch_watermarks(p.topic(), p.partition(), LAG_TIMEOUT).ok()?;
        let from = match p.offset() {
            Offset::Offset(o) => o,
            _ => {
                let committed = committed.get_or_insert_with(|| consumer.committed(LAG_TIMEOUT).ok());
                match committed.as_ref().and_then(|c| c.find_partition(p.topic(), p.partition())).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => low,
                }
            }
        };
        backlog.push((p.topic().to_string(), p.partition(), (high - from).max(0)));
    }
    Some(backlog)
}

/// Messages not yet consumed on the partitions assigned to `consumer` ([`backlog`] summed).
/// `Some(0)` with nothing assigned; `None` if the broker does not answer. Blocking.
pub fn consumer_lag<X: ConsumerContext, C: Consumer<X>>(consumer: &C) -> Option<i64> {
    Some(backlog(consumer)?.iter().map(|(_, _, n)| n).sum())
}

/// Exports `spiced_consumer_lag_messages{handler}` for `consumer` every `every` until `stop`,
/// and tells `progress` whether work is waiting. The broker questions run on the blocking
/// pool, not on the async threads.
pub fn spawn_lag_export<X, C>(
    consumer: Arc<C>,
    handler: &str,
    every: Duration,
    stop: CancellationToken,
    progress: Arc<crate::liveness::Stage>,
) -> tokio::task::JoinHandle<()>
where
    X: ConsumerContext + 'static,
    C: Consumer<X> + Send + Sync + 'static,
{
    let handler = handler.to_string();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let c = consumer.clone();
            match tokio::task::spawn_blocking(move || consumer_lag(&*c)).await {
                Ok(Some(lag)) => {
                    metrics::gauge!("spiced_consumer_lag_messages", "handler" => handler.clone()).set(lag as f64);
                    progress.backlog(lag.max(0) as u64);
                }
                // Kept at its last value: a broker that does not answer is not zero lag.
                _ => {
                    tracing::debug!("consumer lag not available this round");
                    progress.work_waiting();
                }
            }
        }
    })
}

/// The relay's header carrying an envelope's log position.
pub const POSITION_HEADER: &str = "spiced-log-position";

/// The log position the relay stamped on a record, if any.
pub fn log_position<M: rdkafka::Message>(m: &M) -> Option<u64> {
    use rdkafka::message::Headers;
    let headers = m.headers()?;
    let header = headers.iter().find(|h| h.key == POSITION_HEADER)?;
    std::str::from_utf8(header.value?).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn librdkafka_is_built_with_tls_sasl_and_every_codec_spiced_offers() {
        let native = rdkafka::ClientConfig::new().create_native_config().unwrap();
        let features = native.get("builtin.features").unwrap();
        let built: Vec<&str> = features.split(',').collect();
        for wanted in crate::config::Compression::CODECS.iter().map(|c| c.as_str()).chain(["ssl", "sasl_plain", "sasl_scram"]) {
            assert!(built.contains(&wanted), "{wanted} is not in builtin.features {features}");
        }
    }
}
