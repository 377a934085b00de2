//! Command workers carrying commands out: end to end through the API, with the embedded
//! (log-fed) workers of `spiced dev`, on both backends.

mod common;

use common::{spawn_dev, Backend, TestApp};
use serde_json::{json, Value};
use std::time::Duration;

backend_tests! {
    commands_complete_or_fail_with_the_right_reason,
    a_later_sequence_waits_for_the_earlier_one,
    outcomes_follow_log_order_not_processing_order,
    classes_in_use_cycles_and_missing_ref_targets_are_refused,
    references_must_name_instances_that_exist,
    unique_values_are_held_by_one_live_instance,
    references_that_give_way_are_nullified_on_delete,
    class_changes_that_would_break_live_instances_are_refused,
    a_cascade_deletes_the_database_with_its_classes_and_instances,
    bulk_updates_and_deletes_are_all_or_nothing,
    the_new_property_types_are_checked_and_filtered,
    constraints_enums_arrays_objects_and_defaults_are_checked,
    labels_may_be_translated_and_reads_pick_the_language,
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
    // A database or class no command ever named: refused before appending, nothing in the log.
    let (s, b) = app.post("/databases/nodb/classes", json!({"id": "C"})).await;
    assert_eq!((s, b["error"].as_str()), (404, Some("database_not_found")), "{b}");
    let (s, b) = app.get("/aggregates/OntologyClass/nodb:main:C").await;
    assert_eq!((s, b["version"].as_u64()), (200, Some(0)), "nothing appended: {b}");
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
    let (s, b) = app.post("/databases/shop/classes/Nope/instances", json!({"data": {}})).await;
    assert_eq!((s, b["error"].as_str()), (404, Some("class_not_found")), "{b}");
    // A class that was named but is gone as of the command is still the worker's to decide.
    completes(&app, app.post("/databases/shop/classes", json!({"id": "Gone"})).await).await;
    completes(&app, app.delete("/databases/shop/classes/Gone?expected_seq=1").await).await;
    fails_with(&app, app.post("/databases/shop/classes/Gone/instances", json!({"data": {}})).await, "class_not_found").await;

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

/// Integrity of the ontology: a class with a live child class or a live instance cannot be
/// deleted (`class_in_use`, until they are gone); a parent that would make a class its own
/// ancestor is `invalid_parent_class`; a `ref:` to a class that does not exist is
/// `class_not_found` naming the property (a class may refer to itself).
async fn classes_in_use_cycles_and_missing_ref_targets_are_refused(backend: Backend) {
    let app = spawn_dev(backend).await;
    completes(&app, app.post("/databases", json!({"name": "k"})).await).await;
    completes(&app, app.post("/databases/k/classes", json!({"id": "P"})).await).await;
    completes(&app, app.post("/databases/k/classes", json!({"id": "C", "parent_class": "P"})).await).await;

    let in_use = |path: &str, expected_seq: u64| format!("/databases/k/classes/{path}?expected_seq={expected_seq}");
    fails_with(&app, app.delete(&in_use("P", 1)).await, "class_in_use").await;
    completes(&app, app.delete(&in_use("C", 1)).await).await;
    // The failed command still counts as a command on its class.
    completes(&app, app.delete(&in_use("P", 2)).await).await;

    // A live instance keeps its class too, until it is deleted.
    completes(&app, app.post("/databases/k/classes", json!({"id": "Q"})).await).await;
    completes(&app, app.post("/databases/k/classes/Q/instances", json!({"id": "q1", "data": {}})).await).await;
    let id = accepted(&app, app.delete(&in_use("Q", 1)).await).await;
    let status = app.wait_command(&id, WAIT).await;
    assert_eq!(status["error"]["code"], "class_in_use", "{status}");
    assert!(status["error"]["message"].as_str().unwrap().contains("\"q1\""), "names the instance: {status}");
    completes(&app, app.delete("/databases/k/classes/Q/instances/q1?expected_seq=1").await).await;
    completes(&app, app.delete(&in_use("Q", 2)).await).await;

    completes(&app, app.post("/databases/k/classes", json!({"id": "X"})).await).await;
    completes(&app, app.post("/databases/k/classes", json!({"id": "Y", "parent_class": "X"})).await).await;
    fails_with(&app, app.put("/databases/k/classes/X?expected_seq=1", json!({"patch": {"parent_class": "Y"}})).await, "invalid_parent_class").await;
    fails_with(&app, app.put("/databases/k/classes/X?expected_seq=2", json!({"patch": {"parent_class": "X"}})).await, "invalid_parent_class").await;

    let with_ref = |id: &str, target: &str| json!({"id": id, "properties": [{"name": "owner", "type": format!("ref:{target}")}]});
    let id = accepted(&app, app.post("/databases/k/classes", with_ref("R", "Nope")).await).await;
    let status = app.wait_command(&id, WAIT).await;
    assert_eq!(status["error"]["code"], "class_not_found", "{status}");
    assert!(status["error"]["message"].as_str().unwrap().contains("\"owner\""), "names the property: {status}");
    completes(&app, app.post("/databases/k/classes", with_ref("S", "S")).await).await;
    completes(&app, app.post("/databases/k/classes", with_ref("T", "X")).await).await;
    fails_with(&app, app.put("/databases/k/classes/T?expected_seq=1", json!({"patch": {"properties": [{"name": "o", "type": "ref:Gone"}]}})).await, "class_not_found").await;
}

/// A `ref` value must name an instance of the target class that exists as of the command's
/// place in the log (`invalid_reference`, naming the property and the id), each id of a
/// many-valued one too; an update checks only the references it sets, so one that leaves a
/// dangling reference alone still works. An instance may name itself.
async fn references_must_name_instances_that_exist(backend: Backend) {
    let app = spawn_dev(backend).await;
    completes(&app, app.post("/databases", json!({"name": "r"})).await).await;
    completes(&app, app.post("/databases/r/classes", json!({"id": "Person", "properties": [{"name": "name", "type": "string"}]})).await).await;
    let order = json!({"id": "Order", "properties": [{"name": "owner", "type": "ref:Person"},
        {"name": "watchers", "type": "ref:Person", "cardinality": "many"}, {"name": "next", "type": "ref:Order"},
        {"name": "note", "type": "string"}, {"name": "ship", "type": "object", "properties": [{"name": "to", "type": "ref:Person"}]}]});
    completes(&app, app.post("/databases/r/classes", order).await).await;
    completes(&app, app.post("/databases/r/classes/Person/instances", json!({"id": "ann", "data": {}})).await).await;
    completes(&app, app.post("/databases/r/classes/Person/instances", json!({"id": "ben", "data": {}})).await).await;
    let good = json!({"id": "o1", "data": {"owner": "ann", "watchers": ["ann", "ben"], "next": "o1", "ship": {"to": "ben"}}});
    completes(&app, app.post("/databases/r/classes/Order/instances", good).await).await;

    let app = &app;
    let refused = |data: Value| async move {
        let id = accepted(app, app.post("/databases/r/classes/Order/instances", json!({"data": data})).await).await;
        app.wait_command(&id, WAIT).await
    };
    for (data, property, missing) in [
        (json!({"owner": "nobody"}), "owner", "nobody"),
        (json!({"watchers": ["ann", "zed"]}), "watchers", "zed"),
        (json!({"ship": {"to": "ghost"}}), "ship.to", "ghost"),
        (json!({"next": "o9"}), "next", "o9"),
    ] {
        let status = refused(data).await;
        assert_eq!(status["error"]["code"], "invalid_reference", "{status}");
        let message = status["error"]["message"].as_str().unwrap();
        assert!(message.contains(&format!("{property:?}")) && message.contains(&format!("{missing:?}")), "{status}");
    }
    let put = |seq: u64, data: Value| async move {
        app.put(&format!("/databases/r/classes/Order/instances/o1?expected_seq={seq}"), json!({"data": data})).await
    };
    fails_with(app, put(1, json!({"owner": "nobody"})).await, "invalid_reference").await;
    // o1 names ben: he cannot be deleted (instance_in_use, naming o1 and where) until o1
    // stops naming him; then an update that names him again fails.
    let delete_ben = |seq: u64| async move { app.delete(&format!("/databases/r/classes/Person/instances/ben?expected_seq={seq}")).await };
    let id = accepted(app, delete_ben(1).await).await;
    let status = app.wait_command(&id, WAIT).await;
    assert_eq!(status["error"]["code"], "instance_in_use", "{status}");
    let message = status["error"]["message"].as_str().unwrap();
    assert!(message.contains("\"o1\"") && (message.contains("\"watchers\"") || message.contains("\"ship.to\"")), "{status}");
    completes(app, put(2, json!({"watchers": ["ann"]})).await).await;
    fails_with(app, delete_ben(2).await, "instance_in_use").await;
    completes(app, put(3, json!({"ship": null, "note": "ben is off it"})).await).await;
    completes(app, delete_ben(3).await).await;
    fails_with(app, put(4, json!({"watchers": ["ben"]})).await, "invalid_reference").await;
    // o1 names itself, which does not hold it. A bulk delete's members are decided one by
    // one as of their places: a referrer listed before what it names frees it, listed after
    // it does not.
    completes(app, app.delete("/databases/r/classes/Order/instances/o1?expected_seq=5").await).await;
    for (id, data) in [("o6", json!({})), ("o5", json!({"next": "o6"})), ("o8", json!({})), ("o7", json!({"next": "o8"}))] {
        completes(app, app.post("/databases/r/classes/Order/instances", json!({"id": id, "data": data})).await).await;
    }
    let bulk = |members: Value| async move {
        let id = accepted(app, app.post("/databases/r/classes/Order/instances/bulk-delete", json!({"instances": members})).await).await;
        let status = app.wait_command(&id, WAIT).await;
        let code = |i: &Value| (i["instance_id"].as_str().unwrap().to_string(), i["error"]["code"].as_str().unwrap_or("").to_string());
        status["instances"].as_array().unwrap().iter().map(code).collect::<std::collections::BTreeMap<_, _>>()
    };
    let codes = |pairs: [(&str, &str); 2]| pairs.iter().map(|(i, c)| (i.to_string(), c.to_string())).collect();
    assert_eq!(bulk(json!([{"id": "o5", "expected_seq": 1}, {"id": "o6", "expected_seq": 1}])).await, codes([("o5", ""), ("o6", "")]));
    let after_referrer = bulk(json!([{"id": "o8", "expected_seq": 1}, {"id": "o7", "expected_seq": 1}])).await;
    assert_eq!(after_referrer, codes([("o7", ""), ("o8", "instance_in_use")]));
}

/// `on_delete: "nullify"`: deleting an instance that is named only through such references
/// succeeds; the referrers' rows in the read models lose the reference (a single one is
/// removed, the id is taken out of a `many` one), and so does their next outcome. A restricting
/// reference still holds its target.
async fn references_that_give_way_are_nullified_on_delete(backend: Backend) {
    let app = &spawn_dev(backend).await;
    completes(app, app.post("/databases", json!({"name": "n"})).await).await;
    completes(app, app.post("/databases/n/classes", json!({"id": "Person"})).await).await;
    let order = json!({"id": "Order", "properties": [
        {"name": "owner", "type": "ref:Person", "on_delete": "nullify"},
        {"name": "watchers", "type": "ref:Person", "cardinality": "many", "on_delete": "nullify"},
        {"name": "buyer", "type": "ref:Person"}, {"name": "note", "type": "string"}]});
    completes(app, app.post("/databases/n/classes", order).await).await;
    for id in ["ann", "ben"] {
        completes(app, app.post("/databases/n/classes/Person/instances", json!({"id": id, "data": {}})).await).await;
    }
    let o1 = json!({"id": "o1", "data": {"owner": "ann", "watchers": ["ann", "ben"], "note": "x"}});
    completes(app, app.post("/databases/n/classes/Order/instances", o1).await).await;
    completes(app, app.post("/databases/n/classes/Order/instances", json!({"id": "o2", "data": {"buyer": "ben"}})).await).await;
    completes(app, app.delete("/databases/n/classes/Person/instances/ann?expected_seq=1").await).await;
    fails_with(app, app.delete("/databases/n/classes/Person/instances/ben?expected_seq=1").await, "instance_in_use").await;

    common::readmodel::caught_up(app, WAIT).await;
    let (s, row) = app.get("/databases/n/classes/Order/instances/o1").await;
    assert_eq!((s, &row["data"]), (200, &json!({"watchers": ["ben"], "note": "x"})), "{row}");
    completes(app, app.put("/databases/n/classes/Order/instances/o1?expected_seq=1", json!({"data": {"note": "y"}})).await).await;
    let (_, events) = app.get("/aggregates/Instance/n:main:Order:o1/events?kind=domain").await;
    assert_eq!(events["events"][1]["data"]["state"]["data"], json!({"watchers": ["ben"], "note": "y"}), "{events}");
    let (s, b) = app.post("/databases/n/classes", json!({"id": "Bad", "properties": [
        {"name": "p", "type": "ref:Person", "required": true, "on_delete": "nullify"}]})).await;
    assert_eq!((s, b["error"].as_str()), (400, Some("invalid_property")), "{b}");
}

/// A `unique` property: no two live instances of the class hold the same value, as of each
/// command's place in the log (`unique_violation`, naming the property and the holder); a
/// deleted instance's value is free again; an update checks only values it changes; a class
/// update that makes a property unique while two live instances share a value fails
/// `schema_incompatible`.
async fn unique_values_are_held_by_one_live_instance(backend: Backend) {
    let app = &spawn_dev(backend).await;
    completes(app, app.post("/databases", json!({"name": "u"})).await).await;
    let props = json!([{"name": "email", "type": "email", "unique": true}, {"name": "n", "type": "integer", "unique": true},
        {"name": "name", "type": "string"}]);
    completes(app, app.post("/databases/u/classes", json!({"id": "User", "properties": props})).await).await;
    let create = |id: &'static str, data: Value| async move { app.post("/databases/u/classes/User/instances", json!({"id": id, "data": data})).await };
    completes(app, create("u1", json!({"email": "a@x.co", "n": 1, "name": "Ann"})).await).await;
    let id = accepted(app, create("dup", json!({"email": "a@x.co", "n": 2})).await).await;
    let status = app.wait_command(&id, WAIT).await;
    assert_eq!(status["error"]["code"], "unique_violation", "{status}");
    let message = status["error"]["message"].as_str().unwrap();
    assert!(message.contains("\"email\"") && message.contains("\"u1\""), "{status}");
    completes(app, create("u2", json!({"email": "b@x.co", "n": 2, "name": "Ann"})).await).await;
    let put = |id: &'static str, seq: u64, data: Value| async move {
        app.put(&format!("/databases/u/classes/User/instances/{id}?expected_seq={seq}"), json!({"data": data})).await
    };
    fails_with(app, put("u2", 1, json!({"n": 1})).await, "unique_violation").await;
    completes(app, put("u2", 2, json!({"name": "Bo", "n": 2})).await).await;
    // Within one bulk command, a later member sees an earlier one.
    let id = accepted(app, app.post("/databases/u/classes/User/instances/bulk", json!({"instances": [
        {"id": "u3", "data": {"n": 3}}, {"id": "u4", "data": {"n": 3}}]})).await).await;
    let status = app.wait_command(&id, WAIT).await;
    let codes: Vec<&str> = status["instances"].as_array().unwrap().iter().map(|i| i["error"]["code"].as_str().unwrap_or("")).collect();
    assert_eq!(codes, ["", "unique_violation"], "{status}");
    completes(app, app.delete("/databases/u/classes/User/instances/u1?expected_seq=1").await).await;
    completes(app, create("u5", json!({"email": "a@x.co", "n": 1})).await).await;
    // u2 is "Bo" now; u5 and u3 have no name: nulls hold no value, so only two "Ann"s would clash.
    completes(app, put("u3", 1, json!({"name": "Ann"})).await).await;
    completes(app, put("u5", 1, json!({"name": "Ann"})).await).await;
    let unique_name = json!({"properties": [props[0], props[1], {"name": "name", "type": "string", "unique": true}]});
    let id = accepted(app, app.put("/databases/u/classes/User?expected_seq=1", json!({"patch": unique_name})).await).await;
    let status = app.wait_command(&id, WAIT).await;
    assert_eq!(status["error"]["code"], "schema_incompatible", "{status}");
    assert!(status["error"]["message"].as_str().unwrap().contains("unique property \"name\""), "{status}");
    let (s, b) = app.post("/databases/u/classes", json!({"id": "Bad", "properties": [{"name": "j", "type": "json", "unique": true}]})).await;
    assert_eq!((s, b["error"].as_str()), (400, Some("invalid_property")), "{b}");
}

/// An UPDATE_ONTOLOGY_CLASS that would make live instances (of the class or a descendant)
/// invalid fails `schema_incompatible` with their count: a new required property without a
/// default, a narrowed type, `abstract` with instances. Optional properties, a required one
/// with a default (filled in on the instances' next update) and label changes always work.
async fn class_changes_that_would_break_live_instances_are_refused(backend: Backend) {
    let app = &spawn_dev(backend).await;
    completes(app, app.post("/databases", json!({"name": "e"})).await).await;
    completes(app, app.post("/databases/e/classes", json!({"id": "S", "properties": [{"name": "a", "type": "string"}]})).await).await;
    completes(app, app.post("/databases/e/classes", json!({"id": "K", "parent_class": "S"})).await).await;
    completes(app, app.post("/databases/e/classes/S/instances", json!({"id": "s1", "data": {"a": "x"}})).await).await;
    completes(app, app.post("/databases/e/classes/S/instances", json!({"id": "s2", "data": {}})).await).await;
    completes(app, app.post("/databases/e/classes/K/instances", json!({"id": "k1", "data": {}})).await).await;
    completes(app, app.post("/databases/e/classes/S/instances", json!({"id": "gone", "data": {"a": "y"}})).await).await;
    completes(app, app.delete("/databases/e/classes/S/instances/gone?expected_seq=1").await).await;
    let a = json!({"name": "a", "type": "string"});
    let update = |seq: u64, patch: Value| async move { app.put(&format!("/databases/e/classes/S?expected_seq={seq}"), json!({"patch": patch})).await };
    let refused = |seq: u64, patch: Value, count: &'static str| async move {
        let id = accepted(app, update(seq, patch).await).await;
        let status = app.wait_command(&id, WAIT).await;
        assert_eq!(status["error"]["code"], "schema_incompatible", "{status}");
        assert!(status["error"]["message"].as_str().unwrap().contains(count), "{count}: {status}");
    };
    let required_b = json!({"name": "b", "type": "integer", "required": true});
    refused(1, json!({"properties": [a, required_b]}), "make 3 live instance(s)").await;
    refused(2, json!({"properties": [{"name": "a", "type": "integer"}]}), "make 1 live instance(s)").await;
    refused(3, json!({"abstract": true}), "make 2 live instance(s)").await;
    completes(app, update(4, json!({"properties": [a, {"name": "c", "type": "string"}]})).await).await;
    completes(app, update(5, json!({"properties": [a, {"name": "b", "type": "integer", "required": true, "default": 7}]})).await).await;
    completes(app, update(6, json!({"label": "Stuff"})).await).await;
    completes(app, app.put("/databases/e/classes/S/instances/s2?expected_seq=1", json!({"data": {"a": "z"}})).await).await;
    let (_, events) = app.get("/aggregates/Instance/e:main:S:s2/events?kind=domain").await;
    assert_eq!(events["events"][1]["data"]["state"]["data"], json!({"a": "z", "b": 7}), "the default filled in: {events}");
}

/// `DELETE /databases/{db}?cascade=true`: one command deletes a database that still has
/// classes and instances; the read models drop them all, and every later command finds them
/// gone, as it finds the database.
async fn a_cascade_deletes_the_database_with_its_classes_and_instances(backend: Backend) {
    let app = &spawn_dev(backend).await;
    completes(app, app.post("/databases", json!({"name": "c"})).await).await;
    completes(app, app.post("/databases/c/classes", json!({"id": "A"})).await).await;
    completes(app, app.post("/databases/c/classes", json!({"id": "B", "parent_class": "A"})).await).await;
    completes(app, app.post("/databases/c/classes/A/instances", json!({"id": "a1", "data": {}})).await).await;
    completes(app, app.post("/databases/c/classes/B/instances", json!({"id": "b1", "data": {}})).await).await;
    fails_with(app, app.delete("/databases/c?expected_seq=1").await, "database_not_empty").await;
    let (s, b) = app.delete("/databases/c?expected_seq=2&cascade=maybe").await;
    assert_eq!((s, b["error"].as_str()), (400, Some("invalid_query")), "{b}");
    completes(app, app.delete("/databases/c?expected_seq=2&cascade=true").await).await;

    common::readmodel::caught_up(app, WAIT).await;
    for path in ["/databases/c", "/databases/c/classes/A", "/databases/c/classes/B/instances/b1"] {
        let (s, b) = app.get(path).await;
        assert_eq!(s, 404, "{path}: {b}");
    }
    fails_with(app, app.put("/databases/c/classes/A?expected_seq=1", json!({"patch": {"label": "x"}})).await, "class_not_found").await;
    fails_with(app, app.put("/databases/c/classes/A/instances/a1?expected_seq=1", json!({"data": {}})).await, "instance_not_found").await;
    fails_with(app, app.delete("/databases/c/classes/B/instances/b1?expected_seq=1").await, "instance_not_found").await;
    fails_with(app, app.post("/databases/c/classes/A/instances", json!({"id": "a2", "data": {}})).await, "class_not_found").await;
    fails_with(app, app.post("/databases/c/classes", json!({"id": "D"})).await, "database_not_found").await;
    let (s, b) = app.post("/databases", json!({"name": "c"})).await;
    assert_eq!(s, 409, "a name is never used again: {b}");
    // The failed commands after the cascade bring no row back.
    common::readmodel::caught_up(app, WAIT).await;
    for path in ["/databases/c/classes/A", "/databases/c/classes/A/instances/a1", "/databases/c/classes/B/instances/b1"] {
        let (s, b) = app.get(path).await;
        assert_eq!(s, 404, "{path}: {b}");
    }
}

/// `date`, `decimal`, `uuid`, `email` and `url` properties: a value of the right form is
/// stored, anything else fails `invalid_instance` naming the property; dates filter in date
/// order, decimals refuse order comparisons.
async fn the_new_property_types_are_checked_and_filtered(backend: Backend) {
    let app = spawn_dev(backend).await;
    completes(&app, app.post("/databases", json!({"name": "t"})).await).await;
    let props = json!([{"name": "day", "type": "date"}, {"name": "price", "type": "decimal"},
        {"name": "ref_id", "type": "uuid"}, {"name": "mail", "type": "email"}, {"name": "site", "type": "url"}]);
    completes(&app, app.post("/databases/t/classes", json!({"id": "T", "properties": props})).await).await;
    let good = json!({"day": "2026-12-03", "price": "19.90", "ref_id": "6f1c1e1a-58f5-4d57-9a55-4a35e0e0c3b1",
        "mail": "ops@example.org", "site": "https://example.org"});
    completes(&app, app.post("/databases/t/classes/T/instances", json!({"id": "late", "data": good})).await).await;
    completes(&app, app.post("/databases/t/classes/T/instances", json!({"id": "early", "data": {"day": "2025-01-31"}})).await).await;
    for (property, value) in [("day", "2026-02-30"), ("price", "1e3"), ("ref_id", "nope"), ("mail", "ops@"), ("site", "ftp://x.org")] {
        let id = accepted(&app, app.post("/databases/t/classes/T/instances", json!({"data": {property: value}})).await).await;
        let status = app.wait_command(&id, WAIT).await;
        assert_eq!(status["error"]["code"], "invalid_instance", "{property}={value}: {status}");
        assert!(status["error"]["message"].as_str().unwrap().contains(property), "names the property: {status}");
    }
    common::readmodel::caught_up(&app, WAIT).await;
    let (s, b) = app.get("/databases/t/classes/T/instances?where=day%3E%3D2026-01-01").await;
    assert_eq!(s, 200, "{b}");
    let ids: Vec<&str> = b["items"].as_array().unwrap().iter().map(|i| i["instance_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["late"]);
    let (s, b) = app.get("/databases/t/classes/T/instances?where=price%3E1").await;
    assert_eq!((s, b["error"].as_str()), (400, Some("invalid_filter")), "{b}");
}

/// `enum`, `array<T>` and `object` properties with `min`/`max`, lengths, `pattern` and
/// `default`: a bad definition is a 400 and appends nothing; an instance that breaks a
/// constraint fails with that constraint's code, naming the property (a nested one by its
/// path); a created instance gets the defaults it left out; enums filter as strings.
async fn constraints_enums_arrays_objects_and_defaults_are_checked(backend: Backend) {
    let app = spawn_dev(backend).await;
    completes(&app, app.post("/databases", json!({"name": "c"})).await).await;
    let (s, b) = app.post("/databases/c/classes", json!({"id": "Bad", "properties": [{"name": "s", "type": "enum"}]})).await;
    assert_eq!((s, b["error"].as_str()), (400, Some("invalid_property")), "{b}");
    let (s, b) = app.post("/databases/c/classes", json!({"id": "Bad", "properties": [{"name": "s", "type": "string", "pattern": "("}]})).await;
    assert_eq!((s, b["error"].as_str()), (400, Some("invalid_property")), "{b}");
    let (s, b) = app.get("/aggregates/OntologyClass/c:main:Bad").await;
    assert_eq!((s, b["version"].as_u64()), (200, Some(0)), "nothing appended: {b}");

    let props = json!([
        {"name": "status", "type": "enum", "values": ["new", "done"], "default": "new"},
        {"name": "qty", "type": "integer", "min": 1, "max": 10},
        {"name": "code", "type": "string", "min_length": 2, "max_length": 4, "pattern": "[A-Z]+"},
        {"name": "tags", "type": "array<string>", "max_length": 2, "pattern": "[a-z]+"},
        {"name": "due", "type": "date", "min": "2026-01-01"},
        {"name": "address", "type": "object", "properties": [
            {"name": "city", "type": "string", "required": true},
            {"name": "zip", "type": "string", "pattern": "[0-9]{5}"}]}]);
    completes(&app, app.post("/databases/c/classes", json!({"id": "O", "properties": props})).await).await;
    let good = json!({"qty": 3, "code": "AB", "tags": ["x", "y"], "due": "2026-06-01",
        "address": {"city": "Seoul", "zip": "04524"}});
    completes(&app, app.post("/databases/c/classes/O/instances", json!({"id": "one", "data": good})).await).await;
    completes(&app, app.post("/databases/c/classes/O/instances", json!({"id": "two", "data": {"status": "done"}})).await).await;

    let cases = [
        (json!({"status": "lost"}), "not_in_enum", "status"),
        (json!({"qty": 0}), "out_of_range", "qty"),
        (json!({"qty": 11}), "out_of_range", "qty"),
        (json!({"due": "2025-12-31"}), "out_of_range", "due"),
        (json!({"code": "A"}), "invalid_length", "code"),
        (json!({"code": "ABCDE"}), "invalid_length", "code"),
        (json!({"code": "ab"}), "pattern_mismatch", "code"),
        (json!({"tags": ["a", "b", "c"]}), "invalid_length", "tags"),
        (json!({"tags": ["a", "B"]}), "pattern_mismatch", "tags[1]"),
        (json!({"tags": ["a", 1]}), "invalid_instance", "tags[1]"),
        (json!({"address": {"zip": "04524"}}), "invalid_instance", "address.city"),
        (json!({"address": {"city": "X", "zip": "4524"}}), "pattern_mismatch", "address.zip"),
        (json!({"address": {"city": "X", "street": "Y"}}), "invalid_instance", "address.street"),
        (json!({"address": "Seoul"}), "invalid_instance", "address"),
    ];
    for (data, code, property) in cases {
        let id = accepted(&app, app.post("/databases/c/classes/O/instances", json!({"data": data})).await).await;
        let status = app.wait_command(&id, WAIT).await;
        assert_eq!(status["error"]["code"], code, "{data}: {status}");
        let message = status["error"]["message"].as_str().unwrap();
        assert!(message.contains(&format!("{property:?}")), "{data}: names {property}: {status}");
    }
    // An update is checked against the same constraints; defaults are for creates only.
    fails_with(&app, app.put("/databases/c/classes/O/instances/one?expected_seq=1", json!({"data": {"qty": 20}})).await, "out_of_range").await;

    common::readmodel::caught_up(&app, WAIT).await;
    let (s, b) = app.get("/databases/c/classes/O/instances/one").await;
    assert_eq!((s, &b["data"]["status"]), (200, &json!("new")), "the default was applied: {b}");
    let (s, b) = app.get("/databases/c/classes/O/instances?where=status=done").await;
    assert_eq!(s, 200, "{b}");
    let ids: Vec<&str> = b["items"].as_array().unwrap().iter().map(|i| i["instance_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["two"]);
}

/// A class's and a property's label and description may be a map of language tags; a class
/// read returns them as stored plus `localized`, the best match for `Accept-Language`. A
/// malformed tag is a 400.
async fn labels_may_be_translated_and_reads_pick_the_language(backend: Backend) {
    let app = spawn_dev(backend).await;
    completes(&app, app.post("/databases", json!({"name": "l"})).await).await;
    let (s, b) = app.post("/databases/l/classes", json!({"id": "Bad", "label": {"en_US": "x"}})).await;
    assert_eq!((s, b["error"].as_str()), (400, Some("invalid_request")), "{b}");
    let label = json!({"en": "Product", "ko": "제품"});
    let class = json!({"id": "P", "label": label, "description": "Things we sell",
        "properties": [{"name": "price", "type": "number", "label": {"en": "Price", "ko": "가격"}}]});
    completes(&app, app.post("/databases/l/classes", class).await).await;
    common::readmodel::caught_up(&app, WAIT).await;

    let read = |path: &'static str, language: &'static str| {
        let url = app.url(path);
        async move {
            let r = common::http().get(url).header("accept-language", language).send().await.unwrap();
            common::status_json(r).await
        }
    };
    let (s, b) = read("/databases/l/classes/P", "ko-KR, en;q=0.5").await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["label"], label, "the full map is returned as stored: {b}");
    assert_eq!(b["localized"], json!({"language": "ko", "label": "제품", "description": "Things we sell", "property_labels": {"price": "가격"}}));
    let (_, b) = read("/databases/l/classes/P", "de").await;
    assert_eq!((&b["localized"]["label"], &b["localized"]["language"]), (&json!("Product"), &json!("en")), "falls back to en: {b}");
    let (s, b) = read("/databases/l/classes", "ko").await;
    assert_eq!((s, &b["items"][0]["localized"]["label"]), (200, &json!("제품")), "{b}");
}

async fn version(app: &TestApp, instance: &str) -> u64 {
    let (s, b) = app.get(&format!("/aggregates/Instance/b:main:P:{instance}")).await;
    assert_eq!(s, 200, "{b}");
    b["version"].as_u64().unwrap()
}

/// BULK_UPDATE_INSTANCES and BULK_DELETE_INSTANCES: every member names its instance's version;
/// one stale member refuses the whole command with a 409 naming every stale one, and appends
/// nothing. Accepted, each member is decided on its own and reports its own status.
async fn bulk_updates_and_deletes_are_all_or_nothing(backend: Backend) {
    let app = spawn_dev(backend).await;
    completes(&app, app.post("/databases", json!({"name": "b"})).await).await;
    completes(&app, app.post("/databases/b/classes", json!({"id": "P", "properties": [{"name": "n", "type": "integer"}]})).await).await;
    let three = json!({"instances": [{"id": "a", "data": {"n": 0}}, {"id": "b", "data": {"n": 0}}, {"id": "c", "data": {"n": 0}}]});
    completes(&app, app.post("/databases/b/classes/P/instances/bulk", three).await).await;

    let update = |members: Value| app.post("/databases/b/classes/P/instances/bulk-update", json!({"instances": members}));
    let done = completes(&app, update(json!([{"id": "a", "expected_seq": 1, "data": {"n": 1}}, {"id": "b", "expected_seq": 1, "data": {"n": 2}}])).await).await;
    let statuses: Vec<&Value> = done["instances"].as_array().unwrap().iter().map(|i| &i["status"]).collect();
    assert_eq!(statuses, [&json!("COMPLETED"), &json!("COMPLETED")], "{done}");
    assert_eq!((version(&app, "a").await, version(&app, "b").await, version(&app, "c").await), (2, 2, 1));

    // a and c are stale, b is right: nothing is appended, and both stale ones are named.
    let (s, body) = update(json!([
        {"id": "a", "expected_seq": 1, "data": {"n": 9}},
        {"id": "b", "expected_seq": 2, "data": {"n": 9}},
        {"id": "c", "expected_seq": 0, "data": {"n": 9}},
    ])).await;
    assert_eq!((s, body["error"].as_str()), (409, Some("optimistic_concurrency_conflict")), "{body}");
    let named: Vec<(&str, u64)> = body["conflicts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["aggregate_id"].as_str().unwrap(), c["actual_seq"].as_u64().unwrap()))
        .collect();
    assert_eq!(named, [("b:main:P:a", 2), ("b:main:P:c", 1)], "{body}");
    assert_eq!((version(&app, "a").await, version(&app, "b").await, version(&app, "c").await), (2, 2, 1), "nothing appended");

    // Each member is decided alone: one that does not exist fails, the others complete.
    let id = accepted(&app, update(json!([{"id": "c", "expected_seq": 1, "data": {"n": 3}}, {"id": "ghost", "expected_seq": 0, "data": {}}])).await).await;
    let status = app.wait_command(&id, WAIT).await;
    let by_id: std::collections::HashMap<&str, (&str, &str)> = status["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["instance_id"].as_str().unwrap(), (i["status"].as_str().unwrap(), i["error"]["code"].as_str().unwrap_or(""))))
        .collect();
    assert_eq!(by_id["c"], ("COMPLETED", ""), "{status}");
    assert_eq!(by_id["ghost"], ("FAILED", "instance_not_found"), "{status}");

    let delete = |members: Value| app.post("/databases/b/classes/P/instances/bulk-delete", json!({"instances": members}));
    let (s, body) = delete(json!([{"id": "a", "expected_seq": 2}, {"id": "b", "expected_seq": 1}])).await;
    assert_eq!((s, body["conflicts"][0]["aggregate_id"].as_str()), (409, Some("b:main:P:b")), "{body}");
    completes(&app, delete(json!([{"id": "a", "expected_seq": 2}, {"id": "b", "expected_seq": 2}])).await).await;
    let (_, outcomes) = app.get("/aggregates/Instance/b:main:P:a/events?kind=domain").await;
    assert_eq!(outcomes["events"].as_array().unwrap().last().unwrap()["event_type"], "INSTANCE_DELETED", "{outcomes}");

    // Bad requests append nothing and say why.
    for (members, query, code) in [
        (json!([]), "", "invalid_bulk_size"),
        (json!([{"id": "c", "expected_seq": 2}, {"id": "c", "expected_seq": 3}]), "", "invalid_request"),
        (json!([{"id": "c", "expected_seq": 2}]), "?expected_seq=2", "invalid_expected_seq"),
        (json!([{"id": "c"}]), "", "invalid_body"),
    ] {
        let (s, body) = app.post(&format!("/databases/b/classes/P/instances/bulk-delete{query}"), json!({"instances": members})).await;
        assert_eq!((s, body["error"].as_str()), (400, Some(code)), "{body}");
    }
    assert_eq!(version(&app, "c").await, 2, "nothing appended");
}

/// The envelopes of an aggregate's commands, as stored in the log.
async fn command_bytes(app: &TestApp, aggregate: &str) -> Vec<Vec<u8>> {
    let (_, page) = app.get(&format!("/aggregates/{aggregate}/events")).await;
    page["events"].as_array().unwrap().iter().map(|e| serde_json::to_vec(e).unwrap()).collect()
}

/// n+2 delivered before n+1: it is not applied first, n+1 is not dropped, and a command that
/// waited too long fails without being applied, to be re-driven later.
async fn a_later_sequence_waits_for_the_earlier_one(backend: Backend) {
    use spiced::worker::handler::Disposition;
    use spiced::worker::lanes::Slot;
    use spiced::worker::{Role, Shared};
    let (mut config, dir) = common::isolated_config(backend).await;
    config.worker.max_attempts = 1;
    config.worker.gap_wait_ms = 300;
    let app = common::spawn_with(config.clone(), dir).await;
    app.post("/databases", json!({"name": "g"})).await;
    app.post("/databases/g/classes", json!({"id": "C"})).await;
    for v in 1..=3 {
        let (s, b) = app.put(&format!("/databases/g/classes/C?expected_seq={v}"), json!({"patch": {"label": format!("v{}", v + 1)}})).await;
        assert_eq!(s, 202, "{b}");
    }
    let tasks = tokio_util::task::TaskTracker::new();
    let shared = Shared::open(&config, &tasks).await.unwrap();
    let handler = shared.handler(Role::Ontology);
    let stop = spiced::shutdown::Graceful::new(tokio_util::sync::CancellationToken::new(), Duration::from_secs(10));
    let db = command_bytes(&app, "Database/g").await;
    let class = command_bytes(&app, "OntologyClass/g:main:C").await;
    assert_eq!(handler.handle(&db[0], &Slot::free(), &stop).await.unwrap(), Disposition::Done);
    assert_eq!(handler.handle(&class[0], &Slot::free(), &stop).await.unwrap(), Disposition::Done);
    // Sequence 3 before 2: it waits, then fails this attempt without applying anything.
    match handler.handle(&class[2], &Slot::free(), &stop).await.unwrap() {
        Disposition::DeadLetter { reason, .. } => assert!(reason.contains("out of order"), "{reason}"),
        other => panic!("sequence 3 ran before 2: {other:?}"),
    }
    let key = spiced::domain::AggregateKey::class("g", "main", "C");
    assert_eq!(shared.state.state(&key).await.unwrap().0, 1, "nothing applied past sequence 1");
    // Sequence 4 arrives while 2 is not done: it waits for it, and 2 is not dropped.
    let waiting = {
        let handler = shared.handler(Role::Ontology);
        let (bytes, stop) = (class[3].clone(), stop.clone());
        tokio::spawn(async move { handler.handle(&bytes, &Slot::free(), &stop).await.unwrap() })
    };
    assert_eq!(handler.handle(&class[1], &Slot::free(), &stop).await.unwrap(), Disposition::Done);
    // 3 failed terminally: the operator re-drives it, then 4 can finish.
    let event_id: uuid::Uuid = serde_json::from_slice::<Value>(&class[2]).unwrap()["event_id"].as_str().unwrap().parse().unwrap();
    assert!(shared.db.registry.redrive("ontology-worker", event_id).await.unwrap());
    assert_eq!(handler.handle(&class[2], &Slot::free(), &stop).await.unwrap(), Disposition::Done);
    let fourth = waiting.await.unwrap();
    let (_, outcomes) = app.get("/aggregates/OntologyClass/g:main:C/events?kind=domain").await;
    let labels: Vec<(u64, String)> = outcomes["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["sequence_number"].as_u64().unwrap(), e["data"]["state"]["label"].as_str().unwrap_or("").to_string()))
        .collect();
    assert_eq!(labels[..3], [(1, String::new()), (2, "v2".into()), (3, "v3".into())], "{labels:?}");
    if fourth == Disposition::Done {
        assert_eq!(labels.get(3), Some(&(4, "v4".to_string())));
    }
}

/// The outcome of the command `bytes` after handling it, as (event type, error code).
async fn outcome_of(app: &TestApp, bytes: &[u8]) -> (String, String) {
    let command: Value = serde_json::from_slice(bytes).unwrap();
    let status = app.wait_command(command["data"]["command_id"].as_str().unwrap(), WAIT).await;
    let code = status["error"]["code"].as_str().unwrap_or_default().to_string();
    (status["status"].as_str().unwrap().to_string(), code)
}

/// A command is decided against the other aggregates as of its place in the log, whatever
/// order the workers take them in. C's delete is accepted after instance "before" and ahead
/// of instance "after"; the workers take the delete and "after" first: the delete waits for
/// "before" (a live instance as of its place: `class_in_use`), and "after" waits for the
/// delete (so C is still there for it). Within one segment, "before" is the order of the
/// segment's events: an instance ahead of its class's create fails even though the create is
/// applied first (the API refuses such an instance command for a class never named, so only a
/// planted segment holds one).
async fn outcomes_follow_log_order_not_processing_order(backend: Backend) {
    use spiced::domain::{AggregateKey, CommandType};
    use spiced::worker::handler::Disposition;
    use spiced::worker::lanes::Slot;
    use spiced::worker::{Role, Shared};
    let (mut config, dir) = common::isolated_config(backend).await;
    config.worker.max_attempts = 1;
    config.worker.gap_wait_ms = 20_000;
    let app = common::spawn_with(config.clone(), dir).await;
    app.post("/databases", json!({"name": "o"})).await;
    app.post("/databases/o/classes", json!({"id": "C"})).await;
    // Accepted while C exists; C's delete is accepted after it.
    accepted(&app, app.post("/databases/o/classes/C/instances", json!({"id": "before", "data": {}})).await).await;
    accepted(&app, app.delete("/databases/o/classes/C?expected_seq=1").await).await;
    accepted(&app, app.post("/databases/o/classes/C/instances", json!({"id": "after", "data": {}})).await).await;
    // One segment: class E then an instance of E; an instance of F then class F.
    let plant = |command_type, key, payload| common::plant::command(&app.config, command_type, key, 1, payload);
    let class = |id: &str| json!({"db": "o", "branch": "main", "class_id": id, "label": null, "description": null,
                                  "properties": [], "parent_class": null, "abstract": false});
    let instance = |class_id: &str, id: &str| json!({"db": "o", "branch": "main", "class_id": class_id, "instance_id": id, "data": {}});
    let segment = [
        plant(CommandType::CreateOntologyClass, AggregateKey::class("o", "main", "E"), class("E")),
        plant(CommandType::CreateInstance, AggregateKey::instance("o", "main", "E", "e"), instance("E", "e")),
        plant(CommandType::CreateInstance, AggregateKey::instance("o", "main", "F", "f"), instance("F", "f")),
        plant(CommandType::CreateOntologyClass, AggregateKey::class("o", "main", "F"), class("F")),
    ];
    common::plant::segment(&app, &segment).await;
    accepted(&app, app.post("/databases", json!({"name": "records-the-planted-segment"})).await).await;

    let tasks = tokio_util::task::TaskTracker::new();
    let shared = Shared::open(&config, &tasks).await.unwrap();
    let (ontology, instances) = (shared.handler(Role::Ontology), shared.handler(Role::Instance));
    let stop = spiced::shutdown::Graceful::new(tokio_util::sync::CancellationToken::new(), Duration::from_secs(10));
    let bytes = |e: &spiced::envelope::EventEnvelope| serde_json::to_vec(e).unwrap();
    // The ontology's creates first, then the delete of C and the instance commands together.
    let class_c = command_bytes(&app, "OntologyClass/o:main:C").await;
    let mut creates = command_bytes(&app, "Database/o").await;
    creates.extend([class_c[0].clone(), bytes(&segment[0]), bytes(&segment[3])]);
    for command in &creates {
        assert_eq!(ontology.handle(command, &Slot::free(), &stop).await.unwrap(), Disposition::Done);
    }
    let before = &command_bytes(&app, "Instance/o:main:C:before").await[0];
    let after = &command_bytes(&app, "Instance/o:main:C:after").await[0];
    let free = Slot::free();
    let (delete, after_done, before_done) = futures::join!(
        ontology.handle(&class_c[1], &free, &stop),
        instances.handle(after, &free, &stop),
        // Later, so the two above are likely waiting by then; the outcomes must not depend on it.
        async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            instances.handle(before, &free, &stop).await
        },
    );
    for done in [delete, after_done, before_done] {
        assert_eq!(done.unwrap(), Disposition::Done);
    }
    assert_eq!(outcome_of(&app, before).await, ("COMPLETED".into(), String::new()));
    assert_eq!(outcome_of(&app, &class_c[1]).await, ("FAILED".into(), "class_in_use".into()));
    assert_eq!(outcome_of(&app, after).await, ("COMPLETED".into(), String::new()), "C is live as of \"after\"");
    for (command, status, code) in [(&segment[1], "COMPLETED", ""), (&segment[2], "FAILED", "class_not_found")] {
        instances.handle(&bytes(command), &Slot::free(), &stop).await.unwrap();
        assert_eq!(outcome_of(&app, &bytes(command)).await, (status.to_string(), code.to_string()), "{}", command.aggregate_id);
    }
}

/// A command whose data the database refuses ends at its first attempt in a dead letter
/// (`failed`, re-drivable), instead of being retried while the commands after it wait. It is
/// planted in the log behind the API's back (the API refuses a NUL): a parent class id holding
/// a NUL, which PostgreSQL cannot bind when the worker looks that class up. SQLite binds it
/// (the same command fails in the domain there, parent_class_not_found), so PostgreSQL only.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_command_the_database_refuses_is_dead_lettered_at_once() {
    use spiced::domain::{AggregateKey, CommandType};
    let (mut config, dir) = common::isolated_config(Backend::S3Postgres).await;
    // Retried like an infrastructure failure, it would take many minutes to give up.
    config.worker.max_attempts = 1000;
    config.worker.backoff_cap_ms = 1000;
    let app = common::spawn_role_dev(config, dir).await;
    completes(&app, app.post("/databases", json!({"name": "shop"})).await).await;
    let payload = json!({"db": "shop", "branch": "main", "class_id": "C", "label": null, "description": null,
                         "properties": [], "parent_class": "P\u{0}", "abstract": false});
    let key = AggregateKey::class("shop", "main", "C");
    let poison = common::plant::command(&app.config, CommandType::CreateOntologyClass, key, 1, payload);
    common::plant::segment(&app, std::slice::from_ref(&poison)).await;
    // This write records the planted segment; the embedded workers take the log segment by
    // segment, so it completes only once the planted command is finished one way or another.
    completes(&app, app.post("/databases/shop/classes", json!({"id": "D"})).await).await;
    let status = app.wait_command(&poison.event_id.to_string(), WAIT).await;
    assert_eq!((status["status"].as_str(), status["error"]["code"].as_str()), (Some("FAILED"), Some("processing_error")), "{status}");
    assert!(status["error"]["message"].as_str().unwrap_or_default().contains("22021"), "{status}");
    let (db, _) = app.storage().await;
    let rows = db.registry.rows(poison.event_id).await.unwrap();
    // Given up at the first attempt that reached the refused statement: an earlier attempt may
    // have failed on something worth retrying (under load, seen: one), but never the 1000
    // attempts a retried refusal would run to.
    assert_eq!(rows[0].status.as_str(), "failed", "{rows:?}");
    assert!(rows[0].attempt_count <= 3, "dead-lettered, not retried: {rows:?}");

    // Under dev, listed over HTTP and re-driven to the embedded workers, which run it again
    // (the log is followed past it): it fails again, later, as the database still refuses it.
    let id = poison.event_id.to_string();
    let (s, listed) = app.get("/dead-letters/ontology").await;
    assert_eq!(s, 200, "{listed}");
    let letter = listed["items"].as_array().unwrap().iter().find(|l| l["event_id"] == id.as_str()).cloned().expect("listed");
    let (s, redriven) = app.post(&format!("/dead-letters/ontology/{id}/redrive"), json!({})).await;
    assert_eq!(s, 200, "{redriven}");
    assert_eq!((redriven["reset"].as_bool(), redriven["topic"].as_str()), (Some(true), None), "{redriven}");
    let deadline = std::time::Instant::now() + WAIT;
    let again = loop {
        let (_, shown) = app.get(&format!("/dead-letters/ontology/{id}")).await;
        if shown["failed_at"].is_string() && shown["failed_at"] != letter["failed_at"] {
            break shown;
        }
        assert!(std::time::Instant::now() < deadline, "the re-driven command did not run again: {shown}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(again["error"].as_str().unwrap_or_default().contains("22021"), "{again}");
    assert_eq!(again["envelope"]["event_id"], id.as_str());
}
