//! Operator tools: subcommands that inspect and repair, beside the pipeline roles.

pub mod dlq;
pub mod log;
pub mod status;
pub mod verify;
