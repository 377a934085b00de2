//! The `where=` filter on instance pages: comma-separated conditions on properties of the
//! instance's data, typed by its class.
//!
//! ```text
//! age>=30,name=bob,tags=exists:true,status=in:(open|closed),score!=0
//! ```
//!
//! Operators: `=`, `!=`, `>`, `>=`, `<`, `<=`, `=in:(a|b|…)`, `=exists:true|false`. Numbers
//! (`integer`, `number`) compare as numbers; `string`, `datetime`, `date`, `uuid`, `email`, `url`
//! and `ref:*` properties compare as strings in byte order (write datetimes in one offset, e.g.
//! UTC `Z`, to compare them; `date` is always `YYYY-MM-DD`, so it orders as dates); `decimal`
//! takes `=`, `!=`, `in` and `exists` (as exact text: `1.5` is not `1.50`), not order
//! comparisons; `boolean` takes `=`, `!=` and `exists`; `json` properties only `exists`. A comparison matches
//! only values of the property's type, so a missing property matches nothing but
//! `exists:false`. Values cannot contain `,`, `|` or U+0000.

use serde_json::{json, Value};
use std::collections::HashMap;

/// Why a filter was refused: what a 400 `invalid_filter` says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidFilter(String);

impl InvalidFilter {
    fn new(reason: impl Into<String>) -> InvalidFilter {
        InvalidFilter(reason.into())
    }

    /// The same reason, prefixed with the condition it is about.
    fn in_condition(self, text: &str) -> InvalidFilter {
        InvalidFilter(format!("{text:?}: {}", self.0))
    }
}

/// Most conditions in one filter, and most values in one `in`.
pub const MAX_CONDITIONS: usize = 16;
pub const MAX_IN_VALUES: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    Number,
    Text,
    Bool,
    Json,
}

impl ValueType {
    /// The filter type of a class property type.
    pub fn of_property(ty: &str) -> ValueType {
        match ty {
            "integer" | "number" => ValueType::Number,
            "string" | "datetime" | "date" | "decimal" | "uuid" | "email" | "url" => ValueType::Text,
            t if t.starts_with("ref:") => ValueType::Text,
            "boolean" => ValueType::Bool,
            _ => ValueType::Json,
        }
    }

    fn name(self) -> &'static str {
        match self {
            ValueType::Number => "a number",
            ValueType::Text => "a string",
            ValueType::Bool => "a boolean",
            ValueType::Json => "json",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
}

impl CmpOp {
    pub(crate) fn sql(self) -> &'static str {
        match self {
            CmpOp::Eq => "=",
            CmpOp::Ne => "<>",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Test {
    Cmp(CmpOp, Value),
    In(Vec<Value>),
    Exists(bool),
}

/// One condition on one property.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    pub property: String,
    pub ty: ValueType,
    pub test: Test,
}

/// Parses a filter against the class's properties (name -> declared type). The error says
/// what is wrong, for a 400.
pub fn parse(input: &str, properties: &HashMap<String, String>) -> Result<Vec<Condition>, InvalidFilter> {
    let parts: Vec<&str> = input.split(',').collect();
    if parts.len() > MAX_CONDITIONS {
        return Err(InvalidFilter::new(format!("at most {MAX_CONDITIONS} conditions")));
    }
    parts.into_iter().map(|p| condition(p, properties)).collect()
}

fn condition(text: &str, properties: &HashMap<String, String>) -> Result<Condition, InvalidFilter> {
    let (property, op, raw) = split(text)?;
    let declared = properties
        .get(property)
        .ok_or_else(|| InvalidFilter::new(format!("{property:?} is not a property of this class")))?;
    if property.contains('"') || property.chars().any(char::is_control) {
        return Err(InvalidFilter::new(format!("property {property:?} cannot be filtered on")));
    }
    if raw.contains('\0') {
        // PostgreSQL cannot bind it (text or jsonb): a 400 here, not a failed query.
        return Err(InvalidFilter::new(format!("{property}: the value contains U+0000 (NUL), which no stored value holds")));
    }
    let ty = ValueType::of_property(declared);
    if declared == "decimal" && matches!(op, ">" | ">=" | "<" | "<=") {
        // As text, "10" < "9": refused rather than answered wrong.
        return Err(InvalidFilter::new(format!("{property}: decimal properties take =, !=, in and exists, not order comparisons")));
    }
    let test = test_of(op, raw, ty).map_err(|e| e.in_condition(text))?;
    Ok(Condition { property: property.to_string(), ty, test })
}

/// `name op value`, at the first operator character.
fn split(text: &str) -> Result<(&str, &str, &str), InvalidFilter> {
    let at = text
        .find(['=', '!', '<', '>'])
        .ok_or_else(|| InvalidFilter::new(format!("{text:?}: expected property, operator and value, e.g. age>=30")))?;
    let (property, rest) = text.split_at(at);
    let op_len = if rest.starts_with("!=") || rest.starts_with(">=") || rest.starts_with("<=") { 2 } else { 1 };
    let (op, value) = rest.split_at(op_len);
    if property.is_empty() || op == "!" {
        return Err(InvalidFilter::new(format!("{text:?}: expected property, operator and value, e.g. age>=30")));
    }
    Ok((property, op, value))
}

fn test_of(op: &str, raw: &str, ty: ValueType) -> Result<Test, InvalidFilter> {
    if op == "=" {
        if let Some(flag) = raw.strip_prefix("exists:") {
            return match flag {
                "true" => Ok(Test::Exists(true)),
                "false" => Ok(Test::Exists(false)),
                _ => Err(InvalidFilter::new("exists takes true or false")),
            };
        }
        if let Some(list) = raw.strip_prefix("in:(").and_then(|r| r.strip_suffix(')')) {
            return in_list(list, ty);
        }
    }
    let cmp = match op {
        "=" => CmpOp::Eq,
        "!=" => CmpOp::Ne,
        ">" => CmpOp::Gt,
        ">=" => CmpOp::Ge,
        "<" => CmpOp::Lt,
        "<=" => CmpOp::Le,
        _ => return Err(InvalidFilter::new(format!("unknown operator {op:?}"))),
    };
    match ty {
        ValueType::Json => Err(InvalidFilter::new("json properties can only be tested with exists")),
        ValueType::Bool if !matches!(cmp, CmpOp::Eq | CmpOp::Ne) => Err(InvalidFilter::new("booleans take = and != only")),
        _ => Ok(Test::Cmp(cmp, value_of(raw, ty)?)),
    }
}

fn in_list(list: &str, ty: ValueType) -> Result<Test, InvalidFilter> {
    if !matches!(ty, ValueType::Number | ValueType::Text) {
        return Err(InvalidFilter::new(format!("in takes numbers or strings, the property is {}", ty.name())));
    }
    let values: Vec<Value> = list.split('|').map(|v| value_of(v, ty)).collect::<Result<_, _>>()?;
    if values.len() > MAX_IN_VALUES {
        return Err(InvalidFilter::new(format!("at most {MAX_IN_VALUES} values in in:(...)")));
    }
    Ok(Test::In(values))
}

fn value_of(raw: &str, ty: ValueType) -> Result<Value, InvalidFilter> {
    match ty {
        ValueType::Text => Ok(json!(raw)),
        ValueType::Number => {
            let n: serde_json::Number = raw.parse().map_err(|_| InvalidFilter::new(format!("{raw:?} is not a number")))?;
            Ok(Value::Number(n))
        }
        ValueType::Bool => match raw {
            "true" => Ok(json!(true)),
            "false" => Ok(json!(false)),
            _ => Err(InvalidFilter::new(format!("{raw:?} is not true or false"))),
        },
        ValueType::Json => Err(InvalidFilter::new("json properties can only be tested with exists")),
    }
}

/// A bound parameter of a rendered filter.
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    Text(String),
    Json(Value),
    Number(f64),
}

/// A rendered filter's parameters, each with its placeholder: `$n` or `?n`, numbered on from
/// the query's own.
pub struct Binder {
    params: Vec<Param>,
    first: usize,
    sigil: char,
}

impl Binder {
    /// Adds a parameter and returns its placeholder.
    pub fn bind(&mut self, p: Param) -> String {
        self.params.push(p);
        format!("{}{}", self.sigil, self.first + self.params.len() - 1)
    }
}

/// The filter as SQL over the `state` column (` AND clause` per condition, as `clause`
/// spells one on its backend), its parameters numbered from `first` behind `sigil`.
pub fn render(conditions: &[Condition], first: usize, sigil: char, clause: fn(&Condition, &mut Binder) -> String) -> (String, Vec<Param>) {
    let mut binder = Binder { params: Vec::new(), first, sigil };
    let mut sql = String::new();
    for c in conditions {
        sql.push_str(" AND ");
        sql.push_str(&clause(c, &mut binder));
    }
    (sql, binder.params)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props() -> HashMap<String, String> {
        [("age", "integer"), ("name", "string"), ("ok", "boolean"), ("meta", "json"), ("at", "datetime")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_every_operator() {
        let c = parse("age>=30,name=bob,age=in:(1|2),meta=exists:false,ok!=true,at<2026-01-01T00:00:00Z", &props()).unwrap();
        assert_eq!(c[0].test, Test::Cmp(CmpOp::Ge, json!(30)));
        assert_eq!(c[1].test, Test::Cmp(CmpOp::Eq, json!("bob")));
        assert_eq!(c[2].test, Test::In(vec![json!(1), json!(2)]));
        assert_eq!(c[3].test, Test::Exists(false));
        assert_eq!(c[4].test, Test::Cmp(CmpOp::Ne, json!(true)));
        assert_eq!(c[5].test, Test::Cmp(CmpOp::Lt, json!("2026-01-01T00:00:00Z")));
    }

    #[test]
    fn bad_filters_say_what_is_wrong() {
        let cases = [
            ("nope=1", "not a property"),
            ("age>=old", "not a number"),
            ("age", "expected property"),
            ("=3", "expected property"),
            ("ok>true", "booleans take"),
            ("meta=1", "only be tested with exists"),
            ("ok=in:(true)", "in takes numbers or strings"),
            ("age=exists:maybe", "exists takes true or false"),
            ("age!3", "expected property"),
            ("name=a\0b", "name: the value contains U+0000"),
            ("name=in:(a|\0)", "name: the value contains U+0000"),
        ];
        for (input, want) in cases {
            let err = parse(input, &props()).unwrap_err();
            assert!(err.to_string().contains(want), "{input}: {err}");
        }
    }
}
