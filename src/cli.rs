//! The command line: one binary, one subcommand per role or tool.

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(name = "spiced", version, about = "Event-sourced command pipeline with S3 as the source of truth")]
pub struct Cli {
    /// Configuration file (TOML). Without it, the embedded defaults of `spiced dev` apply.
    #[arg(long, global = true, env = "SPICED_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log output format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP command API.
    Serve,
    /// Publish the event log to Kafka.
    Relay,
    /// Run command workers.
    Worker,
    /// Run the projection worker.
    Project,
    /// Run the whole pipeline in one process on embedded defaults.
    Dev,
    /// Apply database migrations.
    Migrate,
    /// Inspect the configuration.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigAction {
    /// Load and validate the configuration, then print it with secrets redacted.
    Check,
}
