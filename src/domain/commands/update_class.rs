//! UPDATE_ONTOLOGY_CLASS: changes some fields of a class (a patch; absent fields stay). Reads
//! what a create reads (the database, the parent chain if the patch names a parent) and, for a
//! change of properties, parent or `abstract`, every live instance of the class and of its
//! descendants: a change that would make one invalid fails `schema_incompatible`.

use super::create_class::{check_parent, check_refs};
use super::{class_chain, text, Context, Invalid, Request, StateReader};
use crate::domain::ids::{validate_name, AggregateKey, AggregateType, Name};
use crate::domain::values::{unique_values, validate, with_defaults};
use crate::domain::rules::{fail, Decision, Facts};
use crate::domain::schema::{validate_properties, PropertyDef};
use crate::domain::text::Text;
use crate::domain::{Command, CommandType};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use utoipa::ToSchema;
use std::collections::HashMap;

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

/// What a create reads, and, when the patch changes what instances must hold (properties,
/// parent, abstract), the live instances of the class and of its descendants, each checked
/// against its chain through the new definition.
pub async fn facts<R: StateReader>(payload: &Value, log: &R, facts: &mut Facts) -> Result<(), R::Error> {
    super::create_class::facts(payload, log, facts).await?;
    let Some(current) = &facts.current else { return Ok(()) };
    let patch = payload["patch"].as_object().cloned().unwrap_or_default();
    if !["properties", "parent_class", "abstract"].iter().any(|k| patch.contains_key(*k)) {
        return Ok(()); // a label or a description changes no instance's validity
    }
    let (db, branch, class_id) = (text(payload, "db"), text(payload, "branch"), text(payload, "class_id"));
    let updated = patched(current, patch);
    let mut chain = vec![updated.clone()];
    if let Some(parent) = updated["parent_class"].as_str() {
        chain.extend(class_chain(log, &db, &branch, parent).await?);
    }
    let mut checked = vec![(class_id.clone(), chain.clone())];
    let prefix = format!("{db}:{branch}:");
    for id in log.aggregates_with_prefix(AggregateType::OntologyClass, &prefix).await? {
        let other = &id[prefix.len()..];
        if other == class_id {
            continue;
        }
        let own = class_chain(log, &db, &branch, other).await?;
        if let Some(at) = own.iter().position(|c| c["class_id"].as_str() == Some(class_id.as_str())) {
            checked.push((other.to_string(), own[..at].iter().chain(&chain).cloned().collect()));
        }
    }
    facts.incompatible = incompatible_instances(log, &prefix, &checked).await?;
    Ok(())
}

/// How many live instances of the `(class, chain)` pairs their chain (with its defaults)
/// refuses, or an abstract class has at all, and the first of them with why.
async fn incompatible_instances<R: StateReader>(log: &R, prefix: &str, checked: &[(String, Vec<Value>)]) -> Result<Option<(u64, String)>, R::Error> {
    use futures::StreamExt;
    let (mut count, mut first) = (0u64, None);
    for (class_id, chain) in checked {
        let is_abstract = chain[0]["abstract"].as_bool() == Some(true);
        let instances = format!("{prefix}{class_id}:");
        let ids = log.aggregates_with_prefix(AggregateType::Instance, &instances).await?;
        let keys = ids.into_iter().map(|id| AggregateKey::new(AggregateType::Instance, id)).collect();
        let mut reads = std::pin::pin!(super::states(log, keys));
        // Each unique value seen so far, with the instance holding it.
        let mut held: HashMap<(String, String), String> = HashMap::new();
        while let Some(read) = reads.next().await {
            let (key, Some(state)) = read? else { continue };
            let id = &key.aggregate_id[instances.len()..];
            let data = with_defaults(state["data"].as_object().cloned().unwrap_or_default(), chain);
            let why = if is_abstract {
                Some("its class would be abstract".to_string())
            } else {
                validate(&data, chain).err().map(|e| e.to_string()).or_else(|| held_twice(&data, chain, id, &mut held))
            };
            if let Some(why) = why {
                count += 1;
                first.get_or_insert_with(|| format!("{class_id} instance {id:?}: {why}"));
            }
        }
    }
    Ok(first.map(|f| (count, f)))
}

/// Why `data` breaks a `unique` property of the chain: an instance read before holds the same
/// value. Records the values it holds otherwise.
fn held_twice(data: &Map<String, Value>, chain: &[Value], id: &str, held: &mut HashMap<(String, String), String>) -> Option<String> {
    for (property, value) in unique_values(data, chain) {
        match held.entry((property.clone(), value.to_string())) {
            std::collections::hash_map::Entry::Occupied(other) => {
                return Some(format!("it holds {value} in unique property {property:?}, as does instance {:?}", other.get()))
            }
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(id.to_string());
            }
        }
    }
    None
}

/// The class state with the patch's fields replaced.
fn patched(current: &Value, patch: Map<String, Value>) -> Value {
    let mut state = current.clone();
    if let Some(obj) = state.as_object_mut() {
        obj.extend(patch);
    }
    state
}

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
    if let Some((count, first)) = &facts.incompatible {
        return fail("schema_incompatible", format!("the change would make {count} live instance(s) invalid; the first: {first}"));
    }
    Decision::Event { event_type: EVENT_TYPE, state: patched(current, patch) }
}
