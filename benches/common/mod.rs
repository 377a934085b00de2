//! What the benchmarks share: storage nobody else uses, on the services `scripts/bench.sh`
//! started.

#![allow(dead_code)]

use spiced::config::{Config, Secret};
use uuid::Uuid;

/// The databases this bench process created, for [`drop_databases`].
static CREATED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn admin_url() -> String {
    std::env::var("SPICED_TEST_PG_URL").expect("SPICED_TEST_PG_URL (run scripts/bench.sh)")
}

/// A fresh PostgreSQL database's URL.
pub async fn fresh_pg() -> String {
    let admin = admin_url();
    let name = format!("spiced_bench_{}", Uuid::new_v4().simple());
    let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
    CREATED.lock().unwrap().push(name.clone());
    let mut url = url::Url::parse(&admin).unwrap();
    url.set_path(&name);
    url.to_string()
}

/// Drops every database [`fresh_pg`] created, at the end of a bench: a run over a million
/// instances leaves about 2 GB otherwise. `FORCE`, since the bench's own pools still hold
/// connections to them.
pub async fn drop_databases() {
    let names = std::mem::take(&mut *CREATED.lock().unwrap());
    let (client, conn) = tokio_postgres::connect(&admin_url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    for name in names {
        if let Err(e) = client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await {
            eprintln!("bench: cannot drop database {name}: {e}");
        }
    }
}

/// S3 (fresh prefix) + PostgreSQL (fresh database) + the local broker with fresh topic names.
pub async fn production_config() -> Config {
    let mut c = Config::dev();
    c.database.url = Secret::new(fresh_pg().await);
    c.database.pool_size = 16;
    use_s3(&mut c);
    c.kafka.brokers = std::env::var("SPICED_TEST_KAFKA_BROKERS").unwrap();
    c.metrics.relay_listen = "127.0.0.1:0".into();
    c.metrics.worker_listen = "127.0.0.1:0".into();
    let p = format!("b{}", Uuid::new_v4().simple());
    for t in [
        &mut c.topics.ontology_commands, &mut c.topics.instance_commands,
        &mut c.topics.ontology_events, &mut c.topics.instance_events, &mut c.relay.dead_letter_topic,
        &mut c.worker.ontology_dead_letter_topic, &mut c.worker.instance_dead_letter_topic,
    ] {
        *t = format!("{p}_{t}");
    }
    c.worker.group_prefix = p;
    c.worker.session_timeout_ms = 6000;
    c
}

/// Points the log at a fresh prefix of the test bucket.
pub fn use_s3(c: &mut Config) {
    c.log.url = format!("s3://{}/bench-{}", std::env::var("SPICED_TEST_S3_BUCKET").unwrap(), Uuid::new_v4().simple());
    c.log.s3.endpoint = std::env::var("SPICED_TEST_S3_ENDPOINT").unwrap();
    c.log.s3.allow_http = true;
    c.log.s3.path_style = true;
}

/// The command and query API in this process on port 0; returns its `/api/v1` base URL and
/// the log handle it writes through (for request counts).
pub async fn start_api(config: &Config) -> (String, spiced::log::EventLog) {
    let (db, log) = spiced::storage::open(config).await.expect("storage");
    let tasks = tokio_util::task::TaskTracker::new();
    let writer = spiced::log::writer::LogWriter::start(log.clone(), db.index.clone(), config.writer.clone(), &tasks)
        .await
        .expect("writer");
    let state = spiced::serve::AppState::new(config.clone(), db, log.clone(), writer).expect("state");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/api/v1", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, spiced::serve::router(state)).await });
    (base, log)
}

pub fn percentile(sorted: &[std::time::Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}
