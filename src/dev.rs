//! `spiced dev`: the whole pipeline in one process on embedded defaults (local disk log,
//! SQLite), for a first run with nothing else installed: the command and query API, the
//! command workers and the projection, all fed straight from the log (no Kafka, no relay).

use crate::config::Config;
use crate::serve::{serve_state, AppState};
use crate::worker::{embedded, Shared};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = crate::serve::bind(&config).await?;
    run_on(config, listener, shutdown).await
}

/// Runs the pipeline with the API on `listener` (tests bind port 0).
pub async fn run_on(config: Config, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    tracing::info!(
        log = %config.log.url,
        database = %config.database.url.redacted(),
        "spiced dev: API and command workers in one process"
    );
    let ops = crate::telemetry::bind_ops(&config.serve.ops_listen, "serve.ops_listen").await?;
    let tasks = TaskTracker::new();
    let shared = Shared::open(&config, &tasks).await?;
    let projection = crate::project::register(&config);
    let ready = crate::telemetry::readiness(shared.db.clone(), shared.log.clone(), vec![projection.clone()]);
    let _ops = crate::telemetry::start_ops_on(ops, ready);
    let (redrive, redrives) = tokio::sync::mpsc::channel(embedded::REDRIVE_QUEUE);
    let state = AppState::with_redrive(config, shared.db.clone(), shared.log.clone(), shared.writer.clone(), Some(redrive))?;
    let reporting = crate::liveness::Reporting::start(shared.db.clone(), vec![projection.clone()], &shutdown);
    let (api, workers, projected) = tokio::join!(
        serve_state(state, listener, shutdown.clone()),
        embedded::run(&shared, &shutdown, redrives),
        crate::project::follow(&shared.db, &shared.log, &shared.config, &projection, &shutdown)
    );
    reporting.finish().await;
    drop(shared);
    tasks.close();
    tasks.wait().await;
    api.and(workers).and(projected)
}
