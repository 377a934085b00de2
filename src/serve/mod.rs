//! `spiced serve`: the HTTP command API in front of the event log.

pub mod auth;
pub mod commands;
pub mod error;
pub mod extract;
pub mod queries;
pub mod reads;

use crate::config::Config;
use crate::db::{Database, LogIndex};
use crate::domain::CommandType;
use crate::log::writer::LogWriter;
use crate::log::EventLog;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use error::ApiError;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub auth: auth::Auth,
    pub db: Database,
    pub log: EventLog,
    pub writer: LogWriter,
}

impl AppState {
    /// Builds the state, loading the tokens, and refuses an open API on a public address.
    pub fn new(config: Config, db: Database, log: EventLog, writer: LogWriter) -> anyhow::Result<AppState> {
        let auth = auth::Auth::from_config(&config.auth)?;
        auth::check_exposure(&auth, config.serve.listen, config.auth.insecure_no_auth)?;
        Ok(AppState { config: Arc::new(config), auth, db, log, writer })
    }

    pub fn index(&self) -> &dyn LogIndex {
        self.db.index.as_ref()
    }

    pub fn retry_after(&self) -> u64 {
        self.config.serve.retry_after_secs
    }

    pub fn unavailable(&self, cause: &dyn std::fmt::Display) -> ApiError {
        ApiError::unavailable(cause, self.retry_after())
    }

    /// `metadata.kafka_topic` of a command's envelope.
    pub fn topic_for(&self, command_type: CommandType) -> &str {
        let topics = &self.config.topics;
        match command_type.aggregate_type() {
            crate::domain::AggregateType::Database | crate::domain::AggregateType::OntologyClass => {
                &topics.ontology_commands
            }
            crate::domain::AggregateType::Instance => &topics.instance_commands,
        }
    }
}

/// The API routes, all under `/api/v1`, plus health endpoints.
pub fn router(state: AppState) -> Router {
    use commands::*;
    let api = Router::new()
        .route("/databases", post(create_database).get(queries::list_databases))
        .route("/databases/{db}", get(queries::get_database).delete(delete_database))
        .route("/databases/{db}/classes", post(create_class).get(queries::list_classes))
        .route(
            "/databases/{db}/classes/{class_id}",
            get(queries::get_class).put(update_class).delete(delete_class),
        )
        .route(
            "/databases/{db}/classes/{class_id}/instances",
            post(create_instance).get(queries::list_instances),
        )
        .route("/databases/{db}/classes/{class_id}/instances/bulk", post(bulk_create_instances))
        .route(
            "/databases/{db}/classes/{class_id}/instances/{instance_id}",
            get(queries::get_instance).put(update_instance).delete(delete_instance),
        )
        .route("/commands/{command_id}", get(reads::get_command))
        .route("/aggregates/{aggregate_type}/{aggregate_id}", get(reads::get_aggregate))
        .route("/aggregates/{aggregate_type}/{aggregate_id}/events", get(reads::get_events));
    Router::new()
        .nest("/api/v1", api)
        .route("/healthz", get(reads::healthz))
        .route("/metrics", get(crate::telemetry::render))
        .route("/readyz", get(reads::readyz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.config.serve.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(state.auth.clone(), auth::check))
        .layer(axum::middleware::from_fn(crate::telemetry::track_http))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(axum::http::StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this route")
}

/// Opens the database (migrating if configured) and the log.
pub async fn open_storage(config: &Config) -> anyhow::Result<(Database, EventLog)> {
    let db = Database::open(&config.database).await?;
    if config.database.migrate_on_start {
        let applied = db.migrate().await?;
        if !applied.is_empty() {
            tracing::info!(?applied, "applied database migrations");
        }
    }
    let log = EventLog::open(&config.log)?;
    Ok((db, log))
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
    let (db, log) = open_storage(&config).await?;
    let tasks = TaskTracker::new();
    let writer = LogWriter::start(log.clone(), db.index.clone(), config.writer.clone(), &tasks).await?;
    let state = AppState::new(config, db, log, writer)?;
    serve_state(state, listener, shutdown).await?;
    // The router (and with it every writer handle) is gone: the writer drains its queue.
    tasks.close();
    tasks.wait().await;
    Ok(())
}

/// Serves the API over ready-made state until `shutdown`.
pub async fn serve_state(state: AppState, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    crate::telemetry::metrics();
    tracing::info!(addr = %listener.local_addr()?, "spiced serve listening");
    crate::systemd::ready();
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    Ok(())
}
