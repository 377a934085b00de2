//! `GET .../instances/{id}/links`: the instances one references through its `ref:<ClassId>`
//! properties (`direction=out`, the default), or those referencing it (`direction=in`), from
//! the read models. `depth` 2 or 3 follows the links on, breadth first; an instance already
//! reached is reported (`cycle: true`) but not followed again, so a cycle ends.

use super::error::ApiError;
use super::extract::{path, query};
use super::queries::{class_properties, item, with_position, MAX_LIMIT};
use super::schema::{ApiErrors, InstancePath, Key, NotFound};
use super::AppState;
use crate::db::read::sort::BY_ID;
use crate::db::read::{Page, ReadKind, ReadRow, Reference};
use crate::domain::ids::validate_name;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use utoipa::{IntoParams, ToSchema};

/// Deepest `depth`.
pub const MAX_DEPTH: u8 = 3;
const DEFAULT_LIMIT: usize = 100;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// The instances this one's `ref` properties name.
    #[default]
    Out,
    /// The instances whose `ref` properties name this one.
    In,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct LinksQuery {
    /// `out` (default) or `in`.
    #[param(inline)]
    direction: Option<Direction>,
    /// 1 (default) to 3: how many links away to go.
    #[param(minimum = 1, maximum = 3)]
    depth: Option<u8>,
    /// Most links returned, 1 to 1000; 100 when absent.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// `direction=in`, `depth=1`: the `next_cursor` of the previous page.
    #[param(value_type = Option<Key>)]
    cursor: Option<String>,
    /// Branch of the database; `main` when absent.
    #[param(value_type = Option<super::schema::Name>)]
    branch: Option<String>,
}

/// One link: the property of `source` that names `target`, how far from the instance asked
/// about, and the instance at the far end as the read models hold it (`null` when it does not
/// exist).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Link {
    pub depth: u8,
    pub property: String,
    pub source: LinkEnd,
    pub target: LinkEnd,
    pub instance: Option<super::schema::Item>,
    /// The far end was reached before: it is not followed again.
    pub cycle: bool,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct LinkEnd {
    pub class_id: String,
    pub instance_id: String,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Links {
    pub items: Vec<Link>,
    /// `direction=in`, `depth=1`: pass as `cursor` for the next page; null on the last.
    pub next_cursor: Option<String>,
    /// `depth` above 1: true when the walk stopped at `limit` links (more may follow).
    pub truncated: bool,
}

#[utoipa::path(
    get,
    path = "/api/v1/databases/{db}/classes/{class_id}/instances/{instance_id}/links",
    tag = "queries",
    params(InstancePath, LinksQuery),
    responses(
        (status = 200, description = "The instance's links", body = Links, headers(("X-Spiced-Projection-Position" = u64, description = "The last log position the read models reflect"))),
        ApiErrors, NotFound
    ),
    security(("bearer" = ["read"]))
)]
pub async fn get_links(
    State(state): State<AppState>,
    p: Result<Path<(String, String, String)>, PathRejection>,
    q: Result<Query<LinksQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let ((db, class_id, instance_id), q) = (path(p)?, query(q)?);
    for (field, value) in [("db", &db), ("class_id", &class_id), ("instance_id", &instance_id)] {
        validate_name(field, value)?;
    }
    let branch = q.branch.clone().unwrap_or_else(|| "main".into());
    validate_name("branch", &branch)?;
    let walk = Walk::new(&state, format!("{db}:{branch}"), &q)?;
    let start = Node { class_id, instance_id };
    let start_key = walk.key(&start);
    let found = state.db.read.one(ReadKind::Instance, &start_key).await?;
    let Some(row) = found.rows.first().filter(|r| !r.deleted) else {
        return Err(ApiError::not_found(format!("no instance {start_key} (or not projected yet)")));
    };
    let (items, next_cursor, truncated) = walk.run(start, data_of(row)).await?;
    Ok(with_position(found.position, json!({"items": items, "next_cursor": next_cursor, "truncated": truncated})))
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Node {
    class_id: String,
    instance_id: String,
}

/// One links request: where it walks and how far.
struct Walk<'a> {
    state: &'a AppState,
    /// `db:branch`, the parent of the database's classes.
    classes: String,
    direction: Direction,
    depth: u8,
    limit: usize,
    cursor: Option<String>,
    /// The references to each class reached so far: every class of the database is read to
    /// find them, once per request.
    references: Mutex<HashMap<String, Vec<Reference>>>,
}

impl<'a> Walk<'a> {
    fn new(state: &'a AppState, classes: String, q: &LinksQuery) -> Result<Walk<'a>, ApiError> {
        let depth = q.depth.unwrap_or(1);
        if !(1..=MAX_DEPTH).contains(&depth) {
            return Err(ApiError::bad_request("invalid_query", format!("depth must be 1 to {MAX_DEPTH}")));
        }
        let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
        if limit == 0 || limit > MAX_LIMIT {
            return Err(ApiError::bad_request("invalid_query", format!("limit must be 1 to {MAX_LIMIT}")));
        }
        let direction = q.direction.unwrap_or_default();
        if q.cursor.is_some() && (depth > 1 || direction == Direction::Out) {
            return Err(ApiError::bad_request("invalid_query", "cursor pages direction=in at depth 1 only"));
        }
        if let Some(cursor) = &q.cursor {
            cursor.split(':').try_for_each(|part| validate_name("cursor", part))?;
        }
        Ok(Walk { state, classes, direction, depth, limit, cursor: q.cursor.clone(), references: Default::default() })
    }

    fn key(&self, node: &Node) -> String {
        format!("{}:{}:{}", self.classes, node.class_id, node.instance_id)
    }

    /// Breadth first from `start` (whose data is `start_data`), up to `limit` links. Each
    /// instance reached is read once: its row comes with the link that reached it.
    async fn run(&self, start: Node, start_data: Value) -> Result<(Vec<Value>, Option<String>, bool), ApiError> {
        let mut seen = HashSet::from([start.clone()]);
        let mut frontier = vec![(start, start_data)];
        let mut items = Vec::new();
        let mut next_cursor = None;
        for depth in 1..=self.depth {
            let mut next = Vec::new();
            for (node, data) in &frontier {
                let room = self.limit - items.len();
                let (links, cursor) = match self.direction {
                    Direction::Out => (self.outgoing(node, data, room).await?, None),
                    Direction::In => self.incoming(node, room).await?,
                };
                next_cursor = cursor;
                for (property, far, row) in links {
                    let cycle = !seen.insert(far.clone());
                    let (source, target) = match self.direction {
                        Direction::Out => (node, &far),
                        Direction::In => (&far, node),
                    };
                    items.push(json!({
                        "depth": depth, "property": property, "cycle": cycle,
                        "source": end(source), "target": end(target),
                        "instance": row.as_ref().map(|r| item(r, ReadKind::Instance, &[])),
                    }));
                    if let Some(row) = row.as_ref().filter(|_| !cycle) {
                        next.push((far, data_of(row)));
                    }
                }
                if items.len() >= self.limit {
                    // Deeper than 1 there is no cursor: say the walk stopped at `limit`.
                    let truncated = self.depth > 1;
                    return Ok((items, next_cursor.filter(|_| self.depth == 1), truncated));
                }
            }
            frontier = next;
        }
        // A cursor pages one instance's incoming links; a walk deeper than that has none.
        Ok((items, next_cursor.filter(|_| self.depth == 1), false))
    }

    /// The instances `node`'s `ref` properties (in its `data`) name, by property name, at most
    /// `room`.
    async fn outgoing(&self, node: &Node, data: &Value, room: usize) -> Result<Vec<(String, Node, Option<ReadRow>)>, ApiError> {
        let properties = match class_properties(self.state, &self.classes, &node.class_id).await {
            Ok(properties) => properties,
            // A class deleted under live instances (not refused yet): nothing to follow.
            Err(e) if e.status() == axum::http::StatusCode::NOT_FOUND => Default::default(),
            Err(e) => return Err(e),
        };
        let mut refs: Vec<(String, String)> = properties.into_iter().filter_map(|(name, ty)| Some((name, target(&ty)?.0.to_string()))).collect();
        refs.sort();
        let mut links = Vec::new();
        for (property, target_class) in refs {
            // One id, or each id of a many-valued reference, in order.
            let ids: Vec<&str> = match &data[&property] {
                Value::Array(ids) => ids.iter().filter_map(Value::as_str).collect(),
                one => one.as_str().into_iter().collect(),
            };
            for id in ids.into_iter().filter(|id| validate_name("id", id).is_ok()) {
                let far = Node { class_id: target_class.clone(), instance_id: id.to_string() };
                let row = self.state.db.read.one(ReadKind::Instance, &self.key(&far)).await?.rows.into_iter().next().filter(|r| !r.deleted);
                links.push((property.clone(), far, row));
                if links.len() >= room {
                    return Ok(links);
                }
            }
        }
        Ok(links)
    }

    /// The instances whose `ref` properties name `node`, in key order, at most `room`, and the
    /// cursor of the next page when there may be more.
    async fn incoming(&self, node: &Node, room: usize) -> Result<(Vec<(String, Node, Option<ReadRow>)>, Option<String>), ApiError> {
        let refs = self.references_to(&node.class_id).await?;
        let page = self.state.db.read.referencing(&refs, &node.instance_id, self.cursor.as_deref(), room).await?;
        let next = page.rows.last().filter(|_| page.rows.len() == room).map(|r| r.key.clone());
        let links = page
            .rows
            .into_iter()
            .filter_map(|row| {
                let class_id = row.parent.rsplit(':').next()?.to_string();
                let instance_id = row.key.rsplit(':').next()?.to_string();
                let names = |r: &Reference| {
                    let value = row.state.as_ref().map(|s| &s["data"][&r.property]);
                    value.is_some_and(|v| *v == node.instance_id.as_str() || v.as_array().is_some_and(|ids| ids.iter().any(|id| *id == node.instance_id.as_str())))
                };
                let reference = refs.iter().find(|r| r.parent == row.parent && names(r))?;
                Some((reference.property.clone(), Node { class_id, instance_id }, Some(row)))
            })
            .collect();
        Ok((links, next))
    }

    /// Every property, of every class of the database (its own or inherited), declared
    /// `ref:<class_id>`.
    async fn references_to(&self, class_id: &str) -> Result<Vec<Reference>, ApiError> {
        let known = self.references.lock().unwrap_or_else(|e| e.into_inner()).get(class_id).cloned();
        if let Some(refs) = known {
            return Ok(refs);
        }
        let refs = self.find_references_to(class_id).await?;
        self.references.lock().unwrap_or_else(|e| e.into_inner()).insert(class_id.to_string(), refs.clone());
        Ok(refs)
    }

    async fn find_references_to(&self, class_id: &str) -> Result<Vec<Reference>, ApiError> {
        let mut refs = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = Page { kind: ReadKind::Class, parent: &self.classes, after: after.as_deref(), limit: MAX_LIMIT, filter: &[], sort: &BY_ID, after_values: &[], max_ranked: u64::MAX };
            let rows = self.state.db.read.page(&page).await?.rows;
            for row in &rows {
                let Some(id) = row.key.rsplit(':').next() else { continue };
                for (property, ty) in class_properties(self.state, &self.classes, id).await? {
                    if let Some((_, many)) = target(&ty).filter(|(t, _)| *t == class_id) {
                        refs.push(Reference { parent: row.key.clone(), property, many });
                    }
                }
            }
            match rows.last().filter(|_| rows.len() == MAX_LIMIT) {
                Some(last) => after = Some(last.key.clone()),
                None => return Ok(refs),
            }
        }
    }
}

/// The class a property type refers to, and whether it holds many ids (`class_properties`
/// spells a many-valued `ref:X` as `refs:X`).
fn target(ty: &str) -> Option<(&str, bool)> {
    match ty.strip_prefix("refs:") {
        Some(class) => Some((class, true)),
        None => ty.strip_prefix("ref:").map(|class| (class, false)),
    }
}

/// An instance row's `data`.
fn data_of(row: &ReadRow) -> Value {
    row.state.as_ref().map(|s| s["data"].clone()).unwrap_or(Value::Null)
}

fn end(node: &Node) -> Value {
    json!({"class_id": node.class_id, "instance_id": node.instance_id})
}
