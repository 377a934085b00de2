//! `GET /api/v1/log`: the log itself by position, for the console's live tail and for
//! scripts. A long poll: with nothing at `from_position` yet it waits (bounded) for that
//! position to be written, one GET of the segment per poll, as the relay does.

use super::error::ApiError;
use super::extract::query;
use super::schema::{ApiErrors, LogErrors};
use super::AppState;
use crate::envelope::EventEnvelope;
use crate::log::EventLog;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use utoipa::{IntoParams, ToSchema};

/// Most positions one call reads.
const MAX_POSITIONS: u64 = 100;
const DEFAULT_POSITIONS: u64 = 20;
/// Most bytes of segments one call returns (at least one segment, whatever its size).
const MAX_BYTES: usize = 4 * 1024 * 1024;
/// The longest wait, and at most half of `serve.request_timeout_ms`, so the answer comes
/// before the request is cut off.
const MAX_WAIT_MS: u64 = 25_000;
const MAX_POSITION: u64 = i64::MAX as u64;
const POLL: Duration = Duration::from_millis(200);

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct LogQuery {
    /// First position to read (at least 1); absent: the last `limit` positions.
    #[param(minimum = 1, maximum = 9223372036854775807_i64)]
    from_position: Option<u64>,
    /// Most positions to read, 1 to 100; 20 when absent. A call also ends after 4 MiB of
    /// segments.
    limit: Option<u64>,
    /// With nothing written at `from_position` yet: how long to wait for it, in ms, at most
    /// 25,000 and at most half of `serve.request_timeout_ms`; 0 (answer at once) when absent.
    wait_ms: Option<u64>,
    /// Only envelopes of this `event_type`.
    event_type: Option<String>,
    /// Only envelopes of this aggregate id.
    aggregate_id: Option<String>,
}

/// Positions of the log, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct LogPage {
    /// The envelopes read (those matching the filters), each with its log position.
    pub events: Vec<LogEntry>,
    /// Where to go on: pass it as `from_position` (with `wait_ms` to follow the log).
    pub next_position: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LogEntry {
    pub position: u64,
    pub envelope: EventEnvelope,
}

/// The log by position.
#[utoipa::path(
    get,
    path = "/api/v1/log",
    tag = "reads",
    params(LogQuery),
    responses((status = 200, description = "Positions of the log", body = LogPage), ApiErrors, LogErrors),
    security(("bearer" = ["read"]))
)]
pub async fn get_log(State(state): State<AppState>, q: Result<Query<LogQuery>, QueryRejection>) -> Result<Json<LogPage>, ApiError> {
    let q = query(q)?;
    let limit = q.limit.unwrap_or(DEFAULT_POSITIONS);
    if !(1..=MAX_POSITIONS).contains(&limit) {
        return Err(ApiError::bad_request("invalid_query", format!("limit must be 1 to {MAX_POSITIONS}")));
    }
    let max_wait = MAX_WAIT_MS.min(state.config.serve.request_timeout_ms / 2);
    let wait = q.wait_ms.unwrap_or(0);
    if wait > max_wait {
        return Err(ApiError::bad_request("invalid_query", format!("wait_ms must be at most {max_wait}")));
    }
    let from = match q.from_position {
        // Positions are 63-bit in the index; the bound also keeps `from + limit` from overflowing.
        Some(p) if !(1..=MAX_POSITION).contains(&p) => {
            return Err(ApiError::bad_request("invalid_query", format!("from_position must be 1 to {MAX_POSITION}")))
        }
        Some(p) => p,
        None => (head(&state).await? + 1).saturating_sub(limit).max(1),
    };
    if wait > 0 {
        wait_for(&state.log, from, Duration::from_millis(wait)).await?;
    }
    let mut events = Vec::new();
    let (mut next, mut bytes) = (from, 0);
    while next < from + limit && (bytes < MAX_BYTES || next == from) {
        let Some(segment) = state.log.get_segment(next).await? else { break };
        bytes += segment.raw().len();
        let position = segment.position;
        events.extend(segment.events.into_iter().filter(|e| wanted(&q, e)).map(|envelope| LogEntry { position, envelope }));
        next += 1;
    }
    Ok(Json(LogPage { events, next_position: next }))
}

fn wanted(q: &LogQuery, e: &EventEnvelope) -> bool {
    q.event_type.as_ref().is_none_or(|t| *t == e.event_type) && q.aggregate_id.as_ref().is_none_or(|a| *a == e.aggregate_id)
}

/// The highest written position: the index head, then one GET past it for each segment
/// whose index rows a crashed writer left for the next one to repair.
async fn head(state: &AppState) -> Result<u64, ApiError> {
    let mut head = state.index().head().await?;
    while state.log.get_segment(head + 1).await?.is_some() {
        head += 1;
    }
    Ok(head)
}

/// Returns once `position` is written or `wait` has passed.
async fn wait_for(log: &EventLog, position: u64, wait: Duration) -> Result<(), ApiError> {
    let deadline = tokio::time::Instant::now() + wait;
    while log.get_segment(position).await?.is_none() {
        if tokio::time::Instant::now() + POLL > deadline {
            return Ok(());
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}
