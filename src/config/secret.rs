//! Values that are never printed: [`Secret`] and the rule for which setting names hold one.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A string that is never printed: `Debug` and `Serialize` show `<redacted>`, except for
/// database URLs, where only the password is hidden.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The value with any URL password replaced (`user:pw@` and `?password=`, `sslpassword=`
    /// and any other query parameter naming a secret), or `<redacted>` if it is not a URL.
    pub fn redacted(&self) -> String {
        if self.0.is_empty() {
            return String::new();
        }
        match url::Url::parse(&self.0) {
            Ok(mut u) if u.has_host() || u.scheme() == "sqlite" => {
                if u.password().is_some() {
                    let _ = u.set_password(Some("<redacted>"));
                }
                if u.query_pairs().any(|(k, _)| names_a_secret(&k)) {
                    let pairs: Vec<(String, String)> = u
                        .query_pairs()
                        .map(|(k, v)| {
                            let v = if names_a_secret(&k) { "<redacted>".to_string() } else { v.into_owned() };
                            (k.into_owned(), v)
                        })
                        .collect();
                    u.query_pairs_mut().clear().extend_pairs(pairs);
                }
                u.to_string()
            }
            _ => "<redacted>".to_string(),
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

/// Whether a setting's name says its value is a secret: `*password*`, `*secret*`, `*token*`,
/// SASL OAuth settings and TLS private keys (`sasl.oauthbearer.*`, `ssl.key.*`, `*.key.pem`).
pub fn names_a_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "secret", "token", "credential"].iter().any(|w| k.contains(w))
        || k.starts_with("sasl.oauthbearer.")
        || k.starts_with("ssl.key.")
        || k.ends_with(".key.pem")
        || k == "sasl.jaas.config"
}
