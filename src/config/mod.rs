//! Configuration: one typed struct per role, layered as embedded defaults (`config/dev.toml`)
//! -> the `--config` file -> `SPICED_SECTION__KEY` environment overrides, then validated.
//!
//! Every error names the key it is about, and secrets never reach a log line or `config check`
//! output.

mod kafka;
mod log;
mod secret;
mod serve;
mod stages;

pub use kafka::{Compression, KafkaConfig, KafkaProperties, TopicsConfig};
pub use log::{BadLogUrl, LogConfig, LogLocation, S3Config, WriterConfig, WriterCrash};
pub use secret::{names_a_secret, Secret};
pub use serve::{AuthConfig, MetricsConfig, Scope, ServeConfig, ServeTlsConfig, TokenConfig};
pub use stages::{ProjectConfig, ProjectSource, RelayConfig, RelayCrash, WorkerConfig, WorkerCrash};

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::Path;

/// The embedded default: what `spiced dev` and every tool run with when no file is given.
pub const DEV_TOML: &str = include_str!("../../config/dev.toml");

/// The whole configuration file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the event log lives.
    pub log: LogConfig,
    /// The PostgreSQL (or, embedded, SQLite) database holding sequence allocation and the
    /// processed-events registry.
    pub database: DatabaseConfig,
    /// The HTTP API (`spiced serve`).
    pub serve: ServeConfig,
    /// The log writer's group commit.
    pub writer: WriterConfig,
    /// Kafka topic names, per kind of envelope.
    pub topics: TopicsConfig,
    /// The Kafka cluster and the producer/consumer settings shared by every role.
    pub kafka: KafkaConfig,
    /// The relay (`spiced relay`): event log to Kafka.
    pub relay: RelayConfig,
    /// The command workers (`spiced worker`).
    pub worker: WorkerConfig,
    /// The projection (`spiced project`).
    pub project: ProjectConfig,
    /// The operations listener of roles without an API.
    pub metrics: MetricsConfig,
    /// API access control.
    pub auth: AuthConfig,
}

/// The registry database.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `postgres://user:pass@host:port/db` or `sqlite://path/to/file.db`.
    pub url: Secret,
    /// Maximum pooled connections (PostgreSQL).
    pub pool_size: usize,
    /// Apply pending migrations when a role starts.
    pub migrate_on_start: bool,
    /// Wait for the WAL flush at each log-index commit (PostgreSQL). Off by default: an index
    /// row is written only after its segment is durable in the log, so a server crash that
    /// loses the last commits loses nothing the log does not hold, and the writer's
    /// put-if-absent fence repairs those positions before it decides anything (`docs/design.md`,
    /// "The index commit and the WAL flush"). The pipelined commit's steps always wait.
    pub synchronous_index_commit: bool,
    /// Wait for the WAL flush at each claim, heartbeat and `done` of the `processed_events`
    /// registry (PostgreSQL). Off by default: the outcome in the log is a command's effect and
    /// its id is derived from the command, so a registry write lost with a server crash makes
    /// a command run again, never twice in effect (`docs/design.md`, "The registry's commits").
    /// A terminal failure and a re-drive always wait.
    pub synchronous_registry_commit: bool,
    /// The PostgreSQL text search configuration `q=` searches in (`simple`: words as they
    /// are, lowercased; `english` stems and drops stop words, ...).
    pub text_search: String,
    /// Per spiced database, another configuration than `text_search`: `{shop = "english"}`.
    #[serde(default)]
    pub text_search_by_db: std::collections::BTreeMap<String, String>,
}


/// A configuration problem, naming the key or source it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path} is not valid TOML: {source}")]
    Parse { path: String, source: Box<toml::de::Error> },
    #[error("environment variable {var}: {reason}")]
    Env { var: String, reason: String },
    #[error("config key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.to_string(), reason: reason.into() }
}

/// `key` must not be 0.
fn at_least_one(key: &str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(invalid(key, "must be at least 1"));
    }
    Ok(())
}

/// `key`, if set, must be an address; `example` shows the form.
fn listen_address(key: &str, listen: &str, example: &str) -> Result<Option<SocketAddr>, ConfigError> {
    if listen.is_empty() {
        return Ok(None);
    }
    let addr = listen.parse().map_err(|_| invalid(key, format!("must be empty or an address like {example}")))?;
    Ok(Some(addr))
}

impl DatabaseConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let db = self.url.expose();
        if !["postgres://", "postgresql://", "sqlite://"].iter().any(|s| db.starts_with(s)) {
            return Err(invalid("database.url", "must start with postgres://, postgresql:// or sqlite://"));
        }
        at_least_one("database.pool_size", self.pool_size as u64)?;
        let named = std::iter::once(("database.text_search".to_string(), &self.text_search))
            .chain(self.text_search_by_db.iter().map(|(db, c)| (format!("database.text_search_by_db.{db}"), c)));
        for (key, name) in named {
            if !crate::db::read::search::valid_config_name(name) {
                return Err(invalid(&key, format!("{name:?} is not a text search configuration name (at most 40 lowercase letters, digits and _)")));
            }
        }
        Ok(())
    }

    /// The text search configuration of spiced database `db`.
    pub fn text_search_for(&self, db: &str) -> &str {
        self.text_search_by_db.get(db).unwrap_or(&self.text_search)
    }

    /// Every text search configuration in use: each gets its index (PostgreSQL).
    pub fn text_search_configs(&self) -> Vec<String> {
        let mut all: Vec<String> = std::iter::once(&self.text_search).chain(self.text_search_by_db.values()).cloned().collect();
        all.sort();
        all.dedup();
        all
    }
}

impl Config {
    /// Loads the layered configuration: embedded defaults, then `path` if given, then the
    /// `SPICED_*` variables in `env`.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let config = Config::load_unvalidated(path, env)?;
        config.validate()?;
        Ok(config)
    }

    /// [`Config::load`] without the final validation, for a caller that applies command-line
    /// flags first and then calls [`Config::validate`].
    pub fn load_unvalidated(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut tree: toml::Table = DEV_TOML.parse().expect("config/dev.toml is valid TOML");
        if let Some(path) = path {
            let shown = path.display().to_string();
            let text = std::fs::read_to_string(path)
                .map_err(|source| ConfigError::Read { path: shown.clone(), source })?;
            let file: toml::Table = text.parse().map_err(|source| ConfigError::Parse {
                path: shown,
                source: Box::new(source),
            })?;
            merge(&mut tree, file);
        }
        for (var, value) in env {
            apply_env(&mut tree, &var, &value)?;
        }
        serde_path_to_error::deserialize(toml::Value::Table(tree))
            .map_err(|e| invalid(&e.path().to_string(), e.inner().to_string()))
    }

    /// The embedded defaults alone.
    pub fn dev() -> Config {
        Config::load(None, std::iter::empty()).expect("embedded defaults are valid")
    }

    /// Checks values that types alone cannot: each section its own keys, then the bounds that
    /// tie one section to another.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.log.validate()?;
        self.database.validate()?;
        self.serve.validate()?;
        self.writer.validate(self.serve.max_body_bytes)?;
        self.kafka.validate()?;
        self.relay.validate(self.kafka.message_timeout_ms)?;
        self.worker.validate()?;
        self.project.validate()?;
        self.metrics.validate(&self.serve.ops_listen)?;
        self.auth.validate()
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config always serialises")
    }
}

/// Deep-merges `over` into `base`: tables merge key by key, anything else replaces.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Applies one `SPICED_SECTION__KEY=value` override. `SPICED_CONFIG` (the file path) and
/// `SPICED_TEST_*` (test harness settings) are not config keys; any other `SPICED_` variable
/// without the `__` separator is an error rather than silently ignored.
fn apply_env(tree: &mut toml::Table, var: &str, value: &str) -> Result<(), ConfigError> {
    let Some(rest) = var.strip_prefix("SPICED_") else { return Ok(()) };
    if rest == "CONFIG" || rest == "LOG" || rest.starts_with("TEST_") || rest.starts_with("BENCH_") {
        return Ok(());
    }
    let env_err = |reason: &str| ConfigError::Env { var: var.to_string(), reason: reason.into() };
    if !rest.contains("__") {
        return Err(env_err("not a config override; use SPICED_SECTION__KEY, e.g. SPICED_LOG__URL"));
    }
    let path: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
    // librdkafka's keys are dotted, which an environment variable name cannot be:
    // SPICED_KAFKA__PROPERTIES__SASL_PASSWORD is `sasl.password`, always a string.
    if path.len() >= 3 && path[0] == "kafka" && path[1] == "properties" {
        let key = path[2..].join(".").replace('_', ".");
        let properties = tree
            .entry("kafka")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .and_then(|k| k.entry("properties").or_insert_with(|| toml::Value::Table(toml::Table::new())).as_table_mut())
            .ok_or_else(|| env_err("kafka.properties is not a table"))?;
        properties.insert(key, toml::Value::String(value.to_string()));
        return Ok(());
    }
    let parsed = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    let (last, parents) = path.split_last().expect("split yields at least one part");
    let mut table = tree;
    for part in parents {
        let entry = table
            .entry(part.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry.as_table_mut().ok_or_else(|| env_err("names a key inside a non-table"))?;
    }
    // A string-typed key keeps the raw text even when it happens to parse as a number.
    let keep_string = matches!(table.get(last.as_str()), Some(toml::Value::String(_)));
    let value = if keep_string { toml::Value::String(value.to_string()) } else { parsed };
    table.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn embedded_defaults_are_valid() {
        let c = Config::dev();
        assert!(c.database.url.expose().starts_with("sqlite://"));
        assert_eq!(c.serve.listen.port(), 8080);
    }

    #[test]
    fn example_config_parses_and_documents_every_section() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/spiced.example.toml");
        let c = Config::load(Some(&example), Vec::new()).unwrap();
        let text: toml::Table = std::fs::read_to_string(&example).unwrap().parse().unwrap();
        // Every section of the full config is documented in the example.
        for section in ["log", "database", "serve", "writer", "topics", "kafka", "relay", "worker", "metrics", "auth"] {
            assert!(text.contains_key(section), "example lacks [{section}]");
        }
        assert!(c.database.url.expose().starts_with("postgres://"));
    }

    #[test]
    fn env_overrides_apply_by_path() {
        let c = Config::load(
            None,
            env(&[("SPICED_SERVE__MAX_BODY_BYTES", "4096"), ("SPICED_SERVE__SERVICE_NAME", "123")]),
        )
        .unwrap();
        assert_eq!(c.serve.max_body_bytes, 4096);
        assert_eq!(c.serve.service_name, "123");
    }

    #[test]
    fn errors_name_the_key() {
        let err = Config::load(None, env(&[("SPICED_SERVE__MAX_BODY_BYTES", "\"big\"")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("serve.max_body_bytes"), "{err}");
        let err = Config::load(None, env(&[("SPICED_SERVE__NOPE", "1")])).unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
        let err = Config::load(None, env(&[("SPICED_WRITER__MAX_BATCH_EVENTS", "0")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("writer.max_batch_events"), "{err}");
        let err = Config::load(None, env(&[("SPICED_LOGURL", "x")])).unwrap_err().to_string();
        assert!(err.contains("SPICED_LOGURL"), "{err}");
    }

    #[test]
    fn secrets_are_redacted() {
        let mut c = Config::dev();
        c.database.url = Secret::new("postgres://u:hunter2@db:5432/x");
        c.log.s3.secret_access_key = Secret::new("hunter3");
        let shown = format!("{}{:?}", c.to_redacted_toml(), c);
        assert!(!shown.contains("hunter2") && !shown.contains("hunter3"), "{shown}");
        assert!(shown.contains("postgres://u:%3Credacted%3E@db:5432/x") || shown.contains("<redacted>"));
    }

    /// Every form of secret `config check` (and any log line printing the config) could show.
    #[test]
    fn every_form_of_secret_is_redacted() {
        let vars = env(&[
            ("SPICED_DATABASE__URL", "postgres://u@db/x?sslmode=require&password=hunter1&application_name=a"),
            ("SPICED_KAFKA__PROPERTIES__SASL_PASSWORD", "hunter2"),
            ("SPICED_KAFKA__PROPERTIES__SASL_OAUTHBEARER_CLIENT_SECRET", "hunter3"),
            ("SPICED_KAFKA__PROPERTIES__SSL_KEY_PASSWORD", "hunter4"),
            ("SPICED_KAFKA__PROPERTIES__SSL_KEY_PEM", "hunter5"),
            ("SPICED_KAFKA__PROPERTIES__SASL_USERNAME", "alice"),
            ("SPICED_LOG__S3__SECRET_ACCESS_KEY", "hunter6"),
            ("SPICED_AUTH__TOKENS", "[{name = \"ci\", scope = \"read\", token = \"hunter7hunter7hunter7\"}]"),
        ]);
        let c = Config::load(None, vars).unwrap();
        assert_eq!(c.kafka.properties["sasl.password"], "hunter2", "SASL_PASSWORD is sasl.password");
        assert_eq!(c.kafka.properties["ssl.key.pem"], "hunter5");
        let shown = format!("{}{:?}", c.to_redacted_toml(), c);
        for secret in ["hunter1", "hunter2", "hunter3", "hunter4", "hunter5", "hunter6", "hunter7"] {
            assert!(!shown.contains(secret), "{secret} shown:\n{shown}");
        }
        assert!(shown.contains("alice"), "a user name is not a secret");
        assert!(shown.contains("sslmode=require"), "the rest of the URL stays readable: {shown}");
    }

    #[test]
    fn kafka_properties_from_the_environment_are_strings_with_dotted_keys() {
        let c = Config::load(None, env(&[
            ("SPICED_KAFKA__PROPERTIES__SECURITY_PROTOCOL", "SASL_SSL"),
            ("SPICED_KAFKA__PROPERTIES__SOCKET_TIMEOUT_MS", "5000"),
        ]))
        .unwrap();
        assert_eq!(c.kafka.properties["security.protocol"], "SASL_SSL");
        assert_eq!(c.kafka.properties["socket.timeout.ms"], "5000");
    }

    #[test]
    fn operations_listeners_stay_on_loopback_unless_allowed() {
        for key in ["SPICED_SERVE__OPS_LISTEN", "SPICED_METRICS__RELAY_LISTEN", "SPICED_METRICS__WORKER_LISTEN", "SPICED_METRICS__PROJECT_LISTEN"] {
            let err = Config::load(None, env(&[(key, "0.0.0.0:9464")])).unwrap_err().to_string();
            assert!(err.contains("allow_non_loopback"), "{key}: {err}");
            Config::load(None, env(&[(key, "0.0.0.0:9464"), ("SPICED_METRICS__ALLOW_NON_LOOPBACK", "true")])).unwrap();
        }
    }
}
