//! Dead letters over HTTP: the commands a worker role gave up on after its last attempt (its
//! registry rows in status `failed`), each with its envelope from the log, and their re-drive
//! (`admin` scope). `spiced dlq` reads the same from the Kafka dead-letter topics.

use super::error::ApiError;
use super::extract::{path, query};
use super::schema::{ApiErrors, LogErrors, NotFound};
use super::AppState;
use crate::bus::redrive::{RedriveError, Redriven, Via};
use crate::db::registry::Failed;
use crate::domain::Role;
use crate::envelope::EventEnvelope;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

const MAX_LIMIT: usize = 1000;
const DEFAULT_LIMIT: usize = 100;

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterQuery {
    /// Rows per page, 1 to 1000; 100 when absent.
    limit: Option<usize>,
    /// The `next_after` of the previous page.
    after: Option<Uuid>,
}

/// One dead letter.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetter {
    pub event_id: Uuid,
    pub aggregate_id: String,
    pub sequence_number: u64,
    pub attempt_count: u32,
    /// Why its last attempt failed.
    pub error: Option<String>,
    pub failed_at: Option<DateTime<Utc>>,
}

impl From<Failed> for DeadLetter {
    fn from(f: Failed) -> Self {
        DeadLetter {
            event_id: f.event_id,
            aggregate_id: f.aggregate_id,
            sequence_number: f.seq,
            attempt_count: f.attempt_count,
            error: f.last_error,
            failed_at: f.failed_at,
        }
    }
}

/// A page of a role's dead letters, by event id.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetterPage {
    pub items: Vec<DeadLetter>,
    /// Pass as `after` for the next page; null on the last page.
    pub next_after: Option<Uuid>,
}

/// One dead letter with its envelope from the log.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetterShown {
    #[serde(flatten)]
    pub letter: DeadLetter,
    pub position: u64,
    pub envelope: EventEnvelope,
}

fn role(raw: &str) -> Result<Role, ApiError> {
    raw.parse().map_err(|e: crate::domain::role::UnknownRole| ApiError::bad_request("invalid_path", e.to_string()))
}

/// A role's dead letters.
#[utoipa::path(
    get,
    path = "/api/v1/dead-letters/{role}",
    tag = "reads",
    params(("role" = String, Path, description = "`ontology` or `instance`"), DeadLetterQuery),
    responses((status = 200, description = "The role's dead letters", body = DeadLetterPage), ApiErrors),
    security(("bearer" = ["read"]))
)]
pub async fn list_dead_letters(
    State(state): State<AppState>,
    p: Result<Path<String>, PathRejection>,
    q: Result<Query<DeadLetterQuery>, QueryRejection>,
) -> Result<Json<DeadLetterPage>, ApiError> {
    let role = role(&path(p)?)?;
    let q = query(q)?;
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request("invalid_query", format!("limit must be 1 to {MAX_LIMIT}")));
    }
    // One more than the page tells whether there is a next one.
    let mut rows = state.db.registry.failed(role.handler(), q.after, limit + 1).await?;
    let next_after = (rows.len() > limit).then(|| rows[limit - 1].event_id);
    rows.truncate(limit);
    Ok(Json(DeadLetterPage { items: rows.into_iter().map(DeadLetter::from).collect(), next_after }))
}

/// One dead letter, with its envelope.
#[utoipa::path(
    get,
    path = "/api/v1/dead-letters/{role}/{event_id}",
    tag = "reads",
    params(("role" = String, Path, description = "`ontology` or `instance`"), ("event_id" = Uuid, Path, description = "The command's event id")),
    responses((status = 200, description = "The dead letter", body = DeadLetterShown), ApiErrors, NotFound, LogErrors),
    security(("bearer" = ["read"]))
)]
pub async fn get_dead_letter(
    State(state): State<AppState>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<DeadLetterShown>, ApiError> {
    let (role, event_id) = ids(p)?;
    let letter = find(&state, role, event_id).await?;
    let (position, segment, index) = crate::bus::redrive::locate(&state.db, &state.log, event_id).await.map_err(api_error)?;
    let envelope = segment.events.into_iter().nth(index).expect("locate found the event at this index");
    Ok(Json(DeadLetterShown { letter, position, envelope }))
}

/// Makes a dead letter run again: its registry row becomes claimable and its envelope is
/// published to its topic once more (under `spiced dev`, handed to the embedded workers).
#[utoipa::path(
    post,
    path = "/api/v1/dead-letters/{role}/{event_id}/redrive",
    tag = "commands",
    params(("role" = String, Path, description = "`ontology` or `instance`"), ("event_id" = Uuid, Path, description = "The command's event id")),
    responses((status = 200, description = "Re-driven", body = Redriven), ApiErrors, NotFound, LogErrors),
    security(("bearer" = ["admin"]))
)]
pub async fn redrive_dead_letter(
    State(state): State<AppState>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<Redriven>, ApiError> {
    let (role, event_id) = ids(p)?;
    let via = match &state.embedded_redrive {
        Some(queue) => Via::Embedded(queue),
        None => Via::Kafka(&state.config.kafka),
    };
    crate::bus::redrive::redrive(&state.db, &state.log, role, event_id, via).await.map(Json).map_err(api_error)
}

fn api_error(e: RedriveError) -> ApiError {
    match e {
        RedriveError::NotFound(m) => ApiError::not_found(m),
        RedriveError::Inconsistent(m) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", m),
        RedriveError::Db(e) => e.into(),
        RedriveError::Log(e) => e.into(),
        RedriveError::Unavailable(m) => ApiError::unavailable(&m),
    }
}

fn ids(p: Result<Path<(String, String)>, PathRejection>) -> Result<(Role, Uuid), ApiError> {
    let (raw_role, raw_id) = path(p)?;
    let id = Uuid::parse_str(&raw_id).map_err(|_| ApiError::bad_request("invalid_path", format!("{raw_id:?} is not a UUID")))?;
    Ok((role(&raw_role)?, id))
}

/// The role's registry row of `event_id`, if it is a dead letter.
async fn find(state: &AppState, role: Role, event_id: Uuid) -> Result<DeadLetter, ApiError> {
    // The keyset just before the id: the page of one that starts at it.
    let before = Uuid::from_u128(event_id.as_u128().saturating_sub(1));
    let found = state.db.registry.failed(role.handler(), Some(before), 1).await?;
    match found.into_iter().next() {
        Some(f) if f.event_id == event_id => Ok(f.into()),
        _ => Err(ApiError::not_found(format!("no dead letter {event_id} for {}", role.handler()))),
    }
}
