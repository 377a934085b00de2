//! The API's one error type: every failure becomes a status and a JSON body
//! `{error, message, ...}`; infrastructure failures (a [`DbError`] or [`LogError`] converts by
//! `?`) become 503 with a generic message, their cause going to the log. Every 503 gets
//! `Retry-After: serve.retry_after_secs` from the router unless it set its own.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use crate::db::DbError;
use crate::log::LogError;
use serde_json::{json, Map, Value};

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: Map<String, Value>,
    retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, error: &str, message: impl Into<String>) -> Self {
        let mut body = Map::new();
        body.insert("error".into(), json!(error));
        body.insert("message".into(), json!(message.into()));
        ApiError { status, body, retry_after: None }
    }

    pub fn bad_request(error: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, error, message)
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::bad_request("invalid_request", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// A dependency failed; `cause` is logged, never sent.
    pub fn unavailable(cause: &dyn std::fmt::Display) -> Self {
        tracing::warn!(error = %cause, "request failed on a dependency");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "a dependency of spiced is unavailable; retry later (with the same Idempotency-Key for commands)",
        )
    }

    /// Adds a field to the body.
    pub fn with(mut self, key: &str, value: Value) -> Self {
        self.body.insert(key.into(), value);
        self
    }

    /// Asks the client to come back after `secs` (`Retry-After`).
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(Value::Object(self.body))).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        ApiError::unavailable(&e)
    }
}

impl From<LogError> for ApiError {
    fn from(e: LogError) -> Self {
        ApiError::unavailable(&e)
    }
}

impl From<crate::status::StatusError> for ApiError {
    fn from(e: crate::status::StatusError) -> Self {
        match e {
            crate::status::StatusError::Db(e) => e.into(),
            crate::status::StatusError::Log(e) => e.into(),
        }
    }
}

impl From<crate::domain::commands::Invalid> for ApiError {
    fn from(e: crate::domain::commands::Invalid) -> Self {
        match e {
            crate::domain::commands::Invalid::Id(e) => e.into(),
            crate::domain::commands::Invalid::Request { code, message } => ApiError::bad_request(code, message),
        }
    }
}

impl From<crate::db::read::filter::InvalidFilter> for ApiError {
    fn from(e: crate::db::read::filter::InvalidFilter) -> Self {
        ApiError::bad_request("invalid_filter", e.to_string())
    }
}

impl From<crate::db::read::search::InvalidSearch> for ApiError {
    fn from(e: crate::db::read::search::InvalidSearch) -> Self {
        ApiError::bad_request("invalid_search", e.to_string())
    }
}

impl From<crate::db::read::sort::InvalidSort> for ApiError {
    fn from(e: crate::db::read::sort::InvalidSort) -> Self {
        ApiError::bad_request("invalid_sort", e.to_string())
    }
}

impl From<crate::domain::IdError> for ApiError {
    fn from(e: crate::domain::IdError) -> Self {
        ApiError::bad_request("invalid_id", e.to_string()).with("field", json!(e.field))
    }
}
