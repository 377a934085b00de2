//! One conformance suite each for the small stores, run against PostgreSQL and SQLite, each
//! test taking the store as `&dyn Trait`: named checkpoints ([`Checkpoints`]), the relay's lease
//! ([`LeaseTable`]) and the stages' liveness reports ([`StageTable`]).

mod common;

use common::{isolated_config, Backend};
use spiced::db::lease::Move;
use spiced::db::{Checkpoints, Database, Holder, LeaseTable, StageReport, StageTable};
use std::time::Duration;

backend_tests! {
    checkpoints_start_unset_and_only_move_forward,
    one_leader_at_a_time_and_a_lost_lease_writes_nothing,
    an_expired_lease_passes_to_the_next_relay,
    stage_reports_replace_each_other_per_stage_and_process,
}

const LONG: Duration = Duration::from_secs(60);

async fn open(backend: Backend) -> (Database, tempfile::TempDir) {
    let (config, dir) = isolated_config(backend).await;
    let db = Database::open(&config.database).await.unwrap();
    db.migrate().await.unwrap();
    (db, dir)
}

fn holder<'a>(me: &'a str, epoch: i64) -> Holder<'a> {
    Holder { name: "relay", me, epoch }
}

async fn checkpoints_start_unset_and_only_move_forward(backend: Backend) {
    let (db, _dir) = open(backend).await;
    let c: &dyn Checkpoints = db.checkpoints.as_ref();
    assert_eq!(c.get("cursor").await.unwrap(), None);
    assert_eq!(c.position("cursor").await.unwrap(), 0);
    c.advance("cursor", 7).await.unwrap();
    c.advance("cursor", 3).await.unwrap();
    assert_eq!(c.get("cursor").await.unwrap(), Some(7), "never back");
    c.advance("cursor", 9).await.unwrap();
    assert_eq!(c.get("cursor").await.unwrap(), Some(9));
    assert_eq!(c.get("other").await.unwrap(), None, "cursors are independent");
}

async fn one_leader_at_a_time_and_a_lost_lease_writes_nothing(backend: Backend) {
    let (db, _dir) = open(backend).await;
    let leases: &dyn LeaseTable = db.leases.as_ref();
    let (epoch, position) = leases.acquire("relay", "a", LONG).await.unwrap().expect("a free lease is granted");
    assert_eq!(position, 0);
    assert_eq!(leases.acquire("relay", "b", LONG).await.unwrap(), None, "held by a");
    let a = holder("a", epoch);
    assert!(leases.renew(a, LONG).await.unwrap());
    assert!(!leases.renew(holder("b", epoch), LONG).await.unwrap(), "only the holder renews");

    let crash_point_ran = std::sync::atomic::AtomicBool::new(false);
    let before_commit = || crash_point_ran.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(leases.write_checkpoint(a, 10, Move::Forward, &before_commit).await.unwrap());
    assert!(crash_point_ran.load(std::sync::atomic::Ordering::SeqCst));
    assert!(!leases.write_checkpoint(a, 5, Move::Forward, &|| {}).await.unwrap(), "forward only");
    assert!(leases.write_checkpoint(a, 5, Move::Anywhere, &|| {}).await.unwrap(), "the operator's reset");
    assert_eq!(db.checkpoints.get("relay").await.unwrap(), Some(5), "the checkpoint is the lease row's");

    // Released: the next relay takes it at once, with a new epoch and the checkpoint.
    leases.release(a).await.unwrap();
    let (b_epoch, b_position) = leases.acquire("relay", "b", LONG).await.unwrap().expect("released");
    assert_eq!((b_epoch, b_position), (epoch + 1, 5));
    assert!(!leases.renew(a, LONG).await.unwrap(), "the old epoch is fenced");
    assert!(!leases.write_checkpoint(a, 50, Move::Forward, &|| {}).await.unwrap());
    assert_eq!(db.checkpoints.get("relay").await.unwrap(), Some(5));
    // Asking again while holding it keeps it (a restarted leader with the same id).
    assert_eq!(leases.acquire("relay", "b", LONG).await.unwrap().map(|(e, _)| e), Some(b_epoch + 1));
}

async fn an_expired_lease_passes_to_the_next_relay(backend: Backend) {
    let (db, _dir) = open(backend).await;
    let leases: &dyn LeaseTable = db.leases.as_ref();
    let short = Duration::from_millis(300);
    let (epoch, _) = leases.acquire("relay", "a", short).await.unwrap().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let taken = loop {
        if let Some(granted) = leases.acquire("relay", "b", LONG).await.unwrap() {
            break granted;
        }
        assert!(std::time::Instant::now() < deadline, "a 300 ms lease still held after 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(taken.0, epoch + 1);
    assert!(!leases.renew(holder("a", epoch), LONG).await.unwrap(), "expired is lost");
    assert!(!leases.write_checkpoint(holder("a", epoch), 1, Move::Forward, &|| {}).await.unwrap());
}

fn report(stage: &str, instance: &str, stalled: bool) -> StageReport {
    let now = chrono::Utc::now();
    StageReport {
        stage: stage.into(),
        instance: instance.into(),
        progressed_at: now,
        work_waiting: true,
        stalled,
        last_error: stalled.then(|| "broker unreachable".to_string()),
        reported_at: now,
        // A stalled report has a position, a live one none yet.
        position: stalled.then_some(41),
    }
}

async fn stage_reports_replace_each_other_per_stage_and_process(backend: Backend) {
    let (db, _dir) = open(backend).await;
    let stages: &dyn StageTable = db.stages.as_ref();
    stages.report(&[report("relay", "h-1", false), report("projection", "h-1", false)]).await.unwrap();
    stages.report(&[report("relay", "h-2", false)]).await.unwrap();
    stages.report(&[report("relay", "h-1", true)]).await.unwrap();
    let all = stages.all().await.unwrap();
    let shape: Vec<(&str, &str, bool)> = all.iter().map(|r| (r.stage.as_str(), r.instance.as_str(), r.stalled)).collect();
    assert_eq!(shape, [("projection", "h-1", false), ("relay", "h-1", true), ("relay", "h-2", false)]);
    let stalled = &all[1];
    assert_eq!(stalled.last_error.as_deref(), Some("broker unreachable"));
    assert_eq!((stalled.position, all[0].position), (Some(41), None), "positions come back as written");
    let drift = (stalled.reported_at - chrono::Utc::now()).num_seconds().abs();
    assert!(drift < 60, "times come back as written: {stalled:?}");
    stages.forget("h-1").await.unwrap();
    let left: Vec<String> = stages.all().await.unwrap().into_iter().map(|r| r.instance).collect();
    assert_eq!(left, ["h-2"]);
}
