//! The command API: each route extracts its path, query and body, and hands them to its
//! command's file in `domain::commands`, which validates them and builds the command(s); one
//! `submit` appends them through the group-commit writer and answers 202 only once they are
//! durably in the log.

use super::auth::Caller;
use super::error::ApiError;
use super::extract::{idempotency_key, json_body, path, query};
use super::schema::{
    ApiErrors, BodyErrors, ClassPath, CommandBody, CommandErrors, CreateSeq, DbPath, ExpectedSeq, IdempotencyKey, InstancePath, Name,
    NeverCreated,
};
use super::AppState;
use crate::domain::commands::{
    bulk_create_instances, bulk_delete_instances, bulk_update_instances, create_class, create_database,
    create_instance, delete_class, delete_database, delete_instance, update_class, update_instance, BulkCreateBody,
    BulkDeleteBody, BulkUpdateBody, CreateClassBody, CreateDatabaseBody, CreateInstanceBody, UpdateClassBody,
    UpdateInstanceBody,
};
use crate::domain::commands::{bulk_member_event_id, Context, Invalid, Request, Routing};
use crate::log::plan::{AppendCommand, AppendOutcome, Appended, PendingEvent, SeqConflict, FINGERPRINT_KEY};
use crate::log::writer::AppendError;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use utoipa::IntoParams;
use uuid::Uuid;

type PathR<T> = Result<Path<T>, PathRejection>;
type QueryR<T> = Result<Query<T>, QueryRejection>;
type BodyR = Result<Bytes, BytesRejection>;

/// Query parameters of command routes.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct CommandQuery {
    /// Branch of the database; `main` when absent. Not on database routes, which ignore it.
    #[param(value_type = Option<Name>)]
    branch: Option<String>,
    /// The aggregate version the client saw; required on updates and deletes. Documented per
    /// route by `CreateSeq` and `ExpectedSeq`.
    #[param(ignore)]
    #[serde(default, deserialize_with = "super::extract::seq")]
    expected_seq: Option<u64>,
}

/// Query parameters of `DELETE /databases/{db}`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeleteDatabaseQuery {
    /// Ignored, as on every database route.
    #[param(ignore)]
    branch: Option<String>,
    #[param(ignore)]
    #[serde(default, deserialize_with = "super::extract::seq")]
    expected_seq: Option<u64>,
    /// Delete the database with every class and instance in it, in one command (default
    /// `false`: a database with live classes fails `database_not_empty`).
    #[serde(default)]
    cascade: bool,
}

/// What every command route takes besides its path and body: the query and the command id
/// (the client's `Idempotency-Key`, or a fresh random one).
struct Call {
    ctx: Context,
    from_client: bool,
}

impl Call {
    fn new(q: QueryR<CommandQuery>, headers: &HeaderMap) -> Result<Call, ApiError> {
        let CommandQuery { branch, expected_seq } = query(q)?;
        Call::with(branch, expected_seq, headers)
    }

    fn with(branch: Option<String>, expected_seq: Option<u64>, headers: &HeaderMap) -> Result<Call, ApiError> {
        let (command_id, from_client) = match idempotency_key(headers)? {
            Some(id) => (id, true),
            None => (Uuid::new_v4(), false),
        };
        Ok(Call { ctx: Context { branch, expected_seq, command_id }, from_client })
    }
}

#[utoipa::path(
    post,
    path = "/api/v1/databases",
    tag = "commands",
    params(CreateSeq, IdempotencyKey),
    request_body = CreateDatabaseBody,
    responses((status = 202, description = "Creating the database is in the log", body = CommandBody), ApiErrors, CommandErrors, BodyErrors),
    security(("bearer" = ["write"]))
)]
pub async fn create_database(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    q: QueryR<CommandQuery>,
    headers: HeaderMap,
    body: BodyR,
) -> Result<Response, ApiError> {
    let call = Call::new(q, &headers)?;
    let body: CreateDatabaseBody = json_body(&headers, body)?;
    submit(&state, &call, caller, create_database::request(&call.ctx, body)?).await
}

#[utoipa::path(
    delete,
    path = "/api/v1/databases/{db}",
    tag = "commands",
    params(DbPath, ExpectedSeq, DeleteDatabaseQuery, IdempotencyKey),
    responses((status = 202, description = "Deleting the database is in the log", body = CommandBody), ApiErrors, CommandErrors),
    security(("bearer" = ["write"]))
)]
pub async fn delete_database(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    p: PathR<String>,
    q: QueryR<DeleteDatabaseQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let db = path(p)?;
    let DeleteDatabaseQuery { branch, expected_seq, cascade } = query(q)?;
    let call = Call::with(branch, expected_seq, &headers)?;
    submit(&state, &call, caller, delete_database::request(&call.ctx, &db, cascade)?).await
}

#[utoipa::path(
    post,
    path = "/api/v1/databases/{db}/classes",
    tag = "commands",
    params(DbPath, CommandQuery, CreateSeq, IdempotencyKey),
    request_body = CreateClassBody,
    responses((status = 202, description = "Creating the class is in the log", body = CommandBody), ApiErrors, CommandErrors, NeverCreated, BodyErrors),
    security(("bearer" = ["write"]))
)]
pub async fn create_class(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    p: PathR<String>,
    q: QueryR<CommandQuery>,
    headers: HeaderMap,
    body: BodyR,
) -> Result<Response, ApiError> {
    let db = path(p)?;
    let call = Call::new(q, &headers)?;
    let body: CreateClassBody = json_body(&headers, body)?;
    submit(&state, &call, caller, create_class::request(&call.ctx, &db, body)?).await
}

#[utoipa::path(
    put,
    path = "/api/v1/databases/{db}/classes/{class_id}",
    tag = "commands",
    params(ClassPath, CommandQuery, ExpectedSeq, IdempotencyKey),
    request_body = UpdateClassBody,
    responses((status = 202, description = "Updating the class is in the log", body = CommandBody), ApiErrors, CommandErrors, BodyErrors),
    security(("bearer" = ["write"]))
)]
pub async fn update_class(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    p: PathR<(String, String)>,
    q: QueryR<CommandQuery>,
    headers: HeaderMap,
    body: BodyR,
) -> Result<Response, ApiError> {
    let (db, class_id) = path(p)?;
    let call = Call::new(q, &headers)?;
    let body: UpdateClassBody = json_body(&headers, body)?;
    submit(&state, &call, caller, update_class::request(&call.ctx, &db, &class_id, body)?).await
}

#[utoipa::path(
    delete,
    path = "/api/v1/databases/{db}/classes/{class_id}",
    tag = "commands",
    params(ClassPath, CommandQuery, ExpectedSeq, IdempotencyKey),
    responses((status = 202, description = "Deleting the class is in the log", body = CommandBody), ApiErrors, CommandErrors),
    security(("bearer" = ["write"]))
)]
pub async fn delete_class(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    p: PathR<(String, String)>,
    q: QueryR<CommandQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (db, class_id) = path(p)?;
    let call = Call::new(q, &headers)?;
    submit(&state, &call, caller, delete_class::request(&call.ctx, &db, &class_id)?).await
}

#[utoipa::path(
    post,
    path = "/api/v1/databases/{db}/classes/{class_id}/instances",
    tag = "commands",
    params(ClassPath, CommandQuery, CreateSeq, IdempotencyKey),
    request_body = CreateInstanceBody,
    responses((status = 202, description = "Creating the instance is in the log", body = CommandBody), ApiErrors, CommandErrors, NeverCreated, BodyErrors),
    security(("bearer" = ["write"]))
)]
pub async fn create_instance(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    p: PathR<(String, String)>,
    q: QueryR<CommandQuery>,
    headers: HeaderMap,
    body: BodyR,
) -> Result<Response, ApiError> {
    let (db, class_id) = path(p)?;
    let call = Call::new(q, &headers)?;
    let body: CreateInstanceBody = json_body(&headers, body)?;
    submit(&state, &call, caller, create_instance::request(&call.ctx, &db, &class_id, body)?).await
}

#[utoipa::path(
    put,
    path = "/api/v1/databases/{db}/classes/{class_id}/instances/{instance_id}",
    tag = "commands",
    params(InstancePath, CommandQuery, ExpectedSeq, IdempotencyKey),
    request_body = UpdateInstanceBody,
    responses((status = 202, description = "Updating the instance is in the log", body = CommandBody), ApiErrors, CommandErrors, NeverCreated, BodyErrors),
    security(("bearer" = ["write"]))
)]
pub async fn update_instance(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    p: PathR<(String, String, String)>,
    q: QueryR<CommandQuery>,
    headers: HeaderMap,
    body: BodyR,
) -> Result<Response, ApiError> {
    let (db, class_id, instance_id) = path(p)?;
    let call = Call::new(q, &headers)?;
    let body: UpdateInstanceBody = json_body(&headers, body)?;
    let request = update_instance::request(&call.ctx, &db, &class_id, &instance_id, body)?;
    submit(&state, &call, caller, request).await
}

#[utoipa::path(
    delete,
    path = "/api/v1/databases/{db}/classes/{class_id}/instances/{instance_id}",
    tag = "commands",
    params(InstancePath, CommandQuery, ExpectedSeq, IdempotencyKey),
    responses((status = 202, description = "Deleting the instance is in the log", body = CommandBody), ApiErrors, CommandErrors, NeverCreated),
    security(("bearer" = ["write"]))
)]
pub async fn delete_instance(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    p: PathR<(String, String, String)>,
    q: QueryR<CommandQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (db, class_id, instance_id) = path(p)?;
    let call = Call::new(q, &headers)?;
    submit(&state, &call, caller, delete_instance::request(&call.ctx, &db, &class_id, &instance_id)?).await
}

#[utoipa::path(
    post,
    path = "/api/v1/databases/{db}/classes/{class_id}/instances/bulk",
    tag = "commands",
    params(ClassPath, CommandQuery, CreateSeq, IdempotencyKey),
    request_body = BulkCreateBody,
    responses((status = 202, description = "Creating the instances is in the log, as one command", body = CommandBody), ApiErrors, CommandErrors, NeverCreated, BodyErrors),
    security(("bearer" = ["write"]))
)]
pub async fn bulk_create_instances(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    p: PathR<(String, String)>,
    q: QueryR<CommandQuery>,
    headers: HeaderMap,
    body: BodyR,
) -> Result<Response, ApiError> {
    bulk::<BulkCreateBody>(state, caller, (p, q, headers, body), bulk_create_instances::request).await
}

#[utoipa::path(
    post,
    path = "/api/v1/databases/{db}/classes/{class_id}/instances/bulk-update",
    tag = "commands",
    params(ClassPath, CommandQuery, IdempotencyKey),
    request_body = BulkUpdateBody,
    responses((status = 202, description = "Updating the instances is in the log, as one command", body = CommandBody), ApiErrors, CommandErrors, NeverCreated, BodyErrors),
    security(("bearer" = ["write"]))
)]
pub async fn bulk_update_instances(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    p: PathR<(String, String)>,
    q: QueryR<CommandQuery>,
    headers: HeaderMap,
    body: BodyR,
) -> Result<Response, ApiError> {
    bulk::<BulkUpdateBody>(state, caller, (p, q, headers, body), bulk_update_instances::request).await
}

#[utoipa::path(
    post,
    path = "/api/v1/databases/{db}/classes/{class_id}/instances/bulk-delete",
    tag = "commands",
    params(ClassPath, CommandQuery, IdempotencyKey),
    request_body = BulkDeleteBody,
    responses((status = 202, description = "Deleting the instances is in the log, as one command", body = CommandBody), ApiErrors, CommandErrors, NeverCreated, BodyErrors),
    security(("bearer" = ["write"]))
)]
pub async fn bulk_delete_instances(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    p: PathR<(String, String)>,
    q: QueryR<CommandQuery>,
    headers: HeaderMap,
    body: BodyR,
) -> Result<Response, ApiError> {
    bulk::<BulkDeleteBody>(state, caller, (p, q, headers, body), bulk_delete_instances::request).await
}

/// What a bulk route's file builds its command from: the class path, the body's members and
/// `serve.max_bulk_instances`.
type BulkRequest<B> = fn(&Context, &str, &str, B, usize) -> Result<Request, Invalid>;

/// The three bulk routes: a class path, a JSON body of members, one command.
async fn bulk<B: DeserializeOwned>(
    state: AppState,
    caller: Caller,
    (p, q, headers, body): (PathR<(String, String)>, QueryR<CommandQuery>, HeaderMap, BodyR),
    build: BulkRequest<B>,
) -> Result<Response, ApiError> {
    let (db, class_id) = path(p)?;
    let call = Call::new(q, &headers)?;
    let body: B = json_body(&headers, body)?;
    let max = state.config.serve.max_bulk_instances;
    submit(&state, &call, caller, build(&call.ctx, &db, &class_id, body, max)?).await
}

/// Appends the request's envelopes as one command and maps the outcome to the response.
async fn submit(state: &AppState, call: &Call, caller: Caller, request: Request) -> Result<Response, ApiError> {
    never_created(state, &request).await?;
    let (command_id, from_client) = (call.ctx.command_id, call.from_client);
    let fingerprint = fingerprint(&request);
    let routing = Routing {
        kafka_topic: state.topic_for(request.command_type).to_string(),
        service: state.config.serve.service_name.clone(),
    };
    let bulk = request.command_type.is_bulk();
    let now = chrono::Utc::now();
    let events = request
        .commands
        .iter()
        .map(|command| {
            let event_id = if bulk {
                bulk_member_event_id(command_id, &command.aggregate.aggregate_id)
            } else {
                command_id
            };
            let mut envelope = command.to_envelope(event_id, command_id, caller.0.clone(), now, &routing);
            envelope.metadata.insert(FINGERPRINT_KEY.into(), json!(fingerprint));
            // A database's own commands and its classes' share one Kafka key: one partition
            // and one worker lane, in log order, so a class command never waits on a database
            // command queued behind it.
            if command.aggregate.aggregate_type != crate::domain::AggregateType::Instance {
                if let Some(db) = command.payload.get("db").and_then(Value::as_str) {
                    envelope.metadata.insert("ordering_key".into(), json!(db));
                }
            }
            PendingEvent { key: command.aggregate.clone(), expected_seq: command.expected_seq, envelope }
        })
        .collect();
    let append = AppendCommand { command_id, id_from_client: from_client, fingerprint, events };
    let span = tracing::info_span!("command", %command_id, command_type = request.command_type.as_str());
    let outcome = tracing::Instrument::instrument(state.writer.append(append), span.clone()).await.map_err(|e| match e {
        AppendError::Overloaded => {
            ApiError::unavailable(&"log writer queue full (writer.queue_depth)")
        }
        other => ApiError::unavailable(&other),
    })?;
    match outcome {
        AppendOutcome::Accepted { events, position, duplicate } => {
            span.in_scope(|| {
                for e in &events {
                    tracing::debug!(position, aggregate_id = %e.key.aggregate_id, sequence_number = e.seq, duplicate, "command in the log");
                }
            });
            let body = accepted_body(command_id, bulk, &events);
            Ok((StatusCode::ACCEPTED, Json(body)).into_response())
        }
        AppendOutcome::Conflict(conflicts) => Err(conflict(&conflicts)),
        AppendOutcome::KeyReused { command_id } => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            format!("Idempotency-Key {command_id} was already used for a different request"),
        )),
    }
}

/// 404 when the database or class the command needs was never named by any command: it would
/// only fail in the worker (`CommandType::required`).
async fn never_created(state: &AppState, request: &Request) -> Result<(), ApiError> {
    let Some(first) = request.commands.first() else {
        return Ok(());
    };
    let Some((key, code)) = request.command_type.required(&first.payload) else {
        return Ok(());
    };
    let id = key.to_string();
    if state.named.contains(&id) {
        return Ok(());
    }
    if state.index().version(&key).await? > 0 {
        state.named.insert(&id);
        return Ok(());
    }
    let what = match key.aggregate_type {
        crate::domain::AggregateType::Database => "database",
        _ => "class",
    };
    let name = key.aggregate_id.rsplit(':').next().unwrap_or_default();
    Err(ApiError::new(StatusCode::NOT_FOUND, code, format!("{what} {name:?} was never created")))
}

/// 409: the first conflicting aggregate at the top level (what a single command has), and
/// every one in `conflicts` (a bulk command names each member that does not match).
fn conflict(conflicts: &[SeqConflict]) -> ApiError {
    let first = &conflicts[0];
    let message = match conflicts.len() {
        1 => format!("{} is at sequence {}, not {}", first.key, first.actual, first.expected),
        n => format!("{n} aggregates are not at the sequence expected, first {} at {}, not {}", first.key, first.actual, first.expected),
    };
    let all: Vec<Value> = conflicts
        .iter()
        .map(|c| json!({"aggregate_id": c.key.aggregate_id, "expected_seq": c.expected, "actual_seq": c.actual}))
        .collect();
    ApiError::new(StatusCode::CONFLICT, "optimistic_concurrency_conflict", message)
        .with("aggregate_id", json!(first.key.aggregate_id))
        .with("expected_seq", json!(first.expected))
        .with("actual_seq", json!(first.actual))
        .with("conflicts", Value::Array(all))
}

/// What a command asks for, independent of when it was sent: equal requests have equal
/// fingerprints, so a repeat can be told from a reuse of the key.
fn fingerprint(request: &Request) -> String {
    let parts: Vec<Value> = request
        .commands
        .iter()
        .map(|c| json!([c.aggregate.aggregate_type.as_str(), c.aggregate.aggregate_id, c.expected_seq, c.payload]))
        .collect();
    // serde_json's map is ordered by key, so this text is canonical.
    let text = json!([request.command_type.as_str(), parts]).to_string();
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// The 202 body; also what `GET /commands/{id}` and idempotent repeats return.
pub fn accepted_body(command_id: Uuid, bulk: bool, events: &[Appended]) -> Value {
    if bulk {
        let mut events: Vec<&Appended> = events.iter().collect();
        // Sorted, so a repeat (rebuilt from the index) answers exactly like the original.
        events.sort_by(|a, b| a.key.cmp(&b.key));
        let instances: Vec<Value> = events
            .iter()
            .map(|e| {
                json!({
                    "instance_id": e.key.aggregate_id.rsplit(':').next(),
                    "aggregate_id": e.key.aggregate_id,
                    "sequence_number": e.seq,
                })
            })
            .collect();
        return json!({
            "command_id": command_id, "status": "PENDING", "aggregate_type": "Instance",
            "aggregate_id": null, "sequence_number": null, "instances": instances,
        });
    }
    let e = &events[0];
    json!({
        "command_id": command_id, "status": "PENDING",
        "aggregate_type": e.key.aggregate_type.as_str(),
        "aggregate_id": e.key.aggregate_id, "sequence_number": e.seq,
    })
}
