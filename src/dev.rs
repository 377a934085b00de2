//! `spiced dev`: the whole pipeline in one process on embedded defaults (local disk log,
//! SQLite), for a first run with nothing else installed.
//!
//! Today it runs the command API; the relay, workers and projections join it as they land.

use crate::config::Config;
use tokio_util::sync::CancellationToken;

pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    tracing::info!(
        log = %config.log.url,
        database = %config.database.url.redacted(),
        listen = %config.serve.listen,
        "spiced dev: embedded single-process pipeline"
    );
    crate::serve::run(config, shutdown).await
}
