//! CREATE_DATABASE: a new, empty database. Reads nothing but itself.

use super::{Context, Invalid, Request};
use crate::domain::ids::{validate_name, AggregateKey};
use crate::domain::rules::{fail, Decision, Facts};
use crate::domain::{Command, CommandType};
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::ToSchema;

pub const EVENT_TYPE: &str = "DATABASE_CREATED";

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDatabaseBody {
    #[schema(value_type = crate::domain::ids::Name)]
    name: String,
    #[serde(default)]
    description: Option<String>,
}

pub fn request(ctx: &Context, body: CreateDatabaseBody) -> Result<Request, Invalid> {
    validate_name("name", &body.name)?;
    Ok(Request::single(Command {
        command_type: CommandType::CreateDatabase,
        aggregate: AggregateKey::database(&body.name),
        expected_seq: ctx.expected_for_create()?,
        payload: json!({"db": body.name, "name": body.name, "description": body.description}),
    }))
}

pub fn decide(payload: &Value, facts: &Facts) -> Decision {
    if facts.current.is_some() {
        return fail("database_exists", "the database already exists");
    }
    Decision::Event {
        event_type: EVENT_TYPE,
        state: json!({"db": payload["db"], "name": payload["name"], "description": payload["description"]}),
    }
}
