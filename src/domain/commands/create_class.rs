//! CREATE_ONTOLOGY_CLASS: a class in a database, optionally under a parent class. Reads its
//! database (it must exist), its parent chain (the parent must exist, and the class must not
//! be among its ancestors) and the target class of each `ref:<ClassId>` property (it must
//! exist, or be the class itself).

use super::{class_chain, parent_class, text, Context, Invalid, Request, StateReader};
use crate::domain::ids::{validate_name, AggregateKey, Name};
use crate::domain::rules::{fail, Decision, Facts};
use crate::domain::schema::{validate_properties, PropertyDef};
use crate::domain::text::Text;
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
    /// A string, or text by language tag (`{"en": "Product", "ko": "제품"}`).
    #[serde(default)]
    label: Option<Text>,
    #[serde(default)]
    description: Option<Text>,
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
    for (field, text) in [("label", &body.label), ("description", &body.description)] {
        text.as_ref().map_or(Ok(()), |t| t.validate(field))?;
    }
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
    facts.missing_ref = missing_ref_target(payload, log, &db, &branch).await?;
    Ok(())
}

/// The first `ref:<ClassId>` property (of a create, or an update's patch) whose class does
/// not exist; a class may refer to itself.
async fn missing_ref_target<R: StateReader>(payload: &Value, log: &R, db: &str, branch: &str) -> Result<Option<(String, String)>, R::Error> {
    let class_id = text(payload, "class_id");
    let properties = payload.get("properties").or_else(|| payload["patch"].get("properties"));
    for property in properties.and_then(Value::as_array).into_iter().flatten() {
        let Some(target) = property["type"].as_str().and_then(|t| t.strip_prefix("ref:")) else {
            continue;
        };
        if target != class_id && log.state(&AggregateKey::class(db, branch, target)).await?.is_none() {
            return Ok(Some((text(property, "name"), target.to_string())));
        }
    }
    Ok(None)
}

pub fn decide(payload: &Value, facts: &Facts) -> Decision {
    if facts.database.is_none() {
        return fail("database_not_found", format!("database {} does not exist", payload["db"]));
    }
    if facts.current.is_some() {
        return fail("class_exists", "the class already exists");
    }
    if let Some(d) = check_parent(payload, payload.get("parent_class"), facts) {
        return d;
    }
    if let Some(d) = check_refs(facts) {
        return d;
    }
    let mut state = payload.clone();
    if let Some(obj) = state.as_object_mut() {
        obj.entry("abstract").or_insert(json!(false));
    }
    Decision::Event { event_type: EVENT_TYPE, state }
}

/// A named parent must exist (its chain was read into `facts.classes`), and the class must not
/// be its own ancestor.
pub(super) fn check_parent(payload: &Value, parent: Option<&Value>, facts: &Facts) -> Option<Decision> {
    let parent = parent.and_then(Value::as_str)?;
    if facts.classes.is_empty() {
        return Some(fail("parent_class_not_found", format!("parent class {parent} does not exist")));
    }
    let class_id = &payload["class_id"];
    if facts.classes.iter().any(|ancestor| ancestor["class_id"] == *class_id) {
        return Some(fail("invalid_parent_class", format!("parent class {parent} would make a cycle: {class_id} is among its ancestors")));
    }
    None
}

/// Every `ref:<ClassId>` target must exist.
pub(super) fn check_refs(facts: &Facts) -> Option<Decision> {
    let (property, class) = facts.missing_ref.as_ref()?;
    Some(fail("class_not_found", format!("property {property:?} refers to class {class}, which does not exist")))
}
