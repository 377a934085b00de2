//! An event the read store refuses never halts the read models: it is recorded in
//! `projection_failures` (metric, `spiced status`, `spiced verify`, `spiced project failures`),
//! the projection applies the events after it, and an operator re-applies it once the cause is
//! fixed. Events are planted in the log behind the API's back (the API refuses such input).
//!
//! What the read store refuses differs: PostgreSQL refuses U+0000 in jsonb, so the permanent
//! poison there is a description with a NUL. SQLite stores JSON as text and keeps a NUL
//! (escaped), so there the test refuses that row with a trigger it never drops. The fixable
//! refusal is a CHECK constraint (PostgreSQL) or a trigger (SQLite) the test adds, then drops.

mod common;

use common::kafka::isolate_topics;
use common::process::{free_port, Spiced};
use common::readmodel::{caught_up, execute};
use common::{isolated_config, plant, spawn_role_dev, spawn_with, Backend, TestApp};
use serde_json::{json, Value};
use spiced::db::read::{Change, Progress, ProjectionFailure, ReadBatch, ReadKind, ReadRow, ReadSchema};
use spiced::ops::verify;
use spiced::project::failures;
use std::time::{Duration, Instant};

backend_tests! {
    the_log_follower_sets_a_refused_event_aside_and_goes_on,
    a_kafka_batch_commits_around_a_refused_change,
}

const WAIT: Duration = Duration::from_secs(120);

/// Refusals the test can lift: versions below 2 of `fixable` and `stale`.
fn refuse_fixable(backend: Backend) -> &'static str {
    match backend {
        Backend::S3Postgres => {
            "ALTER TABLE spiced_read.read_models ADD CONSTRAINT refuse_fixable CHECK (key NOT IN ('fixable', 'stale') OR version >= 2)"
        }
        Backend::LocalSqlite => {
            "CREATE TRIGGER refuse_fixable BEFORE INSERT ON spiced_read__read_models
                 WHEN NEW.key IN ('fixable', 'stale') AND NEW.version < 2
                 BEGIN SELECT RAISE(ABORT, 'refused by the test (fixable)'); END;"
        }
    }
}

fn lift_fixable(backend: Backend) -> &'static str {
    match backend {
        Backend::S3Postgres => "ALTER TABLE spiced_read.read_models DROP CONSTRAINT refuse_fixable",
        Backend::LocalSqlite => "DROP TRIGGER refuse_fixable",
    }
}

/// The permanent poison: a NUL on PostgreSQL; a trigger on SQLite (see the module's doc).
async fn refuse_evil_for_good(app: &TestApp, backend: Backend) {
    if backend == Backend::LocalSqlite {
        let trigger = "CREATE TRIGGER refuse_evil BEFORE INSERT ON spiced_read__read_models WHEN NEW.key = 'evil'
                           BEGIN SELECT RAISE(ABORT, 'refused by the test (evil)'); END;";
        execute(&app.config, trigger).await;
    }
}

async fn done(app: &TestApp, (s, b): (u16, Value)) -> u64 {
    assert_eq!(s, 202, "{b}");
    let status = app.wait_command(b["command_id"].as_str().unwrap(), WAIT).await;
    assert_eq!(status["status"], "COMPLETED", "{status}");
    b["sequence_number"].as_u64().unwrap()
}

async fn recorded(app: &TestApp) -> Vec<ProjectionFailure> {
    let (db, _) = app.storage().await;
    db.read.failures(&ReadSchema::live()).await.unwrap()
}

fn attempts(failures: &[ProjectionFailure]) -> Vec<(String, u32)> {
    let mut a: Vec<(String, u32)> = failures.iter().map(|f| (f.aggregate_id.clone(), f.attempts)).collect();
    a.sort();
    a
}

/// This process's value of a metric sample (other tests in this binary add to counters too).
fn sample(series: &str) -> f64 {
    let text = spiced::telemetry::metrics().render();
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
}

/// `spiced dev` (the projection follows the log): three refused events in one segment, the
/// commands after them applied, then the operator's view and re-application; then a rebuild
/// that passes the poison too.
async fn the_log_follower_sets_a_refused_event_aside_and_goes_on(backend: Backend) {
    let (mut config, dir) = isolated_config(backend).await;
    config.serve.min_version_wait_ms = 5000;
    let app = spawn_role_dev(config, dir).await;
    done(&app, app.post("/databases", json!({"name": "before"})).await).await;
    caught_up(&app, WAIT).await;
    refuse_evil_for_good(&app, backend).await;
    execute(&app.config, refuse_fixable(backend)).await;
    let counted = sample("spiced_projection_failures_total");

    let [evil_command, evil] = plant::database(&app.config, "evil", "a\u{0}b");
    let [fixable_command, fixable] = plant::database(&app.config, "fixable", "fixed later");
    let [stale_command, stale] = plant::database(&app.config, "stale", "outlived");
    plant::segment(&app, &[evil_command, evil.clone(), fixable_command, fixable.clone(), stale_command, stale.clone()]).await;
    // The next write records the planted segment; the events after it reach the read models.
    let seq = done(&app, app.post("/databases", json!({"name": "after", "description": "later"})).await).await;
    done(&app, app.post("/databases/after/classes", json!({"id": "C"})).await).await;
    caught_up(&app, WAIT).await;
    let (s, row) = app.get(&format!("/databases/after?min_version={seq}")).await;
    assert_eq!((s, row["description"].as_str()), (200, Some("later")), "a later event is read, not 425: {row}");
    let (s, _) = app.get("/databases/after/classes/C?min_version=1").await;
    assert_eq!(s, 200);
    for name in ["evil", "fixable", "stale"] {
        let (s, b) = app.get(&format!("/databases/{name}")).await;
        assert_eq!(s, 404, "{name} is missing from the read models: {b}");
    }

    // What the operator sees.
    let failures = recorded(&app).await;
    assert_eq!(attempts(&failures), [("evil".into(), 1), ("fixable".into(), 1), ("stale".into(), 1)], "{failures:?}");
    let evil_failure = failures.iter().find(|f| f.aggregate_id == "evil").unwrap();
    assert_eq!(evil_failure.event_id, evil.event_id);
    let why = if backend == Backend::S3Postgres { "22P05" } else { "refused by the test (evil)" };
    assert!(evil_failure.error.contains(why), "{evil_failure:?}");
    assert!(sample("spiced_projection_failures_total") >= counted + 3.0, "the counter counts refusals");
    let status = spiced::ops::status::read(&app.config).await.unwrap();
    assert_eq!(status.pipeline.projection_refused, Some(3));
    let report = verify::run(&app.config, 1).await.unwrap();
    assert!(report.failed(verify::PROJECTION), "{report:?}");
    assert_eq!(report.violations(), 3, "the refused events are the only findings: {report:?}");

    // Retried before the cause is fixed: each stays, one attempt more.
    let live = ReadSchema::live();
    let retried = failures::retry(&app.config, &live, None).await.unwrap();
    assert_eq!((retried.applied.len(), retried.refused.len()), (0, 3), "{retried:?}");
    assert_eq!(attempts(&recorded(&app).await), [("evil".into(), 2), ("fixable".into(), 2), ("stale".into(), 2)]);

    // A later event of a refused aggregate still applies: the row is a function of the last
    // event, so `stale` is deleted (version 2) although its creation is missing.
    let seq = done(&app, app.delete("/databases/stale?expected_seq=1").await).await;
    assert_eq!(seq, 2);
    let (s, b) = app.get("/databases/stale?min_version=2").await;
    assert_eq!(s, 404, "version 2 (deleted) is applied: {b}");

    // The cause fixed: the fixable ones apply; the late creation of `stale` loses to its
    // deletion (a newer version wins, as for any late event); `evil` stays.
    execute(&app.config, lift_fixable(backend)).await;
    let retried = failures::retry(&app.config, &live, None).await.unwrap();
    let mut applied = retried.applied.clone();
    applied.sort();
    let mut want = vec![fixable.event_id, stale.event_id];
    want.sort();
    assert_eq!((applied, retried.refused.len()), (want, 1), "{retried:?}");
    assert_eq!(attempts(&recorded(&app).await), [("evil".into(), 3)]);
    let (s, row) = app.get("/databases/fixable").await;
    assert_eq!((s, row["description"].as_str(), row["version"].as_u64()), (200, Some("fixed later"), Some(1)), "{row}");
    let (s, _) = app.get("/databases/stale").await;
    assert_eq!(s, 404, "the deletion still wins");
    let retried = failures::retry(&app.config, &live, Some(evil.event_id)).await.unwrap();
    assert_eq!(retried.refused.len(), 1);
    assert_eq!(attempts(&recorded(&app).await), [("evil".into(), 4)]);
    assert!(failures::retry(&app.config, &live, Some(fixable.event_id)).await.is_err(), "no longer recorded");

    // A rebuild passes the poison like the live projection, and the swap exchanges the
    // schemas' failures with the schemas.
    let options = spiced::project::rebuild::Options {
        until: spiced::project::rebuild::Until::Head,
        target: Some("before_rebuild".into()),
        no_swap: false,
    };
    let report = spiced::project::rebuild::run(&app.config, options).await.unwrap();
    let (db, _) = app.storage().await;
    assert_eq!(report.position, db.index.head().await.unwrap(), "{report:?}");
    let old = db.read.failures(&ReadSchema::named("before_rebuild").unwrap()).await.unwrap();
    assert_eq!(attempts(&old), [("evil".into(), 4)], "the previous live schema keeps its list");
    let (s, _) = app.get("/databases/fixable").await;
    assert_eq!(s, 200, "the rebuilt read models hold what the retry applied");
    match backend {
        // jsonb refuses the NUL in the fresh schema too: recorded for it, once.
        Backend::S3Postgres => {
            assert_eq!(report.refused, 1, "{report:?}");
            assert_eq!(attempts(&recorded(&app).await), [("evil".into(), 1)]);
        }
        // The test's trigger is on the old tables only: the rebuilt schema holds `evil`.
        Backend::LocalSqlite => {
            assert_eq!(report.refused, 0, "{report:?}");
            assert!(recorded(&app).await.is_empty());
            let (s, row) = app.get("/databases/evil").await;
            assert_eq!((s, row["description"].as_str()), (200, Some("a\u{0}b")));
        }
    }
}

fn change(key: &str, position: u64) -> Change {
    let database = !key.contains(':');
    Change {
        event_id: uuid::Uuid::new_v4(),
        cascade: false,
        gives_way: Vec::new(),
        released: Vec::new(),
        row: ReadRow {
            kind: if database { ReadKind::Database } else { ReadKind::Instance },
            key: key.into(),
            parent: key.rsplit_once(':').map(|(p, _)| p.to_string()).unwrap_or_default(),
            db: key.split(':').next().unwrap().into(),
            state: Some(json!({"n": position})),
            version: 1,
            position,
            deleted: false,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
        },
    }
}

/// A Kafka batch (claims, partition positions) with a refused change, delivered twice (the
/// second time with the refused event once more): the rest and the progress commit as for any
/// batch, the refused event is recorded once and claimed, so the redelivery changes nothing.
async fn a_kafka_batch_commits_around_a_refused_change(backend: Backend) {
    let (config, _dir) = isolated_config(backend).await;
    let db = spiced::db::Database::open(&config.database).await.unwrap();
    db.migrate().await.unwrap();
    execute(&config, refuse_fixable(backend)).await;
    let bad = change("fixable", 2);
    let changes = vec![change("a", 1), bad.clone(), change("a:main:C:x", 3), bad.clone()];
    let batch = ReadBatch { changes, progress: Progress::Kafka(vec![("t".into(), 0, 3)]) };
    let live = ReadSchema::live();
    let applied = db.read.apply(&live, &batch).await.unwrap();
    assert_eq!(applied.position, 3, "the partition's position, as for a whole batch");
    let refused: Vec<_> = applied.refused.iter().map(|r| (r.event_id, r.position, r.aggregate_id.as_str())).collect();
    assert_eq!(refused, [(bad.event_id, 2, "fixable")], "recorded once although delivered twice");
    for (kind, key) in [(ReadKind::Database, "a"), (ReadKind::Instance, "a:main:C:x")] {
        assert_eq!(db.read.one(kind, key).await.unwrap().rows.len(), 1, "{key} applied");
    }
    assert!(db.read.one(ReadKind::Database, "fixable").await.unwrap().rows.is_empty());
    let claims = db.registry.rows(bad.event_id).await.unwrap();
    assert_eq!(claims.iter().map(|c| (c.handler.as_str(), c.status.as_str())).collect::<Vec<_>>(), [("projection", "done")]);

    let again = db.read.apply(&live, &batch).await.unwrap();
    assert!(again.refused.is_empty(), "claimed: a redelivery changes nothing: {again:?}");
    let failures = db.read.failures(&live).await.unwrap();
    assert_eq!(attempts(&failures), [("fixable".into(), 1)]);
}

/// The Kafka-fed projection as a process (serve, relay, worker, project): the refused event
/// is recorded, the later ones applied, the metric and gauge exported on its operations
/// listener, and the operator's commands as a user runs them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_kafka_projection_sets_a_refused_event_aside_and_goes_on() {
    let (mut config, _storage) = isolated_config(Backend::S3Postgres).await;
    isolate_topics(&mut config);
    let ops = format!("127.0.0.1:{}", free_port());
    config.metrics.project_listen = ops.clone();
    config.serve.min_version_wait_ms = 5000;
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_with(config.clone(), tempfile::tempdir().unwrap()).await;
    let _relay = Spiced::spawn(&["relay"], &config, dir.path(), &[]);
    let _worker = Spiced::spawn(&["worker"], &config, dir.path(), &[]);
    let _project = Spiced::spawn(&["project"], &config, dir.path(), &[]);
    done(&app, app.post("/databases", json!({"name": "before"})).await).await;
    caught_up(&app, WAIT).await;

    let [command, evil] = plant::database(&config, "evil", "a\u{0}b");
    plant::segment(&app, &[command, evil.clone()]).await;
    let seq = done(&app, app.post("/databases", json!({"name": "after", "description": "later"})).await).await;
    let (s, _) = app.post("/databases/after/classes", json!({"id": "C"})).await;
    assert_eq!(s, 202);
    caught_up(&app, WAIT).await;
    let (s, row) = app.get(&format!("/databases/after?min_version={seq}")).await;
    assert_eq!((s, row["description"].as_str()), (200, Some("later")), "{row}");
    let (s, _) = app.get("/databases/after/classes/C?min_version=1").await;
    assert_eq!(s, 200);
    let failures = recorded(&app).await;
    assert_eq!(attempts(&failures), [("evil".into(), 1)], "{failures:?}");
    assert_eq!((failures[0].event_id, failures[0].position), (evil.event_id, failures[0].position));
    assert!(failures[0].error.contains("22P05"), "{failures:?}");

    // The projection's own metrics: the counter at once, the gauge within its export period.
    let http = common::http();
    let deadline = Instant::now() + WAIT;
    loop {
        let text = http.get(format!("http://{ops}/metrics")).send().await.unwrap().text().await.unwrap();
        if text.lines().any(|l| l == "spiced_projection_failures_total 1") && text.lines().any(|l| l == "spiced_projection_failures 1") {
            break;
        }
        assert!(Instant::now() < deadline, "metrics: {text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The operator's commands.
    let run = |args: &[&str]| Spiced::output(args, &config, dir.path());
    let status = run(&["status"]);
    let table = String::from_utf8_lossy(&status.stdout).to_string();
    let row = table.lines().find(|l| l.starts_with("read models: events refused")).unwrap_or_else(|| panic!("{table}"));
    assert_eq!(row.split_whitespace().last(), Some("1"), "{table}");
    let verified = run(&["verify"]);
    let text = String::from_utf8_lossy(&verified.stdout).to_string();
    assert!(!verified.status.success() && text.contains(&evil.event_id.to_string()), "{text}");
    let listed = run(&["project", "failures"]);
    let text = String::from_utf8_lossy(&listed.stdout).to_string();
    assert!(listed.status.success() && text.contains(&evil.event_id.to_string()) && text.contains("attempts 1"), "{text}");
    let retried = run(&["project", "failures", "retry"]);
    assert!(!retried.status.success(), "still refused: a non-zero exit");
    assert!(String::from_utf8_lossy(&retried.stdout).contains("refused  event"), "{retried:?}");
    let listed = String::from_utf8_lossy(&run(&["project", "failures", "list"]).stdout).to_string();
    assert!(listed.contains("attempts 2"), "{listed}");
}
