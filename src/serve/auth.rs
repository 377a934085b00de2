//! Bearer-token access control. Each token has a scope: `read` (queries), `write` (commands,
//! and reads), `admin` (everything, including `/metrics`). Tokens are compared by SHA-256
//! digest in constant time and never logged; the token's name becomes the envelope's `actor`.

use super::error::ApiError;
use crate::config::AuthConfig;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    Read,
    Write,
    Admin,
}

impl Scope {
    pub fn parse(s: &str) -> Option<Scope> {
        match s {
            "read" => Some(Scope::Read),
            "write" => Some(Scope::Write),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }
}

/// Who made a request, for `actor`.
#[derive(Debug, Clone)]
pub struct Caller(pub Option<String>);

struct Token {
    name: String,
    digest: [u8; 32],
    scope: Scope,
}

/// The configured tokens; empty means the API is open (only allowed on loopback or with
/// `--insecure-no-auth`).
#[derive(Clone, Default)]
pub struct Auth {
    tokens: Arc<Vec<Token>>,
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Equal in time independent of where the inputs differ.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Auth {
    pub fn from_config(config: &AuthConfig) -> anyhow::Result<Auth> {
        let mut tokens = Vec::new();
        for t in &config.tokens {
            tokens.push(Token {
                name: t.name.clone(),
                digest: digest(t.token.expose()),
                scope: Scope::parse(&t.scope).expect("validated in config"),
            });
        }
        if !config.token_file.is_empty() {
            let text = std::fs::read_to_string(&config.token_file)
                .map_err(|e| anyhow::anyhow!("auth.token_file {}: {e}", config.token_file))?;
            for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#')) {
                let parts: Vec<&str> = line.split_whitespace().collect();
                let [name, scope, token] = parts[..] else {
                    anyhow::bail!("auth.token_file line {}: expected `name scope token`", n + 1);
                };
                let scope = Scope::parse(scope)
                    .ok_or_else(|| anyhow::anyhow!("auth.token_file line {}: scope must be read, write or admin", n + 1))?;
                tokens.push(Token { name: name.into(), digest: digest(token), scope });
            }
        }
        Ok(Auth { tokens: Arc::new(tokens) })
    }

    pub fn is_open(&self) -> bool {
        self.tokens.is_empty()
    }

    fn find(&self, presented: &str) -> Option<&Token> {
        let d = digest(presented);
        // Check every token, so the time does not say which one matched.
        let mut found = None;
        for t in self.tokens.iter() {
            if constant_time_eq(&t.digest, &d) {
                found = Some(t);
            }
        }
        found
    }
}

/// The scope a request needs: reads need `read`, commands `write`, `/metrics` `admin`;
/// health checks and the OpenAPI document (the same for every deployment of this build, it
/// shows nothing of the data) need nothing.
fn required(method: &Method, path: &str) -> Option<Scope> {
    match path {
        "/healthz" | "/readyz" | super::openapi::PATH => None,
        "/metrics" => Some(Scope::Admin),
        _ if method == Method::GET || method == Method::HEAD => Some(Scope::Read),
        _ => Some(Scope::Write),
    }
}

pub async fn check(State(auth): State<Auth>, mut request: Request, next: Next) -> Response {
    if auth.is_open() {
        request.extensions_mut().insert(Caller(None));
        return next.run(request).await;
    }
    let Some(needed) = required(request.method(), request.uri().path()) else {
        return next.run(request).await;
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let token = match presented.and_then(|p| auth.find(p)) {
        Some(t) => t,
        None => {
            let mut response = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "a valid bearer token is required")
                .into_response();
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
    };
    if token.scope < needed {
        return ApiError::new(StatusCode::FORBIDDEN, "forbidden", format!("this token's scope does not allow {needed:?} access").to_lowercase())
            .into_response();
    }
    request.extensions_mut().insert(Caller(Some(token.name.clone())));
    next.run(request).await
}

/// Refuses an open API on a non-loopback address unless the operator said so.
pub fn check_exposure(auth: &Auth, listen: std::net::SocketAddr, insecure: bool) -> anyhow::Result<()> {
    if !auth.is_open() || listen.ip().is_loopback() {
        return Ok(());
    }
    if insecure {
        tracing::warn!(%listen, "--insecure-no-auth: the API is open to anyone who can reach {listen}");
        return Ok(());
    }
    anyhow::bail!(
        "refusing to listen on {listen} with no auth tokens configured: add [auth] tokens (or auth.token_file), \
         listen on a loopback address, or pass --insecure-no-auth"
    )
}
