//! The sections of the pipeline's stages behind the log: `relay`, `worker`, `project`.

use crate::domain::Role;
use super::{at_least_one, invalid, ConfigError};
use serde::{Deserialize, Serialize};

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
    /// Commands running at once per role and process; one Kafka key (aggregate) runs in
    /// order, and a command waiting for another aggregate's outcome does not count.
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

impl RelayConfig {
    /// `message_timeout_ms` is `kafka.message_timeout_ms`, the longest one batch's delivery
    /// may take.
    pub(super) fn validate(&self, message_timeout_ms: u64) -> Result<(), ConfigError> {
        at_least_one("relay.poll_interval_ms", self.poll_interval_ms)?;
        at_least_one("relay.batch_segments", self.batch_segments as u64)?;
        if self.stall_timeout_ms < 2 * message_timeout_ms {
            return Err(invalid(
                "relay.stall_timeout_ms",
                format!("must be at least twice kafka.message_timeout_ms ({message_timeout_ms}): one batch may take that long"),
            ));
        }
        // A relay's messages must be settled before its lease can pass on.
        if message_timeout_ms * 2 >= self.lease_ms {
            return Err(invalid(
                "kafka.message_timeout_ms",
                format!("must be above 0 and under half of relay.lease_ms ({})", self.lease_ms),
            ));
        }
        if self.dead_letter_topic.is_empty() || self.name.is_empty() {
            return Err(invalid("relay.dead_letter_topic", "relay.name and relay.dead_letter_topic must not be empty"));
        }
        Ok(())
    }
}

impl WorkerConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.heartbeat_ms == 0 || self.heartbeat_ms * 2 >= self.lease_ms {
            return Err(invalid("worker.heartbeat_ms", format!("must be above 0 and under half of worker.lease_ms ({})", self.lease_ms)));
        }
        at_least_one("worker.lanes", self.lanes as u64)?;
        at_least_one("worker.max_attempts", self.max_attempts as u64)?;
        at_least_one("worker.poll_interval_ms", self.poll_interval_ms)?;
        if self.stall_timeout_ms <= self.gap_wait_ms {
            return Err(invalid("worker.stall_timeout_ms", format!("must be above worker.gap_wait_ms ({})", self.gap_wait_ms)));
        }
        // Longer than an hour is a unit mistake, and systemd's stop timeout must exceed it.
        if self.shutdown_grace_ms > 3_600_000 {
            return Err(invalid("worker.shutdown_grace_ms", "must be at most 3600000 (one hour)"));
        }
        Ok(())
    }
}

impl ProjectConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        at_least_one("project.stall_timeout_ms", self.stall_timeout_ms)?;
        at_least_one("project.poll_interval_ms", self.poll_interval_ms)?;
        at_least_one("project.batch_events", self.batch_events as u64)
    }
}
