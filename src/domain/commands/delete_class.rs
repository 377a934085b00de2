//! DELETE_ONTOLOGY_CLASS: deletes a class that no live class names as its `parent_class` and
//! that has no live instance, both as of the command's place in the log. The branch's classes
//! share the database's partition and worker queue, so reading them waits only on commands
//! ahead of it there; reading the class's instances waits on instance outcomes, which never
//! wait on a later ontology command, and a waiting command steps aside in its worker
//! (`worker::lanes`), so these waits cannot deadlock (docs/design.md, "Integrity rules").

use super::{text, Context, Invalid, Request, StateReader};
use crate::domain::ids::{validate_name, AggregateKey, AggregateType};
use crate::domain::rules::{fail, Decision, Facts};
use crate::domain::{Command, CommandType};
use serde_json::{json, Value};

pub const EVENT_TYPE: &str = "ONTOLOGY_CLASS_DELETED";

pub fn request(ctx: &Context, db: &str, class_id: &str) -> Result<Request, Invalid> {
    validate_name("db", db)?;
    validate_name("class_id", class_id)?;
    let branch = ctx.branch()?;
    Ok(Request::single(Command {
        command_type: CommandType::DeleteOntologyClass,
        aggregate: AggregateKey::class(db, &branch, class_id),
        expected_seq: ctx.expected_for_update()?,
        payload: json!({"db": db, "branch": branch, "class_id": class_id}),
    }))
}

pub async fn facts<R: StateReader>(payload: &Value, log: &R, facts: &mut Facts) -> Result<(), R::Error> {
    let (db, branch, class_id) = (text(payload, "db"), text(payload, "branch"), text(payload, "class_id"));
    let classes = format!("{db}:{branch}:");
    for id in log.aggregates_with_prefix(AggregateType::OntologyClass, &classes).await? {
        let Some(class) = log.state(&AggregateKey::new(AggregateType::OntologyClass, id)).await? else {
            continue;
        };
        if class["parent_class"].as_str() == Some(class_id.as_str()) {
            facts.in_use = Some(format!("class {} names it as its parent_class", class["class_id"]));
            return Ok(());
        }
    }
    let instances = format!("{db}:{branch}:{class_id}:");
    let ids = log.aggregates_with_prefix(AggregateType::Instance, &instances).await?;
    let keys = ids.into_iter().map(|id| AggregateKey::new(AggregateType::Instance, id)).collect();
    if let Some(live) = super::first_with_liveness(log, keys, true).await? {
        let instance_id = &live.aggregate_id[instances.len()..];
        facts.in_use = Some(format!("instance {instance_id:?} of it is live"));
    }
    Ok(())
}

pub fn decide(payload: &Value, facts: &Facts) -> Decision {
    if facts.current.is_none() {
        return fail("class_not_found", "the class does not exist");
    }
    if let Some(user) = &facts.in_use {
        return fail("class_in_use", format!("class {} is in use: {user}; delete that first", payload["class_id"]));
    }
    Decision::Event { event_type: EVENT_TYPE, state: Value::Null }
}
