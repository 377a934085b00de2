//! Metrics (Prometheus text format) and the operations listener that every role can expose:
//! `/metrics`, `/healthz`, `/readyz`.

use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Instant;
use tokio_util::sync::CancellationToken;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's metrics recorder, installed on first use.
pub fn metrics() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        PrometheusBuilder::new()
            .set_buckets(&[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
            .expect("bucket list is not empty")
            .install_recorder()
            .expect("spiced installs the only metrics recorder")
    })
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
    metrics::counter!("spiced_http_requests_total", "route" => route.clone(), "method" => method, "status" => status)
        .increment(1);
    metrics::histogram!("spiced_http_request_duration_seconds", "route" => route)
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
