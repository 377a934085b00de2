//! BULK_DELETE_INSTANCES: deletes many instances of one class as one command, all or nothing at
//! the log like a bulk update (each member names its instance's version). Each member is its
//! own aggregate and is decided like a DELETE_INSTANCE.

use super::bulk_create_instances::checked_members;
use super::delete_instance::command;
use super::update_instance::Target;
use super::{Context, Invalid, Request};
use crate::domain::ids::Name;
use crate::domain::CommandType;
use serde::Deserialize;
use utoipa::ToSchema;

pub use super::delete_instance::{decide, EVENT_TYPE};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkDeleteMember {
    #[schema(value_type = Name)]
    id: String,
    /// The instance's current version, as for a single delete.
    expected_seq: u64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkDeleteBody {
    /// At most `serve.max_bulk_instances` (1000 by default), each instance once.
    #[schema(min_items = 1)]
    instances: Vec<BulkDeleteMember>,
}

pub fn request(ctx: &Context, db: &str, class_id: &str, body: BulkDeleteBody, max: usize) -> Result<Request, Invalid> {
    let ids: Vec<&str> = body.instances.iter().map(|m| m.id.as_str()).collect();
    let branch = checked_members(ctx, db, class_id, &ids, max)?;
    let commands = body
        .instances
        .iter()
        .map(|m| {
            let target = Target { db, branch: &branch, class_id, instance_id: &m.id };
            command(target, m.expected_seq, CommandType::BulkDeleteInstances)
        })
        .collect();
    Ok(Request { command_type: CommandType::BulkDeleteInstances, commands })
}
