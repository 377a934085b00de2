//! BULK_CREATE_INSTANCES: many instances of one class as one command, all or nothing at the
//! log (each member is its own aggregate and is decided like a CREATE_INSTANCE).

use super::create_instance::{checked_target, command, CreateInstanceBody};
use super::{Context, Invalid, Request};
use crate::domain::CommandType;
use serde::Deserialize;
use utoipa::ToSchema;

pub use super::create_instance::EVENT_TYPE;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkCreateBody {
    /// At most `serve.max_bulk_instances` (1000 by default).
    #[schema(min_items = 1)]
    instances: Vec<CreateInstanceBody>,
}

/// `max`: the most members one command may hold (`serve.max_bulk_instances`).
pub fn request(ctx: &Context, db: &str, class_id: &str, body: BulkCreateBody, max: usize) -> Result<Request, Invalid> {
    let branch = checked_target(ctx, db, class_id)?;
    if body.instances.is_empty() || body.instances.len() > max {
        return Err(Invalid::new(
            "invalid_bulk_size",
            format!("instances must hold 1 to {max} items, got {}", body.instances.len()),
        ));
    }
    let commands = body
        .instances
        .iter()
        .enumerate()
        .map(|(i, inst)| command(ctx, db, &branch, class_id, inst, i, CommandType::BulkCreateInstances))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Request { command_type: CommandType::BulkCreateInstances, commands })
}
