//! Labels and descriptions of classes and properties: a plain string, or a map of language tags
//! to text (`{"en": "Product", "ko": "제품"}`). Stored as given; a read picks the best match
//! for the caller's `Accept-Language` and returns it beside the full map.

use super::rules::Invalid;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// Most languages one label or description may carry.
pub const MAX_LANGUAGES: usize = 64;

/// A label or description.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Text {
    Plain(String),
    /// By language tag (`en`, `ko`, `pt-BR`).
    Translated(BTreeMap<String, String>),
}

impl Text {
    /// A translated text names at least one language, each by a well-formed tag.
    pub fn validate(&self, field: &str) -> Result<(), Invalid> {
        let Text::Translated(map) = self else { return Ok(()) };
        if map.is_empty() || map.len() > MAX_LANGUAGES {
            return Err(Invalid::new("invalid_request", format!("{field} must name 1 to {MAX_LANGUAGES} languages")));
        }
        match map.keys().find(|tag| !is_language_tag(tag)) {
            Some(tag) => Err(Invalid::new("invalid_request", format!("{field}: {tag:?} is not a language tag such as en or pt-BR"))),
            None => Ok(()),
        }
    }
}

/// `xx`, `xxx` or up to 8 letters, then `-` subtags of 1 to 8 letters or digits (BCP 47's
/// shape, without checking the registry).
fn is_language_tag(tag: &str) -> bool {
    let mut parts = tag.split('-');
    let primary = parts.next().unwrap_or_default();
    (2..=8).contains(&primary.len())
        && primary.bytes().all(|b| b.is_ascii_alphabetic())
        && parts.all(|p| (1..=8).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// The languages an `Accept-Language` header asks for, most wanted first; `q=0` ones and
/// malformed entries left out.
pub fn preferences(header: &str) -> Vec<String> {
    let mut wanted: Vec<(f32, usize, String)> = header
        .split(',')
        .enumerate()
        .filter_map(|(i, entry)| {
            let mut fields = entry.split(';');
            let tag = fields.next()?.trim();
            let q = fields
                .find_map(|f| f.trim().strip_prefix("q="))
                .map_or(Some(1.0), |q| q.trim().parse::<f32>().ok())?;
            (q > 0.0 && (tag == "*" || is_language_tag(tag))).then(|| (q, i, tag.to_ascii_lowercase()))
        })
        .collect();
    wanted.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    wanted.into_iter().map(|(_, _, tag)| tag).collect()
}

/// The best text of a stored label (a string or a language map) for `wanted`: an exact tag,
/// then one that shares the primary language (`ko-KR` for `ko`, `en` for `en-US`), then `*`;
/// without a match, `en`, then the first language. `None` when `value` is neither form.
pub fn best(value: &Value, wanted: &[String]) -> Option<(Option<String>, String)> {
    if let Some(plain) = value.as_str() {
        return Some((None, plain.to_string()));
    }
    let map = value.as_object().filter(|m| !m.is_empty())?;
    let pick = |tag: &String| Some((Some(tag.clone()), map.get(tag)?.as_str()?.to_string()));
    let primary = |t: &str| t.split('-').next().unwrap_or_default().to_ascii_lowercase();
    for want in wanted {
        if want == "*" {
            return map.keys().next().and_then(pick);
        }
        let exact = map.keys().find(|k| k.eq_ignore_ascii_case(want));
        let related = || map.keys().find(|k| primary(k) == primary(want));
        if let Some(found) = exact.or_else(related).and_then(pick) {
            return Some(found);
        }
    }
    map.keys().find(|k| k.eq_ignore_ascii_case("en")).or_else(|| map.keys().next()).and_then(pick)
}

/// A class state's `localized` view: the best label and description of the class and of each
/// property that has one, for `wanted`.
pub fn localized(class: &Value, wanted: &[String]) -> Value {
    let mut view = Map::new();
    let mut language = None;
    for key in ["label", "description"] {
        if let Some((lang, text)) = best(&class[key], wanted) {
            language = language.or(lang);
            view.insert(key.to_string(), json!(text));
        }
    }
    let mut properties = Map::new();
    for p in class["properties"].as_array().into_iter().flatten() {
        let (Some(name), Some((lang, text))) = (p["name"].as_str(), best(&p["label"], wanted)) else { continue };
        language = language.or(lang);
        properties.insert(name.to_string(), json!(text));
    }
    if !properties.is_empty() {
        view.insert("property_labels".into(), Value::Object(properties));
    }
    view.insert("language".into(), json!(language));
    Value::Object(view)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_language_is_ordered_by_quality() {
        assert_eq!(preferences("ko-KR, en;q=0.8, fr;q=0.9, de;q=0"), ["ko-kr", "fr", "en"]);
        assert_eq!(preferences("*"), ["*"]);
        assert_eq!(preferences("en;q=x, 12, ko"), ["ko"], "malformed entries are left out");
        assert!(preferences("").is_empty());
    }

    #[test]
    fn the_best_match_is_exact_then_related_then_english_then_first() {
        let map = json!({"en": "Product", "ko": "제품", "pt-BR": "Produto"});
        let got = |wanted: &[&str]| {
            let wanted: Vec<String> = wanted.iter().map(|s| s.to_string()).collect();
            best(&map, &wanted).map(|(l, t)| (l.unwrap_or_default(), t))
        };
        assert_eq!(got(&["ko"]), Some(("ko".into(), "제품".into())));
        assert_eq!(got(&["ko-kr"]), Some(("ko".into(), "제품".into())));
        assert_eq!(got(&["pt"]), Some(("pt-BR".into(), "Produto".into())));
        assert_eq!(got(&["de", "pt-br"]), Some(("pt-BR".into(), "Produto".into())));
        assert_eq!(got(&["de"]), Some(("en".into(), "Product".into())));
        assert_eq!(got(&[]), Some(("en".into(), "Product".into())));
        assert_eq!(best(&json!({"ko": "제품"}), &["de".into()]).unwrap().1, "제품");
        assert_eq!(best(&json!("Plain"), &["ko".into()]), Some((None, "Plain".into())));
        assert_eq!(best(&Value::Null, &[]), None);
    }

    #[test]
    fn translated_text_needs_language_tags() {
        let ok: Text = serde_json::from_value(json!({"en": "A", "zh-Hant-TW": "B"})).unwrap();
        ok.validate("label").unwrap();
        for bad in [json!({}), json!({"e": "B"}), json!({"en_US": "A"}), json!({"en-": "A"})] {
            let text: Text = serde_json::from_value(bad.clone()).unwrap();
            assert!(text.validate("label").is_err(), "{bad} accepted");
        }
        assert!(serde_json::from_value::<Text>(json!(5)).is_err());
    }
}
