//! Deciding a command's outcome: pure functions from the command and the facts read from the
//! log (current aggregate state, its database, its class) to one domain event or a failure.
//!
//! Domain events carry the aggregate's full resulting state in `data.state` (`null` once
//! deleted), so the state of any aggregate is its last outcome's `data.state`, and a
//! projection never has to merge patches (the reference lost fields that way).

use super::CommandType;
use serde_json::{json, Map, Value};

/// What the log says, as needed by a command.
#[derive(Debug, Default, Clone)]
pub struct Facts {
    /// The aggregate's current state (`None`: never created, or deleted).
    pub current: Option<Value>,
    /// The state of the database the aggregate belongs to.
    pub database: Option<Value>,
    /// The instance's class, then its ancestors (for instance commands), or the parent class
    /// a class command names (for class commands).
    pub classes: Vec<Value>,
    /// Whether the database still has live classes (for DELETE_DATABASE).
    pub database_has_classes: bool,
}

/// A command's one outcome.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// A domain event: its type and the aggregate's resulting state.
    Event { event_type: &'static str, state: Value },
    /// `COMMAND_FAILED` with a machine-readable code and a message.
    Failed { code: &'static str, message: String },
}

fn fail(code: &'static str, message: impl Into<String>) -> Decision {
    Decision::Failed { code, message: message.into() }
}

pub fn decide(command_type: CommandType, payload: &Value, facts: &Facts) -> Decision {
    match command_type {
        CommandType::CreateDatabase => create_database(payload, facts),
        CommandType::DeleteDatabase => delete_database(facts),
        CommandType::CreateOntologyClass => create_class(payload, facts),
        CommandType::UpdateOntologyClass => update_class(payload, facts),
        CommandType::DeleteOntologyClass => delete_class(facts),
        CommandType::CreateInstance | CommandType::BulkCreateInstances => create_instance(payload, facts),
        CommandType::UpdateInstance => update_instance(payload, facts),
        CommandType::DeleteInstance => delete_instance(facts),
    }
}

/// The domain event type of a successful command.
pub fn event_type_of(command_type: CommandType) -> &'static str {
    match command_type {
        CommandType::CreateDatabase => "DATABASE_CREATED",
        CommandType::DeleteDatabase => "DATABASE_DELETED",
        CommandType::CreateOntologyClass => "ONTOLOGY_CLASS_CREATED",
        CommandType::UpdateOntologyClass => "ONTOLOGY_CLASS_UPDATED",
        CommandType::DeleteOntologyClass => "ONTOLOGY_CLASS_DELETED",
        CommandType::CreateInstance | CommandType::BulkCreateInstances => "INSTANCE_CREATED",
        CommandType::UpdateInstance => "INSTANCE_UPDATED",
        CommandType::DeleteInstance => "INSTANCE_DELETED",
    }
}

fn create_database(payload: &Value, facts: &Facts) -> Decision {
    if facts.current.is_some() {
        return fail("database_exists", "the database already exists");
    }
    Decision::Event {
        event_type: "DATABASE_CREATED",
        state: json!({"db": payload["db"], "name": payload["name"], "description": payload["description"]}),
    }
}

fn delete_database(facts: &Facts) -> Decision {
    if facts.current.is_none() {
        return fail("database_not_found", "the database does not exist");
    }
    if facts.database_has_classes {
        return fail("database_not_empty", "the database still has classes; delete them first");
    }
    Decision::Event { event_type: "DATABASE_DELETED", state: Value::Null }
}

fn create_class(payload: &Value, facts: &Facts) -> Decision {
    if facts.database.is_none() {
        return fail("database_not_found", format!("database {} does not exist", payload["db"]));
    }
    if facts.current.is_some() {
        return fail("class_exists", "the class already exists");
    }
    if let Some(d) = check_parent(payload.get("parent_class"), facts) {
        return d;
    }
    let mut state = payload.clone();
    if let Some(obj) = state.as_object_mut() {
        obj.entry("abstract").or_insert(json!(false));
    }
    Decision::Event { event_type: "ONTOLOGY_CLASS_CREATED", state }
}

fn check_parent(parent: Option<&Value>, facts: &Facts) -> Option<Decision> {
    let parent = parent.and_then(Value::as_str)?;
    if facts.classes.is_empty() {
        return Some(fail("parent_class_not_found", format!("parent class {parent} does not exist")));
    }
    None
}

fn update_class(payload: &Value, facts: &Facts) -> Decision {
    let Some(current) = &facts.current else {
        return fail("class_not_found", "the class does not exist");
    };
    let patch = payload["patch"].as_object().cloned().unwrap_or_default();
    if let Some(d) = check_parent(patch.get("parent_class"), facts) {
        return d;
    }
    let mut state = current.clone();
    if let Some(obj) = state.as_object_mut() {
        for (k, v) in patch {
            obj.insert(k, v);
        }
    }
    Decision::Event { event_type: "ONTOLOGY_CLASS_UPDATED", state }
}

fn delete_class(facts: &Facts) -> Decision {
    if facts.current.is_none() {
        return fail("class_not_found", "the class does not exist");
    }
    Decision::Event { event_type: "ONTOLOGY_CLASS_DELETED", state: Value::Null }
}

fn create_instance(payload: &Value, facts: &Facts) -> Decision {
    let Some(class) = facts.classes.first() else {
        return fail("class_not_found", format!("class {} does not exist", payload["class_id"]));
    };
    if class["abstract"].as_bool() == Some(true) {
        return fail("class_is_abstract", "instances of an abstract class cannot be created");
    }
    if facts.current.is_some() {
        return fail("instance_exists", "the instance already exists");
    }
    let data = payload["data"].as_object().cloned().unwrap_or_default();
    if let Err(message) = validate(&data, &facts.classes) {
        return fail("invalid_instance", message);
    }
    let mut state = instance_key(payload);
    state.insert("data".into(), Value::Object(data));
    Decision::Event { event_type: "INSTANCE_CREATED", state: Value::Object(state) }
}

fn update_instance(payload: &Value, facts: &Facts) -> Decision {
    let Some(current) = &facts.current else {
        return fail("instance_not_found", "the instance does not exist");
    };
    if facts.classes.is_empty() {
        return fail("class_not_found", format!("class {} does not exist", payload["class_id"]));
    }
    let mut data = current["data"].as_object().cloned().unwrap_or_default();
    merge_patch(&mut data, payload["data"].as_object().cloned().unwrap_or_default());
    if let Err(message) = validate(&data, &facts.classes) {
        return fail("invalid_instance", message);
    }
    let mut state = instance_key(payload);
    state.insert("data".into(), Value::Object(data));
    Decision::Event { event_type: "INSTANCE_UPDATED", state: Value::Object(state) }
}

fn delete_instance(facts: &Facts) -> Decision {
    if facts.current.is_none() {
        return fail("instance_not_found", "the instance does not exist");
    }
    Decision::Event { event_type: "INSTANCE_DELETED", state: Value::Null }
}

fn instance_key(payload: &Value) -> Map<String, Value> {
    ["db", "branch", "class_id", "instance_id"]
        .iter()
        .map(|k| (k.to_string(), payload[*k].clone()))
        .collect()
}

/// RFC 7386 merge patch: `null` removes a key, objects merge, anything else replaces.
pub fn merge_patch(target: &mut Map<String, Value>, patch: Map<String, Value>) {
    for (k, v) in patch {
        match v {
            Value::Null => {
                target.remove(&k);
            }
            Value::Object(p) => match target.get_mut(&k) {
                Some(Value::Object(t)) => merge_patch(t, p),
                _ => {
                    let mut fresh = Map::new();
                    merge_patch(&mut fresh, p);
                    target.insert(k, Value::Object(fresh));
                }
            },
            other => {
                target.insert(k, other);
            }
        }
    }
}

/// Instance data against its class and ancestors: known properties only, right types, every
/// required property present.
pub fn validate(data: &Map<String, Value>, classes: &[Value]) -> Result<(), String> {
    let props: Vec<&Value> = classes
        .iter()
        .flat_map(|c| c["properties"].as_array().into_iter().flatten())
        .collect();
    // By name, so a large object costs one lookup a key, not a scan of the class.
    let by_name: std::collections::HashMap<&str, &Value> =
        props.iter().rev().filter_map(|p| Some((p["name"].as_str()?, *p))).collect();
    for (key, value) in data {
        let Some(prop) = by_name.get(key.as_str()) else {
            return Err(format!("unknown property {key:?}"));
        };
        let ty = prop["type"].as_str().unwrap_or("json");
        if !value.is_null() && !type_matches(ty, value) {
            return Err(format!("property {key:?} must be {ty}, got {value}"));
        }
    }
    for prop in &props {
        let name = prop["name"].as_str().unwrap_or_default();
        if prop["required"].as_bool() == Some(true) && data.get(name).is_none_or(Value::is_null) {
            return Err(format!("required property {name:?} is missing"));
        }
    }
    Ok(())
}

fn type_matches(ty: &str, value: &Value) -> bool {
    match ty {
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "datetime" => value
            .as_str()
            .is_some_and(|s| chrono::DateTime::parse_from_rfc3339(s).is_ok()),
        "json" => true,
        t if t.starts_with("ref:") => value.is_string(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(props: Value) -> Value {
        json!({"class_id": "C", "properties": props, "abstract": false})
    }

    #[test]
    fn instances_are_validated_against_their_class() {
        let classes = vec![class(json!([
            {"name": "name", "type": "string", "required": true},
            {"name": "n", "type": "integer"},
            {"name": "at", "type": "datetime"},
            {"name": "owner", "type": "ref:Person"}
        ]))];
        let ok = json!({"name": "x", "n": 3, "at": "2025-01-01T00:00:00Z", "owner": "p1"});
        assert!(validate(ok.as_object().unwrap(), &classes).is_ok());
        for bad in [
            json!({"n": 1}),
            json!({"name": "x", "n": 1.5}),
            json!({"name": "x", "at": "yesterday"}),
            json!({"name": "x", "extra": 1}),
            json!({"name": 5}),
        ] {
            assert!(validate(bad.as_object().unwrap(), &classes).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn inherited_properties_count() {
        let child = class(json!([{"name": "a", "type": "string"}]));
        let parent = class(json!([{"name": "b", "type": "boolean", "required": true}]));
        let data = json!({"a": "x", "b": true});
        assert!(validate(data.as_object().unwrap(), &[child.clone(), parent.clone()]).is_ok());
        assert!(validate(json!({"a": "x"}).as_object().unwrap(), &[child, parent]).is_err());
    }

    #[test]
    fn update_is_a_merge_patch_on_the_full_state() {
        let classes = vec![class(json!([{"name": "a", "type": "integer"}, {"name": "b", "type": "integer"}]))];
        let facts = Facts {
            current: Some(json!({"db": "d", "data": {"a": 1, "b": 2}})),
            classes,
            ..Default::default()
        };
        let payload = json!({"db": "d", "branch": "main", "class_id": "C", "instance_id": "i", "data": {"b": null, "a": 5}});
        match decide(CommandType::UpdateInstance, &payload, &facts) {
            Decision::Event { event_type, state } => {
                assert_eq!(event_type, "INSTANCE_UPDATED");
                assert_eq!(state["data"], json!({"a": 5}));
                assert_eq!(state["instance_id"], "i");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn class_updates_keep_every_field() {
        let facts = Facts {
            current: Some(json!({"class_id": "C", "label": "L", "description": "D", "properties": []})),
            database: Some(json!({})),
            ..Default::default()
        };
        let d = decide(CommandType::UpdateOntologyClass, &json!({"patch": {"label": "M"}}), &facts);
        assert_eq!(
            d,
            Decision::Event {
                event_type: "ONTOLOGY_CLASS_UPDATED",
                state: json!({"class_id": "C", "label": "M", "description": "D", "properties": []})
            }
        );
    }

    #[test]
    fn failures_have_codes() {
        let none = Facts::default();
        let cases = [
            (CommandType::CreateOntologyClass, "database_not_found"),
            (CommandType::DeleteDatabase, "database_not_found"),
            (CommandType::CreateInstance, "class_not_found"),
            (CommandType::UpdateInstance, "instance_not_found"),
            (CommandType::DeleteInstance, "instance_not_found"),
        ];
        for (ty, code) in cases {
            match decide(ty, &json!({"data": {}}), &none) {
                Decision::Failed { code: c, .. } => assert_eq!(c, code, "{ty:?}"),
                other => panic!("{ty:?}: {other:?}"),
            }
        }
        let non_empty = Facts { current: Some(json!({})), database_has_classes: true, ..Default::default() };
        assert!(matches!(
            decide(CommandType::DeleteDatabase, &json!({}), &non_empty),
            Decision::Failed { code: "database_not_empty", .. }
        ));
        let abstract_class = Facts { classes: vec![json!({"abstract": true})], ..Default::default() };
        assert!(matches!(
            decide(CommandType::CreateInstance, &json!({"data": {}}), &abstract_class),
            Decision::Failed { code: "class_is_abstract", .. }
        ));
    }
}
