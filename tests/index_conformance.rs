//! One conformance suite for the log index, run against PostgreSQL and SQLite.

mod common;

use common::{isolated_config, Backend};
use spiced::db::{Database, DbError, LookupRequest};
use spiced::domain::AggregateKey;
use spiced::envelope::Kind;
use spiced::db::IndexRow;
use std::time::Duration;
use uuid::Uuid;

backend_tests! {
    positions_start_at_one_and_advance_only_on_commit,
    writers_are_serialised_by_the_head_lock,
    rows_are_unique_per_event_and_per_sequence,
    lookup_returns_commands_and_versions,
    recording_the_wrong_position_is_refused,
    the_writers_combined_steps_do_what_the_separate_ones_do,
    events_after_counts_the_envelopes_past_a_position,
}

async fn open(backend: Backend) -> (Database, tempfile::TempDir) {
    let (config, dir) = isolated_config(backend).await;
    let db = Database::open(&config.database).await.unwrap();
    db.migrate().await.unwrap();
    assert!(db.migrate().await.unwrap().is_empty(), "migrations apply once");
    (db, dir)
}

fn row(id: &str, seq: u64, position: u64) -> IndexRow {
    let event_id = Uuid::new_v4();
    IndexRow {
        event_id,
        command_id: event_id,
        fingerprint: "fp".into(),
        key: AggregateKey::database(id),
        kind: Kind::Command,
        seq,
        position,
    }
}

async fn positions_start_at_one_and_advance_only_on_commit(backend: Backend) {
    let (db, _dir) = open(backend).await;
    assert_eq!(db.index.head().await.unwrap(), 0);
    let tx = db.index.begin().await.unwrap();
    assert_eq!(tx.next_position(), 1);
    tx.rollback().await.unwrap();
    let mut tx = db.index.begin().await.unwrap();
    tx.record(1, &[row("a", 1, 1)]).await.unwrap();
    drop(tx); // dropped without commit: rolled back
    assert_eq!(db.index.head().await.unwrap(), 0);
    let mut tx = db.index.begin().await.unwrap();
    assert_eq!(tx.next_position(), 1);
    tx.record(1, &[row("a", 1, 1)]).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(db.index.head().await.unwrap(), 1);
    assert_eq!(db.index.version(&AggregateKey::database("a")).await.unwrap(), 1);
    assert_eq!(
        db.index.positions(&AggregateKey::database("a"), Kind::Command, 1, 10).await.unwrap(),
        vec![(1, 1)]
    );
}

async fn writers_are_serialised_by_the_head_lock(backend: Backend) {
    let (db, _dir) = open(backend).await;
    let mut first = db.index.begin().await.unwrap();
    let index = db.index.clone();
    let second = tokio::spawn(async move {
        let tx = index.begin().await.unwrap();
        let p = tx.next_position();
        tx.rollback().await.unwrap();
        p
    });
    // Give the second writer time to reach the lock; it must then wait for the first commit.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!second.is_finished(), "a second batch began while the first held the head");
    first.record(1, &[row("a", 1, 1)]).await.unwrap();
    first.commit().await.unwrap();
    assert_eq!(second.await.unwrap(), 2, "the second batch sees the first one's position");
}

async fn rows_are_unique_per_event_and_per_sequence(backend: Backend) {
    let (db, _dir) = open(backend).await;
    let r = row("a", 1, 1);
    let mut tx = db.index.begin().await.unwrap();
    tx.record(1, std::slice::from_ref(&r)).await.unwrap();
    tx.commit().await.unwrap();
    let mut same_seq = row("a", 1, 2);
    same_seq.event_id = Uuid::new_v4();
    let mut tx = db.index.begin().await.unwrap();
    assert!(tx.record(2, &[same_seq]).await.is_err(), "(aggregate, kind, seq) taken twice");
    drop(tx);
    let mut same_id = row("b", 1, 2);
    same_id.event_id = r.event_id;
    let mut tx = db.index.begin().await.unwrap();
    assert!(tx.record(2, &[same_id]).await.is_err(), "event_id stored twice");
    drop(tx);
    assert_eq!(db.index.head().await.unwrap(), 1);
}

async fn lookup_returns_commands_and_versions(backend: Backend) {
    let (db, _dir) = open(backend).await;
    let a1 = row("a", 1, 1);
    let mut a2 = row("a", 2, 1);
    a2.command_id = a1.command_id; // two envelopes of one (bulk-like) command
    let b5 = row("b", 5, 1);
    let mut tx = db.index.begin().await.unwrap();
    tx.record(1, &[a1.clone(), a2.clone(), b5.clone()]).await.unwrap();
    tx.commit().await.unwrap();
    let mut tx = db.index.begin().await.unwrap();
    let keys = [AggregateKey::database("a"), AggregateKey::database("b"), AggregateKey::database("c")];
    let request = LookupRequest {
        command_ids: vec![a1.command_id, Uuid::new_v4()],
        event_ids: vec![b5.event_id],
        command_keys: keys.to_vec(),
        outcome_keys: keys.to_vec(),
    };
    let found = tx.lookup(&request).await.unwrap();
    assert_eq!(found.rows, vec![a1.clone(), a2, b5.clone()]);
    assert_eq!(found.versions.get(&keys[0]), Some(&2));
    assert_eq!(found.versions.get(&keys[1]), Some(&5));
    assert_eq!(found.versions.get(&keys[2]).copied().unwrap_or(0), 0);
    assert!(found.outcomes.is_empty(), "no domain rows yet");
    // Versions only rise: recording an older sequence (a repair of an old segment) keeps 5.
    tx.record(2, &[row("b", 3, 2)]).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(db.index.version(&keys[1]).await.unwrap(), 5);
    assert_eq!(db.index.command(a1.command_id).await.unwrap().len(), 2);
    // Outcomes: kind domain, separate from the command sequence.
    let mut outcome = row("b", 6, 3);
    outcome.kind = Kind::Domain;
    outcome.command_id = b5.command_id;
    let mut tx = db.index.begin().await.unwrap();
    tx.record(3, &[outcome.clone()]).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(db.index.version(&keys[1]).await.unwrap(), 5, "outcomes do not move the version");
    assert_eq!(db.index.last(&keys[1], Kind::Domain).await.unwrap(), Some((6, 3)));
    assert_eq!(db.index.outcomes(b5.command_id).await.unwrap(), vec![outcome]);
    let mut tx = db.index.begin().await.unwrap();
    let found = tx
        .lookup(&LookupRequest { outcome_keys: keys.to_vec(), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(found.outcomes.get(&keys[1]), Some(&6));
    drop(tx);
    let prefixed = db.index.aggregates_with_prefix(spiced::domain::AggregateType::Database, "a").await.unwrap();
    assert_eq!(prefixed, vec!["a".to_string()]);
    // Classes of one database: ':' ends the prefix, '_' is an ordinary character.
    let class = |id: &str, position| IndexRow { key: AggregateKey::new(spiced::domain::AggregateType::OntologyClass, id.into()), ..row("unused", 1, position) };
    let mut tx = db.index.begin().await.unwrap();
    tx.record(4, &[class("x:main:A", 4), class("x:dev:B", 4), class("xy:main:C", 4), class("x_:main:D", 4), class("x;:main:E", 4)]).await.unwrap();
    tx.commit().await.unwrap();
    let of_x = db.index.aggregates_with_prefix(spiced::domain::AggregateType::OntologyClass, "x:").await.unwrap();
    assert_eq!(of_x, vec!["x:dev:B".to_string(), "x:main:A".to_string()]);
}

async fn recording_the_wrong_position_is_refused(backend: Backend) {
    let (db, _dir) = open(backend).await;
    let mut tx = db.index.begin().await.unwrap();
    let err = tx.record(5, &[row("a", 1, 5)]).await.unwrap_err();
    assert!(matches!(err, DbError::Inconsistent(_)), "{err}");
}

/// `begin_lookup` and `record_and_commit` (one round trip each on PostgreSQL): the same
/// answers as the separate steps; a failing write (a wrong position, a taken sequence) records
/// nothing and leaves the head lock free.
async fn the_writers_combined_steps_do_what_the_separate_ones_do(backend: Backend) {
    let (db, _dir) = open(backend).await;
    let a1 = row("a", 1, 1);
    let (tx, found) = db.index.begin_lookup(&LookupRequest { command_ids: vec![a1.command_id], ..Default::default() }).await.unwrap();
    assert_eq!((tx.next_position(), found.rows.len()), (1, 0));
    tx.record_and_commit(1, std::slice::from_ref(&a1)).await.unwrap();
    let key = AggregateKey::database("a");
    let request = LookupRequest { command_ids: vec![a1.command_id], command_keys: vec![key.clone()], ..Default::default() };
    let (tx, found) = db.index.begin_lookup(&request).await.unwrap();
    assert_eq!((tx.next_position(), found.rows, found.versions.get(&key)), (2, vec![a1.clone()], Some(&1)));
    let err = tx.record_and_commit(5, &[row("b", 1, 5)]).await.unwrap_err();
    assert!(err.to_string().contains("not at position 5 - 1"), "{err}");
    // The cause, not the "transaction aborted" that the server answers each later statement
    // of the pipeline with, however the answers happen to be polled.
    for _ in 0..20 {
        let (tx, _) = db.index.begin_lookup(&request).await.unwrap();
        let err = tx.record_and_commit(5, &[row("b", 1, 5)]).await.unwrap_err();
        assert!(err.to_string().contains("not at position 5 - 1"), "{err}");
    }
    let (tx, _) = db.index.begin_lookup(&LookupRequest::default()).await.unwrap();
    assert!(tx.record_and_commit(2, &[row("a", 1, 2)]).await.is_err(), "(aggregate, kind, seq) taken twice");
    assert_eq!(db.index.head().await.unwrap(), 1, "nothing recorded by the failed batches");
    assert_eq!(db.index.all_rows().await.unwrap(), vec![a1]);
    let (tx, _) = db.index.begin_lookup(&LookupRequest::default()).await.unwrap();
    tx.record_and_commit(2, &[row("a", 2, 2)]).await.unwrap();
    assert_eq!(db.index.version(&key).await.unwrap(), 2);
}

/// The relay's lag in events: envelopes, not segments, after the position.
async fn events_after_counts_the_envelopes_past_a_position(backend: Backend) {
    let (db, _dir) = open(backend).await;
    assert_eq!(db.index.events_after(0).await.unwrap(), 0);
    for (position, rows) in [(1, vec![row("a", 1, 1)]), (2, vec![row("b", 1, 2), row("c", 1, 2), row("d", 1, 2)]), (3, vec![row("a", 2, 3)])] {
        let mut tx = db.index.begin().await.unwrap();
        tx.record(position, &rows).await.unwrap();
        tx.commit().await.unwrap();
    }
    let counts: Vec<u64> = futures::future::join_all((0..=3).map(|p| db.index.events_after(p)))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(counts, [5, 4, 1, 0]);
}

/// The writer's version look-up stays an index scan however much `aggregate_versions` grew
/// after its statement was first planned. A generic plan cached while the table was empty
/// (as on a fresh database) became a hash join over a full scan, run on every batch: 2.4x
/// fewer commands/s. The pool's connections plan every execution with the table as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_lookup_uses_the_index_on_a_grown_table() {
    let (config, _dir) = isolated_config(Backend::S3Postgres).await;
    let db = Database::open(&config.database).await.unwrap();
    db.migrate().await.unwrap();
    let client = db.postgres().unwrap().pool().get().await.unwrap();
    client
        .batch_execute(&format!("PREPARE versions(text[], text[]) AS {}", spiced::db::postgres::SELECT_VERSIONS))
        .await
        .unwrap();
    let execute = "EXECUTE versions(ARRAY['Instance','Instance','Instance'], ARRAY['i7','i70','i700'])";
    // More than the five runs after which PostgreSQL may settle on a generic plan.
    for _ in 0..8 {
        client.query(execute, &[]).await.unwrap();
    }
    client
        .batch_execute(
            "INSERT INTO aggregate_versions (aggregate_type, aggregate_id, last_seq) \
             SELECT 'Instance', 'i' || g, 1 FROM generate_series(1, 200000) g",
        )
        .await
        .unwrap();
    let plan: Vec<String> =
        client.query(&format!("EXPLAIN {execute}"), &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    let plan = plan.join("\n");
    assert!(!plan.contains("Seq Scan on aggregate_versions"), "a full scan per batch:\n{plan}");
    assert!(plan.contains("aggregate_versions_pkey"), "the look-up uses the primary key:\n{plan}");
    assert_eq!(client.query(execute, &[]).await.unwrap().len(), 3);
}

/// The pipelined commit's steps (PostgreSQL; SQLite writes one batch at a time): positions
/// are handed out past every reservation, a reservation is visible with what it holds until
/// its publish, and publishes take effect only in position order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_are_published_in_position_order() {
    use spiced::db::Published;
    let (db, _dir) = open(Backend::S3Postgres).await;
    let steps = db.index.reservations().expect("PostgreSQL has the pipelined commit");
    let (a, b) = (AggregateKey::database("a"), AggregateKey::database("b"));
    let (first, second) = (row("a", 1, 1), row("b", 1, 2));
    let lease = Duration::from_secs(60);
    let (tx, found, open) = steps.begin_reserve(&LookupRequest { command_keys: vec![a.clone()], ..Default::default() }).await.unwrap();
    assert_eq!((tx.position(), found.versions.get(&a), open.len()), (1, None, 0));
    tx.reserve("writer-1", lease, &[first.command_id], std::slice::from_ref(&a)).await.unwrap();
    let (tx, _, open) = steps.begin_reserve(&LookupRequest::default()).await.unwrap();
    assert_eq!(tx.position(), 2, "past the reservation, not the head");
    assert_eq!(open.len(), 1);
    assert_eq!((open[0].position, open[0].owner.as_str(), open[0].expired), (1, "writer-1", false));
    assert_eq!((open[0].command_ids.clone(), open[0].keys.clone()), (vec![first.command_id], vec![a.clone()]));
    tx.reserve("writer-2", lease, &[second.command_id], std::slice::from_ref(&b)).await.unwrap();
    // A rolled-back reservation hands out nothing.
    let (tx, _, _) = steps.begin_reserve(&LookupRequest::default()).await.unwrap();
    assert_eq!(tx.position(), 3);
    tx.rollback().await.unwrap();

    assert_eq!(steps.publish(2, std::slice::from_ref(&second)).await.unwrap(), Published::HeadAt(0), "2 waits for 1");
    assert_eq!((db.index.head().await.unwrap(), db.index.version(&b).await.unwrap()), (0, 0), "nothing changed");
    assert_eq!(steps.publish(1, std::slice::from_ref(&first)).await.unwrap(), Published::Now);
    assert_eq!((db.index.head().await.unwrap(), db.index.version(&a).await.unwrap()), (1, 1));
    let open = steps.open_reservations().await.unwrap();
    assert_eq!(open.iter().map(|r| r.position).collect::<Vec<_>>(), vec![2], "a publish deletes its reservation");
    assert_eq!(steps.publish(2, std::slice::from_ref(&second)).await.unwrap(), Published::Now);
    assert_eq!(steps.publish(2, std::slice::from_ref(&second)).await.unwrap(), Published::HeadAt(2), "published once");
    assert_eq!(db.index.all_rows().await.unwrap(), vec![first, second]);
    assert!(steps.open_reservations().await.unwrap().is_empty());
    let (tx, _, _) = steps.begin_reserve(&LookupRequest::default()).await.unwrap();
    assert_eq!(tx.position(), 3);
    drop(tx);
    // The serial steps work once nothing is reserved, and the next reservation is past their
    // head; while a position is reserved, a serial batch is refused (it would not defer).
    let mut tx = db.index.begin().await.unwrap();
    tx.record(3, &[row("c", 1, 3)]).await.unwrap();
    tx.commit().await.unwrap();
    let (tx, _, _) = steps.begin_reserve(&LookupRequest::default()).await.unwrap();
    assert_eq!(tx.position(), 4);
    tx.reserve("writer-3", lease, &[], &[]).await.unwrap();
    let refused = db.index.begin().await.err().expect("a serial batch while 4 is reserved");
    assert!(refused.to_string().contains("writer.max_in_flight"), "{refused}");
    assert!(db.index.begin_lookup(&LookupRequest::default()).await.is_err());
}

/// A void segment publishes with no rows: the head moves alone and the reservation's ids and
/// aggregates are free. A publish that would take a sequence twice records nothing. A lease
/// passes by the server's clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_void_moves_the_head_alone_and_a_bad_publish_changes_nothing() {
    use spiced::db::Published;
    let (db, _dir) = open(Backend::S3Postgres).await;
    let steps = db.index.reservations().unwrap();
    let a = AggregateKey::database("a");
    let (tx, _, _) = steps.begin_reserve(&LookupRequest::default()).await.unwrap();
    tx.reserve("gone", Duration::ZERO, &[Uuid::new_v4()], std::slice::from_ref(&a)).await.unwrap();
    let open = steps.open_reservations().await.unwrap();
    assert!(open[0].expired, "a lease of zero has passed by the next statement");
    assert_eq!(steps.publish(1, &[]).await.unwrap(), Published::Now);
    assert_eq!((db.index.head().await.unwrap(), db.index.version(&a).await.unwrap()), (1, 0));
    assert!(steps.open_reservations().await.unwrap().is_empty());
    assert_eq!(steps.publish(2, &[row("a", 1, 2)]).await.unwrap(), Published::Now);
    let err = steps.publish(3, &[row("b", 1, 3), row("a", 1, 3)]).await.unwrap_err();
    assert!(err.to_string().contains("duplicate key"), "{err}");
    assert_eq!(db.index.head().await.unwrap(), 2);
    assert_eq!(db.index.version(&AggregateKey::database("b")).await.unwrap(), 0);
}
