//! Infrastructure failure: S3 or PostgreSQL going away gives a clear 503 with Retry-After,
//! appends nothing half-way, and the service carries on when the dependency is back.

mod common;

use common::proxy::Proxy;
use common::{isolated_config, read_whole_log, spawn_with, Backend, TestApp};
use serde_json::json;
use spiced::config::Secret;
use uuid::Uuid;

async fn post_db(app: &TestApp, key: Uuid, name: &str) -> reqwest::Response {
    app.http
        .post(app.url("/databases"))
        .header("Idempotency-Key", key.to_string())
        .json(&json!({"name": name}))
        .send()
        .await
        .unwrap()
}

async fn expect_503(app: &TestApp, name: &str) {
    let r = post_db(app, Uuid::new_v4(), name).await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("retry-after").is_some(), "503 without Retry-After");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "unavailable");
    let ready = app.http.get(app.base.replace("/api/v1", "/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503, "readiness reflects the failed dependency");
}

async fn recovers(app: &TestApp) {
    let key = Uuid::new_v4();
    let r = post_db(app, key, "after").await;
    assert_eq!(r.status(), 202);
    let (db, log) = app.storage().await;
    let events = read_whole_log(&log).await;
    let names: Vec<&str> = events.iter().map(|(_, e)| e.aggregate_id.as_str()).collect();
    assert_eq!(names, vec!["before", "after"], "nothing of the failed attempts is in the log");
    // A failed write's position may hold a void segment (no events) before "after".
    assert_eq!(db.index.head().await.unwrap(), events.last().unwrap().0, "the head is at the last segment");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_down_gives_503_and_nothing_half_written() {
    let (mut config, dir) = isolated_config(Backend::S3Postgres).await;
    let proxy = Proxy::before_s3(&mut config).await;
    let app = spawn_with(config, dir).await;
    assert_eq!(post_db(&app, Uuid::new_v4(), "before").await.status(), 202);
    proxy.down().await;
    expect_503(&app, "lost").await;
    proxy.up().await;
    recovers(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_down_gives_503_and_nothing_half_written() {
    let (mut config, dir) = isolated_config(Backend::S3Postgres).await;
    let mut url = url::Url::parse(config.database.url.expose()).unwrap();
    let upstream = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432));
    let proxy = Proxy::start(&upstream).await;
    url.set_port(Some(proxy.addr.port())).unwrap();
    config.database.url = Secret::new(url.to_string());
    let app = spawn_with(config, dir).await;
    assert_eq!(post_db(&app, Uuid::new_v4(), "before").await.status(), 202);
    proxy.down().await;
    expect_503(&app, "lost").await;
    proxy.up().await;
    recovers(&app).await;
}
