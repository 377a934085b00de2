//! Input the read store cannot keep is refused at the door: a U+0000 anywhere in a body (keys
//! and values, at any depth, bulk members included), in a `where=` value or in a path segment
//! is a 400 naming the field, and nothing reaches the log. (PostgreSQL refuses NUL in text
//! and jsonb; once such an event was in the log, the read models could never apply it.)

mod common;

use common::{spawn_dev, status_json, Backend, TestApp};
use serde_json::{json, Value};
use std::time::Duration;

backend_tests! {
    a_nul_anywhere_is_refused_and_nothing_is_appended,
}

/// What a hostile request sends.
enum Send {
    Post(&'static str, Value),
    Put(&'static str, Value),
    Get(&'static str),
}

/// One row of the table: the request, and the answer it must get.
struct Case {
    what: &'static str,
    send: Send,
    error: &'static str,
    /// The field the message must name.
    field: &'static str,
}

fn cases() -> Vec<Case> {
    use Send::*;
    let nul = "a\u{0}b";
    vec![
        Case { what: "top-level value", send: Post("/databases", json!({"name": "evil", "description": nul})), error: "invalid_body", field: "description" },
        Case {
            what: "nested value",
            send: Put("/databases/shop/classes/C?expected_seq=1", json!({"patch": {"properties": [{"name": "colour", "type": "string"}, {"name": nul, "type": "string"}]}})),
            error: "invalid_body",
            field: "patch.properties[1].name",
        },
        Case { what: "object key", send: Post("/databases/shop/classes/C/instances", json!({"id": "k", "data": {nul: 1}})), error: "invalid_body", field: "data.a\\0b" },
        Case { what: "array element", send: Post("/databases/shop/classes/C/instances", json!({"id": "t", "data": {"tags": ["ok", nul]}})), error: "invalid_body", field: "data.tags[1]" },
        Case { what: "update value", send: Put("/databases/shop/classes/C/instances/i?expected_seq=1", json!({"data": {"colour": nul}})), error: "invalid_body", field: "data.colour" },
        Case {
            what: "bulk member",
            send: Post("/databases/shop/classes/C/instances/bulk", json!({"instances": [{"id": "b0", "data": {"colour": "fine"}}, {"id": "b1", "data": {"colour": nul}}]})),
            error: "invalid_body",
            field: "instances[1].data.colour",
        },
        Case { what: "class label", send: Post("/databases/shop/classes", json!({"id": "D", "label": nul})), error: "invalid_body", field: "label" },
        Case { what: "where= value", send: Get("/databases/shop/classes/C/instances?where=colour%3Da%00b"), error: "invalid_filter", field: "colour" },
        Case { what: "where= in value", send: Get("/databases/shop/classes/C/instances?where=colour%3Din%3A(x%7Ca%00b)"), error: "invalid_filter", field: "colour" },
        Case { what: "path segment (query)", send: Get("/databases/a%00b"), error: "invalid_id", field: "db" },
        Case { what: "path segment (command)", send: Post("/databases/a%00b/classes", json!({"id": "C"})), error: "invalid_id", field: "db" },
        Case { what: "cursor", send: Get("/databases/shop/classes/C/instances?cursor=a%00b"), error: "invalid_id", field: "cursor" },
    ]
}

async fn send(app: &TestApp, send: &Send) -> (u16, Value) {
    let request = match send {
        Send::Post(path, body) => app.http.post(app.url(path)).json(body),
        Send::Put(path, body) => app.http.put(app.url(path)).json(body),
        Send::Get(path) => app.http.get(app.url(path)),
    };
    status_json(request.send().await.unwrap()).await
}

async fn done(app: &TestApp, (s, b): (u16, Value)) {
    assert_eq!(s, 202, "{b}");
    let status = app.wait_command(b["command_id"].as_str().unwrap(), Duration::from_secs(60)).await;
    assert_eq!(status["status"], "COMPLETED", "{status}");
}

async fn a_nul_anywhere_is_refused_and_nothing_is_appended(backend: Backend) {
    let app = spawn_dev(backend).await;
    done(&app, app.post("/databases", json!({"name": "shop"})).await).await;
    done(&app, app.post("/databases/shop/classes", json!({"id": "C", "properties": [{"name": "colour", "type": "string"}, {"name": "tags", "type": "json"}]})).await).await;
    done(&app, app.post("/databases/shop/classes/C/instances", json!({"id": "i", "data": {"colour": "x"}})).await).await;
    // The class must be in the read models for where= to reach the value.
    common::readmodel::caught_up(&app, Duration::from_secs(60)).await;
    let (db, log) = app.storage().await;
    for case in cases() {
        let head = db.index.head().await.unwrap();
        let (status, body) = send(&app, &case.send).await;
        assert_eq!((status, body["error"].as_str()), (400, Some(case.error)), "{}: {body}", case.what);
        let message = body["message"].as_str().unwrap_or_default();
        assert!(message.contains(case.field), "{}: the message names {}: {body}", case.what, case.field);
        assert!(!message.contains('\u{0}'), "{}: the message itself holds no NUL: {body}", case.what);
        assert_eq!(db.index.head().await.unwrap(), head, "{}: the index head moved", case.what);
        assert!(log.get_segment(head + 1).await.unwrap().is_none(), "{}: a segment was written", case.what);
    }
    // The same requests without the NUL are accepted: the refusal is about the NUL alone.
    let (s, b) = app.post("/databases", json!({"name": "evil", "description": "ab"})).await;
    assert_eq!(s, 202, "{b}");
    let (s, b) = app.post("/databases/shop/classes/C/instances/bulk", json!({"instances": [{"id": "b0", "data": {"colour": "fine"}}, {"id": "b1", "data": {"colour": "ab"}}]})).await;
    assert_eq!(s, 202, "{b}");
}

/// An aggregate whose commands are large: one `/events` page holds at most
/// `MAX_EVENT_BYTES_PER_READ` of envelopes (never its up to 1000 segments at once), ends
/// early with `next_from_seq`, and the pages together hold every command once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_oversized_event_page_ends_early_and_says_where_to_go_on() {
    let app = common::spawn_app(Backend::LocalSqlite).await;
    let blob = "x".repeat(700_000);
    let path = "/databases/big/classes/C/instances/i";
    let (s, b) = app.post("/databases/big/classes/C/instances", json!({"id": "i", "data": {"blob": blob}})).await;
    assert_eq!(s, 202, "{b}");
    for seq in 1..10 {
        let (s, b) = app.put(&format!("{path}?expected_seq={seq}"), json!({"data": {"blob": blob}})).await;
        assert_eq!(s, 202, "{b}");
    }
    let (mut seqs, mut from, mut pages) = (Vec::new(), 1u64, 0);
    loop {
        let (s, page) = app.get(&format!("/aggregates/Instance/big:main:C:i/events?from_seq={from}")).await;
        assert_eq!(s, 200);
        let bytes: usize = page["events"].as_array().unwrap().iter().map(|e| e.to_string().len()).sum();
        assert!(bytes <= spiced::serve::reads::MAX_EVENT_BYTES_PER_READ + 700_000, "a page of {bytes} bytes");
        seqs.extend(page["events"].as_array().unwrap().iter().map(|e| e["sequence_number"].as_u64().unwrap()));
        pages += 1;
        match page["next_from_seq"].as_u64() {
            Some(next) => from = next,
            None => break,
        }
    }
    assert_eq!(seqs, (1..=10).collect::<Vec<_>>(), "every command once, in order");
    assert!(pages >= 2, "7 MB of commands do not fit one page");
}

/// A full writer queue answers 503 with `Retry-After` at once, by bytes as well as by count:
/// with S3 frozen, large commands beyond `writer.queue_bytes` are refused, not queued, and
/// only the accepted ones reach the log once S3 answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_writer_queue_refuses_by_bytes_and_appends_only_what_it_accepted() {
    let (mut config, dir) = common::isolated_config(Backend::S3Postgres).await;
    let proxy = common::proxy::Proxy::start(config.log.s3.endpoint.trim_start_matches("http://")).await;
    config.log.s3.endpoint = format!("http://{}", proxy.addr);
    config.writer.queue_bytes = 2 * 1024 * 1024;
    let app = common::spawn_with(config, dir).await;
    proxy.pause();
    let blob = "x".repeat(900_000);
    let sends: Vec<_> = (0..8)
        .map(|i| {
            let (http, url) = (app.http.clone(), app.url("/databases/q/classes/C/instances"));
            let body = json!({"id": format!("i{i}"), "data": {"blob": blob}});
            tokio::spawn(async move {
                let r = http.post(url).json(&body).send().await.unwrap();
                (r.status().as_u16(), r.headers().contains_key("retry-after"))
            })
        })
        .collect();
    // The refusals come at once, while S3 still holds the accepted ones.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sends.iter().filter(|s| s.is_finished()).count() < 5 {
        assert!(std::time::Instant::now() < deadline, "a full queue must refuse at once, not wait");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.resume();
    let mut accepted = 0;
    for s in sends {
        match s.await.unwrap() {
            (202, _) => accepted += 1,
            (503, retry_after) => assert!(retry_after, "503 without Retry-After"),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!((1..=3).contains(&accepted), "2 MiB holds two or three 0.9 MB commands, not {accepted}");
    let (_, log) = app.storage().await;
    assert_eq!(common::read_whole_log(&log).await.len(), accepted, "nothing refused was appended");
}

/// A flood of `?min_version` reads waiting for a version that never comes: at most
/// `serve.max_version_waiters` wait (then 425), the rest get 503 with `Retry-After` at once, and
/// the process keeps serving other reads meanwhile (one position watcher, not a poll per read).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_version_waiters_is_bounded_and_the_api_keeps_serving() {
    let (mut config, dir) = common::isolated_config(Backend::S3Postgres).await;
    config.serve.max_version_waiters = 50;
    config.serve.min_version_wait_ms = 2000;
    let app = common::spawn_role_dev(config, dir).await;
    done(&app, app.post("/databases", json!({"name": "w"})).await).await;
    let waits: Vec<_> = (0..200)
        .map(|_| {
            let (http, url) = (app.http.clone(), app.url("/databases/w?min_version=99"));
            tokio::spawn(async move {
                let r = http.get(url).send().await.unwrap();
                (r.status().as_u16(), r.headers().contains_key("retry-after"))
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let (s, _) = app.get("/databases/w").await;
    assert_eq!(s, 200);
    assert!(started.elapsed() < Duration::from_millis(1000), "a plain read waited {:?} behind the waiters", started.elapsed());
    let (mut too_early, mut refused) = (0, 0);
    for w in waits {
        match w.await.unwrap() {
            (425, true) => too_early += 1,
            (503, true) => refused += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(too_early <= 50, "{too_early} waited, at most 50 may");
    assert_eq!(too_early + refused, 200);
    assert!(refused >= 150, "the rest are refused at once: {refused}");
}
