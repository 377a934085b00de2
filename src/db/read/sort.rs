//! `sort=` on instance pages: up to [`MAX_SORT_KEYS`] properties, each ascending or (`-prop`)
//! descending, typed by the class (numbers as numbers, strings and dates in byte order,
//! booleans false first), then the instance id, so the order is total. A row whose value is
//! missing or of another type sorts as if its value were above every other: last ascending,
//! first descending.
//!
//! Sorted pages are keyset pages too: the cursor carries the last row's sort values and id,
//! and the next page starts strictly after them, so a deep page costs what the first does and
//! a row inserted meanwhile never makes another appear twice or vanish.

use super::filter::{render_into, Binder, Condition, Param, ValueType};
use serde_json::{json, Value};
use std::collections::HashMap;

/// Most keys in one `sort=`.
pub const MAX_SORT_KEYS: usize = 4;

/// One key of a sort.
#[derive(Debug, Clone, PartialEq)]
pub struct SortKey {
    pub property: String,
    pub ty: ValueType,
    pub descending: bool,
    /// Not a property: how well the row matches this search (a number, higher is better; the
    /// read store computes it, so a page's rows carry it in [`super::Snapshot::ranks`]).
    pub rank: Option<super::search::Search>,
}

/// A parsed `sort=`: the property keys, then the id's direction (ascending unless `-id` ended
/// the list).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sort {
    pub keys: Vec<SortKey>,
    pub id_descending: bool,
}

/// Key order: what a page without `sort=` has.
pub static BY_ID: Sort = Sort { keys: Vec::new(), id_descending: false };

/// Why a `sort=` was refused: a 400 `invalid_sort`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSort(pub String);

impl Sort {
    /// Parses `price,-name,id` against the class's properties (name -> declared type).
    pub fn parse(text: &str, properties: &HashMap<String, String>) -> Result<Sort, InvalidSort> {
        let mut sort = Sort::default();
        let parts: Vec<&str> = text.split(',').collect();
        for (i, part) in parts.iter().enumerate() {
            let (descending, name) = match part.strip_prefix('-') {
                Some(name) => (true, name),
                None => (false, *part),
            };
            if !is_identifier(name) {
                // Property names are identifiers; the sort expressions spell them inline.
                return Err(InvalidSort(format!("{name:?} is not a property of this class (sort takes prop, -prop and id)")));
            }
            if name == "id" {
                if i + 1 != parts.len() {
                    return Err(InvalidSort("id must be the last sort key: it already breaks every tie".into()));
                }
                sort.id_descending = descending;
                break;
            }
            let declared = properties
                .get(name)
                .ok_or_else(|| InvalidSort(format!("{name:?} is not a property of this class (sort takes prop, -prop and id)")))?;
            let ty = ValueType::of_property(declared);
            if ty == ValueType::Json {
                return Err(InvalidSort(format!("{name}: {declared} properties have no order")));
            }
            if sort.keys.iter().any(|k| k.property == name) {
                return Err(InvalidSort(format!("{name} is named twice")));
            }
            sort.keys.push(SortKey { property: name.to_string(), ty, descending, rank: None });
        }
        if sort.keys.len() > MAX_SORT_KEYS {
            return Err(InvalidSort(format!("at most {MAX_SORT_KEYS} sort properties")));
        }
        Ok(sort)
    }

    pub fn is_by_id(&self) -> bool {
        self.keys.is_empty() && !self.id_descending
    }

    /// Relevance order for a search: best match first, then the id.
    pub fn relevance(search: super::search::Search) -> Sort {
        let rank = SortKey { property: String::new(), ty: ValueType::Number, descending: true, rank: Some(search) };
        Sort { keys: vec![rank], id_descending: false }
    }

    /// Where a page's rows carry the rank a sort key orders by, if one does.
    pub fn rank_key(&self) -> Option<usize> {
        self.keys.iter().position(|k| k.rank.is_some())
    }

    /// A row's sort values, as the SQL sees them: the property's value when it is of the
    /// key's type, else null.
    /// (A rank is the read store's to say: null here, see [`Sort::rank_key`].)
    pub fn values_of(&self, state: Option<&Value>) -> Vec<Value> {
        self.keys
            .iter()
            .map(|k| {
                if k.rank.is_some() {
                    return Value::Null;
                }
                let v = state.map(|s| &s["data"][&k.property]).unwrap_or(&Value::Null);
                if k.ty.holds(v) {
                    v.clone()
                } else {
                    Value::Null
                }
            })
            .collect()
    }
}

/// Letters, digits and `_` only: a property name the read stores may spell inline in SQL (the
/// typed expressions of sorts and indexes, which a plan matches only when written out).
pub fn is_identifier(name: &str) -> bool {
    name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// The pieces of a relevance page's statement, over its candidates' rank column `s0`.
pub struct Ranked {
    /// The page's filter (each condition `AND`-ed, with a leading ` AND `).
    pub filter: String,
    /// The rank of a row.
    pub rank: String,
    /// The rows after the cursor (with a leading ` AND `), or nothing on a first page.
    pub after: String,
    /// Best first, ties by id: over `s0` and `key`, and over the outer row `r`.
    pub order: String,
    pub outer: String,
}

/// [`Ranked`] for `page` (whose sort is a relevance sort), bound in `b` with a backend's
/// condition and sort-expression spelling.
pub fn ranked(
    page: &super::Page<'_>,
    b: &mut Binder,
    clause: fn(&Condition, &mut Binder) -> String,
    expr: fn(&SortKey, &mut Binder) -> String,
    dialect: &Dialect,
) -> Ranked {
    let filter = render_into(page.filter, b, clause);
    let rank = expr(&page.sort.keys[0], b);
    let s0 = ["s0".to_string()];
    let after = match page.after {
        Some(key) => format!(" AND {}", after(page.sort, &s0, page.after_values, key, dialect, b)),
        None => String::new(),
    };
    let order = order_by(page.sort, &s0, "key");
    let outer = order_by(page.sort, &["r.s0".to_string()], "r.key");
    Ranked { filter, rank, after, order, outer }
}

/// How a backend spells the values of a sorted keyset query (each backend spells the sort
/// expressions themselves).
pub struct Dialect {
    /// A bound value of a key's type, cast as the key's sort expression is.
    pub value: fn(&SortKey, &Value, &mut Binder) -> String,
    /// Null-safe equality: `IS NOT DISTINCT FROM` or `IS`.
    pub same: &'static str,
}

/// The `ORDER BY` list: each key (nulls as the largest value), then the key column.
pub fn order_by(sort: &Sort, exprs: &[String], key_column: &str) -> String {
    let mut order: Vec<String> = sort
        .keys
        .iter()
        .zip(exprs)
        .map(|(k, e)| if k.descending { format!("{e} DESC NULLS FIRST") } else { format!("{e} ASC NULLS LAST") })
        .collect();
    order.push(format!("{key_column} {}", if sort.id_descending { "DESC" } else { "ASC" }));
    order.join(", ")
}

/// The rows strictly after the cursor row (`values`, `key`) in the sort's order: for some
/// key i, every earlier key equal and key i after; or every key equal and the id after.
pub fn after(sort: &Sort, exprs: &[String], values: &[Value], key: &str, dialect: &Dialect, b: &mut Binder) -> String {
    let mut alternatives = Vec::new();
    let mut equal: Vec<String> = Vec::new();
    for ((k, e), v) in sort.keys.iter().zip(exprs).zip(values) {
        if let Some(later) = later(k, e, v, dialect, b) {
            alternatives.push(conjunction(&equal, &later));
        }
        let same = if v.is_null() { format!("{e} IS NULL") } else { format!("{e} {} {}", dialect.same, (dialect.value)(k, v, b)) };
        equal.push(same);
    }
    let op = if sort.id_descending { "<" } else { ">" };
    let key = b.bind(Param::Text(key.to_string()));
    alternatives.push(conjunction(&equal, &format!("key {op} {key}")));
    format!("({})", alternatives.join(" OR "))
}

/// Where the rows after the cursor start in the first key's order, as conditions an index of
/// the first key's expression can start a scan at. Each is implied by [`after`] (so adding it
/// changes no result); [`after`] itself, an OR, is no index condition.
#[derive(Debug, Clone, PartialEq)]
pub enum Start {
    /// No such bound (a descending key after a null: every row may follow).
    Anywhere,
    /// One condition.
    At(String),
    /// Two disjoint ranges whose union holds every row after the cursor: non-null values from
    /// the cursor's on, then the nulls (which sort last ascending).
    Split { values: String, nulls: String },
}

pub fn start(sort: &Sort, exprs: &[String], values: &[Value], dialect: &Dialect, b: &mut Binder) -> Start {
    let (Some(k), Some(e), Some(v)) = (sort.keys.first(), exprs.first(), values.first()) else { return Start::Anywhere };
    match (k.descending, v.is_null()) {
        (true, true) => Start::Anywhere,
        (true, false) => Start::At(format!("{e} <= {}", (dialect.value)(k, v, b))),
        (false, true) => Start::At(format!("{e} IS NULL")),
        (false, false) => Start::Split { values: format!("{e} >= {}", (dialect.value)(k, v, b)), nulls: format!("{e} IS NULL") },
    }
}

fn conjunction(equal: &[String], last: &str) -> String {
    let mut all = equal.to_vec();
    all.push(last.to_string());
    format!("({})", all.join(" AND "))
}

/// Rows whose key `k` comes after `v`, nulls being the largest value; `None` when none can
/// (ascending after a null).
fn later(k: &SortKey, e: &str, v: &Value, dialect: &Dialect, b: &mut Binder) -> Option<String> {
    match (k.descending, v.is_null()) {
        (false, true) => None,
        (false, false) => Some(format!("({e} > {} OR {e} IS NULL)", (dialect.value)(k, v, b))),
        (true, true) => Some(format!("{e} IS NOT NULL")),
        (true, false) => Some(format!("{e} < {}", (dialect.value)(k, v, b))),
    }
}

/// A sorted page's cursor: `s.` then the URL-safe base64 of `{"sort", "values", "key"}`, so a
/// cursor is refused under another sort and never parsed as an id.
pub fn encode_cursor(sort_text: &str, values: &[Value], key: &str) -> String {
    use base64::Engine;
    let body = json!({"sort": sort_text, "values": values, "key": key}).to_string();
    format!("s.{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(body))
}

/// The values and key of a sorted cursor, checked against the sort it must come from.
pub fn decode_cursor(cursor: &str, sort_text: &str, sort: &Sort) -> Result<(Vec<Value>, String), InvalidSort> {
    use base64::Engine;
    let bad = || InvalidSort("cursor is not a next_cursor of this sort".into());
    let encoded = cursor.strip_prefix("s.").ok_or_else(bad)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(encoded).map_err(|_| bad())?;
    let body: Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    if body["sort"] != sort_text {
        return Err(bad());
    }
    let values = body["values"].as_array().filter(|v| v.len() == sort.keys.len()).ok_or_else(bad)?.clone();
    let key = body["key"].as_str().ok_or_else(bad)?.to_string();
    // A NUL cannot be bound (PostgreSQL): a 400 here, not a failed query.
    let typed = values
        .iter()
        .zip(&sort.keys)
        .all(|(v, k)| v.is_null() || (k.ty.holds(v) && !v.as_str().is_some_and(|s| s.contains('\0'))));
    if !typed || key.contains('\0') {
        return Err(bad());
    }
    Ok((values, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props() -> HashMap<String, String> {
        [("price", "number"), ("name", "string"), ("ok", "boolean"), ("meta", "json")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn sorts_parse_with_directions_and_an_optional_final_id() {
        let s = Sort::parse("-price,name,-id", &props()).unwrap();
        assert_eq!(s.keys.iter().map(|k| (k.property.as_str(), k.descending)).collect::<Vec<_>>(), [("price", true), ("name", false)]);
        assert!(s.id_descending);
        assert!(Sort::parse("id", &props()).unwrap().is_by_id());
        for (bad, says) in [("nope", "not a property"), ("meta", "no order"), ("id,price", "last sort key"), ("price,price", "twice"), ("", "not a property")] {
            let err = Sort::parse(bad, &props()).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn cursors_round_trip_and_refuse_another_sort() {
        let sort = Sort::parse("-price,name", &props()).unwrap();
        let c = encode_cursor("-price,name", &[json!(2.5), Value::Null], "d:main:C:x");
        assert_eq!(decode_cursor(&c, "-price,name", &sort).unwrap(), (vec![json!(2.5), Value::Null], "d:main:C:x".to_string()));
        assert!(decode_cursor(&c, "price,name", &sort).is_err());
        assert!(decode_cursor("d:main:C:x", "-price,name", &sort).is_err());
        let wrong_type = encode_cursor("-price,name", &[json!("x"), Value::Null], "k");
        assert!(decode_cursor(&wrong_type, "-price,name", &sort).is_err());
    }

    #[test]
    fn values_are_null_unless_of_the_keys_type() {
        let sort = Sort::parse("price,name", &props()).unwrap();
        let state = json!({"data": {"price": "cheap", "name": "a"}});
        assert_eq!(sort.values_of(Some(&state)), [Value::Null, json!("a")]);
    }
}
