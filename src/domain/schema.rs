//! What a class may declare: its properties' names, types and constraints, checked when the
//! command is submitted (a bad definition is a 400 and nothing is appended). The data of
//! instances is checked against these definitions by [`super::values`].

pub use super::property::PropertyDef;
use super::ids::{validate_name, MAX_NAME_LEN};
use super::property::{compiled, Kind, MAX_DEPTH, MAX_ENUM_VALUES, MAX_PROPERTIES, SCALAR_TYPES};
use super::rules::Invalid;
use serde_json::Value;
use std::collections::HashSet;

/// Types whose values are strings, so lengths apply.
const STRING_TYPES: &[&str] = &["string", "datetime", "date", "decimal", "uuid", "email", "url", "enum"];

fn bad(message: String) -> Invalid {
    Invalid::new("invalid_property", message)
}

/// Property names are identifiers: they become JSON keys and filter fields.
fn validate_property_name(name: &str) -> Result<(), Invalid> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(bad(format!("property name {name:?} must match [A-Za-z_][A-Za-z0-9_]* (at most 128)")))
    }
}

pub fn validate_data_keys(data: &serde_json::Map<String, Value>) -> Result<(), Invalid> {
    data.keys().try_for_each(|k| validate_property_name(k))
}

/// A class's property definitions: names, types and constraints that make sense together.
pub fn validate_properties(props: &[PropertyDef]) -> Result<(), Invalid> {
    validate_level(props, 1)
}

fn validate_level(props: &[PropertyDef], depth: usize) -> Result<(), Invalid> {
    if props.len() > MAX_PROPERTIES {
        return Err(bad(format!("{} properties declared; a class may have at most {MAX_PROPERTIES}", props.len())));
    }
    let mut seen = HashSet::new();
    for p in props {
        validate_property_name(&p.name)?;
        if !seen.insert(p.name.as_str()) {
            return Err(bad(format!("property {:?} is declared twice", p.name)));
        }
        validate_property(p, depth)?;
    }
    Ok(())
}

fn validate_property(p: &PropertyDef, depth: usize) -> Result<(), Invalid> {
    let Some(kind) = Kind::parse(&p.ty) else {
        return Err(bad(format!(
            "property {:?} has unknown type {:?}; use one of {}, enum, object, array<T> or ref:<ClassId>",
            p.name,
            p.ty,
            SCALAR_TYPES.join(", ")
        )));
    };
    if let Kind::Ref(target) = kind {
        validate_name("properties.type", target)?;
    }
    for (key, text) in [("label", &p.label), ("description", &p.description)] {
        if let Some(text) = text {
            text.validate(&format!("property {:?}: {key}", p.name))?;
        }
    }
    if p.cardinality.is_some() && !matches!(kind, Kind::Ref(_)) {
        return Err(bad(format!("property {:?}: `cardinality` is for ref properties only", p.name)));
    }
    validate_unique(p, kind, depth)?;
    validate_on_delete(p, kind, depth)?;
    validate_shape(p, kind, depth)?;
    validate_bounds(p, kind)?;
    validate_lengths(p, kind)?;
    validate_pattern(p, kind)?;
    validate_default(p)
}

/// `unique` and `indexed` are about one value per instance: a top-level scalar (not `json`),
/// `enum` or single `ref`.
fn validate_unique(p: &PropertyDef, kind: Kind<'_>, depth: usize) -> Result<(), Invalid> {
    let one_value = match kind {
        Kind::Scalar(t) => t != "json",
        Kind::Enum => true,
        Kind::Ref(_) => !p.is_many(),
        Kind::Object | Kind::Array(_) => false,
    };
    for (flag, set) in [("unique", p.unique), ("indexed", p.indexed)] {
        match (set, one_value, depth) {
            (false, _, _) | (true, true, 1) => {}
            (true, false, _) => return Err(bad(format!("property {:?}: `{flag}` is for scalar (not json), enum and single ref properties", p.name))),
            (true, true, _) => return Err(bad(format!("property {:?}: `{flag}` is for top-level properties, not inside an object", p.name))),
        }
    }
    Ok(())
}

/// `on_delete` belongs to a top-level `ref`; a reference that gives way must be one a valid
/// instance can lack.
fn validate_on_delete(p: &PropertyDef, kind: Kind<'_>, depth: usize) -> Result<(), Invalid> {
    let Some(_) = p.on_delete else { return Ok(()) };
    if !matches!(kind, Kind::Ref(_)) || depth > 1 {
        return Err(bad(format!("property {:?}: `on_delete` is for top-level ref properties", p.name)));
    }
    if p.gives_way() && (p.required || p.min_length.unwrap_or(0) > 0) {
        return Err(bad(format!("property {:?}: a reference that is nullified on delete cannot be required or have a min_length", p.name)));
    }
    Ok(())
}

/// `values` belongs to `enum`, `properties` to `object`, and each needs its own.
fn validate_shape(p: &PropertyDef, kind: Kind<'_>, depth: usize) -> Result<(), Invalid> {
    let name = &p.name;
    match (kind, &p.values) {
        (Kind::Enum, None) => return Err(bad(format!("enum property {name:?} needs `values`"))),
        (Kind::Enum, Some(values)) => validate_enum_values(name, values)?,
        (_, Some(_)) => return Err(bad(format!("property {name:?}: `values` is for enum properties only"))),
        (_, None) => {}
    }
    match (kind, &p.properties) {
        (Kind::Object, None) => Err(bad(format!("object property {name:?} needs `properties`"))),
        (Kind::Object, Some(_)) if depth >= MAX_DEPTH => {
            Err(bad(format!("object property {name:?} nests deeper than {MAX_DEPTH} levels")))
        }
        (Kind::Object, Some(nested)) => validate_level(nested, depth + 1),
        (_, Some(_)) => Err(bad(format!("property {name:?}: `properties` is for object properties only"))),
        (_, None) => Ok(()),
    }
}

fn validate_enum_values(name: &str, values: &[String]) -> Result<(), Invalid> {
    if values.is_empty() || values.len() > MAX_ENUM_VALUES {
        return Err(bad(format!("enum property {name:?} needs 1 to {MAX_ENUM_VALUES} values")));
    }
    let mut seen = HashSet::new();
    if let Some(twice) = values.iter().find(|v| !seen.insert(v.as_str())) {
        return Err(bad(format!("enum property {name:?} lists {twice:?} twice")));
    }
    Ok(())
}

/// `min` and `max` are values of the (item) type, and only for types that have an order.
fn validate_bounds(p: &PropertyDef, kind: Kind<'_>) -> Result<(), Invalid> {
    let item = kind.item();
    for (key, bound) in [("min", &p.min), ("max", &p.max)] {
        let Some(bound) = bound else { continue };
        if !matches!(item, "integer" | "number" | "date" | "datetime") {
            return Err(bad(format!("property {:?}: `{key}` is for integer, number, date and datetime values", p.name)));
        }
        if !super::values::type_matches(item, bound) {
            return Err(bad(format!("property {:?}: `{key}` must be a {item}, got {bound}", p.name)));
        }
    }
    if let (Some(min), Some(max)) = (&p.min, &p.max) {
        if super::values::compare(item, min, max).is_some_and(|o| o.is_gt()) {
            return Err(bad(format!("property {:?}: `min` {min} is above `max` {max}", p.name)));
        }
    }
    Ok(())
}

fn validate_lengths(p: &PropertyDef, kind: Kind<'_>) -> Result<(), Invalid> {
    if p.min_length.is_none() && p.max_length.is_none() {
        return Ok(());
    }
    let has_length = matches!(kind, Kind::Array(_) | Kind::Ref(_)) || STRING_TYPES.contains(&kind.item());
    // Of a many-valued ref, lengths count its ids.
    if !has_length {
        return Err(bad(format!("property {:?}: `min_length` and `max_length` are for strings and arrays", p.name)));
    }
    if p.min_length.unwrap_or(0) > p.max_length.unwrap_or(u64::MAX) {
        return Err(bad(format!("property {:?}: `min_length` is above `max_length`", p.name)));
    }
    Ok(())
}

fn validate_pattern(p: &PropertyDef, kind: Kind<'_>) -> Result<(), Invalid> {
    let Some(pattern) = &p.pattern else { return Ok(()) };
    if kind.item() != "string" || matches!(kind, Kind::Ref(_)) {
        return Err(bad(format!("property {:?}: `pattern` is for string values", p.name)));
    }
    compiled(pattern).map(|_| ()).map_err(|reason| bad(format!("property {:?}: `pattern` {reason}", p.name)))
}

fn validate_default(p: &PropertyDef) -> Result<(), Invalid> {
    let Some(default) = &p.default else { return Ok(()) };
    super::values::check_value(&p.name, p, default)
        .map_err(|e| bad(format!("property {:?}: `default` does not satisfy it: {e}", p.name)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn props(v: Value) -> Vec<PropertyDef> {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn good_definitions_pass() {
        let ok = props(json!([
            {"name": "status", "type": "enum", "values": ["new", "done"], "default": "new"},
            {"name": "tags", "type": "array<string>", "max_length": 5, "pattern": "[a-z]+"},
            {"name": "price", "type": "number", "min": 0, "max": 1e6},
            {"name": "from", "type": "date", "min": "2000-01-01"},
            {"name": "email", "type": "email", "unique": true},
            {"name": "owner", "type": "ref:Person", "unique": true},
            {"name": "rank", "type": "integer", "indexed": true},
            {"name": "code", "type": "string", "min_length": 2, "max_length": 8, "pattern": "[A-Z]{2}[0-9]*"},
            {"name": "address", "type": "object", "properties": [
                {"name": "city", "type": "string", "required": true},
                {"name": "geo", "type": "object", "properties": [{"name": "lat", "type": "number"}]}
            ]}
        ]));
        validate_properties(&ok).unwrap();
    }

    #[test]
    fn bad_definitions_say_what_is_wrong() {
        let cases = [
            (json!({"name": "s", "type": "enum"}), "needs `values`"),
            (json!({"name": "s", "type": "enum", "values": []}), "1 to"),
            (json!({"name": "s", "type": "enum", "values": ["a", "a"]}), "twice"),
            (json!({"name": "s", "type": "string", "values": ["a"]}), "enum properties only"),
            (json!({"name": "o", "type": "object"}), "needs `properties`"),
            (json!({"name": "o", "type": "string", "properties": []}), "object properties only"),
            (json!({"name": "a", "type": "array<json>"}), "unknown type"),
            (json!({"name": "a", "type": "array<object>"}), "unknown type"),
            (json!({"name": "n", "type": "string", "min": 1}), "`min` is for"),
            (json!({"name": "n", "type": "integer", "min": "one"}), "must be a integer"),
            (json!({"name": "n", "type": "integer", "min": 5, "max": 1}), "above `max`"),
            (json!({"name": "n", "type": "integer", "max_length": 1}), "strings and arrays"),
            (json!({"name": "n", "type": "string", "min_length": 3, "max_length": 1}), "above `max_length`"),
            (json!({"name": "n", "type": "integer", "pattern": "1"}), "for string values"),
            (json!({"name": "n", "type": "string", "pattern": "("}), "not a valid regular expression"),
            (json!({"name": "n", "type": "string", "pattern": "a{1000}{1000}"}), "not a valid regular expression"),
            (json!({"name": "n", "type": "integer", "default": "x"}), "`default` does not satisfy"),
            (json!({"name": "n", "type": "enum", "values": ["a"], "default": "b"}), "`default` does not satisfy"),
            (json!({"name": "n", "type": "string", "on_delete": "nullify"}), "top-level ref"),
            (json!({"name": "n", "type": "ref:C", "on_delete": "nullify", "required": true}), "cannot be required"),
            (json!({"name": "n", "type": "json", "unique": true}), "`unique` is for scalar"),
            (json!({"name": "n", "type": "array<string>", "unique": true}), "`unique` is for scalar"),
            (json!({"name": "n", "type": "ref:C", "cardinality": "many", "unique": true}), "`unique` is for scalar"),
            (json!({"name": "o", "type": "object", "properties": [{"name": "n", "type": "string", "unique": true}]}), "top-level"),
            (json!({"name": "n", "type": "json", "indexed": true}), "`indexed` is for scalar"),
            (json!({"name": "n", "type": "ref:C", "cardinality": "many", "indexed": true}), "`indexed` is for scalar"),
            (json!({"name": "o", "type": "object", "properties": [{"name": "n", "type": "string", "indexed": true}]}), "`indexed` is for top-level"),
        ];
        for (def, expected) in cases {
            let err = validate_properties(&props(json!([def.clone()]))).unwrap_err().to_string();
            assert!(err.contains(expected), "{def}: {err:?} lacks {expected:?}");
        }
    }

    #[test]
    fn objects_nest_at_most_max_depth_levels() {
        let mut def = json!({"name": "leaf", "type": "string"});
        for level in 0..MAX_DEPTH {
            def = json!({"name": format!("l{level}"), "type": "object", "properties": [def]});
        }
        let err = validate_properties(&props(json!([def]))).unwrap_err().to_string();
        assert!(err.contains("deeper than"), "{err}");
    }
}
