//! `GET /api/v1/openapi.json`: the document names exactly the routes the router is built from
//! (`spiced::serve::routes()`), each routed path reaches a handler, the documented bearer scopes
//! are the ones enforced, every error a route documents has a JSON schema, and every code a
//! command can fail with is listed (there and in the README).

mod common;

use common::{isolated_config, spawn_with, Backend, TestApp};
use serde_json::Value;
use spiced::config::{Secret, TokenConfig};
use std::collections::BTreeSet;

const METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];
const SCOPES: [(&str, &str); 3] =
    [("read", "read-secret-0123456789"), ("write", "write-secret-0123456789"), ("admin", "admin-secret-0123456789")];

/// A server with one token per scope.
async fn app_with_tokens() -> TestApp {
    let (mut config, dir) = isolated_config(Backend::LocalSqlite).await;
    config.auth.tokens = SCOPES
        .iter()
        .map(|(scope, secret)| TokenConfig { name: scope.to_string(), scope: spiced::config::Scope::parse(scope).unwrap(), token: Secret::new(*secret) })
        .collect();
    spawn_with(config, dir).await
}

/// Fetched without a token: the document is public.
async fn fetch_document(app: &TestApp) -> Value {
    let r = app.http.get(app.url("/openapi.json")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    r.json().await.unwrap()
}

/// (METHOD, path) of every operation in the document.
fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let paths = doc["paths"].as_object().expect("paths is an object");
    paths
        .iter()
        .flat_map(|(path, item)| {
            METHODS
                .iter()
                .filter(|m| item.get(**m).is_some())
                .map(move |m| (m.to_uppercase(), path.clone()))
        })
        .collect()
}

fn operation<'a>(doc: &'a Value, method: &str, path: &str) -> &'a Value {
    &doc["paths"][path][method.to_lowercase()]
}

fn routed() -> BTreeSet<(String, String)> {
    spiced::serve::routes().iter().map(|r| (r.method.to_string(), r.path.to_string())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn document_lists_exactly_the_routed_operations() {
    let app = app_with_tokens().await;
    let doc = fetch_document(&app).await;
    let (routed, documented) = (routed(), documented(&doc));
    assert!(routed.contains(&("GET".into(), "/api/v1/openapi.json".into())), "{routed:?}");
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    assert!(undocumented.is_empty(), "routes missing from the document: {undocumented:?}");
    assert!(unrouted.is_empty(), "documented operations the router does not serve: {unrouted:?}");
}

/// A concrete URL for a templated path; the values are valid names but name nothing.
fn concrete(path: &str) -> String {
    path.replace("{db}", "db1")
        .replace("{class_id}", "Person")
        .replace("{instance_id}", "p1")
        .replace("{command_id}", "00000000-0000-4000-8000-000000000001")
        .replace("{aggregate_type}", "Database")
        .replace("{aggregate_id}", "db1")
}

/// The scope an operation documents, `None` for a public one.
fn documented_scope(op: &Value) -> Option<String> {
    let security = op.get("security")?.as_array()?;
    assert_eq!(security.len(), 1, "one security requirement: {op}");
    let scopes = security[0]["bearer"].as_array().expect("the bearer scheme");
    assert_eq!(scopes.len(), 1, "one scope: {op}");
    Some(scopes[0].as_str().unwrap().to_string())
}

/// Every documented operation reaches its handler (not the router's fallbacks), needs no token
/// exactly when the document says so, and refuses the scope below the documented one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_are_served_with_the_documented_scopes() {
    let app = app_with_tokens().await;
    let doc = fetch_document(&app).await;
    let root = app.base.replace("/api/v1", "");
    for (method, path) in documented(&doc) {
        let scope = documented_scope(operation(&doc, &method, &path));
        let url = format!("{root}{}", concrete(&path));
        let send = |secret: Option<&str>| {
            let mut req = app.http.request(method.parse().unwrap(), &url);
            if let Some(s) = secret {
                req = req.bearer_auth(s);
            }
            req.send()
        };
        let anonymous = send(None).await.unwrap().status().as_u16();
        assert_eq!(anonymous == 401, scope.is_some(), "{method} {path} without a token: {anonymous}");
        let Some(scope) = scope else { continue };
        let rank = SCOPES.iter().position(|(s, _)| *s == scope).expect("a known scope");
        let r = send(Some(SCOPES[rank].1)).await.unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert!(![401, 403, 405].contains(&status), "{method} {path} with {scope}: {status} {body}");
        assert_ne!(body["message"], "no such route", "{method} {path} is not routed");
        if rank > 0 {
            let below = send(Some(SCOPES[rank - 1].1)).await.unwrap().status();
            assert_eq!(below, 403, "{method} {path} with the scope below {scope}");
        }
    }
}

/// Follows a local `$ref`; panics on one that does not resolve.
fn resolve<'a>(doc: &'a Value, value: &'a Value) -> &'a Value {
    let Some(reference) = value.get("$ref").and_then(Value::as_str) else { return value };
    let pointer = reference.strip_prefix('#').expect("a local $ref");
    let target = doc.pointer(pointer).unwrap_or_else(|| panic!("{reference} does not resolve"));
    resolve(doc, target)
}

fn all_refs_resolve(doc: &Value, value: &Value) {
    match value {
        Value::Object(map) => {
            resolve(doc, value);
            map.values().for_each(|v| all_refs_resolve(doc, v));
        }
        Value::Array(items) => items.iter().for_each(|v| all_refs_resolve(doc, v)),
        _ => {}
    }
}

/// The JSON schema of a response, if it has one.
fn json_schema<'a>(doc: &'a Value, response: &'a Value) -> Option<&'a Value> {
    resolve(doc, response).pointer("/content/application~1json/schema")
}

/// Parameters are well formed, and each `{name}` of the path is a required path parameter.
fn check_parameters(path: &str, op: &Value) {
    let params = op.get("parameters").and_then(Value::as_array).cloned().unwrap_or_default();
    for p in &params {
        let place = p["in"].as_str().unwrap_or_default();
        assert!(["path", "query", "header", "cookie"].contains(&place), "{path}: {p}");
        assert!(p["name"].is_string() && p["schema"].is_object(), "{path}: {p}");
    }
    let in_path: BTreeSet<&str> =
        params.iter().filter(|p| p["in"] == "path" && p["required"] == true).filter_map(|p| p["name"].as_str()).collect();
    let templated: BTreeSet<&str> =
        path.split('/').filter_map(|s| s.strip_prefix('{')?.strip_suffix('}')).collect();
    assert_eq!(in_path, templated, "path parameters of {path}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn document_is_openapi_3_with_error_schemas() {
    let app = app_with_tokens().await;
    let doc = fetch_document(&app).await;
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")), "{}", doc["openapi"]);
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string(), "{}", doc["info"]);
    all_refs_resolve(&doc, &doc);
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    let error_body = &doc["components"]["schemas"]["ErrorBody"];
    assert_eq!(error_body["required"], serde_json::json!(["error", "message"]));
    // These only ever answer 200: nothing in them can fail.
    let never_fail = [("GET", "/healthz"), ("GET", "/api/v1/openapi.json"), ("GET", "/console")];
    for (method, path) in documented(&doc) {
        let op = operation(&doc, &method, &path);
        check_parameters(&path, op);
        let responses = op["responses"].as_object().expect("responses");
        let errors: Vec<(&String, &Value)> =
            responses.iter().filter(|(code, _)| code.starts_with('4') || code.starts_with('5')).collect();
        for (code, response) in &errors {
            assert!(json_schema(&doc, response).is_some(), "{method} {path} {code} has no JSON schema");
        }
        if never_fail.contains(&(method.as_str(), path.as_str())) {
            continue;
        }
        assert!(!errors.is_empty(), "{method} {path} documents no error response");
        if documented_scope(op).is_some() {
            for code in ["401", "403"] {
                let schema = responses.get(code).and_then(|r| json_schema(&doc, r));
                assert_eq!(
                    schema.map(|s| &s["$ref"]),
                    Some(&Value::from("#/components/schemas/ErrorBody")),
                    "{method} {path} {code}"
                );
            }
        }
    }
}

/// Every code a command can fail with, read from the domain's source (`fail("code", …)` and
/// the constraint codes of `InvalidData::code`), is listed in the README's API section and in
/// the document's description of a command's `error`: a new code cannot go undocumented.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failure_code_is_documented() {
    let mut codes = BTreeSet::new();
    let decided = regex::Regex::new(r#"fail\(\s*"([a-z_]+)""#).unwrap();
    for file in std::fs::read_dir("src/domain/commands").unwrap() {
        let source = std::fs::read_to_string(file.unwrap().path()).unwrap();
        let source = source.split("#[cfg(test)]").next().unwrap();
        codes.extend(decided.captures_iter(source).map(|c| c[1].to_string()));
    }
    let constraint = regex::Regex::new(r#"InvalidData::\w+[^=\n]*=> (?:\{\s*)?"([a-z_]+)""#).unwrap();
    let values = std::fs::read_to_string("src/domain/values.rs").unwrap();
    codes.extend(constraint.captures_iter(&values).map(|c| c[1].to_string()));
    assert!(codes.contains("class_in_use") && codes.contains("pattern_mismatch") && codes.contains("invalid_instance"), "{codes:?}");
    let readme = std::fs::read_to_string("README.md").unwrap();
    let doc = fetch_document(&app_with_tokens().await).await.to_string();
    for code in &codes {
        assert!(readme.contains(&format!("`{code}`")), "README.md does not list {code}");
        assert!(doc.contains(&format!("`{code}`")), "the OpenAPI document does not list {code}");
    }
}
