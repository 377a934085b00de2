//! `spiced serve`: the HTTP command API in front of the event log.

pub mod auth;
pub mod commands;
pub mod console;
pub mod dead_letters;
pub mod error;
pub mod extract;
pub mod links;
pub mod log_tail;
pub mod named;
pub mod openapi;
pub mod position_watch;
pub mod queries;
pub mod reads;
pub mod schema;

use crate::config::Config;
use crate::db::{Database, LogIndex};
use crate::domain::CommandType;
use crate::log::writer::LogWriter;
use crate::log::EventLog;
use axum::extract::DefaultBodyLimit;
use axum::http::Method;
use axum::routing::MethodRouter;
use axum::Router;
use error::ApiError;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What every handler shares. Every extractor and middleware of every request clones it, so
/// it is one `Arc`: cloning its handles one by one (a dozen reference counts and the log's
/// path strings) was about 6 % of `serve`'s CPU at saturation (issue 17).
#[derive(Clone)]
pub struct AppState(Arc<Handles>);

impl std::ops::Deref for AppState {
    type Target = Handles;

    fn deref(&self) -> &Handles {
        &self.0
    }
}

/// The handles behind an [`AppState`].
pub struct Handles {
    pub config: Arc<Config>,
    pub auth: auth::Auth,
    pub db: Database,
    pub log: EventLog,
    pub writer: LogWriter,
    /// The read models' position, watched once for every `?min_version` read.
    pub positions: Arc<position_watch::PositionWatch>,
    /// Databases and classes known to be named in the log.
    pub named: Arc<named::Named>,
    /// `spiced dev`: the workers run in this process from the log, with no Kafka; a dead
    /// letter's re-drive goes to them through this queue.
    pub embedded_redrive: Option<tokio::sync::mpsc::Sender<crate::bus::redrive::Redrive>>,
}

impl AppState {
    /// Builds the state, loading the tokens, and refuses an open API on a public address.
    pub fn new(config: Config, db: Database, log: EventLog, writer: LogWriter) -> anyhow::Result<AppState> {
        AppState::with_redrive(config, db, log, writer, None)
    }

    /// [`AppState::new`], with `spiced dev`'s queue to its embedded workers.
    pub fn with_redrive(
        config: Config,
        db: Database,
        log: EventLog,
        writer: LogWriter,
        embedded_redrive: Option<tokio::sync::mpsc::Sender<crate::bus::redrive::Redrive>>,
    ) -> anyhow::Result<AppState> {
        let auth = auth::Auth::from_config(&config.auth)?;
        auth::check_exposure(&auth, config.serve.listen, config.auth.insecure_no_auth)?;
        let positions = position_watch::PositionWatch::start(db.clone(), config.serve.max_version_waiters);
        let config = Arc::new(config);
        Ok(AppState(Arc::new(Handles { config, auth, db, log, writer, positions, named: Default::default(), embedded_redrive })))
    }

    pub fn index(&self) -> &dyn LogIndex {
        self.db.index.as_ref()
    }

    pub fn retry_after(&self) -> u64 {
        self.config.serve.retry_after_secs
    }

    /// `metadata.kafka_topic` of a command's envelope.
    pub fn topic_for(&self, command_type: CommandType) -> &str {
        crate::routing::command_topic(&self.config, command_type)
    }
}

/// One route: a method on a path, its handler, and its operation in the OpenAPI document with
/// the schemas it references, all from the handler's `#[utoipa::path]` annotation, so a path
/// is written once.
pub struct Route {
    pub method: Method,
    pub path: String,
    handler: MethodRouter<AppState>,
    operation: utoipa::openapi::path::Paths,
    schemas: Vec<(String, utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>)>,
}

impl From<utoipa_axum::router::UtoipaMethodRouter<AppState>> for Route {
    fn from((schemas, operation, handler): utoipa_axum::router::UtoipaMethodRouter<AppState>) -> Self {
        let (path, item) = operation.paths.iter().next().expect("a route has one path");
        let method = [
            (Method::GET, item.get.is_some()),
            (Method::POST, item.post.is_some()),
            (Method::PUT, item.put.is_some()),
            (Method::DELETE, item.delete.is_some()),
            (Method::PATCH, item.patch.is_some()),
        ]
        .into_iter()
        .find_map(|(method, used)| used.then_some(method))
        .expect("a route has one of the methods the API uses");
        Route { method, path: path.clone(), handler, operation, schemas }
    }
}

/// Every route of the API: the API under `/api/v1`, plus health and metrics, each one handler
/// (its path and method are in its annotation). `router` and the OpenAPI document are built
/// from this table alone, so what is documented is what is served.
pub fn routes() -> Vec<Route> {
    use commands::*;
    use queries::*;
    use reads::*;
    use utoipa_axum::routes as one;
    vec![
        one!(create_database).into(),
        one!(list_databases).into(),
        one!(get_database).into(),
        one!(delete_database).into(),
        one!(create_class).into(),
        one!(list_classes).into(),
        one!(get_class).into(),
        one!(update_class).into(),
        one!(delete_class).into(),
        one!(create_instance).into(),
        one!(list_instances).into(),
        one!(bulk_create_instances).into(),
        one!(bulk_update_instances).into(),
        one!(bulk_delete_instances).into(),
        one!(get_instance).into(),
        one!(links::get_links).into(),
        one!(update_instance).into(),
        one!(delete_instance).into(),
        one!(get_command).into(),
        one!(get_aggregate).into(),
        one!(get_events).into(),
        one!(get_status).into(),
        one!(log_tail::get_log).into(),
        one!(dead_letters::list_dead_letters).into(),
        one!(dead_letters::get_dead_letter).into(),
        one!(dead_letters::redrive_dead_letter).into(),
        one!(openapi::document).into(),
        one!(console::page).into(),
        one!(healthz).into(),
        one!(readyz).into(),
        one!(metrics).into(),
    ]
}

/// The HTTP API: `routes()` behind the auth, body-limit and metrics layers.
pub fn router(state: AppState) -> Router {
    // Two routes on one path merge into one method router.
    let api = routes().into_iter().fold(Router::new(), |r, route| r.route(&route.path, route.handler));
    api.fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.config.serve.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(state.auth.clone(), auth::check))
        .layer(axum::middleware::from_fn_with_state(state.clone(), request_timeout))
        .layer(axum::middleware::map_response_with_state(state.clone(), retry_after_on_503))
        .layer(axum::middleware::from_fn(crate::telemetry::track_http))
        .with_state(state)
}

/// Every 503 asks the client to come back after `serve.retry_after_secs`, unless its handler
/// chose another wait.
async fn retry_after_on_503(
    axum::extract::State(state): axum::extract::State<AppState>,
    mut response: axum::response::Response,
) -> axum::response::Response {
    use axum::http::{header, HeaderValue, StatusCode};
    if response.status() == StatusCode::SERVICE_UNAVAILABLE && !response.headers().contains_key(header::RETRY_AFTER) {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(state.retry_after()));
    }
    response
}

/// Bounds a request once its head is in (`serve.request_timeout_ms`): reading its body and the
/// handler. A command cut off here may still be committed (it may sit in the writer's queue),
/// so the answer says to retry with the same Idempotency-Key, which finds it if it was.
async fn request_timeout(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let limit = Duration::from_millis(state.config.serve.request_timeout_ms);
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            metrics::counter!("spiced_http_request_timeouts_total").increment(1);
            let message = "the request took longer than serve.request_timeout_ms; retry (a command with the same Idempotency-Key)";
            ApiError::new(axum::http::StatusCode::SERVICE_UNAVAILABLE, "timeout", message).into_response()
        }
    }
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(axum::http::StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this route")
}

/// Runs the API on `config.serve.listen` until `shutdown` fires.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = bind(&config).await?;
    run_on(config, listener, shutdown).await
}

/// Binds `serve.listen`, with an error that names it.
pub async fn bind(config: &Config) -> anyhow::Result<TcpListener> {
    TcpListener::bind(config.serve.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on serve.listen {}: {e}", config.serve.listen))
}

/// Runs the API on an already bound listener (tests bind port 0).
pub async fn run_on(config: Config, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    let ops = crate::telemetry::bind_ops(&config.serve.ops_listen, "serve.ops_listen").await?;
    run_with_ops(config, listener, ops, shutdown).await
}

/// Runs the API, and the unauthenticated operations endpoints (`serve.ops_listen`) on `ops` if
/// given, both on listeners bound by the caller.
pub async fn run_with_ops(
    config: Config,
    listener: TcpListener,
    ops: Option<TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (db, log) = crate::storage::open(&config).await?;
    let _ops = crate::telemetry::start_ops_on(ops, crate::telemetry::storage_readiness(db.clone(), log.clone()));
    let tasks = TaskTracker::new();
    let writer = LogWriter::start(log.clone(), db.index.clone(), config.writer.clone(), &tasks).await?;
    let state = AppState::new(config, db, log, writer)?;
    serve_state(state, listener, shutdown).await?;
    // The router (and with it every writer handle) is gone: the writer drains its queue.
    tasks.close();
    tasks.wait().await;
    Ok(())
}

/// Serves the API over ready-made state until `shutdown`. After it, requests still open at the
/// end of `serve.shutdown_grace_ms` are dropped; appends they queued still reach the log (the
/// writer drains), and their clients learn the outcome by retrying with their Idempotency-Key.
pub async fn serve_state(state: AppState, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    crate::telemetry::metrics();
    let serve = &state.config.serve;
    let tls = load_tls(serve, &shutdown)?;
    let limits = crate::http::Limits {
        header_read_timeout: Duration::from_millis(serve.header_read_timeout_ms),
        max_connections: serve.max_connections,
        retry_after_secs: serve.retry_after_secs,
        grace: Duration::from_millis(serve.shutdown_grace_ms),
    };
    let addr = listener.local_addr()?;
    tracing::info!(%addr, tls = tls.is_some(), "spiced serve listening");
    if tls.is_none() && !addr.ip().is_loopback() && !state.auth.is_open() {
        tracing::warn!(%addr, "serve.listen is not loopback and serve.tls is off: bearer tokens cross the network in clear unless a TLS-terminating proxy is in front");
    }
    crate::systemd::ready();
    crate::http::serve(listener, router(state), tls, limits, shutdown).await?;
    Ok(())
}

/// `serve.tls`, loaded (a bad pair stops the start) and reloaded on SIGHUP; `None` when off.
fn load_tls(serve: &crate::config::ServeConfig, shutdown: &CancellationToken) -> anyhow::Result<Option<crate::http::tls::ServerTls>> {
    let tls = match serve.tls.enabled() {
        true => Some(crate::http::tls::ServerTls::load(serve.tls.cert_file.as_ref(), serve.tls.key_file.as_ref())?),
        false => None,
    };
    crate::http::tls::reload_on_sighup(tls.clone(), shutdown.clone())?;
    Ok(tls)
}
