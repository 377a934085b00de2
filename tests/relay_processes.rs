//! The relay as separate processes: killed at each step of a batch, and two relays competing
//! for the lease.

mod common;

use common::kafka::{consume_all, consume_until, isolate_topics, Received};
use common::process::Spiced;
use common::{isolated_config, spawn_with, Backend, TestApp};
use serde_json::json;
use std::collections::HashSet;
use std::time::{Duration, Instant};
use uuid::Uuid;

async fn app() -> TestApp {
    let (mut config, dir) = isolated_config(Backend::S3Postgres).await;
    isolate_topics(&mut config);
    config.relay.batch_segments = 2;
    spawn_with(config, dir).await
}

/// Appends `n` databases one at a time (one segment each) and returns their command ids.
async fn append(app: &TestApp, n: usize) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let (s, b) = app.post("/databases", json!({"name": format!("d{}", Uuid::new_v4().simple())})).await;
        assert_eq!(s, 202, "{b}");
        ids.push(b["command_id"].as_str().unwrap().parse().unwrap());
    }
    ids
}

fn ids(received: &[Received]) -> Vec<Uuid> {
    received.iter().map(|r| r.envelope().event_id).collect()
}

async fn relay_state(app: &TestApp) -> (u64, String) {
    let (client, conn) =
        tokio_postgres::connect(app.config.database.url.expose(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let row = client
        .query_opt("SELECT position, coalesce(leader, '') FROM relay_state WHERE name = 'relay'", &[])
        .await
        .unwrap();
    row.map(|r| (r.get::<_, i64>(0) as u64, r.get(1))).unwrap_or((0, String::new()))
}

async fn wait_checkpoint(app: &TestApp, position: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let (p, _) = relay_state(app).await;
        if p >= position {
            return;
        }
        assert!(Instant::now() < deadline, "checkpoint stuck at {p}, want {position}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn killed_at(point: &str) {
    let app = app().await;
    let expected = append(&app, 10).await;
    let dir = tempfile::tempdir().unwrap();
    let mut doomed = Spiced::spawn(&["relay"], &app.config, dir.path(), &[("SPICED_RELAY__CRASH_AT", point.into())]);
    let status = doomed.wait_exit(Duration::from_secs(60)).await;
    assert!(!status.success(), "relay should have aborted at {point}: {status}");
    let _relay = Spiced::spawn(&["relay"], &app.config, dir.path(), &[]);
    wait_checkpoint(&app, 10, Duration::from_secs(60)).await;
    let topic = app.config.topics.ontology_commands.clone();
    let want: HashSet<Uuid> = expected.iter().copied().collect();
    let received = consume_all(
        &app.config,
        &[&topic],
        Duration::from_secs(60),
        |r| want.is_subset(&ids(r).into_iter().collect()),
        Duration::from_secs(3),
    )
    .await;
    let got = ids(&received);
    let unique: HashSet<Uuid> = got.iter().copied().collect();
    assert_eq!(unique, want, "after a crash at {point}: every event published, nothing else");
    // One batch is 2 segments of one event each: at most that many duplicates.
    assert!(got.len() - unique.len() <= 2, "{} duplicates after a crash at {point}", got.len() - unique.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_killed_after_produce_before_delivery() {
    killed_at("after_produce").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_killed_after_delivery_before_checkpoint() {
    killed_at("after_delivery").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_killed_during_checkpoint_write() {
    killed_at("during_checkpoint").await
}

/// Two relays: one leads, one stands by. SIGKILL the leader: the standby takes over within the
/// lease and nothing is lost. SIGTERM the new leader: it flushes, checkpoints and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn standby_takes_over_when_the_leader_dies() {
    let app = app().await;
    let mut expected = append(&app, 4).await;
    let dir = tempfile::tempdir().unwrap();
    let mut relays = [
        Spiced::spawn(&["relay"], &app.config, dir.path(), &[]),
        Spiced::spawn(&["relay"], &app.config, dir.path(), &[]),
    ];
    wait_checkpoint(&app, 4, Duration::from_secs(60)).await;
    let (_, leader) = relay_state(&app).await;
    let leader_index = relays
        .iter()
        .position(|r| leader.starts_with(&format!("{}-", r.pid())))
        .expect("the leader is one of the two relays");
    relays[leader_index].signal("KILL");
    relays[leader_index].wait_exit(Duration::from_secs(10)).await;
    let killed_at = Instant::now();
    expected.extend(append(&app, 4).await);
    wait_checkpoint(&app, 8, Duration::from_secs(60)).await;
    let took = killed_at.elapsed();
    let lease = Duration::from_millis(app.config.relay.lease_ms);
    assert!(took < lease + Duration::from_secs(3), "takeover took {took:?} with a {lease:?} lease");
    let (_, new_leader) = relay_state(&app).await;
    let standby = 1 - leader_index;
    assert!(new_leader.starts_with(&format!("{}-", relays[standby].pid())), "{new_leader}");
    let topic = app.config.topics.ontology_commands.clone();
    let want: HashSet<Uuid> = expected.iter().copied().collect();
    let received = consume_until(&app.config, &[&topic], Duration::from_secs(60), |r| {
        want.is_subset(&ids(r).into_iter().collect())
    })
    .await;
    assert_eq!(ids(&received).into_iter().collect::<HashSet<_>>(), want);

    // Graceful stop: exit 0 and the lease given back, so a new relay starts at once (no lease
    // wait) and publishes what came after.
    append(&app, 2).await;
    relays[standby].signal("TERM");
    let status = relays[standby].wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "SIGTERM exit status {status}");
    let (client, conn) =
        tokio_postgres::connect(app.config.database.url.expose(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let released: bool = client
        .query_one("SELECT lease_until IS NULL FROM relay_state WHERE name = 'relay'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(released, "a relay stopped by SIGTERM releases its lease");
    let restarted = Instant::now();
    let _next = Spiced::spawn(&["relay"], &app.config, dir.path(), &[]);
    wait_checkpoint(&app, 10, Duration::from_secs(60)).await;
    assert!(restarted.elapsed() < lease, "a released lease is taken without waiting it out");
}
