//! The writer killed at each step of the commit protocol, and a log that is ahead of its
//! index: recovery loses no acknowledged command and leaves no hole.

mod common;

use common::proxy::Proxy;
use common::{isolated_config, read_whole_log, spawn_with, Backend};
use std::collections::HashMap;
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

const SERIAL: &[(&str, &str)] = &[];
/// The pipelined commit (PostgreSQL), with a short lease: the position a crashed writer
/// reserved is filled within it.
const PIPELINED: &[(&str, &str)] = &[("SPICED_WRITER__MAX_IN_FLIGHT", "4"), ("SPICED_WRITER__RESERVATION_MS", "500")];

async fn crash_before_put(backend: Backend) {
    crash_at(backend, "before_put", SERIAL).await
}

async fn crash_after_put(backend: Backend) {
    crash_at(backend, "after_put", SERIAL).await
}

async fn crash_after_commit(backend: Backend) {
    crash_at(backend, "after_commit", SERIAL).await
}

/// Reserved, nothing written: the position is voided once the lease passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipelined_crash_before_put() {
    crash_at(Backend::S3Postgres, "before_put", PIPELINED).await
}

/// Written, not published: published by the next writer's start.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipelined_crash_after_put() {
    crash_at(Backend::S3Postgres, "after_put", PIPELINED).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipelined_crash_after_commit() {
    crash_at(Backend::S3Postgres, "after_commit", PIPELINED).await
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

async fn crash_at(backend: Backend, point: &str, protocol: &[(&str, &str)]) {
    let (config, dir) = isolated_config(backend).await;
    let key = Uuid::new_v4();
    let doomed_env: Vec<(&str, &str)> = protocol.iter().copied().chain([("SPICED_WRITER__CRASH_AT", point)]).collect();
    let mut doomed = Server::start(&config, dir.path(), &doomed_env).await;
    let answer = doomed.create_database(key, "crashy").await;
    assert!(answer.is_err(), "the writer should have died before answering: {answer:?}");
    let status = doomed.process.wait_exit(Duration::from_secs(10)).await;
    assert!(!status.success(), "aborted writer exit status: {status}");

    let server = Server::start(&config, dir.path(), protocol).await;
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

/// What a PostgreSQL crash leaves when the index commits did not wait for the WAL flush
/// (`database.synchronous_index_commit = false`): the last commits are gone, a suffix, since
/// the WAL is replayed in order, so the index is at an earlier head with every segment after
/// it still in the log. Forged here by removing the rows of the last 70 positions (more than
/// one batch could repair when the bound was 64). The next command must go after the last
/// segment; a retry of a lost one is answered as the duplicate it is, and a conflicting create
/// gets 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn index_commits_lost_in_a_database_crash_are_repaired_from_the_log() {
    let (mut config, dir) = isolated_config(Backend::S3Postgres).await;
    config.writer.max_in_flight = 1; // the serial commit: the pipelined one always flushes
    assert!(!config.database.synchronous_index_commit, "the default does not wait for the WAL flush");
    let app = spawn_with(config, dir).await;
    let (s, _) = app.post("/databases", json!({"name": "before"})).await;
    assert_eq!(s, 202);
    let (db, log) = app.storage().await;
    let kept = db.index.head().await.unwrap();
    let keys: Vec<Uuid> = (0..70).map(|_| Uuid::new_v4()).collect();
    for key in &keys {
        let r = app.http.post(app.url("/databases")).header("Idempotency-Key", key.to_string()).json(&json!({"name": format!("d{}", key.simple())})).send().await.unwrap();
        assert_eq!(r.status(), 202);
    }
    let written = db.index.head().await.unwrap();
    assert!(written >= kept + 70, "one segment per command, written one after the other");

    let pg = db.postgres().expect("PostgreSQL").pool().get().await.unwrap();
    let lost = pg
        .batch_execute(&format!(
            "BEGIN;
             DELETE FROM aggregate_versions WHERE (aggregate_type, aggregate_id) IN
                 (SELECT aggregate_type, aggregate_id FROM log_index WHERE position > {kept});
             DELETE FROM log_index WHERE position > {kept};
             UPDATE log_head SET position = {kept};
             COMMIT;"
        ))
        .await;
    lost.unwrap();
    assert_eq!(db.index.head().await.unwrap(), kept);

    // A new command first: its batch finds every lost position taken, one after the other.
    let (s, b) = app.post("/databases", json!({"name": "after"})).await;
    assert_eq!(s, 202, "{b}");
    assert_eq!(db.index.head().await.unwrap(), written + 1, "every lost position repaired, the new command after them");
    for key in &keys {
        let r = app.http.post(app.url("/databases")).header("Idempotency-Key", key.to_string()).json(&json!({"name": format!("d{}", key.simple())})).send().await.unwrap();
        assert_eq!(r.status(), 202, "retry of {key}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!((body["command_id"].as_str(), body["sequence_number"].as_u64()), (Some(&*key.to_string()), Some(1)), "{body}");
    }
    let (s, b) = app.post("/databases", json!({"name": format!("d{}", keys[0].simple())})).await;
    assert_eq!((s, b["actual_seq"].as_u64()), (409, Some(1)), "the lost create's sequence is taken: {b}");
    assert_eq!(db.index.head().await.unwrap(), written + 1, "the repeats appended nothing");
    let events = read_whole_log(&log).await;
    assert_eq!(events.len(), 72, "each command once in the log: {events:?}");
    assert_eq!(db.index.all_rows().await.unwrap().len(), 72, "one index row per command");
}

/// An index commit failing after a good PUT while the next batches are queued: the writer
/// sends a batch's opening (`BEGIN`, the head lock, its look-ups) behind the commit before it,
/// so it must let go of it for the index to catch up from the log, and then go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_index_commit_failing_with_the_next_batch_queued_behind_it_is_repaired() {
    index_failure_after_a_good_put("CONSTRAINT TRIGGER refuse_once AFTER INSERT ON log_index DEFERRABLE INITIALLY DEFERRED").await;
}

/// The index writes, sent while the segment is written, failing when the segment is durable:
/// the commands are accepted and the index catches up from the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn index_writes_failing_beside_a_good_put_are_repaired() {
    index_failure_after_a_good_put("TRIGGER refuse_once BEFORE INSERT ON log_index").await;
}

/// A trigger (`trigger`, which says when it fires) refuses one command's index row once (a
/// sequence, which no rollback undoes, counts the tries) while 64 creates arrive at once in
/// batches of two, so batches are queued behind the refused one.
async fn index_failure_after_a_good_put(trigger: &str) {
    let (mut config, dir) = isolated_config(Backend::S3Postgres).await;
    config.writer.max_in_flight = 1;
    config.writer.max_batch_events = 2;
    let app = spawn_with(config.clone(), dir).await;
    let keys: Vec<Uuid> = (0..64).map(|_| Uuid::new_v4()).collect();
    let poison = format!("d{}", keys[31].simple());
    let (db, _) = app.storage().await;
    let pg = db.postgres().expect("PostgreSQL").pool().get().await.unwrap();
    pg.batch_execute(&format!(
        "CREATE SEQUENCE index_row_tries;
         CREATE FUNCTION refuse_once() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.aggregate_id = '{poison}' AND nextval('index_row_tries') = 1 THEN
                 RAISE EXCEPTION 'refused once by the test';
             END IF;
             RETURN NEW;
         END $$;
         CREATE {trigger} FOR EACH ROW EXECUTE FUNCTION refuse_once();"
    ))
    .await
    .unwrap();

    let base = app.base.trim_end_matches("/api/v1").to_string();
    let first = tokio::time::timeout(Duration::from_secs(60), create_all(&base, &keys))
        .await
        .expect("every create answered within 60 s: the writer must not wait on its own lock");
    assert!(first.values().all(|s| *s == Some(202)), "a durable segment is acknowledged whatever its commit did: {first:?}");
    let tries: i64 = pg.query_one("SELECT last_value FROM index_row_tries", &[]).await.unwrap().get(0);
    assert!(tries >= 2, "the row was refused once, then recorded by the repair (tries: {tries})");
    every_key_once(&base, &config, &first).await;
}

/// Keys, each a database create, answered by one client per key at once.
async fn create_all(base: &str, keys: &[Uuid]) -> HashMap<Uuid, Option<u16>> {
    let http = common::http();
    let answers = keys.iter().map(|&key| {
        let http = http.clone();
        let url = format!("{base}/api/v1/databases");
        async move {
            let answer = http.post(url).header("Idempotency-Key", key.to_string()).json(&json!({"name": format!("d{}", key.simple())})).send().await;
            (key, answer.ok().map(|r| r.status().as_u16()))
        }
    });
    futures::future::join_all(answers).await.into_iter().collect()
}

/// After a writer's death or a failing store: each key retried gets one command at sequence
/// 1 (the first answer's, if it was acknowledged), the log holds each key once and nothing
/// else, without a gap, and the index agrees with it.
async fn every_key_once(base: &str, config: &Config, first: &HashMap<Uuid, Option<u16>>) {
    let keys: Vec<Uuid> = first.keys().copied().collect();
    let log = spiced::log::EventLog::open(&config.log).unwrap();
    let before: Vec<Uuid> = read_whole_log(&log).await.into_iter().map(|(_, e)| e.event_id).collect();
    for key in first.iter().filter(|(_, s)| **s == Some(202)).map(|(k, _)| k) {
        assert!(before.contains(key), "acknowledged command {key} is not in the log");
    }
    let http = common::http();
    for &key in &keys {
        let retry = http
            .post(format!("{base}/api/v1/databases"))
            .header("Idempotency-Key", key.to_string())
            .json(&json!({"name": format!("d{}", key.simple())}))
            .send()
            .await
            .unwrap();
        assert_eq!(retry.status(), 202, "retry of {key}");
        let body: serde_json::Value = retry.json().await.unwrap();
        assert_eq!((body["command_id"].as_str(), body["sequence_number"].as_u64()), (Some(&*key.to_string()), Some(1)), "{body}");
    }
    let events = read_whole_log(&log).await;
    let mut in_log: Vec<Uuid> = events.iter().map(|(_, e)| e.event_id).collect();
    in_log.sort();
    let mut expected = keys.clone();
    expected.sort();
    assert_eq!(in_log, expected, "each key once in the log, nothing else");
    let db = spiced::db::Database::open(&config.database).await.unwrap();
    assert_eq!(db.index.head().await.unwrap(), events.iter().map(|(p, _)| *p).max().unwrap(), "index head = last segment");
    assert_eq!(db.index.all_rows().await.unwrap().len(), keys.len(), "one index row per command");
}

/// The writer killed while every batch the window allows is in flight (reserved, some
/// written, none published): each position is settled on its own, published if written,
/// voided once its lease passed if not.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_writer_killed_with_several_segments_in_flight_loses_and_doubles_nothing() {
    let (config, dir) = isolated_config(Backend::S3Postgres).await;
    // Small batches, so that the 96 commands take many and the window fills.
    let small = ("SPICED_WRITER__MAX_BATCH_EVENTS", "2");
    let env: Vec<(&str, &str)> = PIPELINED.iter().copied().chain([("SPICED_WRITER__CRASH_AT", "window_full"), small]).collect();
    let mut doomed = Server::start(&config, dir.path(), &env).await;
    let keys: Vec<Uuid> = (0..96).map(|_| Uuid::new_v4()).collect();
    let first = create_all(&doomed.base, &keys).await;
    let status = doomed.process.wait_exit(Duration::from_secs(10)).await;
    assert!(!status.success(), "the writer should have died with a full window: {status}");
    let db = spiced::db::Database::open(&config.database).await.unwrap();
    let open = db.index.reservations().unwrap().open_reservations().await.unwrap();
    assert!(open.len() >= 2, "several batches in flight at the kill: {open:?}");

    let server = Server::start(&config, dir.path(), PIPELINED).await;
    every_key_once(&server.base, &config, &first).await;
}

/// The object store failing while batches are in flight: every command is acknowledged or
/// refused (503), a refused one was not appended, and the log carries on past the failed
/// writes' positions when the store is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_failing_in_the_middle_of_the_window_loses_and_doubles_nothing() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let (mut config, dir) = isolated_config(Backend::S3Postgres).await;
    let proxy = Proxy::before_s3(&mut config).await;
    config.writer.max_in_flight = 4;
    let app = spawn_with(config.clone(), dir).await;
    let base = app.base.trim_end_matches("/api/v1").to_string();
    // Sixteen clients send new commands until told to stop.
    let answers: Arc<Mutex<HashMap<Uuid, Option<u16>>>> = Default::default();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let (base, answers, stop) = (base.clone(), answers.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let answer = create_all(&base, &[Uuid::new_v4()]).await;
                    answers.lock().unwrap().extend(answer);
                }
            })
        })
        .collect();
    let count = |status: u16| answers.lock().unwrap().values().filter(|s| **s == Some(status)).count();
    until("commands are acknowledged", || count(202) >= 64).await;
    proxy.down().await;
    until("commands fail while the store is down", || count(503) >= 8).await;
    proxy.up().await;
    let acknowledged = count(202);
    let back = std::time::Instant::now();
    until("commands are acknowledged again", || count(202) >= acknowledged + 64).await;
    eprintln!("64 more commands acknowledged {:?} after the store came back", back.elapsed());
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    let answers = answers.lock().unwrap().clone();
    assert!(answers.values().all(|s| matches!(s, Some(202 | 503))), "{answers:?}");
    every_key_once(&base, &config, &answers).await;
}

/// Waits, at most 30 s (a loaded machine), until `done`.
async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
