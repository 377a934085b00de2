//! CREATE_INSTANCE: an instance of a class, its data checked against the class and its
//! ancestors. Reads the class chain, the instances the data references and, for a unique
//! property, the class's other instances.

use super::{duplicate, missing_reference, not_unique, Context, Invalid, Request, StateReader};
use crate::domain::ids::{validate_name, AggregateKey, Name};
use crate::domain::rules::{fail, instance_key, Decision, Facts};
use crate::domain::schema::validate_data_keys;
use crate::domain::values::{unique_values, validate, with_defaults, Reference};
use crate::domain::{Command, CommandType};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use utoipa::ToSchema;
use uuid::Uuid;

pub const EVENT_TYPE: &str = "INSTANCE_CREATED";

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateInstanceBody {
    /// The instance id; else `data.<class_id lowercased>_id`, else one derived from the command id.
    #[serde(default)]
    #[schema(value_type = Option<Name>)]
    id: Option<String>,
    data: Map<String, Value>,
}

pub fn request(ctx: &Context, db: &str, class_id: &str, body: CreateInstanceBody) -> Result<Request, Invalid> {
    let branch = checked_target(ctx, db, class_id)?;
    let command = command(ctx, db, &branch, class_id, &body, 0, CommandType::CreateInstance)?;
    Ok(Request::single(command))
}

/// The path's names and the branch, checked, and a create's version; the branch is returned.
pub(super) fn checked_target(ctx: &Context, db: &str, class_id: &str) -> Result<String, Invalid> {
    validate_name("db", db)?;
    validate_name("class_id", class_id)?;
    let branch = ctx.branch()?;
    ctx.expected_for_create()?;
    Ok(branch)
}

/// The command creating one instance (`index` is its place in a bulk command).
pub(super) fn command(
    ctx: &Context,
    db: &str,
    branch: &str,
    class_id: &str,
    body: &CreateInstanceBody,
    index: usize,
    command_type: CommandType,
) -> Result<Command, Invalid> {
    validate_data_keys(&body.data)?;
    let instance_id = instance_id(class_id, body, ctx.command_id, index)?;
    Ok(Command {
        command_type,
        aggregate: AggregateKey::instance(db, branch, class_id, &instance_id),
        expected_seq: 0,
        payload: json!({
            "db": db, "branch": branch, "class_id": class_id,
            "instance_id": instance_id, "data": body.data,
        }),
    })
}

/// The instance id: the body's `id`, else `data.<class_id lowercased>_id` when it is a string,
/// else a UUID derived from the command id (so a repeat with the same Idempotency-Key names the
/// same instance).
fn instance_id(class_id: &str, body: &CreateInstanceBody, command_id: Uuid, index: usize) -> Result<String, Invalid> {
    let from_data = body
        .data
        .get(&format!("{}_id", class_id.to_ascii_lowercase()))
        .and_then(Value::as_str);
    let id = match (&body.id, from_data) {
        (Some(id), _) => id.clone(),
        (None, Some(id)) => id.to_string(),
        (None, None) => Uuid::new_v5(&command_id, format!("instance:{index}").as_bytes()).to_string(),
    };
    validate_name("id", &id)?;
    Ok(id)
}

/// Besides the class chain (read for every instance command): whether the instances the data
/// (with its defaults) references exist, and whether another instance holds one of its unique
/// values.
pub async fn facts<R: StateReader>(payload: &Value, log: &R, facts: &mut Facts) -> Result<(), R::Error> {
    let data = with_defaults(payload["data"].as_object().cloned().unwrap_or_default(), &facts.classes);
    facts.missing_reference = missing_reference(log, payload, &data, &facts.classes).await?;
    facts.duplicate = duplicate(log, payload, unique_values(&data, &facts.classes)).await?;
    Ok(())
}

pub fn decide(payload: &Value, facts: &Facts) -> Decision {
    let Some(class) = facts.classes.first() else {
        return fail("class_not_found", format!("class {} does not exist", payload["class_id"]));
    };
    if class["abstract"].as_bool() == Some(true) {
        return fail("class_is_abstract", "instances of an abstract class cannot be created");
    }
    if facts.current.is_some() {
        return fail("instance_exists", "the instance already exists");
    }
    let data = with_defaults(payload["data"].as_object().cloned().unwrap_or_default(), &facts.classes);
    if let Err(invalid) = validate(&data, &facts.classes) {
        return fail(invalid.code(), invalid.to_string());
    }
    if let Some(missing) = &facts.missing_reference {
        return invalid_reference(missing);
    }
    if let Some(duplicate) = &facts.duplicate {
        return not_unique(&data, duplicate);
    }
    let mut state = instance_key(payload);
    state.insert("data".into(), Value::Object(data));
    Decision::Event { event_type: EVENT_TYPE, state: Value::Object(state) }
}

/// The outcome of data that names an instance that does not exist.
pub(super) fn invalid_reference(missing: &Reference) -> Decision {
    let Reference { property, class_id, instance_id } = missing;
    fail("invalid_reference", format!("property {property:?} names instance {instance_id:?} of class {class_id}, which does not exist"))
}
