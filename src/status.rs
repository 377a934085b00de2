//! Where the pipeline stands, read from the shared storage: its clocks, each a log position
//! (committed to the log, allocated in the index, published by the relay, processed by the
//! embedded workers of `spiced dev`, applied to the read models), how far each is behind the
//! log head, and what every running stage of every process last reported (its own position,
//! for a worker role the last command it finished). `GET /api/v1/status` answers it and
//! `spiced status --json` prints it; the table of `spiced status` is drawn from it.
//!
//! Reading it costs a few point queries and one GET per segment past the index head, never a
//! scan, so a console may poll it.

use crate::config::Config;
use crate::db::{Database, DbError, StageReport};
use crate::log::{EventLog, LogError};
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Log(#[from] LogError),
}

/// The pipeline's clocks and stages.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PipelineStatus {
    /// When these were read.
    pub at: DateTime<Utc>,
    /// Highest log position whose segment is stored: the log's own clock, which every other
    /// is behind.
    pub log_head: u64,
    /// Highest position the log index has committed; behind `log_head` only while a writer's
    /// segment is stored and its index rows are not yet (the next writer repairs them).
    pub index_head: Clock,
    /// Published to Kafka: the relay's checkpoint. Null under `spiced dev`, which has no relay.
    pub relay: Option<Clock>,
    /// Processed by the embedded workers of `spiced dev`; null where workers run as their own
    /// role (their positions are in `stages`).
    pub embedded_workers: Option<Clock>,
    /// Applied to the read models; null when the read models are not set up yet.
    pub projection: Option<Clock>,
    /// Events the live read models lack because the read store refused them (`spiced project
    /// failures`); null when they cannot be counted.
    pub projection_refused: Option<usize>,
    /// Every running stage of every process, by stage and process.
    pub stages: Vec<StageStatus>,
}

/// One clock: a log position and how many positions it is behind the log head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub struct Clock {
    pub position: u64,
    pub behind: u64,
}

impl Clock {
    fn of(position: u64, head: u64) -> Clock {
        Clock { position, behind: head.saturating_sub(position) }
    }
}

/// What a stage of a process last reported.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct StageStatus {
    /// `relay`, `worker:<role>` or `projection`.
    pub stage: String,
    /// The process: `host-pid`.
    pub instance: String,
    /// `idle`, `working`, `failing` (its last attempt failed, work waits), `stalled` (no
    /// progress within its bound with work waiting) or `not_reporting` (its process stopped
    /// reporting: stopped, frozen or cut off).
    pub state: String,
    /// The log position it has reached (relay: published; worker role: the last command it
    /// finished; projection: applied); null before it has one.
    pub position: Option<Clock>,
    pub seconds_since_progress: f64,
    pub work_waiting: bool,
    /// Why its last attempt failed, if it has not moved since.
    pub last_error: Option<String>,
    pub reported_at: DateTime<Utc>,
}

/// A report older than this says its process stopped reporting.
const STALE: chrono::TimeDelta = chrono::TimeDelta::seconds(3 * crate::liveness::REPORT_EVERY.as_secs() as i64);

/// Reads every clock. The log head is found by probing past the index head (one GET each).
pub async fn read(config: &Config, db: &Database, log: &EventLog) -> Result<PipelineStatus, StatusError> {
    let index_head = db.index.head().await?;
    let mut log_head = index_head;
    while log.get_segment(log_head + 1).await?.is_some() {
        log_head += 1;
    }
    let relay = db.checkpoints.get(&config.relay.name).await?;
    let embedded = db.checkpoints.get(crate::db::EMBEDDED_WORKERS_CHECKPOINT).await?;
    // The embedded workers have a cursor and no relay ever ran: `spiced dev`.
    let dev = relay.is_none() && embedded.is_some();
    let at = Utc::now();
    Ok(PipelineStatus {
        at,
        log_head,
        index_head: Clock::of(index_head, log_head),
        relay: (!dev).then(|| Clock::of(relay.unwrap_or(0), log_head)),
        embedded_workers: dev.then(|| Clock::of(embedded.unwrap_or(0), log_head)),
        projection: projection_position(db).await.map(|p| Clock::of(p, log_head)),
        projection_refused: projection_refused(db).await,
        stages: db.stages.all().await?.iter().map(|r| stage_status(r, log_head, at)).collect(),
    })
}

/// The read models' position; a missing read-model schema is reported, not fatal, since the
/// other clocks are still worth showing.
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
async fn projection_refused(db: &Database) -> Option<usize> {
    match db.read.failures(&crate::db::read::ReadSchema::live()).await {
        Ok(f) => Some(f.len()),
        Err(e) => {
            tracing::warn!(error = %e, "cannot count the projection's recorded failures");
            None
        }
    }
}

fn stage_status(r: &StageReport, log_head: u64, now: DateTime<Utc>) -> StageStatus {
    StageStatus {
        stage: r.stage.clone(),
        instance: r.instance.clone(),
        state: stage_state(r, now).into(),
        position: r.position.map(|p| Clock::of(p, log_head)),
        seconds_since_progress: (now - r.progressed_at).num_milliseconds().max(0) as f64 / 1000.0,
        work_waiting: r.work_waiting,
        last_error: r.last_error.clone(),
        reported_at: r.reported_at,
    }
}

fn stage_state(r: &StageReport, now: DateTime<Utc>) -> &'static str {
    if now - r.reported_at > STALE {
        return "not_reporting";
    }
    match (r.stalled, r.work_waiting, r.last_error.is_some()) {
        (true, _, _) => "stalled",
        (false, true, true) => "failing",
        (false, true, false) => "working",
        (false, false, _) => "idle",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(now: DateTime<Utc>, stalled: bool, waiting: bool, error: Option<&str>, reported_secs_ago: i64) -> StageReport {
        StageReport {
            stage: "relay".into(),
            instance: "h-1".into(),
            progressed_at: now - chrono::TimeDelta::seconds(3),
            work_waiting: waiting,
            stalled,
            last_error: error.map(String::from),
            reported_at: now - chrono::TimeDelta::seconds(reported_secs_ago),
            position: Some(7),
        }
    }

    #[test]
    fn a_stage_reads_as_what_it_last_said_unless_its_process_went_quiet() {
        let now = Utc::now();
        assert_eq!(stage_state(&report(now, false, false, None, 0), now), "idle");
        assert_eq!(stage_state(&report(now, false, true, None, 0), now), "working");
        assert_eq!(stage_state(&report(now, false, true, Some("broker down"), 0), now), "failing");
        assert_eq!(stage_state(&report(now, true, true, Some("broker down"), 0), now), "stalled");
        assert_eq!(stage_state(&report(now, false, false, None, 60), now), "not_reporting");
    }

    #[test]
    fn a_stage_position_is_measured_from_the_log_head() {
        let now = Utc::now();
        let s = stage_status(&report(now, false, true, None, 0), 10, now);
        assert_eq!(s.position, Some(Clock { position: 7, behind: 3 }));
        assert!((s.seconds_since_progress - 3.0).abs() < 0.01, "{}", s.seconds_since_progress);
    }
}
