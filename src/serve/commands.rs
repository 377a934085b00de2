//! The command API: each route validates its input, builds the command envelope(s), appends
//! them through the group-commit writer and answers 202 only once they are durably in the log.

use super::error::ApiError;
use super::schema::{ApiErrors, BodyErrors, ClassPath, CommandBody, CommandErrors, CreateSeq, DbPath, ExpectedSeq, IdempotencyKey, InstancePath, Name};
use super::extract::{idempotency_key, json_body, path, query};
use super::auth::Caller;
use super::AppState;
use crate::domain::ids::validate_name;
use crate::domain::commands::{bulk_member_event_id, Routing};
use crate::domain::{AggregateKey, Command, CommandType};
use crate::log::plan::{AppendCommand, AppendOutcome, Appended, PendingEvent, FINGERPRINT_KEY};
use crate::log::writer::AppendError;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use utoipa::{IntoParams, ToSchema};
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

impl CommandQuery {
    fn branch(&self) -> Result<String, ApiError> {
        let branch = self.branch.clone().unwrap_or_else(|| "main".to_string());
        validate_name("branch", &branch)?;
        Ok(branch)
    }

    fn expected_for_update(&self) -> Result<u64, ApiError> {
        self.expected_seq.ok_or_else(|| {
            ApiError::bad_request(
                "missing_expected_seq",
                "updates and deletes require ?expected_seq=N (the aggregate's current version)",
            )
        })
    }

    fn expected_for_create(&self) -> Result<u64, ApiError> {
        match self.expected_seq {
            None | Some(0) => Ok(0),
            Some(n) => Err(ApiError::bad_request(
                "invalid_expected_seq",
                format!("a create implies expected_seq=0, got {n}"),
            )),
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDatabaseBody {
    #[schema(value_type = Name)]
    name: String,
    #[serde(default)]
    description: Option<String>,
}

/// A property of an ontology class.
#[derive(Debug, Deserialize, serde::Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PropertyDef {
    #[schema(pattern = "^[A-Za-z_][A-Za-z0-9_]{0,127}$")]
    name: String,
    /// `string`, `integer`, `number`, `boolean`, `datetime`, `json` or `ref:<ClassId>`.
    #[serde(rename = "type")]
    #[schema(pattern = "^(string|integer|number|boolean|datetime|json|ref:[A-Za-z0-9][A-Za-z0-9_.-]{0,127})$")]
    ty: String,
    #[serde(default)]
    required: bool,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateClassBody {
    #[schema(value_type = Name)]
    id: String,
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    properties: Vec<PropertyDef>,
    #[serde(default)]
    #[schema(value_type = Option<Name>)]
    parent_class: Option<String>,
    #[serde(default, rename = "abstract")]
    is_abstract: bool,
}

/// The fields of a class an update may change; absent fields are left as they are.
#[derive(Debug, Deserialize, serde::Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClassPatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    label: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    properties: Option<Vec<PropertyDef>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Name>)]
    parent_class: Option<String>,
    #[serde(default, rename = "abstract", skip_serializing_if = "Option::is_none")]
    is_abstract: Option<bool>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateClassBody {
    patch: ClassPatch,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateInstanceBody {
    /// The instance id; else `data.<class_id lowercased>_id`, else one derived from the command id.
    #[serde(default)]
    #[schema(value_type = Option<Name>)]
    id: Option<String>,
    data: Map<String, Value>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateInstanceBody {
    data: Map<String, Value>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkCreateBody {
    /// At most `serve.max_bulk_instances` (1000 by default).
    #[schema(min_items = 1)]
    instances: Vec<CreateInstanceBody>,
}

const SCALAR_TYPES: &[&str] = &["string", "integer", "number", "boolean", "datetime", "json"];

/// Property names are identifiers: they become JSON keys and filter fields.
fn validate_property_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= crate::domain::ids::MAX_NAME_LEN
        && name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "invalid_property",
            format!("property name {name:?} must match [A-Za-z_][A-Za-z0-9_]* (at most 128)"),
        ))
    }
}

/// Most properties one class may declare: each instance is checked against every property of
/// its class and ancestors, and a class is read whole on every instance command.
pub const MAX_PROPERTIES: usize = 1000;

fn validate_properties(props: &[PropertyDef]) -> Result<(), ApiError> {
    if props.len() > MAX_PROPERTIES {
        return Err(ApiError::bad_request(
            "invalid_property",
            format!("{} properties declared; a class may have at most {MAX_PROPERTIES}", props.len()),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for p in props {
        validate_property_name(&p.name)?;
        if !seen.insert(p.name.as_str()) {
            return Err(ApiError::bad_request(
                "invalid_property",
                format!("property {:?} is declared twice", p.name),
            ));
        }
        match p.ty.strip_prefix("ref:") {
            Some(target) => validate_name("properties.type", target)?,
            None if SCALAR_TYPES.contains(&p.ty.as_str()) => {}
            None => {
                return Err(ApiError::bad_request(
                    "invalid_property",
                    format!(
                        "property {:?} has unknown type {:?}; use one of {} or ref:<ClassId>",
                        p.name,
                        p.ty,
                        SCALAR_TYPES.join(", ")
                    ),
                ))
            }
        }
    }
    Ok(())
}

fn validate_data_keys(data: &Map<String, Value>) -> Result<(), ApiError> {
    data.keys().try_for_each(|k| validate_property_name(k))
}

/// One route's parsed command(s), ready to append.
struct Request {
    command_type: CommandType,
    commands: Vec<Command>,
}

impl Request {
    fn single(command: Command) -> Self {
        Request { command_type: command.command_type, commands: vec![command] }
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
    let q = query(q)?;
    let body: CreateDatabaseBody = json_body(&headers, body)?;
    validate_name("name", &body.name)?;
    let command = Command {
        command_type: CommandType::CreateDatabase,
        aggregate: AggregateKey::database(&body.name),
        expected_seq: q.expected_for_create()?,
        payload: json!({"db": body.name, "name": body.name, "description": body.description}),
    };
    submit(&state, &headers, caller, Request::single(command)).await
}

#[utoipa::path(
    delete,
    path = "/api/v1/databases/{db}",
    tag = "commands",
    params(DbPath, ExpectedSeq, IdempotencyKey),
    responses((status = 202, description = "Deleting the database is in the log", body = CommandBody), ApiErrors, CommandErrors),
    security(("bearer" = ["write"]))
)]
pub async fn delete_database(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    p: PathR<String>,
    q: QueryR<CommandQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let db = path(p)?;
    let q = query(q)?;
    validate_name("db", &db)?;
    let command = Command {
        command_type: CommandType::DeleteDatabase,
        aggregate: AggregateKey::database(&db),
        expected_seq: q.expected_for_update()?,
        payload: json!({"db": db}),
    };
    submit(&state, &headers, caller, Request::single(command)).await
}

#[utoipa::path(
    post,
    path = "/api/v1/databases/{db}/classes",
    tag = "commands",
    params(DbPath, CommandQuery, CreateSeq, IdempotencyKey),
    request_body = CreateClassBody,
    responses((status = 202, description = "Creating the class is in the log", body = CommandBody), ApiErrors, CommandErrors, BodyErrors),
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
    let q = query(q)?;
    let body: CreateClassBody = json_body(&headers, body)?;
    validate_name("db", &db)?;
    validate_name("id", &body.id)?;
    if let Some(parent) = &body.parent_class {
        validate_name("parent_class", parent)?;
    }
    validate_properties(&body.properties)?;
    let branch = q.branch()?;
    let command = Command {
        command_type: CommandType::CreateOntologyClass,
        aggregate: AggregateKey::class(&db, &branch, &body.id),
        expected_seq: q.expected_for_create()?,
        payload: json!({
            "db": db, "branch": branch, "class_id": body.id, "label": body.label,
            "description": body.description, "properties": body.properties,
            "parent_class": body.parent_class, "abstract": body.is_abstract,
        }),
    };
    submit(&state, &headers, caller, Request::single(command)).await
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
    let q = query(q)?;
    let body: UpdateClassBody = json_body(&headers, body)?;
    validate_name("db", &db)?;
    validate_name("class_id", &class_id)?;
    if let Some(props) = &body.patch.properties {
        validate_properties(props)?;
    }
    if let Some(parent) = &body.patch.parent_class {
        validate_name("parent_class", parent)?;
    }
    let patch = serde_json::to_value(&body.patch).expect("a patch serialises");
    if patch.as_object().is_some_and(Map::is_empty) {
        return Err(ApiError::invalid("patch must change at least one field"));
    }
    let branch = q.branch()?;
    let command = Command {
        command_type: CommandType::UpdateOntologyClass,
        aggregate: AggregateKey::class(&db, &branch, &class_id),
        expected_seq: q.expected_for_update()?,
        payload: json!({"db": db, "branch": branch, "class_id": class_id, "patch": patch}),
    };
    submit(&state, &headers, caller, Request::single(command)).await
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
    let q = query(q)?;
    validate_name("db", &db)?;
    validate_name("class_id", &class_id)?;
    let branch = q.branch()?;
    let command = Command {
        command_type: CommandType::DeleteOntologyClass,
        aggregate: AggregateKey::class(&db, &branch, &class_id),
        expected_seq: q.expected_for_update()?,
        payload: json!({"db": db, "branch": branch, "class_id": class_id}),
    };
    submit(&state, &headers, caller, Request::single(command)).await
}

/// The instance id: the body's `id`, else `data.<class_id lowercased>_id` when it is a string,
/// else a UUID derived from the command id (so a repeat with the same Idempotency-Key names the
/// same instance).
fn instance_id(class_id: &str, body: &CreateInstanceBody, command_id: Uuid, index: usize) -> Result<String, ApiError> {
    let from_data = body
        .data
        .get(&format!("{}_id", class_id.to_ascii_lowercase()))
        .and_then(Value::as_str);
    let id = match (&body.id, from_data) {
        (Some(id), _) => id.clone(),
        (None, Some(id)) => id.to_string(),
        (None, None) => Uuid::new_v5(&command_id, format!("instance:{index}").as_bytes()).to_string(),
    };
    validate_name("id", &id)?;
    Ok(id)
}

fn create_instance_command(
    db: &str,
    branch: &str,
    class_id: &str,
    body: &CreateInstanceBody,
    command_id: Uuid,
    index: usize,
    command_type: CommandType,
) -> Result<Command, ApiError> {
    validate_data_keys(&body.data)?;
    let instance_id = instance_id(class_id, body, command_id, index)?;
    Ok(Command {
        command_type,
        aggregate: AggregateKey::instance(db, branch, class_id, &instance_id),
        expected_seq: 0,
        payload: json!({
            "db": db, "branch": branch, "class_id": class_id,
            "instance_id": instance_id, "data": body.data,
        }),
    })
}

#[utoipa::path(
    post,
    path = "/api/v1/databases/{db}/classes/{class_id}/instances",
    tag = "commands",
    params(ClassPath, CommandQuery, CreateSeq, IdempotencyKey),
    request_body = CreateInstanceBody,
    responses((status = 202, description = "Creating the instance is in the log", body = CommandBody), ApiErrors, CommandErrors, BodyErrors),
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
    let q = query(q)?;
    let body: CreateInstanceBody = json_body(&headers, body)?;
    validate_name("db", &db)?;
    validate_name("class_id", &class_id)?;
    let branch = q.branch()?;
    q.expected_for_create()?;
    let command_id = CommandId::from_headers(&headers)?;
    let command = create_instance_command(
        &db, &branch, &class_id, &body, command_id.id, 0, CommandType::CreateInstance,
    )?;
    submit_with_id(&state, command_id, caller, Request::single(command)).await
}

#[utoipa::path(
    put,
    path = "/api/v1/databases/{db}/classes/{class_id}/instances/{instance_id}",
    tag = "commands",
    params(InstancePath, CommandQuery, ExpectedSeq, IdempotencyKey),
    request_body = UpdateInstanceBody,
    responses((status = 202, description = "Updating the instance is in the log", body = CommandBody), ApiErrors, CommandErrors, BodyErrors),
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
    let q = query(q)?;
    let body: UpdateInstanceBody = json_body(&headers, body)?;
    for (field, value) in [("db", &db), ("class_id", &class_id), ("instance_id", &instance_id)] {
        validate_name(field, value)?;
    }
    validate_data_keys(&body.data)?;
    let branch = q.branch()?;
    let command = Command {
        command_type: CommandType::UpdateInstance,
        aggregate: AggregateKey::instance(&db, &branch, &class_id, &instance_id),
        expected_seq: q.expected_for_update()?,
        payload: json!({
            "db": db, "branch": branch, "class_id": class_id,
            "instance_id": instance_id, "data": body.data,
        }),
    };
    submit(&state, &headers, caller, Request::single(command)).await
}

#[utoipa::path(
    delete,
    path = "/api/v1/databases/{db}/classes/{class_id}/instances/{instance_id}",
    tag = "commands",
    params(InstancePath, CommandQuery, ExpectedSeq, IdempotencyKey),
    responses((status = 202, description = "Deleting the instance is in the log", body = CommandBody), ApiErrors, CommandErrors),
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
    let q = query(q)?;
    for (field, value) in [("db", &db), ("class_id", &class_id), ("instance_id", &instance_id)] {
        validate_name(field, value)?;
    }
    let branch = q.branch()?;
    let command = Command {
        command_type: CommandType::DeleteInstance,
        aggregate: AggregateKey::instance(&db, &branch, &class_id, &instance_id),
        expected_seq: q.expected_for_update()?,
        payload: json!({
            "db": db, "branch": branch, "class_id": class_id, "instance_id": instance_id,
        }),
    };
    submit(&state, &headers, caller, Request::single(command)).await
}

#[utoipa::path(
    post,
    path = "/api/v1/databases/{db}/classes/{class_id}/instances/bulk",
    tag = "commands",
    params(ClassPath, CommandQuery, CreateSeq, IdempotencyKey),
    request_body = BulkCreateBody,
    responses((status = 202, description = "Creating the instances is in the log, as one command", body = CommandBody), ApiErrors, CommandErrors, BodyErrors),
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
    let (db, class_id) = path(p)?;
    let q = query(q)?;
    let body: BulkCreateBody = json_body(&headers, body)?;
    validate_name("db", &db)?;
    validate_name("class_id", &class_id)?;
    let branch = q.branch()?;
    q.expected_for_create()?;
    let max = state.config.serve.max_bulk_instances;
    if body.instances.is_empty() || body.instances.len() > max {
        return Err(ApiError::bad_request(
            "invalid_bulk_size",
            format!("instances must hold 1 to {max} items, got {}", body.instances.len()),
        ));
    }
    let command_id = CommandId::from_headers(&headers)?;
    let commands = body
        .instances
        .iter()
        .enumerate()
        .map(|(i, inst)| {
            create_instance_command(
                &db, &branch, &class_id, inst, command_id.id, i, CommandType::BulkCreateInstances,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let request = Request { command_type: CommandType::BulkCreateInstances, commands };
    submit_with_id(&state, command_id, caller, request).await
}

async fn submit(state: &AppState, headers: &HeaderMap, caller: Caller, request: Request) -> Result<Response, ApiError> {
    let command_id = CommandId::from_headers(headers)?;
    submit_with_id(state, command_id, caller, request).await
}

/// The command id: the client's `Idempotency-Key`, or a fresh random one.
#[derive(Clone, Copy)]
struct CommandId {
    id: Uuid,
    from_client: bool,
}

impl CommandId {
    fn from_headers(headers: &HeaderMap) -> Result<CommandId, ApiError> {
        Ok(match idempotency_key(headers)? {
            Some(id) => CommandId { id, from_client: true },
            None => CommandId { id: Uuid::new_v4(), from_client: false },
        })
    }
}

/// Appends the request's envelopes as one command and maps the outcome to the response.
async fn submit_with_id(
    state: &AppState,
    command_id: CommandId,
    caller: Caller,
    request: Request,
) -> Result<Response, ApiError> {
    let CommandId { id: command_id, from_client } = command_id;
    let fingerprint = fingerprint(&request);
    let routing = Routing {
        kafka_topic: state.topic_for(request.command_type).to_string(),
        service: state.config.serve.service_name.clone(),
    };
    let bulk = request.command_type == CommandType::BulkCreateInstances;
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
        AppendOutcome::Conflict { key, expected, actual } => Err(ApiError::new(
            StatusCode::CONFLICT,
            "optimistic_concurrency_conflict",
            format!("{key} is at sequence {actual}, not {expected}"),
        )
        .with("aggregate_id", json!(key.aggregate_id))
        .with("expected_seq", json!(expected))
        .with("actual_seq", json!(actual))),
        AppendOutcome::KeyReused { command_id } => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            format!("Idempotency-Key {command_id} was already used for a different request"),
        )),
    }
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
