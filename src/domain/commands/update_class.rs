//! UPDATE_ONTOLOGY_CLASS: changes some fields of a class (a patch; absent fields stay). Reads
//! what a create reads: the database and the parent chain if the patch names a parent.

use super::create_class::{check_parent, check_refs};
use super::{Context, Invalid, Request};
use crate::domain::ids::{validate_name, AggregateKey, Name};
use crate::domain::rules::{fail, Decision, Facts};
use crate::domain::schema::{validate_properties, PropertyDef};
use crate::domain::text::Text;
use crate::domain::{Command, CommandType};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use utoipa::ToSchema;

pub const EVENT_TYPE: &str = "ONTOLOGY_CLASS_UPDATED";

/// The fields of a class an update may change; absent fields are left as they are.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClassPatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    label: Option<Text>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    description: Option<Text>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    properties: Option<Vec<PropertyDef>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Name>)]
    parent_class: Option<String>,
    #[serde(default, rename = "abstract", skip_serializing_if = "Option::is_none")]
    is_abstract: Option<bool>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateClassBody {
    patch: ClassPatch,
}

pub fn request(ctx: &Context, db: &str, class_id: &str, body: UpdateClassBody) -> Result<Request, Invalid> {
    validate_name("db", db)?;
    validate_name("class_id", class_id)?;
    if let Some(props) = &body.patch.properties {
        validate_properties(props)?;
    }
    for (field, text) in [("label", &body.patch.label), ("description", &body.patch.description)] {
        text.as_ref().map_or(Ok(()), |t| t.validate(field))?;
    }
    if let Some(parent) = &body.patch.parent_class {
        validate_name("parent_class", parent)?;
    }
    let patch = serde_json::to_value(&body.patch).expect("a patch serialises");
    if patch.as_object().is_some_and(Map::is_empty) {
        return Err(Invalid::new("invalid_request", "patch must change at least one field"));
    }
    let branch = ctx.branch()?;
    Ok(Request::single(Command {
        command_type: CommandType::UpdateOntologyClass,
        aggregate: AggregateKey::class(db, &branch, class_id),
        expected_seq: ctx.expected_for_update()?,
        payload: json!({"db": db, "branch": branch, "class_id": class_id, "patch": patch}),
    }))
}

pub use super::create_class::facts;

pub fn decide(payload: &Value, facts: &Facts) -> Decision {
    let Some(current) = &facts.current else {
        return fail("class_not_found", "the class does not exist");
    };
    let patch = payload["patch"].as_object().cloned().unwrap_or_default();
    if let Some(d) = check_parent(payload, patch.get("parent_class"), facts) {
        return d;
    }
    if let Some(d) = check_refs(facts) {
        return d;
    }
    let mut state = current.clone();
    if let Some(obj) = state.as_object_mut() {
        for (k, v) in patch {
            obj.insert(k, v);
        }
    }
    Decision::Event { event_type: EVENT_TYPE, state }
}
