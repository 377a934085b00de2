//! Metrics (Prometheus text format) and the operations listener that every role can expose:
//! `/metrics`, `/healthz`, `/readyz`.

use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Instant;
use tokio_util::sync::CancellationToken;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's metrics recorder, installed on first use.
pub fn metrics() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full("spiced_http_request_duration_seconds".into()), SECONDS_BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full("spiced_group_commit_batch_size".into()), BATCH_BUCKETS))
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full("spiced_log_commit_step_seconds".into()), STEP_BUCKETS))
            .expect("bucket lists are not empty")
            .install_recorder()
            .expect("spiced installs the only metrics recorder");
        describe();
        handle
    })
}

/// Request latencies: 1 ms to 10 s.
const SECONDS_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// A commit step's latency: 0.1 ms (a look-up on a local server) to 5 s.
const STEP_BUCKETS: &[f64] = &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

/// Events per segment: one command alone up to `writer.max_batch_events` (2,000 by default).
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0];

/// Every metric spiced exports, with its `# HELP` line (a scrape shows a metric once it has
/// a value). `tests/metrics.rs` holds each exported name to this list.
pub const METRICS: &[(&str, &str)] = &[
    ("spiced_http_requests_total", "HTTP requests answered, by route, method and status"),
    ("spiced_http_request_duration_seconds", "HTTP request latency in seconds, by route and method"),
    ("spiced_http_connections_refused_total", "connections refused with 503 past serve.max_connections"),
    ("spiced_http_request_timeouts_total", "requests cut off with 503 by serve.request_timeout_ms"),
    ("spiced_tls_reload_failures_total", "SIGHUP reloads of serve.tls that failed (the old certificate stays)"),
    ("spiced_log_segments_total", "log segments this process wrote"),
    ("spiced_log_appends_total", "events this process appended to the log"),
    ("spiced_group_commit_batch_size", "events per log segment (group-commit batch)"),
    ("spiced_log_commit_step_seconds", "seconds per step of a batch's commit (lookup or lookup_behind_commit, put, record, commit; pipelined: reserve, put, publish)"),
    ("spiced_log_head_position", "highest log position this process committed"),
    ("spiced_log_repairs_total", "log index rows repaired from a segment a crashed writer left"),
    ("spiced_s3_requests_total", "requests to the log store, by kind (put, get, list)"),
    ("spiced_s3_errors_total", "failed requests to the log store, by kind (put, get, list)"),
    ("spiced_database_errors_total", "errors returned by the database or its pool, by backend, retried or not"),
    ("spiced_kafka_producers_replaced_total", "Kafka producers replaced after a stall or fatal error"),
    ("spiced_consumer_lag_messages", "messages the consumer group has not committed yet, by handler"),
    ("spiced_relay_published_position", "highest log position the relay published to Kafka"),
    ("spiced_relay_log_head_position", "log head as the relay last read it"),
    ("spiced_relay_lag_positions", "log positions written but not yet published"),
    ("spiced_relay_lag_seconds", "age in seconds of the oldest unpublished segment"),
    ("spiced_relay_lag_events", "events written but not yet published"),
    ("spiced_relay_events_published_total", "events the relay published to Kafka"),
    ("spiced_relay_dead_letters_total", "envelopes the relay sent to its dead-letter topic"),
    ("spiced_relay_produce_errors_total", "Kafka produce attempts that failed (retried)"),
    ("spiced_relay_step_downs_total", "times the relay gave up its lease because it could not progress"),
    ("spiced_worker_processed_position", "highest log position of a command this handler finished"),
    ("spiced_worker_claims_total", "claims of a command in processed_events, by handler and outcome"),
    ("spiced_worker_leases_lost_total", "commands whose lease another worker took over, by handler"),
    ("spiced_worker_fences_total", "lease checks right before an outcome append, by handler and how the lease was confirmed (clock: within heartbeat_ms; registry: a heartbeat)"),
    ("spiced_worker_retries_total", "failed attempts that will be retried, by handler"),
    ("spiced_worker_dead_letters_total", "commands that failed for good (dead letters), by handler"),
    ("spiced_worker_gap_waits_total", "waits for the outcome of an aggregate's previous sequence, by handler"),
    ("spiced_projection_position", "highest log position applied to the read models"),
    ("spiced_projection_events_total", "events the projection consumed"),
    ("spiced_projection_failures_total", "events the read store refused for their content"),
    ("spiced_projection_failures", "projection failures recorded now, waiting for an operator"),
    ("spiced_projection_skipped_total", "messages skipped: not an EventEnvelope, or not in the log"),
    ("spiced_stage_seconds_since_progress", "seconds since the stage last made progress, by stage"),
    ("spiced_stage_work_waiting", "1 when the stage has work waiting, by stage"),
    ("spiced_stage_stalled", "1 when the stage has work waiting and made no progress within its bound, by stage"),
];

/// The histograms among [`METRICS`]; the rest are counters (`_total`) and gauges.
const HISTOGRAMS: &[&str] =
    &["spiced_http_request_duration_seconds", "spiced_log_commit_step_seconds", "spiced_group_commit_batch_size"];

fn describe() {
    for &(name, help) in METRICS {
        if name.ends_with("_total") {
            metrics::describe_counter!(name, help);
        } else if HISTOGRAMS.contains(&name) && name.ends_with("_seconds") {
            metrics::describe_histogram!(name, metrics::Unit::Seconds, help);
        } else if HISTOGRAMS.contains(&name) {
            metrics::describe_histogram!(name, help);
        } else {
            metrics::describe_gauge!(name, help);
        }
    }
}

/// `GET /metrics` of every role: the Prometheus text.
pub async fn render() -> impl IntoResponse {
    crate::liveness::export();
    ([("content-type", "text/plain; version=0.0.4")], metrics().render())
}

/// Counts requests and their latency by route, method and status.
pub async fn track_http(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = request.method().to_string();
    let started = Instant::now();
    // Every log line of the request carries its route; a command adds its id (`serve::commands`).
    let span = tracing::info_span!("request", method = %method, route = %route);
    let response = tracing::Instrument::instrument(next.run(request), span).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("spiced_http_requests_total", "route" => route.clone(), "method" => method.clone(), "status" => status)
        .increment(1);
    // By method too: a command (POST, PUT, DELETE) waits for its segment to be durable, a
    // read does not, and the dashboards show the two apart.
    metrics::histogram!("spiced_http_request_duration_seconds", "route" => route, "method" => method)
        .record(started.elapsed().as_secs_f64());
    response
}

/// A readiness check: `Ok` when the role's dependencies answer.
pub type Readiness = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), NotReady>> + Send>> + Send + Sync>;

/// Why a role is not ready: written to its log, never into the probe's answer.
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    #[error("{dependency}: {reason}")]
    Failed { dependency: &'static str, reason: String },
    #[error("{dependency}: no answer within {PING_TIMEOUT:?}")]
    NoAnswer { dependency: &'static str },
    /// A stage that cannot make progress now (`liveness::Stage::trouble`).
    #[error("{0}")]
    Stage(String),
}

async fn ready(State(check): State<Readiness>) -> Response {
    match check().await {
        Ok(()) => (StatusCode::OK, axum::Json(serde_json::json!({"status": "ready"}))).into_response(),
        // The operations endpoints answer anyone: ready or not, never the dependency's error
        // text (the role's log and `spiced status` have it).
        Err(e) => {
            tracing::debug!(error = %e, "not ready");
            (StatusCode::SERVICE_UNAVAILABLE, axum::Json(serde_json::json!({"status": "unavailable"}))).into_response()
        }
    }
}

/// The operations listener of a role without an API (relay, worker): bound at start so a
/// taken port fails the role at once; serves until the returned guard is dropped.
pub async fn start_ops(listen: &str, readiness: Readiness) -> anyhow::Result<OpsGuard> {
    let listener = bind_ops(listen, "the metrics address").await?;
    Ok(start_ops_on(listener, readiness))
}

/// Binds an operations address; `None` when it is empty (disabled). `key` names the setting
/// in the error.
pub async fn bind_ops(listen: &str, key: &str) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    if listen.is_empty() {
        return Ok(None);
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {key} {listen}: {e}"))?;
    Ok(Some(listener))
}

/// Serves the operations endpoints on an already bound listener (if any) until the returned
/// guard is dropped.
pub fn start_ops_on(listener: Option<tokio::net::TcpListener>, readiness: Readiness) -> OpsGuard {
    let stop = CancellationToken::new();
    let task = listener.map(|l| tokio::spawn(serve_ops(l, readiness, stop.clone())));
    OpsGuard { stop, task }
}

/// Stops the operations listener when dropped.
pub struct OpsGuard {
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Drop for OpsGuard {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            drop(task);
        }
    }
}

/// The operations endpoints answer probes and scrapers: a few connections, quick requests.
const OPS_LIMITS: crate::http::Limits = crate::http::Limits {
    header_read_timeout: std::time::Duration::from_secs(10),
    max_connections: 64,
    retry_after_secs: 1,
    grace: std::time::Duration::from_secs(1),
};

async fn serve_ops(listener: tokio::net::TcpListener, readiness: Readiness, shutdown: CancellationToken) -> anyhow::Result<()> {
    metrics();
    let app = Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }))
        .route("/readyz", get(ready))
        .with_state(readiness);
    tracing::info!(addr = %listener.local_addr()?, "operations endpoints listening");
    crate::http::serve(listener, app, None, OPS_LIMITS, shutdown).await?;
    Ok(())
}

/// Readiness of the storage every role uses: the log store and the database.
pub fn storage_readiness(db: crate::db::Database, log: crate::log::EventLog) -> Readiness {
    readiness(db, log, Vec::new())
}

/// How long a readiness probe waits for each dependency.
const PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Readiness of a role: its storage answers, and none of its `stages` is failing (its last
/// attempt failed and nothing moved since) or stalled.
pub fn readiness(db: crate::db::Database, log: crate::log::EventLog, stages: Vec<Arc<crate::liveness::Stage>>) -> Readiness {
    Arc::new(move || {
        let (db, log, stages) = (db.clone(), log.clone(), stages.clone());
        Box::pin(async move {
            let (l, d) = tokio::join!(answers("log", log.ping()), answers("database", db.index.ping()));
            l.and(d)?;
            stages_live(&stages)
        })
    })
}

/// A dependency check, bounded: one that does not answer is not ready either, and a probe
/// must not hang.
pub(crate) async fn answers<E: std::fmt::Display>(
    dependency: &'static str,
    ping: impl Future<Output = Result<(), E>>,
) -> Result<(), NotReady> {
    match tokio::time::timeout(PING_TIMEOUT, ping).await {
        Ok(result) => result.map_err(|e| NotReady::Failed { dependency, reason: e.to_string() }),
        Err(_) => Err(NotReady::NoAnswer { dependency }),
    }
}

/// `Err` naming the first stage that cannot make progress now.
pub fn stages_live(stages: &[Arc<crate::liveness::Stage>]) -> Result<(), NotReady> {
    match stages.iter().find_map(|s| s.trouble()) {
        Some(trouble) => Err(NotReady::Stage(trouble)),
        None => Ok(()),
    }
}
