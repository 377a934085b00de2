//! What every role starts from: the event log and the database (log index, registry, read
//! models, checkpoints and the relay lease), opened from the config. Roles get their storage
//! here, never from one another.

use crate::config::Config;
use crate::db::Database;
use crate::log::EventLog;

/// Opens the database (migrating if configured) and the log.
pub async fn open(config: &Config) -> anyhow::Result<(Database, EventLog)> {
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
