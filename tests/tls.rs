//! TLS to the dependencies: Kafka through a TLS listener (stunnel in front of a private
//! broker that advertises it) with the CA given in `kafka.properties`, and S3 over HTTPS with
//! a private CA in `log.s3.ca_file`. The certificates are made for the test.

mod common;

use common::broker::Broker;
use common::kafka::isolate_topics;
use common::process::{free_port, Spiced};
use common::tls::{Stunnel, TestCa};
use common::{isolated_config, read_whole_log, spawn_with, Backend};
use serde_json::json;
use spiced::log::EventLog;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_and_worker_reach_kafka_over_tls() {
    let ca = TestCa::new();
    let (mut config, dir) = isolated_config(Backend::S3Postgres).await;
    isolate_topics(&mut config);
    let tls_port = free_port();
    // Clients are told to connect to the TLS port only; the broker itself speaks plain TCP.
    let broker = Broker::start_advertising(free_port(), &format!("127.0.0.1:{tls_port}")).await;
    let _tls = Stunnel::start(&ca, tls_port, &broker.addr).await;
    config.kafka.brokers = format!("127.0.0.1:{tls_port}");
    config.kafka.properties.insert("security.protocol".into(), "SSL".into());
    config.kafka.properties.insert("ssl.ca.location".into(), ca.ca.display().to_string());
    let app = spawn_with(config.clone(), dir).await;
    let procs = tempfile::tempdir().unwrap();
    let _relay = Spiced::spawn(&["relay"], &config, procs.path(), &[]);
    let _worker = Spiced::spawn(&["worker"], &config, procs.path(), &[]);
    let (s, b) = app.post("/databases", json!({"name": "tls"})).await;
    assert_eq!(s, 202, "{b}");
    // The command reached the worker through the relay and Kafka, both over TLS.
    let done = app.wait_command(b["command_id"].as_str().unwrap(), Duration::from_secs(60)).await;
    assert_eq!(done["status"], "COMPLETED", "{done}");
}

/// A client that does not trust the broker's CA gets nowhere: the TLS is real.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_over_tls_needs_the_ca() {
    let ca = TestCa::new();
    let (mut config, _dir) = isolated_config(Backend::S3Postgres).await;
    let tls_port = free_port();
    let broker = Broker::start_advertising(free_port(), &format!("127.0.0.1:{tls_port}")).await;
    let _tls = Stunnel::start(&ca, tls_port, &broker.addr).await;
    config.kafka.brokers = format!("127.0.0.1:{tls_port}");
    config.kafka.properties.insert("security.protocol".into(), "SSL".into());
    let untrusted = spiced::bus::kafka::reachable(&config.kafka, Duration::from_secs(5)).await;
    assert!(untrusted.is_err(), "a broker whose CA is not trusted must not be reachable");
    config.kafka.properties.insert("ssl.ca.location".into(), ca.ca.display().to_string());
    spiced::bus::kafka::reachable(&config.kafka, Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_over_https_with_a_private_ca() {
    let ca = TestCa::new();
    let (mut config, dir) = isolated_config(Backend::S3Postgres).await;
    let upstream = config.log.s3.endpoint.trim_start_matches("http://").to_string();
    let port = free_port();
    let _tls = Stunnel::start(&ca, port, &upstream).await;
    config.log.s3.endpoint = format!("https://localhost:{port}");
    config.log.s3.allow_http = false;
    config.log.s3.max_retries = 0;
    let untrusted = EventLog::open(&config.log).unwrap();
    assert!(untrusted.ping().await.is_err(), "an endpoint signed by an unknown CA is refused");
    config.log.s3.ca_file = ca.ca.display().to_string();
    let app = spawn_with(config, dir).await;
    let (s, b) = app.post("/databases", json!({"name": "tls"})).await;
    assert_eq!(s, 202, "{b}");
    let (_, log) = app.storage().await;
    let events = read_whole_log(&log).await;
    assert_eq!(events.len(), 1, "the segment went over HTTPS and reads back");
}

/// A client that trusts `ca` alone, with no pooled connection carried over.
fn trusting(ca: &TestCa) -> reqwest::Client {
    let pem = std::fs::read(&ca.ca).unwrap();
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

async fn healthy(client: &reqwest::Client, url: &str) -> bool {
    client.get(url).send().await.is_ok_and(|r| r.status() == 200)
}

/// `serve.tls` on the API: HTTPS with the configured pair, nothing in clear; SIGHUP picks up a
/// new pair without a restart, and a broken pair on SIGHUP leaves the one in use serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_serves_tls_and_reloads_its_certificate_on_sighup() {
    let (first, second) = (TestCa::new(), TestCa::new());
    let (mut config, dir) = isolated_config(Backend::LocalSqlite).await;
    let (cert, key) = (dir.path().join("api.pem"), dir.path().join("api.key"));
    std::fs::copy(&first.cert, &cert).unwrap();
    std::fs::copy(&first.key, &key).unwrap();
    config.serve.tls.cert_file = cert.display().to_string();
    config.serve.tls.key_file = key.display().to_string();
    let port = free_port();
    let mut serve = Spiced::spawn(&["serve"], &config, dir.path(), &[("SPICED_SERVE__LISTEN", format!("127.0.0.1:{port}"))]);
    let url = format!("https://localhost:{port}/healthz");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !healthy(&trusting(&first), &url).await {
        assert!(serve.is_running() && std::time::Instant::now() < deadline, "serve did not come up over TLS");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!healthy(&trusting(&second), &url).await, "a client that trusts another CA is refused");
    let plain = reqwest::get(format!("http://127.0.0.1:{port}/healthz")).await;
    assert!(!plain.is_ok_and(|r| r.status() == 200), "no plain HTTP on a TLS listener");

    std::fs::copy(&second.cert, &cert).unwrap();
    std::fs::copy(&second.key, &key).unwrap();
    serve.signal("HUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !healthy(&trusting(&second), &url).await {
        assert!(serve.is_running() && std::time::Instant::now() < deadline, "the new pair was not picked up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!healthy(&trusting(&first), &url).await, "the old certificate is no longer served");

    std::fs::write(&key, "not a key").unwrap();
    serve.signal("HUP");
    let metrics = format!("https://localhost:{port}/metrics");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = trusting(&second).get(&metrics).send().await.unwrap().text().await.unwrap();
        if text.contains("spiced_tls_reload_failures_total 1") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the failed reload is not counted: {text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(serve.is_running(), "a broken pair on SIGHUP does not stop serve");
    assert!(healthy(&trusting(&second), &url).await, "the pair in use keeps serving");
}

/// A key that does not belong to the certificate stops the start with a reason naming both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mismatched_tls_pair_stops_serve_at_start() {
    let (first, second) = (TestCa::new(), TestCa::new());
    let (mut config, dir) = isolated_config(Backend::LocalSqlite).await;
    config.serve.tls.cert_file = first.cert.display().to_string();
    config.serve.tls.key_file = second.key.display().to_string();
    config.serve.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let out = Spiced::output(&["serve"], &config, dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("not a usable pair") && stderr.contains("server.key"), "{stderr}");
}

/// SASL through `kafka.properties`, set from the environment as a deployment would
/// (`SPICED_KAFKA__PROPERTIES__SASL_PASSWORD` for `sasl.password`): against a broker that
/// requires authentication, librdkafka runs the SCRAM exchange and the refusal reaches the
/// operator by name. (The test broker keeps SCRAM users only in the process that created them
/// and refuses creating them on an authenticating broker, so a login that succeeds cannot be
/// shown here; README, "Limits".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_sasl_scram_is_spoken_and_a_refused_login_is_named() {
    let port = free_port();
    let broker = Broker::start_with(port, &format!("127.0.0.1:{port}"), &["--authentication"]).await;
    let (mut config, dir) = isolated_config(Backend::LocalSqlite).await;
    config.kafka.brokers = broker.addr.clone();
    for (k, v) in [("security.protocol", "SASL_PLAINTEXT"), ("sasl.mechanism", "SCRAM-SHA-256"), ("sasl.username", "spiced")] {
        config.kafka.properties.insert(k.into(), v.into());
    }
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_spiced"));
    let file = dir.path().join("sasl.toml");
    std::fs::write(&file, toml::to_string(&config).unwrap()).unwrap();
    let out = cmd
        .args(["dlq", "list", "--config"])
        .arg(&file)
        .env("SPICED_DATABASE__URL", config.database.url.expose())
        .env("SPICED_KAFKA__PROPERTIES__SASL_PASSWORD", "not-the-password")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("SASL") && stderr.contains("SCRAM"), "the refusal is named: {stderr}");
    assert!(!stderr.contains("not-the-password"), "the password is not printed: {stderr}");
}

/// `systemctl reload spiced-serve` (SIGHUP) with `serve.tls` off says there is nothing to reload
/// and leaves serve running: SIGHUP's default action would end the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_without_tls_leaves_serve_running() {
    let (config, dir) = isolated_config(Backend::LocalSqlite).await;
    let port = free_port();
    let log = dir.path().join("serve.log");
    let mut serve = Spiced::spawn_logging(&["serve"], &config, dir.path(), &[("SPICED_SERVE__LISTEN", format!("127.0.0.1:{port}"))], &log);
    let url = format!("http://127.0.0.1:{port}/healthz");
    common::load::wait_ready(&format!("http://127.0.0.1:{port}")).await;
    serve.signal("HUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("nothing to reload") {
        assert!(serve.is_running() && std::time::Instant::now() < deadline, "SIGHUP was not handled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(serve.is_running(), "serve still runs after SIGHUP");
    assert!(healthy(&common::http(), &url).await);
}
