//! Whether an instance's data fits its class: the types of [`super::property`] and their
//! constraints. Pure functions over the class states the worker read as of the command's log
//! position, so the outcome is a function of the log.

use super::property::{compiled, Kind, PropertyDef};
pub use super::rules::Reference;
use serde_json::{Map, Value};
use std::cmp::Ordering;
use std::collections::HashMap;

/// Why instance data does not fit its class. Each names the property (`a.b` inside objects,
/// `a[2]` inside arrays); [`InvalidData::code`] is the outcome's error code.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidData {
    #[error("unknown property {0:?}")]
    UnknownProperty(String),
    #[error("property {property:?} must be {expected}, got {got}")]
    WrongType { property: String, expected: String, got: Value },
    #[error("required property {0:?} is missing")]
    MissingRequired(String),
    #[error("property {property:?} must be one of {values:?}, got {got}")]
    NotInEnum { property: String, values: Vec<String>, got: Value },
    #[error("property {property:?} must be at {side} {limit}, got {got}")]
    OutOfRange { property: String, side: &'static str, limit: Value, got: Value },
    #[error("property {property:?} must have at {side} {limit} {unit}, has {got}")]
    Length { property: String, side: &'static str, limit: u64, unit: &'static str, got: u64 },
    #[error("property {property:?} must match the pattern {pattern:?}, got {got}")]
    Pattern { property: String, pattern: String, got: Value },
}

impl InvalidData {
    /// The outcome's error code. A value of the wrong shape (unknown, missing, wrong type)
    /// stays `invalid_instance`, as before constraints existed; each constraint has its own.
    pub fn code(&self) -> &'static str {
        match self {
            InvalidData::UnknownProperty(_) | InvalidData::WrongType { .. } | InvalidData::MissingRequired(_) => {
                "invalid_instance"
            }
            InvalidData::NotInEnum { .. } => "not_in_enum",
            InvalidData::OutOfRange { .. } => "out_of_range",
            InvalidData::Length { .. } => "invalid_length",
            InvalidData::Pattern { .. } => "pattern_mismatch",
        }
    }
}

/// The property definitions of a class chain (the class first, then its ancestors), by name;
/// a class's own definition wins over an ancestor's. A definition that does not parse (a
/// state written before it was valid) counts as `json`.
fn definitions(classes: &[Value]) -> Vec<PropertyDef> {
    let mut defs: Vec<PropertyDef> = Vec::new();
    let mut at: HashMap<String, usize> = HashMap::new();
    let all = classes.iter().rev().flat_map(|c| c["properties"].as_array().into_iter().flatten());
    for def in all.filter_map(|p| serde_json::from_value::<PropertyDef>(p.clone()).ok().or_else(|| lenient(p))) {
        match at.get(&def.name) {
            Some(&i) => defs[i] = def,
            None => {
                at.insert(def.name.clone(), defs.len());
                defs.push(def);
            }
        }
    }
    defs
}

fn lenient(p: &Value) -> Option<PropertyDef> {
    let name = p["name"].as_str()?.to_string();
    serde_json::from_value(serde_json::json!({"name": name, "type": "json"})).ok()
}

/// Instance data against its class and ancestors: known properties only, right types and
/// constraints, every required property present.
pub fn validate(data: &Map<String, Value>, classes: &[Value]) -> Result<(), InvalidData> {
    check_object("", data, &definitions(classes))
}

/// A created instance's data with each absent property that declares a `default` set to it,
/// inside present `object` values too.
pub fn with_defaults(mut data: Map<String, Value>, classes: &[Value]) -> Map<String, Value> {
    fill_defaults(&mut data, &definitions(classes));
    data
}

fn fill_defaults(data: &mut Map<String, Value>, defs: &[PropertyDef]) {
    for def in defs {
        match data.get_mut(&def.name) {
            None | Some(Value::Null) => {
                if let Some(default) = &def.default {
                    data.insert(def.name.clone(), default.clone());
                }
            }
            Some(Value::Object(nested)) if def.ty == "object" => fill_defaults(nested, def.properties.as_deref().unwrap_or_default()),
            Some(_) => {}
        }
    }
}

fn check_object(prefix: &str, data: &Map<String, Value>, defs: &[PropertyDef]) -> Result<(), InvalidData> {
    // By name, so a large object costs one lookup a key, not a scan of the class.
    let by_name: HashMap<&str, &PropertyDef> = defs.iter().map(|d| (d.name.as_str(), d)).collect();
    for (key, value) in data {
        let path = join(prefix, key);
        let Some(def) = by_name.get(key.as_str()) else {
            return Err(InvalidData::UnknownProperty(path));
        };
        if !value.is_null() {
            check_value(&path, def, value)?;
        }
    }
    for def in by_name.values() {
        if def.required && data.get(&def.name).is_none_or(Value::is_null) {
            return Err(InvalidData::MissingRequired(join(prefix, &def.name)));
        }
    }
    Ok(())
}

/// The instances `data` names through `ref` properties of its class chain (inside objects
/// too), each once, in data order. Values of the wrong shape are left out: [`validate`]
/// refuses them.
pub fn references(data: &Map<String, Value>, classes: &[Value]) -> Vec<Reference> {
    let mut found = Vec::new();
    collect_references("", data, &definitions(classes), &mut found);
    let mut seen = std::collections::HashSet::new();
    found.retain(|r: &Reference| seen.insert((r.class_id.clone(), r.instance_id.clone())));
    found
}

/// Whether the chain declares a property (inside objects too) that can name an instance of
/// `class_id`: a class without one has no instance that references it.
pub fn may_reference(classes: &[Value], class_id: &str) -> bool {
    fn any(defs: &[PropertyDef], class_id: &str) -> bool {
        defs.iter().any(|d| match Kind::parse(&d.ty) {
            Some(Kind::Ref(target)) => target == class_id,
            Some(Kind::Object) => any(d.properties.as_deref().unwrap_or_default(), class_id),
            _ => false,
        })
    }
    any(&definitions(classes), class_id)
}

/// The chain's references that give way when the instance they name is deleted
/// (`on_delete: nullify`, top-level only): (property, target class).
pub fn giving_way(classes: &[Value]) -> Vec<(String, String)> {
    definitions(classes)
        .into_iter()
        .filter(|d| d.gives_way())
        .filter_map(|d| match Kind::parse(&d.ty) {
            Some(Kind::Ref(target)) => Some((d.name.clone(), target.to_string())),
            _ => None,
        })
        .collect()
}

/// Takes the reference to instance `id` out of `data`'s `property`: removes a single one, or
/// the id from a `many` array (the rest in order). Whether anything changed.
pub fn release(data: &mut Map<String, Value>, property: &str, id: &str) -> bool {
    match data.get_mut(property) {
        Some(Value::String(held)) if held == id => {
            data.remove(property);
            true
        }
        Some(Value::Array(ids)) => {
            let before = ids.len();
            ids.retain(|v| v.as_str() != Some(id));
            ids.len() != before
        }
        _ => false,
    }
}

/// The ids `data` holds in `property` (one, or each of a `many` array).
pub fn ids_in<'a>(data: &'a Map<String, Value>, property: &str) -> Vec<&'a str> {
    match data.get(property) {
        Some(Value::String(id)) => vec![id.as_str()],
        Some(Value::Array(ids)) => ids.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    }
}

/// The values `data` holds in the chain's `unique` properties, by property (nulls hold none).
pub fn unique_values(data: &Map<String, Value>, classes: &[Value]) -> Vec<(String, Value)> {
    definitions(classes)
        .into_iter()
        .filter(|d| d.unique)
        .filter_map(|d| data.get(&d.name).filter(|v| !v.is_null()).map(|v| (d.name.clone(), v.clone())))
        .collect()
}

fn collect_references(prefix: &str, data: &Map<String, Value>, defs: &[PropertyDef], found: &mut Vec<Reference>) {
    let by_name: HashMap<&str, &PropertyDef> = defs.iter().map(|d| (d.name.as_str(), d)).collect();
    for (key, value) in data {
        let Some(def) = by_name.get(key.as_str()) else { continue };
        let path = join(prefix, key);
        match (Kind::parse(&def.ty), value) {
            (Some(Kind::Ref(class_id)), Value::String(id)) => {
                found.push(Reference { property: path, class_id: class_id.to_string(), instance_id: id.clone() })
            }
            (Some(Kind::Ref(class_id)), Value::Array(ids)) => found.extend(ids.iter().filter_map(Value::as_str).map(|id| {
                Reference { property: path.clone(), class_id: class_id.to_string(), instance_id: id.to_string() }
            })),
            (Some(Kind::Object), Value::Object(nested)) => {
                collect_references(&path, nested, def.properties.as_deref().unwrap_or_default(), found)
            }
            _ => {}
        }
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// One (non-null) value against its property: type, then constraints.
pub fn check_value(path: &str, def: &PropertyDef, value: &Value) -> Result<(), InvalidData> {
    let wrong = || InvalidData::WrongType { property: path.to_string(), expected: def.ty.clone(), got: value.clone() };
    match Kind::parse(&def.ty) {
        None | Some(Kind::Scalar("json")) => Ok(()),
        Some(Kind::Object) => {
            let Some(object) = value.as_object() else { return Err(wrong()) };
            check_object(path, object, def.properties.as_deref().unwrap_or_default())
        }
        Some(Kind::Array(item)) => {
            let Some(items) = value.as_array() else { return Err(wrong()) };
            check_length(path, def, items.len() as u64, "items")?;
            for (i, v) in items.iter().enumerate() {
                let at = format!("{path}[{i}]");
                if !type_matches(item, v) {
                    return Err(InvalidData::WrongType { property: at, expected: item.to_string(), got: v.clone() });
                }
                check_scalar(&at, def, item, v)?;
            }
            Ok(())
        }
        Some(Kind::Enum) => {
            let values = def.values.as_deref().unwrap_or_default();
            if !value.as_str().is_some_and(|s| values.iter().any(|v| v == s)) {
                return Err(InvalidData::NotInEnum { property: path.to_string(), values: values.to_vec(), got: value.clone() });
            }
            check_scalar(path, def, "enum", value)
        }
        Some(Kind::Ref(_)) if def.is_many() => {
            let Some(ids) = value.as_array() else { return Err(wrong()) };
            check_length(path, def, ids.len() as u64, "ids")?;
            match ids.iter().position(|id| !id.is_string()) {
                Some(i) => Err(InvalidData::WrongType { property: format!("{path}[{i}]"), expected: "an instance id".into(), got: ids[i].clone() }),
                None => Ok(()),
            }
        }
        Some(Kind::Ref(_)) => {
            if !value.is_string() {
                return Err(wrong());
            }
            check_scalar(path, def, "string", value)
        }
        Some(Kind::Scalar(ty)) => {
            if !type_matches(ty, value) {
                return Err(wrong());
            }
            check_scalar(path, def, ty, value)
        }
    }
}

/// The constraints of one value of type `ty` (an array's item).
fn check_scalar(path: &str, def: &PropertyDef, ty: &str, value: &Value) -> Result<(), InvalidData> {
    for (side, bound, violated) in [("least", &def.min, Ordering::Less), ("most", &def.max, Ordering::Greater)] {
        let Some(limit) = bound else { continue };
        if compare(ty, value, limit) == Some(violated) {
            return Err(InvalidData::OutOfRange { property: path.to_string(), side, limit: limit.clone(), got: value.clone() });
        }
    }
    let Some(text) = value.as_str() else { return Ok(()) };
    if !def.ty.starts_with("array<") {
        check_length(path, def, text.chars().count() as u64, "characters")?;
    }
    if let Some(pattern) = &def.pattern {
        // The class was checked when it was defined; a pattern that no longer compiles
        // matches nothing.
        if !compiled(pattern).is_ok_and(|re| re.is_match(text)) {
            return Err(InvalidData::Pattern { property: path.to_string(), pattern: pattern.clone(), got: value.clone() });
        }
    }
    Ok(())
}

fn check_length(path: &str, def: &PropertyDef, got: u64, unit: &'static str) -> Result<(), InvalidData> {
    let fail = |side, limit| Err(InvalidData::Length { property: path.to_string(), side, limit, unit, got });
    match (def.min_length, def.max_length) {
        (Some(min), _) if got < min => fail("least", min),
        (_, Some(max)) if got > max => fail("most", max),
        _ => Ok(()),
    }
}

/// The order of two values of type `ty`: numbers as numbers, dates and datetimes as instants;
/// `None` where the type has no order (or a value is not of it).
pub fn compare(ty: &str, a: &Value, b: &Value) -> Option<Ordering> {
    match ty {
        "integer" | "number" => a.as_f64()?.partial_cmp(&b.as_f64()?),
        "date" => {
            let (a, b) = (a.as_str()?, b.as_str()?);
            (is_date(a) && is_date(b)).then(|| a.cmp(b))
        }
        "datetime" => {
            let t = |v: &Value| chrono::DateTime::parse_from_rfc3339(v.as_str()?).ok();
            Some(t(a)?.cmp(&t(b)?))
        }
        _ => None,
    }
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

/// Whether `value` is of the scalar type `ty`.
pub fn type_matches(ty: &str, value: &Value) -> bool {
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
    fn defaults_fill_absent_properties_nested_ones_too_and_the_class_wins() {
        let parent = class(json!([{"name": "tier", "type": "string", "default": "basic"}]));
        let child = class(json!([
            {"name": "tier", "type": "string", "default": "gold"},
            {"name": "status", "type": "enum", "values": ["new", "old"], "default": "new"},
            {"name": "address", "type": "object", "properties": [{"name": "country", "type": "string", "default": "KR"}]}
        ]));
        let data = json!({"status": "old", "address": {}}).as_object().unwrap().clone();
        let filled = with_defaults(data, &[child, parent]);
        assert_eq!(Value::Object(filled), json!({"tier": "gold", "status": "old", "address": {"country": "KR"}}));
    }

    #[test]
    fn many_valued_references_are_arrays_of_ids() {
        let classes = vec![class(json!([{"name": "tags", "type": "ref:Tag", "cardinality": "many", "max_length": 2}]))];
        assert!(validate(json!({"tags": ["a", "b"]}).as_object().unwrap(), &classes).is_ok());
        for (bad, code) in [(json!({"tags": "a"}), "invalid_instance"), (json!({"tags": ["a", 1]}), "invalid_instance"), (json!({"tags": ["a", "b", "c"]}), "invalid_length")] {
            let err = validate(bad.as_object().unwrap(), &classes).unwrap_err();
            assert_eq!(err.code(), code, "{bad}: {err}");
        }
    }

    #[test]
    fn a_released_reference_leaves_the_rest() {
        let mut data = json!({"one": "x", "many": ["a", "x", "b"], "other": "y"}).as_object().unwrap().clone();
        assert!(release(&mut data, "one", "x") && release(&mut data, "many", "x"));
        assert!(!release(&mut data, "other", "x") && !release(&mut data, "gone", "x"));
        assert_eq!(Value::Object(data), json!({"many": ["a", "b"], "other": "y"}));
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
