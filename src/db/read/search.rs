//! `q=` full-text search over an instance's string values: words (all must match), `prefix*`
//! and `"a phrase"`. Parsed here once; each backend renders it on its own index (PostgreSQL a
//! GIN index over `jsonb_to_tsvector` of the data in the database's text search
//! configuration, SQLite an FTS5 table).

/// Longest `q=`, and most terms in one.
pub const MAX_QUERY_LEN: usize = 256;
pub const MAX_TERMS: usize = 16;

/// One term of a search: every term must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Term {
    Word(String),
    /// `prod*`: a word starting with this.
    Prefix(String),
    /// `"red shoe"`: these words, next to each other, in order.
    Phrase(String),
}

/// A parsed `q=` and the text search configuration of the database it searches (PostgreSQL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Search {
    pub terms: Vec<Term>,
    pub config: String,
}

/// Why a `q=` was refused: a 400 `invalid_search`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSearch(pub String);

impl Search {
    pub fn parse(q: &str, config: &str) -> Result<Search, InvalidSearch> {
        if q.chars().count() > MAX_QUERY_LEN {
            return Err(InvalidSearch(format!("q is longer than {MAX_QUERY_LEN} characters")));
        }
        if let Some(at) = q.chars().position(|c| c.is_control() && !c.is_whitespace()) {
            // PostgreSQL refuses U+0000 in text: a 400 here, never a failed query.
            return Err(InvalidSearch(format!("at character {}: control characters cannot be searched for", at + 1)));
        }
        let mut terms = Vec::new();
        let mut rest = q.trim_start();
        while let Some(c) = rest.chars().next() {
            let at = q.len() - rest.len() + 1;
            let (term, after) = if c == '"' {
                let Some(end) = rest[1..].find('"') else {
                    return Err(InvalidSearch(format!("at character {at}: the phrase is not closed with \"")));
                };
                (Term::Phrase(rest[1..=end].to_string()), &rest[end + 2..])
            } else {
                let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
                let word = &rest[..end];
                let term = match word.strip_suffix('*') {
                    Some(stem) => Term::Prefix(stem.to_string()),
                    None => Term::Word(word.to_string()),
                };
                (term, &rest[end..])
            };
            let text = term.text();
            if !text.chars().any(char::is_alphanumeric) || text.contains(['*', '"']) {
                return Err(InvalidSearch(format!(
                    "at character {at}: a term is a word, word* or \"a phrase\", with a letter or digit"
                )));
            }
            terms.push(term);
            rest = after.trim_start();
        }
        if terms.is_empty() {
            return Err(InvalidSearch("q names no word to search for".into()));
        }
        if terms.len() > MAX_TERMS {
            return Err(InvalidSearch(format!("at most {MAX_TERMS} terms")));
        }
        Ok(Search { terms, config: config.to_string() })
    }
}

impl Term {
    pub fn text(&self) -> &str {
        match self {
            Term::Word(t) | Term::Prefix(t) | Term::Phrase(t) => t,
        }
    }
}

/// Whether `name` can be a text search configuration name spliced into SQL. At most 40
/// bytes, so the names of its column and index (`read_models_text_<name>`) stay within
/// PostgreSQL's 63, which would otherwise cut them short and could make two the same.
pub fn valid_config_name(name: &str) -> bool {
    (1..=40).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_prefixes_and_phrases() {
        let s = Search::parse(r#"  red prod* "big shoe"  x"#, "simple").unwrap();
        assert_eq!(
            s.terms,
            [Term::Word("red".into()), Term::Prefix("prod".into()), Term::Phrase("big shoe".into()), Term::Word("x".into())]
        );
    }

    #[test]
    fn bad_queries_say_where() {
        for (q, said) in [("", "no word"), ("   ", "no word"), ("a \"open", "character 3"), ("*", "character 1"), ("a*b", "character 1"), ("--", "character 1"), ("a\0b", "character 2")] {
            let err = Search::parse(q, "simple").unwrap_err().to_string();
            assert!(err.contains(said), "{q:?}: {err}");
        }
        assert!(Search::parse(&"a ".repeat(17), "simple").is_err());
        assert!(Search::parse(&"a".repeat(257), "simple").is_err());
    }

    #[test]
    fn config_names_are_identifiers() {
        assert!(valid_config_name("simple") && valid_config_name("english") && valid_config_name("pg_catalog_x1"));
        for bad in ["", "English", "a-b", "a'b", "1a", "pg_catalog.english", &"a".repeat(41)] {
            assert!(!valid_config_name(bad), "{bad}");
        }
    }
}
