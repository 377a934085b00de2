//! `spiced project --rebuild`: the read models rebuilt from the log alone (no Kafka), into a
//! fresh schema, then swapped in for the live one; or, with `--until`, a point-in-time copy
//! left beside the live schema. An event the read store refuses does not stop it: it is
//! recorded under the target's name and the rebuild goes on, like the live projection.

use super::batch_of;
use crate::config::Config;
use crate::db::read::{ReadBatch, ReadSchema};
use crate::db::{Database, DbError};
use crate::log::tail::Tail;
use crate::log::Segment;
use chrono::{DateTime, Utc};
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Segments read and applied per transaction.
const SEGMENTS_PER_BATCH: usize = 256;

/// Where a rebuild stops.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--until {0:?}: expected a log position or an RFC 3339 time")]
pub struct BadUntil(String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// The log head when the rebuild starts (then the swap catches up the rest).
    Head,
    /// This position, inclusive.
    Position(u64),
    /// The last segment whose events all happened at or before this time.
    Time(DateTime<Utc>),
}

impl Until {
    /// A position or an RFC 3339 time.
    pub fn parse(s: &str) -> Result<Until, BadUntil> {
        if let Ok(p) = s.parse::<u64>() {
            return Ok(Until::Position(p));
        }
        DateTime::parse_from_rfc3339(s)
            .map(|t| Until::Time(t.with_timezone(&Utc)))
            .map_err(|_| BadUntil(s.to_string()))
    }

    /// Whether a segment is past the end.
    fn excludes(&self, segment: &Segment) -> bool {
        match self {
            Until::Head => false,
            Until::Position(p) => segment.position > *p,
            Until::Time(t) => segment.events.iter().any(|e| e.occurred_at > *t),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub until: Until,
    /// Default: `spiced_read_rebuild_<UTC timestamp>`.
    pub target: Option<String>,
    /// Keep the result beside the live schema instead of swapping it in (always with `--until`).
    pub no_swap: bool,
}

/// What a rebuild did.
#[derive(Debug, Clone)]
pub struct Report {
    pub target: String,
    /// The position the result reflects (after the swap's catch-up, if swapped).
    pub position: u64,
    /// Events read from the log before the swap.
    pub events: u64,
    /// Events the read store refused, recorded in `projection_failures` under the target's
    /// name (the live name once swapped in): missing from the result until re-applied.
    pub refused: usize,
    pub elapsed: Duration,
    pub swapped: bool,
}

impl Report {
    pub fn events_per_second(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

pub async fn run(config: &Config, options: Options) -> anyhow::Result<Report> {
    let (db, log) = crate::storage::open(config).await?;
    let target = match &options.target {
        Some(name) => ReadSchema::named(name)?,
        None => ReadSchema::named(&format!("spiced_read_rebuild_{}", Utc::now().format("%Y%m%d%H%M%S")))?,
    };
    db.read.create_schema(&target).await?;
    let tail = Tail::new(log, db.index.clone());
    let started = Instant::now();
    let head = tail.head().await?;
    let end = match options.until {
        Until::Position(p) => p.min(head),
        _ => head,
    };
    let mut meter = Meter::new(end);
    let (position, events, mut refused) = fill(&db, &tail, &target, options.until, end, &mut meter).await?;
    db.read.complete(&target).await?;
    let swap = options.until == Until::Head && !options.no_swap;
    // The swap applies what was written since `end` (a few segments) under its lock.
    let position = if swap {
        let applied = db.read.swap(&target, &|from, to| Box::pin(segments_batches(&tail, from, to))).await?;
        super::note_refused(&applied.refused);
        refused += applied.refused.len();
        applied.position
    } else {
        position
    };
    meter.finish();
    Ok(Report { target: target.name().to_string(), position, events, refused, elapsed: started.elapsed(), swapped: swap })
}

/// Applies the log to `target` from its position up to `end` (or the first segment past
/// `until`). Returns the position reached, the events read and how many the read store refused.
async fn fill(
    db: &Database,
    tail: &Tail,
    target: &ReadSchema,
    until: Until,
    end: u64,
    meter: &mut Meter,
) -> anyhow::Result<(u64, u64, usize)> {
    let mut next = db.read.position(target).await? + 1;
    let (mut events, mut refused) = (0, 0);
    while next <= end {
        let mut segments = next_segments(tail, next, end).await?;
        let stop = segments.iter().position(|s| until.excludes(s));
        if let Some(i) = stop {
            segments.truncate(i);
        }
        if !segments.is_empty() {
            events += segments.iter().map(|s| s.events.len() as u64).sum::<u64>();
            let applied = db.read.apply(target, &batch_of(&segments)).await?;
            super::note_refused(&applied.refused);
            refused += applied.refused.len();
            next = applied.position + 1;
            meter.tick(next - 1, events);
        }
        if stop.is_some() {
            break;
        }
    }
    Ok((next - 1, events, refused))
}

/// Up to [`SEGMENTS_PER_BATCH`] segments from `next`, none past `end`; every position up to
/// `end` (at most the index head) must be written.
async fn next_segments(tail: &Tail, next: u64, end: u64) -> Result<Vec<Segment>, DbError> {
    let want = SEGMENTS_PER_BATCH.min((end - next + 1) as usize);
    let segments = tail.read(next, want).await.map_err(|e| DbError::Setup(e.to_string()))?;
    if segments.is_empty() {
        return Err(DbError::Inconsistent(format!("log position {next} is missing below the head {end}; run `spiced verify`")));
    }
    Ok(segments)
}

/// The catch-up batches of the swap: positions `from..=to`.
async fn segments_batches(tail: &Tail, from: u64, to: u64) -> Result<Vec<ReadBatch>, DbError> {
    let mut batches = Vec::new();
    let mut next = from;
    while next <= to {
        let segments = next_segments(tail, next, to).await?;
        next = segments.last().map_or(next, |s| s.position + 1);
        batches.push(batch_of(&segments));
    }
    Ok(batches)
}

/// Progress: a line rewritten in place on a terminal, a plain line every few seconds otherwise.
struct Meter {
    end: u64,
    started: Instant,
    last: Instant,
    terminal: bool,
}

impl Meter {
    fn new(end: u64) -> Self {
        let now = Instant::now();
        Meter { end, started: now, last: now, terminal: std::io::stderr().is_terminal() }
    }

    fn tick(&mut self, position: u64, events: u64) {
        let every = if self.terminal { Duration::from_millis(200) } else { Duration::from_secs(5) };
        if self.last.elapsed() < every {
            return;
        }
        self.last = Instant::now();
        let line = self.line(position, events);
        if self.terminal {
            eprint!("\r{line}\x1b[K");
            let _ = std::io::stderr().flush();
        } else {
            eprintln!("{line}");
        }
    }

    fn line(&self, position: u64, events: u64) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        let rate = events as f64 / secs;
        let done = position as f64 / self.end.max(1) as f64;
        let eta = if done > 0.0 { secs * (1.0 - done) / done } else { 0.0 };
        format!(
            "rebuild: position {position}/{} ({:.0}%), {events} events, {rate:.0} events/s, ETA {eta:.0}s",
            self.end,
            done * 100.0
        )
    }

    fn finish(&self) {
        if self.terminal {
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn until_takes_a_position_or_a_time() {
        assert_eq!(Until::parse("42"), Ok(Until::Position(42)));
        assert!(matches!(Until::parse("2026-11-26T10:00:00Z"), Ok(Until::Time(_))));
        assert!(Until::parse("yesterday").unwrap_err().to_string().contains("RFC 3339"));
    }
}
