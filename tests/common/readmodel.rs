//! The read model as a test sees it: a fold of the log (the reference) and the rows of a
//! read-model schema, in the same terms.

use super::{read_whole_log, TestApp};
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use spiced::db::read::{Change, ReadKind, ReadRow};
use uuid::Uuid;
use spiced::config::Config;
use spiced::envelope::Kind;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// What a read-model row must hold, as compared: state, version, position, deleted,
/// created/updated in microseconds.
pub type Rows = BTreeMap<(String, String), (Option<Value>, u64, u64, bool, i64, i64)>;

/// The reference: every outcome event of the log up to `until`, folded in log order.
pub async fn fold(config: &Config, until: u64) -> Rows {
    let log = spiced::log::EventLog::open(&config.log).unwrap();
    let mut rows = Rows::new();
    for (position, e) in read_whole_log(&log).await {
        if position > until || e.kind() != Some(Kind::Domain) {
            continue;
        }
        let kind = match e.aggregate_type.as_str() {
            "Database" => "database",
            "OntologyClass" => "class",
            _ => "instance",
        };
        let state = e.data.get("state").filter(|s| !s.is_null()).cloned();
        let at = e.occurred_at.timestamp_micros();
        let created = rows.get(&(kind.to_string(), e.aggregate_id.clone())).map(|r| r.4).unwrap_or(at);
        let deleted = state.is_none();
        rows.insert((kind.into(), e.aggregate_id.clone()), (state, e.sequence_number.unwrap(), position, deleted, created, at));
    }
    rows
}

pub async fn pg(config: &Config) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(config.database.url.expose(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

/// Runs SQL on the test's database, whichever backend (DDL the test adds or drops while the
/// pipeline runs: SQLite waits for the pipeline's write lock).
pub async fn execute(config: &Config, statement: &str) {
    let url = config.database.url.expose();
    match url.strip_prefix("sqlite://") {
        Some(path) => {
            let conn = rusqlite::Connection::open(path).unwrap();
            conn.busy_timeout(Duration::from_secs(10)).unwrap();
            conn.execute_batch(statement).unwrap();
        }
        None => pg(config).await.batch_execute(statement).await.unwrap(),
    }
}

/// The rows of a read-model schema, in the fold's terms.
pub async fn rows_of(config: &Config, schema: &str) -> Rows {
    let sql = format!("SELECT kind, key, state, version, position, deleted, created_at, updated_at FROM \"{schema}\".read_models");
    let micros = |t: DateTime<Utc>| t.timestamp_micros();
    pg(config)
        .await
        .query(&sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let key = (r.get::<_, String>(0), r.get::<_, String>(1));
            let row = (r.get(2), r.get::<_, i64>(3) as u64, r.get::<_, i64>(4) as u64, r.get(5), micros(r.get(6)), micros(r.get(7)));
            (key, row)
        })
        .collect()
}

pub fn assert_same(got: &Rows, want: &Rows, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: row count");
    for (key, row) in want {
        assert_eq!(got.get(key), Some(row), "{what}: row {key:?}");
    }
}


/// Waits (bounded) until the API's `X-Spiced-Projection-Position` reaches the log head.
pub async fn caught_up(app: &TestApp, timeout: Duration) {
    let (db, _) = app.storage().await;
    let deadline = Instant::now() + timeout;
    loop {
        let head = db.index.head().await.unwrap();
        let r = app.http.get(app.url("/databases")).send().await.unwrap();
        let position: u64 = r.headers()["x-spiced-projection-position"].to_str().unwrap().parse().unwrap();
        if position >= head {
            return;
        }
        assert!(Instant::now() < deadline, "projection at {position}, log head {head}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A change of `key` (an instance when it has a `:`, else a database) to version `version` at
/// log position `position`, its data `{"n": n}`.
pub fn change(key: &str, version: u64, position: u64, n: i64, deleted: bool) -> Change {
    let kind = if key.contains(':') { ReadKind::Instance } else { ReadKind::Database };
    Change {
        event_id: Uuid::new_v4(),
        cascade: kind == ReadKind::Database && deleted,
        gives_way: Vec::new(),
        released: Vec::new(),
        row: ReadRow {
            kind,
            key: key.into(),
            parent: key.rsplit_once(':').map(|(p, _)| p.to_string()).unwrap_or_default(),
            db: key.split(':').next().unwrap().into(),
            state: (!deleted).then(|| json!({"instance_id": key.rsplit(':').next().unwrap(), "data": {"n": n}})),
            version,
            position,
            deleted,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
        },
    }
}
