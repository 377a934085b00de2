//! Reads of the write side: command status, aggregate versions and per-aggregate history,
//! answered from the log index and the log itself. Plus health and readiness.

use super::commands::accepted_body;
use super::error::ApiError;
use super::extract::{path, query};
use super::schema::{AggregatePath, AggregateVersion, ApiErrors, CommandBody, EventsPage, Health, LogErrors, NotFound, Readiness};
use super::AppState;
use crate::domain::AggregateKey;
use crate::envelope::{EventEnvelope, Kind};
use crate::log::plan::Appended;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap, HashSet};
use utoipa::IntoParams;
use uuid::Uuid;

/// Most events one `/events` call returns; the response says where to continue.
pub const MAX_EVENTS_PER_READ: u64 = 1000;

/// Most bytes of envelopes one `/events` page holds (at least one envelope, whatever its
/// size); the page then ends early and `next_from_seq` says where to go on. Segments are read
/// a few at a time and dropped once the aggregate's envelopes are taken from them, so a page
/// never holds its segments (up to 1000 of 8 MiB) in memory.
pub const MAX_EVENT_BYTES_PER_READ: usize = 4 * 1024 * 1024;

/// A command's progress: `PENDING` until a worker takes it, then `PROCESSING`, `RETRYING`,
/// `COMPLETED` or `FAILED`; a bulk command reports each instance.
#[utoipa::path(
    get,
    path = "/api/v1/commands/{command_id}",
    tag = "reads",
    params(("command_id" = Uuid, Path, description = "The command's id (its `Idempotency-Key`)")),
    responses((status = 200, description = "The command", body = CommandBody), ApiErrors, NotFound, LogErrors),
    security(("bearer" = ["read"]))
)]
pub async fn get_command(
    State(state): State<AppState>,
    p: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let raw = path(p)?;
    let id = Uuid::parse_str(&raw)
        .map_err(|_| ApiError::bad_request("invalid_command_id", format!("{raw:?} is not a UUID")))?;
    let rows = state.index().command(id).await?;
    if rows.is_empty() {
        return Err(ApiError::not_found(format!("no command {id}")));
    }
    let bulk = rows.len() > 1 || rows[0].event_id != rows[0].command_id;
    let events: Vec<Appended> = rows
        .iter()
        .map(|r| Appended { key: r.key.clone(), seq: r.seq, event_id: r.event_id })
        .collect();
    let mut body = accepted_body(id, bulk, &events);
    let statuses = command_statuses(&state, id, &rows).await?;
    let (status, error) = overall(&statuses);
    body["status"] = json!(status);
    body["error"] = error;
    if let Some(instances) = body.get_mut("instances").and_then(Value::as_array_mut) {
        let by_aggregate: HashMap<&str, &EventStatus> = statuses.iter().map(|s| (s.aggregate_id.as_str(), s)).collect();
        for instance in instances {
            let s = instance["aggregate_id"].as_str().and_then(|a| by_aggregate.get(a));
            if let Some(s) = s {
                instance["status"] = json!(s.status);
                instance["error"] = s.error.clone();
            }
        }
    }
    Ok(Json(body))
}

/// One envelope's progress: from its outcome in the log if there is one, else the registry.
struct EventStatus {
    aggregate_id: String,
    status: &'static str,
    error: Value,
}

async fn command_statuses(
    state: &AppState,
    command_id: Uuid,
    rows: &[crate::db::IndexRow],
) -> Result<Vec<EventStatus>, ApiError> {
    let outcomes = state.index().outcomes(command_id).await?;
    let by_member: HashMap<(&AggregateKey, u64), &crate::db::IndexRow> = outcomes.iter().map(|o| ((&o.key, o.seq), o)).collect();
    let envelopes = outcome_envelopes(state, &outcomes).await?;
    let mut statuses = Vec::with_capacity(rows.len());
    for row in rows {
        let status = match by_member.get(&(&row.key, row.seq)) {
            Some(outcome) => outcome_status(envelopes.get(&outcome.event_id).ok_or_else(|| disagree(outcome.position))?),
            None => {
                let processed = state.db.registry.rows(row.event_id).await?;
                registry_status(&processed)
            }
        };
        statuses.push(EventStatus { aggregate_id: row.key.aggregate_id.clone(), ..status });
    }
    Ok(statuses)
}

/// The outcome envelopes of a command by event id, each segment read once: a bulk command's
/// thousand outcomes share a few segments.
async fn outcome_envelopes(state: &AppState, outcomes: &[crate::db::IndexRow]) -> Result<HashMap<Uuid, EventEnvelope>, ApiError> {
    let wanted: HashSet<Uuid> = outcomes.iter().map(|o| o.event_id).collect();
    let positions: BTreeSet<u64> = outcomes.iter().map(|o| o.position).collect();
    let mut segments = futures::stream::iter(positions)
        .map(|p| async move { state.log.get_segment(p).await.map(|s| (p, s)) })
        .buffered(8);
    let mut found = HashMap::with_capacity(wanted.len());
    while let Some(next) = segments.next().await {
        let (position, segment) = next?;
        let segment = segment.ok_or_else(|| disagree(position))?;
        found.extend(segment.events.into_iter().filter(|e| wanted.contains(&e.event_id)).map(|e| (e.event_id, e)));
    }
    Ok(found)
}

/// The index names a log position (or an event at it) that the log does not hold.
fn disagree(position: u64) -> ApiError {
    tracing::error!(position, "the index names a log position or event the log does not hold");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "log index and log disagree; run `spiced verify`")
}

fn outcome_status(envelope: &EventEnvelope) -> EventStatus {
    let failed = envelope.event_type == "COMMAND_FAILED";
    EventStatus {
        aggregate_id: String::new(),
        status: if failed { "FAILED" } else { "COMPLETED" },
        error: if failed { envelope.data.get("error").cloned().unwrap_or(Value::Null) } else { Value::Null },
    }
}

fn registry_status(rows: &[crate::db::registry::Processed]) -> EventStatus {
    let error = |r: &crate::db::registry::Processed| {
        r.last_error.as_ref().map(|m| json!({"code": "processing_error", "message": m})).unwrap_or(Value::Null)
    };
    let status = rows
        .iter()
        .map(|r| match r.status.as_str() {
            "failed" => ("FAILED", error(r)),
            "retrying" => ("RETRYING", error(r)),
            "processing" => ("PROCESSING", Value::Null),
            // done without an outcome cannot happen; report it as processing until it shows.
            _ => ("PROCESSING", Value::Null),
        })
        // One event's rows (one per handler): a failure speaks for the event.
        .max_by_key(|(s, _)| if *s == "FAILED" { u8::MAX } else { rank(s) })
        .unwrap_or(("PENDING", Value::Null));
    EventStatus { aggregate_id: String::new(), status: status.0, error: status.1 }
}

/// Which status speaks for a bulk command while members are still open: any retry, else any
/// processing, else pending.
fn rank(status: &str) -> u8 {
    match status {
        "RETRYING" => 4,
        "PROCESSING" => 3,
        "PENDING" => 2,
        _ => 1,
    }
}

fn is_final(status: &str) -> bool {
    matches!(status, "COMPLETED" | "FAILED")
}

/// A bulk command's status is final only when every member's is: until then it is the most
/// advanced open member's (a client polling for a final status must not stop early); then it
/// is `FAILED` (with the first failure's error) if any member failed, else `COMPLETED`.
fn overall(statuses: &[EventStatus]) -> (&'static str, Value) {
    let open = statuses.iter().filter(|s| !is_final(s.status)).max_by_key(|s| rank(s.status));
    if let Some(s) = open {
        return (s.status, Value::Null);
    }
    match statuses.iter().find(|s| s.status == "FAILED") {
        Some(failed) => ("FAILED", failed.error.clone()),
        None if statuses.is_empty() => ("PENDING", Value::Null),
        None => ("COMPLETED", Value::Null),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(status: &'static str) -> EventStatus {
        let error = if status == "FAILED" { json!({"code": "invalid_instance"}) } else { Value::Null };
        EventStatus { aggregate_id: String::new(), status, error }
    }

    #[test]
    fn a_bulk_command_is_final_only_when_every_member_is() {
        let of = |s: &[&'static str]| overall(&s.iter().map(|s| member(s)).collect::<Vec<_>>()).0;
        assert_eq!(of(&["FAILED", "PENDING", "COMPLETED"]), "PENDING");
        assert_eq!(of(&["FAILED", "PROCESSING", "PENDING"]), "PROCESSING");
        assert_eq!(of(&["COMPLETED", "RETRYING", "PROCESSING"]), "RETRYING");
        assert_eq!(of(&["COMPLETED", "FAILED", "COMPLETED"]), "FAILED");
        assert_eq!(of(&["COMPLETED", "COMPLETED"]), "COMPLETED");
        assert_eq!(of(&["PENDING"]), "PENDING");
        let failed = overall(&[member("COMPLETED"), member("FAILED")]);
        assert_eq!(failed.1["code"], "invalid_instance", "a final failure carries its error");
        assert_eq!(overall(&[member("FAILED"), member("PENDING")]).1, Value::Null, "no error while open");
    }
}

/// An aggregate's current version in the log (0 if it has none).
#[utoipa::path(
    get,
    path = "/api/v1/aggregates/{aggregate_type}/{aggregate_id}",
    tag = "reads",
    params(AggregatePath),
    responses((status = 200, description = "The aggregate's version", body = AggregateVersion), ApiErrors),
    security(("bearer" = ["read"]))
)]
pub async fn get_aggregate(
    State(state): State<AppState>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let (ty, id) = path(p)?;
    let key = AggregateKey::parse(&ty, &id)?;
    let version = state.index().version(&key).await?;
    Ok(Json(json!({
        "aggregate_type": key.aggregate_type.as_str(),
        "aggregate_id": key.aggregate_id,
        "version": version,
    })))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// First sequence number; 1 when absent.
    #[serde(default, deserialize_with = "super::extract::seq")]
    from_seq: Option<u64>,
    /// Last sequence number; the newest when absent.
    #[serde(default, deserialize_with = "super::extract::seq")]
    to_seq: Option<u64>,
    /// `command` (default): the requests; `domain`: their outcomes.
    #[param(pattern = "^(command|domain)$")]
    kind: Option<String>,
}

/// An aggregate's envelopes from the log, in sequence order, at most 1000 per call.
#[utoipa::path(
    get,
    path = "/api/v1/aggregates/{aggregate_type}/{aggregate_id}/events",
    tag = "reads",
    params(AggregatePath, EventsQuery),
    responses((status = 200, description = "The envelopes", body = EventsPage), ApiErrors, LogErrors),
    security(("bearer" = ["read"]))
)]
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
        .await?;
    let (events, cut) = read_events(&state, &key, kind, &found).await?;
    let next = cut.or_else(|| (capped_to < to && found.len() as u64 == MAX_EVENTS_PER_READ).then(|| capped_to + 1));
    Ok(Json(json!({
        "aggregate_type": key.aggregate_type.as_str(),
        "aggregate_id": key.aggregate_id,
        "events": events,
        "next_from_seq": next,
    })))
}

/// Fetches the segments holding `found` (sequence, position pairs in sequence order) and picks
/// the aggregate's envelopes, in sequence order, up to [`MAX_EVENT_BYTES_PER_READ`]; the second
/// value is the first sequence left out when the page ended early.
async fn read_events(
    state: &AppState,
    key: &AggregateKey,
    kind: Kind,
    found: &[(u64, u64)],
) -> Result<(Vec<EventEnvelope>, Option<u64>), ApiError> {
    let wanted: BTreeSet<u64> = found.iter().map(|(s, _)| *s).collect();
    let positions: BTreeSet<u64> = found.iter().map(|(_, p)| *p).collect();
    // One aggregate's sequence order is its log order: segments in position order give its
    // envelopes in sequence order.
    let mut segments = futures::stream::iter(positions)
        .map(|p| async move { state.log.get_segment(p).await.map(|s| (p, s)) })
        .buffered(8);
    let (mut events, mut bytes) = (Vec::with_capacity(found.len()), 0usize);
    while let Some(next) = segments.next().await {
        let (position, segment) = next?;
        let segment = segment.ok_or_else(|| disagree(position))?;
        for (i, e) in segment.events.iter().enumerate() {
            let mine = e.aggregate_id == key.aggregate_id
                && e.aggregate_type == key.aggregate_type.as_str()
                && e.kind() == Some(kind)
                && e.sequence_number.is_some_and(|s| wanted.contains(&s));
            if !mine {
                continue;
            }
            let size = segment.raw_event(i).len();
            if !events.is_empty() && bytes + size > MAX_EVENT_BYTES_PER_READ {
                return Ok((events, e.sequence_number));
            }
            bytes += size;
            events.push(e.clone());
        }
    }
    Ok((events, None))
}

/// `GET /metrics`: the process's metrics, Prometheus text.
/// The pipeline's clocks and every running stage: the same JSON as `spiced status --json`.
#[utoipa::path(
    get,
    path = "/api/v1/status",
    tag = "reads",
    responses((status = 200, description = "Where the pipeline stands", body = crate::status::PipelineStatus), ApiErrors),
    security(("bearer" = ["read"]))
)]
pub async fn get_status(State(state): State<AppState>) -> Result<Json<crate::status::PipelineStatus>, ApiError> {
    Ok(Json(crate::status::read(&state.config, &state.db, &state.log).await?))
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    responses(
        (status = 200, description = "Prometheus text format", body = String, content_type = "text/plain"),
        super::schema::AuthErrors,
    ),
    security(("bearer" = ["admin"]))
)]
pub async fn metrics() -> impl IntoResponse {
    crate::telemetry::render().await
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, description = "Up", body = Health)))]
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Ready when both the log store and the database answer.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, description = "The log store and the database answer", body = Readiness),
        (status = 503, description = "The log store or the database does not answer", body = Readiness),
    )
)]
pub async fn readyz(State(state): State<AppState>) -> Response {
    let (log, db) = tokio::join!(
        crate::telemetry::answers("log", state.log.ping()),
        crate::telemetry::answers("database", state.index().ping())
    );
    // Anyone may ask: the answer says which dependency fails, never how (the log has that).
    let describe = |r: &Result<(), crate::telemetry::NotReady>| match r {
        Ok(()) => json!("ok"),
        Err(e) => {
            tracing::debug!(error = %e, "not ready");
            json!("unavailable")
        }
    };
    let ready = log.is_ok() && db.is_ok();
    let body = json!({
        "status": if ready { "ready" } else { "unavailable" },
        "log": describe(&log),
        "database": describe(&db),
    });
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}
