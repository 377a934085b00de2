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
    refuse_unstorable(&body)?;
    let de = &mut serde_json::Deserializer::from_slice(&body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let error = if inner.is_syntax() || inner.is_eof() { "malformed_json" } else { "invalid_body" };
        let message = if path == "." || path == "?" { inner.to_string() } else { format!("{path}: {inner}") };
        ApiError::bad_request(error, message)
    })
}

/// Deepest nesting of arrays and objects a body may have. serde_json stops at 128 levels, and
/// an envelope nests a body's values a few levels deeper than the request did: a body that
/// parsed here but not in a worker or the projection would be an event nobody can ever read.
pub const MAX_DEPTH: usize = 64;

/// A body holding U+0000 in any string, key or value, at any depth, is refused: PostgreSQL
/// cannot store it in text or jsonb, so once in the log it would be an event the read models
/// can never apply. So is a body nested deeper than [`MAX_DEPTH`]. A body that is not JSON is
/// left to the typed parse, which says why.
fn refuse_unstorable(body: &[u8]) -> Result<(), ApiError> {
    let Ok(value) = serde_json::from_slice::<Value>(body) else { return Ok(()) };
    let Some(Unstorable { path, what }) = unstorable_at(&value, String::new(), 1) else { return Ok(()) };
    let field = if path.is_empty() { ".".to_string() } else { path };
    let message = match what {
        What::NulInKey => format!("{field}: a key contains U+0000 (NUL), which cannot be stored"),
        What::NulInText => format!("{field}: the text contains U+0000 (NUL), which cannot be stored"),
        What::TooDeep => format!("{field}: nested deeper than {MAX_DEPTH} levels"),
    };
    Err(ApiError::bad_request("invalid_body", message).with("field", json!(field)))
}

/// What cannot be stored, and where: the JSON path of the string, key or value.
#[derive(Debug, PartialEq)]
struct Unstorable {
    path: String,
    what: What,
}

#[derive(Debug, PartialEq)]
enum What {
    NulInKey,
    NulInText,
    TooDeep,
}

/// The first unstorable part of `value` (at nesting `depth`), found depth first; paths read
/// like `instances[3].data.name`.
fn unstorable_at(value: &Value, path: String, depth: usize) -> Option<Unstorable> {
    let nested = matches!(value, Value::Array(_) | Value::Object(_));
    if nested && depth > MAX_DEPTH {
        return Some(Unstorable { path, what: What::TooDeep });
    }
    match value {
        Value::String(s) => s.contains('\0').then_some(Unstorable { path, what: What::NulInText }),
        Value::Array(items) => {
            items.iter().enumerate().find_map(|(i, v)| unstorable_at(v, format!("{path}[{i}]"), depth + 1))
        }
        Value::Object(map) => map.iter().find_map(|(k, v)| {
            let here = if path.is_empty() { k.escape_debug().to_string() } else { format!("{path}.{}", k.escape_debug()) };
            if k.contains('\0') {
                return Some(Unstorable { path: here, what: What::NulInKey });
            }
            unstorable_at(v, here, depth + 1)
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

    fn unstorable(body: Value) -> Option<Unstorable> {
        unstorable_at(&body, String::new(), 1)
    }

    #[test]
    fn finds_a_nul_in_keys_and_values_at_any_depth() {
        let at = |path: &str, what| Some(Unstorable { path: path.into(), what });
        assert_eq!(unstorable(json!({"name": "a\u{0}b"})), at("name", What::NulInText));
        assert_eq!(unstorable(json!({"patch": {"properties": [{"name": "x"}, {"name": "y\u{0}"}]}})), at("patch.properties[1].name", What::NulInText));
        assert_eq!(unstorable(json!({"data": {"k\u{0}": 1}})), at("data.k\\0", What::NulInKey));
        assert_eq!(unstorable(json!({"instances": [{"data": {}}, {"data": {"tags": ["ok", "\u{0}"]}}]})), at("instances[1].data.tags[1]", What::NulInText));
        assert_eq!(unstorable(json!({"name": "fine", "n": 1, "ok": true, "none": null})), None);
    }

    /// `depth` levels: the body object, then `data`, then nested arrays.
    fn nested(depth: usize) -> Value {
        let mut v = json!(1);
        for _ in 0..depth - 2 {
            v = json!([v]);
        }
        json!({"data": {"deep": v}})
    }

    #[test]
    fn refuses_nesting_past_the_limit_only() {
        assert_eq!(unstorable(nested(MAX_DEPTH)), None);
        let too_deep = unstorable(nested(MAX_DEPTH + 1)).unwrap();
        assert_eq!(too_deep.what, What::TooDeep);
        assert!(too_deep.path.starts_with("data.deep[0]"), "{}", too_deep.path);
    }
}
