//! The query API over the read models. Every response carries each row's `version` and the
//! header `X-Spiced-Projection-Position` (the last log position the read models reflect).
//! Pages are keyset pages on the id: stable under concurrent writes, same cost at any depth.
//!
//! Read-your-write: `?min_version=N` on a single read waits (up to `serve.min_version_wait_ms`)
//! for the row to reach version N, then answers `425 Too Early` with `Retry-After`: the write
//! is accepted, the read model has not caught up yet, and the same request will succeed later.
//! (409 would say the request conflicts with the state, which it does not.)

use super::error::ApiError;
use super::extract::{path, query};
use super::schema::{ApiErrors, ClassPath, DbPath, InstancePath, Item, Key, Name, NotFound, Page, TooEarly};
use super::AppState;
use crate::db::read::filter::{self, Group};
use crate::db::read::search::Search;
use crate::db::read::sort::{self, Sort};
use crate::db::read::{Page as ReadPage, ReadKind, ReadRow, Snapshot};
use crate::domain::ids::validate_name;
use crate::domain::text;
use axum::http::HeaderMap;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use utoipa::IntoParams;

/// The largest page.
pub const MAX_LIMIT: usize = 1000;
const DEFAULT_LIMIT: usize = 100;

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// Branch of the database; `main` when absent (checked, but databases have no branch).
    #[param(value_type = Option<Name>)]
    branch: Option<String>,
    /// Rows per page, 1 to 1000; 100 when absent.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// The `next_cursor` of the previous page.
    #[param(value_type = Option<Key>)]
    cursor: Option<String>,
    /// Instances only: conditions on the instances' properties, typed by the class schema.
    /// `,` joins conditions that must all hold; `(a=1|b=2)` holds when any of its conditions
    /// does. Operators: `=`, `!=`, `>`, `>=`, `<`, `<=`, `=in:(a|b)`, `=not_in:(a|b)`,
    /// `=exists:true|false`, `=is_null:true|false`, `=like:pat*`, `=ilike:pat*` (`*`: any
    /// characters). Quote a value to hold `,|()"`: `name="Smith, J"` (`\"`, `\\` inside).
    /// e.g. `age>=30,(name=bob|name=like:al*)`. The grammar: `filter = group *("," group)`,
    /// `group = condition / "(" condition *("|" condition) ")"`, `condition = property op
    /// value`, `list = scalar *("|" scalar)`, `scalar = quoted / plain`. Numbers compare as
    /// numbers, datetimes as instants (the value must be RFC 3339; `like` tests the text),
    /// the other scalar types as strings in byte order. An invalid filter is
    /// `400 invalid_filter`, whose message names the character it stopped at; a filter on the
    /// instances of a class the read model does not hold is a 404.
    #[serde(rename = "where")]
    filter: Option<String>,
    /// Adds `total`: the rows the list (and its filter) matches, exact up to
    /// `serve.max_count`; past it `total` is that bound and `total_is_lower_bound` is true.
    #[serde(default)]
    count: Option<bool>,
    /// Instances only: `prop` ascending or `-prop` descending, several joined by `,` (at most
    /// 4), optionally ending in `id` or `-id` (the instance id always breaks ties, ascending
    /// unless `-id`), e.g. `sort=-price,name`. Numbers sort as numbers, datetimes as
    /// instants, strings and dates in byte order, booleans false first; a missing value (or one
    /// of another type) sorts last ascending and first descending. `next_cursor` carries the sort values: pass it with the
    /// same `sort=`.
    sort: Option<String>,
    /// Instances only: full-text search over the instances' string values, ANDed with
    /// `where=`: words (each must occur), `prefix*` and `"a phrase"`, e.g. `q=red "running
    /// shoe" nik*`. PostgreSQL matches in the database's text search configuration
    /// (`database.text_search`), SQLite with FTS5's `unicode61` tokenizer. At most 256
    /// characters and 16 terms; anything else is `400 invalid_search`. Without `sort=`, the
    /// best match comes first (ties by id), and `next_cursor` is for the same `q=` only; the
    /// ranking is over the first `serve.max_ranked` matches found (`rank_is_partial` says
    /// when there were more).
    q: Option<String>,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct OneQuery {
    /// Branch of the database; `main` when absent.
    #[param(value_type = Option<Name>)]
    branch: Option<String>,
    /// Wait, for a bounded time, until the row has reached this version (e.g. the
    /// `sequence_number` of a command's 202); if it does not, 425 with `Retry-After`.
    #[serde(default, deserialize_with = "super::extract::seq")]
    min_version: Option<u64>,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DbQuery {
    /// Wait, for a bounded time, until the row has reached this version (e.g. the
    /// `sequence_number` of a command's 202); if it does not, 425 with `Retry-After`.
    #[serde(default, deserialize_with = "super::extract::seq")]
    min_version: Option<u64>,
}

fn branch_of(branch: &Option<String>) -> Result<String, ApiError> {
    let b = branch.clone().unwrap_or_else(|| "main".into());
    validate_name("branch", &b)?;
    Ok(b)
}

/// A row as the API shows it; a class also gets its `localized` labels for `languages`.
pub(super) fn item(row: &ReadRow, kind: ReadKind, languages: &[String]) -> Value {
    let mut v = row.state.clone().unwrap_or(json!({}));
    let localized = (kind == ReadKind::Class).then(|| text::localized(&v, languages));
    if let Some(obj) = v.as_object_mut() {
        obj.insert("version".into(), json!(row.version));
        obj.insert("created_at".into(), json!(row.created_at));
        obj.insert("updated_at".into(), json!(row.updated_at));
        if let Some(localized) = localized {
            obj.insert("localized".into(), localized);
        }
    }
    v
}

/// The caller's `Accept-Language`, most wanted first.
fn languages(headers: &HeaderMap) -> Vec<String> {
    headers
        .get(axum::http::header::ACCEPT_LANGUAGE)
        .and_then(|v| v.to_str().ok())
        .map(text::preferences)
        .unwrap_or_default()
}

pub(super) fn with_position(position: u64, body: Value) -> Response {
    ([("x-spiced-projection-position", position.to_string())], Json(body)).into_response()
}

/// What one list request reads, beside its page parameters.
struct List<'a> {
    kind: ReadKind,
    parent: &'a str,
    filter: &'a [Group],
    sort: &'a Sort,
    languages: &'a [String],
}

impl<'a> List<'a> {
    fn of(kind: ReadKind, parent: &'a str) -> List<'a> {
        List { kind, parent, filter: &[], sort: &sort::BY_ID, languages: &[] }
    }
}

async fn page(state: &AppState, q: &PageQuery, list: List<'_>) -> Result<Response, ApiError> {
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::bad_request("invalid_query", format!("limit must be 1 to {MAX_LIMIT}")));
    }
    // A relevance page's cursor is for the same search only.
    let sort_text = match (&q.sort, list.sort.rank_key(), &q.q) {
        (None, Some(_), Some(search)) => format!("q={search}"),
        _ => q.sort.clone().unwrap_or_default(),
    };
    let sort_text = sort_text.as_str();
    let (after, after_values) = match &q.cursor {
        None => (None, Vec::new()),
        Some(cursor) if list.sort.is_by_id() => {
            validate_cursor(cursor)?;
            (Some(cursor.clone()), Vec::new())
        }
        Some(cursor) => {
            let (values, key) = sort::decode_cursor(cursor, sort_text, list.sort)?;
            (Some(key), values)
        }
    };
    let page = ReadPage {
        kind: list.kind,
        parent: list.parent,
        after: after.as_deref(),
        limit,
        filter: list.filter,
        sort: list.sort,
        after_values: &after_values,
        max_ranked: state.config.serve.max_ranked,
    };
    let Snapshot { position, rows, ranks, rank_is_partial } = state.db.read.page(&page).await?;
    let last = rows.last().filter(|_| rows.len() == limit);
    let next = last.map(|r| match list.sort.is_by_id() {
        true => r.key.clone(),
        false => {
            let mut values = list.sort.values_of(r.state.as_ref());
            if let (Some(i), Some(rank)) = (list.sort.rank_key(), ranks.last()) {
                values[i] = json!(rank);
            }
            sort::encode_cursor(sort_text, &values, &r.key)
        }
    });
    let items: Vec<Value> = rows.iter().map(|r| item(r, list.kind, list.languages)).collect();
    let mut body = json!({"items": items, "next_cursor": next});
    if list.sort.rank_key().is_some() {
        body["rank_is_partial"] = json!(rank_is_partial);
    }
    if q.count == Some(true) {
        let bound = state.config.serve.max_count;
        let counted = state.db.read.count(&page, bound).await?;
        body["total"] = json!(counted.min(bound));
        body["total_is_lower_bound"] = json!(counted > bound);
    }
    Ok(with_position(position, body))
}

/// A cursor is a row's key: names joined by `:`. Anything else names no row, and may hold
/// bytes the database refuses (a NUL in PostgreSQL text), which must be a 400, not a 503.
fn validate_cursor(cursor: &str) -> Result<(), ApiError> {
    cursor.split(':').try_for_each(|part| validate_name("cursor", part))?;
    Ok(())
}

/// `where=` and `sort=` are about instances' properties.
fn no_filter(q: &PageQuery) -> Result<(), ApiError> {
    if q.filter.is_some() {
        return Err(ApiError::bad_request("invalid_filter", "where= applies to instance lists only"));
    }
    if q.sort.is_some() {
        return Err(ApiError::bad_request("invalid_sort", "sort= applies to instance lists only"));
    }
    if q.q.is_some() {
        return Err(ApiError::bad_request("invalid_search", "q= applies to instance lists only"));
    }
    Ok(())
}

async fn one(state: &AppState, kind: ReadKind, key: &str, min_version: Option<u64>, languages: &[String]) -> Result<Response, ApiError> {
    let found = match min_version {
        Some(wanted) => wait_for_version(state, kind, key, wanted).await?,
        None => state.db.read.one(kind, key).await?,
    };
    let row = found.rows.first().filter(|r| !r.deleted);
    let row = row.ok_or_else(|| ApiError::not_found(format!("no {} {key} (or not projected yet)", kind.as_str())))?;
    Ok(with_position(found.position, item(row, kind, languages)))
}

/// The row once it has reached `wanted`, re-read each time the projection position moves
/// (one watcher per process, [`super::position_watch`]) until `serve.min_version_wait_ms` has
/// passed; then 425. Past `serve.max_version_waiters` waiting reads, 503.
async fn wait_for_version(state: &AppState, kind: ReadKind, key: &str, wanted: u64) -> Result<Snapshot, ApiError> {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(state.config.serve.min_version_wait_ms);
    let mut waiter = None;
    loop {
        let found = state.db.read.one(kind, key).await?;
        let version = found.rows.first().map(|r| r.version).unwrap_or(0);
        if version >= wanted {
            return Ok(found);
        }
        if waiter.is_none() {
            let joined = state.positions.join().ok_or_else(|| {
                ApiError::new(axum::http::StatusCode::SERVICE_UNAVAILABLE, "unavailable", "too many reads are waiting for the read models (serve.max_version_waiters); retry")
            })?;
            waiter = Some(joined);
            // The position may have moved between the read and joining: read once more.
            continue;
        }
        let moves = &mut waiter.as_mut().expect("joined above").moves;
        let moved = matches!(tokio::time::timeout_at(deadline, moves.changed()).await, Ok(Ok(())));
        if !moved {
            return Err(ApiError::new(
                axum::http::StatusCode::TOO_EARLY,
                "not_yet_projected",
                format!("the read model has {} at version {version}, not yet {wanted}; retry", kind.as_str()),
            )
            .with("version", json!(version))
            .retry_after(1));
        }
    }
}

/// The properties of a class and its ancestors, name -> declared type, from the read model.
pub(super) async fn class_properties(state: &AppState, class_key_prefix: &str, class_id: &str) -> Result<HashMap<String, String>, ApiError> {
    Ok(class_fields(state, class_key_prefix, class_id).await?.0)
}

/// [`class_properties`], and the names of those the class or an ancestor declares `indexed`.
async fn class_fields(state: &AppState, class_key_prefix: &str, class_id: &str) -> Result<(HashMap<String, String>, HashSet<String>), ApiError> {
    let mut indexed = HashSet::new();
    let mut properties = HashMap::new();
    let mut next = Some(class_id.to_string());
    let mut seen = 0;
    while let Some(id) = next.take() {
        seen += 1;
        let key = format!("{class_key_prefix}:{id}");
        let found = state.db.read.one(ReadKind::Class, &key).await?;
        let Some(class) = found.rows.into_iter().next().filter(|r| !r.deleted).and_then(|r| r.state) else {
            return Err(ApiError::not_found(format!("no class {id} (or not projected yet)")));
        };
        for p in class["properties"].as_array().into_iter().flatten() {
            if let Some(name) = p["name"].as_str() {
                // A many-valued ref is an array: `json` to filters and sorts, `refs:` to links.
                let ty = match (p["type"].as_str().unwrap_or("json"), p["cardinality"].as_str()) {
                    (ty, Some("many")) if ty.starts_with("ref:") => ty.replacen("ref:", "refs:", 1),
                    (ty, _) => ty.to_string(),
                };
                let ty = ty.as_str();
                properties.entry(name.to_string()).or_insert_with(|| ty.to_string());
                if p["indexed"] == true {
                    indexed.insert(name.to_string());
                }
            }
        }
        // Ancestry is checked when classes are written; the bound guards against a cycle.
        next = class["parent_class"].as_str().filter(|_| seen < 64).map(str::to_string);
    }
    Ok((properties, indexed))
}

#[utoipa::path(
    get,
    path = "/api/v1/databases",
    tag = "queries",
    params(PageQuery),
    responses(
        (status = 200, description = "A page of databases", body = Page, headers(("X-Spiced-Projection-Position" = u64, description = "The last log position the read models reflect"))),
        ApiErrors
    ),
    security(("bearer" = ["read"]))
)]
pub async fn list_databases(State(state): State<AppState>, q: Result<Query<PageQuery>, QueryRejection>) -> Result<Response, ApiError> {
    let q = query(q)?;
    no_filter(&q)?;
    // Databases have no branch, but a malformed one is still a bad request.
    branch_of(&q.branch)?;
    page(&state, &q, List::of(ReadKind::Database, "")).await
}

#[utoipa::path(
    get,
    path = "/api/v1/databases/{db}",
    tag = "queries",
    params(DbPath, DbQuery),
    responses(
        (status = 200, description = "The database", body = Item, headers(("X-Spiced-Projection-Position" = u64, description = "The last log position the read models reflect"))),
        ApiErrors, NotFound, TooEarly
    ),
    security(("bearer" = ["read"]))
)]
pub async fn get_database(
    State(state): State<AppState>,
    p: Result<Path<String>, PathRejection>,
    q: Result<Query<DbQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let (db, q) = (path(p)?, query(q)?);
    validate_name("db", &db)?;
    one(&state, ReadKind::Database, &db, q.min_version, &[]).await
}

#[utoipa::path(
    get,
    path = "/api/v1/databases/{db}/classes",
    tag = "queries",
    params(DbPath, PageQuery, ("Accept-Language" = Option<String>, Header, description = "e.g. `ko-KR, en;q=0.8`: each class's `localized` holds the best match of its label, description and property labels (exact tag, then the same primary language, then `en`, then the first)")),
    responses(
        (status = 200, description = "A page of the branch's classes", body = Page, headers(("X-Spiced-Projection-Position" = u64, description = "The last log position the read models reflect"))),
        ApiErrors
    ),
    security(("bearer" = ["read"]))
)]
pub async fn list_classes(
    State(state): State<AppState>,
    headers: HeaderMap,
    p: Result<Path<String>, PathRejection>,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let (db, q) = (path(p)?, query(q)?);
    validate_name("db", &db)?;
    no_filter(&q)?;
    let parent = format!("{db}:{}", branch_of(&q.branch)?);
    let languages = languages(&headers);
    page(&state, &q, List { languages: &languages, ..List::of(ReadKind::Class, &parent) }).await
}

#[utoipa::path(
    get,
    path = "/api/v1/databases/{db}/classes/{class_id}",
    tag = "queries",
    params(ClassPath, OneQuery, ("Accept-Language" = Option<String>, Header, description = "e.g. `ko-KR, en;q=0.8`: `localized` holds the best match of the class's label, description and property labels (exact tag, then the same primary language, then `en`, then the first)")),
    responses(
        (status = 200, description = "The class", body = Item, headers(("X-Spiced-Projection-Position" = u64, description = "The last log position the read models reflect"))),
        ApiErrors, NotFound, TooEarly
    ),
    security(("bearer" = ["read"]))
)]
pub async fn get_class(
    State(state): State<AppState>,
    headers: HeaderMap,
    p: Result<Path<(String, String)>, PathRejection>,
    q: Result<Query<OneQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let ((db, class_id), q) = (path(p)?, query(q)?);
    validate_name("db", &db)?;
    validate_name("class_id", &class_id)?;
    let key = format!("{db}:{}:{class_id}", branch_of(&q.branch)?);
    one(&state, ReadKind::Class, &key, q.min_version, &languages(&headers)).await
}

#[utoipa::path(
    get,
    path = "/api/v1/databases/{db}/classes/{class_id}/instances",
    tag = "queries",
    params(ClassPath, PageQuery),
    responses(
        (status = 200, description = "A page of the class's instances", body = Page, headers(("X-Spiced-Projection-Position" = u64, description = "The last log position the read models reflect"))),
        ApiErrors, NotFound
    ),
    security(("bearer" = ["read"]))
)]
pub async fn list_instances(
    State(state): State<AppState>,
    p: Result<Path<(String, String)>, PathRejection>,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let ((db, class_id), q) = (path(p)?, query(q)?);
    validate_name("db", &db)?;
    validate_name("class_id", &class_id)?;
    let classes = format!("{db}:{}", branch_of(&q.branch)?);
    let (properties, indexed) = match q.filter.is_some() || q.sort.is_some() {
        true => class_fields(&state, &classes, &class_id).await?,
        false => Default::default(),
    };
    let mut conditions = match &q.filter {
        Some(text) => filter::parse(text, &properties)?,
        None => Vec::new(),
    };
    for c in conditions.iter_mut().flatten() {
        c.indexed = indexed.contains(&c.property);
    }
    let search = q.q.as_deref().map(|text| Search::parse(text, state.config.database.text_search_for(&db))).transpose()?;
    if let Some(search) = &search {
        conditions.push(vec![filter::Condition { property: String::new(), ty: filter::ValueType::Text, test: filter::Test::Search(search.clone()), indexed: false }]);
    }
    // A search is in relevance order unless `sort=` says otherwise.
    let sort = match (&q.sort, search) {
        (Some(text), _) => Sort::parse(text, &properties)?,
        (None, Some(search)) => Sort::relevance(search),
        (None, None) => sort::BY_ID.clone(),
    };
    let parent = format!("{classes}:{class_id}");
    page(&state, &q, List { filter: &conditions, sort: &sort, ..List::of(ReadKind::Instance, &parent) }).await
}

#[utoipa::path(
    get,
    path = "/api/v1/databases/{db}/classes/{class_id}/instances/{instance_id}",
    tag = "queries",
    params(InstancePath, OneQuery),
    responses(
        (status = 200, description = "The instance", body = Item, headers(("X-Spiced-Projection-Position" = u64, description = "The last log position the read models reflect"))),
        ApiErrors, NotFound, TooEarly
    ),
    security(("bearer" = ["read"]))
)]
pub async fn get_instance(
    State(state): State<AppState>,
    p: Result<Path<(String, String, String)>, PathRejection>,
    q: Result<Query<OneQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let ((db, class_id, instance_id), q) = (path(p)?, query(q)?);
    for (field, value) in [("db", &db), ("class_id", &class_id), ("instance_id", &instance_id)] {
        validate_name(field, value)?;
    }
    let key = format!("{db}:{}:{class_id}:{instance_id}", branch_of(&q.branch)?);
    one(&state, ReadKind::Instance, &key, q.min_version, &[]).await
}
