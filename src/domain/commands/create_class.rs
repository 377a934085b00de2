//! CREATE_ONTOLOGY_CLASS: a class in a database, optionally under a parent class. Reads its
//! database (it must exist) and its parent chain (the parent must exist).

use super::{class_chain, parent_class, text, Context, Invalid, Request, StateReader};
use crate::domain::ids::{validate_name, AggregateKey, Name};
use crate::domain::rules::{fail, validate_properties, Decision, Facts, PropertyDef};
use crate::domain::{Command, CommandType};
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::ToSchema;

pub const EVENT_TYPE: &str = "ONTOLOGY_CLASS_CREATED";

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateClassBody {
    #[schema(value_type = Name)]
    id: String,
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    properties: Vec<PropertyDef>,
    #[serde(default)]
    #[schema(value_type = Option<Name>)]
    parent_class: Option<String>,
    #[serde(default, rename = "abstract")]
    is_abstract: bool,
}

pub fn request(ctx: &Context, db: &str, body: CreateClassBody) -> Result<Request, Invalid> {
    validate_name("db", db)?;
    validate_name("id", &body.id)?;
    if let Some(parent) = &body.parent_class {
        validate_name("parent_class", parent)?;
    }
    validate_properties(&body.properties)?;
    let branch = ctx.branch()?;
    Ok(Request::single(Command {
        command_type: CommandType::CreateOntologyClass,
        aggregate: AggregateKey::class(db, &branch, &body.id),
        expected_seq: ctx.expected_for_create()?,
        payload: json!({
            "db": db, "branch": branch, "class_id": body.id, "label": body.label,
            "description": body.description, "properties": body.properties,
            "parent_class": body.parent_class, "abstract": body.is_abstract,
        }),
    }))
}

/// The database's state, and the parent's chain if one is named (create or update).
pub async fn facts<R: StateReader>(payload: &Value, log: &R, facts: &mut Facts) -> Result<(), R::Error> {
    let (db, branch) = (text(payload, "db"), text(payload, "branch"));
    facts.database = log.state(&AggregateKey::database(&db)).await?;
    if let Some(parent) = parent_class(payload) {
        facts.classes = class_chain(log, &db, &branch, parent).await?;
    }
    Ok(())
}

pub fn decide(payload: &Value, facts: &Facts) -> Decision {
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
    Decision::Event { event_type: EVENT_TYPE, state }
}

/// A named parent must exist (its chain was read into `facts.classes`).
pub(super) fn check_parent(parent: Option<&Value>, facts: &Facts) -> Option<Decision> {
    let parent = parent.and_then(Value::as_str)?;
    if facts.classes.is_empty() {
        return Some(fail("parent_class_not_found", format!("parent class {parent} does not exist")));
    }
    None
}
