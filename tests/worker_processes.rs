//! Command workers as separate processes: killed at each step of a command, two workers with
//! one killed and replaced under load, and stopped with SIGTERM while holding a claim (waiting,
//! or stuck in an effect past the grace period). Exactly one effect each time.

mod common;

use common::kafka::isolate_topics;
use common::process::Spiced;
use common::{isolated_config, spawn_with, Backend, TestApp};
use serde_json::json;
use spiced::relay::{run_with, RelayOptions};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(90);

struct Setup {
    app: TestApp,
    relay: CancellationToken,
    dir: tempfile::TempDir,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.relay.cancel();
    }
}

async fn setup() -> Setup {
    setup_with(|worker| worker.lease_ms = 3000).await
}

/// The API and a relay in this process, with `adjust` applied to the workers' settings.
async fn setup_with(adjust: impl FnOnce(&mut spiced::config::WorkerConfig)) -> Setup {
    let (mut config, dir) = isolated_config(Backend::S3Postgres).await;
    isolate_topics(&mut config);
    config.worker.heartbeat_ms = 1000;
    config.worker.backoff_base_ms = 50;
    adjust(&mut config.worker);
    let app = spawn_with(config.clone(), dir).await;
    let relay = CancellationToken::new();
    tokio::spawn(run_with(config, RelayOptions::default(), relay.clone(), Default::default()));
    Setup { app, relay, dir: tempfile::tempdir().unwrap() }
}

fn worker(s: &Setup, env: &[(&str, String)]) -> Spiced {
    Spiced::spawn(&["worker"], &s.app.config, s.dir.path(), env)
}

async fn create_db(app: &TestApp, name: &str) -> String {
    let (s, b) = app.post("/databases", json!({"name": name})).await;
    assert_eq!(s, 202, "{b}");
    b["command_id"].as_str().unwrap().to_string()
}

/// One outcome in the log for the database, and the command COMPLETED.
async fn exactly_one_effect(app: &TestApp, name: &str, command_id: &str) {
    let status = app.wait_command(command_id, WAIT).await;
    assert_eq!(status["status"], "COMPLETED", "{status}");
    let (_, events) = app.get(&format!("/aggregates/Database/{name}/events?kind=domain")).await;
    let outcomes = events["events"].as_array().unwrap();
    assert_eq!(outcomes.len(), 1, "{outcomes:?}");
    assert_eq!(outcomes[0]["event_type"], "DATABASE_CREATED");
}

async fn killed_at(point: &str) {
    let s = setup().await;
    let id = create_db(&s.app, "victim").await;
    let mut doomed = worker(&s, &[("SPICED_WORKER__CRASH_AT", point.to_string())]);
    let status = doomed.wait_exit(WAIT).await;
    assert!(!status.success(), "the worker should have aborted at {point}: {status}");
    let _worker = worker(&s, &[]);
    exactly_one_effect(&s.app, "victim", &id).await;
    // And the pipeline goes on.
    let next = create_db(&s.app, "after").await;
    exactly_one_effect(&s.app, "after", &next).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_killed_after_claim() {
    killed_at("after_claim").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_killed_after_effect() {
    killed_at("after_effect").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_killed_after_outcome_append() {
    killed_at("after_outcome").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_killed_before_offset_commit() {
    killed_at("before_commit").await
}

/// Two workers share the partitions; one is killed under load and replaced (a rebalance each
/// way). Every command completes with exactly one outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_and_replacing_a_worker_under_load_loses_and_duplicates_nothing() {
    let s = setup().await;
    let mut a = worker(&s, &[]);
    let _b = worker(&s, &[]);
    let mut ids = Vec::new();
    for i in 0..120 {
        ids.push((format!("db{i}"), create_db(&s.app, &format!("db{i}")).await));
        if i == 40 {
            a.signal("KILL");
            a.wait_exit(WAIT).await;
        }
        if i == 60 {
            a = worker(&s, &[]);
        }
    }
    for (name, id) in &ids {
        exactly_one_effect(&s.app, name, id).await;
    }
}

/// A worker frozen (SIGSTOP) while holding a claim, past its lease: another worker completes
/// the command; resumed, the first commits nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_worker_loses_its_claim_and_commits_nothing() {
    let s = setup().await;
    let id = create_db(&s.app, "frozen").await;
    let mut frozen = worker(&s, &[("SPICED_WORKER__CRASH_AT", "stop_after_claim".to_string())]);
    // Wait until it holds the claim (its registry row says processing).
    let event: uuid::Uuid = id.parse().unwrap();
    let (db, _) = s.app.storage().await;
    let deadline = std::time::Instant::now() + WAIT;
    while db.registry.rows(event).await.unwrap().first().map(|r| r.status.as_str()) != Some("processing") {
        assert!(std::time::Instant::now() < deadline, "the worker never claimed the command");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _other = worker(&s, &[]);
    let status = s.app.wait_command(&id, WAIT).await;
    assert_eq!(status["status"], "COMPLETED", "{status}");
    frozen.signal("CONT");
    // The resumed worker finds its lease gone; give it the time to try, then check the log.
    let (_, events) = s.app.get("/aggregates/Database/frozen/events?kind=domain").await;
    let outcome = &events["events"][0];
    let frozen_pid = format!("-{}-", frozen.pid());
    assert!(!outcome["metadata"]["worker"].as_str().unwrap().contains(&frozen_pid), "{outcome}");
    let after = create_db(&s.app, "after-freeze").await;
    exactly_one_effect(&s.app, "after-freeze", &after).await;
    exactly_one_effect(&s.app, "frozen", &id).await;
    let rows = db.registry.rows(event).await.unwrap();
    assert_eq!((rows.len(), rows[0].status.as_str()), (1, "done"));
    assert!(frozen.is_running(), "the resumed worker carries on");
}

/// A worker frozen (SIGSTOP) after its claim for longer than `heartbeat_ms` but not its lease:
/// resumed, it finds its last confirmation old and confirms the lease with the registry
/// before the effect (a fresh one passes on the clock alone), then completes the command.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_resumed_after_a_freeze_confirms_its_lease_with_the_registry() {
    let s = setup_with(|w| w.lease_ms = 10_000).await;
    let id = create_db(&s.app, "paused").await;
    let log = s.dir.path().join("paused-worker.log");
    let mut paused = Spiced::spawn_logging(&["worker"], &s.app.config, s.dir.path(), &[("SPICED_WORKER__CRASH_AT", "stop_after_claim".to_string())], &log);
    let (db, _) = s.app.storage().await;
    registry_row(&db, id.parse().unwrap(), "processing").await;
    // The freeze itself is what is tested: over heartbeat_ms (1 s), well within the lease.
    tokio::time::sleep(Duration::from_millis(2 * s.app.config.worker.heartbeat_ms)).await;
    paused.signal("CONT");
    exactly_one_effect(&s.app, "paused", &id).await;
    let (_, events) = s.app.get("/aggregates/Database/paused/events?kind=domain").await;
    let worker = events["events"][0]["metadata"]["worker"].as_str().unwrap().to_string();
    assert!(worker.contains(&format!("-{}-", paused.pid())), "the resumed worker appended it: {worker}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("confirming it with the registry before the effect"), "{text}");
    assert!(paused.is_running());
}

/// Waits (bounded) until `event`'s registry row has `status`; returns the row.
async fn registry_row(db: &spiced::db::Database, event: uuid::Uuid, status: &str) -> spiced::db::registry::Processed {
    common::registry_row(db, event, status, WAIT).await
}

/// SIGTERM while a worker holds a claim and waits: the instance command waits for its class,
/// which nobody creates (the worker runs the instance role only). The worker stops waiting at
/// once, gives the claim back and exits 0; a worker started next completes the command well
/// before the 120 s lease could have lapsed, so only the release can explain it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_releases_a_waiting_claim_for_another_worker_at_once() {
    const LEASE: Duration = Duration::from_secs(120);
    let s = setup_with(|w| {
        w.lease_ms = LEASE.as_millis() as u64;
        w.gap_wait_ms = LEASE.as_millis() as u64;
        // A wait as long as the lease is legitimate here, not a stall.
        w.stall_timeout_ms = 2 * LEASE.as_millis() as u64;
        // Far longer than the exit may take: a wait must not be treated as in-flight work.
        w.shutdown_grace_ms = 60_000;
    })
    .await;
    create_db(&s.app, "g").await;
    let (st, b) = s.app.post("/databases/g/classes", json!({"id": "C"})).await;
    assert_eq!(st, 202, "{b}");
    let (st, b) = s.app.post("/databases/g/classes/C/instances", json!({"id": "i", "data": {}})).await;
    assert_eq!(st, 202, "{b}");
    let id = b["command_id"].as_str().unwrap().to_string();
    let event: uuid::Uuid = id.parse().unwrap();
    let (db, _) = s.app.storage().await;

    let mut waiting = Spiced::spawn(&["worker", "--role", "instance"], &s.app.config, s.dir.path(), &[]);
    registry_row(&db, event, "processing").await;
    let signalled = std::time::Instant::now();
    waiting.signal("TERM");
    let status = waiting.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "a SIGTERMed worker exits 0: {status}");
    // Released before the process exited, not left to its lease.
    let rows = db.registry.rows(event).await.unwrap();
    assert_eq!((rows.len(), rows[0].status.as_str()), (1, "retrying"), "{rows:?}");
    assert_eq!(rows[0].attempt_count, 0, "an interrupted attempt does not count");
    eprintln!("worker exited {:?} after SIGTERM", signalled.elapsed());

    let started = std::time::Instant::now();
    let _other = worker(&s, &[]);
    let done = s.app.wait_command(&id, LEASE / 2).await;
    assert_eq!(done["status"], "COMPLETED", "{done}");
    assert!(started.elapsed() < LEASE / 2, "taken over after {:?}", started.elapsed());
    let (_, events) = s.app.get("/aggregates/Instance/g:main:C:i/events?kind=domain").await;
    assert_eq!(events["events"].as_array().map(Vec::len), Some(1), "{events}");
}

/// SIGTERM while a worker is in the middle of an effect that cannot finish: its S3 goes away
/// (through a proxy) while it appends the outcome, and the S3 client would retry for a minute.
/// The worker gives the effect `worker.shutdown_grace_ms` (1 s), then abandons it, releases
/// the claim and exits 0, long before the client would give up; once S3 is back another worker
/// completes the command, with one outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_abandons_a_stuck_effect_after_the_grace_period() {
    let s = setup_with(|w| {
        w.lease_ms = 120_000;
        w.shutdown_grace_ms = 1000;
    })
    .await;
    let s3 = url::Url::parse(&s.app.config.log.s3.endpoint).unwrap();
    let proxy = common::proxy::Proxy::start(&format!("{}:{}", s3.host_str().unwrap(), s3.port().unwrap())).await;
    let ops = common::process::free_port();
    let env = [
        ("SPICED_LOG__S3__ENDPOINT", format!("http://{}", proxy.addr)),
        ("SPICED_LOG__S3__MAX_RETRIES", "1000".to_string()),
        ("SPICED_LOG__S3__RETRY_TIMEOUT_MS", "60000".to_string()),
        ("SPICED_METRICS__WORKER_LISTEN", format!("127.0.0.1:{ops}")),
    ];
    let mut stuck = Spiced::spawn(&["worker", "--role", "ontology"], &s.app.config, s.dir.path(), &env);
    let http = common::http();
    let deadline = std::time::Instant::now() + WAIT;
    while !http.get(format!("http://127.0.0.1:{ops}/readyz")).send().await.is_ok_and(|r| r.status() == 200) {
        assert!(std::time::Instant::now() < deadline, "worker not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.down().await;
    let id = create_db(&s.app, "stuck").await;
    let (db, _) = s.app.storage().await;
    registry_row(&db, id.parse().unwrap(), "processing").await;

    let signalled = std::time::Instant::now();
    stuck.signal("TERM");
    let status = stuck.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "a SIGTERMed worker exits 0: {status}");
    assert!(signalled.elapsed() < Duration::from_secs(15), "exited after {:?}", signalled.elapsed());
    let rows = db.registry.rows(id.parse().unwrap()).await.unwrap();
    assert_eq!(rows[0].status, "retrying", "the claim is given back: {rows:?}");

    proxy.up().await;
    let _other = worker(&s, &[]);
    exactly_one_effect(&s.app, "stuck", &id).await;
}
