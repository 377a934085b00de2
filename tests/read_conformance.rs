//! One conformance suite for the read store ([`ReadStore`]), run against PostgreSQL and SQLite:
//! each test takes the store as `&dyn ReadStore`, so a third backend is one more line in
//! `backend_tests!`. Refused content (savepoints, `projection_failures`) is held to the same
//! behaviour by `tests/projection_failures.rs`, whose refusals need backend-specific triggers.

mod common;

use common::readmodel::change;
use common::{isolated_config, Backend};
use futures::future::BoxFuture;
use spiced::db::read::filter;
use spiced::db::read::sort::{Sort, BY_ID};
use spiced::db::read::Reference;
use spiced::db::read::{Change, Page, Progress, ReadBatch, ReadKind, ReadSchema, ReadStore};
use spiced::db::{Database, DbError};
use std::collections::HashMap;

backend_tests! {
    versioned_rows_converge_whatever_the_order,
    a_log_batch_applies_once_and_moves_the_position,
    pages_follow_keys_and_filters,
    sorted_pages_resume_after_the_cursor_row,
    references_are_found_by_class_property_and_value,
    references_that_give_way_are_released_in_any_order,
    a_swap_catches_the_target_up_and_exchanges_the_names,
}

async fn open(backend: Backend) -> (Database, tempfile::TempDir) {
    let (config, dir) = isolated_config(backend).await;
    let db = Database::open(&config.database).await.unwrap();
    db.migrate().await.unwrap();
    (db, dir)
}

fn log_batch(changes: Vec<Change>, to: u64) -> ReadBatch {
    ReadBatch { changes, progress: Progress::Log { to } }
}

fn page<'a>(parent: &'a str, after: Option<&'a str>, limit: usize, filter: &'a [filter::Group]) -> Page<'a> {
    Page { kind: ReadKind::Instance, parent, after, limit, filter, sort: &BY_ID, after_values: &[], max_ranked: u64::MAX }
}

async fn keys(store: &dyn ReadStore, page: &Page<'_>) -> Vec<String> {
    store.page(page).await.unwrap().rows.into_iter().map(|r| r.key).collect()
}

/// Batches as Kafka delivers them: any order across partitions, duplicates included.
async fn versioned_rows_converge_whatever_the_order(backend: Backend) {
    let (db, _dir) = open(backend).await;
    let store: &dyn ReadStore = db.read.as_ref();
    let live = ReadSchema::live();
    let apply = |changes: Vec<Change>, partition: i32, position: u64| {
        let live = live.clone();
        async move {
            let progress = Progress::Kafka(vec![("t".into(), partition, position)]);
            store.apply(&live, &ReadBatch { changes, progress }).await.unwrap()
        }
    };
    let key = "d:main:C:x";
    let second = change(key, 2, 20, 20, false);
    apply(vec![change("d", 1, 1, 0, false)], 0, 1).await;
    apply(vec![second.clone()], 1, 20).await;
    apply(vec![change(key, 1, 10, 10, false)], 1, 10).await; // older, delivered late: ignored
    apply(vec![second.clone()], 1, 20).await; // the same event again: claimed already
    let r = store.one(ReadKind::Instance, key).await.unwrap().rows.remove(0);
    assert_eq!((r.version, r.state.unwrap()["data"]["n"].as_i64()), (2, Some(20)));
    assert_eq!(store.live_position().await.unwrap(), 1, "the lowest partition position");
    apply(vec![change(key, 3, 30, 0, true)], 1, 30).await;
    assert!(store.one(ReadKind::Instance, key).await.unwrap().rows.remove(0).deleted);

    // The database is deleted at position 50: what was written under it before goes, and
    // an older event arriving afterwards on another partition does not bring it back.
    apply(vec![change("d:main:C:y", 1, 40, 1, false)], 1, 40).await;
    apply(vec![change("d", 2, 50, 0, true)], 0, 50).await;
    apply(vec![change("d:main:C:z", 1, 45, 1, false)], 2, 45).await;
    let all = page("d:main:C", None, 10, &[]);
    assert!(store.page(&all).await.unwrap().rows.is_empty());
    assert!(store.one(ReadKind::Instance, "d:main:C:y").await.unwrap().rows.is_empty());
    // Written after the deletion: kept.
    apply(vec![change("d", 3, 60, 0, false), change("d:main:C:w", 1, 61, 1, false)], 0, 61).await;
    assert_eq!(keys(store, &all).await, ["d:main:C:w"]);
    assert_eq!(store.live_position().await.unwrap(), 40, "partition 1 is the lowest");
}

/// Following the log: a batch moves the position to its end, and the part of a later batch
/// at or below the position is skipped, whatever it holds.
async fn a_log_batch_applies_once_and_moves_the_position(backend: Backend) {
    let (db, _dir) = open(backend).await;
    let store: &dyn ReadStore = db.read.as_ref();
    let live = ReadSchema::live();
    assert_eq!(store.position(&live).await.unwrap(), 0);
    let snapshot = store.one(ReadKind::Instance, "d:main:C:a").await.unwrap();
    assert_eq!((snapshot.position, snapshot.rows.len()), (0, 0), "no row yet, at position 0");

    let applied = store.apply(&live, &log_batch(vec![change("d", 1, 1, 0, false), change("d:main:C:a", 1, 2, 1, false)], 3)).await.unwrap();
    assert_eq!((applied.position, applied.refused.len()), (3, 0));
    // Positions 1..=3 again, with other content: already applied, so nothing changes.
    let again = store.apply(&live, &log_batch(vec![change("d:main:C:a", 2, 2, 99, false)], 3)).await.unwrap();
    assert_eq!(again.position, 3);
    let a = store.one(ReadKind::Instance, "d:main:C:a").await.unwrap();
    assert_eq!((a.position, a.rows[0].version, a.rows[0].state.as_ref().unwrap()["data"]["n"].as_i64()), (3, 1, Some(1)));
    // A batch reaching past the position applies only what lies beyond it.
    let overlap = vec![change("d:main:C:a", 2, 3, 99, false), change("d:main:C:b", 1, 5, 5, false)];
    assert_eq!(store.apply(&live, &log_batch(overlap, 5)).await.unwrap().position, 5);
    assert_eq!(store.one(ReadKind::Instance, "d:main:C:a").await.unwrap().rows[0].version, 1);
    assert_eq!(keys(store, &page("d:main:C", None, 10, &[])).await, ["d:main:C:a", "d:main:C:b"]);
    assert_eq!(store.live_position().await.unwrap(), 5);
}

/// Keyset pages in byte order after a cursor, with typed filters on the data.
async fn pages_follow_keys_and_filters(backend: Backend) {
    let (db, _dir) = open(backend).await;
    let store: &dyn ReadStore = db.read.as_ref();
    let mut changes = vec![change("d", 1, 1, 0, false)];
    changes.extend((0..12).map(|i| change(&format!("d:main:C:i{i:02}"), 1, 2 + i, i as i64, false)));
    changes.push(change("d:main:D:other", 1, 20, 100, false));
    store.apply(&ReadSchema::live(), &log_batch(changes, 20)).await.unwrap();

    let first = keys(store, &page("d:main:C", None, 5, &[])).await;
    assert_eq!(first, ["d:main:C:i00", "d:main:C:i01", "d:main:C:i02", "d:main:C:i03", "d:main:C:i04"]);
    let next = keys(store, &page("d:main:C", Some("d:main:C:i04"), 5, &[])).await;
    assert_eq!(next.first().map(String::as_str), Some("d:main:C:i05"));
    assert_eq!(keys(store, &page("d:main:C", Some("d:main:C:i09"), 5, &[])).await.len(), 2);

    let properties: HashMap<String, String> = [("n".to_string(), "integer".to_string())].into();
    let cases: [(&str, Vec<i64>); 7] = [
        ("n>=9", vec![9, 10, 11]),
        ("n=in:(1|3|40)", vec![1, 3]),
        ("n!=0,n<3", vec![1, 2]),
        ("n=exists:false", vec![]),
        ("(n=1|n=11|n>100)", vec![1, 11]),
        ("n=not_in:(0|1|2|3|4|5|6|7|8|9)", vec![10, 11]),
        ("(n<2|n>9),n!=0", vec![1, 10, 11]),
    ];
    for (text, want) in cases {
        let conditions = filter::parse(text, &properties).unwrap();
        let found = store.page(&page("d:main:C", None, 50, &conditions)).await.unwrap();
        let ns: Vec<i64> = found.rows.iter().map(|r| r.state.as_ref().unwrap()["data"]["n"].as_i64().unwrap()).collect();
        assert_eq!((ns, found.position), (want, 20), "{text}");
    }

    // Counts: the filter's rows under the parent, whatever the cursor and limit, stopping at
    // bound + 1.
    let from_nine = filter::parse("n>=9", &properties).unwrap();
    assert_eq!(store.count(&page("d:main:C", Some("d:main:C:i10"), 1, &from_nine), 100).await.unwrap(), 3);
    assert_eq!(store.count(&page("d:main:C", None, 1, &[]), 100).await.unwrap(), 12);
    assert_eq!(store.count(&page("d:main:C", None, 1, &[]), 5).await.unwrap(), 6, "stops at bound + 1");
    assert_eq!(store.count(&page("d:main:D", None, 1, &from_nine), 100).await.unwrap(), 1);
}

/// A sorted page resumes strictly after the row its cursor names (its sort values and key),
/// ties broken by key in the sort's id direction.
async fn sorted_pages_resume_after_the_cursor_row(backend: Backend) {
    let (db, _dir) = open(backend).await;
    let store: &dyn ReadStore = db.read.as_ref();
    let ns = [3, 1, 2, 1, 3, 2];
    let changes = ns.iter().enumerate().map(|(i, n)| change(&format!("d:main:C:r{i}"), 1, 1 + i as u64, *n, false)).collect();
    store.apply(&ReadSchema::live(), &log_batch(changes, 6)).await.unwrap();
    let properties: HashMap<String, String> = [("n".to_string(), "integer".to_string())].into();
    for (text, want) in [("-n", "r0 r4 r2 r5 r1 r3"), ("n,-id", "r3 r1 r5 r2 r4 r0")] {
        let sort = Sort::parse(text, &properties).unwrap();
        let mut seen = Vec::new();
        let mut after: Option<(String, Vec<serde_json::Value>)> = None;
        loop {
            let (key, values) = after.clone().unzip();
            let values = values.unwrap_or_default();
            let page = Page { kind: ReadKind::Instance, parent: "d:main:C", after: key.as_deref(), limit: 4, filter: &[], sort: &sort, after_values: &values, max_ranked: u64::MAX };
            let rows = store.page(&page).await.unwrap().rows;
            seen.extend(rows.iter().map(|r| r.key.rsplit(':').next().unwrap().to_string()));
            match rows.last().filter(|_| rows.len() == 4) {
                Some(last) => after = Some((last.key.clone(), sort.values_of(last.state.as_ref()))),
                None => break,
            }
        }
        assert_eq!(seen.join(" "), want, "sort={text}");
    }
}

/// A referrer's outcome noting `gives_way`, and its target's deletion noting `released`: the
/// row ends without the reference whichever is applied first, in one batch or two, and keeps
/// what does not give way.
async fn references_that_give_way_are_released_in_any_order(backend: Backend) {
    let (db, _dir) = open(backend).await;
    let store: &dyn ReadStore = db.read.as_ref();
    let live = ReadSchema::live();
    let referrer = |key: &str, target: &str| {
        let mut c = change(key, 1, 10, 0, false);
        c.row.state = Some(serde_json::json!({"data": {"owner": target, "watchers": ["y", target], "keep": target}}));
        c.gives_way = vec![("owner".into(), "P".into()), ("watchers".into(), "P".into())];
        c
    };
    let deletion = |key: &str| {
        let mut c = change(key, 2, 20, 0, true);
        c.released = vec![("O".into(), "owner".into()), ("O".into(), "watchers".into())];
        c
    };
    let apply = |changes: Vec<Change>| {
        let live = live.clone();
        async move { store.apply(&live, &ReadBatch { changes, progress: Progress::Kafka(vec![]) }).await.unwrap() }
    };
    apply(vec![change("n", 1, 1, 0, false)]).await;
    // Referrer first, deletion later; deletion first, referrer later; both in one batch.
    apply(vec![referrer("n:main:O:a", "x1")]).await;
    apply(vec![deletion("n:main:P:x1")]).await;
    apply(vec![deletion("n:main:P:x2")]).await;
    apply(vec![referrer("n:main:O:b", "x2")]).await;
    apply(vec![deletion("n:main:P:x3"), referrer("n:main:O:c", "x3")]).await;
    // A target that is not deleted stays named.
    apply(vec![referrer("n:main:O:d", "x4")]).await;
    for (key, target, released) in [("n:main:O:a", "x1", true), ("n:main:O:b", "x2", true), ("n:main:O:c", "x3", true), ("n:main:O:d", "x4", false)] {
        let row = store.one(ReadKind::Instance, key).await.unwrap().rows.remove(0);
        let want = match released {
            true => serde_json::json!({"watchers": ["y"], "keep": target}),
            false => serde_json::json!({"owner": target, "watchers": ["y", target], "keep": target}),
        };
        assert_eq!(row.state.unwrap()["data"], want, "{key}");
    }
}

/// `referencing`: the live instances of the named classes whose named property holds the id,
/// in key order after the cursor; another property, class, value or a deleted row does not
/// count.
async fn references_are_found_by_class_property_and_value(backend: Backend) {
    let (db, _dir) = open(backend).await;
    let store: &dyn ReadStore = db.read.as_ref();
    let row = |key: &str, position: u64, data: serde_json::Value, deleted: bool| {
        let mut c = change(key, 1, position, 0, deleted);
        if !deleted {
            c.row.state = Some(serde_json::json!({"data": data}));
        }
        c
    };
    let changes = vec![
        row("d:main:P:a", 1, serde_json::json!({"boss": "x"}), false),
        row("d:main:P:b", 2, serde_json::json!({"boss": "y"}), false),
        row("d:main:P:c", 3, serde_json::json!({"mentor": "x"}), false),
        row("d:main:Q:d", 4, serde_json::json!({"owner": "x"}), false),
        row("d:main:Q:e", 5, serde_json::json!({"boss": "x"}), false),
        row("d:main:P:f", 6, serde_json::Value::Null, true),
        row("d:main:P:g", 7, serde_json::json!({"boss": "x"}), false),
        row("d:main:Q:h", 8, serde_json::json!({"tags": ["w", "x"]}), false),
        row("d:main:Q:i", 9, serde_json::json!({"tags": "x"}), false),
    ];
    store.apply(&ReadSchema::live(), &log_batch(changes, 9)).await.unwrap();
    let refs = [
        Reference { parent: "d:main:P".into(), property: "boss".into(), many: false },
        Reference { parent: "d:main:P".into(), property: "mentor".into(), many: false },
        Reference { parent: "d:main:Q".into(), property: "owner".into(), many: false },
        Reference { parent: "d:main:Q".into(), property: "tags".into(), many: true },
    ];
    let keys = |s: spiced::db::read::Snapshot| s.rows.into_iter().map(|r| r.key).collect::<Vec<_>>();
    let all = keys(store.referencing(&refs, "x", None, 10).await.unwrap());
    assert_eq!(all, ["d:main:P:a", "d:main:P:c", "d:main:P:g", "d:main:Q:d", "d:main:Q:h"], "a many-valued property matches an array holding the id, not a lone string");
    let after = keys(store.referencing(&refs, "x", Some("d:main:P:c"), 2).await.unwrap());
    assert_eq!(after, ["d:main:P:g", "d:main:Q:d"]);
    assert!(keys(store.referencing(&[], "x", None, 10).await.unwrap()).is_empty());
}

/// The rebuild's swap: the target is caught up to the log head from its own position, then
/// takes the live name; the old live tables stay under the target's name.
async fn a_swap_catches_the_target_up_and_exchanges_the_names(backend: Backend) {
    let (db, _dir) = open(backend).await;
    let store: &dyn ReadStore = db.read.as_ref();
    let live = ReadSchema::live();
    let target = ReadSchema::named("rebuild_target").unwrap();
    store.apply(&live, &log_batch(vec![change("d", 1, 1, 0, false), change("d:main:C:old", 1, 2, 0, false)], 2)).await.unwrap();
    // The index head the swap catches up to.
    let mut tx = db.index.begin().await.unwrap();
    for position in tx.next_position()..=4 {
        tx.record(position, &[]).await.unwrap();
    }
    tx.commit().await.unwrap();

    assert!(!store.schema_exists(&target).await.unwrap());
    store.create_schema(&target).await.unwrap();
    assert!(store.schema_exists(&target).await.unwrap());
    let taken = store.create_schema(&target).await.unwrap_err();
    assert!(matches!(&taken, DbError::Setup(m) if m.contains("already exists")), "{taken}");
    store.apply(&target, &log_batch(vec![change("d", 1, 1, 0, false), change("d:main:C:new", 1, 2, 2, false)], 2)).await.unwrap();

    let asked = std::sync::Mutex::new(Vec::new());
    let catch_up = |from: u64, to: u64| -> BoxFuture<'_, Result<Vec<ReadBatch>, DbError>> {
        asked.lock().unwrap().push((from, to));
        Box::pin(async move { Ok(vec![log_batch(vec![change("d:main:C:late", 1, 4, 4, false)], to)]) })
    };
    let applied = store.swap(&target, &catch_up).await.unwrap();
    assert_eq!(*asked.lock().unwrap(), [(3, 4)], "from past the target's position to the head");
    assert_eq!((applied.position, store.live_position().await.unwrap()), (4, 4));
    assert_eq!(keys(store, &page("d:main:C", None, 10, &[])).await, ["d:main:C:late", "d:main:C:new"]);
    assert_eq!(store.position(&target).await.unwrap(), 2, "the old live schema, under the target's name");
}

/// PostgreSQL keeps one stored search column (and its GIN index) per text search
/// configuration the config file names: `spiced migrate` adds a new one, filling it for the
/// rows already there, drops one no longer named, and drops the expression index that
/// served searches before the columns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_columns_follow_the_configured_configurations() {
    let (mut config, _dir) = isolated_config(Backend::S3Postgres).await;
    let db = Database::open(&config.database).await.unwrap();
    db.migrate().await.unwrap();
    let mut row = change("shop:main:C:a", 1, 2, 1, false);
    row.row.state = Some(serde_json::json!({"instance_id": "a", "data": {"s": "running shoes"}}));
    db.read.apply(&ReadSchema::live(), &log_batch(vec![change("shop", 1, 1, 0, false), row], 2)).await.unwrap();
    let (client, conn) = tokio_postgres::connect(config.database.url.expose(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    // As an install from before the search columns had it.
    client
        .batch_execute(
            "CREATE INDEX read_models_search_simple ON spiced_read.read_models \
             USING gin (jsonb_to_tsvector('simple'::regconfig, state -> 'data', '[\"string\"]')) WHERE kind = 'instance'",
        )
        .await
        .unwrap();
    let names = |sql: &'static str| {
        let client = &client;
        async move { client.query(sql, &[]).await.unwrap().iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>() }
    };
    let columns = "SELECT attname::text FROM pg_attribute WHERE attrelid = 'spiced_read.read_models'::regclass \
                   AND attname LIKE 'search%' AND NOT attisdropped ORDER BY 1";
    let indexes = "SELECT indexname::text FROM pg_indexes WHERE schemaname = 'spiced_read' \
                   AND indexname LIKE 'read_models_%' AND indexname NOT IN ('read_models_page', 'read_models_db', 'read_models_data', 'read_models_pkey') ORDER BY 1";

    config.database.text_search_by_db.insert("shop".into(), "english".into());
    let both = Database::open(&config.database).await.unwrap();
    both.migrate().await.unwrap();
    assert_eq!(names(columns).await, ["search_english", "search_simple"]);
    assert_eq!(names(indexes).await, ["read_models_text_english", "read_models_text_simple"], "the expression index is gone");
    let stemmed: String = client
        .query_one("SELECT search_english::text FROM spiced_read.read_models WHERE key = 'shop:main:C:a'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stemmed, "'run':1 'shoe':2", "the row already there got its english document");

    config.database.text_search = "english".into();
    config.database.text_search_by_db.clear();
    let english = Database::open(&config.database).await.unwrap();
    english.migrate().await.unwrap();
    assert_eq!(names(columns).await, ["search_english"]);
    assert_eq!(names(indexes).await, ["read_models_text_english"]);
}
