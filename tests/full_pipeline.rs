//! The whole pipeline as separate `spiced` processes (serve, relay, two workers, project)
//! against the real services. Each role is restarted once under load (SIGTERM, and one worker
//! SIGKILL); afterwards every accepted command has exactly one outcome, `spiced verify` passes
//! and the read model equals a fold of the log.

mod common;

use common::kafka::isolate_topics;
use common::load::{create_shop, wait_completed, wait_ready, Load};
use common::process::{free_port, Spiced};
use common::readmodel::{assert_same, fold, rows_of};
use common::{isolated_config, Backend};
use serde_json::Value;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_role_restarted_under_load_loses_and_duplicates_nothing() {
    let (mut config, _dir) = isolated_config(Backend::S3Postgres).await;
    isolate_topics(&mut config);
    config.worker.lease_ms = 3000;
    config.worker.heartbeat_ms = 1000;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let root = format!("http://127.0.0.1:{port}");
    let base = format!("{root}/api/v1");
    let serve_env = [("SPICED_SERVE__LISTEN", format!("127.0.0.1:{port}"))];
    let start_serve = || Spiced::spawn(&["serve"], &config, dir.path(), &serve_env);
    let start = |role: &str| Spiced::spawn(&[role], &config, dir.path(), &[]);
    let mut serve = start_serve();
    wait_ready(&root).await;
    let mut relay = start("relay");
    let mut worker_a = start("worker");
    let mut worker_b = start("worker");
    let mut project = start("project");

    let http = common::http();
    create_shop(&http, &base).await;
    // Load: 4 clients, each creating instances and updating them, until told to stop.
    let load = Load::start(&http, &base, 4, Duration::ZERO);
    let pace = || tokio::time::sleep(Duration::from_millis(1500));
    pace().await;
    serve.signal("TERM");
    assert!(serve.wait_exit(WAIT).await.success(), "serve exits 0 on SIGTERM");
    serve = start_serve();
    wait_ready(&root).await;
    pace().await;
    relay.signal("TERM");
    assert!(relay.wait_exit(WAIT).await.success(), "relay exits 0 on SIGTERM");
    relay = start("relay");
    pace().await;
    worker_a.signal("TERM");
    assert!(worker_a.wait_exit(WAIT).await.success(), "worker exits 0 on SIGTERM");
    worker_a = start("worker");
    pace().await;
    worker_b.signal("KILL");
    worker_b.wait_exit(WAIT).await;
    worker_b = start("worker");
    pace().await;
    project.signal("TERM");
    assert!(project.wait_exit(WAIT).await.success(), "project exits 0 on SIGTERM");
    project = start("project");
    pace().await;
    let accepted = load.stop().await;
    assert!(accepted.len() >= 20, "load ran: {} commands", accepted.len());
    wait_completed(&http, &base, accepted.keys(), WAIT).await;
    // Exactly one outcome per command, and each instance's final state is its update.
    let instances: std::collections::HashSet<&String> = accepted.values().collect();
    for id in instances {
        let page: Value = http
            .get(format!("{base}/aggregates/Instance/shop:main:Item:{id}/events?kind=domain"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let types: Vec<&str> = page["events"].as_array().unwrap().iter().map(|e| e["event_type"].as_str().unwrap()).collect();
        assert_eq!(types, ["INSTANCE_CREATED", "INSTANCE_UPDATED"], "{id}");
    }
    // The read model catches up with the whole log and equals a fold of it.
    let db = spiced::db::Database::open(&config.database).await.unwrap();
    let head = db.index.head().await.unwrap();
    let deadline = Instant::now() + WAIT;
    while db.read.live_position().await.unwrap() < head {
        assert!(Instant::now() < deadline, "projection stuck below the log head {head}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_same(&rows_of(&config, "spiced_read").await, &fold(&config, head).await, "read model");
    for p in [&mut serve, &mut relay, &mut worker_a, &mut worker_b, &mut project] {
        p.signal("TERM");
        assert!(p.wait_exit(WAIT).await.success());
    }
    let report = spiced::ops::verify::run(&config, 1).await.unwrap();
    assert_eq!(report.violations(), 0, "{report:?}");
}
