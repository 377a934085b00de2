//! DELETE_INSTANCE: deletes an instance that no other live instance references (but through a
//! reference that gives way, `on_delete: nullify`), as of the command's place in the log. Reads the branch's classes and, of each class that can name this
//! one's instances, every instance.

use super::update_instance::Target;
use super::{text, Context, Invalid, Request, StateReader, MAX_CLASS_DEPTH};
use crate::domain::ids::{validate_name, AggregateKey, AggregateType};
use crate::domain::rules::{fail, Decision, Facts};
use crate::domain::values::{giving_way, may_reference, references};
use crate::domain::{Command, CommandType};
use futures::TryStreamExt;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};

pub const EVENT_TYPE: &str = "INSTANCE_DELETED";

pub fn request(ctx: &Context, db: &str, class_id: &str, instance_id: &str) -> Result<Request, Invalid> {
    for (field, value) in [("db", db), ("class_id", class_id), ("instance_id", instance_id)] {
        validate_name(field, value)?;
    }
    let branch = ctx.branch()?;
    let expected_seq = ctx.expected_for_update()?;
    let target = Target { db, branch: &branch, class_id, instance_id };
    Ok(Request::single(command(target, expected_seq, CommandType::DeleteInstance)))
}

/// The command deleting one instance (alone, or as a member of a bulk delete).
pub(super) fn command(t: Target<'_>, expected_seq: u64, command_type: CommandType) -> Command {
    Command {
        command_type,
        aggregate: AggregateKey::instance(t.db, t.branch, t.class_id, t.instance_id),
        expected_seq,
        payload: json!({"db": t.db, "branch": t.branch, "class_id": t.class_id, "instance_id": t.instance_id}),
    }
}

/// The first live instance, other than this one, whose data names it through a `ref`
/// property, as of the command's place: `facts.in_use` describes it.
pub async fn facts<R: StateReader>(payload: &Value, log: &R, facts: &mut Facts) -> Result<(), R::Error> {
    if facts.current.is_none() {
        return Ok(());
    }
    let (db, branch, class_id, instance_id) =
        (text(payload, "db"), text(payload, "branch"), text(payload, "class_id"), text(payload, "instance_id"));
    let chains = class_chains(log, &db, &branch).await?;
    let own = AggregateKey::instance(&db, &branch, &class_id, &instance_id);
    let mut keys = Vec::new();
    for (other, _) in chains.iter().filter(|(_, chain)| may_reference(chain, &class_id)) {
        let prefix = format!("{db}:{branch}:{other}:");
        let ids = log.aggregates_with_prefix(AggregateType::Instance, &prefix).await?;
        keys.extend(ids.into_iter().map(|id| AggregateKey::new(AggregateType::Instance, id)).filter(|k| *k != own));
    }
    // References that give way do not hold the instance: the classes that have them are
    // noted in the outcome, for the read models to release their rows.
    let released: Vec<Value> = chains
        .iter()
        .flat_map(|(other, chain)| giving_way(chain).into_iter().map(move |(p, target)| (other, p, target)))
        .filter(|(_, _, target)| *target == class_id)
        .map(|(other, property, _)| json!({"class_id": other, "property": property}))
        .collect();
    if !released.is_empty() {
        facts.notes.insert("released".into(), Value::Array(released));
    }
    let naming = |state: &Value| {
        let chain = chains.get(state["class_id"].as_str()?)?;
        let data = state["data"].as_object()?;
        let gives_way = giving_way(chain);
        references(data, chain).into_iter().find(|r| {
            r.class_id == class_id && r.instance_id == instance_id && !gives_way.iter().any(|(p, t)| *p == r.property && *t == r.class_id)
        })
    };
    if let Some((_, state)) = super::first_matching(log, keys, |state| naming(state).is_some()).await? {
        let property = naming(&state).map(|r| r.property).unwrap_or_default();
        facts.in_use = Some(format!("{} instance {} names it in {property:?}", state["class_id"], state["instance_id"]));
    }
    Ok(())
}

/// Every live class of the branch with its chain (the class, then its ancestors), by id in
/// order, so what a decision names (and notes) does not depend on a hash.
async fn class_chains<R: StateReader>(log: &R, db: &str, branch: &str) -> Result<BTreeMap<String, Vec<Value>>, R::Error> {
    let prefix = format!("{db}:{branch}:");
    let ids = log.aggregates_with_prefix(AggregateType::OntologyClass, &prefix).await?;
    let keys = ids.into_iter().map(|id| AggregateKey::new(AggregateType::OntologyClass, id)).collect();
    let mut live = HashMap::new();
    super::states(log, keys)
        .try_for_each(|(key, state)| {
            if let Some(state) = state {
                live.insert(key.aggregate_id[prefix.len()..].to_string(), state);
            }
            futures::future::ready(Ok(()))
        })
        .await?;
    let chain = |id: &String| {
        let mut chain: Vec<Value> = Vec::new();
        let mut next = Some(id.as_str());
        while let Some(state) = next.and_then(|id| live.get(id)).filter(|_| chain.len() < MAX_CLASS_DEPTH) {
            next = state["parent_class"].as_str();
            chain.push(state.clone());
        }
        chain
    };
    Ok(live.keys().map(|id| (id.clone(), chain(id))).collect())
}

pub fn decide(facts: &Facts) -> Decision {
    if facts.current.is_none() {
        return fail("instance_not_found", "the instance does not exist");
    }
    if let Some(user) = &facts.in_use {
        return fail("instance_in_use", format!("the instance is in use: {user}; change or delete that first"));
    }
    Decision::Event { event_type: EVENT_TYPE, state: Value::Null }
}
