//! DELETE_INSTANCE: deletes an instance. Reads nothing but itself.

use super::{Context, Invalid, Request};
use crate::domain::ids::{validate_name, AggregateKey};
use crate::domain::rules::{fail, Decision, Facts};
use crate::domain::{Command, CommandType};
use serde_json::{json, Value};

pub const EVENT_TYPE: &str = "INSTANCE_DELETED";

pub fn request(ctx: &Context, db: &str, class_id: &str, instance_id: &str) -> Result<Request, Invalid> {
    for (field, value) in [("db", db), ("class_id", class_id), ("instance_id", instance_id)] {
        validate_name(field, value)?;
    }
    let branch = ctx.branch()?;
    Ok(Request::single(Command {
        command_type: CommandType::DeleteInstance,
        aggregate: AggregateKey::instance(db, &branch, class_id, instance_id),
        expected_seq: ctx.expected_for_update()?,
        payload: json!({
            "db": db, "branch": branch, "class_id": class_id, "instance_id": instance_id,
        }),
    }))
}

pub fn decide(facts: &Facts) -> Decision {
    if facts.current.is_none() {
        return fail("instance_not_found", "the instance does not exist");
    }
    Decision::Event { event_type: EVENT_TYPE, state: Value::Null }
}
