//! The event log's sections: where it lives (`log`, `log.s3`) and how the writer commits to it
//! (`writer`).

use super::Secret;
use super::{at_least_one, invalid, ConfigError};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

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
    /// 1: the serial protocol, one batch at a time under the head lock across the segment
    /// write. Above 1 (PostgreSQL only): the pipelined commit, this many batches of the process
    /// between their reserved position and its publish at once. Every `serve` process on one
    /// database must use the same protocol. On a CPU-bound host the serial one is faster
    /// (its batches are larger); see `docs/design.md`.
    pub max_in_flight: usize,
    /// Milliseconds a reserved position is its writer's (server time); past it, anyone may
    /// fill it with a void segment so that the log does not wait for a dead writer. Above
    /// the time a segment write may take (`log.s3.retry_timeout_ms`).
    pub reservation_ms: u64,
    /// Testing only: abort the process at this point of the commit protocol
    /// (`before_put`, `after_put`, `after_commit`, `window_full`). Empty in production.
    pub crash_at: WriterCrash,
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
    /// After a segment write while every batch the window allows is in flight
    /// (`writer.max_in_flight`; the pipelined commit only).
    WindowFull,
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

impl LogConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        LogLocation::parse(&self.url).map_err(|e| invalid("log.url", e.to_string()))?;
        Ok(())
    }
}

impl WriterConfig {
    /// `max_body_bytes` is `serve.max_body_bytes`: the largest command must fit a batch and the
    /// queue.
    pub(super) fn validate(&self, max_body_bytes: usize) -> Result<(), ConfigError> {
        at_least_one("writer.max_batch_events", self.max_batch_events as u64)?;
        at_least_one("writer.queue_depth", self.queue_depth as u64)?;
        at_least_one("writer.max_in_flight", self.max_in_flight as u64)?;
        at_least_one("writer.reservation_ms", self.reservation_ms)?;
        if self.max_batch_bytes < max_body_bytes {
            return Err(invalid(
                "writer.max_batch_bytes",
                "must be at least serve.max_body_bytes, or a large command could never be written",
            ));
        }
        if self.queue_bytes < max_body_bytes {
            return Err(invalid("writer.queue_bytes", "must be at least serve.max_body_bytes"));
        }
        Ok(())
    }
}
