//! The API role's sections: `serve`, `auth`, and the operations listeners of the other roles
//! (`metrics`).

use super::Secret;
use super::{at_least_one, invalid, listen_address, ConfigError};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

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
    /// `count=true` on a list counts exactly up to this many rows, then answers
    /// `total_is_lower_bound: true`.
    pub max_count: u64,
    /// Relevance order (`q=` without `sort=`) ranks at most this many matches, the first the
    /// read store finds; past it a page answers `rank_is_partial: true`.
    pub max_ranked: u64,
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

impl ServeConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.max_body_bytes < 1024 {
            return Err(invalid("serve.max_body_bytes", "must be at least 1024"));
        }
        at_least_one("serve.max_bulk_instances", self.max_bulk_instances as u64)?;
        at_least_one("serve.max_count", self.max_count)?;
        at_least_one("serve.max_ranked", self.max_ranked)?;
        at_least_one("serve.header_read_timeout_ms", self.header_read_timeout_ms)?;
        at_least_one("serve.max_connections", self.max_connections as u64)?;
        if self.request_timeout_ms <= self.min_version_wait_ms {
            return Err(invalid("serve.request_timeout_ms", format!("must be above serve.min_version_wait_ms ({})", self.min_version_wait_ms)));
        }
        if self.tls.cert_file.is_empty() != self.tls.key_file.is_empty() {
            return Err(invalid("serve.tls", "set both cert_file and key_file, or neither"));
        }
        if let Some(ops) = listen_address("serve.ops_listen", &self.ops_listen, "127.0.0.1:9463")? {
            if ops == self.listen && ops.port() != 0 {
                return Err(invalid("serve.ops_listen", "must differ from serve.listen"));
            }
        }
        Ok(())
    }
}

impl MetricsConfig {
    /// The operations endpoints answer anyone: a non-loopback address (here or
    /// `serve.ops_listen`) needs the opt-in.
    pub(super) fn validate(&self, serve_ops_listen: &str) -> Result<(), ConfigError> {
        let listeners = [
            ("serve.ops_listen", serve_ops_listen),
            ("metrics.relay_listen", &self.relay_listen),
            ("metrics.worker_listen", &self.worker_listen),
            ("metrics.project_listen", &self.project_listen),
        ];
        for (key, listen) in listeners {
            let Some(addr) = listen_address(key, listen, "127.0.0.1:9464")? else { continue };
            if !addr.ip().is_loopback() && !self.allow_non_loopback {
                return Err(invalid(
                    key,
                    format!("{addr} is not a loopback address and the operations endpoints have no auth: set metrics.allow_non_loopback = true to expose them anyway (behind a firewall)"),
                ));
            }
        }
        Ok(())
    }
}

impl AuthConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for (i, t) in self.tokens.iter().enumerate() {
            if t.token.expose().len() < 16 || t.name.is_empty() {
                return Err(invalid(&format!("auth.tokens[{i}]"), "needs a name and a token of at least 16 characters"));
            }
        }
        Ok(())
    }
}
