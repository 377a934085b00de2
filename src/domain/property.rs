//! A class's property definitions as stored in its state: [`PropertyDef`], its type parsed
//! ([`Kind`]), its limits and its compiled pattern. [`super::schema`] checks a definition when a
//! class command is submitted; [`super::values`] checks instance data against it.

use super::text::Text;
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use utoipa::ToSchema;

/// A property of an ontology class (or of an `object` property).
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PropertyDef {
    #[schema(pattern = "^[A-Za-z_][A-Za-z0-9_]{0,127}$")]
    pub name: String,
    /// `string`, `integer`, `number`, `boolean`, `datetime` (RFC 3339), `date` (`YYYY-MM-DD`),
    /// `decimal` (exact, a string such as `"-12.50"`), `uuid`, `email`, `url` (http or https),
    /// `json`, `enum` (one of `values`), `object` (with its own `properties`), `array<T>` for a
    /// scalar `T` other than `json`, or `ref:<ClassId>`.
    #[serde(rename = "type")]
    #[schema(pattern = "^(string|integer|number|boolean|datetime|date|decimal|uuid|email|url|json|enum|object|array<[a-z]+>|ref:[A-Za-z0-9][A-Za-z0-9_.-]{0,127})$")]
    pub ty: String,
    #[serde(default)]
    pub required: bool,
    /// A string, or text by language tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<Text>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<Text>,
    /// `enum` only: the allowed strings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<String>>,
    /// `object` only: the nested properties (at most [`MAX_DEPTH`] levels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(no_recursion)]
    pub properties: Option<Vec<PropertyDef>>,
    /// Smallest allowed value: a number for `integer` and `number`, a date or datetime string
    /// for `date` and `datetime`. For an array, of each item.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<Value>,
    /// Largest allowed value, as `min`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<Value>,
    /// Fewest characters of a string-shaped value, or items of an array.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_length: Option<u64>,
    /// Most characters of a string-shaped value, or items of an array.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<u64>,
    /// `string` (or `array<string>`) only: a regular expression the whole value must match
    /// (Rust `regex` syntax: no look-around or back-references, so matching is linear).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    /// The value a created instance gets when its data leaves the property out; must itself
    /// satisfy the property.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<Value>,
    /// `ref:<ClassId>` only: `one` (default, an id) or `many` (an array of ids).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cardinality: Option<Cardinality>,
    /// A top-level scalar, `enum` or single `ref` property only: no two live instances of the
    /// class hold the same value (checked by the worker as of the command's place in the log).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unique: bool,
    /// A top-level scalar (not `json`), `enum` or single `ref` property only: PostgreSQL keeps
    /// an index of the property's values, so filters, sorts and `like:` prefixes on it are
    /// index scans (a hint to the read store; the outcome of no command depends on it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub indexed: bool,
    /// A top-level `ref:<ClassId>` property only: what deleting an instance it names does.
    /// `restrict` (the default): the delete fails `instance_in_use`. `nullify`: the delete
    /// goes ahead and the reference gives way (the property is removed, or the id is taken
    /// out of a `many` array); not for a `required` property or one with `min_length`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_delete: Option<OnDelete>,
}

/// What deleting a referenced instance does to the reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnDelete {
    Restrict,
    Nullify,
}

/// How many instances a `ref` property names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Cardinality {
    One,
    Many,
}

impl PropertyDef {
    /// A `ref` property holding an array of ids.
    pub fn is_many(&self) -> bool {
        self.cardinality == Some(Cardinality::Many)
    }

    /// A reference that gives way when the instance it names is deleted.
    pub fn gives_way(&self) -> bool {
        self.on_delete == Some(OnDelete::Nullify)
    }
}

/// The scalar types: a value of one is a JSON scalar (or any JSON, for `json`).
pub const SCALAR_TYPES: &[&str] =
    &["string", "integer", "number", "boolean", "datetime", "date", "decimal", "uuid", "email", "url", "json"];

/// Most properties one class may declare: each instance is checked against every property of
/// its class and ancestors, and a class is read whole on every instance command.
pub const MAX_PROPERTIES: usize = 1000;

/// Deepest nesting of `object` properties.
pub const MAX_DEPTH: usize = 4;

/// Most values of one `enum`.
pub const MAX_ENUM_VALUES: usize = 1000;

/// Longest `pattern`, and the most memory its compiled form may take: a class definition must
/// not make every instance command slow.
pub const MAX_PATTERN_LEN: usize = 1000;
const PATTERN_SIZE_LIMIT: usize = 1 << 20;

/// A property's type, parsed from its `type` string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind<'a> {
    Scalar(&'a str),
    Enum,
    Object,
    Array(&'a str),
    Ref(&'a str),
}

impl<'a> Kind<'a> {
    /// `None` for a type string that names no type.
    pub fn parse(ty: &'a str) -> Option<Kind<'a>> {
        if let Some(target) = ty.strip_prefix("ref:") {
            return Some(Kind::Ref(target));
        }
        if let Some(item) = ty.strip_prefix("array<").and_then(|t| t.strip_suffix('>')) {
            return (item != "json" && SCALAR_TYPES.contains(&item)).then_some(Kind::Array(item));
        }
        match ty {
            "enum" => Some(Kind::Enum),
            "object" => Some(Kind::Object),
            t if SCALAR_TYPES.contains(&t) => Some(Kind::Scalar(t)),
            _ => None,
        }
    }

    /// The type of one value (an array's item type for an array).
    pub fn item(self) -> &'a str {
        match self {
            Kind::Scalar(t) | Kind::Array(t) => t,
            Kind::Enum => "enum",
            Kind::Object => "object",
            Kind::Ref(_) => "string",
        }
    }
}

/// Patterns compiled once per process, anchored so the whole value must match. Bounded: past
/// [`CACHED_PATTERNS`] the cache starts over.
pub fn compiled(pattern: &str) -> Result<Arc<Regex>, String> {
    static CACHE: LazyLock<Mutex<HashMap<String, Arc<Regex>>>> = LazyLock::new(Default::default);
    if let Some(re) = CACHE.lock().unwrap_or_else(|e| e.into_inner()).get(pattern) {
        return Ok(re.clone());
    }
    if pattern.len() > MAX_PATTERN_LEN {
        return Err(format!("is longer than {MAX_PATTERN_LEN} characters"));
    }
    let re = regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(PATTERN_SIZE_LIMIT)
        .build()
        .map_err(|e| format!("is not a valid regular expression: {e}"))?;
    let re = Arc::new(re);
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if cache.len() >= CACHED_PATTERNS {
        cache.clear();
    }
    cache.insert(pattern.to_string(), re.clone());
    Ok(re)
}

const CACHED_PATTERNS: usize = 1024;
