//! `GET /console`: the operator's console, one HTML page with its CSS and JavaScript inline,
//! embedded in the binary (no build step, nothing fetched). The page needs no token; every
//! call it makes is an ordinary API call with the bearer token the operator enters, so it
//! shows what that token's scope may read and nothing more.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use sha2::{Digest, Sha256};
use std::sync::LazyLock;

const PAGE: &str = include_str!("console.html");

/// The page's Content-Security-Policy: its own inline script and style by hash, calls to this
/// origin only, no frames, no forms posting elsewhere, no plugins.
static POLICY: LazyLock<String> = LazyLock::new(|| {
    format!(
        "default-src 'none'; script-src '{}'; style-src '{}'; connect-src 'self'; img-src 'self' data:; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        hash_of(inline(PAGE, "script")),
        hash_of(inline(PAGE, "style")),
    )
});

/// The text of the page's one `<tag>` element.
fn inline<'a>(page: &'a str, tag: &str) -> &'a str {
    let open = format!("<{tag}>");
    let start = page.find(&open).expect("the console has its inline element") + open.len();
    let end = start + page[start..].find(&format!("</{tag}>")).expect("the inline element is closed");
    &page[start..end]
}

fn hash_of(text: &str) -> String {
    format!("sha256-{}", base64::engine::general_purpose::STANDARD.encode(Sha256::digest(text.as_bytes())))
}

/// The console.
#[utoipa::path(
    get,
    path = "/console",
    tag = "meta",
    responses((status = 200, description = "The operator's console (HTML; it calls the API with the token entered in it)", body = String, content_type = "text/html"))
)]
pub async fn page() -> Response {
    let mut response = PAGE.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_str(&POLICY).expect("the policy is ASCII"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_names_the_inline_script_and_style_by_hash() {
        assert!(inline(PAGE, "script").contains("sessionStorage"));
        assert!(inline(PAGE, "style").contains("--accent"));
        assert!(POLICY.contains(&format!("script-src '{}'", hash_of(inline(PAGE, "script")))), "{}", *POLICY);
        assert!(!POLICY.contains("unsafe"), "{}", *POLICY);
    }

    #[test]
    fn the_console_is_small_and_loads_nothing_from_elsewhere() {
        assert!(PAGE.len() < 300 * 1024, "{} bytes", PAGE.len());
        // (The SVG namespace is a name, not an address.)
        let page = PAGE.replace("http://www.w3.org/2000/svg", "");
        for outside in ["http://", "https://", "src=\"", "<link", "@import"] {
            assert!(!page.contains(outside), "the page refers to {outside}");
        }
    }
}
