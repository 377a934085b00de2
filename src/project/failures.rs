//! `spiced project failures [list] | retry [--event-id ID]`: the events a read-model schema is
//! missing because the read store refused them, and their re-application once the cause is
//! fixed (a constraint dropped, a limit raised, a bug in spiced fixed).
//!
//! A retry reads each event from the log at its recorded position (the log is the truth; the
//! failure row only says where to look) and applies it through the same versioned upsert as
//! any late event, so a newer version of the row already applied wins and a database deleted
//! after the event keeps its children out. Applied, the row is deleted; refused again, it
//! stays with one attempt more.

use super::change_of;
use crate::config::Config;
use crate::db::read::{ReadSchema, Refused};
use crate::db::Database;
use crate::log::EventLog;
use uuid::Uuid;

/// What a retry did, event by event.
#[derive(Debug, Default)]
pub struct RetryReport {
    /// Applied and no longer recorded.
    pub applied: Vec<Uuid>,
    /// Refused again: still recorded, one attempt more.
    pub refused: Vec<Refused>,
    /// Recorded, but the log holds no such outcome event at the recorded position: left as
    /// it is for an operator to look at (`spiced log get POSITION`).
    pub not_in_log: Vec<(Uuid, u64)>,
}

/// Prints the recorded failures of `schema`, in log order.
pub async fn list(config: &Config, schema: &ReadSchema) -> anyhow::Result<()> {
    let db = Database::open(&config.database).await?;
    let failures = db.read.failures(schema).await?;
    println!("{} event(s) missing from the read models in {} (refused by the read store)", failures.len(), schema.name());
    for f in &failures {
        println!(
            "position {:>8}  event {}  aggregate {}  attempts {}  first {}  last {}  error: {}",
            f.position,
            f.event_id,
            f.aggregate_id,
            f.attempts,
            f.first_seen_at.to_rfc3339(),
            f.last_seen_at.to_rfc3339(),
            f.error
        );
    }
    if !failures.is_empty() {
        println!("fix the cause, then `spiced project failures retry [--event-id ID]` applies them again");
    }
    Ok(())
}

/// Re-applies the recorded failures of `schema`, or only the one of `event_id`.
pub async fn retry(config: &Config, schema: &ReadSchema, event_id: Option<Uuid>) -> anyhow::Result<RetryReport> {
    let db = Database::open(&config.database).await?;
    let log = EventLog::open(&config.log)?;
    let failures = db.read.failures(schema).await?;
    let wanted: Vec<_> = failures.iter().filter(|f| event_id.is_none_or(|id| f.event_id == id)).collect();
    if let (Some(id), true) = (event_id, wanted.is_empty()) {
        anyhow::bail!("no recorded projection failure for event {id} in {}", schema.name());
    }
    let mut report = RetryReport::default();
    for f in wanted {
        let segment = log.get_segment(f.position).await?;
        let change = segment.as_ref().and_then(|s| {
            s.events.iter().filter(|e| e.event_id == f.event_id).find_map(|e| change_of(e, f.position))
        });
        let Some(change) = change else {
            report.not_in_log.push((f.event_id, f.position));
            continue;
        };
        match db.read.reapply(schema, &change).await? {
            None => report.applied.push(f.event_id),
            Some(refused) => report.refused.push(refused),
        }
    }
    Ok(report)
}

/// Prints a retry's report; an error when anything is still missing, so scripts notice.
pub fn print(report: &RetryReport) -> anyhow::Result<()> {
    for id in &report.applied {
        println!("applied  event {id}: in the read models now, no longer recorded");
    }
    for r in &report.refused {
        println!("refused  event {} at position {} ({}): {}", r.event_id, r.position, r.aggregate_id, r.error);
    }
    for (id, position) in &report.not_in_log {
        println!("missing  event {id}: the log holds no such outcome at position {position} (`spiced log get {position}`)");
    }
    let left = report.refused.len() + report.not_in_log.len();
    anyhow::ensure!(left == 0, "{left} event(s) still missing from the read models");
    Ok(())
}
