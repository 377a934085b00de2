//! UPDATE_INSTANCE: a JSON merge patch (RFC 7386) on an instance's data, the result checked
//! against its class chain, which it reads, and the instances the patch references.

use super::{duplicate, missing_reference, not_unique, Context, Invalid, Request, StateReader};
use crate::domain::ids::{validate_name, AggregateKey};
use crate::domain::rules::{fail, instance_key, merge_patch, Decision, Facts};
use crate::domain::schema::validate_data_keys;
use crate::domain::values::{unique_values, validate, with_defaults};
use crate::domain::{Command, CommandType};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use utoipa::ToSchema;

pub const EVENT_TYPE: &str = "INSTANCE_UPDATED";

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateInstanceBody {
    data: Map<String, Value>,
}

pub fn request(ctx: &Context, db: &str, class_id: &str, instance_id: &str, body: UpdateInstanceBody) -> Result<Request, Invalid> {
    for (field, value) in [("db", db), ("class_id", class_id), ("instance_id", instance_id)] {
        validate_name(field, value)?;
    }
    validate_data_keys(&body.data)?;
    let branch = ctx.branch()?;
    let expected_seq = ctx.expected_for_update()?;
    let target = Target { db, branch: &branch, class_id, instance_id };
    Ok(Request::single(command(target, expected_seq, body.data, CommandType::UpdateInstance)))
}

/// The instance one command (or one member of a bulk command) names; the caller has checked
/// the names.
#[derive(Clone, Copy)]
pub(super) struct Target<'a> {
    pub db: &'a str,
    pub branch: &'a str,
    pub class_id: &'a str,
    pub instance_id: &'a str,
}

/// The command patching one instance (alone, or as a member of a bulk update).
pub(super) fn command(t: Target<'_>, expected_seq: u64, data: Map<String, Value>, command_type: CommandType) -> Command {
    Command {
        command_type,
        aggregate: AggregateKey::instance(t.db, t.branch, t.class_id, t.instance_id),
        expected_seq,
        payload: json!({
            "db": t.db, "branch": t.branch, "class_id": t.class_id,
            "instance_id": t.instance_id, "data": data,
        }),
    }
}

/// Besides the class chain (read for every instance command): whether the instances the patch
/// references exist (only the `ref` values it sets are read, so an update that leaves a
/// reference alone never fails on it), and whether another instance holds a unique value the
/// update changes.
pub async fn facts<R: StateReader>(payload: &Value, log: &R, facts: &mut Facts) -> Result<(), R::Error> {
    let patch = payload["data"].as_object().cloned().unwrap_or_default();
    facts.missing_reference = missing_reference(log, payload, &patch, &facts.classes).await?;
    if let Some(current) = &facts.current {
        let before = current["data"].as_object().cloned().unwrap_or_default();
        let after = patched(current, payload, &facts.classes);
        let changed = unique_values(&after, &facts.classes).into_iter().filter(|(p, v)| before.get(p) != Some(v)).collect();
        facts.duplicate = duplicate(log, payload, changed).await?;
    }
    Ok(())
}

/// The instance's data with the patch applied and the defaults of properties the class gained
/// since (or the patch removed) filled in, as on create: a class may add a required property
/// with a default (schema_incompatible).
fn patched(current: &Value, payload: &Value, classes: &[Value]) -> Map<String, Value> {
    let mut data = current["data"].as_object().cloned().unwrap_or_default();
    merge_patch(&mut data, payload["data"].as_object().cloned().unwrap_or_default());
    with_defaults(data, classes)
}

pub fn decide(payload: &Value, facts: &Facts) -> Decision {
    let Some(current) = &facts.current else {
        return fail("instance_not_found", "the instance does not exist");
    };
    if facts.classes.is_empty() {
        return fail("class_not_found", format!("class {} does not exist", payload["class_id"]));
    }
    let data = patched(current, payload, &facts.classes);
    if let Err(invalid) = validate(&data, &facts.classes) {
        return fail(invalid.code(), invalid.to_string());
    }
    if let Some(missing) = &facts.missing_reference {
        return super::create_instance::invalid_reference(missing);
    }
    if let Some(duplicate) = &facts.duplicate {
        return not_unique(&data, duplicate);
    }
    let mut state = instance_key(payload);
    state.insert("data".into(), Value::Object(data));
    Decision::Event { event_type: EVENT_TYPE, state: Value::Object(state) }
}
