//! One conformance suite for the processed_events registry, on PostgreSQL and SQLite.

mod common;

use common::{isolated_config, Backend};
use spiced::db::registry::{Claim, Registry, Work};
use spiced::db::Database;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

backend_tests! {
    claim_lifecycle,
    leases_expire_and_fence_the_old_owner,
    stale_failed_and_redrive,
    dead_letters_are_listed_by_event_id_per_handler,
    concurrent_claims_have_one_winner,
}

const LEASE: Duration = Duration::from_secs(60);

async fn open(backend: Backend) -> (Arc<dyn Registry>, tempfile::TempDir) {
    let (config, dir) = isolated_config(backend).await;
    let db = Database::open(&config.database).await.unwrap();
    db.migrate().await.unwrap();
    (db.registry.clone(), dir)
}

fn work<'a>(event_id: Uuid, seq: u64, owner: &'a str) -> Work<'a> {
    Work { handler: "h", event_id, aggregate_id: "agg", seq, owner }
}

async fn claim_lifecycle(backend: Backend) {
    let (r, _dir) = open(backend).await;
    let id = Uuid::new_v4();
    assert_eq!(r.claim(&work(id, 1, "a"), LEASE).await.unwrap(), Claim::Claimed { attempt: 1 });
    assert_eq!(r.claim(&work(id, 1, "b"), LEASE).await.unwrap(), Claim::InProgress);
    assert!(r.heartbeat(&work(id, 1, "a")).await.unwrap());
    assert!(!r.heartbeat(&work(id, 1, "b")).await.unwrap(), "heartbeat is owner-guarded");
    assert!(r.mark_retrying(&work(id, 1, "a"), "boom").await.unwrap());
    assert_eq!(r.claim(&work(id, 1, "b"), LEASE).await.unwrap(), Claim::Claimed { attempt: 2 });
    assert!(!r.mark_done(&work(id, 1, "a")).await.unwrap(), "the old owner cannot finish");
    assert!(r.mark_done(&work(id, 1, "b")).await.unwrap());
    assert_eq!(r.claim(&work(id, 1, "c"), LEASE).await.unwrap(), Claim::DuplicateDone);
    let rows = r.rows(id).await.unwrap();
    assert_eq!((rows[0].status.as_str(), rows[0].attempt_count), ("done", 2));
}

async fn leases_expire_and_fence_the_old_owner(backend: Backend) {
    let (r, _dir) = open(backend).await;
    let id = Uuid::new_v4();
    let short = Duration::from_millis(200);
    assert_eq!(r.claim(&work(id, 1, "a"), short).await.unwrap(), Claim::Claimed { attempt: 1 });
    tokio::time::sleep(Duration::from_millis(400)).await; // let the lease run out
    assert_eq!(r.claim(&work(id, 1, "b"), short).await.unwrap(), Claim::Claimed { attempt: 2 });
    assert!(!r.heartbeat(&work(id, 1, "a")).await.unwrap(), "the old owner learns it lost the lease");
    assert!(!r.mark_done(&work(id, 1, "a")).await.unwrap());
    assert!(!r.mark_failed(&work(id, 1, "a"), "x").await.unwrap());
    assert!(r.mark_done(&work(id, 1, "b")).await.unwrap());
}

async fn stale_failed_and_redrive(backend: Backend) {
    let (r, _dir) = open(backend).await;
    let five = Uuid::new_v4();
    assert!(matches!(r.claim(&work(five, 5, "a"), LEASE).await.unwrap(), Claim::Claimed { .. }));
    assert!(r.mark_done(&work(five, 5, "a")).await.unwrap());
    assert_eq!(r.claim(&work(Uuid::new_v4(), 3, "a"), LEASE).await.unwrap(), Claim::Stale);
    let six = Uuid::new_v4();
    assert!(matches!(r.claim(&work(six, 6, "a"), LEASE).await.unwrap(), Claim::Claimed { .. }));
    assert!(r.mark_failed(&work(six, 6, "a"), "poison").await.unwrap());
    assert_eq!(r.claim(&work(six, 6, "b"), LEASE).await.unwrap(), Claim::Failed, "failed is terminal");
    assert_eq!(r.rows(six).await.unwrap()[0].last_error.as_deref(), Some("poison"));
    // A failure does not move the position: the failed sequence is not "applied".
    assert!(r.redrive("h", six).await.unwrap());
    assert!(!r.redrive("h", six).await.unwrap(), "only a failed event is re-driven");
    assert_eq!(r.claim(&work(six, 6, "b"), LEASE).await.unwrap(), Claim::Claimed { attempt: 1 });
    assert!(r.mark_done(&work(six, 6, "b")).await.unwrap());
    assert_eq!(r.claim(&work(Uuid::new_v4(), 6, "c"), LEASE).await.unwrap(), Claim::Stale);
}

async fn dead_letters_are_listed_by_event_id_per_handler(backend: Backend) {
    let (r, _dir) = open(backend).await;
    let mut failed: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    for (i, id) in failed.iter().enumerate() {
        let w = Work { aggregate_id: "dl", ..work(*id, i as u64 + 1, "a") };
        assert!(matches!(r.claim(&w, LEASE).await.unwrap(), Claim::Claimed { .. }));
        assert!(r.mark_failed(&w, &format!("poison {i}")).await.unwrap());
    }
    // Not dead letters: one done, one of another handler.
    let done = Uuid::new_v4();
    assert!(matches!(r.claim(&work(done, 9, "a"), LEASE).await.unwrap(), Claim::Claimed { .. }));
    assert!(r.mark_done(&work(done, 9, "a")).await.unwrap());
    let other = Work { handler: "other", ..work(Uuid::new_v4(), 1, "a") };
    assert!(matches!(r.claim(&other, LEASE).await.unwrap(), Claim::Claimed { .. }));
    assert!(r.mark_failed(&other, "elsewhere").await.unwrap());

    failed.sort();
    let all = r.failed("h", None, 10).await.unwrap();
    assert_eq!(all.iter().map(|f| f.event_id).collect::<Vec<_>>(), failed, "by event id, this handler's only");
    assert!(all.iter().all(|f| f.aggregate_id == "dl" && f.attempt_count == 1 && f.failed_at.is_some()), "{all:?}");
    assert!(all[0].last_error.as_deref().is_some_and(|e| e.starts_with("poison")));
    let page = r.failed("h", Some(failed[0]), 1).await.unwrap();
    assert_eq!(page.iter().map(|f| f.event_id).collect::<Vec<_>>(), [failed[1]], "keyset after the first");
    assert!(r.redrive("h", failed[1]).await.unwrap());
    let left = r.failed("h", None, 10).await.unwrap();
    assert_eq!(left.iter().map(|f| f.event_id).collect::<Vec<_>>(), [failed[0], failed[2]], "a re-driven one is no dead letter");
}

async fn concurrent_claims_have_one_winner(backend: Backend) {
    let (r, _dir) = open(backend).await;
    let id = Uuid::new_v4();
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let r = r.clone();
            tokio::spawn(async move {
                let owner = format!("w{i}");
                r.claim(&Work { handler: "h", event_id: id, aggregate_id: "agg", seq: 1, owner: &owner }, LEASE)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut claimed = 0;
    for t in tasks {
        match t.await.unwrap() {
            Claim::Claimed { .. } => claimed += 1,
            Claim::InProgress => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(claimed, 1);
}
