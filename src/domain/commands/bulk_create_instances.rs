//! BULK_CREATE_INSTANCES: many instances of one class as one command, all or nothing at the
//! log (each member is its own aggregate and is decided like a CREATE_INSTANCE).

use super::create_instance::{checked_target, command, CreateInstanceBody};
use super::{Context, Invalid, Request};
use crate::domain::ids::validate_name;
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
    check_bulk_size(body.instances.len(), max)?;
    let commands = body
        .instances
        .iter()
        .enumerate()
        .map(|(i, inst)| command(ctx, db, &branch, class_id, inst, i, CommandType::BulkCreateInstances))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Request { command_type: CommandType::BulkCreateInstances, commands })
}

/// The path's names, the branch (returned) and the members of a bulk update or delete, checked:
/// 1 to `max` of them, each instance once, no `?expected_seq`.
pub(super) fn checked_members(ctx: &Context, db: &str, class_id: &str, ids: &[&str], max: usize) -> Result<String, Invalid> {
    validate_name("db", db)?;
    validate_name("class_id", class_id)?;
    let branch = ctx.branch()?;
    no_query_expected_seq(ctx)?;
    check_bulk_size(ids.len(), max)?;
    check_distinct(ids.iter().copied())?;
    for id in ids {
        validate_name("id", id)?;
    }
    Ok(branch)
}

/// A bulk command holds 1 to `max` members (`serve.max_bulk_instances`).
pub(super) fn check_bulk_size(members: usize, max: usize) -> Result<(), Invalid> {
    if members == 0 || members > max {
        return Err(Invalid::new("invalid_bulk_size", format!("instances must hold 1 to {max} items, got {members}")));
    }
    Ok(())
}

/// A bulk update or delete names each instance once: its members share one command id, so two
/// members on one instance would be two envelopes with one event id.
fn check_distinct<'a>(ids: impl Iterator<Item = &'a str>) -> Result<(), Invalid> {
    let mut seen = std::collections::HashSet::new();
    for id in ids {
        if !seen.insert(id) {
            return Err(Invalid::new("invalid_request", format!("instance {id:?} is named twice")));
        }
    }
    Ok(())
}

/// Members of a bulk update or delete carry their own `expected_seq`; one in the query would
/// be ambiguous.
fn no_query_expected_seq(ctx: &Context) -> Result<(), Invalid> {
    match ctx.expected_seq {
        None => Ok(()),
        Some(_) => Err(Invalid::new("invalid_expected_seq", "a bulk update or delete takes each instance's expected_seq in the body, not ?expected_seq")),
    }
}
