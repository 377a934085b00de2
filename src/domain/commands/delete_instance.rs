//! DELETE_INSTANCE: deletes an instance. Reads nothing but itself.

use super::update_instance::Target;
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

pub fn decide(facts: &Facts) -> Decision {
    if facts.current.is_none() {
        return fail("instance_not_found", "the instance does not exist");
    }
    Decision::Event { event_type: EVENT_TYPE, state: Value::Null }
}
