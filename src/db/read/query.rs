//! What reading the read models returns: one row or a keyset page (optionally filtered),
//! always with the position it reflects.

use super::filter::Group;
use super::sort::Sort;
use super::ReadKind;
use super::ReadRow;
use crate::db::DbError;

/// The columns every row query selects, in [`ReadRow`]'s order.
pub(crate) const COLUMNS: &str = "kind, key, parent, db, state, version, position, deleted, created_at, updated_at";

/// Rows read together with the projection position they reflect (one snapshot).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Every outcome event at or below this log position is in `rows`' schema, but those the
    /// read store refused (recorded in `projection_failures`).
    pub position: u64,
    pub rows: Vec<ReadRow>,
    /// For a page in relevance order, each row's rank (as [`super::sort::Sort::rank_key`]
    /// orders by it); empty otherwise.
    pub ranks: Vec<f64>,
    /// For a page in relevance order: more rows matched than [`Page::max_ranked`], so the
    /// order is the best of the first that many found, not of every match.
    pub rank_is_partial: bool,
}

/// A keyset page: rows under `parent` after the row `after` (its key, and its sort values
/// when sorted), in the sort's order (key order by default).
#[derive(Debug, Clone)]
pub struct Page<'a> {
    pub kind: ReadKind,
    pub parent: &'a str,
    pub after: Option<&'a str>,
    pub limit: usize,
    pub filter: &'a [Group],
    pub sort: &'a Sort,
    /// The sort values of the row `after` names, one per sort key.
    pub after_values: &'a [serde_json::Value],
    /// In relevance order, the most matches ranked (the first the read store finds): ranking
    /// reads each one, so a broad word would cost a read of most of the class.
    pub max_ranked: u64,
}

/// A property of a class (`parent` is the class's key, the parent of its instances) that may
/// hold a reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub parent: String,
    pub property: String,
    /// The property holds an array of ids (`cardinality: many`), not one.
    pub many: bool,
}

/// A stored kind, read back.
pub(crate) fn kind_of(s: &str) -> Result<ReadKind, DbError> {
    match s {
        "database" => Ok(ReadKind::Database),
        "class" => Ok(ReadKind::Class),
        "instance" => Ok(ReadKind::Instance),
        other => Err(DbError::Inconsistent(format!("read model row of unknown kind {other:?}"))),
    }
}
