//! BULK_UPDATE_INSTANCES: merge patches on many instances of one class as one command, all or
//! nothing at the log: each member names its instance's version, and one mismatch refuses the
//! whole command (409 naming every conflicting instance). Each member is its own aggregate and
//! is decided like an UPDATE_INSTANCE.

use super::bulk_create_instances::checked_members;
use super::update_instance::{command, Target};
use super::{Context, Invalid, Request};
use crate::domain::ids::Name;
use crate::domain::schema::validate_data_keys;
use crate::domain::CommandType;
use serde::Deserialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

pub use super::update_instance::{decide, facts, EVENT_TYPE};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkUpdateMember {
    #[schema(value_type = Name)]
    id: String,
    /// The instance's current version, as for a single update.
    expected_seq: u64,
    /// A JSON merge patch (RFC 7386) on the instance's data.
    data: Map<String, Value>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkUpdateBody {
    /// At most `serve.max_bulk_instances` (1000 by default), each instance once.
    #[schema(min_items = 1)]
    instances: Vec<BulkUpdateMember>,
}

pub fn request(ctx: &Context, db: &str, class_id: &str, body: BulkUpdateBody, max: usize) -> Result<Request, Invalid> {
    let ids: Vec<&str> = body.instances.iter().map(|m| m.id.as_str()).collect();
    let branch = checked_members(ctx, db, class_id, &ids, max)?;
    let commands = body
        .instances
        .iter()
        .map(|m| {
            validate_data_keys(&m.data)?;
            let target = Target { db, branch: &branch, class_id, instance_id: &m.id };
            Ok(command(target, m.expected_seq, m.data.clone(), CommandType::BulkUpdateInstances))
        })
        .collect::<Result<Vec<_>, Invalid>>()?;
    Ok(Request { command_type: CommandType::BulkUpdateInstances, commands })
}
