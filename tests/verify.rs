//! `spiced verify` passes on a healthy log and finds each kind of corruption planted in it.

mod common;

use common::{spawn_dev, Backend};
use serde_json::json;
use spiced::envelope::EventEnvelope;
use spiced::ops::verify::{self, Report};
use spiced::log::Segment;
use std::time::Duration;

backend_tests! {
    a_healthy_log_verifies,
    finds_every_planted_corruption,
    an_empty_segment_is_passed_over,
}

/// A log with a few completed commands, written by `spiced dev`, which is then stopped so
/// nothing else touches the storage while corruption is planted.
async fn populated(backend: Backend) -> Stopped {
    let app = spawn_dev(backend).await;
    let (_, b) = app.post("/databases", json!({"name": "v"})).await;
    app.wait_command(b["command_id"].as_str().unwrap(), Duration::from_secs(30)).await;
    let (_, b) = app.post("/databases/v/classes", json!({"id": "C"})).await;
    app.wait_command(b["command_id"].as_str().unwrap(), Duration::from_secs(30)).await;
    for i in 0..5 {
        let (_, b) = app.post("/databases/v/classes/C/instances", json!({"id": format!("i{i}"), "data": {}})).await;
        app.wait_command(b["command_id"].as_str().unwrap(), Duration::from_secs(30)).await;
    }
    let config = app.config.clone();
    let dir = app.stop().await;
    Stopped { config, _dir: dir }
}

struct Stopped {
    config: spiced::config::Config,
    _dir: tempfile::TempDir,
}

async fn report(app: &Stopped) -> Report {
    verify::run(&app.config, 1).await.unwrap()
}

async fn a_healthy_log_verifies(backend: Backend) {
    let app = populated(backend).await;
    let r = report(&app).await;
    assert_eq!(r.violations(), 0, "{r:?}");
    assert_eq!(r.checks.len(), 9);
}

async fn sql(app: &Stopped, statement: &str) {
    let url = app.config.database.url.expose();
    if let Some(path) = url.strip_prefix("sqlite://") {
        rusqlite::Connection::open(path).unwrap().execute_batch(statement).unwrap();
    } else {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        client.batch_execute(statement).await.unwrap();
    }
}

async fn storage(app: &Stopped) -> (spiced::db::Database, spiced::log::EventLog) {
    (
        spiced::db::Database::open(&app.config.database).await.unwrap(),
        spiced::log::EventLog::open(&app.config.log).unwrap(),
    )
}

async fn first_event(app: &Stopped) -> (u64, EventEnvelope) {
    let (db, log) = storage(app).await;
    let head = db.index.head().await.unwrap();
    (head, log.get_segment(1).await.unwrap().unwrap().events[0].clone())
}

async fn finds_every_planted_corruption(backend: Backend) {
    // Each corruption goes into a fresh log, so each check is seen failing on its own.
    type Plant = Box<dyn Fn(u64, EventEnvelope) -> (u64, Vec<EventEnvelope>)>;
    let plant: Vec<(&str, Plant)> = vec![
        (verify::GAPLESS, Box::new(|head, e| (head + 2, vec![e]))),
        (verify::UNIQUE_SEQ, Box::new(|head, mut e| {
            e.event_id = uuid::Uuid::new_v4();
            (head + 1, vec![e])
        })),
        (verify::UNIQUE_ID, Box::new(|head, mut e| {
            e.aggregate_id = "other".into();
            (head + 1, vec![e])
        })),
        (verify::AGG_GAPLESS, Box::new(|head, mut e| {
            e.event_id = uuid::Uuid::new_v4();
            e.sequence_number = Some(3);
            (head + 1, vec![e])
        })),
    ];
    for (check, corrupt) in plant {
        let app = populated(backend).await;
        let (head, event) = first_event(&app).await;
        let (position, events) = corrupt(head, event);
        let (_, log) = storage(&app).await;
        log.put_segment(position, Segment::encode(&events)).await.unwrap();
        let r = report(&app).await;
        assert!(r.failed(check), "{check} not found: {r:?}");
    }
    let app = populated(backend).await;
    sql(&app, "UPDATE aggregate_versions SET last_seq = 7 WHERE aggregate_id = 'v'").await;
    assert!(report(&app).await.failed(verify::VERSIONS));
    let app = populated(backend).await;
    sql(&app, "DELETE FROM log_index WHERE aggregate_id = 'v:main:C:i3'").await;
    assert!(report(&app).await.failed(verify::INDEX));
    let app = populated(backend).await;
    sql(&app, "UPDATE log_head SET position = position + 5").await;
    assert!(report(&app).await.failed(verify::HEAD));
    let app = populated(backend).await;
    let (db, _) = storage(&app).await;
    db.checkpoints.advance(&app.config.relay.name, 10_000).await.unwrap();
    assert!(report(&app).await.failed(verify::RELAY));
}

/// A position written with no envelopes (how the pipelined commit of docs/design.md fills a
/// position whose writer gave up) is one position like any other: the next write records it,
/// the embedded workers and the projection move past it, the log API lists what follows it,
/// the relay's `--from-time` search looks past it, and `verify` finds nothing wrong.
async fn an_empty_segment_is_passed_over(backend: Backend) {
    const WAIT: Duration = Duration::from_secs(30);
    let app = spawn_dev(backend).await;
    let (_, b) = app.post("/databases", json!({"name": "v"})).await;
    app.wait_command(b["command_id"].as_str().unwrap(), WAIT).await;
    let empty = common::plant::segment(&app, &[]).await;
    let after_empty = chrono::Utc::now();
    let (_, b) = app.post("/databases/v/classes", json!({"id": "C"})).await;
    let status = app.wait_command(b["command_id"].as_str().unwrap(), WAIT).await;
    assert_eq!(status["status"], "COMPLETED", "{status}");
    let (s, listed) = app.get(&format!("/log?from_position={empty}")).await;
    assert_eq!(s, 200, "{listed}");
    let positions: Vec<u64> = listed["events"].as_array().unwrap().iter().map(|e| e["position"].as_u64().unwrap()).collect();
    assert_eq!(positions.first(), Some(&(empty + 1)), "the class command follows the empty position: {listed}");
    let deadline = std::time::Instant::now() + WAIT;
    while app.get("/databases/v/classes/C").await.0 != 200 {
        assert!(std::time::Instant::now() < deadline, "the projection did not pass the empty position");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (db, log) = app.storage().await;
    let head = db.index.head().await.unwrap();
    assert!(head > empty + 1, "head {head}");
    let tail = spiced::log::tail::Tail::new(log, db.index.clone());
    // An empty segment has no time: it takes the next one's, whichever side of it `t` is.
    assert_eq!(tail.first_position_at(after_empty).await.unwrap(), empty);
    assert_eq!(tail.first_position_at(chrono::Utc::now()).await.unwrap(), head + 1);
    assert_eq!(tail.first_position_at(chrono::DateTime::UNIX_EPOCH).await.unwrap(), 1);
    let config = app.config.clone();
    let _dir = app.stop().await;
    let r = verify::run(&config, 1).await.unwrap();
    assert_eq!(r.violations(), 0, "{r:?}");
}

/// `spiced verify` as a script sees it: 0 when the log holds, 2 for violations, 1 for any
/// other error; the error printed once, without colour codes when stderr is not a terminal.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exit_codes_tell_violations_from_errors() {
    let app = populated(Backend::LocalSqlite).await;
    let verify = |database_url: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_spiced"))
            .arg("verify")
            .env("SPICED_LOG__URL", &app.config.log.url)
            .env("SPICED_DATABASE__URL", database_url)
            .output()
            .unwrap()
    };
    let url = app.config.database.url.expose().to_string();
    assert_eq!(verify(&url).status.code(), Some(0));
    sql(&app, "UPDATE aggregate_versions SET last_seq = 7 WHERE aggregate_id = 'v'").await;
    let found = verify(&url);
    assert_eq!(found.status.code(), Some(2), "violations exit 2");
    let stderr = String::from_utf8_lossy(&found.stderr);
    assert_eq!(stderr.matches("violation(s) found").count(), 1, "printed once: {stderr}");
    assert!(!stderr.contains('\u{1b}'), "no colour codes into a pipe: {stderr:?}");
    let broken = verify("mysql://nowhere");
    assert_eq!(broken.status.code(), Some(1), "a configuration error exits 1");
    assert_eq!(String::from_utf8_lossy(&broken.stderr).matches("database.url").count(), 1);
}
