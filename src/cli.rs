//! The command line: one binary, one subcommand per role or tool.

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use crate::domain::Role;

/// Shown after `spiced --help`: what the environment can set, and what exit codes mean.
const ENVIRONMENT: &str = "\
Environment:
  SPICED_CONFIG=PATH          the configuration file, as --config
  SPICED_<SECTION>__<KEY>     any configuration key, e.g. SPICED_DATABASE__URL=postgres://...,
                              SPICED_LOG__S3__ENDPOINT=http://127.0.0.1:9000 (see
                              config/spiced.example.toml); unknown SPICED_* variables are errors
  SPICED_LOG=FILTER           log filter (tracing EnvFilter), default info; e.g. spiced=debug
  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION
                              S3 credentials when log.s3 leaves them empty
  NOTIFY_SOCKET, WATCHDOG_USEC
                              set by systemd: readiness and watchdog keep-alives

Exit codes: 0 done; 1 an error (configuration, a dependency); 2 a command line that does not
parse, or `spiced verify` finding a guarantee violated.

Examples:
  spiced dev                                       the whole pipeline in one process, ./data
  spiced serve --config /etc/spiced/spiced.toml    one role against production services
  spiced completions bash > /etc/bash_completion.d/spiced";

#[derive(Debug, Parser)]
#[command(name = "spiced", version, about = "Event-sourced command pipeline with S3 as the source of truth", after_help = ENVIRONMENT)]
pub struct Cli {
    /// Configuration file (TOML). Without it, the embedded defaults of `spiced dev` apply.
    #[arg(long, global = true, env = "SPICED_CONFIG")]
    pub config: Option<PathBuf>,
    /// Allow `serve`/`dev` to listen on a non-loopback address with no auth tokens.
    #[arg(long, global = true)]
    pub insecure_no_auth: bool,
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
    #[command(after_help = "Example:\n  SPICED_SERVE__LISTEN=0.0.0.0:8080 spiced serve --config /etc/spiced/spiced.toml")]
    Serve,
    /// Publish the event log to Kafka.
    #[command(after_help = "Examples:\n  spiced relay --config /etc/spiced/spiced.toml\n  spiced relay --republish --from-position 100 --to-position 200")]
    Relay(RelayArgs),
    /// Run command workers.
    #[command(after_help = "Example:\n  spiced worker --role instance --config /etc/spiced/spiced.toml")]
    Worker {
        /// Role to run (`ontology`, `instance`); repeat for several. Default: `worker.roles`.
        #[arg(long = "role")]
        roles: Vec<Role>,
    },
    /// Run the projection worker, rebuild the read models from the log, or list and re-apply
    /// the events the read store refused (`failures`).
    #[command(after_help = "Examples:\n  spiced project --config /etc/spiced/spiced.toml\n  spiced project --rebuild --until 2026-01-31T00:00:00Z\n  spiced project failures retry")]
    Project(ProjectArgs),
    /// Run the whole pipeline in one process on embedded defaults.
    #[command(after_help = "Example:\n  SPICED_SERVE__LISTEN=127.0.0.1:9000 spiced dev")]
    Dev,
    /// Apply database migrations.
    #[command(after_help = "Example:\n  SPICED_DATABASE__URL=postgres://spiced@db/spiced spiced migrate")]
    Migrate,
    /// Check the log against its guarantees and the index against the log. Exits 2 when a
    /// guarantee is violated.
    #[command(after_help = "Example:\n  spiced verify --config /etc/spiced/spiced.toml || echo \"exit $? (2: violations)\"")]
    Verify {
        /// Check segments from this position on (versions need the whole log).
        #[arg(long, default_value_t = 1)]
        from_position: u64,
    },
    /// Print every stage's position and lag.
    #[command(after_help = "Examples:\n  watch -n 5 spiced status --config /etc/spiced/spiced.toml\n  spiced status --json | jq .stages")]
    Status {
        /// Print the clocks and stages as one JSON object, the body of `GET /api/v1/status`
        /// (without the command counts of the table, which read the whole index).
        #[arg(long)]
        json: bool,
    },
    /// Read the event log as NDJSON.
    #[command(after_help = "Examples:\n  spiced log get 42\n  spiced log export --from-time 2026-01-01T00:00:00Z > log.ndjson\n  spiced log tail")]
    Log {
        #[command(subcommand)]
        action: LogAction,
    },
    /// Inspect and re-drive dead letters of the command workers (needs Kafka).
    #[command(after_help = "Examples:\n  spiced dlq list --role instance\n  spiced dlq redrive 6f1c... --role instance")]
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Inspect the configuration.
    #[command(after_help = "Example:\n  spiced config check --config /etc/spiced/spiced.toml")]
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Print shell completions for bash, zsh, fish, elvish or powershell.
    #[command(after_help = "Example:\n  spiced completions zsh > ~/.zfunc/_spiced")]
    Completions {
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), as `scripts/install.sh` installs it.
    #[command(hide = true)]
    Man,
}

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ProjectArgs {
    #[command(subcommand)]
    pub action: Option<ProjectAction>,
    /// Rebuild the read models from the log (no Kafka) into a fresh schema, then swap it in.
    #[arg(long)]
    pub rebuild: bool,
    /// Stop at this log position or RFC 3339 time and keep the result beside the live schema
    /// (a point-in-time copy; never swapped in).
    #[arg(long, requires = "rebuild")]
    pub until: Option<String>,
    /// Name of the schema to build (default `spiced_read_rebuild_<UTC timestamp>`); after a
    /// swap it holds the previous live read models.
    #[arg(long, requires = "rebuild")]
    pub target_schema: Option<String>,
    /// Build the schema but do not swap it in.
    #[arg(long, requires = "rebuild")]
    pub no_swap: bool,
}

#[derive(Debug, Subcommand)]
pub enum ProjectAction {
    /// The events the read models are missing because the read store refused them (list, the
    /// default, or retry).
    Failures {
        #[command(subcommand)]
        action: Option<FailuresAction>,
        /// The read-model schema: the live one, or a rebuild's target.
        #[arg(long, global = true, default_value = crate::db::read::LIVE_SCHEMA)]
        schema: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum FailuresAction {
    /// Print each one: log position, event id, aggregate, attempts, when seen, the error.
    List,
    /// Apply them again from the log once the cause is fixed; each applied one is no longer
    /// recorded, each refused again stays (attempts + 1). Exits non-zero if any is left.
    Retry {
        /// Only this event.
        #[arg(long)]
        event_id: Option<uuid::Uuid>,
    },
}

#[derive(Debug, Subcommand)]
pub enum LogAction {
    /// Print the envelopes of one log position.
    Get { position: u64 },
    /// Print a range of the log (by position and/or RFC 3339 time, `to` exclusive for times).
    Export {
        #[arg(long)]
        from_position: Option<u64>,
        #[arg(long)]
        to_position: Option<u64>,
        #[arg(long)]
        from_time: Option<chrono::DateTime<chrono::Utc>>,
        #[arg(long)]
        to_time: Option<chrono::DateTime<chrono::Utc>>,
    },
    /// Follow the log, printing envelopes as they are committed.
    Tail {
        /// Start here instead of at the next new position.
        #[arg(long)]
        from_position: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DlqAction {
    /// List the dead letters of a role.
    List {
        #[arg(long, default_value = "instance")]
        role: Role,
    },
    /// Print one dead letter in full.
    Show {
        event_id: uuid::Uuid,
        #[arg(long, default_value = "instance")]
        role: Role,
    },
    /// Make a failed command runnable again and publish it to its topic.
    Redrive {
        event_id: uuid::Uuid,
        #[arg(long, default_value = "instance")]
        role: Role,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigAction {
    /// Load and validate the configuration, then print it with secrets redacted.
    Check,
}

#[derive(Debug, clap::Args)]
pub struct RelayArgs {
    /// Start publishing at this log position (sets the checkpoint to N - 1), overriding the
    /// stored checkpoint. Without it, a first start publishes from position 1.
    #[arg(long, conflicts_with = "from_time")]
    pub from_position: Option<u64>,
    /// Start at the first segment written at or after this RFC 3339 time.
    #[arg(long)]
    pub from_time: Option<chrono::DateTime<chrono::Utc>>,
    /// Re-publish --from-position ..= --to-position once (no lease, no checkpoint) and exit.
    #[arg(long, requires_all = ["from_position", "to_position"])]
    pub republish: bool,
    /// Last position to re-publish.
    #[arg(long, requires = "republish")]
    pub to_position: Option<u64>,
}

impl RelayArgs {
    pub fn options(&self) -> crate::relay::RelayOptions {
        crate::relay::RelayOptions {
            from_position: self.from_position,
            from_time: self.from_time,
            republish: match (self.republish, self.from_position, self.to_position) {
                (true, Some(from), Some(to)) => Some((from, to)),
                _ => None,
            },
        }
    }
}
