//! `spiced status`: where each stage of the pipeline is, as one table of its clocks, each a
//! log position: committed (the log itself), allocated (the index head), published (the relay
//! checkpoint; none under `spiced dev`), processed by the embedded
//! workers (only `spiced dev` has them), and applied to the read models (the projection),
//! with how many events the read store refused (recorded in `projection_failures`, missing
//! from the read models); then how many commands have their outcome, and each running stage.

use crate::config::Config;
use crate::db::Database;
use crate::envelope::Kind;
use crate::log::EventLog;

pub struct Status {
    pub index_head: u64,
    pub log_head: u64,
    pub relay_checkpoint: u64,
    pub embedded_checkpoint: u64,
    /// The embedded workers (`spiced dev`) have a cursor and no relay ever ran: the relay's
    /// clock is not used here.
    pub dev: bool,
    /// Log position the read models have applied; `None` when they cannot be read (no
    /// projection has set them up yet).
    pub projection: Option<u64>,
    /// Events the live read models are missing because the read store refused them; `None`
    /// when they cannot be counted.
    pub projection_failures: Option<usize>,
    pub commands: usize,
    pub outcomes: usize,
    /// What each running stage of each process last reported (`stage_liveness`).
    pub stages: Vec<crate::db::StageReport>,
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
    let relay = db.checkpoints.get(&config.relay.name).await?;
    let embedded = db.checkpoints.get(crate::db::EMBEDDED_WORKERS_CHECKPOINT).await?;
    Ok(Status {
        index_head,
        log_head,
        relay_checkpoint: relay.unwrap_or(0),
        embedded_checkpoint: embedded.unwrap_or(0),
        dev: relay.is_none() && embedded.is_some(),
        projection: projection_position(&db).await,
        projection_failures: projection_failures(&db).await,
        commands: rows.iter().filter(|r| r.kind == Kind::Command).count(),
        outcomes: rows.iter().filter(|r| r.kind == Kind::Domain).count(),
        stages: db.stages.all().await?,
    })
}

/// The read models' position; a missing read-model schema is reported, not fatal, since the
/// other clocks are still worth printing.
async fn projection_position(db: &Database) -> Option<u64> {
    match db.read.live_position().await {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the projection's position");
            None
        }
    }
}

/// The live read models' recorded failures, reported like their position when unreadable.
async fn projection_failures(db: &Database) -> Option<usize> {
    match db.read.failures(&crate::db::read::ReadSchema::live()).await {
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
    // A clock nothing in this deployment moves says so, rather than looking like a fault.
    if s.dev {
        println!("{:<34} {:>25}", "published to Kafka (relay)", "not used (spiced dev)");
        println!("{:<34} {:>12} {:>12}", "embedded workers (spiced dev)", s.embedded_checkpoint, s.log_head.saturating_sub(s.embedded_checkpoint));
    } else {
        println!("{:<34} {:>12} {:>12}", "published to Kafka (relay)", s.relay_checkpoint, s.log_head.saturating_sub(s.relay_checkpoint));
        println!("{:<34} {:>25}", "embedded workers (spiced dev)", "not used (workers run)");
    }
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
    print_stages(&s.stages, chrono::Utc::now());
}

/// A report older than this says its process stopped reporting.
const STALE: chrono::TimeDelta = chrono::TimeDelta::seconds(3 * crate::liveness::REPORT_EVERY.as_secs() as i64);

/// One line per running stage: how long since it last moved, whether work waits, and whether
/// its process still reports at all.
fn print_stages(stages: &[crate::db::StageReport], now: chrono::DateTime<chrono::Utc>) {
    println!();
    if stages.is_empty() {
        println!("stages: none reporting (no relay, worker or projection running against this database)");
        return;
    }
    println!("{:<20} {:<28} {:>14} {:>7}  state", "stage", "process", "last progress", "work");
    for r in stages {
        let ago = (now - r.progressed_at).num_milliseconds().max(0) as f64 / 1000.0;
        let state = stage_state(r, now);
        let work = if r.work_waiting { "waiting" } else { "none" };
        println!("{:<20} {:<28} {:>12.1} s {:>7}  {state}", r.stage, r.instance, ago, work);
    }
}

fn stage_state(r: &crate::db::StageReport, now: chrono::DateTime<chrono::Utc>) -> String {
    let silent = now - r.reported_at;
    if silent > STALE {
        return format!("not reporting for {} s (stopped, frozen or cut off)", silent.num_seconds());
    }
    let error = r.last_error.as_deref().map(|e| format!(": {e}")).unwrap_or_default();
    match (r.stalled, r.work_waiting) {
        (true, _) => format!("STALLED{error}"),
        (false, true) if !error.is_empty() => format!("failing{error}"),
        (false, true) => "working".into(),
        (false, false) => "idle".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::StageReport;

    fn report(now: chrono::DateTime<chrono::Utc>, stalled: bool, waiting: bool, error: Option<&str>, reported_secs_ago: i64) -> StageReport {
        StageReport {
            stage: "relay".into(),
            instance: "h-1".into(),
            progressed_at: now,
            work_waiting: waiting,
            stalled,
            last_error: error.map(String::from),
            reported_at: now - chrono::TimeDelta::seconds(reported_secs_ago),
        }
    }

    #[test]
    fn a_stage_reads_as_what_it_last_said_unless_its_process_went_quiet() {
        let now = chrono::Utc::now();
        assert_eq!(stage_state(&report(now, false, false, None, 0), now), "idle");
        assert_eq!(stage_state(&report(now, false, true, None, 0), now), "working");
        assert_eq!(stage_state(&report(now, false, true, Some("broker down"), 0), now), "failing: broker down");
        assert_eq!(stage_state(&report(now, true, true, Some("broker down"), 0), now), "STALLED: broker down");
        assert!(stage_state(&report(now, false, false, None, 60), now).starts_with("not reporting for 60 s"));
    }
}
