//! Command workers carrying commands out: end to end through the API, with the embedded
//! (log-fed) workers of `spiced dev`, on both backends.

mod common;

use common::{spawn_dev, Backend, TestApp};
use serde_json::{json, Value};
use std::time::Duration;

backend_tests! {
    commands_complete_or_fail_with_the_right_reason,
}

const WAIT: Duration = Duration::from_secs(60);

async fn accepted(app: &TestApp, (s, b): (u16, Value)) -> String {
    assert_eq!(s, 202, "{b}");
    let id = b["command_id"].as_str().unwrap().to_string();
    let _ = app;
    id
}

async fn completes(app: &TestApp, response: (u16, Value)) -> Value {
    let id = accepted(app, response).await;
    let status = app.wait_command(&id, WAIT).await;
    assert_eq!(status["status"], "COMPLETED", "{status}");
    status
}

async fn fails_with(app: &TestApp, response: (u16, Value), code: &str) {
    let id = accepted(app, response).await;
    let status = app.wait_command(&id, WAIT).await;
    assert_eq!((status["status"].as_str(), status["error"]["code"].as_str()), (Some("FAILED"), Some(code)), "{status}");
}

/// Database, class, 1,000 instances, updates, deletes: every command ends COMPLETED, or
/// FAILED with the reason its input deserves.
async fn commands_complete_or_fail_with_the_right_reason(backend: Backend) {
    let app = spawn_dev(backend).await;
    fails_with(&app, app.post("/databases/nodb/classes", json!({"id": "C"})).await, "database_not_found").await;
    completes(&app, app.post("/databases", json!({"name": "shop"})).await).await;
    let class = json!({"id": "Product", "properties": [
        {"name": "product_id", "type": "string", "required": true},
        {"name": "price", "type": "number"},
        {"name": "tags", "type": "json"}]});
    completes(&app, app.post("/databases/shop/classes", class).await).await;
    fails_with(&app, app.post("/databases/shop/classes", json!({"id": "Sub", "parent_class": "Nope"})).await, "parent_class_not_found").await;

    let instances: Vec<Value> = (0..1000)
        .map(|i| json!({"data": {"product_id": format!("p{i}"), "price": i}}))
        .collect();
    let bulk = completes(&app, app.post("/databases/shop/classes/Product/instances/bulk", json!({"instances": instances})).await).await;
    assert_eq!(bulk["instances"].as_array().unwrap().len(), 1000);
    assert!(bulk["instances"].as_array().unwrap().iter().all(|i| i["status"] == "COMPLETED"));

    fails_with(&app, app.post("/databases/shop/classes/Product/instances", json!({"data": {"price": 1}})).await, "invalid_instance").await;
    fails_with(&app, app.post("/databases/shop/classes/Product/instances", json!({"data": {"product_id": "x", "colour": "red"}})).await, "invalid_instance").await;
    fails_with(&app, app.post("/databases/shop/classes/Nope/instances", json!({"data": {}})).await, "class_not_found").await;

    for i in 0..50 {
        let r = app.put(&format!("/databases/shop/classes/Product/instances/p{i}?expected_seq=1"), json!({"data": {"price": 1000 + i}})).await;
        completes(&app, r).await;
    }
    fails_with(&app, app.put("/databases/shop/classes/Product/instances/p0?expected_seq=2", json!({"data": {"price": "free"}})).await, "invalid_instance").await;
    fails_with(&app, app.put("/databases/shop/classes/Product/instances/ghost?expected_seq=0", json!({"data": {}})).await, "instance_not_found").await;
    for i in 50..70 {
        completes(&app, app.delete(&format!("/databases/shop/classes/Product/instances/p{i}?expected_seq=1")).await).await;
    }
    fails_with(&app, app.put("/databases/shop/classes/Product/instances/p50?expected_seq=2", json!({"data": {}})).await, "instance_not_found").await;
    fails_with(&app, app.delete("/databases/shop?expected_seq=1").await, "database_not_empty").await;

    // The state in the log: updated price, a failed update changes nothing, and the class
    // update kept every field.
    let (_, events) = app.get("/aggregates/Instance/shop:main:Product:p0/events?kind=domain").await;
    let events = events["events"].as_array().unwrap();
    let types: Vec<&str> = events.iter().map(|e| e["event_type"].as_str().unwrap()).collect();
    assert_eq!(types, ["INSTANCE_CREATED", "INSTANCE_UPDATED", "COMMAND_FAILED"]);
    let states: Vec<&Value> = events.iter().map(|e| &e["data"]["state"]).collect();
    assert_eq!(states[1]["data"], json!({"product_id": "p0", "price": 1000}));
    assert_eq!(states[2]["data"], json!({"product_id": "p0", "price": 1000}), "a failed update leaves the state");
    completes(&app, app.put("/databases/shop/classes/Product?expected_seq=1", json!({"patch": {"label": "Products"}})).await).await;
    let (_, events) = app.get("/aggregates/OntologyClass/shop:main:Product/events?kind=domain").await;
    let state = &events["events"].as_array().unwrap().last().unwrap()["data"]["state"];
    assert_eq!(state["label"], "Products");
    assert_eq!(state["properties"].as_array().unwrap().len(), 3, "no field lost on update: {state}");
}
