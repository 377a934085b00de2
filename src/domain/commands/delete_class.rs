//! DELETE_ONTOLOGY_CLASS: deletes a class no live class names as its `parent_class`. Reads the
//! branch's classes, which share the database's partition and worker lane, so the read waits
//! only on commands ahead of it in that lane.
//!
//! It does not read the class's instances: an ontology command waiting on instance outcomes,
//! while instance commands wait on ontology outcomes, can deadlock two worker lanes until the
//! waits time out (see docs/design.md, "Integrity rules").

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
