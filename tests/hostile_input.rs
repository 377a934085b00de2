//! Input the read store cannot keep is refused at the door: a U+0000 anywhere in a body (keys
//! and values, at any depth, bulk members included), in a `where=` value or in a path segment
//! is a 400 naming the field, and nothing reaches the log. (PostgreSQL refuses NUL in text
//! and jsonb; once such an event was in the log, the read models could never apply it.)

mod common;

use common::{spawn_dev, status_json, Backend, TestApp};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

backend_tests! {
    a_nul_anywhere_is_refused_and_nothing_is_appended,
    deep_wide_and_huge_bodies_get_clear_answers,
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
    // The API refuses instances of a class no command named; no worker runs, so any will do.
    assert_eq!(app.post("/databases", json!({"name": "big"})).await.0, 202);
    assert_eq!(app.post("/databases/big/classes", json!({"id": "C"})).await.0, 202);
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
    assert_eq!(app.post("/databases", json!({"name": "q"})).await.0, 202);
    assert_eq!(app.post("/databases/q/classes", json!({"id": "C"})).await.0, 202);
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
    assert_eq!(common::read_whole_log(&log).await.len(), 2 + accepted, "nothing refused was appended");
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
    // The outcome is in the log; the plain read below needs it in the read models too.
    common::readmodel::caught_up(&app, Duration::from_secs(60)).await;
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

/// `data.deep` nested so that the body is `depth` levels deep.
fn nested(depth: usize) -> Value {
    let mut v = json!(1);
    for _ in 0..depth - 2 {
        v = json!([v]);
    }
    json!({"id": "deep", "data": {"deep": v}})
}

/// A body too deep for every stage to parse, a number beyond a double, a class of too many
/// properties: each a 400 and nothing appended. What is accepted is what every stage can carry:
/// 64 levels, a 10,000-property object, an integer beyond 64 bits as a number (a double, as
/// JSON parsers read it), and the same integer in an `integer` property fails its command
/// without stopping a worker.
async fn deep_wide_and_huge_bodies_get_clear_answers(backend: Backend) {
    let app = spawn_dev(backend).await;
    done(&app, app.post("/databases", json!({"name": "big"})).await).await;
    let props = json!([{"name": "deep", "type": "json"}, {"name": "wide", "type": "json"}, {"name": "n", "type": "number"}, {"name": "i", "type": "integer"}]);
    done(&app, app.post("/databases/big/classes", json!({"id": "C", "properties": props})).await).await;
    let (db, log) = app.storage().await;
    let instances = "/databases/big/classes/C/instances";
    let too_many: Vec<Value> = (0..1001).map(|i| json!({"name": format!("p{i}"), "type": "string"})).collect();
    let refused = [
        ("65 levels", app.http.post(app.url(instances)).json(&nested(65)), "invalid_body", "nested deeper than 64"),
        ("200 levels", app.http.post(app.url(instances)).json(&nested(200)), "malformed_json", "recursion limit"),
        (
            "1e400",
            app.http.post(app.url(instances)).header("content-type", "application/json").body(r#"{"id": "n", "data": {"n": 1e400}}"#),
            "malformed_json",
            "number out of range",
        ),
        ("1001 properties", app.http.post(app.url("/databases/big/classes")).json(&json!({"id": "D", "properties": too_many})), "invalid_property", "at most 1000"),
    ];
    for (what, request, error, says) in refused {
        let head = db.index.head().await.unwrap();
        let (status, body) = status_json(request.send().await.unwrap()).await;
        assert_eq!((status, body["error"].as_str()), (400, Some(error)), "{what}: {body}");
        assert!(body["message"].as_str().unwrap_or_default().contains(says), "{what}: {body}");
        assert_eq!(db.index.head().await.unwrap(), head, "{what}: the index head moved");
        assert!(log.get_segment(head + 1).await.unwrap().is_none(), "{what}: a segment was written");
    }

    let wide: serde_json::Map<String, Value> = (0..10_000).map(|i| (format!("k{i}"), json!(i))).collect();
    let huge = "1180591620717411303424"; // 2^70
    let accepted = [
        ("64 levels", app.http.post(app.url(instances)).json(&nested(64))),
        ("10,000 properties", app.http.post(app.url(instances)).json(&json!({"id": "wide", "data": {"wide": wide}}))),
        (
            "2^70 as a number",
            app.http.post(app.url(instances)).header("content-type", "application/json").body(format!(r#"{{"id": "n", "data": {{"n": {huge}}}}}"#)),
        ),
    ];
    for (what, request) in accepted {
        let (s, b) = status_json(request.send().await.unwrap()).await;
        assert_eq!(s, 202, "{what}: {b}");
        let status = app.wait_command(b["command_id"].as_str().unwrap(), Duration::from_secs(60)).await;
        assert_eq!(status["status"], "COMPLETED", "{what}: {status}");
    }
    let body = format!(r#"{{"id": "i", "data": {{"i": {huge}}}}}"#);
    let request = app.http.post(app.url(instances)).header("content-type", "application/json").body(body);
    let (s, b) = status_json(request.send().await.unwrap()).await;
    assert_eq!(s, 202, "{b}");
    let status = app.wait_command(b["command_id"].as_str().unwrap(), Duration::from_secs(60)).await;
    assert_eq!(status["status"], "FAILED", "2^70 is no 64-bit integer: {status}");

    common::readmodel::caught_up(&app, Duration::from_secs(60)).await;
    let (s, wide) = app.get(&format!("{instances}/wide")).await;
    assert_eq!((s, wide["data"]["wide"].as_object().map(|o| o.len())), (200, Some(10_000)), "{wide}");
    let (s, n) = app.get(&format!("{instances}/n")).await;
    assert_eq!((s, n["data"]["n"].as_f64()), (200, Some(2f64.powi(70))), "parsed exactly (float_roundtrip): {n}");
    let (s, deep) = app.get(&format!("{instances}/deep")).await;
    assert_eq!(s, 200, "{deep}");
    assert_eq!(deep["data"], nested(64)["data"], "64 levels read back whole");
}

/// The host:port the app listens on.
fn address(app: &TestApp) -> String {
    app.base.trim_start_matches("http://").trim_end_matches("/api/v1").to_string()
}

/// The status of the answer to a raw request, and the whole answer.
async fn raw(stream: &mut TcpStream, request: &str) -> (u16, String) {
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await.expect("an answer within 5 s").unwrap();
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

const HEALTHZ: &str = "GET /healthz HTTP/1.1\r\nHost: spiced\r\n\r\n";

/// A client that sends half a request line is disconnected after `serve.header_read_timeout_ms`,
/// one whose body never comes gets 503 after `serve.request_timeout_ms` with nothing appended,
/// and other clients are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_clients_are_cut_off_and_the_api_keeps_serving() {
    let (mut config, dir) = common::isolated_config(Backend::LocalSqlite).await;
    config.serve.header_read_timeout_ms = 500;
    config.serve.min_version_wait_ms = 200;
    config.serve.request_timeout_ms = 1000;
    let app = common::spawn_with(config, dir).await;

    let started = Instant::now();
    let mut half = TcpStream::connect(address(&app)).await.unwrap();
    half.write_all(b"GET /heal").await.unwrap();
    let (s, _) = app.get("/databases").await;
    assert_eq!(s, 200, "served while a slow client holds its connection");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), half.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "half a request line still holds its connection after 5 s");
    assert!(started.elapsed() >= Duration::from_millis(450), "cut off after {:?}, before the timeout", started.elapsed());

    let mut stalled = TcpStream::connect(address(&app)).await.unwrap();
    let head = "POST /api/v1/databases HTTP/1.1\r\nHost: spiced\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"name\":";
    let started = Instant::now();
    let (status, answer) = raw(&mut stalled, head).await;
    assert_eq!(status, 503, "{answer}");
    assert!(answer.contains("\"timeout\"") && answer.to_ascii_lowercase().contains("retry-after"), "{answer}");
    assert!(started.elapsed() >= Duration::from_millis(950), "answered after {:?}", started.elapsed());
    let (db, log) = app.storage().await;
    assert_eq!(db.index.head().await.unwrap(), 0, "nothing was appended");
    assert!(log.get_segment(1).await.unwrap().is_none());
    let (s, _) = app.post("/databases", json!({"name": "after"})).await;
    assert_eq!(s, 202, "commands are taken after the timeout");
}

/// Past `serve.max_connections`, a connection gets 503 with `Retry-After` at once instead of
/// waiting; once connections close, new ones are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_past_the_limit_are_refused_at_once() {
    let (mut config, dir) = common::isolated_config(Backend::LocalSqlite).await;
    config.serve.max_connections = 4;
    let app = common::spawn_with(config, dir).await;
    // The client's pooled connection from start-up may hold one of the four.
    let mut open = Vec::new();
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let mut stream = TcpStream::connect(address(&app)).await.unwrap();
        let started = Instant::now();
        let (status, answer) = raw(&mut stream, HEALTHZ).await;
        if status == 503 {
            assert!(answer.to_ascii_lowercase().contains("retry-after: 1"), "{answer}");
            assert!(answer.contains("serve.max_connections"), "{answer}");
            assert!(started.elapsed() < Duration::from_secs(1), "refused after {:?}", started.elapsed());
        }
        statuses.push(status);
        open.push(stream);
    }
    assert_eq!(&statuses[..3], &[200, 200, 200], "{statuses:?}");
    assert!(statuses[3..].contains(&503), "a fifth connection past a limit of 4 is refused: {statuses:?}");
    drop(open);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut stream = TcpStream::connect(address(&app)).await.unwrap();
        if raw(&mut stream, HEALTHZ).await.0 == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "closed connections did not free their places");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
