//! The shapes of the API's bodies and parameters that exist only as JSON built in the handlers
//! (errors, command answers, pages, health) and the path parameters, for the OpenAPI document.
//! The handlers' annotations name them; this module names nothing back.

/// Where the OpenAPI document is served; public, like the health checks (see `auth::required`).
pub const OPENAPI_PATH: &str = "/api/v1/openapi.json";

use serde_json::Value;
use utoipa::{IntoParams, IntoResponses, ToSchema};
use uuid::Uuid;

/// The JSON body of every error response (`ApiError`).
#[derive(ToSchema)]
pub struct ErrorBody {
    /// A stable code, e.g. `invalid_request`, `invalid_id`, `invalid_query`, `invalid_path`,
    /// `malformed_json`, `invalid_body`, `missing_expected_seq`, `not_found`, `unauthorized`,
    /// `forbidden`, `optimistic_concurrency_conflict`, `idempotency_key_reused`,
    /// `payload_too_large`, `unsupported_media_type`, `unavailable`, `internal`.
    pub error: String,
    /// What went wrong, for people.
    pub message: String,
    /// `invalid_id`: the field holding the bad name or id; `invalid_body` for a U+0000: the
    /// JSON path of the string or key holding it, e.g. `instances[3].data.name`.
    pub field: Option<String>,
    /// `optimistic_concurrency_conflict`: the aggregate ...
    pub aggregate_id: Option<String>,
    /// ... the version the request expected ...
    pub expected_seq: Option<u64>,
    /// ... and the version it is at (the first one, for a bulk command).
    pub actual_seq: Option<u64>,
    /// `optimistic_concurrency_conflict`: every aggregate not at the version expected (a bulk
    /// command's members each name their own).
    pub conflicts: Option<Vec<SeqConflictBody>>,
}

/// One aggregate of a 409 that is not at the version its command expected.
#[derive(ToSchema)]
pub struct SeqConflictBody {
    pub aggregate_id: String,
    pub expected_seq: u64,
    pub actual_seq: u64,
}

/// Errors of every route behind the bearer token.
#[derive(IntoResponses)]
pub enum ApiErrors {
    /// A path, query, header or body value is invalid.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// No valid bearer token.
    #[response(status = 401, headers(("WWW-Authenticate" = String, description = "`Bearer`")))]
    Unauthorized(ErrorBody),
    /// The token's scope does not allow the route.
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// The log store or the database failed; retry later.
    #[response(status = 503, headers(("Retry-After" = u64, description = "Seconds to wait")))]
    Unavailable(ErrorBody),
}

/// Errors of `/metrics`, which only checks the token.
#[derive(IntoResponses)]
pub enum AuthErrors {
    /// No valid bearer token.
    #[response(status = 401, headers(("WWW-Authenticate" = String, description = "`Bearer`")))]
    Unauthorized(ErrorBody),
    /// The token's scope is not `admin`.
    #[response(status = 403)]
    Forbidden(ErrorBody),
}

/// Errors of a command on top of [`ApiErrors`].
#[derive(IntoResponses)]
pub enum CommandErrors {
    /// `expected_seq` is not the aggregate's current version (a create: it exists already).
    #[response(status = 409)]
    Conflict(ErrorBody),
    /// The `Idempotency-Key` was used before for a different request.
    #[response(status = 422)]
    KeyReused(ErrorBody),
}

/// A command whose database (class commands) or class (instance commands) no command ever
/// named: refused before appending.
#[derive(IntoResponses)]
pub enum NeverCreated {
    /// `database_not_found` or `class_not_found`.
    #[response(status = 404)]
    NotFound(ErrorBody),
}

/// Errors of a command with a JSON body on top of [`CommandErrors`].
#[derive(IntoResponses)]
pub enum BodyErrors {
    /// The body is larger than `serve.max_body_bytes`.
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// The body is not declared as JSON.
    #[response(status = 415)]
    NotJson(ErrorBody),
}

/// A single read's row does not exist (or is not projected yet).
#[derive(IntoResponses)]
pub enum NotFound {
    #[response(status = 404)]
    NotFound(ErrorBody),
}

/// `min_version`: the row did not reach the version in time.
#[derive(IntoResponses)]
pub enum TooEarly {
    #[response(status = 425, headers(("Retry-After" = u64, description = "Seconds to wait")))]
    TooEarly(ErrorBody),
}

/// Errors of a read that can hit a log and an index that disagree.
#[derive(IntoResponses)]
pub enum LogErrors {
    /// The log index names a log position that does not exist; run `spiced verify`.
    #[response(status = 500)]
    Internal(ErrorBody),
}

/// A command's state: the 202 answer of a command, and `GET /commands/{command_id}`.
#[derive(ToSchema)]
pub struct CommandBody {
    /// The `Idempotency-Key`, or the id the server gave the command.
    pub command_id: Uuid,
    /// `PENDING` in a 202; later `PROCESSING`, `RETRYING`, `COMPLETED` or `FAILED`.
    pub status: String,
    /// `Database`, `OntologyClass` or `Instance`.
    pub aggregate_type: String,
    /// The aggregate, null for a bulk create.
    pub aggregate_id: Option<String>,
    /// The aggregate's version this command got, null for a bulk create.
    pub sequence_number: Option<u64>,
    /// A bulk create's instances.
    pub instances: Option<Vec<BulkMember>>,
    /// `GET /commands`: why it failed or is being retried, `{code, message}`. Codes of a
    /// failed command: `database_exists`, `database_not_found`, `database_not_empty`,
    /// `class_exists`, `class_not_found`, `class_in_use`, `parent_class_not_found`,
    /// `invalid_parent_class`, `class_is_abstract`, `schema_incompatible`, `instance_exists`,
    /// `instance_not_found`, `instance_in_use`, `invalid_instance`, `invalid_reference`,
    /// `unique_violation`, `not_in_enum`, `out_of_range`, `invalid_length`,
    /// `pattern_mismatch`, or `processing_error` after the last retry.
    pub error: Option<Value>,
}

/// One instance of a bulk create.
#[derive(ToSchema)]
pub struct BulkMember {
    pub instance_id: String,
    pub aggregate_id: String,
    pub sequence_number: u64,
    /// `GET /commands` only.
    pub status: Option<String>,
    /// `GET /commands` only.
    pub error: Option<Value>,
}

/// A row of a read model: its state's fields plus these.
#[derive(ToSchema)]
pub struct Item {
    /// The aggregate version the row reflects.
    pub version: u64,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// A keyset page of rows, by id.
#[derive(ToSchema)]
pub struct Page {
    pub items: Vec<Item>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
    /// With `count=true`: the rows the list matches, at most `serve.max_count`.
    pub total: Option<u64>,
    /// With `count=true`: true when there are more than `total`.
    pub total_is_lower_bound: Option<bool>,
    /// In relevance order (`q=` without `sort=`): true when more rows matched than
    /// `serve.max_ranked`, so the pages are the best of the first that many found (in storage
    /// order), not of every match; `sort=id` walks every match.
    pub rank_is_partial: Option<bool>,
}

/// An aggregate's current version in the log.
#[derive(ToSchema)]
pub struct AggregateVersion {
    pub aggregate_type: String,
    pub aggregate_id: String,
    /// 0 when the aggregate has no command yet.
    pub version: u64,
}

/// A slice of an aggregate's history.
#[derive(ToSchema)]
pub struct EventsPage {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub events: Vec<crate::envelope::EventEnvelope>,
    /// Where to continue when the range held more than one call returns (1,000 envelopes or
    /// 4 MiB of them, whichever comes first).
    pub next_from_seq: Option<u64>,
}

#[derive(ToSchema)]
pub struct Health {
    /// `ok`.
    pub status: String,
}

/// Readiness: whether the log store and the database answer.
#[derive(ToSchema)]
pub struct Readiness {
    /// `ready` or `unavailable`.
    pub status: String,
    /// `ok` or the log store's error.
    pub log: String,
    /// `ok` or the database's error.
    pub database: String,
}

pub use crate::domain::ids::{Key, Name};

#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
pub struct DbPath {
    /// The database's name.
    pub db: Name,
}

#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
pub struct ClassPath {
    /// The database's name.
    pub db: Name,
    /// The class id.
    pub class_id: Name,
}

#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
pub struct InstancePath {
    /// The database's name.
    pub db: Name,
    /// The class id.
    pub class_id: Name,
    /// The instance id.
    pub instance_id: Name,
}

#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
pub struct AggregatePath {
    pub aggregate_type: crate::domain::AggregateType,
    /// `db`, `db:branch:class_id` or `db:branch:class_id:instance_id`.
    pub aggregate_id: Key,
}

/// `expected_seq` of a create: the aggregate must not exist yet.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CreateSeq {
    /// 0 (or absent): a create implies the aggregate is new.
    #[param(maximum = 0)]
    pub expected_seq: Option<u64>,
}

/// `expected_seq` of an update or delete.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ExpectedSeq {
    /// The aggregate's current version, as the client saw it (`GET /aggregates/...`).
    pub expected_seq: u64,
}

/// The `Idempotency-Key` header of commands.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
pub struct IdempotencyKey {
    /// A UUID naming the command: a repeat with the same key and request answers like the
    /// first, with a different request 422. Absent: the server picks one.
    #[param(rename = "Idempotency-Key")]
    pub key: Option<Uuid>,
}
