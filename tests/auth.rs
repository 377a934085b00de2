//! Bearer tokens: 401 without one, 403 with the wrong scope, the token's name as the actor,
//! and no open API on a public address.

mod common;

use common::{isolated_config, spawn_with, Backend};
use serde_json::json;
use spiced::config::{Secret, TokenConfig};

fn token(name: &str, scope: &str, secret: &str) -> TokenConfig {
    TokenConfig { name: name.into(), scope: spiced::config::Scope::parse(scope).unwrap(), token: Secret::new(secret) }
}

const READER: &str = "reader-secret-0123456789";
const WRITER: &str = "writer-secret-0123456789";
const ADMIN: &str = "admin-secret-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_are_enforced() {
    let (mut config, dir) = isolated_config(Backend::LocalSqlite).await;
    config.auth.tokens = vec![token("reader", "read", READER), token("ci-bot", "write", WRITER)];
    let file = dir.path().join("tokens");
    std::fs::write(&file, format!("# comment\nops admin {ADMIN}\n")).unwrap();
    config.auth.token_file = file.display().to_string();
    let app = spawn_with(config, dir).await;
    let root = app.base.replace("/api/v1", "");
    let call = |method: &str, url: String, bearer: Option<&str>| {
        let mut req = app.http.request(method.parse().unwrap(), url).json(&json!({"name": "a"}));
        if let Some(b) = bearer {
            req = req.bearer_auth(b);
        }
        req.send()
    };
    let cases: Vec<(&str, String, Option<&str>, u16)> = vec![
        ("POST", app.url("/databases"), None, 401),
        ("POST", app.url("/databases"), Some("wrong-token-000000000"), 401),
        ("POST", app.url("/databases"), Some(READER), 403),
        ("GET", app.url("/aggregates/Database/a"), None, 401),
        ("GET", app.url("/aggregates/Database/a"), Some(READER), 200),
        ("GET", format!("{root}/metrics"), Some(WRITER), 403),
        ("GET", format!("{root}/metrics"), Some(ADMIN), 200),
        ("GET", format!("{root}/healthz"), None, 200),
        ("GET", format!("{root}/readyz"), None, 200),
        ("POST", app.url("/databases"), Some(WRITER), 202),
    ];
    for (method, url, bearer, status) in cases {
        let r = call(method, url.clone(), bearer).await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{method} {url} with {bearer:?}");
        if status == 401 {
            assert_eq!(r.headers()["www-authenticate"], "Bearer");
            let body: serde_json::Value = r.json().await.unwrap();
            assert_eq!(body["error"], "unauthorized");
        }
    }
    // The token's name, never the token, is the command's actor.
    let (_, events) = common::status_json(
        app.http.get(app.url("/aggregates/Database/a/events")).bearer_auth(ADMIN).send().await.unwrap(),
    )
    .await;
    assert_eq!(events["events"][0]["actor"], "ci-bot");
    assert!(!events.to_string().contains(WRITER));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_api_is_refused_on_a_public_address() {
    let (mut config, dir) = isolated_config(Backend::LocalSqlite).await;
    config.serve.listen = "0.0.0.0:0".parse().unwrap();
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let err = spiced::serve::run_on(config.clone(), listener, Default::default()).await.unwrap_err();
    assert!(err.to_string().contains("--insecure-no-auth"), "{err}");
    config.auth.insecure_no_auth = true;
    let app = spawn_with(config, dir).await;
    let (s, _) = app.post("/databases", json!({"name": "open"})).await;
    assert_eq!(s, 202, "allowed when the operator insists");
}
