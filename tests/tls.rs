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
