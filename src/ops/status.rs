//! `spiced status`: where each stage of the pipeline is, as one table. The four clocks:
//! allocated (the index head), committed (the log itself), published (the relay checkpoint),
//! processed (commands that have their outcome, and the embedded workers' checkpoint), and
//! how far the read models (the projection) have applied the log, with how many events the
//! read store refused (recorded in `projection_failures`, missing from the read models).

use crate::config::Config;
use crate::db::Database;
use crate::envelope::Kind;
use crate::log::EventLog;

pub struct Status {
    pub index_head: u64,
    pub log_head: u64,
    pub relay_checkpoint: u64,
    pub embedded_checkpoint: u64,
    /// Log position the read models have applied; `None` when they cannot be read (no
    /// projection has set them up yet).
    pub projection: Option<u64>,
    /// Events the live read models are missing because the read store refused them; `None`
    /// when they cannot be counted.
    pub projection_failures: Option<usize>,
    pub commands: usize,
    pub outcomes: usize,
}

/// Reads every clock. The log head is found by probing past the index head (one GET each),
/// so it costs nothing like a listing.
pub async fn read(config: &Config) -> anyhow::Result<Status> {
    let db = Database::open(&config.database).await?;
    let log = EventLog::open(&config.log)?;
    let index_head = db.index.head().await?;
    let mut log_head = index_head;
    while log.get_segment(log_head + 1).await?.is_some() {
        log_head += 1;
    }
    let rows = db.index.all_rows().await?;
    Ok(Status {
        index_head,
        log_head,
        relay_checkpoint: db.checkpoint(&config.relay.name).await?,
        embedded_checkpoint: db.checkpoint(crate::worker::embedded::CHECKPOINT).await?,
        projection: projection_position(&db).await,
        projection_failures: projection_failures(&db).await,
        commands: rows.iter().filter(|r| r.kind == Kind::Command).count(),
        outcomes: rows.iter().filter(|r| r.kind == Kind::Domain).count(),
    })
}

/// The read models' position; a missing read-model schema is reported, not fatal, since the
/// other clocks are still worth printing.
async fn projection_position(db: &Database) -> Option<u64> {
    match db.projection_position().await {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the projection's position");
            None
        }
    }
}

/// The live read models' recorded failures, reported like their position when unreadable.
async fn projection_failures(db: &Database) -> Option<usize> {
    match db.projection_failures(&crate::db::read::ReadSchema::live()).await {
        Ok(f) => Some(f.len()),
        Err(e) => {
            tracing::warn!(error = %e, "cannot count the projection's recorded failures");
            None
        }
    }
}

pub fn print(s: &Status) {
    println!("{:<34} {:>12} {:>12}", "clock", "position", "behind");
    println!("{:<34} {:>12} {:>12}", "committed to the log (segments)", s.log_head, "-");
    println!("{:<34} {:>12} {:>12}", "allocated (index head)", s.index_head, s.log_head - s.index_head.min(s.log_head));
    println!("{:<34} {:>12} {:>12}", "published to Kafka (relay)", s.relay_checkpoint, s.log_head.saturating_sub(s.relay_checkpoint));
    println!("{:<34} {:>12} {:>12}", "embedded workers (spiced dev)", s.embedded_checkpoint, s.log_head.saturating_sub(s.embedded_checkpoint));
    match s.projection {
        Some(p) => println!("{:<34} {:>12} {:>12}", "read models (projection)", p, s.log_head.saturating_sub(p)),
        None => println!("{:<34} {:>12} {:>12}", "read models (projection)", "-", "-"),
    }
    // How many events the read models lack although their position is past them: the
    // "behind" column, like the other clocks' distance from the log.
    let refused = s.projection_failures.map_or("-".to_string(), |n| n.to_string());
    println!("{:<34} {:>12} {:>12}", "read models: events refused", "-", refused);
    if s.projection_failures.is_some_and(|n| n > 0) {
        println!("  (`spiced project failures` lists them; fix the cause, then `spiced project failures retry`)");
    }
    println!(
        "{:<34} {:>12} {:>12}",
        "commands with an outcome",
        s.outcomes,
        s.commands.saturating_sub(s.outcomes)
    );
}
