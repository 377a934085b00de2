//! The read models and the query API, on both backends.

mod common;

use common::{isolated_config, spawn_dev, Backend, TestApp};
use serde_json::{json, Value};
use spiced::db::read::{Change, Page, Progress, ReadBatch, ReadKind, ReadRow, ReadSchema};
use spiced::db::Database;
use std::collections::HashSet;
use std::time::{Duration, Instant};
use uuid::Uuid;

backend_tests! {
    read_models_follow_the_log,
    versioned_rows_converge_whatever_the_order,
}

const WAIT: Duration = Duration::from_secs(60);

/// Waits until the projection has applied the whole log.
async fn caught_up(app: &TestApp) {
    let (db, _) = app.storage().await;
    let head = db.index.head().await.unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let r = app.http.get(app.url("/databases")).send().await.unwrap();
        let position: u64 = r.headers()["x-spiced-projection-position"].to_str().unwrap().parse().unwrap();
        if position >= head {
            return;
        }
        assert!(Instant::now() < deadline, "projection at {position}, log at {head}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn done(app: &TestApp, (s, b): (u16, Value)) {
    assert_eq!(s, 202, "{b}");
    let status = app.wait_command(b["command_id"].as_str().unwrap(), WAIT).await;
    assert!(status["status"] == "COMPLETED", "{status}");
}

async fn read_models_follow_the_log(backend: Backend) {
    let app = spawn_dev(backend).await;
    done(&app, app.post("/databases", json!({"name": "shop", "description": "d"})).await).await;
    done(&app, app.post("/databases/shop/classes", json!({"id": "Item", "label": "Items", "properties": [{"name": "n", "type": "integer"}]})).await).await;
    let instances: Vec<Value> = (0..30).map(|i| json!({"id": format!("i{i:02}"), "data": {"n": i}})).collect();
    done(&app, app.post("/databases/shop/classes/Item/instances/bulk", json!({"instances": instances})).await).await;
    done(&app, app.put("/databases/shop/classes/Item/instances/i03?expected_seq=1", json!({"data": {"n": 300}})).await).await;
    done(&app, app.delete("/databases/shop/classes/Item/instances/i04?expected_seq=1").await).await;
    caught_up(&app).await;

    // Every live instance exactly once through pages of 7; the deleted one is gone.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let url = match &cursor {
            Some(c) => format!("/databases/shop/classes/Item/instances?limit=7&cursor={c}"),
            None => "/databases/shop/classes/Item/instances?limit=7".to_string(),
        };
        let (s, page) = app.get(&url).await;
        assert_eq!(s, 200, "{page}");
        seen.extend(page["items"].as_array().unwrap().iter().map(|i| i["instance_id"].as_str().unwrap().to_string()));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!((seen.len(), unique.len()), (29, 29), "{seen:?}");
    assert!(!seen.contains(&"i04".to_string()));

    let (s, item) = app.get("/databases/shop/classes/Item/instances/i03").await;
    assert_eq!(s, 200);
    assert_eq!((item["data"]["n"].as_i64(), item["version"].as_u64()), (Some(300), Some(2)), "{item}");
    let (s, _) = app.get("/databases/shop/classes/Item/instances/i04").await;
    assert_eq!(s, 404);
    let (_, class) = app.get("/databases/shop/classes/Item").await;
    assert_eq!((class["label"].as_str(), class["version"].as_u64()), (Some("Items"), Some(1)));
    let (_, classes) = app.get("/databases/shop/classes").await;
    assert_eq!(classes["items"].as_array().unwrap().len(), 1);
    let (_, db) = app.get("/databases/shop").await;
    assert_eq!(db["description"], "d");
    let (s, e) = app.get("/databases/shop/classes/Item/instances?limit=5000").await;
    assert_eq!((s, e["error"].as_str()), (400, Some("invalid_query")));
}

fn change(key: &str, version: u64, position: u64, n: i64, deleted: bool) -> Change {
    let kind = if key.contains(':') { ReadKind::Instance } else { ReadKind::Database };
    Change {
        event_id: Uuid::new_v4(),
        cascade: kind == ReadKind::Database && deleted,
        row: ReadRow {
            kind,
            key: key.into(),
            parent: key.rsplit_once(':').map(|(p, _)| p.to_string()).unwrap_or_default(),
            db: key.split(':').next().unwrap().into(),
            state: (!deleted).then(|| json!({"data": {"n": n}})),
            version,
            position,
            deleted,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
        },
    }
}

/// Batches as Kafka delivers them: any order across partitions, duplicates included.
async fn versioned_rows_converge_whatever_the_order(backend: Backend) {
    let (config, _dir) = isolated_config(backend).await;
    let db = Database::open(&config.database).await.unwrap();
    db.migrate().await.unwrap();
    let live = ReadSchema::live();
    let apply = |changes: Vec<Change>, partition: i32, position: u64| {
        let db = db.clone();
        let live = live.clone();
        async move {
            let progress = Progress::Kafka(vec![("t".into(), partition, position)]);
            db.apply_read_batch(&live, &ReadBatch { changes, progress }).await.unwrap()
        }
    };
    let key = "d:main:C:x";
    let second = change(key, 2, 20, 20, false);
    apply(vec![change("d", 1, 1, 0, false)], 0, 1).await;
    apply(vec![second.clone()], 1, 20).await;
    apply(vec![change(key, 1, 10, 10, false)], 1, 10).await; // older, delivered late: ignored
    apply(vec![second.clone()], 1, 20).await; // the same event again: claimed already
    let r = db.read_one(ReadKind::Instance, key).await.unwrap().unwrap();
    assert_eq!((r.version, r.state.unwrap()["data"]["n"].as_i64()), (2, Some(20)));
    assert_eq!(db.projection_position().await.unwrap(), 1, "the lowest partition position");
    apply(vec![change(key, 3, 30, 0, true)], 1, 30).await;
    assert!(db.read_one(ReadKind::Instance, key).await.unwrap().unwrap().deleted);

    // The database is deleted at position 50: what was written under it before goes, and
    // an older event arriving afterwards on another partition does not bring it back.
    apply(vec![change("d:main:C:y", 1, 40, 1, false)], 1, 40).await;
    apply(vec![change("d", 2, 50, 0, true)], 0, 50).await;
    apply(vec![change("d:main:C:z", 1, 45, 1, false)], 2, 45).await;
    let page = Page { kind: ReadKind::Instance, parent: "d:main:C", after: None, limit: 10, filter: &[] };
    assert!(db.read_page(&page).await.unwrap().is_empty());
    assert!(db.read_one(ReadKind::Instance, "d:main:C:y").await.unwrap().is_none());
    // Written after the deletion: kept.
    apply(vec![change("d", 3, 60, 0, false), change("d:main:C:w", 1, 61, 1, false)], 0, 61).await;
    let keys: Vec<String> = db.read_page(&page).await.unwrap().into_iter().map(|r| r.key).collect();
    assert_eq!(keys, ["d:main:C:w"]);
    assert_eq!(db.projection_position().await.unwrap(), 40, "partition 1 is the lowest");
}
