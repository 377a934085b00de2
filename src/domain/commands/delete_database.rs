//! DELETE_DATABASE: deletes an empty database. Reads its classes: it fails while any is live.

use super::{class_ids, text, Context, Invalid, Request, StateReader};
use crate::domain::ids::{validate_name, AggregateKey, AggregateType};
use crate::domain::rules::{fail, Decision, Facts};
use crate::domain::{Command, CommandType};
use serde_json::{json, Value};

pub const EVENT_TYPE: &str = "DATABASE_DELETED";

pub fn request(ctx: &Context, db: &str) -> Result<Request, Invalid> {
    validate_name("db", db)?;
    Ok(Request::single(Command {
        command_type: CommandType::DeleteDatabase,
        aggregate: AggregateKey::database(db),
        expected_seq: ctx.expected_for_update()?,
        payload: json!({"db": db}),
    }))
}

pub async fn facts<R: StateReader>(payload: &Value, log: &R, facts: &mut Facts) -> Result<(), R::Error> {
    let classes = class_ids(log, &text(payload, "db")).await?;
    let keys = classes.into_iter().map(|id| AggregateKey::new(AggregateType::OntologyClass, id)).collect();
    facts.database_has_classes = super::first_with_liveness(log, keys, true).await?.is_some();
    Ok(())
}

pub fn decide(facts: &Facts) -> Decision {
    if facts.current.is_none() {
        return fail("database_not_found", "the database does not exist");
    }
    if facts.database_has_classes {
        return fail("database_not_empty", "the database still has classes; delete them first");
    }
    Decision::Event { event_type: EVENT_TYPE, state: Value::Null }
}
