//! DELETE_ONTOLOGY_CLASS: deletes a class. Reads nothing but itself.

use super::{Context, Invalid, Request};
use crate::domain::ids::{validate_name, AggregateKey};
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

pub fn decide(facts: &Facts) -> Decision {
    if facts.current.is_none() {
        return fail("class_not_found", "the class does not exist");
    }
    Decision::Event { event_type: EVENT_TYPE, state: Value::Null }
}
