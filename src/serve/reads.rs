//! Reads of the write side: command status, aggregate versions and per-aggregate history,
//! answered from the log index and the log itself. Plus health and readiness.

use super::commands::accepted_body;
use super::error::ApiError;
use super::extract::{path, query};
use super::AppState;
use crate::domain::AggregateKey;
use crate::envelope::{EventEnvelope, Kind};
use crate::log::plan::Appended;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::{StreamExt, TryStreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use uuid::Uuid;

/// Most events one `/events` call returns; the response says where to continue.
pub const MAX_EVENTS_PER_READ: u64 = 1000;

pub async fn get_command(
    State(state): State<AppState>,
    p: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let raw = path(p)?;
    let id = Uuid::parse_str(&raw)
        .map_err(|_| ApiError::bad_request("invalid_command_id", format!("{raw:?} is not a UUID")))?;
    let rows = state.index().command(id).await.map_err(|e| state.unavailable(&e))?;
    if rows.is_empty() {
        return Err(ApiError::not_found(format!("no command {id}")));
    }
    let bulk = rows.len() > 1 || rows[0].event_id != rows[0].command_id;
    let events: Vec<Appended> = rows
        .iter()
        .map(|r| Appended { key: r.key.clone(), seq: r.seq, event_id: r.event_id })
        .collect();
    let mut body = accepted_body(id, bulk, &events);
    body["error"] = Value::Null;
    Ok(Json(body))
}

pub async fn get_aggregate(
    State(state): State<AppState>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let (ty, id) = path(p)?;
    let key = AggregateKey::parse(&ty, &id)?;
    let version = state.index().version(&key).await.map_err(|e| state.unavailable(&e))?;
    Ok(Json(json!({
        "aggregate_type": key.aggregate_type.as_str(),
        "aggregate_id": key.aggregate_id,
        "version": version,
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    from_seq: Option<u64>,
    to_seq: Option<u64>,
    /// `command` (default) or `domain`.
    kind: Option<String>,
}

pub async fn get_events(
    State(state): State<AppState>,
    p: Result<Path<(String, String)>, PathRejection>,
    q: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let (ty, id) = path(p)?;
    let q = query(q)?;
    let key = AggregateKey::parse(&ty, &id)?;
    let kind = match q.kind.as_deref() {
        None => Kind::Command,
        Some(k) => Kind::parse(k)
            .ok_or_else(|| ApiError::bad_request("invalid_query", "kind must be command or domain"))?,
    };
    let from = q.from_seq.unwrap_or(1).max(1);
    let to = q.to_seq.unwrap_or(u64::MAX);
    if to < from {
        return Err(ApiError::bad_request("invalid_query", "to_seq is below from_seq"));
    }
    let capped_to = to.min(from.saturating_add(MAX_EVENTS_PER_READ - 1));
    let found = state
        .index()
        .positions(&key, kind, from, capped_to)
        .await
        .map_err(|e| state.unavailable(&e))?;
    let events = read_events(&state, &key, kind, &found).await?;
    let next = (capped_to < to && found.len() as u64 == MAX_EVENTS_PER_READ).then(|| capped_to + 1);
    Ok(Json(json!({
        "aggregate_type": key.aggregate_type.as_str(),
        "aggregate_id": key.aggregate_id,
        "events": events,
        "next_from_seq": next,
    })))
}

/// Fetches the segments holding `found` and picks the aggregate's envelopes, in sequence order.
async fn read_events(
    state: &AppState,
    key: &AggregateKey,
    kind: Kind,
    found: &[(u64, u64)],
) -> Result<Vec<EventEnvelope>, ApiError> {
    let positions: BTreeSet<u64> = found.iter().map(|(_, p)| *p).collect();
    let segments: Vec<_> = futures::stream::iter(positions)
        .map(|p| async move { state.log.get_segment(p).await.map(|s| (p, s)) })
        .buffered(8)
        .try_collect()
        .await
        .map_err(|e| state.unavailable(&e))?;
    let mut events = Vec::with_capacity(found.len());
    for (position, segment) in segments {
        let segment = segment.ok_or_else(|| {
            tracing::error!(position, "the index names a log position that does not exist");
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "log index and log disagree; run `spiced verify`")
        })?;
        events.extend(segment.events.into_iter().filter(|e| {
            e.aggregate_id == key.aggregate_id
                && e.aggregate_type == key.aggregate_type.as_str()
                && e.kind() == Some(kind)
        }));
    }
    let wanted: BTreeSet<u64> = found.iter().map(|(s, _)| *s).collect();
    events.retain(|e| e.sequence_number.is_some_and(|s| wanted.contains(&s)));
    events.sort_by_key(|e| e.sequence_number);
    Ok(events)
}

pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Ready when both the log store and the database answer.
pub async fn readyz(State(state): State<AppState>) -> Response {
    let (log, db) = tokio::join!(state.log.ping(), state.index().ping());
    let describe = |r: Result<(), String>| match r {
        Ok(()) => json!("ok"),
        Err(e) => json!(e),
    };
    let ready = log.is_ok() && db.is_ok();
    let body = json!({
        "status": if ready { "ready" } else { "unavailable" },
        "log": describe(log.map_err(|e| e.to_string())),
        "database": describe(db.map_err(|e| e.to_string())),
    });
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}
