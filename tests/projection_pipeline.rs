//! The projection fed by Kafka, against the real services: 2,000 random commands over 50
//! aggregates through serve -> log -> relay -> Kafka -> worker -> log -> relay -> Kafka ->
//! `spiced project`, with the projection killed mid-batch and then every event delivered a
//! second time. The read model must equal a fold of the log computed here, and rebuilds from
//! the log must equal it row for row (`--until` equal to the fold up to that position, and a
//! swapped-in rebuild that the live projection carries on from).

mod common;

use common::kafka::{group_committed, isolate_topics};
use common::process::Spiced;
use common::readmodel::{assert_same, fold, pg, rows_of};
use common::{isolated_config, read_whole_log, spawn_with, Backend, TestApp};
use serde_json::json;
use spiced::config::Config;
use spiced::envelope::Kind;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(180);
const AGGREGATES: usize = 50;
const COMMANDS: usize = 2000;
const CLIENTS: usize = 10;

/// The rows of a schema as PostgreSQL prints them, for a byte-for-byte comparison.
async fn raw_rows(config: &Config, schema: &str) -> Vec<String> {
    let sql = format!("SELECT r::text FROM \"{schema}\".read_models r ORDER BY kind, key");
    pg(config).await.query(&sql, &[]).await.unwrap().iter().map(|r| r.get(0)).collect()
}

async fn head(config: &Config) -> u64 {
    let db = spiced::db::Database::open(&config.database).await.unwrap();
    db.index.head().await.unwrap()
}

/// A small deterministic generator (the run is repeatable from its seed).
struct Rng(u64);

impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// One client owning the aggregates `i % CLIENTS == client`: a create, then random updates and
/// deletes (some fail in the worker, e.g. updating a deleted instance), each with the
/// aggregate's current sequence. Returns each aggregate's last command id.
async fn client(app: Arc<TestApp>, client: usize, sent: Arc<AtomicUsize>) -> Vec<String> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (client as u64 + 1));
    let mine: Vec<usize> = (0..AGGREGATES).filter(|i| i % CLIENTS == client).collect();
    let mut seq = vec![0u64; AGGREGATES];
    let mut last = vec![String::new(); AGGREGATES];
    for _ in 0..COMMANDS / CLIENTS {
        let a = mine[rng.next(mine.len() as u64) as usize];
        let path = format!("/databases/cv/classes/C/instances/a{a:02}?expected_seq={}", seq[a]);
        let n = rng.next(1000) as i64;
        // A created aggregate is never created again (its sequence only grows); updates
        // after a delete fail in the worker and still answer with an outcome.
        let (s, b) = match rng.next(10) {
            _ if seq[a] == 0 => app.post("/databases/cv/classes/C/instances", json!({"id": format!("a{a:02}"), "data": {"n": n}})).await,
            0..=7 => app.put(&path, json!({"data": {"n": n, "s": format!("v{n}")}})).await,
            _ => app.delete(&path).await,
        };
        assert_eq!(s, 202, "{b}");
        seq[a] = b["sequence_number"].as_u64().unwrap();
        last[a] = b["command_id"].as_str().unwrap().to_string();
        sent.fetch_add(1, Ordering::Relaxed);
    }
    mine.into_iter().map(|a| last[a].clone()).collect()
}

async fn wait_sent(sent: &AtomicUsize, n: usize) {
    let deadline = Instant::now() + WAIT;
    while sent.load(Ordering::Relaxed) < n {
        assert!(Instant::now() < deadline, "load stalled at {}", sent.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn rebuild(config: &Config, dir: &std::path::Path, args: &[&str]) {
    let mut all = vec!["project", "--rebuild"];
    all.extend_from_slice(args);
    let mut p = Spiced::spawn(&all, config, dir, &[]);
    let status = p.child.wait().unwrap();
    assert!(status.success(), "spiced {all:?} failed: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_model_converges_on_the_log_and_rebuilds_equal_it() {
    let (mut config, _storage) = isolated_config(Backend::S3Postgres).await;
    isolate_topics(&mut config);
    config.project.batch_events = 50;
    let dir = tempfile::tempdir().unwrap();
    let app = Arc::new(spawn_with(config.clone(), tempfile::tempdir().unwrap()).await);
    let _relay = Spiced::spawn(&["relay"], &config, dir.path(), &[]);
    let _worker = Spiced::spawn(&["worker"], &config, dir.path(), &[]);
    let mut project = Spiced::spawn(&["project"], &config, dir.path(), &[]);

    let (s, b) = app.post("/databases", json!({"name": "cv"})).await;
    assert_eq!(s, 202, "{b}");
    app.wait_command(b["command_id"].as_str().unwrap(), WAIT).await;
    let class = json!({"id": "C", "properties": [{"name": "n", "type": "integer"}, {"name": "s", "type": "string"}]});
    let (s, b) = app.post("/databases/cv/classes", class).await;
    assert_eq!(s, 202, "{b}");
    app.wait_command(b["command_id"].as_str().unwrap(), WAIT).await;

    // The load, with the projection killed (SIGKILL, mid-batch: batches are 50 events) a third
    // of the way in and started again later.
    let sent = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS).map(|c| tokio::spawn(client(app.clone(), c, sent.clone()))).collect();
    wait_sent(&sent, COMMANDS / 3).await;
    project.signal("KILL");
    project.wait_exit(WAIT).await;
    wait_sent(&sent, COMMANDS / 2).await;
    let project = Spiced::spawn(&["project"], &config, dir.path(), &[]);
    let mut last_commands = Vec::new();
    for c in clients {
        last_commands.extend(c.await.unwrap());
    }
    // Outcomes of one aggregate are written in order: its last command answered means all are.
    for id in last_commands.iter().filter(|id| !id.is_empty()) {
        app.wait_command(id, WAIT).await;
    }
    common::readmodel::caught_up(&app, WAIT).await;
    let head = head(&config).await;
    let want = fold(&config, head).await;
    assert_eq!(want.keys().filter(|k| k.0 == "instance").count(), AGGREGATES);
    assert_same(&rows_of(&config, "spiced_read").await, &want, "after the kill");

    // Every event delivered a second time: the read model does not move.
    let mut republish = Spiced::spawn(&["relay", "--republish", "--from-position", "1", "--to-position", &head.to_string()], &config, dir.path(), &[]);
    assert!(republish.child.wait().unwrap().success());
    let topics = [config.topics.ontology_events.clone(), config.topics.instance_events.clone()];
    let outcomes: Vec<uuid::Uuid> = read_whole_log(&spiced::log::EventLog::open(&config.log).unwrap())
        .await
        .iter()
        .filter(|(p, e)| *p <= head && e.kind() == Some(Kind::Domain))
        .map(|(_, e)| e.event_id)
        .collect();
    let twice = |received: &[common::kafka::Received]| {
        if received.len() < 2 * outcomes.len() {
            return false;
        }
        let mut copies: std::collections::HashMap<uuid::Uuid, usize> = std::collections::HashMap::new();
        for m in received {
            *copies.entry(m.envelope().event_id).or_default() += 1;
        }
        outcomes.iter().all(|id| copies.get(id).is_some_and(|n| *n >= 2))
    };
    let topic_names = [topics[0].as_str(), topics[1].as_str()];
    let on_topics = common::kafka::consume_all(&config, &topic_names, WAIT, twice, Duration::from_secs(2)).await;
    // The projection has consumed every one of them: its committed offsets are past the last.
    let mut last: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for m in &on_topics {
        let e = last.entry((m.topic.clone(), m.partition)).or_insert(-1);
        *e = (*e).max(m.offset);
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let committed = group_committed(&config, &config.project.group, &topics).await;
        let behind: Vec<_> = last.iter().filter(|(tp, o)| committed.get(*tp).copied().unwrap_or(0) <= **o).collect();
        if behind.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "projection has not consumed up to {behind:?}; committed {committed:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_same(&rows_of(&config, "spiced_read").await, &want, "after every event twice");

    // A rebuild from the log alone gives the same bytes.
    rebuild(&config, dir.path(), &["--no-swap", "--target-schema", "rebuilt"]);
    assert_eq!(raw_rows(&config, "rebuilt").await, raw_rows(&config, "spiced_read").await, "rebuild == live");

    // A point-in-time rebuild equals the fold up to that position.
    let middle = head / 2;
    rebuild(&config, dir.path(), &["--until", &middle.to_string(), "--target-schema", "at_middle"]);
    assert_same(&rows_of(&config, "at_middle").await, &fold(&config, middle).await, "--until");

    // A swapped-in rebuild, while the live projection runs; the live projection carries on
    // from it.
    rebuild(&config, dir.path(), &["--target-schema", "previous"]);
    for i in 0..20 {
        let (s, b) = app.post("/databases/cv/classes/C/instances", json!({"id": format!("late{i}"), "data": {"n": i}})).await;
        assert_eq!(s, 202, "{b}");
        app.wait_command(b["command_id"].as_str().unwrap(), WAIT).await;
    }
    common::readmodel::caught_up(&app, WAIT).await;
    let head = self::head(&config).await;
    assert_same(&rows_of(&config, "spiced_read").await, &fold(&config, head).await, "after the swap");
    assert_eq!(raw_rows(&config, "previous").await.len(), want.len(), "the old live rows are kept under the target name");
    drop(project);
}
