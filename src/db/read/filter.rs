//! The `where=` filter on instance pages: conditions on properties of the instance's data,
//! typed by its class. `,` joins conditions that must all hold; a parenthesised group joins
//! alternatives with `|`:
//!
//! ```text
//! filter    = group *( "," group )
//! group     = condition / "(" condition *( "|" condition ) ")"
//! condition = property op value
//! op        = "=" / "!=" / ">" / ">=" / "<" / "<="
//! value     = scalar / "in:(" list ")" / "not_in:(" list ")" / "exists:" bool
//!           / "is_null:" bool / "like:" scalar / "ilike:" scalar         ; the prefixed forms after "=" only
//! list      = scalar *( "|" scalar )
//! scalar    = quoted / plain
//! quoted    = DQUOTE *( char / "\" DQUOTE / "\\" ) DQUOTE         ; may hold , | ( ) and "
//! plain     = *( any char but , | ( ) " )
//! ```
//!
//! e.g. `age>=30,(status=open|status=new),name=like:"Smith, J*"`. Numbers (`integer`,
//! `number`) compare as numbers; `datetime` as instants (`10:00:00+02:00` equals
//! `08:00:00Z`; see [`instant`]); `string`, `date`, `uuid`, `email`, `url`, `enum` and
//! `ref:*` properties as strings in byte order (`date` is always `YYYY-MM-DD`, so it orders as
//! dates); `decimal` takes `=`, `!=`, `in`, `not_in` and `exists` (as exact text: `1.5` is not
//! `1.50`), not order comparisons; `boolean` takes `=`, `!=` and `exists`; `json` (and arrays, objects) only
//! `exists`. `like:` and `ilike:` (case-insensitive) take `*` as "any characters" on string
//! properties. A comparison, `in`, `not_in` or `like` matches only values of the property's
//! type, so a missing property matches nothing but `exists:false` (`is_null:true`, the same).
//! Values cannot contain U+0000. Every refusal says at which character it stopped.

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
}

/// Most conditions in one filter, and most values in one `in`.
pub const MAX_CONDITIONS: usize = 16;
pub const MAX_IN_VALUES: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    Number,
    Text,
    /// A `datetime`: compared and sorted as the instant it names.
    Instant,
    Bool,
    Json,
}

impl ValueType {
    /// The filter type of a class property type.
    pub fn of_property(ty: &str) -> ValueType {
        match ty {
            "integer" | "number" => ValueType::Number,
            "datetime" => ValueType::Instant,
            "string" | "date" | "decimal" | "uuid" | "email" | "url" | "enum" => ValueType::Text,
            t if t.starts_with("ref:") => ValueType::Text,
            "boolean" => ValueType::Bool,
            _ => ValueType::Json,
        }
    }

    /// Whether `v` is a value of this type as the read stores' typed expressions see it (the
    /// others are null there): what a sort value may be.
    pub fn holds(self, v: &Value) -> bool {
        match self {
            ValueType::Number => v.is_number(),
            ValueType::Text => v.is_string(),
            ValueType::Instant => v.as_str().is_some_and(is_instant),
            ValueType::Bool => v.is_boolean(),
            ValueType::Json => false,
        }
    }

    fn name(self) -> &'static str {
        match self {
            ValueType::Number => "a number",
            ValueType::Text => "a string",
            ValueType::Instant => "a datetime",
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
    NotIn(Vec<Value>),
    Exists(bool),
    /// A `like:` pattern with `*` for any characters.
    Like { pattern: String, case_insensitive: bool },
    /// `q=`: full-text search over the data's strings (the condition names no property).
    Search(super::search::Search),
}

/// One condition on one property.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    pub property: String,
    pub ty: ValueType,
    pub test: Test,
    /// The class declares the property `indexed`: a read store with an index of its values
    /// spells the condition so the index serves it.
    pub indexed: bool,
}

/// Alternatives: a row matches when any of its conditions holds.
pub type Group = Vec<Condition>;

/// Parses a filter against the class's properties (name -> declared type): the groups, all
/// of which must hold. The error says what is wrong and where, for a 400.
pub fn parse(input: &str, properties: &HashMap<String, String>) -> Result<Vec<Group>, InvalidFilter> {
    let mut p = Parser { text: input, at: 0, properties };
    let mut groups = vec![p.group()?];
    while p.eat(',') {
        groups.push(p.group()?);
    }
    if p.at < input.len() {
        return Err(p.error("expected `,` or the end of the filter"));
    }
    if groups.iter().map(Vec::len).sum::<usize>() > MAX_CONDITIONS {
        return Err(InvalidFilter::new(format!("at most {MAX_CONDITIONS} conditions")));
    }
    Ok(groups)
}

struct Parser<'a> {
    text: &'a str,
    /// A byte offset into `text`, always on a character boundary.
    at: usize,
    properties: &'a HashMap<String, String>,
}

impl Parser<'_> {
    fn rest(&self) -> &str {
        &self.text[self.at..]
    }

    fn eat(&mut self, c: char) -> bool {
        let found = self.rest().starts_with(c);
        if found {
            self.at += c.len_utf8();
        }
        found
    }

    fn eat_str(&mut self, s: &str) -> bool {
        let found = self.rest().starts_with(s);
        if found {
            self.at += s.len();
        }
        found
    }

    /// `reason`, at the current character.
    fn error(&self, reason: impl std::fmt::Display) -> InvalidFilter {
        self.error_at(self.at, reason)
    }

    /// `reason`, at byte offset `at` (shown counted from 1, in characters), with the character
    /// found there.
    fn error_at(&self, at: usize, reason: impl std::fmt::Display) -> InvalidFilter {
        let found = match self.text[at..].chars().next() {
            Some(c) => format!("{c:?}"),
            None => "the end".into(),
        };
        InvalidFilter::new(format!("at character {} ({found}): {reason}", self.column(at)))
    }

    fn group(&mut self) -> Result<Group, InvalidFilter> {
        if !self.eat('(') {
            return Ok(vec![self.condition()?]);
        }
        let mut group = vec![self.condition()?];
        while self.eat('|') {
            group.push(self.condition()?);
        }
        if !self.eat(')') {
            return Err(self.error("expected `|` or `)` to close the group"));
        }
        Ok(group)
    }

    fn condition(&mut self) -> Result<Condition, InvalidFilter> {
        let start = self.at;
        let name_len = self.rest().find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(self.rest().len());
        let property = &self.text[start..start + name_len];
        if property.is_empty() {
            return Err(self.error("expected a property name, e.g. age>=30"));
        }
        let declared = self
            .properties
            .get(property)
            .ok_or_else(|| self.error(format!("{property:?} is not a property of this class")))?;
        self.at += name_len;
        let op = self.operator()?;
        let ty = ValueType::of_property(declared);
        let value_at = self.at;
        let test = self.test(op, ty).map_err(|e| InvalidFilter(format!("{} (in the condition on {property})", e.0)))?;
        if declared == "decimal" && matches!(test, Test::Cmp(CmpOp::Gt | CmpOp::Ge | CmpOp::Lt | CmpOp::Le, _)) {
            // As text, "10" < "9": refused rather than answered wrong.
            self.at = value_at;
            return Err(self.error(format!("{property}: decimal properties take =, !=, in, not_in and exists, not order comparisons")));
        }
        Ok(Condition { property: property.to_string(), ty, test, indexed: false })
    }

    fn operator(&mut self) -> Result<CmpOp, InvalidFilter> {
        for (text, op) in [("!=", CmpOp::Ne), (">=", CmpOp::Ge), ("<=", CmpOp::Le), ("=", CmpOp::Eq), (">", CmpOp::Gt), ("<", CmpOp::Lt)] {
            if self.eat_str(text) {
                return Ok(op);
            }
        }
        Err(self.error("expected an operator: = != > >= < <="))
    }

    fn test(&mut self, op: CmpOp, ty: ValueType) -> Result<Test, InvalidFilter> {
        let start = self.at;
        if op == CmpOp::Eq {
            for flag in ["exists:", "is_null:"] {
                if self.eat_str(flag) {
                    let present = self.boolean()?;
                    return Ok(Test::Exists(if flag == "exists:" { present } else { !present }));
                }
            }
            if self.eat_str("in:(") {
                return self.list(ty, start).map(Test::In);
            }
            if self.eat_str("not_in:(") {
                return self.list(ty, start).map(Test::NotIn);
            }
            for (prefix, case_insensitive) in [("like:", false), ("ilike:", true)] {
                if self.eat_str(prefix) {
                    return self.like(ty, case_insensitive, start);
                }
            }
        }
        let raw = self.scalar()?;
        let value = self.typed(&raw, ty, start)?;
        match ty {
            ValueType::Bool if !matches!(op, CmpOp::Eq | CmpOp::Ne) => Err(self.error_at(start, "booleans take = and != only")),
            _ => Ok(Test::Cmp(op, value)),
        }
    }

    fn boolean(&mut self) -> Result<bool, InvalidFilter> {
        if self.eat_str("true") {
            return Ok(true);
        }
        if self.eat_str("false") {
            return Ok(false);
        }
        Err(self.error("expected true or false"))
    }

    fn list(&mut self, ty: ValueType, start: usize) -> Result<Vec<Value>, InvalidFilter> {
        if !matches!(ty, ValueType::Number | ValueType::Text | ValueType::Instant) {
            return Err(self.error_at(start, format!("in and not_in take numbers, strings or datetimes, the property is {}", ty.name())));
        }
        let mut values = Vec::new();
        loop {
            let value_at = self.at;
            let raw = self.scalar()?;
            values.push(self.typed(&raw, ty, value_at)?);
            if values.len() > MAX_IN_VALUES {
                return Err(self.error_at(start, format!("at most {MAX_IN_VALUES} values in a list")));
            }
            if self.eat(')') {
                return Ok(values);
            }
            if !self.eat('|') {
                return Err(self.error("expected `|` or `)` in the list"));
            }
        }
    }

    fn like(&mut self, ty: ValueType, case_insensitive: bool, start: usize) -> Result<Test, InvalidFilter> {
        if !matches!(ty, ValueType::Text | ValueType::Instant) {
            return Err(self.error_at(start, format!("like and ilike take string properties, the property is {}", ty.name())));
        }
        let pattern = self.scalar()?;
        self.no_nul(&pattern, start)?;
        Ok(Test::Like { pattern, case_insensitive })
    }

    /// A quoted or plain value, unescaped.
    fn scalar(&mut self) -> Result<String, InvalidFilter> {
        if !self.eat('"') {
            let len = self.rest().find([',', '|', '(', ')', '"']).unwrap_or(self.rest().len());
            let plain = self.rest()[..len].to_string();
            self.at += len;
            return Ok(plain);
        }
        let mut out = String::new();
        loop {
            let Some(c) = self.rest().chars().next() else {
                return Err(self.error("the quoted value is not closed with `\"`"));
            };
            self.at += c.len_utf8();
            match c {
                '"' => return Ok(out),
                '\\' => {
                    let escaped = self.rest().chars().next().filter(|e| matches!(e, '"' | '\\'));
                    let Some(e) = escaped else { return Err(self.error("in a quoted value, `\\` escapes only `\"` and `\\`")) };
                    self.at += 1;
                    out.push(e);
                }
                c => out.push(c),
            }
        }
    }

    fn typed(&self, raw: &str, ty: ValueType, start: usize) -> Result<Value, InvalidFilter> {
        self.no_nul(raw, start)?;
        value_of(raw, ty).map_err(|e| InvalidFilter(format!("at character {}: {}", self.column(start), e.0)))
    }

    fn no_nul(&self, raw: &str, start: usize) -> Result<(), InvalidFilter> {
        if raw.contains('\0') {
            // PostgreSQL cannot bind it (text or jsonb): a 400 here, not a failed query.
            return Err(self.error_at(start, "the value contains U+0000 (NUL), which no stored value holds"));
        }
        Ok(())
    }

    fn column(&self, at: usize) -> usize {
        self.text[..at].chars().count() + 1
    }
}

fn value_of(raw: &str, ty: ValueType) -> Result<Value, InvalidFilter> {
    match ty {
        ValueType::Text => Ok(json!(raw)),
        ValueType::Instant if is_instant(raw) => Ok(json!(raw)),
        ValueType::Instant => Err(InvalidFilter::new(format!("{raw:?} is not an RFC 3339 datetime, e.g. 2026-01-31T09:30:00Z"))),
        ValueType::Number => {
            let n: serde_json::Number = raw.parse().map_err(|_| InvalidFilter::new(format!("{raw:?} is not a number")))?;
            Ok(Value::Number(n))
        }
        ValueType::Bool => match raw {
            "true" => Ok(json!(true)),
            "false" => Ok(json!(false)),
            _ => Err(InvalidFilter::new(format!("{raw:?} is not true or false"))),
        },
        ValueType::Json => Err(InvalidFilter::new("json, array and object properties can only be tested with exists")),
    }
}

/// The instant a `datetime` value names, when the read stores order it as one: RFC 3339 (`T`,
/// `t` or a space between date and time; `Z`, `z` or an offset up to ±14:59), hours 00 to 23,
/// seconds 00 to 59 (no leap second), years 0001 to 9999. Those are the values that chrono,
/// PostgreSQL and SQLite all read alike. Both backends' SQL orders by exactly this test: SQLite
/// calls this function (`spiced_instant`, registered on each connection), PostgreSQL's
/// `spiced_instant` (migration 0011) spells the same pattern, so a row's sort value in a cursor
/// and in SQL are null together, which keeps keyset pages exact. Anything else sorts and
/// filters as a value of another type.
pub fn instant(s: &str) -> Option<chrono::DateTime<chrono::FixedOffset>> {
    use chrono::Datelike;
    if !instant_syntax().is_match(s) {
        return None;
    }
    chrono::DateTime::parse_from_rfc3339(s).ok().filter(|t| t.year() >= 1)
}

/// Whether [`instant`] reads `s`.
pub fn is_instant(s: &str) -> bool {
    instant(s).is_some()
}

/// The shape of an instant; migration 0011 has the same pattern.
fn instant_syntax() -> &'static regex::Regex {
    static SYNTAX: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    SYNTAX.get_or_init(|| regex::Regex::new(INSTANT_PATTERN).expect("a valid pattern"))
}

pub const INSTANT_PATTERN: &str =
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ]([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]+)?([Zz]|[+-](0[0-9]|1[0-4]):[0-5][0-9])$";

/// A `like:` pattern as SQL `LIKE` text: `*` becomes `%`, and `%`, `_` and `\` are escaped
/// with `\` (the clause says `ESCAPE '\'`).
pub fn like_pattern(pattern: &str) -> String {
    let mut out = String::with_capacity(pattern.len() + 4);
    for c in pattern.chars() {
        match c {
            '*' => out.push('%'),
            '%' | '_' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

/// A `like:` pattern as SQLite `GLOB` text (case-sensitive, unlike SQLite's `LIKE`): `*`
/// stays the wildcard, and `?`, `[` and `]` are bracketed so GLOB reads them literally.
pub fn glob_pattern(pattern: &str) -> String {
    let mut out = String::with_capacity(pattern.len() + 4);
    for c in pattern.chars() {
        match c {
            '?' | '[' | ']' => {
                out.push('[');
                out.push(c);
                out.push(']');
            }
            c => out.push(c),
        }
    }
    out
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
    /// Placeholders numbered from `first`, spelled `$n` or `?n` by `sigil`.
    pub fn new(first: usize, sigil: char) -> Binder {
        Binder { params: Vec::new(), first, sigil }
    }

    pub fn into_params(self) -> Vec<Param> {
        self.params
    }

    /// Adds a parameter and returns its placeholder.
    pub fn bind(&mut self, p: Param) -> String {
        self.params.push(p);
        format!("{}{}", self.sigil, self.first + self.params.len() - 1)
    }
}

/// The filter as SQL over the `state` column (` AND (clause OR clause…)` per group, as
/// `clause` spells one condition on its backend), its parameters numbered from `first` behind
/// `sigil`.
pub fn render(groups: &[Group], first: usize, sigil: char, clause: fn(&Condition, &mut Binder) -> String) -> (String, Vec<Param>) {
    let mut binder = Binder::new(first, sigil);
    let sql = render_into(groups, &mut binder, clause);
    (sql, binder.params)
}

/// [`render`] with the caller's binder, for a query that binds more after the filter.
pub fn render_into(groups: &[Group], binder: &mut Binder, clause: fn(&Condition, &mut Binder) -> String) -> String {
    let mut sql = String::new();
    for group in groups {
        let alternatives: Vec<String> = group.iter().map(|c| format!("({})", clause(c, binder))).collect();
        sql.push_str(" AND (");
        sql.push_str(&alternatives.join(" OR "));
        sql.push(')');
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_postgresql_function_tests_the_instant_pattern() {
        let migration = include_str!("../../../migrations/postgres/0011_datetime_instants.sql");
        assert!(migration.contains(&format!("value !~ '{INSTANT_PATTERN}'")), "migration 0011 and INSTANT_PATTERN differ");
    }

    fn props() -> HashMap<String, String> {
        [("age", "integer"), ("name", "string"), ("ok", "boolean"), ("meta", "json"), ("at", "datetime")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn conditions(input: &str) -> Vec<Condition> {
        parse(input, &props()).unwrap().into_iter().flatten().collect()
    }

    #[test]
    fn parses_every_operator() {
        let c = conditions("age>=30,name=bob,age=in:(1|2),meta=exists:false,ok!=true,at<2026-01-01T00:00:00Z,age=not_in:(3),name=is_null:true,name=like:Sm*th,name=ilike:a*");
        assert_eq!(c[0].test, Test::Cmp(CmpOp::Ge, json!(30)));
        assert_eq!(c[1].test, Test::Cmp(CmpOp::Eq, json!("bob")));
        assert_eq!(c[2].test, Test::In(vec![json!(1), json!(2)]));
        assert_eq!(c[3].test, Test::Exists(false));
        assert_eq!(c[4].test, Test::Cmp(CmpOp::Ne, json!(true)));
        assert_eq!(c[5].test, Test::Cmp(CmpOp::Lt, json!("2026-01-01T00:00:00Z")));
        assert_eq!(c[6].test, Test::NotIn(vec![json!(3)]));
        assert_eq!(c[7].test, Test::Exists(false));
        assert_eq!(c[8].test, Test::Like { pattern: "Sm*th".into(), case_insensitive: false });
        assert_eq!(c[9].test, Test::Like { pattern: "a*".into(), case_insensitive: true });
    }

    #[test]
    fn groups_are_alternatives_and_quotes_hold_any_character() {
        let groups = parse(r#"(age=1|name="a,b|c(d)"),name=in:("x|y"|"say \"hi\"\\")"#, &props()).unwrap();
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].len(), 2);
        assert_eq!(groups[0][1].test, Test::Cmp(CmpOp::Eq, json!("a,b|c(d)")));
        assert_eq!(groups[1][0].test, Test::In(vec![json!("x|y"), json!("say \"hi\"\\")]));
        assert_eq!(conditions("name=")[0].test, Test::Cmp(CmpOp::Eq, json!("")), "an empty value is a value");
    }

    #[test]
    fn like_patterns_escape_what_sql_would_read() {
        assert_eq!(like_pattern("50%_off*"), "50\\%\\_off%");
        assert_eq!(like_pattern("a\\b"), "a\\\\b");
        assert_eq!(glob_pattern("a?[b]*"), "a[?][[]b[]]*");
    }

    #[test]
    fn bad_filters_say_what_is_wrong_and_where() {
        let cases = [
            ("nope=1", "at character 1 ('n'): \"nope\" is not a property"),
            ("age>=old", "at character 6: \"old\" is not a number"),
            ("age", "at character 4 (the end): expected an operator"),
            ("=3", "at character 1 ('='): expected a property name"),
            ("ok>true", "booleans take"),
            ("meta=1", "only be tested with exists"),
            ("ok=in:(true)", "in and not_in take numbers, strings or datetimes"),
            ("at>2026-01-31", "at character 4: \"2026-01-31\" is not an RFC 3339 datetime"),
            ("at=in:(2026-01-31T09:30:00Z|2026-12-31T23:59:60Z)", "is not an RFC 3339 datetime"),
            ("age=exists:maybe", "at character 12 ('m'): expected true or false"),
            ("age!3", "expected an operator"),
            ("name=a\0b", "the value contains U+0000"),
            ("name=in:(a|\0)", "the value contains U+0000"),
            ("age=1)x", "at character 6 (')'): expected `,` or the end"),
            ("(age=1,name=b)", "at character 7 (','): expected `|` or `)`"),
            ("name=\"open", "at character 11 (the end): the quoted value is not closed"),
            ("name=\"a\\x\"", "escapes only"),
            ("age=like:1*", "like and ilike take string properties"),
            ("name=in:(a|b", "expected `|` or `)` in the list"),
        ];
        for (input, want) in cases {
            let err = parse(input, &props()).unwrap_err();
            assert!(err.to_string().contains(want), "{input}: {err}");
        }
        let many = vec!["age=1"; MAX_CONDITIONS + 1].join(",");
        assert!(parse(&many, &props()).is_err());
    }
}
