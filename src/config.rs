//! Configuration: one typed struct per role, layered as embedded defaults (`config/dev.toml`)
//! -> the `--config` file -> `SPICED_SECTION__KEY` environment overrides, then validated.
//!
//! Every error names the key it is about, and secrets never reach a log line or `config check`
//! output.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use crate::domain::Role;

/// The embedded default: what `spiced dev` and every tool run with when no file is given.
pub const DEV_TOML: &str = include_str!("../config/dev.toml");

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

/// Bearer tokens for the API. With none, the API is open, which is only allowed on a loopback
/// address or with `--insecure-no-auth`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Tokens given inline.
    pub tokens: Vec<TokenConfig>,
    /// A file of `name scope token` lines (readable only by spiced), read at start.
    pub token_file: String,
    /// Set by `--insecure-no-auth` only: allow an open API on a non-loopback address.
    #[serde(skip)]
    pub insecure_no_auth: bool,
}

/// One bearer token.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Shown as the `actor` of the commands it sends; never the secret.
    pub name: String,
    /// `read`, `write` or `admin`.
    pub scope: Scope,
    /// The secret itself.
    pub token: Secret,
}

/// `/metrics`, `/healthz` and `/readyz` for `spiced relay` and `spiced worker` (the API roles
/// serve them on their own port).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the relay's operations listener; empty disables it.
    pub relay_listen: String,
    /// Address of the worker's operations listener; empty disables it.
    pub worker_listen: String,
    /// Address of the projection's operations listener; empty disables it.
    pub project_listen: String,
    /// The operations endpoints have no auth: an address that is not loopback (this key, or
    /// `serve.ops_listen`) is refused unless this is true, e.g. for a Prometheus on another
    /// host behind a firewall.
    pub allow_non_loopback: bool,
}

/// The projection.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectConfig {
    /// `kafka` (the event topics) or `log` (follow the event log directly).
    pub source: ProjectSource,
    /// Kafka consumer group of the projection.
    pub group: String,
    /// Most events applied in one transaction.
    pub batch_events: usize,
    /// How long a batch waits for more events once it has one, in ms.
    pub batch_wait_ms: u64,
    /// With events waiting and none applied for this long, the projection is stalled: its
    /// `/readyz` answers 503 and the systemd watchdog stops being fed.
    pub stall_timeout_ms: u64,
    /// `source = "log"`: how often it looks for new segments when the log has nothing new, in
    /// ms.
    pub poll_interval_ms: u64,
    /// `source = "kafka"`: Kafka `session.timeout.ms` of its consumer.
    pub session_timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProjectSource {
    Kafka,
    Log,
}

/// Command workers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// Roles a `spiced worker` runs when `--role` is not given: `ontology`, `instance`.
    pub roles: Vec<Role>,
    /// Consumer groups are named `{group_prefix}-{role}-worker`.
    pub group_prefix: String,
    /// Aggregates processed concurrently per process (one aggregate stays in order).
    pub lanes: usize,
    /// Lease on a claimed command, in ms; another worker may take it over after this.
    pub lease_ms: u64,
    /// Heartbeat interval in ms; under half of `lease_ms`.
    pub heartbeat_ms: u64,
    /// Attempts before a command is marked failed and dead-lettered.
    pub max_attempts: u32,
    /// Retry backoff: first delay and cap, in ms (exponential, with jitter).
    pub backoff_base_ms: u64,
    pub backoff_cap_ms: u64,
    /// How long a command waits for its predecessor's outcome before it counts as a failed
    /// attempt, in ms.
    pub gap_wait_ms: u64,
    /// Dead-letter topics per role.
    pub ontology_dead_letter_topic: String,
    pub instance_dead_letter_topic: String,
    /// Kafka `session.timeout.ms` of the worker consumers.
    pub session_timeout_ms: u64,
    /// The embedded workers of `spiced dev`: how often they look for new segments of the log
    /// when it has nothing new, in ms.
    pub poll_interval_ms: u64,
    /// On SIGTERM, how long in-flight commands may go on before they are abandoned and their
    /// claims given back, in ms.
    pub shutdown_grace_ms: u64,
    /// A role with messages waiting that has finished none for this long is stalled: its
    /// `/readyz` answers 503 and the systemd watchdog stops being fed. Above `gap_wait_ms`,
    /// since a command may wait that long for its predecessor.
    pub stall_timeout_ms: u64,
    /// Testing only: abort at `after_claim`, `after_effect`, `after_outcome` or `before_commit`,
    /// or freeze with SIGSTOP after the claim (`stop_after_claim`).
    pub crash_at: WorkerCrash,
}

/// Kafka connection and client settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port...]`.
    pub brokers: String,
    /// `client.id` reported to the brokers.
    pub client_id: String,
    /// Producer compression: `none`, `gzip`, `snappy`, `lz4` or `zstd`.
    pub compression: Compression,
    /// Milliseconds the producer waits to fill a batch (`linger.ms`).
    pub linger_ms: u64,
    /// Milliseconds before an undelivered message fails (`message.timeout.ms`). Must be under
    /// half of `relay.lease_ms`, so a relay's messages are settled before its lease can pass on.
    pub message_timeout_ms: u64,
    /// In-flight requests per broker connection (1 to 5; idempotence keeps order up to 5).
    pub max_in_flight: u32,
    /// Partitions of topics created at start.
    pub partitions: i32,
    /// Replication factor of topics created at start.
    pub replication_factor: i32,
    /// `retention.ms` of topics created at start; -1 keeps forever.
    pub retention_ms: i64,
    /// Extra librdkafka properties, applied last (e.g. `security.protocol`, `ssl.ca.location`,
    /// `sasl.mechanism`, `sasl.username`, `sasl.password`). From the environment:
    /// `SPICED_KAFKA__PROPERTIES__SASL_PASSWORD` sets `sasl.password` (`_` stands for `.`).
    /// Values of keys that name a secret are redacted wherever the config is shown.
    pub properties: KafkaProperties,
}

/// The relay.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// Name of the checkpoint and lease; relays sharing a name share one log cursor.
    pub name: String,
    /// Milliseconds between polls of the log when nothing is new.
    pub poll_interval_ms: u64,
    /// Most segments read and published per batch; the checkpoint moves once per batch, so a
    /// crash re-publishes at most one batch.
    pub batch_segments: usize,
    /// Leader lease length in milliseconds; a standby takes over this long after the leader
    /// dies or hangs.
    pub lease_ms: u64,
    /// Topic for envelopes that cannot be routed (no or unknown `metadata.kafka_topic`).
    pub dead_letter_topic: String,
    /// Create missing topics at start.
    pub create_topics: bool,
    /// A leader whose checkpoint has not moved for this long while there is work steps down:
    /// it gives its lease up, replaces its Kafka producer, and lets a standby (or itself) take
    /// over. Also the stall bound of `/readyz` and the watchdog. At least twice
    /// `kafka.message_timeout_ms`.
    pub stall_timeout_ms: u64,
    /// Testing only: abort at `after_produce`, `after_delivery` or `during_checkpoint`.
    pub crash_at: RelayCrash,
}

/// The event log: `s3://bucket/prefix`, `file:///abs/path` or a plain directory path.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Location of the log. Relative plain paths are taken from the working directory.
    pub url: String,
    /// S3 connection settings, used when `url` is `s3://`.
    pub s3: S3Config,
}

/// How to reach an S3-compatible store. Credentials left empty are taken from the standard
/// `AWS_*` environment variables.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// Endpoint URL for S3-compatible servers (MinIO, ...); empty means AWS.
    pub endpoint: String,
    /// Region name.
    pub region: String,
    /// Access key id; empty means `AWS_ACCESS_KEY_ID`.
    pub access_key_id: String,
    /// Secret key; empty means `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: Secret,
    /// Allow plain `http://` endpoints.
    pub allow_http: bool,
    /// Path-style requests (`endpoint/bucket/key`), needed by most self-hosted servers.
    pub path_style: bool,
    /// Retries of one failed S3 request before the caller sees the error (a command then
    /// gets 503).
    pub max_retries: usize,
    /// Milliseconds after which a request is not retried any more.
    pub retry_timeout_ms: u64,
    /// Milliseconds one S3 request may take.
    pub request_timeout_ms: u64,
    /// A PEM file of CA certificates to trust for an `https://` endpoint (a private CA), beside
    /// the system's; empty means the system's only.
    pub ca_file: String,
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
}

/// The command and query HTTP API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Largest accepted request body in bytes; larger bodies get 413.
    pub max_body_bytes: usize,
    /// Most instances one bulk-create command may carry.
    pub max_bulk_instances: usize,
    /// Written into `metadata.service` of every command envelope.
    pub service_name: String,
    /// Seconds a 503 response asks the client to wait (`Retry-After`).
    pub retry_after_secs: u64,
    /// Longest a read with `?min_version=N` waits for the projection, in ms (then 425).
    pub min_version_wait_ms: u64,
    /// Most `?min_version=N` reads waiting at once; past it a read gets 503 with `Retry-After`.
    pub max_version_waiters: usize,
    /// After SIGTERM, how long open requests may take before their connections are closed, in
    /// ms.
    pub shutdown_grace_ms: u64,
    /// A second listener for `/metrics`, `/healthz` and `/readyz` without auth (for
    /// Prometheus and probes); empty disables it. The API port keeps serving them too.
    pub ops_listen: String,
    /// Longest a client may take to send a request's head (and the TLS handshake), in ms; an
    /// idle keep-alive connection is closed after as long.
    pub header_read_timeout_ms: u64,
    /// Longest a request may take once its head is in, body included, in ms; then 503. Above
    /// `min_version_wait_ms`.
    pub request_timeout_ms: u64,
    /// Most connections open at once; one more gets 503 with `Retry-After` and is closed.
    pub max_connections: usize,
    /// TLS on `listen`; both files empty means plain HTTP.
    pub tls: ServeTlsConfig,
}

/// TLS on `serve.listen`: reloaded on SIGHUP.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeTlsConfig {
    /// The certificate chain, PEM, leaf first.
    pub cert_file: String,
    /// Its private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_file: String,
}

impl ServeTlsConfig {
    pub fn enabled(&self) -> bool {
        !self.cert_file.is_empty()
    }
}

/// Group commit of the log writer: concurrent appends share one segment object.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriterConfig {
    /// Most envelopes in one segment.
    pub max_batch_events: usize,
    /// Most bytes of envelopes in one segment.
    pub max_batch_bytes: usize,
    /// Milliseconds to wait for more appends after the first of a batch arrives. 0 batches
    /// only what queued up while the previous segment was being written.
    pub linger_ms: u64,
    /// Appends waiting for the writer before new ones are refused with 503.
    pub queue_depth: usize,
    /// Most bytes of commands queued or being written; past it a command gets 503 with
    /// `Retry-After` (one command alone always fits). At least `serve.max_body_bytes`.
    pub queue_bytes: usize,
    /// Testing only: abort the process at this point of the commit protocol
    /// (`before_put`, `after_put`, `after_commit`). Empty in production.
    pub crash_at: WriterCrash,
}

/// Kafka topic names.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicsConfig {
    /// Database and class commands: one topic, keyed by database, so a database's commands
    /// and its classes' stay in one partition in log order.
    pub ontology_commands: String,
    pub instance_commands: String,
    pub ontology_events: String,
    pub instance_events: String,
}

/// A string that is never printed: `Debug` and `Serialize` show `<redacted>`, except for
/// database URLs, where only the password is hidden.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The value with any URL password replaced (`user:pw@` and `?password=`, `sslpassword=`
    /// and any other query parameter naming a secret), or `<redacted>` if it is not a URL.
    pub fn redacted(&self) -> String {
        if self.0.is_empty() {
            return String::new();
        }
        match url::Url::parse(&self.0) {
            Ok(mut u) if u.has_host() || u.scheme() == "sqlite" => {
                if u.password().is_some() {
                    let _ = u.set_password(Some("<redacted>"));
                }
                if u.query_pairs().any(|(k, _)| names_a_secret(&k)) {
                    let pairs: Vec<(String, String)> = u
                        .query_pairs()
                        .map(|(k, v)| {
                            let v = if names_a_secret(&k) { "<redacted>".to_string() } else { v.into_owned() };
                            (k.into_owned(), v)
                        })
                        .collect();
                    u.query_pairs_mut().clear().extend_pairs(pairs);
                }
                u.to_string()
            }
            _ => "<redacted>".to_string(),
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

/// Whether a setting's name says its value is a secret: `*password*`, `*secret*`, `*token*`,
/// SASL OAuth settings and TLS private keys (`sasl.oauthbearer.*`, `ssl.key.*`, `*.key.pem`).
pub fn names_a_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "secret", "token", "credential"].iter().any(|w| k.contains(w))
        || k.starts_with("sasl.oauthbearer.")
        || k.starts_with("ssl.key.")
        || k.ends_with(".key.pem")
        || k == "sasl.jaas.config"
}

/// `kafka.properties`: shown (serialised, debug-printed) with secret values redacted.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct KafkaProperties(pub std::collections::BTreeMap<String, String>);

impl std::ops::Deref for KafkaProperties {
    type Target = std::collections::BTreeMap<String, String>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for KafkaProperties {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl KafkaProperties {
    fn shown(&self) -> impl Iterator<Item = (&String, &str)> {
        self.0.iter().map(|(k, v)| (k, if names_a_secret(k) { "<redacted>" } else { v.as_str() }))
    }
}

impl Serialize for KafkaProperties {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.shown())
    }
}

impl fmt::Debug for KafkaProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.shown()).finish()
    }
}

/// A bearer token's scope; each includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Read,
    Write,
    Admin,
}

impl Scope {
    /// A scope as written in a token file line.
    pub fn parse(s: &str) -> Option<Scope> {
        match s {
            "read" => Some(Scope::Read),
            "write" => Some(Scope::Write),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }
}

/// `kafka.compression`: only the codecs librdkafka is built with here (a test holds them
/// against the library's `builtin.features`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl Compression {
    /// The codecs, as librdkafka names them (`compression.type`, `builtin.features`).
    pub const CODECS: [Compression; 4] = [Compression::Gzip, Compression::Snappy, Compression::Lz4, Compression::Zstd];

    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

/// Where a test makes the log writer abort (`writer.crash_at`); `""` in production.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WriterCrash {
    #[default]
    #[serde(rename = "")]
    Never,
    BeforePut,
    AfterPut,
    AfterCommit,
}

/// Where a test makes the relay abort (`relay.crash_at`); `""` in production.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelayCrash {
    #[default]
    #[serde(rename = "")]
    Never,
    AfterProduce,
    AfterDelivery,
    DuringCheckpoint,
}

/// Where a test makes a worker abort, or freeze after its claim (`worker.crash_at`); `""` in
/// production.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerCrash {
    #[default]
    #[serde(rename = "")]
    Never,
    AfterClaim,
    AfterEffect,
    AfterOutcome,
    BeforeCommit,
    StopAfterClaim,
}

/// Where the log lives, parsed from `log.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogLocation {
    S3 { bucket: String, prefix: String },
    Local { dir: PathBuf },
}

/// Why `log.url` names no log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadLogUrl {
    #[error("s3:// URL needs a bucket, e.g. s3://bucket/prefix")]
    NoBucket,
    #[error("must name an s3:// URL or a directory")]
    Empty,
    #[error("unsupported scheme in {0:?}; use s3:// or file://")]
    Scheme(String),
}

impl LogLocation {
    pub fn parse(url: &str) -> Result<LogLocation, BadLogUrl> {
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(BadLogUrl::NoBucket);
            }
            return Ok(LogLocation::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.trim_matches('/').to_string(),
            });
        }
        let path = url.strip_prefix("file://").unwrap_or(url);
        if path.is_empty() {
            return Err(BadLogUrl::Empty);
        }
        if url.contains("://") && !url.starts_with("file://") {
            return Err(BadLogUrl::Scheme(url.to_string()));
        }
        Ok(LogLocation::Local { dir: PathBuf::from(path) })
    }
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

    /// Checks values that types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        LogLocation::parse(&self.log.url).map_err(|e| invalid("log.url", e.to_string()))?;
        let db = self.database.url.expose();
        if !(db.starts_with("postgres://")
            || db.starts_with("postgresql://")
            || db.starts_with("sqlite://"))
        {
            return Err(invalid(
                "database.url",
                "must start with postgres://, postgresql:// or sqlite://",
            ));
        }
        if self.database.pool_size == 0 {
            return Err(invalid("database.pool_size", "must be at least 1"));
        }
        if self.serve.max_body_bytes < 1024 {
            return Err(invalid("serve.max_body_bytes", "must be at least 1024"));
        }
        if self.serve.max_bulk_instances == 0 {
            return Err(invalid("serve.max_bulk_instances", "must be at least 1"));
        }
        if self.writer.max_batch_events == 0 {
            return Err(invalid("writer.max_batch_events", "must be at least 1"));
        }
        if self.writer.max_batch_bytes < self.serve.max_body_bytes {
            return Err(invalid(
                "writer.max_batch_bytes",
                "must be at least serve.max_body_bytes, or a large command could never be written",
            ));
        }
        if self.writer.queue_bytes < self.serve.max_body_bytes {
            return Err(invalid("writer.queue_bytes", "must be at least serve.max_body_bytes"));
        }
        if self.writer.queue_depth == 0 {
            return Err(invalid("writer.queue_depth", "must be at least 1"));
        }
        self.validate_kafka()?;
        self.validate_ops_listeners()?;
        self.validate_serve_bounds()?;
        if !self.serve.ops_listen.is_empty() {
            let ops: SocketAddr = self.serve.ops_listen.parse().map_err(|_| invalid("serve.ops_listen", "must be empty or an address like 127.0.0.1:9463"))?;
            if ops == self.serve.listen && ops.port() != 0 {
                return Err(invalid("serve.ops_listen", "must differ from serve.listen"));
            }
        }
        if self.worker.stall_timeout_ms <= self.worker.gap_wait_ms {
            return Err(invalid("worker.stall_timeout_ms", format!("must be above worker.gap_wait_ms ({})", self.worker.gap_wait_ms)));
        }
        if self.project.stall_timeout_ms == 0 {
            return Err(invalid("project.stall_timeout_ms", "must be at least 1"));
        }
        if self.project.poll_interval_ms == 0 || self.worker.poll_interval_ms == 0 {
            return Err(invalid("project.poll_interval_ms", "poll intervals (project, worker) must be at least 1"));
        }
        if self.project.batch_events == 0 {
            return Err(invalid("project.batch_events", "must be at least 1"));
        }
        for (i, t) in self.auth.tokens.iter().enumerate() {
            if t.token.expose().len() < 16 || t.name.is_empty() {
                return Err(invalid(&format!("auth.tokens[{i}]"), "needs a name and a token of at least 16 characters"));
            }
        }
        Ok(())
    }

    fn validate_serve_bounds(&self) -> Result<(), ConfigError> {
        let s = &self.serve;
        if s.header_read_timeout_ms == 0 {
            return Err(invalid("serve.header_read_timeout_ms", "must be at least 1"));
        }
        if s.request_timeout_ms <= s.min_version_wait_ms {
            return Err(invalid("serve.request_timeout_ms", format!("must be above serve.min_version_wait_ms ({})", s.min_version_wait_ms)));
        }
        if s.max_connections == 0 {
            return Err(invalid("serve.max_connections", "must be at least 1"));
        }
        if s.tls.cert_file.is_empty() != s.tls.key_file.is_empty() {
            return Err(invalid("serve.tls", "set both cert_file and key_file, or neither"));
        }
        Ok(())
    }

    /// The operations endpoints answer anyone: a non-loopback address needs the opt-in.
    fn validate_ops_listeners(&self) -> Result<(), ConfigError> {
        let m = &self.metrics;
        let listeners = [
            ("serve.ops_listen", &self.serve.ops_listen),
            ("metrics.relay_listen", &m.relay_listen),
            ("metrics.worker_listen", &m.worker_listen),
            ("metrics.project_listen", &m.project_listen),
        ];
        for (key, listen) in listeners {
            if listen.is_empty() {
                continue;
            }
            let addr: SocketAddr = listen.parse().map_err(|_| invalid(key, "must be empty or an address like 127.0.0.1:9464"))?;
            if !addr.ip().is_loopback() && !m.allow_non_loopback {
                return Err(invalid(
                    key,
                    format!("{addr} is not a loopback address and the operations endpoints have no auth: set metrics.allow_non_loopback = true to expose them anyway (behind a firewall)"),
                ));
            }
        }
        Ok(())
    }

    fn validate_kafka(&self) -> Result<(), ConfigError> {
        let k = &self.kafka;
        if k.brokers.trim().is_empty() {
            return Err(invalid("kafka.brokers", "must name at least one broker"));
        }
        if !(1..=5).contains(&k.max_in_flight) {
            return Err(invalid("kafka.max_in_flight", "must be 1 to 5"));
        }
        if k.partitions < 1 || k.replication_factor < 1 {
            return Err(invalid("kafka.partitions", "partitions and replication_factor must be at least 1"));
        }
        let r = &self.relay;
        if r.poll_interval_ms == 0 || r.batch_segments == 0 {
            return Err(invalid("relay.poll_interval_ms", "poll interval and batch_segments must be at least 1"));
        }
        if r.stall_timeout_ms < 2 * k.message_timeout_ms {
            return Err(invalid(
                "relay.stall_timeout_ms",
                format!("must be at least twice kafka.message_timeout_ms ({}): one batch may take that long", k.message_timeout_ms),
            ));
        }
        if k.message_timeout_ms == 0 || k.message_timeout_ms * 2 >= r.lease_ms {
            return Err(invalid(
                "kafka.message_timeout_ms",
                format!("must be above 0 and under half of relay.lease_ms ({})", r.lease_ms),
            ));
        }
        if r.dead_letter_topic.is_empty() || r.name.is_empty() {
            return Err(invalid("relay.dead_letter_topic", "relay.name and relay.dead_letter_topic must not be empty"));
        }
        let w = &self.worker;
        if w.heartbeat_ms == 0 || w.heartbeat_ms * 2 >= w.lease_ms {
            return Err(invalid("worker.heartbeat_ms", format!("must be above 0 and under half of worker.lease_ms ({})", w.lease_ms)));
        }
        if w.lanes == 0 || w.max_attempts == 0 {
            return Err(invalid("worker.lanes", "worker.lanes and worker.max_attempts must be at least 1"));
        }
        // Longer than an hour is a unit mistake, and systemd's stop timeout must exceed it.
        if w.shutdown_grace_ms > 3_600_000 {
            return Err(invalid("worker.shutdown_grace_ms", "must be at most 3600000 (one hour)"));
        }
        Ok(())
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
