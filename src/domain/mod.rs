//! The domain the pipeline carries: aggregates, their ids, the commands that act on them (one
//! file each under `commands/`), the rules they share; `commands/envelopes.rs` builds the envelopes of both sides.

pub mod commands;
pub mod ids;
pub mod role;
pub mod rules;
pub mod property;
pub mod schema;
pub mod text;
pub mod values;

pub use commands::{Command, CommandType};
pub use ids::{AggregateKey, AggregateType, IdError};
pub use role::Role;
