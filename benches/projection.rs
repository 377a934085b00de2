//! Projection benchmark, on S3 (moto) + PostgreSQL + the local broker: a log of 100,000
//! outcome events (100,000 instances created, in segments of up to 128 events; another count
//! with `SPICED_BENCH_INSTANCES`, e.g. 1000000) applied
//! (1) live: relayed to Kafka, then consumed by `spiced project` in its consumer group until
//! its position reaches the log head; (2) by a rebuild from the log alone (`--rebuild`).
//! Then the latency of filtered, sorted and searched instance pages over those instances
//! through the HTTP API (the class declares `n`, `s` and `b` `indexed`). Run through
//! `scripts/bench.sh`.

mod common;

use common::percentile;
use futures::StreamExt;
use serde_json::{json, Map, Value};
use spiced::config::Config;
use spiced::db::Database;
use spiced::envelope::{domain_event_id, EventEnvelope};
use spiced::log::plan::AppendCommand;
use spiced::log::writer::LogWriter;
use spiced::project::rebuild::{self, Options, Until};
use spiced::relay::{run_with, RelayOptions, RelayStats};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

/// How many instances the log creates.
fn instances() -> u64 {
    static N: std::sync::LazyLock<u64> = std::sync::LazyLock::new(|| {
        std::env::var("SPICED_BENCH_INSTANCES").map(|v| v.parse().expect("SPICED_BENCH_INSTANCES: a count")).unwrap_or(100_000)
    });
    *N
}

/// Instance `i`'s id.
fn id(i: u64) -> String {
    format!("i{i:07}")
}

fn outcome(config: &Config, aggregate_type: &str, aggregate_id: &str, event_type: &str, state: Value) -> EventEnvelope {
    let command_id = Uuid::new_v4();
    let mut data = Map::new();
    data.insert("command_id".into(), json!(command_id));
    data.insert("state".into(), state);
    let topic = if aggregate_type == "Instance" { &config.topics.instance_events } else { &config.topics.ontology_events };
    let mut metadata = Map::new();
    metadata.insert("kind".into(), json!("domain"));
    metadata.insert("kafka_topic".into(), json!(topic));
    metadata.insert("service".into(), json!("bench"));
    EventEnvelope {
        event_id: domain_event_id(command_id, event_type, aggregate_id),
        event_type: event_type.into(),
        aggregate_type: aggregate_type.into(),
        aggregate_id: aggregate_id.into(),
        occurred_at: chrono::Utc::now(),
        actor: None,
        data,
        metadata,
        schema_version: spiced::envelope::SCHEMA_VERSION.into(),
        sequence_number: Some(1),
    }
}

/// The log: a database, a class, and [`instances`] created instances. Returns the head.
async fn fill(config: &Config, db: &Database, log: spiced::log::EventLog) -> u64 {
    let tasks = TaskTracker::new();
    let writer = LogWriter::start(log, db.index.clone(), config.writer.clone(), &tasks).await.unwrap();
    let class = json!({"class_id": "C", "properties": [
        {"name": "n", "type": "integer", "indexed": true}, {"name": "s", "type": "string", "indexed": true},
        {"name": "b", "type": "boolean", "indexed": true},
        {"name": "r", "type": "ref:C"}]});
    for e in [
        outcome(config, "Database", "b", "DATABASE_CREATED", json!({"name": "b"})),
        outcome(config, "OntologyClass", "b:main:C", "ONTOLOGY_CLASS_CREATED", class),
    ] {
        writer.append(AppendCommand::outcome(e).unwrap()).await.unwrap();
    }
    let appends = (0..instances()).map(|i| {
        let writer = writer.clone();
        let state = json!({"db": "b", "branch": "main", "class_id": "C", "instance_id": id(i),
            "data": {"n": i % 1000, "s": format!("v{}", i % 100), "b": i % 2 == 0, "r": id(i / 10 * 10)}});
        let e = outcome(config, "Instance", &format!("b:main:C:{}", id(i)), "INSTANCE_CREATED", state);
        async move { writer.append(AppendCommand::outcome(e).unwrap()).await.unwrap() }
    });
    futures::stream::iter(appends).buffer_unordered(128).for_each(|_| async {}).await;
    db.index.head().await.unwrap()
}

async fn wait_position(db: &Database, head: u64, task: &tokio::task::JoinHandle<anyhow::Result<()>>) {
    while db.read.live_position().await.unwrap() < head {
        assert!(!task.is_finished(), "the projection stopped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Relays the whole log, then times the projection consuming it from Kafka.
async fn live(config: &Config, db: &Database, head: u64) -> f64 {
    let stats = Arc::new(RelayStats::default());
    let stop = CancellationToken::new();
    let relay = tokio::spawn(run_with(config.clone(), RelayOptions::default(), stop.clone(), stats.clone()));
    while stats.published_position.load(Ordering::Relaxed) < head {
        assert!(!relay.is_finished(), "relay exited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    let project = {
        let (db, config, stop) = (db.clone(), config.clone(), stop.clone());
        let stage = spiced::liveness::register("project", Duration::from_secs(60));
        tokio::spawn(async move { spiced::project::kafka::consume(&db, &config, &stage, &stop).await })
    };
    wait_position(db, head, &project).await;
    let secs = started.elapsed().as_secs_f64();
    stop.cancel();
    let _ = tokio::join!(relay, project);
    secs
}

/// p50 and p99 in ms of GETs of `urls`, one at a time, and the rows (`items`) per response.
async fn timed(urls: Vec<String>) -> (f64, f64, usize) {
    let http = reqwest::Client::new();
    let mut times = Vec::with_capacity(urls.len());
    let mut rows = 0;
    for url in &urls {
        let started = Instant::now();
        let r = http.get(url).send().await.unwrap();
        assert_eq!(r.status(), 200, "{url}");
        let body: Value = r.json().await.unwrap();
        times.push(started.elapsed());
        rows += body["items"].as_array().unwrap().len();
    }
    times.sort();
    (percentile(&times, 0.5), percentile(&times, 0.99), rows / urls.len().max(1))
}

/// The queries of the query API beyond `where=` equality: each started at many places of
/// the class, so a deep page is measured as often as a first one.
async fn queries(base: &str) {
    let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let list = format!("{base}/databases/b/classes/C/instances");
    let spread = |i: usize| (i as u64 * 7919) % instances();
    type Url<'a> = Box<dyn Fn(usize) -> String + 'a>;
    let cases: Vec<(&str, Url)> = vec![
        ("where=s=like:v4* (prefix)", Box::new(|i| format!("{list}?limit=100&where={}&cursor=b:main:C:{}", enc("s=like:v4*"), id(spread(i))))),
        ("where=(s=v7|n=5) (OR)", Box::new(|i| format!("{list}?limit=100&where={}&cursor=b:main:C:{}", enc("(s=v7|n=5)"), id(spread(i))))),
        ("sort=-n (sorted page)", Box::new(|i| sorted(&list, "-n", spread(i)))),
        ("sort=n (sorted page)", Box::new(|i| sorted(&list, "n", spread(i)))),
        ("count=true, where=s=v42", Box::new(|_| format!("{list}?limit=100&count=true&where={}", enc("s=v42")))),
        ("count=true (over the bound)", Box::new(|_| format!("{list}?limit=100&count=true"))),
        ("links?direction=in", Box::new(|i| format!("{list}/{}/links?direction=in", id(spread(i) / 10 * 10)))),
        // A word matching 1 % of the instances, in relevance order and in id order; a prefix
        // matching 0.1 % (the `r` values i0000000..i0000990 and so on); one matching 11 %
        // (v4, v40..v49), in both orders.
        ("q=v42 (search)", Box::new(|i| format!("{list}?limit=100&q=v{}", 40 + i % 10))),
        ("q=v42&sort=id (search, id order)", Box::new(|i| format!("{list}?limit=100&q=v{}&sort=id", 40 + i % 10))),
        ("q=i0004* (prefix, 0.1 %)", Box::new(|i| format!("{list}?limit=100&q={}", enc(&format!("i000{}*", i % 10))))),
        ("q=v4* (prefix, 11 %)", Box::new(|i| format!("{list}?limit=100&q={}", enc(&format!("v{}*", i % 10))))),
        ("q=v4*&sort=id (prefix, 11 %, id order)", Box::new(|i| format!("{list}?limit=100&q={}&sort=id", enc(&format!("v{}*", i % 10))))),
    ];
    for (name, url) in cases {
        let (p50, p99, rows) = timed((0..200).map(&url).collect()).await;
        println!("query {name:<38} over {} instances: p50 {p50:.2} ms, p99 {p99:.2} ms ({rows} rows/response)", instances());
    }
}

/// A page of `sort` (one key) starting after instance `at`, wherever it is in the order.
fn sorted(list: &str, sort: &str, at: u64) -> String {
    let cursor = spiced::db::read::sort::encode_cursor(sort, &[json!(at % 1000)], &format!("b:main:C:{}", id(at)));
    let cursor = url::form_urlencoded::byte_serialize(cursor.as_bytes()).collect::<String>();
    format!("{list}?limit=100&sort={sort}&cursor={cursor}")
}

async fn pages(base: &str, filter: &str, requests: usize) -> (f64, f64, usize) {
    let http = reqwest::Client::new();
    let mut times = Vec::with_capacity(requests);
    let mut rows = 0;
    for i in 0..requests {
        // Start anywhere in the key range: a deep page costs what the first does.
        let cursor = format!("b:main:C:{}", id((i as u64 * 7919) % instances()));
        let url = format!("{base}/databases/b/classes/C/instances?limit=100&where={filter}&cursor={cursor}");
        let started = Instant::now();
        let r = http.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200, "{url}");
        let body: Value = r.json().await.unwrap();
        times.push(started.elapsed());
        rows += body["items"].as_array().unwrap().len();
    }
    times.sort();
    (percentile(&times, 0.5), percentile(&times, 0.99), rows / requests)
}

async fn analyze(config: &Config) {
    let (client, conn) = tokio_postgres::connect(config.database.url.expose(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client.batch_execute("ANALYZE spiced_read.read_models").await.unwrap();
}

#[tokio::main]
async fn main() {
    let mut config = common::production_config().await;
    config.project.group = format!("{}-projection", config.worker.group_prefix);
    let (db, log) = spiced::storage::open(&config).await.unwrap();
    let started = Instant::now();
    let head = fill(&config, &db, log).await;
    println!(
        "projection: log of {} outcome events in {head} segments, written in {:.1}s",
        instances() + 2,
        started.elapsed().as_secs_f64()
    );
    let events = (instances() + 2) as f64;
    let secs = live(&config, &db, head).await;
    println!("projection live (Kafka, batches of {}): {:.1}s = {:.0} events/s", config.project.batch_events, secs, events / secs);
    let options = Options { until: Until::Head, target: Some("bench_rebuild".into()), no_swap: true };
    let report = rebuild::run(&config, options).await.unwrap();
    println!(
        "projection rebuild from S3: {} events in {:.1}s = {:.0} events/s",
        report.events,
        report.elapsed.as_secs_f64(),
        report.events_per_second()
    );
    // As autovacuum would have by now in a running system: right after a bulk load the planner
    // has no statistics and guesses (here, a key-order walk for a 0.1 % filter).
    analyze(&config).await;
    let (base, _) = common::start_api(&config).await;
    for filter in ["s%3Dv42", "n%3E%3D500,s%3Dv7", "n%3C10", "b%3Dtrue,n%3Din:(1%7C2%7C3)"] {
        let (p50, p99, rows) = pages(&base, filter, 500).await;
        let shown = url::form_urlencoded::parse(format!("w={filter}").as_bytes()).next().unwrap().1.into_owned();
        println!("query where={shown:<24} limit=100 over {} instances: p50 {p50:.2} ms, p99 {p99:.2} ms ({rows} rows/page)", instances());
    }
    queries(&base).await;
    index_use(&config).await;
    common::drop_databases().await;
}

/// How often each read-model index served a scan (since the set-up): which plans the
/// queries above got.
async fn index_use(config: &Config) {
    let (client, conn) = tokio_postgres::connect(config.database.url.expose(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let sql = "SELECT indexrelname::text, idx_scan FROM pg_stat_user_indexes WHERE schemaname = 'spiced_read' AND relname = 'read_models' ORDER BY 1";
    for row in client.query(sql, &[]).await.unwrap() {
        println!("index {:<28} scans {}", row.get::<_, String>(0), row.get::<_, i64>(1));
    }
}
