//! Test harness: isolated backends (a fresh PostgreSQL database and S3 prefix, or a temp dir
//! with SQLite) and an API server per test on port 0.
//!
//! The real services come from `scripts/services.sh` (run by `scripts/test.sh`), which exports
//! `SPICED_TEST_*`.

#![allow(dead_code)]

pub mod broker;
pub mod kafka;
pub mod load;
pub mod plant;
pub mod process;
pub mod proxy;
pub mod tls;
pub mod readmodel;

use spiced::config::{Config, Secret};
use spiced::db::Database;
use spiced::log::EventLog;
use std::net::SocketAddr;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The two storage set-ups every write-path test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// S3-compatible server + PostgreSQL: production.
    S3Postgres,
    /// Local disk + SQLite: the embedded default.
    LocalSqlite,
}

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests through scripts/test.sh, which starts the services")
    })
}

/// A configuration with storage nobody else uses. Keep the returned guard alive for the test.
pub async fn isolated_config(backend: Backend) -> (Config, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = Config::dev();
    config.serve.listen = "127.0.0.1:0".parse().unwrap();
    config.relay.poll_interval_ms = 20;
    config.worker.poll_interval_ms = 20;
    config.project.poll_interval_ms = 20;
    config.metrics.relay_listen = "127.0.0.1:0".into();
    config.metrics.worker_listen = "127.0.0.1:0".into();
    config.metrics.project_listen = "127.0.0.1:0".into();
    // scripts/test.sh runs the write-side suites a second time with the pipelined commit.
    if let Ok(window) = std::env::var("SPICED_TEST_MAX_IN_FLIGHT") {
        config.writer.max_in_flight = window.parse().expect("SPICED_TEST_MAX_IN_FLIGHT: a number");
    }
    match backend {
        Backend::LocalSqlite => {
            config.log.url = dir.path().join("log").display().to_string();
            config.database.url =
                Secret::new(format!("sqlite://{}", dir.path().join("spiced.db").display()));
        }
        Backend::S3Postgres => {
            let bucket = required_env("SPICED_TEST_S3_BUCKET");
            config.log.url = format!("s3://{bucket}/test-{}", Uuid::new_v4().simple());
            config.log.s3.endpoint = required_env("SPICED_TEST_S3_ENDPOINT");
            config.log.s3.allow_http = true;
            config.log.s3.path_style = true;
            config.database.url = Secret::new(fresh_pg_database().await);
        }
    }
    (config, dir)
}

/// Creates an empty PostgreSQL database and returns its URL.
pub async fn fresh_pg_database() -> String {
    let admin = required_env("SPICED_TEST_PG_URL");
    let name = format!("spiced_test_{}", Uuid::new_v4().simple());
    let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
        .await
        .expect("connect to SPICED_TEST_PG_URL");
    tokio::spawn(conn);
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create test database");
    let mut url = url::Url::parse(&admin).expect("SPICED_TEST_PG_URL is a URL");
    url.set_path(&name);
    url.to_string()
}

/// An API server running in this process.
pub struct TestApp {
    pub base: String,
    pub http: reqwest::Client,
    pub config: Config,
    pub shutdown: CancellationToken,
    pub handle: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

/// The tests' HTTP client: it lets an idle pooled connection go after 5 s, before the
/// server's idle keep-alive limit (`serve.header_read_timeout_ms`, 10 s) closes it; reusing
/// one the server is closing at that instant fails the request (`IncompleteMessage`).
pub fn http() -> reqwest::Client {
    reqwest::Client::builder().pool_idle_timeout(std::time::Duration::from_secs(5)).build().expect("an HTTP client")
}

pub async fn spawn_app(backend: Backend) -> TestApp {
    let (config, dir) = isolated_config(backend).await;
    spawn_with(config, dir).await
}

/// Logs go to the test's captured output, shown when a test fails.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SPICED_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_test_writer()
        .try_init();
}

pub async fn spawn_with(config: Config, dir: tempfile::TempDir) -> TestApp {
    spawn_role(config, dir, false).await
}

/// `spiced dev` in this process: the API plus embedded workers.
pub async fn spawn_dev(backend: Backend) -> TestApp {
    let (config, dir) = isolated_config(backend).await;
    spawn_role(config, dir, true).await
}

/// `spiced dev` in this process with a prepared configuration.
pub async fn spawn_role_dev(config: Config, dir: tempfile::TempDir) -> TestApp {
    spawn_role(config, dir, true).await
}

async fn spawn_role(config: Config, dir: tempfile::TempDir, dev: bool) -> TestApp {
    init_tracing();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let handle = if dev {
        tokio::spawn(spiced::dev::run_on(config.clone(), listener, shutdown.clone()))
    } else {
        tokio::spawn(spiced::serve::run_on(config.clone(), listener, shutdown.clone()))
    };
    let app = TestApp {
        base: format!("http://{addr}/api/v1"),
        http: http(),
        config,
        shutdown,
        handle,
        _dir: dir,
    };
    if !app.wait_ready().await {
        let result = app.handle.await;
        panic!("server exited before becoming ready: {result:?}");
    }
    app
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Polls `/readyz` until the server answers 200 (bounded); `false` if the server exited.
    pub async fn wait_ready(&self) -> bool {
        let ready = self.base.replace("/api/v1", "/readyz");
        for _ in 0..200 {
            if let Ok(r) = self.http.get(&ready).send().await {
                if r.status() == 200 {
                    return true;
                }
            }
            if self.handle.is_finished() {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        panic!("server not ready after 5 s");
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let r = self.http.post(self.url(path)).json(&body).send().await.unwrap();
        status_json(r).await
    }

    pub async fn put(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        status_json(self.http.put(self.url(path)).json(&body).send().await.unwrap()).await
    }

    pub async fn delete(&self, path: &str) -> (u16, serde_json::Value) {
        status_json(self.http.delete(self.url(path)).send().await.unwrap()).await
    }

    /// Polls a command until it is COMPLETED or FAILED (bounded) and returns its status body.
    pub async fn wait_command(&self, command_id: &str, timeout: std::time::Duration) -> serde_json::Value {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let (s, b) = self.get(&format!("/commands/{command_id}")).await;
            assert_eq!(s, 200, "{b}");
            if b["status"] == "COMPLETED" || b["status"] == "FAILED" {
                return b;
            }
            assert!(std::time::Instant::now() < deadline, "command {command_id} still {b}");
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
    }

    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        status_json(self.http.get(self.url(path)).send().await.unwrap()).await
    }

    /// Opens the same storage the server uses, for checking what it wrote.
    pub async fn storage(&self) -> (Database, EventLog) {
        (
            Database::open(&self.config.database).await.unwrap(),
            EventLog::open(&self.config.log).unwrap(),
        )
    }

    pub async fn stop(self) -> tempfile::TempDir {
        self.shutdown.cancel();
        self.handle.await.unwrap().unwrap();
        self._dir
    }
}

pub async fn status_json(r: reqwest::Response) -> (u16, serde_json::Value) {
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    let value = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("non-JSON body with status {status}: {text:?}"));
    (status, value)
}

/// Waits (bounded by `timeout`) until `event`'s registry row has `status`; returns the row.
pub async fn registry_row(db: &Database, event: Uuid, status: &str, timeout: std::time::Duration) -> spiced::db::registry::Processed {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(row) = db.registry.rows(event).await.unwrap().into_iter().find(|r| r.status == status) {
            return row;
        }
        assert!(std::time::Instant::now() < deadline, "{event} never reached {status}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Every envelope in the log, reading segments 1, 2, ... until the first missing one, and
/// checking that nothing exists past it (the log is gapless).
pub async fn read_whole_log(log: &EventLog) -> Vec<(u64, spiced::envelope::EventEnvelope)> {
    let mut out = Vec::new();
    let mut position = 1;
    while let Some(segment) = log.get_segment(position).await.unwrap() {
        out.extend(segment.events.into_iter().map(|e| (position, e)));
        position += 1;
    }
    for ahead in position + 1..position + 3 {
        assert!(log.get_segment(ahead).await.unwrap().is_none(), "gap before position {ahead}");
    }
    out
}

/// Declares one async test per backend: `backend_tests!(name, ...)` makes `name_s3_postgres`
/// and `name_local_sqlite`.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod s3_postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() { super::$name($crate::common::Backend::S3Postgres).await }
            )*
        }
        mod local_sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() { super::$name($crate::common::Backend::LocalSqlite).await }
            )*
        }
    };
}
