//! The rules every command shares: the facts a decision is made from, the decision itself,
//! and what a class's properties and an instance's data must be. Pure functions.
//!
//! Domain events carry the aggregate's full resulting state in `data.state` (`null` once
//! deleted), so the state of any aggregate is its last outcome's `data.state`, and a
//! projection never has to merge patches (the reference lost fields that way).

use super::ids::{validate_name, IdError, MAX_NAME_LEN};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

/// A request the API refuses before anything is appended: a 400 with `code`.
#[derive(Debug, thiserror::Error)]
pub enum Invalid {
    #[error(transparent)]
    Id(#[from] IdError),
    #[error("{message}")]
    Request { code: &'static str, message: String },
}

impl Invalid {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Invalid::Request { code, message: message.into() }
    }
}

/// What the log says, as needed by a command.
#[derive(Debug, Default, Clone)]
pub struct Facts {
    /// The aggregate's current state (`None`: never created, or deleted).
    pub current: Option<Value>,
    /// The state of the database the aggregate belongs to.
    pub database: Option<Value>,
    /// The instance's class, then its ancestors (for instance commands), or the parent class
    /// a class command names (for class commands).
    pub classes: Vec<Value>,
    /// Whether the database still has live classes (for DELETE_DATABASE).
    pub database_has_classes: bool,
    /// What still uses the class a DELETE_ONTOLOGY_CLASS names: a live child class,
    /// described for the `class_in_use` message.
    pub in_use: Option<String>,
    /// A `ref:<ClassId>` property of a class command whose target class does not exist:
    /// (property, class).
    pub missing_ref: Option<(String, String)>,
}

/// A command's one outcome.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// A domain event: its type and the aggregate's resulting state.
    Event { event_type: &'static str, state: Value },
    /// `COMMAND_FAILED` with a machine-readable code and a message.
    Failed { code: &'static str, message: String },
}

pub fn fail(code: &'static str, message: impl Into<String>) -> Decision {
    Decision::Failed { code, message: message.into() }
}

/// A property of an ontology class.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PropertyDef {
    #[schema(pattern = "^[A-Za-z_][A-Za-z0-9_]{0,127}$")]
    pub name: String,
    /// `string`, `integer`, `number`, `boolean`, `datetime` (RFC 3339), `date` (`YYYY-MM-DD`),
    /// `decimal` (exact, a string such as `"-12.50"`), `uuid`, `email`, `url` (http or https),
    /// `json` or `ref:<ClassId>`.
    #[serde(rename = "type")]
    #[schema(pattern = "^(string|integer|number|boolean|datetime|date|decimal|uuid|email|url|json|ref:[A-Za-z0-9][A-Za-z0-9_.-]{0,127})$")]
    pub ty: String,
    #[serde(default)]
    pub required: bool,
}

const SCALAR_TYPES: &[&str] =
    &["string", "integer", "number", "boolean", "datetime", "date", "decimal", "uuid", "email", "url", "json"];

/// Property names are identifiers: they become JSON keys and filter fields.
fn validate_property_name(name: &str) -> Result<(), Invalid> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Invalid::new(
            "invalid_property",
            format!("property name {name:?} must match [A-Za-z_][A-Za-z0-9_]* (at most 128)"),
        ))
    }
}

/// Most properties one class may declare: each instance is checked against every property of
/// its class and ancestors, and a class is read whole on every instance command.
pub const MAX_PROPERTIES: usize = 1000;

pub fn validate_properties(props: &[PropertyDef]) -> Result<(), Invalid> {
    if props.len() > MAX_PROPERTIES {
        return Err(Invalid::new(
            "invalid_property",
            format!("{} properties declared; a class may have at most {MAX_PROPERTIES}", props.len()),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for p in props {
        validate_property_name(&p.name)?;
        if !seen.insert(p.name.as_str()) {
            return Err(Invalid::new(
                "invalid_property",
                format!("property {:?} is declared twice", p.name),
            ));
        }
        match p.ty.strip_prefix("ref:") {
            Some(target) => validate_name("properties.type", target)?,
            None if SCALAR_TYPES.contains(&p.ty.as_str()) => {}
            None => {
                return Err(Invalid::new(
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

pub fn validate_data_keys(data: &Map<String, Value>) -> Result<(), Invalid> {
    data.keys().try_for_each(|k| validate_property_name(k))
}

/// The ids an instance's state carries.
pub fn instance_key(payload: &Value) -> Map<String, Value> {
    ["db", "branch", "class_id", "instance_id"]
        .iter()
        .map(|k| (k.to_string(), payload[*k].clone()))
        .collect()
}

/// RFC 7386 merge patch: `null` removes a key, objects merge, anything else replaces.
pub fn merge_patch(target: &mut Map<String, Value>, patch: Map<String, Value>) {
    for (k, v) in patch {
        match v {
            Value::Null => {
                target.remove(&k);
            }
            Value::Object(p) => match target.get_mut(&k) {
                Some(Value::Object(t)) => merge_patch(t, p),
                _ => {
                    let mut fresh = Map::new();
                    merge_patch(&mut fresh, p);
                    target.insert(k, Value::Object(fresh));
                }
            },
            other => {
                target.insert(k, other);
            }
        }
    }
}

/// Why instance data does not fit its class: an `invalid_instance` outcome's message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidData {
    #[error("unknown property {0:?}")]
    UnknownProperty(String),
    #[error("property {property:?} must be {expected}, got {got}")]
    WrongType { property: String, expected: String, got: Value },
    #[error("required property {0:?} is missing")]
    MissingRequired(String),
}

/// Instance data against its class and ancestors: known properties only, right types, every
/// required property present.
pub fn validate(data: &Map<String, Value>, classes: &[Value]) -> Result<(), InvalidData> {
    let props: Vec<&Value> = classes
        .iter()
        .flat_map(|c| c["properties"].as_array().into_iter().flatten())
        .collect();
    // By name, so a large object costs one lookup a key, not a scan of the class.
    let by_name: std::collections::HashMap<&str, &Value> =
        props.iter().rev().filter_map(|p| Some((p["name"].as_str()?, *p))).collect();
    for (key, value) in data {
        let Some(prop) = by_name.get(key.as_str()) else {
            return Err(InvalidData::UnknownProperty(key.clone()));
        };
        let ty = prop["type"].as_str().unwrap_or("json");
        if !value.is_null() && !type_matches(ty, value) {
            return Err(InvalidData::WrongType { property: key.clone(), expected: ty.to_string(), got: value.clone() });
        }
    }
    for prop in &props {
        let name = prop["name"].as_str().unwrap_or_default();
        if prop["required"].as_bool() == Some(true) && data.get(name).is_none_or(Value::is_null) {
            return Err(InvalidData::MissingRequired(name.to_string()));
        }
    }
    Ok(())
}

/// `YYYY-MM-DD`, a real calendar day; exactly that form, so dates compare as strings.
fn is_date(s: &str) -> bool {
    s.len() == 10 && chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").is_ok()
}

/// An exact decimal: an optional `-`, digits without leading zeros, an optional fraction.
/// Kept as a string, so no binary float ever rounds it.
fn is_decimal(s: &str) -> bool {
    let digits = s.strip_prefix('-').unwrap_or(s);
    let (whole, fraction) = match digits.split_once('.') {
        Some((w, f)) => (w, Some(f)),
        None => (digits, None),
    };
    let all_digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    all_digits(whole)
        && (whole == "0" || !whole.starts_with('0'))
        && fraction.is_none_or(all_digits)
        && s.len() <= 64
}

/// `local@domain.tld`: one `@`, no spaces, a dot in the domain; at most 254 characters. Whether
/// the mailbox exists is not a type's to say.
fn is_email(s: &str) -> bool {
    let Some((local, domain)) = s.split_once('@') else {
        return false;
    };
    s.len() <= 254
        && !local.is_empty()
        && !domain.contains('@')
        && domain.split('.').count() >= 2
        && domain.split('.').all(|label| !label.is_empty())
        && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// An absolute `http` or `https` URL with a host.
fn is_web_url(s: &str) -> bool {
    url::Url::parse(s).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
}

fn type_matches(ty: &str, value: &Value) -> bool {
    match ty {
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "datetime" => value
            .as_str()
            .is_some_and(|s| chrono::DateTime::parse_from_rfc3339(s).is_ok()),
        "date" => value.as_str().is_some_and(is_date),
        "decimal" => value.as_str().is_some_and(is_decimal),
        "uuid" => value.as_str().is_some_and(|s| s.len() == 36 && uuid::Uuid::parse_str(s).is_ok()),
        "email" => value.as_str().is_some_and(is_email),
        "url" => value.as_str().is_some_and(is_web_url),
        "json" => true,
        t if t.starts_with("ref:") => value.is_string(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn class(props: Value) -> Value {
        json!({"class_id": "C", "properties": props, "abstract": false})
    }

    #[test]
    fn instances_are_validated_against_their_class() {
        let classes = vec![class(json!([
            {"name": "name", "type": "string", "required": true},
            {"name": "n", "type": "integer"},
            {"name": "at", "type": "datetime"},
            {"name": "owner", "type": "ref:Person"}
        ]))];
        let ok = json!({"name": "x", "n": 3, "at": "2025-01-01T00:00:00Z", "owner": "p1"});
        assert!(validate(ok.as_object().unwrap(), &classes).is_ok());
        for bad in [
            json!({"n": 1}),
            json!({"name": "x", "n": 1.5}),
            json!({"name": "x", "at": "yesterday"}),
            json!({"name": "x", "extra": 1}),
            json!({"name": 5}),
        ] {
            assert!(validate(bad.as_object().unwrap(), &classes).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn the_string_shaped_types_take_their_form_only() {
        let cases: [(&str, &[&str], &[&str]); 5] = [
            ("date", &["2026-12-03", "2024-02-29"], &["2026-2-3", "2025-02-29", "2026-12-03T00:00:00Z", ""]),
            ("decimal", &["0", "-12.50", "3.14159265358979323846"], &["01", "1.", ".5", "1e3", "+1", "--1", "1.2.3", ""]),
            ("uuid", &["6f1c1e1a-58f5-4d57-9a55-4a35e0e0c3b1"], &["6f1c1e1a58f54d579a554a35e0e0c3b1", "not-a-uuid"]),
            ("email", &["a@b.co", "first.last+tag@example.org"], &["a@b", "@b.co", "a@@b.co", "a b@c.de", "a@b..co"]),
            ("url", &["https://example.org/x?y=1", "http://127.0.0.1:8080"], &["ftp://example.org", "example.org", "https://", "mailto:a@b.co"]),
        ];
        for (ty, good, bad) in cases {
            for s in good {
                assert!(type_matches(ty, &json!(s)), "{ty}: {s:?} refused");
            }
            for s in bad {
                assert!(!type_matches(ty, &json!(s)), "{ty}: {s:?} accepted");
            }
            assert!(!type_matches(ty, &json!(5)), "{ty}: a number accepted");
        }
    }

    #[test]
    fn inherited_properties_count() {
        let child = class(json!([{"name": "a", "type": "string"}]));
        let parent = class(json!([{"name": "b", "type": "boolean", "required": true}]));
        let data = json!({"a": "x", "b": true});
        assert!(validate(data.as_object().unwrap(), &[child.clone(), parent.clone()]).is_ok());
        assert!(validate(json!({"a": "x"}).as_object().unwrap(), &[child, parent]).is_err());
    }
}
