//! Reading the read models on PostgreSQL: each query is one statement that returns the rows
//! and the projection position together (one snapshot), filters as jsonb containment where the
//! GIN index serves them.

use super::{table, Pg};
use crate::db::read::filter::{like_pattern, render, render_into, Binder, CmpOp, Condition, Group, Param, Test, ValueType};
use crate::db::read::sort::{self, SortKey, Start};
use crate::db::read::query::{kind_of, COLUMNS};
use crate::db::read::search::{valid_config_name, Search, Term};
use crate::db::read::{Page, ReadKind, ReadRow, ReadSchema, Reference, Snapshot};
use crate::db::DbError;
use serde_json::{json, Value};
use tokio_postgres::types::ToSql;

pub(super) async fn one(pg: &Pg, kind: ReadKind, key: &str) -> Result<Snapshot, DbError> {
    let schema = ReadSchema::live();
    let rows = format!("SELECT {COLUMNS} FROM {} WHERE kind = $1 AND key = $2", table(&schema, "read_models"));
    rows_at(pg, &with_position(&schema, &rows), vec![Box::new(kind.as_str()), Box::new(key.to_string())]).await
}

pub(super) async fn page(pg: &Pg, page: &Page<'_>) -> Result<Snapshot, DbError> {
    if page.sort.rank_key().is_some() {
        return ranked_page(pg, page).await;
    }
    if !page.sort.is_by_id() {
        return sorted_page(pg, page).await;
    }
    let schema = ReadSchema::live();
    let after = page.after.unwrap_or("").to_string();
    let mut b = Binder::new(5, '$');
    let part = |groups: &[Group], b: &mut Binder| {
        format!(
            "SELECT {COLUMNS} FROM {} WHERE kind = $1 AND parent = $2 AND NOT deleted AND key > $3{} ORDER BY key LIMIT $4",
            table(&schema, "read_models"),
            render_into(groups, b, clause)
        )
    };
    let rows = match split_or(page.filter) {
        None => part(page.filter, &mut b),
        Some(branches) => {
            let parts: Vec<String> = branches.iter().map(|groups| format!("({})", part(groups, &mut b))).collect();
            format!("SELECT DISTINCT ON (key) * FROM ({}) u ORDER BY key LIMIT $4", parts.join(" UNION ALL "))
        }
    };
    let mut bound: Vec<Box<dyn ToSql + Sync + Send>> =
        vec![Box::new(page.kind.as_str()), Box::new(page.parent.to_string()), Box::new(after), Box::new(page.limit as i64)];
    bound.extend(b.into_params().into_iter().map(param));
    rows_at(pg, &with_position(&schema, &rows), bound).await
}

/// An OR group of equalities on `indexed` properties, as one filter per alternative (with
/// the other groups): each is a range of its property's `(parent, value, key)` index, read
/// in key order from the cursor, so the page is a merge of a few short scans. As one query
/// the OR is a bitmap of every match, all sorted before the page is cut (at a million rows,
/// `(s=v7|n=5)` p99 21 ms). `None` when no group is such an OR.
fn split_or(groups: &[Group]) -> Option<Vec<Vec<Group>>> {
    let ordered = |c: &Condition| c.indexed && matches!(c.test, Test::Cmp(CmpOp::Eq, _));
    let i = groups.iter().position(|g| g.len() > 1 && g.iter().all(ordered))?;
    let others = groups.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, g)| g.clone());
    Some(groups[i].iter().map(|c| others.clone().chain([vec![c.clone()]]).collect()).collect())
}

pub(super) async fn count(pg: &Pg, page: &Page<'_>, bound: u64) -> Result<u64, DbError> {
    let (filter, params) = render(page.filter, 4, '$', clause);
    let sql = format!(
        "SELECT count(*) FROM (SELECT 1 FROM {} WHERE kind = $1 AND parent = $2 AND NOT deleted{filter} LIMIT $3) c",
        table(&ReadSchema::live(), "read_models")
    );
    let mut bound_params: Vec<Box<dyn ToSql + Sync + Send>> =
        vec![Box::new(page.kind.as_str()), Box::new(page.parent.to_string()), Box::new(bound.saturating_add(1).min(i64::MAX as u64) as i64)];
    bound_params.extend(params.into_iter().map(param));
    let client = pg.pool().get().await?;
    let refs: Vec<&(dyn ToSql + Sync)> = bound_params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect();
    let n: i64 = client.query_one(&sql, &refs).await?.get(0);
    Ok(n as u64)
}

/// Instances naming `id` in one of `refs`: one containment per reference, so each is a GIN
/// lookup on the data, not a scan of the class. The matches are gathered first
/// (`MATERIALIZED`) and ordered after: given `ORDER BY key LIMIT n`, the planner would walk
/// the key index and test every row of the class instead (seen: 52 ms for 10 links among
/// 100,000 rows, against under 1 ms).
pub(super) async fn referencing(pg: &Pg, refs: &[Reference], id: &str, after: Option<&str>, limit: usize) -> Result<Snapshot, DbError> {
    let schema = ReadSchema::live();
    let mut b = Binder::new(3, '$');
    let any: Vec<String> = refs
        .iter()
        .map(|r| {
            let parent = b.bind(Param::Text(r.parent.clone()));
            let value = if r.many { json!([id]) } else { json!(id) };
            let doc = b.bind(Param::Json(json!({ r.property.clone(): value })));
            format!("(parent = {parent} AND (state -> 'data') @> {doc}::jsonb)")
        })
        .collect();
    let any = if any.is_empty() { vec!["1 = 0".to_string()] } else { any };
    let rows = format!(
        "WITH m AS MATERIALIZED (SELECT {COLUMNS} FROM {} WHERE kind = 'instance' AND NOT deleted AND key > $1 AND ({})) \
         SELECT * FROM m ORDER BY key LIMIT $2",
        table(&schema, "read_models"),
        any.join(" OR ")
    );
    let mut bound: Vec<Box<dyn ToSql + Sync + Send>> = vec![Box::new(after.unwrap_or("").to_string()), Box::new(limit as i64)];
    bound.extend(b.into_params().into_iter().map(param));
    rows_at(pg, &with_position(&schema, &rows), bound).await
}

/// A page in a `sort=` order: the sort expressions are selected as `s0`, `s1`, ... so the
/// outer statement (which adds the position) keeps the order.
async fn sorted_page(pg: &Pg, page: &Page<'_>) -> Result<Snapshot, DbError> {
    let schema = ReadSchema::live();
    let mut b = Binder::new(4, '$');
    let filter = render_into(page.filter, &mut b, clause);
    let exprs: Vec<String> = page.sort.keys.iter().map(|k| sort_expr(k, &mut b)).collect();
    let (after, start) = match page.after {
        Some(key) => (
            format!(" AND {}", sort::after(page.sort, &exprs, page.after_values, key, &DIALECT, &mut b)),
            sort::start(page.sort, &exprs, page.after_values, &DIALECT, &mut b),
        ),
        None => (String::new(), Start::Anywhere),
    };
    let selected: String = exprs.iter().enumerate().map(|(i, e)| format!(", {e} AS s{i}")).collect();
    let part = |bound: &str| {
        format!(
            "SELECT {COLUMNS}{selected} FROM {} WHERE kind = $1 AND parent = $2 AND NOT deleted{bound}{after}{filter} ORDER BY {} LIMIT $3",
            table(&schema, "read_models"),
            sort::order_by(page.sort, &exprs, "key"),
        )
    };
    // With a bound on the first key, an index of its expression starts the scan at the cursor
    // (a deep page costs what the first does); split, each range is one such scan.
    let rows = match start {
        Start::Anywhere => part(""),
        Start::At(bound) => part(&format!(" AND {bound}")),
        Start::Split { values, nulls } => {
            let names: Vec<String> = (0..exprs.len()).map(|i| format!("u.s{i}")).collect();
            format!(
                "SELECT * FROM (({}) UNION ALL ({})) u ORDER BY {} LIMIT $3",
                part(&format!(" AND {values}")),
                part(&format!(" AND {nulls}")),
                sort::order_by(page.sort, &names, "u.key"),
            )
        }
    };
    let outer: Vec<String> = (0..exprs.len()).map(|i| format!("r.s{i}")).collect();
    let sql = format!(
        "SELECT p.position, r.* FROM {} p LEFT JOIN LATERAL ({rows}) r ON true WHERE p.id = 1 ORDER BY {}",
        table(&schema, "projection"),
        sort::order_by(page.sort, &outer, "r.key"),
    );
    let mut bound: Vec<Box<dyn ToSql + Sync + Send>> =
        vec![Box::new(page.kind.as_str()), Box::new(page.parent.to_string()), Box::new(page.limit as i64)];
    bound.extend(b.into_params().into_iter().map(param));
    rows_at(pg, &sql, bound).await
}

/// A page in relevance order. The candidates are the first `max_ranked` matches the scan
/// finds (one more is read only to tell whether there are more), each with its rank
/// (`MATERIALIZED`: ranked once, read by the page and the count); the page is the best of
/// them after the cursor. Ranking every match would read every matching row: a word in 11 %
/// of a million rows cost 200 ms.
async fn ranked_page(pg: &Pg, page: &Page<'_>) -> Result<Snapshot, DbError> {
    let schema = ReadSchema::live();
    let mut b = Binder::new(5, '$');
    let sort::Ranked { filter, rank, after, order, outer } = sort::ranked(page, &mut b, clause, sort_expr, &DIALECT);
    let sql = format!(
        "WITH c AS MATERIALIZED (SELECT {COLUMNS}, {rank} AS s0, row_number() OVER () AS nth FROM {} \
         WHERE kind = $1 AND parent = $2 AND NOT deleted{filter} LIMIT $4::int8 + 1) \
         SELECT p.position, r.*, (SELECT count(*) FROM c) > $4::int8 AS partial FROM {} p LEFT JOIN LATERAL \
         (SELECT * FROM c WHERE nth <= $4::int8{after} ORDER BY {order} LIMIT $3) r ON true WHERE p.id = 1 ORDER BY {outer}",
        table(&schema, "read_models"),
        table(&schema, "projection"),
    );
    let mut bound: Vec<Box<dyn ToSql + Sync + Send>> = vec![
        Box::new(page.kind.as_str()),
        Box::new(page.parent.to_string()),
        Box::new(page.limit as i64),
        Box::new(page.max_ranked.min(i64::MAX as u64 - 1) as i64),
    ];
    bound.extend(b.into_params().into_iter().map(param));
    // The outer row is the position, the columns, s0, nth, then partial.
    let found = query(pg, &sql, bound).await?;
    let partial = found.first().map(|r| r.get::<_, bool>(13)).unwrap_or(false);
    Ok(Snapshot { rank_is_partial: partial, ..snapshot(&found, Some(11))? })
}

const DIALECT: sort::Dialect = sort::Dialect { value: sort_value, same: "IS NOT DISTINCT FROM" };

/// A sort key's typed value over the data: null when missing or of another type. The name is
/// an identifier ([`sort::Sort::parse`] checks), spelled inline so a plan can use an index.
fn sort_expr(k: &SortKey, b: &mut Binder) -> String {
    match &k.rank {
        Some(search) => rank(search, b),
        None => typed(&k.property, k.ty),
    }
}

/// A property's value as SQL of its type (numeric, text in byte order, boolean, a UTC
/// timestamp for a datetime: `spiced_instant`, migration 0011), null when
/// missing or of another type: the expression of sorts, of filters on `indexed` properties
/// and of their indexes (`read::ensure_indexes`), spelled the same in all three so the planner
/// matches them. `property` must be an identifier (class definitions and [`sort::Sort::parse`]
/// check).
pub(super) fn typed(property: &str, ty: ValueType) -> String {
    let x = format!("(state -> 'data' -> '{property}')");
    let (json_type, cast) = match ty {
        ValueType::Number => ("number", "::numeric"),
        ValueType::Bool => ("boolean", "::boolean"),
        ValueType::Text | ValueType::Json => ("string", ""),
        ValueType::Instant => return format!("(CASE WHEN jsonb_typeof({x}) = 'string' THEN spiced_instant({x} #>> '{{}}') END)"),
    };
    let collate = if ty == ValueType::Text { " COLLATE \"C\"" } else { "" };
    format!("(CASE WHEN jsonb_typeof({x}) = '{json_type}' THEN ({x} #>> '{{}}'){cast} END){collate}")
}

fn sort_value(k: &SortKey, v: &Value, b: &mut Binder) -> String {
    typed_value(k.ty, v, b)
}

/// A bound value as SQL of type `ty`, to compare with [`typed`].
fn typed_value(ty: ValueType, v: &Value, b: &mut Binder) -> String {
    let text = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let cast = match ty {
        ValueType::Number => "numeric",
        ValueType::Bool => "boolean",
        ValueType::Text | ValueType::Json => "text",
        ValueType::Instant => return format!("spiced_instant({}::text)", b.bind(Param::Text(text))),
    };
    // Bound as text and cast in SQL: the client would otherwise type the parameter as the
    // cast's type, and a String does not encode as numeric.
    format!("({}::text)::{cast}", b.bind(Param::Text(text)))
}

async fn rows_at(pg: &Pg, sql: &str, params: Vec<Box<dyn ToSql + Sync + Send>>) -> Result<Snapshot, DbError> {
    snapshot(&query(pg, sql, params).await?, None)
}

async fn query(pg: &Pg, sql: &str, params: Vec<Box<dyn ToSql + Sync + Send>>) -> Result<Vec<tokio_postgres::Row>, DbError> {
    let client = pg.pool().get().await?;
    let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect();
    Ok(client.query(sql, &refs).await?)
}

/// The position (the first column) and the rows of a [`with_position`] result, with each
/// row's rank read from column `rank` when there is one.
fn snapshot(found: &[tokio_postgres::Row], rank: Option<usize>) -> Result<Snapshot, DbError> {
    let position = found.first().map(|r| r.get::<_, i64>(0) as u64).unwrap_or(0);
    // With no matching row, the one result row has the position and NULLs.
    let found: Vec<&tokio_postgres::Row> = found.iter().filter(|r| r.get::<_, Option<&str>>(1).is_some()).collect();
    let rows = found.iter().map(|r| row(r)).collect::<Result<_, _>>()?;
    let ranks = match rank {
        Some(column) => found.iter().map(|r| r.get::<_, Option<f64>>(column).unwrap_or(0.0)).collect(),
        None => Vec::new(),
    };
    Ok(Snapshot { position, rows, ranks, rank_is_partial: false })
}

/// Wraps a row query so that one statement (one snapshot) also returns the position, even
/// when no row matches.
fn with_position(schema: &ReadSchema, rows_sql: &str) -> String {
    format!(
        "SELECT p.position, r.* FROM {} p LEFT JOIN LATERAL ({rows_sql}) r ON true WHERE p.id = 1 ORDER BY r.key",
        table(schema, "projection")
    )
}

fn param(p: Param) -> Box<dyn ToSql + Sync + Send> {
    match p {
        Param::Text(s) => Box::new(s),
        Param::Json(v) => Box::new(v),
        Param::Number(n) => Box::new(n),
    }
}

fn row(r: &tokio_postgres::Row) -> Result<ReadRow, DbError> {
    Ok(ReadRow {
        kind: kind_of(r.get(1))?,
        key: r.get(2),
        parent: r.get(3),
        db: r.get(4),
        state: r.get(5),
        version: r.get::<_, i64>(6) as u64,
        position: r.get::<_, i64>(7) as u64,
        deleted: r.get(8),
        created_at: r.get(9),
        updated_at: r.get(10),
    })
}

fn pg_type(ty: ValueType) -> &'static str {
    match ty {
        ValueType::Number => "number",
        ValueType::Text | ValueType::Instant => "string",
        ValueType::Bool => "boolean",
        ValueType::Json => "object",
    }
}

/// The data's strings as a text search document in configuration `config`: the stored column
/// `read::ddl` adds (`jsonb_to_tsvector` of the data) and the GIN index over it.
pub(super) fn search_document(config: &str) -> String {
    format!("search_{config}")
}

/// `q=` as a `tsquery`: every term, each parsed by the configuration as PostgreSQL parses a
/// document (so `english` stems the query as it stemmed the data).
fn search(s: &Search, b: &mut Binder) -> String {
    let (config, query) = tsquery(s, b);
    format!("{} @@ {query}", search_document(config))
}

/// How well a row matches `s`: `ts_rank` of the same document and query (a real, as float8).
fn rank(s: &Search, b: &mut Binder) -> String {
    let (config, query) = tsquery(s, b);
    format!("ts_rank({}, {query})::float8", search_document(config))
}

/// The configuration and the `tsquery` of `s`.
fn tsquery<'a>(s: &'a Search, b: &mut Binder) -> (&'a str, String) {
    // Checked when the configuration was loaded; the fallback only keeps SQL well-formed.
    let config = if valid_config_name(&s.config) { s.config.as_str() } else { "simple" };
    let terms: Vec<String> = s
        .terms
        .iter()
        .map(|t| match t {
            Term::Word(w) => format!("plainto_tsquery('{config}'::regconfig, {}::text)", b.bind(Param::Text(w.clone()))),
            Term::Phrase(p) => format!("phraseto_tsquery('{config}'::regconfig, {}::text)", b.bind(Param::Text(p.clone()))),
            Term::Prefix(p) => {
                // A quoted lexeme with `:*`; quotes and backslashes inside are escaped.
                let lexeme = format!("'{}':*", p.replace('\\', "\\\\").replace('\'', "''"));
                format!("to_tsquery('{config}'::regconfig, {}::text)", b.bind(Param::Text(lexeme)))
            }
        })
        .collect();
    (config, format!("({})", terms.join(" && ")))
}

fn clause(c: &Condition, b: &mut Binder) -> String {
    if let Test::Search(s) = &c.test {
        return search(s, b);
    }
    // A datetime compares as an instant, so never by its text in the GIN index.
    if c.indexed || c.ty == ValueType::Instant {
        if let Some(sql) = indexed_clause(c, b) {
            return sql;
        }
    }
    // Containment, so the GIN index on the data serves equality and `in`.
    let doc = |v: &Value| json!({ c.property.clone(): v });
    match &c.test {
        Test::Cmp(CmpOp::Eq, v) => {
            let d = b.bind(Param::Json(doc(v)));
            return format!("(state -> 'data') @> {d}::jsonb");
        }
        Test::In(values) => return any_of(values, &doc, b),
        _ => {}
    }
    let name = b.bind(Param::Text(c.property.clone()));
    let x = format!("(state -> 'data' -> {name}::text)");
    let typed = format!("jsonb_typeof({x}) = '{}'", pg_type(c.ty));
    match &c.test {
        Test::Cmp(CmpOp::Eq, _) | Test::In(_) | Test::Search(_) => unreachable!("answered above"),
        Test::NotIn(values) => format!("{typed} AND NOT {}", any_of(values, &doc, b)),
        Test::Like { pattern, case_insensitive } => {
            let op = if *case_insensitive { "ILIKE" } else { "LIKE" };
            let p = b.bind(Param::Text(like_pattern(pattern)));
            format!("{typed} AND ({x} #>> '{{}}') {op} {p}::text ESCAPE '\\'")
        }
        Test::Exists(present) => {
            let op = if *present { "<>" } else { "=" };
            format!("coalesce(jsonb_typeof({x}), 'null') {op} 'null'")
        }
        Test::Cmp(op, v) if c.ty == ValueType::Text => {
            let v = b.bind(Param::Text(v.as_str().unwrap_or_default().to_string()));
            format!("{typed} AND ({x} #>> '{{}}') COLLATE \"C\" {} {v}::text", op.sql())
        }
        Test::Cmp(op, v) => {
            let v = b.bind(Param::Json(v.clone()));
            format!("{typed} AND {x} {} {v}::jsonb", op.sql())
        }
    }
}

/// A condition as a test of its typed expression: on an `indexed` property its btree index
/// serves it (comparisons, `in`, `not_in` and `like` prefixes), the same rows as the other
/// spelling, since both match only values of the property's type; a datetime is always
/// tested so, as an instant. `None` for the tests the expression cannot serve.
fn indexed_clause(c: &Condition, b: &mut Binder) -> Option<String> {
    let e = typed(&c.property, c.ty);
    let list = |values: &[Value], b: &mut Binder| values.iter().map(|v| typed_value(c.ty, v, b)).collect::<Vec<_>>().join(", ");
    Some(match &c.test {
        Test::Cmp(op, v) => format!("{e} {} {}", op.sql(), typed_value(c.ty, v, b)),
        Test::In(values) => format!("{e} IN ({})", list(values, b)),
        Test::NotIn(values) => format!("{e} NOT IN ({})", list(values, b)),
        Test::Like { pattern, case_insensitive: false } if c.ty == ValueType::Text => {
            format!("{e} LIKE {}::text ESCAPE '\\'", b.bind(Param::Text(like_pattern(pattern))))
        }
        // A datetime's `like` is on its text.
        Test::Like { .. } | Test::Exists(_) | Test::Search(_) => return None,
    })
}

/// One containment per value, OR-ed: each is a GIN index scan (`@> ANY(…)` is not).
fn any_of(values: &[Value], doc: &dyn Fn(&Value) -> Value, b: &mut Binder) -> String {
    let any: Vec<String> = values
        .iter()
        .map(|v| format!("(state -> 'data') @> {}::jsonb", b.bind(Param::Json(doc(v)))))
        .collect();
    format!("({})", any.join(" OR "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::read::filter::parse;
    use std::collections::HashMap;

    #[test]
    fn an_or_of_indexed_equalities_is_split_into_one_filter_per_alternative() {
        let props: HashMap<String, String> = [("age", "integer"), ("name", "string")].map(|(k, v)| (k.to_string(), v.to_string())).into();
        let mut groups = parse("(age=1|name=a),age>3", &props).unwrap();
        assert!(split_or(&groups).is_none(), "not indexed: one query");
        groups.iter_mut().flatten().for_each(|c| c.indexed = true);
        let branches = split_or(&groups).unwrap();
        let names: Vec<Vec<(&str, usize)>> = branches.iter().map(|b| b.iter().map(|g| (g[0].property.as_str(), g.len())).collect()).collect();
        assert_eq!(names, [vec![("age", 1), ("age", 1)], vec![("age", 1), ("name", 1)]], "each keeps the other group");
        let ranges = parse("(age>1|name=a)", &props).unwrap().into_iter().map(|g| g.into_iter().map(|c| Condition { indexed: true, ..c }).collect()).collect::<Vec<Group>>();
        assert!(split_or(&ranges).is_none(), "a range is not read in key order");
    }

    #[test]
    fn filters_render_as_containment_with_numbered_parameters() {
        let props: HashMap<String, String> = [("age", "integer"), ("name", "string")].map(|(k, v)| (k.to_string(), v.to_string())).into();
        let (sql, params) = render(&parse("age>3,name=in:(a|b)", &props).unwrap(), 5, '$', clause);
        assert!(sql.contains("$5::text") && sql.contains("> $6::jsonb") && sql.contains("@> $7::jsonb OR (state -> 'data') @> $8::jsonb)"), "{sql}");
        assert!(sql.starts_with(" AND ((jsonb_typeof"), "each group is parenthesised: {sql}");
        assert_eq!(params.len(), 4);
    }

    #[test]
    fn filters_on_indexed_properties_test_the_index_expression() {
        let props: HashMap<String, String> = [("age", "integer"), ("name", "string")].map(|(k, v)| (k.to_string(), v.to_string())).into();
        let mut groups = parse("age=in:(1|2),name=like:ab*,name=ilike:x", &props).unwrap();
        groups.iter_mut().flatten().for_each(|c| c.indexed = true);
        let (sql, _) = render(&groups, 1, '$', clause);
        let (age, name) = (typed("age", ValueType::Number), typed("name", ValueType::Text));
        assert!(sql.contains(&format!("{age} IN (($1::text)::numeric, ($2::text)::numeric)")), "{sql}");
        assert!(sql.contains(&format!("{name} LIKE $3::text")), "{sql}");
        assert!(sql.contains("ILIKE"), "ilike is no btree range and keeps its spelling: {sql}");
    }
}
