//! Operations metrics and listeners: the serve role's separate operations listener, consumer
//! lag per handler, and the relay's lag in events, against the real services.

mod common;

use common::kafka::isolate_topics;
use common::{isolated_config, spawn_with, Backend};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;
use spiced::config::{Secret, TokenConfig};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);
const ADMIN: &str = "admin-token-0123456789";

/// The value of the sample `series` (name and labels, as rendered) in this process's metrics.
fn sample(series: &str) -> Option<f64> {
    let text = spiced::telemetry::metrics().render();
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Waits (bounded) until `series` has the value `want`.
async fn wait_sample(series: &str, want: f64) {
    let deadline = Instant::now() + WAIT;
    while sample(series) != Some(want) {
        assert!(Instant::now() < deadline, "{series} is {:?}, not {want}", sample(series));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (bounded) until `url` answers 200, and returns the body.
async fn get_ok(http: &reqwest::Client, url: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(r) = http.get(url).send().await {
            if r.status() == 200 {
                return r.text().await.unwrap();
            }
        }
        assert!(Instant::now() < deadline, "{url} did not answer 200");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// With tokens configured, the API's /metrics wants the admin scope; the operations listener
/// serves /metrics, /healthz and /readyz to anyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serve_answers_metrics_without_a_token_on_its_operations_listener() {
    common::init_tracing();
    let (mut config, _dir) = isolated_config(Backend::LocalSqlite).await;
    config.auth.tokens = vec![TokenConfig { name: "ops".into(), scope: spiced::config::Scope::Admin, token: Secret::new(ADMIN) }];
    let api = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ops = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (api_addr, ops_addr) = (api.local_addr().unwrap(), ops.local_addr().unwrap());
    config.serve.ops_listen = ops_addr.to_string();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(spiced::serve::run_with_ops(config, api, Some(ops), shutdown.clone()));
    let http = common::http();

    get_ok(&http, &format!("http://{ops_addr}/readyz")).await;
    get_ok(&http, &format!("http://{ops_addr}/healthz")).await;
    // A request on the API, so the metrics have something of serve's to show.
    get_ok(&http, &format!("http://{api_addr}/healthz")).await;
    let metrics = get_ok(&http, &format!("http://{ops_addr}/metrics")).await;
    assert!(metrics.contains("spiced_http_requests_total{route=\"/healthz\""), "{metrics}");
    let api_metrics = http.get(format!("http://{api_addr}/metrics")).send().await.unwrap();
    assert_eq!(api_metrics.status(), 401, "the API port still wants a token for /metrics");
    let api_metrics = http.get(format!("http://{api_addr}/metrics")).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(api_metrics.status(), 200);

    shutdown.cancel();
    server.await.unwrap().unwrap();
}

/// `serve.ops_listen` is bound at start: a taken address fails serve with the key's name.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serve_fails_at_start_when_its_operations_address_is_taken() {
    let (mut config, _dir) = isolated_config(Backend::LocalSqlite).await;
    let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
    config.serve.ops_listen = taken.local_addr().unwrap().to_string();
    let api = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = spiced::serve::run_on(config, api, CancellationToken::new()).await.unwrap_err();
    assert!(err.to_string().contains("serve.ops_listen"), "{err}");
}

/// Lag = high watermark - position, summed over the assigned partitions, and exported under
/// the handler's label.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consumer_lag_counts_the_messages_not_yet_consumed() {
    let (mut config, _dir) = isolated_config(Backend::LocalSqlite).await;
    isolate_topics(&mut config);
    // No relay here, so no lease to stay under: a fresh producer's first delivery to a new
    // topic also waits for its metadata, and 1 s was seen to run out on a loaded machine.
    config.kafka.message_timeout_ms = 10_000;
    let topic = config.topics.instance_events.clone();
    spiced::bus::kafka::ensure_topics(&config.kafka, std::slice::from_ref(&topic)).await.unwrap();
    let producer = spiced::bus::kafka::producer(&config.kafka).unwrap();
    for i in 0..5 {
        let key = format!("k{i}");
        producer.send(FutureRecord::to(&topic).key(&key).payload("x"), Duration::from_secs(10)).await.unwrap();
    }
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("group.id", format!("{}-lag", config.worker.group_prefix))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    for partition in 0..config.kafka.partitions {
        assignment.add_partition_offset(&topic, partition, Offset::Beginning).unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let consumer = std::sync::Arc::new(consumer);
    let lag = |c: std::sync::Arc<StreamConsumer>| async move {
        tokio::task::spawn_blocking(move || spiced::bus::kafka::consumer_lag(&*c)).await.unwrap()
    };
    assert_eq!(lag(consumer.clone()).await, Some(5), "nothing consumed yet");
    for _ in 0..2 {
        tokio::time::timeout(WAIT, consumer.recv()).await.expect("a message").unwrap();
    }
    assert_eq!(lag(consumer.clone()).await, Some(3));

    let stop = CancellationToken::new();
    let stage = spiced::liveness::register("lag-test", Duration::from_secs(60));
    let export = spiced::bus::kafka::spawn_lag_export(consumer.clone(), "lag-test", Duration::from_millis(50), stop.clone(), stage.clone());
    wait_sample("spiced_consumer_lag_messages{handler=\"lag-test\"}", 3.0).await;
    assert!(stage.has_work(), "unread messages are work waiting for the stage");
    stop.cancel();
    export.await.unwrap();
}

/// `spiced_relay_lag_events` counts envelopes after the relay checkpoint: all of them while
/// nothing can be published, none once a relay with a broker has caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_lag_in_events_counts_what_is_not_published() {
    use spiced::relay::{run_with, RelayOptions};
    let (mut config, dir) = isolated_config(Backend::S3Postgres).await;
    isolate_topics(&mut config);
    let app = spawn_with(config.clone(), dir).await;
    for name in ["a", "b", "c"] {
        let (s, b) = app.post("/databases", json!({"name": name})).await;
        assert_eq!(s, 202, "{b}");
    }
    // No broker: nothing is published, so every envelope is lag.
    let mut stuck = config.clone();
    stuck.kafka.brokers = "127.0.0.1:1".into();
    stuck.relay.create_topics = false;
    let stop = CancellationToken::new();
    let relay = tokio::spawn(run_with(stuck, RelayOptions::default(), stop.clone(), Default::default()));
    wait_sample("spiced_relay_lag_events", 3.0).await;
    stop.cancel();
    relay.await.unwrap().unwrap();

    let stop = CancellationToken::new();
    let relay = tokio::spawn(run_with(config, RelayOptions::default(), stop.clone(), Default::default()));
    wait_sample("spiced_relay_lag_events", 0.0).await;
    stop.cancel();
    relay.await.unwrap().unwrap();
    app.stop().await;
}

/// The processed clock: a worker exports the log position of the last command it finished
/// (the relay's header), per handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_export_the_log_position_they_have_processed() {
    use spiced::relay::{run_with, RelayOptions};
    let (mut config, dir) = isolated_config(Backend::S3Postgres).await;
    isolate_topics(&mut config);
    let app = spawn_with(config.clone(), dir).await;
    let stop = CancellationToken::new();
    let relay = tokio::spawn(run_with(config.clone(), RelayOptions::default(), stop.clone(), Default::default()));
    let workers = {
        let (config, stop) = (config.clone(), stop.clone());
        tokio::spawn(async move { spiced::worker::run_roles(config, &[spiced::routing::Role::Ontology], stop).await })
    };
    let mut last = String::new();
    for name in ["p", "q", "r"] {
        let (s, b) = app.post("/databases", json!({"name": name})).await;
        assert_eq!(s, 202, "{b}");
        last = b["command_id"].as_str().unwrap().to_string();
    }
    let status = app.wait_command(&last, WAIT).await;
    assert_eq!(status["status"], "COMPLETED", "{status}");
    let (db, _) = app.storage().await;
    let position = db.index.position_of(last.parse().unwrap()).await.unwrap().expect("in the log");
    wait_sample("spiced_worker_processed_position{handler=\"ontology-worker\"}", position as f64).await;
    // The same clock in GET /api/v1/status, from the stage's next report (every 5 s).
    let deadline = Instant::now() + WAIT;
    loop {
        let (s, status) = app.get("/status").await;
        assert_eq!(s, 200, "{status}");
        let worker = status["stages"].as_array().unwrap().iter().find(|r| r["stage"] == "worker:ontology");
        if let Some(w) = worker.filter(|w| w["position"]["position"].as_u64() >= Some(position)) {
            let (at, head) = (w["position"]["position"].as_u64().unwrap(), status["log_head"].as_u64().unwrap());
            assert_eq!(w["position"]["behind"].as_u64(), Some(head - at), "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "the worker's position never reached {position}: {status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.cancel();
    relay.await.unwrap().unwrap();
    workers.await.unwrap().unwrap();
    app.stop().await;
}

/// A scrape of a serve that committed a few commands: every metric has `# HELP` and
/// `# TYPE`, and the group-commit batch size lands in count buckets, not in `+Inf`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scrape_describes_every_metric_and_buckets_batch_sizes() {
    let (config, dir) = isolated_config(Backend::LocalSqlite).await;
    let app = spawn_with(config, dir).await;
    for name in ["h1", "h2"] {
        let (s, b) = app.post("/databases", json!({"name": name})).await;
        assert_eq!(s, 202, "{b}");
    }
    let text = spiced::telemetry::metrics().render();
    let typed: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next()).collect();
    assert!(typed.contains(&"spiced_group_commit_batch_size"), "{text}");
    for name in &typed {
        assert!(text.contains(&format!("# HELP {name} ")), "{name} has no # HELP line:\n{text}");
    }
    // One command per segment here (each post waits for its 202): both land in the first
    // bucket. Other tests of this process may add theirs.
    assert!(sample("spiced_group_commit_batch_size_bucket{le=\"1\"}").is_some_and(|n| n >= 2.0), "{text}");
    assert!(text.contains("spiced_group_commit_batch_size_bucket{le=\"2000\"}"), "{text}");
    assert!(text.contains("spiced_http_request_duration_seconds_bucket{route=\"/api/v1/databases\",method=\"POST\",le=\"0.001\"}"), "{text}");
    app.stop().await;
}
