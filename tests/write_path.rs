//! The write path end to end over HTTP, against S3 + PostgreSQL and local disk + SQLite.

mod common;

use common::{read_whole_log, spawn_app, Backend, TestApp};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use uuid::Uuid;

backend_tests! {
    occ_under_32_concurrent_writers,
    idempotency_under_concurrent_repeats,
    bad_input_is_rejected_and_appends_nothing,
    accepted_commands_are_in_the_log_as_envelopes,
    the_log_route_reads_and_follows_the_log,
    dead_letter_routes_refuse_bad_input,
    bulk_create_is_atomic,
    metrics_are_exported,
}

async fn create_class(app: &TestApp, db: &str, class: &str) {
    let (s, _) = app.post("/databases", json!({"name": db})).await;
    assert_eq!(s, 202);
    let (s, b) = app
        .post(
            &format!("/databases/{db}/classes"),
            json!({"id": class, "properties": [{"name": "n", "type": "integer"}]}),
        )
        .await;
    assert_eq!(s, 202, "{b}");
}

async fn version(app: &TestApp, ty: &str, id: &str) -> u64 {
    let (s, b) = app.get(&format!("/aggregates/{ty}/{id}")).await;
    assert_eq!(s, 200, "{b}");
    b["version"].as_u64().unwrap()
}

/// 32 clients race to update one class; each sequence must be won by exactly one of them.
async fn occ_under_32_concurrent_writers(backend: Backend) {
    let app = Arc::new(spawn_app(backend).await);
    create_class(&app, "occ", "C").await;
    const TARGET: u64 = 25;
    let mut clients = Vec::new();
    for client in 0..32 {
        let app = app.clone();
        clients.push(tokio::spawn(async move {
            let mut wins = Vec::new();
            let mut conflicts = 0;
            loop {
                let v = version(&app, "OntologyClass", "occ:main:C").await;
                if v >= TARGET {
                    return (wins, conflicts);
                }
                let r = app
                    .http
                    .put(app.url(&format!("/databases/occ/classes/C?expected_seq={v}")))
                    .json(&json!({"patch": {"label": format!("client {client}")}}))
                    .send()
                    .await
                    .unwrap();
                let (status, body) = common::status_json(r).await;
                match status {
                    202 => wins.push(body["sequence_number"].as_u64().unwrap()),
                    409 => {
                        assert_eq!(body["error"], "optimistic_concurrency_conflict");
                        assert_eq!(body["expected_seq"], v);
                        assert!(body["actual_seq"].as_u64().unwrap() > v, "{body}");
                        conflicts += 1;
                    }
                    other => panic!("unexpected {other}: {body}"),
                }
            }
        }));
    }
    let mut won: Vec<u64> = Vec::new();
    let mut conflicts = 0;
    for c in clients {
        let (w, c) = c.await.unwrap();
        won.extend(w);
        conflicts += c;
    }
    won.sort();
    assert_eq!(won, (2..=TARGET).collect::<Vec<_>>(), "each sequence won exactly once");
    assert!(conflicts > 0, "32 racing clients must have produced conflicts");
    let (_, log) = app.storage().await;
    let seqs: Vec<u64> = read_whole_log(&log)
        .await
        .into_iter()
        .filter(|(_, e)| e.aggregate_id == "occ:main:C")
        .map(|(_, e)| e.sequence_number.unwrap())
        .collect();
    assert_eq!(seqs, (1..=TARGET).collect::<Vec<_>>(), "log holds each sequence once, in order");
}

/// The same Idempotency-Key sent 16 times at once: one append, 16 identical answers. The same
/// key with different bodies: one wins, the rest get 422.
async fn idempotency_under_concurrent_repeats(backend: Backend) {
    let app = Arc::new(spawn_app(backend).await);
    create_class(&app, "idem", "C").await;
    let key = Uuid::new_v4();
    let send = |body: Value| {
        let app = app.clone();
        tokio::spawn(async move {
            let r = app
                .http
                .post(app.url("/databases/idem/classes/C/instances"))
                .header("Idempotency-Key", key.to_string())
                .json(&body)
                .send()
                .await
                .unwrap();
            common::status_json(r).await
        })
    };
    let tasks: Vec<_> = (0..16).map(|_| send(json!({"data": {"n": 1}}))).collect();
    let mut answers = HashSet::new();
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["command_id"], key.to_string());
        answers.insert(body.to_string());
    }
    assert_eq!(answers.len(), 1, "every repeat returns the original body: {answers:?}");

    let key2 = Uuid::new_v4();
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let app = app.clone();
            tokio::spawn(async move {
                let r = app
                    .http
                    .post(app.url("/databases/idem/classes/C/instances"))
                    .header("Idempotency-Key", key2.to_string())
                    .json(&json!({"id": "x", "data": {"n": i}}))
                    .send()
                    .await
                    .unwrap();
                common::status_json(r).await
            })
        })
        .collect();
    let mut statuses = BTreeMap::new();
    for t in tasks {
        let (status, body) = t.await.unwrap();
        if status == 422 {
            assert_eq!(body["error"], "idempotency_key_reused");
        }
        *statuses.entry(status).or_insert(0) += 1;
    }
    assert_eq!(statuses, BTreeMap::from([(202, 1), (422, 7)]));

    let (_, log) = app.storage().await;
    let events = read_whole_log(&log).await;
    assert_eq!(events.iter().filter(|(_, e)| e.event_id == key).count(), 1);
    assert_eq!(events.iter().filter(|(_, e)| e.event_id == key2).count(), 1);
    let (s, b) = app.get(&format!("/commands/{key}")).await;
    assert_eq!((s, b["status"].as_str()), (200, Some("PENDING")));
}

/// Every kind of bad input gets its 4xx and a JSON `{error, message}`, and the log is untouched.
async fn bad_input_is_rejected_and_appends_nothing(backend: Backend) {
    let app = spawn_app(backend).await;
    create_class(&app, "bad", "C").await;
    let (db, _) = app.storage().await;
    let head_before = db.index.head().await.unwrap();
    let big = "x".repeat(app.config.serve.max_body_bytes + 1);
    let json_ct = ("content-type", "application/json");
    // (method, path, headers, body, status, error code)
    type Case<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>, String, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("POST", "/databases", vec![json_ct], "{\"name\":".into(), 400, "malformed_json"),
        ("POST", "/databases", vec![json_ct], "[1,2]".into(), 400, "invalid_body"),
        ("POST", "/databases", vec![json_ct], r#"{"name": 5}"#.into(), 400, "invalid_body"),
        ("POST", "/databases", vec![json_ct], r#"{"name":"a","x":1}"#.into(), 400, "invalid_body"),
        ("POST", "/databases", vec![json_ct], r#"{"name":"a/b"}"#.into(), 400, "invalid_id"),
        ("POST", "/databases", vec![json_ct], r#"{"name":"a:b"}"#.into(), 400, "invalid_id"),
        ("POST", "/databases", vec![json_ct], format!(r#"{{"name":"{}"}}"#, "a".repeat(200)), 400, "invalid_id"),
        ("POST", "/databases", vec![("content-type", "text/plain")], r#"{"name":"a"}"#.into(), 415, "unsupported_media_type"),
        ("POST", "/databases", vec![], r#"{"name":"a"}"#.into(), 415, "unsupported_media_type"),
        ("POST", "/databases", vec![json_ct], format!(r#"{{"name":"{big}"}}"#), 413, "payload_too_large"),
        ("POST", "/databases", vec![json_ct, ("idempotency-key", "nope")], r#"{"name":"a"}"#.into(), 400, "invalid_idempotency_key"),
        ("POST", "/databases?expected_seq=3", vec![json_ct], r#"{"name":"a"}"#.into(), 400, "invalid_expected_seq"),
        ("POST", "/databases?bogus=1", vec![json_ct], r#"{"name":"a"}"#.into(), 400, "invalid_query"),
        ("DELETE", "/databases/bad", vec![], String::new(), 400, "missing_expected_seq"),
        ("DELETE", "/databases/bad?expected_seq=-1", vec![], String::new(), 400, "invalid_query"),
        ("PUT", "/databases/bad/classes/C?expected_seq=1", vec![json_ct], r#"{"patch":{}}"#.into(), 400, "invalid_request"),
        ("PUT", "/databases/bad/classes/C?expected_seq=1", vec![json_ct], r#"{"patch":{"nope":1}}"#.into(), 400, "invalid_body"),
        ("POST", "/databases/bad/classes", vec![json_ct], r#"{"id":"D","properties":[{"name":"p","type":"float"}]}"#.into(), 400, "invalid_property"),
        ("POST", "/databases/bad/classes", vec![json_ct], r#"{"id":"D","properties":[{"name":"p","type":"string"},{"name":"p","type":"string"}]}"#.into(), 400, "invalid_property"),
        ("POST", "/databases/bad/classes?branch=a%2Fb", vec![json_ct], r#"{"id":"D"}"#.into(), 400, "invalid_id"),
        ("POST", "/databases/bad/classes/C/instances", vec![json_ct], r#"{"data":[]}"#.into(), 400, "invalid_body"),
        ("POST", "/databases/bad/classes/C/instances", vec![json_ct], r#"{"data":{"bad key":1}}"#.into(), 400, "invalid_property"),
        ("POST", "/databases/bad/classes/C/instances", vec![json_ct], r#"{"id":"a%2Fb","data":{}}"#.into(), 400, "invalid_id"),
        ("POST", "/databases/bad/classes/C/instances/bulk", vec![json_ct], r#"{"instances":[]}"#.into(), 400, "invalid_bulk_size"),
        ("PUT", "/databases/bad/classes/C/instances/i", vec![json_ct], r#"{"data":{}}"#.into(), 400, "missing_expected_seq"),
        ("GET", "/commands/not-a-uuid", vec![], String::new(), 400, "invalid_command_id"),
        ("GET", &*Box::leak(format!("/commands/{}", Uuid::new_v4()).into_boxed_str()), vec![], String::new(), 404, "not_found"),
        ("GET", "/aggregates/Nope/x", vec![], String::new(), 400, "invalid_id"),
        ("GET", "/aggregates/Instance/a:b", vec![], String::new(), 400, "invalid_id"),
        // Found by scripts/fuzz-api.sh: a NUL in a cursor was a 503 from PostgreSQL, a sequence
        // above 2^63 a panic in the index.
        ("GET", "/databases/bad/classes?cursor=a%00b", vec![], String::new(), 400, "invalid_id"),
        ("GET", "/aggregates/Database/bad/events?from_seq=9223372036854775808", vec![], String::new(), 400, "invalid_query"),
        ("DELETE", "/databases/bad?expected_seq=9223372036854775808", vec![], String::new(), 400, "invalid_query"),
        ("GET", "/databases?branch=a%2Fb", vec![], String::new(), 400, "invalid_id"),
        ("GET", "/no/such/route", vec![], String::new(), 404, "not_found"),
        ("PATCH", "/databases", vec![json_ct], "{}".into(), 405, "method_not_allowed"),
    ];
    let bulk_max = app.config.serve.max_bulk_instances;
    let too_many: Vec<Value> = (0..=bulk_max).map(|i| json!({"id": format!("i{i}"), "data": {}})).collect();
    let mut cases = cases;
    let too_many_body = json!({"instances": too_many}).to_string();
    cases.push(("POST", "/databases/bad/classes/C/instances/bulk", vec![json_ct], too_many_body, 400, "invalid_bulk_size"));
    for (method, path, headers, body, status, error) in cases {
        let mut req = app.http.request(method.parse().unwrap(), app.url(path)).body(body);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let (got, json) = common::status_json(req.send().await.unwrap()).await;
        assert_eq!((got, json["error"].as_str()), (status, Some(error)), "{method} {path}: {json}");
        assert!(json["message"].is_string(), "{method} {path}: no message in {json}");
    }
    assert_eq!(db.index.head().await.unwrap(), head_before, "bad input appended something");
}

/// What is accepted is in the log, field for field, and readable per aggregate.
async fn accepted_commands_are_in_the_log_as_envelopes(backend: Backend) {
    let app = spawn_app(backend).await;
    create_class(&app, "env", "Product").await;
    let (s, created) = app
        .post("/databases/env/classes/Product/instances", json!({"data": {"product_id": "p-1", "n": 1}}))
        .await;
    assert_eq!(s, 202, "{created}");
    assert_eq!(created["aggregate_id"], "env:main:Product:p-1", "id taken from data.product_id");
    let (s, updated) = app
        .http
        .put(app.url("/databases/env/classes/Product/instances/p-1?expected_seq=1"))
        .json(&json!({"data": {"n": 2}}))
        .send()
        .await
        .map(futures_status)
        .unwrap()
        .await;
    assert_eq!((s, updated["sequence_number"].as_u64()), (202, Some(2)), "{updated}");
    let (s, page) = app.get("/aggregates/Instance/env:main:Product:p-1/events").await;
    assert_eq!(s, 200);
    let events = page["events"].as_array().unwrap();
    assert_eq!(events.len(), 2);
    let first: spiced::envelope::EventEnvelope = serde_json::from_value(events[0].clone()).unwrap();
    assert_eq!(first.event_id.to_string(), created["command_id"].as_str().unwrap());
    assert_eq!(first.event_type, "CREATE_INSTANCE_REQUESTED");
    assert_eq!(first.data["command_type"], "CREATE_INSTANCE");
    assert_eq!(first.data["expected_seq"], 0);
    assert_eq!(first.data["payload"]["data"]["n"], 1);
    assert_eq!(first.metadata["kind"], "command");
    assert_eq!(first.metadata["kafka_topic"], "instance_commands");
    assert_eq!(events[1]["sequence_number"], 2);
    assert_eq!(events[1]["data"]["expected_seq"], 1);
    let (s, page) = app.get("/aggregates/Instance/env:main:Product:p-1/events?from_seq=2&to_seq=2").await;
    assert_eq!((s, page["events"].as_array().unwrap().len()), (200, 1));
    assert_eq!(version(&app, "Instance", "env:main:Product:p-1").await, 2);
    // The whole log: gapless positions, no (aggregate, seq) twice, no event id twice.
    let (_, log) = app.storage().await;
    let all = read_whole_log(&log).await;
    let mut seen = HashSet::new();
    let mut ids = HashSet::new();
    for (_, e) in &all {
        assert!(seen.insert((e.aggregate_id.clone(), e.sequence_number)));
        assert!(ids.insert(e.event_id));
    }
}

/// `GET /log`: positions in order with their envelopes, filters, the last positions by
/// default, and a long poll that answers as soon as the next position is written.
async fn the_log_route_reads_and_follows_the_log(backend: Backend) {
    let app = spawn_app(backend).await;
    for name in ["l1", "l2", "l3"] {
        let (s, b) = app.post("/databases", json!({"name": name})).await;
        assert_eq!(s, 202, "{b}");
    }
    let (s, page) = app.get("/log?from_position=1").await;
    assert_eq!(s, 200, "{page}");
    let names: Vec<&str> = page["events"].as_array().unwrap().iter().filter_map(|e| e["envelope"]["aggregate_id"].as_str()).collect();
    assert_eq!(names, ["l1", "l2", "l3"], "{page}");
    let positions: Vec<u64> = page["events"].as_array().unwrap().iter().map(|e| e["position"].as_u64().unwrap()).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "one command per segment here: {positions:?}");
    let next = page["next_position"].as_u64().unwrap();
    assert_eq!(next, positions[2] + 1);
    let (_, last) = app.get("/log?limit=1").await;
    assert_eq!(last["events"][0]["envelope"]["aggregate_id"], "l3", "without from_position: the last positions");
    let (_, only) = app.get("/log?from_position=1&aggregate_id=l2").await;
    assert_eq!(only["events"].as_array().unwrap().len(), 1, "{only}");
    assert_eq!(only["next_position"], next, "a filter does not stop the reading");
    let (_, none) = app.get("/log?from_position=1&event_type=NO_SUCH_EVENT").await;
    assert_eq!(none["events"], json!([]));

    // A long poll at the next position answers once a command lands there.
    let waiting = {
        let (http, url) = (app.http.clone(), app.url(&format!("/log?from_position={next}&wait_ms=10000")));
        tokio::spawn(async move { common::status_json(http.get(url).send().await.unwrap()).await })
    };
    let (s, b) = app.post("/databases", json!({"name": "l4"})).await;
    assert_eq!(s, 202, "{b}");
    let (s, followed) = tokio::time::timeout(std::time::Duration::from_secs(10), waiting).await.expect("answered in time").unwrap();
    assert_eq!(s, 200, "{followed}");
    assert_eq!(followed["events"][0]["envelope"]["aggregate_id"], "l4", "{followed}");
    // Nothing to wait for past the head: an empty page after the wait, same position.
    let past = followed["next_position"].as_u64().unwrap();
    let (_, empty) = app.get(&format!("/log?from_position={past}&wait_ms=300")).await;
    assert_eq!((empty["events"].clone(), empty["next_position"].as_u64()), (json!([]), Some(past)));

    for bad in ["from_position=0", "from_position=9223372036854775808", "limit=0", "limit=101", "wait_ms=25001", "from_position=x", "colour=red"] {
        let (s, b) = app.get(&format!("/log?{bad}")).await;
        assert_eq!((s, b["error"].as_str()), (400, Some("invalid_query")), "{bad}: {b}");
    }
}

/// The dead-letter routes with nothing failed: an empty page, and bad input refused.
async fn dead_letter_routes_refuse_bad_input(backend: Backend) {
    let app = spawn_app(backend).await;
    let (s, b) = app.get("/dead-letters/instance?limit=1000").await;
    assert_eq!((s, b), (200, json!({"items": [], "next_after": null})));
    for (bad, error) in [
        ("/dead-letters/relay", "invalid_path"),
        ("/dead-letters/ontology/not-a-uuid", "invalid_path"),
        ("/dead-letters/ontology?limit=0", "invalid_query"),
        ("/dead-letters/ontology?limit=1001", "invalid_query"),
        ("/dead-letters/ontology?after=x", "invalid_query"),
        ("/dead-letters/ontology?colour=red", "invalid_query"),
    ] {
        let (s, b) = app.get(bad).await;
        assert_eq!((s, b["error"].as_str()), (400, Some(error)), "{bad}: {b}");
    }
    let unknown = Uuid::new_v4();
    let (s, b) = app.get(&format!("/dead-letters/ontology/{unknown}")).await;
    assert_eq!((s, b["error"].as_str()), (404, Some("not_found")), "{b}");
    let (s, b) = app.post(&format!("/dead-letters/ontology/{unknown}/redrive"), json!({})).await;
    assert_eq!((s, b["error"].as_str()), (404, Some("not_found")), "{b}");
}

async fn futures_status(r: reqwest::Response) -> (u16, Value) {
    common::status_json(r).await
}

/// A bulk create takes every instance or none.
async fn bulk_create_is_atomic(backend: Backend) {
    let app = spawn_app(backend).await;
    create_class(&app, "bulk", "C").await;
    let (s, b) = app.post("/databases/bulk/classes/C/instances", json!({"id": "taken", "data": {}})).await;
    assert_eq!(s, 202, "{b}");
    let (s, b) = app
        .post(
            "/databases/bulk/classes/C/instances/bulk",
            json!({"instances": [{"id": "new1", "data": {}}, {"id": "taken", "data": {}}]}),
        )
        .await;
    assert_eq!((s, b["error"].as_str()), (409, Some("optimistic_concurrency_conflict")), "{b}");
    assert_eq!(version(&app, "Instance", "bulk:main:C:new1").await, 0, "nothing of a failed bulk");
    let (s, b) = app
        .post(
            "/databases/bulk/classes/C/instances/bulk",
            json!({"instances": [{"id": "new1", "data": {}}, {"id": "new2", "data": {}}]}),
        )
        .await;
    assert_eq!(s, 202, "{b}");
    let ids: HashMap<String, u64> = b["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["instance_id"].as_str().unwrap().to_string(), i["sequence_number"].as_u64().unwrap()))
        .collect();
    assert_eq!(ids, HashMap::from([("new1".into(), 1), ("new2".into(), 1)]));
    let (s, status) = app.get(&format!("/commands/{}", b["command_id"].as_str().unwrap())).await;
    assert_eq!(s, 200);
    let strip = |v: &Value| -> Vec<(Value, Value)> {
        v.as_array().unwrap().iter().map(|i| (i["aggregate_id"].clone(), i["sequence_number"].clone())).collect()
    };
    assert_eq!(strip(&status["instances"]), strip(&b["instances"]));
    assert!(status["instances"].as_array().unwrap().iter().all(|i| i["status"] == "PENDING"), "no workers here");
}

/// `/metrics` is Prometheus text with the write path's counters.
async fn metrics_are_exported(backend: Backend) {
    let app = spawn_app(backend).await;
    let (s, _) = app.post("/databases", json!({"name": "m"})).await;
    assert_eq!(s, 202);
    let text = app.http.get(app.base.replace("/api/v1", "/metrics")).send().await.unwrap().text().await.unwrap();
    for name in [
        "spiced_http_requests_total",
        "spiced_http_request_duration_seconds_bucket",
        "spiced_log_appends_total",
        "spiced_group_commit_batch_size",
        "spiced_log_commit_step_seconds_bucket{step=\"put\",le=\"0.0001\"}",
        "spiced_log_commit_step_seconds_count{step=\"put\"}",
        "spiced_s3_requests_total",
        "spiced_log_head_position",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
    assert!(text.contains("route=\"/api/v1/databases\""), "{text}");
}
