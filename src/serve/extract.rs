//! Request parsing with the API's own errors: the body must be JSON (415 otherwise), fit the
//! size limit (413), and match the request type exactly (400 naming the field).

use super::error::ApiError;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{header, HeaderMap, StatusCode};
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};
use uuid::Uuid;

/// Parses a JSON request body into `T`.
pub fn json_body<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "request body exceeds serve.max_body_bytes",
            )
        } else {
            ApiError::invalid(format!("cannot read request body: {rejection}"))
        }
    })?;
    if !is_json(headers) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "request body must be JSON (Content-Type: application/json)",
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(&body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let error = if inner.is_syntax() || inner.is_eof() { "malformed_json" } else { "invalid_body" };
        let message = if path == "." || path == "?" { inner.to_string() } else { format!("{path}: {inner}") };
        ApiError::bad_request(error, message)
    })
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let mime = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

/// The `Idempotency-Key` header: a UUID that becomes the command id.
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<Uuid>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else { return Ok(None) };
    let text = value
        .to_str()
        .map_err(|_| ApiError::bad_request("invalid_idempotency_key", "Idempotency-Key must be a UUID"))?;
    Uuid::parse_str(text.trim())
        .map(Some)
        .map_err(|_| ApiError::bad_request("invalid_idempotency_key", "Idempotency-Key must be a UUID"))
}

/// A sequence number or version in a query (`#[serde(default, deserialize_with = ...)]`). The
/// index holds them as signed 64-bit integers, so a larger one is a 400 rather than a value no
/// aggregate can have.
pub fn seq<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match Option::<u64>::deserialize(d)? {
        Some(v) if i64::try_from(v).is_err() => Err(D::Error::custom(format!("{v} is above {}", i64::MAX))),
        v => Ok(v),
    }
}

/// Maps a query-string rejection to a 400 naming the problem.
pub fn query<T>(q: Result<axum::extract::Query<T>, axum::extract::rejection::QueryRejection>) -> Result<T, ApiError> {
    q.map(|axum::extract::Query(v)| v)
        .map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))
}

/// Maps a path rejection (e.g. a non-UUID where one is expected) to a 400.
pub fn path<T>(p: Result<axum::extract::Path<T>, axum::extract::rejection::PathRejection>) -> Result<T, ApiError> {
    p.map(|axum::extract::Path(v)| v)
        .map_err(|e| ApiError::bad_request("invalid_path", e.body_text()))
}
