//! Request parsing with the API's own errors: the body must be JSON (415 otherwise), fit the
//! size limit (413), hold no U+0000 in any string (400 naming the field: the read store cannot
//! keep it), and match the request type exactly (400 naming the field).

use super::error::ApiError;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{header, HeaderMap, StatusCode};
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};
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
    refuse_nul(&body)?;
    let de = &mut serde_json::Deserializer::from_slice(&body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let error = if inner.is_syntax() || inner.is_eof() { "malformed_json" } else { "invalid_body" };
        let message = if path == "." || path == "?" { inner.to_string() } else { format!("{path}: {inner}") };
        ApiError::bad_request(error, message)
    })
}

/// A body holding U+0000 in any string, key or value, at any depth, is refused: PostgreSQL
/// cannot store it in text or jsonb, so once in the log it would be an event the read models
/// can never apply. A body that is not JSON is left to the typed parse, which says why.
fn refuse_nul(body: &[u8]) -> Result<(), ApiError> {
    let Ok(value) = serde_json::from_slice::<Value>(body) else { return Ok(()) };
    match nul_at(&value, String::new()) {
        None => Ok(()),
        Some(Nul { path, in_key }) => {
            let what = if in_key { "a key" } else { "the text" };
            let field = if path.is_empty() { ".".to_string() } else { path };
            Err(ApiError::bad_request(
                "invalid_body",
                format!("{field}: {what} contains U+0000 (NUL), which cannot be stored"),
            )
            .with("field", json!(field)))
        }
    }
}

/// Where a NUL is: the JSON path of the string, or of the key, that holds it.
#[derive(Debug, PartialEq)]
struct Nul {
    path: String,
    in_key: bool,
}

/// The first NUL in `value`, found depth first; paths read like `instances[3].data.name`.
fn nul_at(value: &Value, path: String) -> Option<Nul> {
    match value {
        Value::String(s) => s.contains('\0').then_some(Nul { path, in_key: false }),
        Value::Array(items) => items.iter().enumerate().find_map(|(i, v)| nul_at(v, format!("{path}[{i}]"))),
        Value::Object(map) => map.iter().find_map(|(k, v)| {
            let here = if path.is_empty() { k.escape_debug().to_string() } else { format!("{path}.{}", k.escape_debug()) };
            if k.contains('\0') {
                return Some(Nul { path: here, in_key: true });
            }
            nul_at(v, here)
        }),
        _ => None,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn nul(body: Value) -> Option<Nul> {
        nul_at(&body, String::new())
    }

    #[test]
    fn finds_a_nul_in_keys_and_values_at_any_depth() {
        let at = |path: &str, in_key| Some(Nul { path: path.into(), in_key });
        assert_eq!(nul(json!({"name": "a\u{0}b"})), at("name", false));
        assert_eq!(nul(json!({"patch": {"properties": [{"name": "x"}, {"name": "y\u{0}"}]}})), at("patch.properties[1].name", false));
        assert_eq!(nul(json!({"data": {"k\u{0}": 1}})), at("data.k\\0", true));
        assert_eq!(nul(json!({"instances": [{"data": {}}, {"data": {"tags": ["ok", "\u{0}"]}}]})), at("instances[1].data.tags[1]", false));
        assert_eq!(nul(json!({"name": "fine", "n": 1, "ok": true, "none": null})), None);
    }
}
