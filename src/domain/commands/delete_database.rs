//! DELETE_DATABASE: deletes an empty database, reading its classes (it fails while any is
//! live); or, with `cascade`, the database with every class and instance in it: one outcome,
//! all or nothing, after which they are gone by the rule of [`super::cascade`] and the read
//! models drop them. A cascade reads every class and instance the database ever had, to wait
//! for the outcomes of their commands before it: so every outcome of a command before the
//! cascade is in the log before the cascade's own, where the read models' cascade covers it.

use super::{class_ids, text, Context, Invalid, Request, StateReader};
use crate::domain::ids::{validate_name, AggregateKey, AggregateType};
use crate::domain::rules::{fail, Decision, Facts};
use crate::domain::{Command, CommandType};
use serde_json::{json, Value};

pub const EVENT_TYPE: &str = "DATABASE_DELETED";

pub fn request(ctx: &Context, db: &str, cascade: bool) -> Result<Request, Invalid> {
    validate_name("db", db)?;
    let payload = if cascade { json!({"db": db, "cascade": true}) } else { json!({"db": db}) };
    Ok(Request::single(Command {
        command_type: CommandType::DeleteDatabase,
        aggregate: AggregateKey::database(db),
        expected_seq: ctx.expected_for_update()?,
        payload,
    }))
}

fn cascades(payload: &Value) -> bool {
    payload["cascade"].as_bool() == Some(true)
}

pub async fn facts<R: StateReader>(payload: &Value, log: &R, facts: &mut Facts) -> Result<(), R::Error> {
    let classes = class_ids(log, &text(payload, "db")).await?;
    if cascades(payload) {
        // Nothing stands in its way (`database_has_classes` stays false); it only waits.
        let instances = log.aggregates_with_prefix(AggregateType::Instance, &format!("{}:", text(payload, "db"))).await?;
        let keys = classes.into_iter().map(|id| AggregateKey::new(AggregateType::OntologyClass, id));
        let keys = keys.chain(instances.into_iter().map(|id| AggregateKey::new(AggregateType::Instance, id)));
        return super::read_all(log, keys.collect()).await;
    }
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
