//! The relay against a real Kafka-protocol broker, S3-compatible server and PostgreSQL.

mod common;

use common::kafka::{consume_until, isolate_topics, Received};
use common::{isolated_config, spawn_with, Backend, TestApp};
use serde_json::json;
use spiced::config::Config;
use spiced::relay::{run_with, RelayOptions, RelayStats};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

struct RelayHandle {
    stop: CancellationToken,
    stats: Arc<RelayStats>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

fn start_relay(config: &Config) -> RelayHandle {
    let stop = CancellationToken::new();
    let stats = Arc::new(RelayStats::default());
    let task = tokio::spawn(run_with(config.clone(), RelayOptions::default(), stop.clone(), stats.clone()));
    RelayHandle { stop, stats, task }
}

impl RelayHandle {
    /// Waits (bounded) until the relay has published up to `position`.
    async fn wait_published(&self, position: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.stats.published_position.load(Ordering::Relaxed) < position {
            assert!(!self.task.is_finished(), "relay exited early");
            assert!(Instant::now() < deadline, "relay did not reach position {position} in {timeout:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

async fn app_with_topics() -> TestApp {
    let (mut config, dir) = isolated_config(Backend::S3Postgres).await;
    isolate_topics(&mut config);
    spawn_with(config, dir).await
}

fn all_topics(config: &Config) -> Vec<String> {
    let t = &config.topics;
    vec![
        t.ontology_commands.clone(),
        t.instance_commands.clone(),
        config.relay.dead_letter_topic.clone(),
    ]
}

fn ids_of(received: &[Received]) -> HashSet<Uuid> {
    received.iter().map(|r| r.envelope().event_id).collect()
}

/// 8 writers append while the relay runs: exactly the appended set arrives, each aggregate in
/// one partition and in sequence order, with the log's bytes unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publishes_exactly_the_log_in_aggregate_order() {
    let app = Arc::new(app_with_topics().await);
    let relay = start_relay(&app.config);
    let mut writers = Vec::new();
    for w in 0..8 {
        let app = app.clone();
        writers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for (path, body) in [("/databases".to_string(), json!({"name": format!("db{w}")})), (format!("/databases/db{w}/classes"), json!({"id": "C"}))] {
                let (s, b) = app.post(&path, body).await;
                assert_eq!(s, 202, "{b}");
                ids.push(b["command_id"].as_str().unwrap().parse::<Uuid>().unwrap());
            }
            for seq in 1..=20 {
                let r = app
                    .http
                    .put(app.url(&format!("/databases/db{w}/classes/C?expected_seq={seq}")))
                    .json(&json!({"patch": {"label": format!("v{seq}")}}))
                    .send()
                    .await
                    .unwrap();
                let (s, b) = common::status_json(r).await;
                assert_eq!(s, 202, "{b}");
                ids.push(b["command_id"].as_str().unwrap().parse().unwrap());
            }
            ids
        }));
    }
    let mut expected: HashSet<Uuid> = HashSet::new();
    for w in writers {
        expected.extend(w.await.unwrap());
    }
    assert_eq!(expected.len(), 8 * 22);
    let topics = all_topics(&app.config);
    let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    let received = consume_until(&app.config, &topic_refs, Duration::from_secs(60), |r| {
        ids_of(r).len() >= expected.len()
    })
    .await;
    let got = ids_of(&received);
    let (db, log) = app.storage().await;
    let head = db.index.head().await.unwrap();
    let all_log = common::read_whole_log(&log).await;
    assert_eq!(got, expected, "exactly the appended set arrives");

    // Per aggregate: one partition, sequence order (duplicates allowed, never out of order).
    let mut per_aggregate: BTreeMap<String, Vec<(i32, u64)>> = BTreeMap::new();
    for r in &received {
        let e = r.envelope();
        assert_eq!(r.key, e.ordering_key(), "keyed by ordering key (the database, for its own and its classes' commands)");
        per_aggregate.entry(e.aggregate_id.clone()).or_default().push((r.partition, e.sequence_number.unwrap()));
    }
    let mut partitions = HashSet::new();
    for (aggregate, seen) in &per_aggregate {
        let parts: HashSet<i32> = seen.iter().map(|(p, _)| *p).collect();
        assert_eq!(parts.len(), 1, "{aggregate} spread over partitions {parts:?}");
        partitions.extend(parts);
        let seqs: Vec<u64> = seen.iter().map(|(_, s)| *s).collect();
        assert!(seqs.windows(2).all(|w| w[0] <= w[1]), "{aggregate} out of order: {seqs:?}");
    }
    assert!(partitions.len() > 1, "8 keys over 3 partitions used only {partitions:?}");

    // Bytes unchanged: each payload is the envelope's stored line.
    let stored: HashMap<Uuid, Vec<u8>> =
        all_log.iter().map(|(_, e)| (e.event_id, serde_json::to_vec(e).unwrap())).collect();
    for r in &received {
        assert_eq!(&r.payload, &stored[&r.envelope().event_id]);
    }
    relay.wait_published(head, Duration::from_secs(10)).await;
    relay.stop().await;
}

/// A writer that holds its batch open (allocated, not yet in the log) for far longer than the
/// poll interval: its event and the one queued behind it are still published, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_write_is_still_published_in_order() {
    let app = Arc::new(app_with_topics().await);
    let relay = start_relay(&app.config);
    let (db, log) = app.storage().await;
    // The paused writer: take the head lock and a position, then stall.
    let mut tx = db.index.begin().await.unwrap();
    let position = tx.next_position();
    let late_id = Uuid::new_v4();
    let command = spiced::domain::Command {
        command_type: spiced::domain::CommandType::CreateDatabase,
        aggregate: spiced::domain::AggregateKey::database("late"),
        expected_seq: 0,
        payload: json!({"db": "late", "name": "late"}),
    };
    let routing = spiced::domain::commands::Routing {
        kafka_topic: app.config.topics.ontology_commands.clone(),
        service: "test".into(),
    };
    let mut envelope = command.to_envelope(late_id, late_id, None, chrono::Utc::now(), &routing);
    envelope.sequence_number = Some(1);
    // A second command on the same aggregate queues behind the lock.
    let behind = {
        let app = app.clone();
        tokio::spawn(async move {
            let r = app.http.delete(app.url("/databases/late?expected_seq=1")).send().await.unwrap();
            common::status_json(r).await
        })
    };
    tokio::time::sleep(Duration::from_millis(20 * app.config.relay.poll_interval_ms)).await;
    assert!(!behind.is_finished(), "the second write must wait for the paused one");
    log.put_segment(position, spiced::log::Segment::encode(&[envelope.clone()])).await.unwrap();
    let rows = spiced::log::plan::rows_of_segment(&log.get_segment(position).await.unwrap().unwrap());
    tx.record(position, &rows).await.unwrap();
    tx.commit().await.unwrap();
    let (s, b) = behind.await.unwrap();
    assert_eq!((s, b["sequence_number"].as_u64()), (202, Some(2)), "{b}");
    let topic = app.config.topics.ontology_commands.clone();
    let received = consume_until(&app.config, &[&topic], Duration::from_secs(30), |r| {
        r.iter().filter(|m| m.key == "late").count() >= 2
    })
    .await;
    let seqs: Vec<u64> = received
        .iter()
        .filter(|m| m.key == "late")
        .map(|m| m.envelope().sequence_number.unwrap())
        .collect();
    assert_eq!(seqs, vec![1, 2]);
    relay.stop().await;
}

/// An envelope with no routable topic goes to the dead-letter topic with its reason; the ones
/// after it are still published.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unroutable_envelopes_go_to_the_dead_letter_topic() {
    let app = app_with_topics().await;
    let (db, log) = app.storage().await;
    let (s, _) = app.post("/databases", json!({"name": "ok1"})).await;
    assert_eq!(s, 202);
    let head = db.index.head().await.unwrap();
    let mut stray = log.get_segment(head).await.unwrap().unwrap().events.remove(0);
    stray.event_id = Uuid::new_v4();
    stray.aggregate_id = "stray".into();
    stray.metadata.remove("kafka_topic");
    let mut unknown = stray.clone();
    unknown.event_id = Uuid::new_v4();
    unknown.aggregate_id = "stray2".into();
    unknown.metadata.insert("kafka_topic".into(), json!("nobody_configured_this"));
    log.put_segment(head + 1, spiced::log::Segment::encode(&[stray.clone(), unknown.clone()])).await.unwrap();
    let (s, _) = app.post("/databases", json!({"name": "ok2"})).await; // repairs head + 1 first
    assert_eq!(s, 202);
    let relay = start_relay(&app.config);
    relay.wait_published(head + 2, Duration::from_secs(30)).await;
    let dlq = app.config.relay.dead_letter_topic.clone();
    let dbs = app.config.topics.ontology_commands.clone();
    let received = consume_until(&app.config, &[&dlq, &dbs], Duration::from_secs(30), |r| r.len() >= 4).await;
    let dead: Vec<&Received> = received.iter().filter(|r| r.topic == dlq).collect();
    assert_eq!(dead.len(), 2, "{received:?}");
    let reasons: Vec<String> = dead
        .iter()
        .map(|r| r.headers.iter().find(|(k, _)| k == "spiced-dead-letter-reason").unwrap().1.clone())
        .collect();
    assert!(reasons.iter().any(|r| r.contains("missing")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("nobody_configured_this")), "{reasons:?}");
    assert_eq!(received.iter().filter(|r| r.topic == dbs).count(), 2);
    assert_eq!(relay.stats.dead_lettered.load(Ordering::Relaxed), 2);
    relay.stop().await;
}

/// An empty segment (a void, docs/design.md "Pipelined commit") publishes nothing, and the
/// relay moves past it to what follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_empty_segment_is_passed_over() {
    let app = app_with_topics().await;
    let (db, _) = app.storage().await;
    let (s, first) = app.post("/databases", json!({"name": "before"})).await;
    assert_eq!(s, 202);
    let empty = common::plant::segment(&app, &[]).await;
    let (s, second) = app.post("/databases", json!({"name": "after"})).await; // records `empty` first
    assert_eq!(s, 202);
    assert_eq!(db.index.head().await.unwrap(), empty + 1);
    let relay = start_relay(&app.config);
    relay.wait_published(empty + 1, Duration::from_secs(30)).await;
    assert_eq!(relay.stats.events_published.load(Ordering::Relaxed), 2, "one envelope per command, none for the empty position");
    let topic = app.config.topics.ontology_commands.clone();
    let received = consume_until(&app.config, &[&topic], Duration::from_secs(30), |r| r.len() >= 2).await;
    let sent: HashSet<Uuid> = [first, second].iter().map(|b| b["command_id"].as_str().unwrap().parse().unwrap()).collect();
    assert_eq!(ids_of(&received), sent);
    relay.stop().await;
}

/// With 100,000 events already published, an idle poll costs at most one GET and never a LIST.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_polls_cost_one_get_and_no_list() {
    let app = app_with_topics().await;
    let (db, log) = app.storage().await;
    // Fill the log through the group-commit writer directly (no HTTP), 2,000 per segment.
    let tasks = tokio_util::task::TaskTracker::new();
    let writer = spiced::log::writer::LogWriter::start(
        log.clone(),
        db.index.clone(),
        app.config.writer.clone(),
        &tasks,
    )
    .await
    .unwrap();
    let routing = spiced::domain::commands::Routing {
        kafka_topic: app.config.topics.ontology_commands.clone(),
        service: "test".into(),
    };
    let appends = (0..100_000).map(|i| {
        let writer = writer.clone();
        let routing = routing.clone();
        async move {
            let id = Uuid::new_v4();
            let key = spiced::domain::AggregateKey::database(&format!("d{i}"));
            let command = spiced::domain::Command {
                command_type: spiced::domain::CommandType::CreateDatabase,
                aggregate: key.clone(),
                expected_seq: 0,
                payload: json!({}),
            };
            let envelope = command.to_envelope(id, id, None, chrono::Utc::now(), &routing);
            let pending = spiced::log::plan::PendingEvent { key, expected_seq: 0, envelope };
            writer
                .append(spiced::log::plan::AppendCommand {
                    command_id: id,
                    id_from_client: false,
                    fingerprint: String::new(),
                    events: vec![pending],
                })
                .await
                .unwrap()
        }
    });
    futures::stream::iter(appends).buffer_unordered(4000).for_each(|_| async {}).await;
    let head = db.index.head().await.unwrap();
    let relay = start_relay(&app.config);
    relay.wait_published(head, Duration::from_secs(240)).await;
    assert_eq!(relay.stats.events_published.load(Ordering::Relaxed), 100_000);
    let (_, gets_before, lists_before) = relay.stats.log_requests.snapshot();
    let idle = Duration::from_millis(40 * app.config.relay.poll_interval_ms);
    let started = Instant::now();
    tokio::time::sleep(idle).await;
    let elapsed = started.elapsed();
    let (_, gets_after, lists_after) = relay.stats.log_requests.snapshot();
    let polls = elapsed.as_millis() as u64 / app.config.relay.poll_interval_ms + 1;
    let gets = gets_after - gets_before;
    assert!(gets >= 1, "the relay stopped polling");
    assert!(gets <= polls, "{gets} GETs in {polls} poll intervals");
    assert_eq!(lists_after, lists_before, "an idle relay must never LIST");
    assert_eq!(lists_after, 0);
    relay.stop().await;
}

use futures::StreamExt;
