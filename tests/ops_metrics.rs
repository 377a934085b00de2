//! Operations metrics: consumer lag per handler, and the relay's lag in events, against the
//! real services.

mod common;

use common::kafka::isolate_topics;
use common::{isolated_config, spawn_with, Backend};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

/// The value of the sample `series` (name and labels, as rendered) in this process's metrics.
fn sample(series: &str) -> Option<f64> {
    let text = spiced::telemetry::metrics().render();
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Waits (bounded) until `series` has the value `want`.
async fn wait_sample(series: &str, want: f64) {
    let deadline = Instant::now() + WAIT;
    while sample(series) != Some(want) {
        assert!(Instant::now() < deadline, "{series} is {:?}, not {want}", sample(series));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Lag = high watermark - position, summed over the assigned partitions, and exported under
/// the handler's label.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consumer_lag_counts_the_messages_not_yet_consumed() {
    let (mut config, _dir) = isolated_config(Backend::LocalSqlite).await;
    isolate_topics(&mut config);
    let topic = config.topics.instance_events.clone();
    spiced::bus::kafka::ensure_topics(&config.kafka, &[topic.clone()]).await.unwrap();
    let producer = spiced::bus::kafka::producer(&config.kafka).unwrap();
    for i in 0..5 {
        let key = format!("k{i}");
        producer.send(FutureRecord::to(&topic).key(&key).payload("x"), Duration::from_secs(10)).await.unwrap();
    }
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("group.id", format!("{}-lag", config.worker.group_prefix))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    for partition in 0..config.kafka.partitions {
        assignment.add_partition_offset(&topic, partition, Offset::Beginning).unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let consumer = std::sync::Arc::new(consumer);
    let lag = |c: std::sync::Arc<StreamConsumer>| async move {
        tokio::task::spawn_blocking(move || spiced::bus::kafka::consumer_lag(&*c)).await.unwrap()
    };
    assert_eq!(lag(consumer.clone()).await, Some(5), "nothing consumed yet");
    for _ in 0..2 {
        tokio::time::timeout(WAIT, consumer.recv()).await.expect("a message").unwrap();
    }
    assert_eq!(lag(consumer.clone()).await, Some(3));

    let stop = CancellationToken::new();
    let export = spiced::bus::kafka::spawn_lag_export(consumer.clone(), "lag-test", Duration::from_millis(50), stop.clone());
    wait_sample("spiced_consumer_lag_messages{handler=\"lag-test\"}", 3.0).await;
    stop.cancel();
    export.await.unwrap();
}

/// `spiced_relay_lag_events` counts envelopes after the relay checkpoint: all of them while
/// nothing can be published, none once a relay with a broker has caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_lag_in_events_counts_what_is_not_published() {
    use spiced::relay::{run_with, RelayOptions};
    let (mut config, dir) = isolated_config(Backend::S3Postgres).await;
    isolate_topics(&mut config);
    let app = spawn_with(config.clone(), dir).await;
    for name in ["a", "b", "c"] {
        let (s, b) = app.post("/databases", json!({"name": name})).await;
        assert_eq!(s, 202, "{b}");
    }
    // No broker: nothing is published, so every envelope is lag.
    let mut stuck = config.clone();
    stuck.kafka.brokers = "127.0.0.1:1".into();
    stuck.relay.create_topics = false;
    let stop = CancellationToken::new();
    let relay = tokio::spawn(run_with(stuck, RelayOptions::default(), stop.clone(), Default::default()));
    wait_sample("spiced_relay_lag_events", 3.0).await;
    stop.cancel();
    relay.await.unwrap().unwrap();

    let stop = CancellationToken::new();
    let relay = tokio::spawn(run_with(config, RelayOptions::default(), stop.clone(), Default::default()));
    wait_sample("spiced_relay_lag_events", 0.0).await;
    stop.cancel();
    relay.await.unwrap().unwrap();
    app.stop().await;
}
