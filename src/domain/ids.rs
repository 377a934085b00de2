//! Aggregate ids and their validation.
//!
//! Ids are built from user-supplied names joined by `:`, so a name may not contain `:` (it would
//! let two different (db, class) pairs share an id) nor `/` (it would change the structure of any
//! key or URL it is placed in). Names are checked once, here, before anything is appended.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The longest name accepted for a database, branch, class or instance.
pub const MAX_NAME_LEN: usize = 128;

/// A name (database, branch, class or instance id): 1 to 128 characters of `[A-Za-z0-9_.-]`,
/// starting with a letter or digit.
#[derive(utoipa::ToSchema)]
#[schema(pattern = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")]
pub struct Name(pub String);

/// An aggregate id or a row key: 1 to 4 names joined by `:`, `{db}`, `{db}:{branch}:{class_id}`
/// or `{db}:{branch}:{class_id}:{instance_id}`.
#[derive(utoipa::ToSchema)]
#[schema(pattern = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}(:[A-Za-z0-9][A-Za-z0-9_.-]{0,127}){0,3}$")]
pub struct Key(pub String);

/// The kinds of aggregate; each has its own sequence per id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
pub enum AggregateType {
    Database,
    OntologyClass,
    Instance,
}

impl AggregateType {
    pub fn as_str(self) -> &'static str {
        match self {
            AggregateType::Database => "Database",
            AggregateType::OntologyClass => "OntologyClass",
            AggregateType::Instance => "Instance",
        }
    }

    pub fn parse(s: &str) -> Option<AggregateType> {
        match s {
            "Database" => Some(AggregateType::Database),
            "OntologyClass" => Some(AggregateType::OntologyClass),
            "Instance" => Some(AggregateType::Instance),
            _ => None,
        }
    }
}

impl fmt::Display for AggregateType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An aggregate's identity: its type and id. Sequences are counted per key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AggregateKey {
    pub aggregate_type: AggregateType,
    pub aggregate_id: String,
}

impl AggregateKey {
    pub fn database(db: &str) -> Self {
        Self::new(AggregateType::Database, db.to_string())
    }

    pub fn class(db: &str, branch: &str, class_id: &str) -> Self {
        Self::new(AggregateType::OntologyClass, format!("{db}:{branch}:{class_id}"))
    }

    pub fn instance(db: &str, branch: &str, class_id: &str, instance_id: &str) -> Self {
        Self::new(
            AggregateType::Instance,
            format!("{db}:{branch}:{class_id}:{instance_id}"),
        )
    }

    pub fn new(aggregate_type: AggregateType, aggregate_id: String) -> Self {
        Self { aggregate_type, aggregate_id }
    }

    /// Checks an id given from outside (e.g. the aggregate read API): the right number of
    /// `:`-separated parts for its type, each a valid name.
    pub fn parse(aggregate_type: &str, aggregate_id: &str) -> Result<Self, IdError> {
        let ty = AggregateType::parse(aggregate_type).ok_or_else(|| IdError {
            field: "aggregate_type",
            reason: format!(
                "unknown aggregate type {aggregate_type:?} (expected Database, OntologyClass or Instance)"
            ),
        })?;
        let parts: Vec<&str> = aggregate_id.split(':').collect();
        let expected = match ty {
            AggregateType::Database => 1,
            AggregateType::OntologyClass => 3,
            AggregateType::Instance => 4,
        };
        if parts.len() != expected {
            return Err(IdError {
                field: "aggregate_id",
                reason: format!("a {ty} id has {expected} ':'-separated parts"),
            });
        }
        for part in parts {
            validate_name("aggregate_id", part)?;
        }
        Ok(Self::new(ty, aggregate_id.to_string()))
    }
}

impl fmt::Display for AggregateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.aggregate_type, self.aggregate_id)
    }
}

/// A name that failed validation, with the field it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct IdError {
    pub field: &'static str,
    pub reason: String,
}

/// Accepts 1 to [`MAX_NAME_LEN`] characters of `[A-Za-z0-9_.-]`, starting with a letter or digit.
pub fn validate_name(field: &'static str, value: &str) -> Result<(), IdError> {
    let fail = |reason: String| Err(IdError { field, reason });
    if value.is_empty() {
        return fail("must not be empty".into());
    }
    if value.len() > MAX_NAME_LEN {
        return fail(format!("longer than {MAX_NAME_LEN} characters"));
    }
    if !value.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return fail(format!("{value:?} must start with a letter or digit"));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return fail(format!("{value:?} contains {bad:?}; allowed are letters, digits, '_', '-' and '.'"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names() {
        for ok in ["db", "Product", "p-1", "a.b_c", "9lives"] {
            validate_name("x", ok).unwrap();
        }
    }

    #[test]
    fn rejects_separators_and_oddities() {
        let long = "a".repeat(MAX_NAME_LEN + 1);
        for bad in ["", "a/b", "a:b", "../x", ".hidden", "sp ace", "ü", "a%2Fb", long.as_str()] {
            assert!(validate_name("x", bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn builds_ids_in_the_reference_shape() {
        assert_eq!(AggregateKey::database("db").aggregate_id, "db");
        assert_eq!(AggregateKey::class("db", "main", "C").aggregate_id, "db:main:C");
        assert_eq!(AggregateKey::instance("db", "main", "C", "i").aggregate_id, "db:main:C:i");
    }

    #[test]
    fn parses_external_ids_by_type() {
        assert!(AggregateKey::parse("Instance", "db:main:C:i").is_ok());
        assert!(AggregateKey::parse("Instance", "db:main:C").is_err());
        assert!(AggregateKey::parse("Database", "a/b").is_err());
        assert!(AggregateKey::parse("Nope", "db").is_err());
    }
}
