//! Relay benchmark: throughput publishing a pre-filled log of 100,000 events to the local
//! broker, S3 GETs per published event, and end-to-end latency (202 to Kafka delivery to a
//! consumer) under 500 commands/s. Run through `scripts/bench.sh`.

mod common;

use common::percentile;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{ClientConfig, Message};
use serde_json::json;
use spiced::domain::commands::Routing;
use spiced::domain::{AggregateKey, Command, CommandType};
use spiced::log::plan::{AppendCommand, PendingEvent};
use spiced::log::writer::LogWriter;
use spiced::relay::{run_with, RelayOptions, RelayStats};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

async fn throughput() {
    let config = common::production_config().await;
    let (db, log) = spiced::storage::open(&config).await.unwrap();
    let tasks = TaskTracker::new();
    let writer = LogWriter::start(log, db.index.clone(), config.writer.clone(), &tasks).await.unwrap();
    let routing = Routing { kafka_topic: config.topics.ontology_commands.clone(), service: "bench".into() };
    let appends = (0..100_000).map(|i| {
        let (writer, routing) = (writer.clone(), routing.clone());
        async move {
            let id = Uuid::new_v4();
            let key = AggregateKey::database(&format!("d{i}"));
            let command = Command {
                command_type: CommandType::CreateDatabase,
                aggregate: key.clone(),
                expected_seq: 0,
                payload: json!({"db": format!("d{i}"), "name": format!("d{i}"), "description": "benchmark"}),
            };
            let envelope = command.to_envelope(id, id, None, chrono::Utc::now(), &routing);
            let pending = PendingEvent { key, expected_seq: 0, envelope };
            writer
                .append(AppendCommand { command_id: id, id_from_client: false, fingerprint: String::new(), events: vec![pending] })
                .await
                .unwrap();
        }
    });
    futures::stream::iter(appends).buffer_unordered(4000).for_each(|_| async {}).await;
    let head = db.index.head().await.unwrap();
    let stats = Arc::new(RelayStats::default());
    let stop = CancellationToken::new();
    let started = Instant::now();
    let relay = tokio::spawn(run_with(config.clone(), RelayOptions::default(), stop.clone(), stats.clone()));
    while stats.published_position.load(Ordering::Relaxed) < head {
        assert!(!relay.is_finished(), "relay exited");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = started.elapsed();
    let events = stats.events_published.load(Ordering::Relaxed);
    let (_, gets, lists) = stats.log_requests.snapshot();
    println!(
        "relay throughput: {events} events in {head} segments published in {:.2} s = {:.0} events/s; \
         S3 GETs {gets} ({:.4} per event), LISTs {lists}",
        elapsed.as_secs_f64(),
        events as f64 / elapsed.as_secs_f64(),
        gets as f64 / events as f64,
    );
    stop.cancel();
    relay.await.unwrap().unwrap();
}

async fn latency(rate: u64, secs: u64) {
    let config = common::production_config().await;
    let (base, _) = common::start_api(&config).await;
    let stop = CancellationToken::new();
    let relay = tokio::spawn(run_with(config.clone(), RelayOptions::default(), stop.clone(), Arc::default()));

    let accepted: Arc<Mutex<HashMap<Uuid, Instant>>> = Arc::default();
    let delivered: Arc<Mutex<HashMap<Uuid, Instant>>> = Arc::default();
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("group.id", format!("bench-{}", Uuid::new_v4().simple()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    // Wait for the relay to create the topic, then for the consumer to join.
    tokio::time::sleep(Duration::from_secs(2)).await;
    consumer.subscribe(&[&config.topics.ontology_commands]).unwrap();
    let consumed = delivered.clone();
    let reader = tokio::spawn(async move {
        while let Ok(m) = consumer.recv().await {
            let env: spiced::envelope::EventEnvelope = serde_json::from_slice(m.payload().unwrap()).unwrap();
            consumed.lock().unwrap().insert(env.event_id, Instant::now());
        }
    });
    let http = reqwest::Client::new();
    // One warm-up command, delivered before measuring, so the consumer group has joined.
    let warm = http.post(format!("{base}/databases")).json(&json!({"name": "warmup"})).send().await.unwrap();
    let warm_id: Uuid = warm.json::<serde_json::Value>().await.unwrap()["command_id"].as_str().unwrap().parse().unwrap();
    while !delivered.lock().unwrap().contains_key(&warm_id) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    let total = rate * secs;
    let mut sends = Vec::new();
    for i in 0..total {
        tick.tick().await;
        let (http, base, accepted) = (http.clone(), base.clone(), accepted.clone());
        sends.push(tokio::spawn(async move {
            let r = http.post(format!("{base}/databases")).json(&json!({"name": format!("l{i}")})).send().await.unwrap();
            let at = Instant::now();
            let body: serde_json::Value = r.json().await.unwrap();
            let id: Uuid = body["command_id"].as_str().unwrap().parse().unwrap();
            accepted.lock().unwrap().insert(id, at);
        }));
    }
    for s in sends {
        s.await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while delivered.lock().unwrap().len() < total as usize + 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let accepted = accepted.lock().unwrap().clone();
    let delivered = delivered.lock().unwrap().clone();
    let mut latencies: Vec<Duration> = accepted
        .iter()
        .filter_map(|(id, at)| delivered.get(id).map(|d| d.saturating_duration_since(*at)))
        .collect();
    latencies.sort();
    println!(
        "end-to-end at {rate} commands/s for {secs} s: {} of {} delivered; 202 -> consumer p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        latencies.len(),
        total,
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        percentile(&latencies, 1.0),
    );
    reader.abort();
    stop.cancel();
    relay.await.unwrap().unwrap();
}

#[tokio::main]
async fn main() {
    throughput().await;
    let secs = std::env::var("SPICED_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    latency(500, secs).await;
    common::drop_databases().await;
}
