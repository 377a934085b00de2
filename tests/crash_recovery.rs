//! The writer killed at each step of the commit protocol, and a log that is ahead of its
//! index: recovery loses no acknowledged command and leaves no hole.

mod common;

use common::{isolated_config, read_whole_log, Backend};
use serde_json::json;
use spiced::config::Config;
use common::process::{free_port, Spiced};
use std::time::Duration;
use uuid::Uuid;

backend_tests! {
    crash_before_put,
    crash_after_put,
    crash_after_commit,
    log_ahead_of_index_is_repaired_by_the_next_write,
}

async fn crash_before_put(backend: Backend) {
    crash_at(backend, "before_put").await
}

async fn crash_after_put(backend: Backend) {
    crash_at(backend, "after_put").await
}

async fn crash_after_commit(backend: Backend) {
    crash_at(backend, "after_commit").await
}

/// A `spiced serve` process.
struct Server {
    process: Spiced,
    base: String,
}

impl Server {
    async fn start(config: &Config, dir: &std::path::Path, env: &[(&str, &str)]) -> Server {
        let port = free_port();
        let mut env: Vec<(&str, String)> = env.iter().map(|(k, v)| (*k, v.to_string())).collect();
        env.push(("SPICED_SERVE__LISTEN", format!("127.0.0.1:{port}")));
        let mut server = Server {
            process: Spiced::spawn(&["serve"], config, dir, &env),
            base: format!("http://127.0.0.1:{port}"),
        };
        server.wait_ready().await;
        server
    }

    async fn wait_ready(&mut self) {
        let http = common::http();
        for _ in 0..400 {
            if let Ok(r) = http.get(format!("{}/readyz", self.base)).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(self.process.is_running(), "spiced exited before ready");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("spiced not ready after 10 s");
    }

    async fn create_database(&self, key: Uuid, name: &str) -> reqwest::Result<reqwest::Response> {
        common::http()
            .post(format!("{}/api/v1/databases", self.base))
            .header("Idempotency-Key", key.to_string())
            .json(&json!({"name": name}))
            .send()
            .await
    }
}

async fn crash_at(backend: Backend, point: &str) {
    let (config, dir) = isolated_config(backend).await;
    let key = Uuid::new_v4();
    let mut doomed = Server::start(&config, dir.path(), &[("SPICED_WRITER__CRASH_AT", point)]).await;
    let answer = doomed.create_database(key, "crashy").await;
    assert!(answer.is_err(), "the writer should have died before answering: {answer:?}");
    let status = doomed.process.wait_exit(Duration::from_secs(10)).await;
    assert!(!status.success(), "aborted writer exit status: {status}");

    let server = Server::start(&config, dir.path(), &[]).await;
    let http = common::http();
    // Recovery at start already knows what the crashed writer put in the log.
    let version: serde_json::Value = http
        .get(format!("{}/api/v1/aggregates/Database/crashy", server.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let expected_version = if point == "before_put" { 0 } else { 1 };
    assert_eq!(version["version"], expected_version, "after crash at {point}");

    // The client retries with the same key: one command, sequence 1, whatever the crash point.
    let retry = server.create_database(key, "crashy").await.unwrap();
    assert_eq!(retry.status(), 202);
    let body: serde_json::Value = retry.json().await.unwrap();
    assert_eq!((body["command_id"].as_str(), body["sequence_number"].as_u64()), (Some(&*key.to_string()), Some(1)));

    // No hole: the next command on the aggregate gets sequence 2.
    let next: serde_json::Value = http
        .delete(format!("{}/api/v1/databases/crashy?expected_seq=1", server.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(next["sequence_number"], 2, "{next}");

    let log = spiced::log::EventLog::open(&config.log).unwrap();
    let events = read_whole_log(&log).await;
    let seqs: Vec<_> = events.iter().map(|(_, e)| e.sequence_number.unwrap()).collect();
    assert_eq!(seqs, vec![1, 2], "log after crash at {point}: {events:?}");
    assert_eq!(events.iter().filter(|(_, e)| e.event_id == key).count(), 1);
    let db = spiced::db::Database::open(&config.database).await.unwrap();
    assert_eq!(db.index.head().await.unwrap(), events.last().unwrap().0, "index head = last segment");
}

/// A segment written by a writer that died before recording it, found by a live server's next
/// write through the put-if-absent fence.
async fn log_ahead_of_index_is_repaired_by_the_next_write(backend: Backend) {
    let app = common::spawn_app(backend).await;
    let (s, _) = app.post("/databases", json!({"name": "a"})).await;
    assert_eq!(s, 202);
    let (db, log) = app.storage().await;
    let head = db.index.head().await.unwrap();
    // Forge the crashed writer's segment: a valid command envelope at head + 1.
    let mut orphan = log.get_segment(head).await.unwrap().unwrap().events.remove(0);
    let orphan_id = Uuid::new_v4();
    orphan.event_id = orphan_id;
    orphan.aggregate_id = "orphan".into();
    orphan.data.insert("command_id".into(), json!(orphan_id));
    orphan.sequence_number = Some(1);
    log.put_segment(head + 1, spiced::log::Segment::encode(&[orphan])).await.unwrap();

    let (s, b) = app.post("/databases", json!({"name": "b"})).await;
    assert_eq!(s, 202, "{b}");
    assert_eq!(db.index.head().await.unwrap(), head + 2, "repaired orphan, then wrote at head + 2");
    let (s, b) = app.get(&format!("/commands/{orphan_id}")).await;
    assert_eq!((s, b["aggregate_id"].as_str()), (200, Some("orphan")), "{b}");
    let (s, b) = app.post("/databases", json!({"name": "orphan"})).await;
    assert_eq!((s, b["actual_seq"].as_u64()), (409, Some(1)), "the orphan's sequence is taken: {b}");
}
