//! Reading the read models on SQLite: the position and the rows under one hold of the
//! connection (one snapshot), filters through SQLite's JSON functions.

use super::{position, table, Lite};
use crate::db::read::filter::{glob_pattern, like_pattern, render, render_into, Binder, Condition, Param, Test, ValueType};
use crate::db::read::sort::{self, SortKey};
use crate::db::read::query::{kind_of, COLUMNS};
use crate::db::read::search::{Search, Term};
use crate::db::read::{Page, ReadKind, ReadRow, ReadSchema, Reference, Snapshot};
use crate::db::DbError;
use chrono::{DateTime, Utc};
use serde_json::Value;

pub(super) async fn one(lite: &Lite, kind: ReadKind, key: &str) -> Result<Snapshot, DbError> {
    let sql = format!("SELECT {COLUMNS} FROM {} WHERE kind = ?1 AND key = ?2", table(&ReadSchema::live(), "read_models"));
    rows_at(lite, sql, vec![kind.as_str().to_string().into(), key.to_string().into()]).await
}

pub(super) async fn page(lite: &Lite, page: &Page<'_>) -> Result<Snapshot, DbError> {
    if page.sort.rank_key().is_some() {
        return ranked_page(lite, page).await;
    }
    if !page.sort.is_by_id() {
        return sorted_page(lite, page).await;
    }
    let after = page.after.unwrap_or("").to_string();
    let (filter, params) = render(page.filter, 5, '?', clause);
    let sql = format!(
        "SELECT {COLUMNS} FROM {} WHERE kind = ?1 AND parent = ?2 AND deleted = 0 AND key > ?3{filter} ORDER BY key LIMIT ?4",
        table(&ReadSchema::live(), "read_models")
    );
    let mut bound: Vec<rusqlite::types::Value> =
        vec![page.kind.as_str().to_string().into(), page.parent.to_string().into(), after.into(), (page.limit as i64).into()];
    bound.extend(params.into_iter().map(param));
    rows_at(lite, sql, bound).await
}

/// Instances naming `id` in one of `refs` (a scan of each referencing class: SQLite has no
/// index on JSON values).
pub(super) async fn referencing(lite: &Lite, refs: &[Reference], id: &str, after: Option<&str>, limit: usize) -> Result<Snapshot, DbError> {
    let mut b = Binder::new(3, '?');
    let any: Vec<String> = refs
        .iter()
        .map(|r| {
            let parent = b.bind(Param::Text(r.parent.clone()));
            let path = b.bind(Param::Text(format!("$.data.\"{}\"", r.property)));
            let value = b.bind(Param::Text(id.to_string()));
            match r.many {
                true => format!("(parent = {parent} AND json_type(state, {path}) = 'array' AND EXISTS (SELECT 1 FROM json_each(state, {path}) e WHERE e.value = {value}))"),
                false => format!("(parent = {parent} AND json_type(state, {path}) = 'text' AND json_extract(state, {path}) = {value})"),
            }
        })
        .collect();
    let any = if any.is_empty() { vec!["1 = 0".to_string()] } else { any };
    let sql = format!(
        "SELECT {COLUMNS} FROM {} WHERE kind = 'instance' AND deleted = 0 AND key > ?1 AND ({}) ORDER BY key LIMIT ?2",
        table(&ReadSchema::live(), "read_models"),
        any.join(" OR ")
    );
    let mut bound: Vec<rusqlite::types::Value> = vec![after.unwrap_or("").to_string().into(), (limit as i64).into()];
    bound.extend(b.into_params().into_iter().map(param));
    rows_at(lite, sql, bound).await
}

/// A page in a `sort=` order.
async fn sorted_page(lite: &Lite, page: &Page<'_>) -> Result<Snapshot, DbError> {
    let mut b = Binder::new(4, '?');
    let filter = render_into(page.filter, &mut b, clause);
    let exprs: Vec<String> = page.sort.keys.iter().map(|k| sort_expr(k, &mut b)).collect();
    let after = match page.after {
        Some(key) => format!(" AND {}", sort::after(page.sort, &exprs, page.after_values, key, &DIALECT, &mut b)),
        None => String::new(),
    };
    let sql = format!(
        "SELECT {COLUMNS} FROM {} WHERE kind = ?1 AND parent = ?2 AND deleted = 0{after}{filter} ORDER BY {} LIMIT ?3",
        table(&ReadSchema::live(), "read_models"),
        sort::order_by(page.sort, &exprs, "key"),
    );
    let mut bound: Vec<rusqlite::types::Value> =
        vec![page.kind.as_str().to_string().into(), page.parent.to_string().into(), (page.limit as i64).into()];
    bound.extend(b.into_params().into_iter().map(param));
    rows_at(lite, sql, bound).await
}

/// A page in relevance order: the best, after the cursor, of the first `max_ranked` matches
/// (one more is read only to tell whether there are more), as on PostgreSQL.
async fn ranked_page(lite: &Lite, page: &Page<'_>) -> Result<Snapshot, DbError> {
    let mut b = Binder::new(5, '?');
    let sort::Ranked { filter, rank, after, order, outer } = sort::ranked(page, &mut b, clause, sort_expr, &DIALECT);
    // One row even when the page is empty (the count's), so `partial` is always read.
    let sql = format!(
        "WITH c AS MATERIALIZED (SELECT {COLUMNS}, {rank} AS s0, row_number() OVER () AS nth FROM {} \
         WHERE kind = ?1 AND parent = ?2 AND deleted = 0{filter} LIMIT ?4 + 1) \
         SELECT r.*, n.matched > ?4 FROM (SELECT count(*) AS matched FROM c) n LEFT JOIN \
         (SELECT * FROM c WHERE nth <= ?4{after} ORDER BY {order} LIMIT ?3) r ON 1 ORDER BY {outer}",
        table(&ReadSchema::live(), "read_models"),
    );
    let mut bound: Vec<rusqlite::types::Value> = vec![
        page.kind.as_str().to_string().into(),
        page.parent.to_string().into(),
        (page.limit as i64).into(),
        (page.max_ranked.min(i64::MAX as u64 - 1) as i64).into(),
    ];
    bound.extend(b.into_params().into_iter().map(param));
    let conn = lite.conn.lock().await;
    let position = position(&conn, &ReadSchema::live())?;
    let mut stmt = conn.prepare(&sql)?;
    let (mut rows, mut ranks, mut partial) = (Vec::new(), Vec::new(), false);
    let mut found = stmt.query(rusqlite::params_from_iter(bound))?;
    // The columns: the row's, s0, nth, then partial.
    while let Some(r) = found.next()? {
        partial = r.get(12)?;
        if r.get::<_, Option<String>>(0)?.is_some() {
            rows.push(row(r)?);
            ranks.push(r.get::<_, Option<f64>>(10)?.unwrap_or(0.0));
        }
    }
    Ok(Snapshot { position, rows, ranks, rank_is_partial: partial })
}

const DIALECT: sort::Dialect = sort::Dialect { value: sort_value, same: "IS" };

/// A sort key's typed value over the data: null when missing or of another type (booleans as
/// 0 and 1). The name is an identifier ([`sort::Sort::parse`] checks), spelled inline.
fn sort_expr(k: &SortKey, b: &mut Binder) -> String {
    if let Some(search) = &k.rank {
        return rank(search, b);
    }
    let path = format!("'$.data.\"{}\"'", k.property);
    compared(k.ty, format!("(CASE WHEN json_type(state, {path}) IN {} THEN json_extract(state, {path}) END)", types(k.ty)))
}

fn sort_value(k: &SortKey, v: &Value, b: &mut Binder) -> String {
    compared(k.ty, bind_value(v, b))
}

/// A value as a property of type `ty` compares: a datetime as its instant (`spiced_instant`,
/// registered on the connection), the rest as they are.
fn compared(ty: ValueType, sql: String) -> String {
    match ty {
        ValueType::Instant => format!("spiced_instant({sql})"),
        _ => sql,
    }
}

/// A filter or cursor value as SQLite compares it with `json_extract`: numbers as reals,
/// booleans as SQLite's 0/1, the rest as text.
fn bind_value(v: &Value, b: &mut Binder) -> String {
    match v {
        Value::Number(n) => b.bind(Param::Number(n.as_f64().unwrap_or(f64::NAN))),
        Value::Bool(t) => b.bind(Param::Number(if *t { 1.0 } else { 0.0 })),
        other => b.bind(Param::Text(other.as_str().unwrap_or_default().to_string())),
    }
}

pub(super) async fn count(lite: &Lite, page: &Page<'_>, bound: u64) -> Result<u64, DbError> {
    let (filter, params) = render(page.filter, 4, '?', clause);
    let sql = format!(
        "SELECT count(*) FROM (SELECT 1 FROM {} WHERE kind = ?1 AND parent = ?2 AND deleted = 0{filter} LIMIT ?3)",
        table(&ReadSchema::live(), "read_models")
    );
    let mut bound_params: Vec<rusqlite::types::Value> =
        vec![page.kind.as_str().to_string().into(), page.parent.to_string().into(), (bound.saturating_add(1).min(i64::MAX as u64) as i64).into()];
    bound_params.extend(params.into_iter().map(param));
    let conn = lite.conn.lock().await;
    let n: i64 = conn.query_row(&sql, rusqlite::params_from_iter(bound_params), |r| r.get(0))?;
    Ok(n as u64)
}

/// The position and the rows under one hold of the connection, so no write comes between.
async fn rows_at(lite: &Lite, sql: String, params: Vec<rusqlite::types::Value>) -> Result<Snapshot, DbError> {
    let conn = lite.conn.lock().await;
    let position = position(&conn, &ReadSchema::live())?;
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(rusqlite::params_from_iter(params), row)?.collect::<Result<Vec<_>, _>>()?;
    Ok(Snapshot { position, rows, ranks: Vec::new(), rank_is_partial: false })
}

fn param(p: Param) -> rusqlite::types::Value {
    match p {
        Param::Text(s) => s.into(),
        Param::Number(n) => n.into(),
        Param::Json(v) => v.to_string().into(),
    }
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ReadRow> {
    let time = |i: usize| -> rusqlite::Result<DateTime<Utc>> {
        let s: String = r.get(i)?;
        DateTime::parse_from_rfc3339(&s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e)))
    };
    let kind: String = r.get(0)?;
    let state: Option<String> = r.get(4)?;
    Ok(ReadRow {
        kind: kind_of(&kind).map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e)))?,
        key: r.get(1)?,
        parent: r.get(2)?,
        db: r.get(3)?,
        state: state
            .map(|s| serde_json::from_str(&s))
            .transpose()
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(4, rusqlite::types::Type::Text, Box::new(e)))?,
        version: r.get::<_, i64>(5)? as u64,
        position: r.get::<_, i64>(6)? as u64,
        deleted: r.get(7)?,
        created_at: time(8)?,
        updated_at: time(9)?,
    })
}

fn types(ty: ValueType) -> &'static str {
    match ty {
        ValueType::Number => "('integer', 'real')",
        ValueType::Text | ValueType::Instant => "('text')",
        ValueType::Bool => "('true', 'false')",
        ValueType::Json => "('object', 'array')",
    }
}

/// `q=` as an FTS5 query over the search table, which holds each live instance's strings
/// under the row's rowid (`read::sync_search`): every term, each a quoted string (a phrase
/// when it has several words), a prefix with `*`.
fn search(s: &Search, b: &mut Binder) -> String {
    let table = table(&ReadSchema::live(), "search");
    format!("rowid IN (SELECT rowid FROM {table} WHERE {table} MATCH {})", b.bind(Param::Text(match_text(s))))
}

/// How well a row matches `s`: FTS5's `bm25`, negated so that higher is better as on
/// PostgreSQL. (bm25 weighs words by how rare they are in the whole table, so a row's rank
/// moves as other rows change.)
fn rank(s: &Search, b: &mut Binder) -> String {
    let (search, rows) = (table(&ReadSchema::live(), "search"), table(&ReadSchema::live(), "read_models"));
    let text = b.bind(Param::Text(match_text(s)));
    format!("(SELECT -bm25({search}) FROM {search} WHERE {search} MATCH {text} AND {search}.rowid = {rows}.rowid)")
}

/// `s` as an FTS5 query.
fn match_text(s: &Search) -> String {
    let quoted = |t: &str| format!("\"{}\"", t.replace('"', "\"\""));
    let terms: Vec<String> = s
        .terms
        .iter()
        .map(|t| match t {
            Term::Word(w) | Term::Phrase(w) => quoted(w),
            Term::Prefix(p) => format!("{}*", quoted(p)),
        })
        .collect();
    terms.join(" AND ")
}

fn clause(c: &Condition, b: &mut Binder) -> String {
    if let Test::Search(s) = &c.test {
        return search(s, b);
    }
    let path = b.bind(Param::Text(format!("$.data.\"{}\"", c.property)));
    let typed = format!("json_type(state, {path}) IN {}", types(c.ty));
    let x = format!("json_extract(state, {path})");
    match &c.test {
        Test::Exists(present) => {
            let op = if *present { "<>" } else { "=" };
            format!("coalesce(json_type(state, {path}), 'null') {op} 'null'")
        }
        Test::Cmp(op, v) => format!("{typed} AND {} {} {}", compared(c.ty, x), op.sql(), compared(c.ty, bind_value(v, b))),
        Test::In(values) => {
            let list: Vec<String> = values.iter().map(|v| compared(c.ty, bind_value(v, b))).collect();
            format!("{typed} AND {} IN ({})", compared(c.ty, x), list.join(", "))
        }
        Test::NotIn(values) => {
            let list: Vec<String> = values.iter().map(|v| compared(c.ty, bind_value(v, b))).collect();
            format!("{typed} AND {} NOT IN ({})", compared(c.ty, x), list.join(", "))
        }
        // SQLite's LIKE ignores ASCII case only, and GLOB is its case-sensitive match.
        Test::Like { pattern, case_insensitive: false } => {
            format!("{typed} AND {x} GLOB {}", b.bind(Param::Text(glob_pattern(pattern))))
        }
        Test::Like { pattern, case_insensitive: true } => {
            format!("{typed} AND {x} LIKE {} ESCAPE '\\'", b.bind(Param::Text(like_pattern(pattern))))
        }
        Test::Search(_) => unreachable!("answered above"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::read::filter::parse;
    use std::collections::HashMap;

    #[test]
    fn filters_render_as_json_functions_with_numbered_parameters() {
        let props: HashMap<String, String> = [("age", "integer"), ("name", "string")].map(|(k, v)| (k.to_string(), v.to_string())).into();
        let (sql, params) = render(&parse("age>3,name=in:(a|b)", &props).unwrap(), 5, '?', clause);
        assert!(sql.contains("json_extract(state, ?5) > ?6") && sql.contains("IN (?8, ?9)"), "{sql}");
        assert_eq!(params[0], Param::Text("$.data.\"age\"".into()));
    }
}
