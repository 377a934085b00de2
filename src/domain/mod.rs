//! The domain the pipeline carries: aggregates, their ids, and the commands that act on them.

pub mod apply;
pub mod commands;
pub mod ids;

pub use commands::{Command, CommandType};
pub use ids::{AggregateKey, AggregateType, IdError};
