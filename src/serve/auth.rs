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

pub use crate::config::Scope;

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
                scope: t.scope,
            });
        }
        if !config.token_file.is_empty() {
            let from_file = read_token_file(&config.token_file)?;
            if from_file.is_empty() && !config.insecure_no_auth {
                anyhow::bail!(
                    "auth.token_file {} holds no token: the API would be open to anyone; add `name scope token` lines, \
                     or pass --insecure-no-auth to run without auth on purpose",
                    config.token_file
                );
            }
            tokens.extend(from_file);
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

/// The shortest token accepted, inline or from the token file.
pub const MIN_TOKEN_LEN: usize = 16;

/// Reads `name scope token` lines from a file only spiced (or root) can change: one that
/// others could write to, or that another user owns, could hand out access.
fn read_token_file(path: &str) -> anyhow::Result<Vec<Token>> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| anyhow::anyhow!("auth.token_file {path}: {e}"))?;
    if meta.mode() & 0o022 != 0 {
        anyhow::bail!("auth.token_file {path} is writable by group or others (mode {:o}): chmod 600 it", meta.mode() & 0o777);
    }
    // The process's own user is the owner of /proc/self.
    let me = std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(0);
    if meta.uid() != 0 && meta.uid() != me {
        anyhow::bail!("auth.token_file {path} is owned by uid {}, neither root nor this process's user (uid {me})", meta.uid());
    }
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("auth.token_file {path}: {e}"))?;
    let mut tokens = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#')) {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let [name, scope, token] = parts[..] else {
            anyhow::bail!("auth.token_file line {}: expected `name scope token`", n + 1);
        };
        let scope = Scope::parse(scope)
            .ok_or_else(|| anyhow::anyhow!("auth.token_file line {}: scope must be read, write or admin", n + 1))?;
        if token.len() < MIN_TOKEN_LEN {
            anyhow::bail!("auth.token_file line {}: the token must be at least {MIN_TOKEN_LEN} characters", n + 1);
        }
        tokens.push(Token { name: name.into(), digest: digest(token), scope });
    }
    Ok(tokens)
}

/// The credentials of an `Authorization: Bearer <token>` header; the scheme is
/// case-insensitive (RFC 9110).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(char::is_whitespace)?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

/// The scope a request needs: reads need `read`, commands `write`, `/metrics` and a dead
/// letter's re-drive `admin`;
/// health checks, the OpenAPI document and the console page (the same for every deployment of
/// this build, they show nothing of the data; the console's own calls carry a token) need
/// nothing.
fn required(method: &Method, path: &str) -> Option<Scope> {
    match path {
        "/healthz" | "/readyz" | "/console" | super::schema::OPENAPI_PATH => None,
        "/metrics" => Some(Scope::Admin),
        // Re-driving runs a command again: an operator's act, not a client's.
        _ if path.ends_with("/redrive") => Some(Scope::Admin),
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
        .and_then(bearer);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn config(file: &std::path::Path, insecure: bool) -> AuthConfig {
        AuthConfig { tokens: Vec::new(), token_file: file.display().to_string(), insecure_no_auth: insecure }
    }

    fn file(text: &str, mode: u32) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        f
    }

    fn refused(f: &tempfile::NamedTempFile, insecure: bool) -> String {
        match Auth::from_config(&config(f.path(), insecure)) {
            Ok(_) => panic!("token file accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_token_file_must_be_private_non_empty_and_hold_long_tokens() {
        let good = file("ci read 0123456789abcdef\n", 0o600);
        assert!(!Auth::from_config(&config(good.path(), false)).unwrap().is_open());
        assert!(refused(&file("ci read 0123456789abcdef\n", 0o620), false).contains("writable by group or others"));
        assert!(refused(&file("ci read 0123456789abcdef\n", 0o602), false).contains("writable by group or others"));
        assert!(refused(&file("ci read short\n", 0o600), false).contains("at least 16"));
        let theirs = file("ci read 0123456789abcdef\n", 0o600);
        let me = std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m)).unwrap();
        if me == 0 {
            // Only root can give a file away; elsewhere this case cannot be set up.
            std::os::unix::fs::chown(theirs.path(), Some(54321), None).unwrap();
            assert!(refused(&theirs, false).contains("owned by uid 54321"));
        }
        let empty = file("# nobody yet\n", 0o600);
        assert!(refused(&empty, false).contains("--insecure-no-auth"));
        assert!(Auth::from_config(&config(empty.path(), true)).unwrap().is_open(), "open on purpose");
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer abc"), Some("abc"));
        assert_eq!(bearer("BEARER   abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer"), None);
        assert_eq!(bearer("Bearer "), None);
    }
}
