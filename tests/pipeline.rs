//! The production pipeline in one test process: API -> log -> relay -> Kafka -> workers,
//! against the real broker, S3-compatible server and PostgreSQL.

mod common;

use common::kafka::{consume_until, isolate_topics};
use common::{isolated_config, spawn_with, Backend, TestApp};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::json;
use spiced::relay::{run_with, RelayOptions};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

struct Pipeline {
    app: TestApp,
    stop: CancellationToken,
}

async fn pipeline() -> Pipeline {
    let (mut config, dir) = isolated_config(Backend::S3Postgres).await;
    isolate_topics(&mut config);
    config.worker.max_attempts = 2;
    config.worker.backoff_base_ms = 20;
    config.worker.gap_wait_ms = 500;
    let app = spawn_with(config.clone(), dir).await;
    let stop = CancellationToken::new();
    tokio::spawn(run_with(config.clone(), RelayOptions::default(), stop.clone(), Default::default()));
    let workers = stop.clone();
    tokio::spawn(async move {
        if let Err(e) = spiced::worker::run_roles(config, &[], workers).await {
            panic!("workers stopped: {e:#}");
        }
    });
    Pipeline { app, stop }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn producer(app: &TestApp) -> FutureProducer {
    ClientConfig::new().set("bootstrap.servers", &app.config.kafka.brokers).create().unwrap()
}

async fn completed(app: &TestApp, (s, b): (u16, serde_json::Value)) -> String {
    assert_eq!(s, 202, "{b}");
    let id = b["command_id"].as_str().unwrap().to_string();
    let status = app.wait_command(&id, WAIT).await;
    assert_eq!(status["status"], "COMPLETED", "{status}");
    id
}

/// The same command delivered 5 more times on its topic: one outcome, one effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicate_deliveries_have_one_effect() {
    let p = pipeline().await;
    let app = &p.app;
    completed(app, app.post("/databases", json!({"name": "dup"})).await).await;
    completed(app, app.post("/databases/dup/classes", json!({"id": "C", "properties": [{"name": "n", "type": "integer"}]})).await).await;
    let id = completed(app, app.post("/databases/dup/classes/C/instances", json!({"id": "i", "data": {"n": 1}})).await).await;
    let (_, events) = app.get("/aggregates/Instance/dup:main:C:i/events").await;
    let command = serde_json::to_vec(&events["events"][0]).unwrap();
    let kafka = producer(app);
    for _ in 0..5 {
        kafka
            .send(FutureRecord::to(&app.config.topics.instance_commands).key("dup:main:C:i").payload(&command), Duration::from_secs(5))
            .await
            .unwrap();
    }
    // A later command on the same aggregate completes, so the duplicates ahead of it in the
    // partition have been handled.
    let later = completed(app, app.put("/databases/dup/classes/C/instances/i?expected_seq=1", json!({"data": {"n": 2}})).await).await;
    let (_, outcomes) = app.get("/aggregates/Instance/dup:main:C:i/events?kind=domain").await;
    let outcomes = outcomes["events"].as_array().unwrap();
    let answering: Vec<&serde_json::Value> = outcomes.iter().filter(|e| e["data"]["command_id"] == id.as_str()).collect();
    assert_eq!(answering.len(), 1, "one outcome for the duplicated command: {outcomes:?}");
    assert_eq!(outcomes.len(), 2);
    assert_eq!(outcomes[1]["data"]["command_id"], later.as_str());
    assert_eq!(outcomes[1]["data"]["state"]["data"]["n"], 2);
}

/// The registry's claims, heartbeats and `done`s do not wait for the WAL flush
/// (`database.synchronous_registry_commit = false`), so a database crash may lose the last of
/// them. Made to look so (a claim gone, rows back at `processing` under an owner that is gone,
/// no position moved) and delivered again, the commands run again, find their outcomes in the
/// log and are done, with one outcome each.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registry_writes_lost_with_the_database_make_commands_run_again_never_twice() {
    let p = pipeline().await;
    let app = &p.app;
    assert!(!app.config.database.synchronous_registry_commit, "the default does not wait for the WAL flush");
    let gone = completed(app, app.post("/databases", json!({"name": "gone"})).await).await;
    let created = completed(app, app.post("/databases", json!({"name": "stale"})).await).await;
    let deleted = completed(app, app.delete("/databases/stale?expected_seq=1").await).await;
    common::readmodel::execute(
        &app.config,
        "DELETE FROM processed_events WHERE aggregate_id = 'gone'; \
         UPDATE processed_events SET status = 'processing', owner = 'crashed', processed_at = NULL, \
             heartbeat_at = now() - interval '1 hour' WHERE aggregate_id = 'stale'; \
         DELETE FROM handler_positions",
    )
    .await;
    let kafka = producer(app);
    for name in ["gone", "stale"] {
        let (_, commands) = app.get(&format!("/aggregates/Database/{name}/events?kind=command")).await;
        for command in commands["events"].as_array().unwrap() {
            let bytes = serde_json::to_vec(command).unwrap();
            let record = FutureRecord::to(&app.config.topics.ontology_commands).key(name).payload(&bytes);
            kafka.send(record, Duration::from_secs(5)).await.unwrap();
        }
    }
    let (db, _) = app.storage().await;
    // Run again: the lost claim is made anew, and the stale ones are taken over (a second
    // attempt); each is done once it finds its outcome.
    for (id, attempt) in [(&gone, 1), (&created, 2), (&deleted, 2)] {
        let event: Uuid = id.parse().unwrap();
        let done = common::registry_row(&db, event, "done", WAIT).await;
        let rows = db.registry.rows(event).await.unwrap();
        assert_eq!((rows.len(), done.attempt_count), (1, attempt), "{id}: {rows:?}");
    }
    for (name, outcomes) in [("gone", 1), ("stale", 2)] {
        let (_, events) = app.get(&format!("/aggregates/Database/{name}/events?kind=domain")).await;
        let events = events["events"].as_array().unwrap();
        let seqs: Vec<u64> = events.iter().map(|e| e["sequence_number"].as_u64().unwrap()).collect();
        assert_eq!(seqs, (1..=outcomes).collect::<Vec<u64>>(), "one outcome per command: {events:?}");
    }
}

/// Malformed messages go to the dead-letter topic with the reason, and the partition flows on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_messages_are_dead_lettered_and_the_partition_flows() {
    let p = pipeline().await;
    let app = &p.app;
    completed(app, app.post("/databases", json!({"name": "poison"})).await).await;
    completed(app, app.post("/databases/poison/classes", json!({"id": "C"})).await).await;
    let kafka = producer(app);
    let topic = &app.config.topics.instance_commands;
    let not_json = b"this is not json".to_vec();
    let mut wrong_kind: serde_json::Value =
        app.get("/aggregates/OntologyClass/poison:main:C/events").await.1["events"][0].clone();
    wrong_kind["metadata"]["kind"] = json!("domain");
    let wrong_kind = serde_json::to_vec(&wrong_kind).unwrap();
    for (key, payload) in [("k1", &not_json), ("k2", &wrong_kind)] {
        for partition in 0..3 {
            kafka
                .send(FutureRecord::to(topic).key(key).payload(payload).partition(partition), Duration::from_secs(5))
                .await
                .unwrap();
        }
    }
    // Commands after the poison still complete.
    for i in 0..6 {
        completed(app, app.post("/databases/poison/classes/C/instances", json!({"id": format!("i{i}"), "data": {}})).await).await;
    }
    let dlq = app.config.worker.instance_dead_letter_topic.clone();
    let letters = consume_until(&app.config, &[&dlq], WAIT, |r| r.len() >= 6).await;
    let bodies: Vec<serde_json::Value> = letters.iter().map(|l| serde_json::from_slice(&l.payload).unwrap()).collect();
    assert!(bodies.iter().all(|b| b["original_topic"] == topic.as_str() && b["offset"].is_i64() && b["worker"].is_string()));
    assert_eq!(bodies.iter().filter(|b| b["error"].as_str().unwrap().contains("not an EventEnvelope")).count(), 3);
    assert_eq!(bodies.iter().filter(|b| b["error"].as_str().unwrap().contains("metadata.kind")).count(), 3);
    let _ = Uuid::nil();
}

/// A command that fails its last attempt is dead-lettered and stays FAILED when redelivered
/// (which sends its dead letter again); `spiced dlq redrive` makes it run again and it
/// completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_commands_stay_failed_until_redriven() {
    let (mut config, dir) = isolated_config(Backend::S3Postgres).await;
    isolate_topics(&mut config);
    config.worker.max_attempts = 1;
    config.worker.gap_wait_ms = 300;
    let app = spawn_with(config.clone(), dir).await;
    let stop = CancellationToken::new();
    let _stop_on_drop = stop.clone().drop_guard();
    let workers = stop.clone();
    let worker_config = config.clone();
    tokio::spawn(async move { spiced::worker::run_roles(worker_config, &[], workers).await.unwrap() });
    let (_, created) = app.post("/databases", json!({"name": "r"})).await;
    let (s, deleted) = app.delete("/databases/r?expected_seq=1").await;
    assert_eq!(s, 202, "{deleted}");
    // Deliver the delete (sequence 2) before the relay has published the create (sequence 1).
    let (_, page) = app.get("/aggregates/Database/r/events?from_seq=2").await;
    let delete = serde_json::to_vec(&page["events"][0]).unwrap();
    producer(&app)
        .send(FutureRecord::to(&config.topics.ontology_commands).key("r").payload(&delete), Duration::from_secs(5))
        .await
        .unwrap();
    let dlq = config.worker.ontology_dead_letter_topic.clone();
    let letters = consume_until(&app.config, &[&dlq], WAIT, |r| !r.is_empty()).await;
    let letter: serde_json::Value = serde_json::from_slice(&letters[0].payload).unwrap();
    assert!(letter["error"].as_str().unwrap().contains("out of order"), "{letter}");
    assert_eq!(letter["attempt_count"], 1);

    tokio::spawn(run_with(config.clone(), RelayOptions::default(), stop.clone(), Default::default()));
    let create_status = app.wait_command(created["command_id"].as_str().unwrap(), WAIT).await;
    assert_eq!(create_status["status"], "COMPLETED");
    let delete_id = deleted["command_id"].as_str().unwrap();
    let failed = app.wait_command(delete_id, WAIT).await;
    assert_eq!(failed["status"], "FAILED", "the redelivered command does not run again: {failed}");
    assert_eq!(failed["error"]["code"], "processing_error");
    // Its redelivery sends the dead letter again: had the first publish been lost (a crash
    // between marking it failed and publishing), this is what would bring it back.
    let letters = consume_until(&app.config, &[&dlq], WAIT, |r| r.len() >= 2).await;
    let again: serde_json::Value = serde_json::from_slice(&letters[1].payload).unwrap();
    assert!(again["error"].as_str().unwrap().contains("sent again on redelivery"), "{again}");
    assert_eq!(again["envelope"]["event_id"], letter["envelope"]["event_id"]);

    // Over HTTP: listed for its role (not the other's), shown with its envelope, re-driven.
    let (s, listed) = app.get("/dead-letters/ontology").await;
    assert_eq!(s, 200, "{listed}");
    let letter = listed["items"].as_array().unwrap().iter().find(|l| l["event_id"] == delete_id).cloned().expect("listed");
    assert_eq!((letter["aggregate_id"].as_str(), letter["sequence_number"].as_u64()), (Some("r"), Some(2)), "{letter}");
    assert!(letter["error"].as_str().unwrap().contains("out of order"), "{letter}");
    let (_, other) = app.get("/dead-letters/instance").await;
    assert!(other["items"].as_array().unwrap().iter().all(|l| l["event_id"] != delete_id), "{other}");
    let (s, shown) = app.get(&format!("/dead-letters/ontology/{delete_id}")).await;
    assert_eq!(s, 200, "{shown}");
    assert_eq!(shown["envelope"]["event_id"], delete_id);
    assert_eq!(shown["envelope"]["event_type"], "DELETE_DATABASE_REQUESTED");
    let (s, missing) = app.get(&format!("/dead-letters/instance/{delete_id}")).await;
    assert_eq!(s, 404, "another role's: {missing}");
    let (s, redriven) = app.post(&format!("/dead-letters/ontology/{delete_id}/redrive"), json!({})).await;
    assert_eq!(s, 200, "{redriven}");
    assert_eq!((redriven["reset"].as_bool(), redriven["topic"].as_str()), (Some(true), Some(config.topics.ontology_commands.as_str())));
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_, status) = app.get(&format!("/commands/{delete_id}")).await;
        if status["status"] == "COMPLETED" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "re-driven command still {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, outcomes) = app.get("/aggregates/Database/r/events?kind=domain").await;
    let types: Vec<&str> = outcomes["events"].as_array().unwrap().iter().map(|e| e["event_type"].as_str().unwrap()).collect();
    assert_eq!(types, ["DATABASE_CREATED", "DATABASE_DELETED"]);
    // Done now: no longer a dead letter, and a second re-drive finds nothing to do.
    let (_, listed) = app.get("/dead-letters/ontology").await;
    assert!(listed["items"].as_array().unwrap().iter().all(|l| l["event_id"] != delete_id), "{listed}");
    let (s, again) = app.post(&format!("/dead-letters/ontology/{delete_id}/redrive"), json!({})).await;
    assert_eq!(s, 404, "{again}");
}
