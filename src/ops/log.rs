//! `spiced log get|export|tail`: the log as NDJSON, one stored envelope per line, exactly the
//! bytes in the log (what the relay publishes).

use crate::config::Config;
use crate::db::Database;
use crate::log::tail::Tail;
use crate::log::{EventLog, Segment};
use chrono::{DateTime, Utc};
use std::io::Write;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Which envelopes to print.
#[derive(Debug, Clone, Default)]
pub struct Range {
    pub from_position: Option<u64>,
    pub to_position: Option<u64>,
    pub from_time: Option<DateTime<Utc>>,
    pub to_time: Option<DateTime<Utc>>,
}

fn write_segment(out: &mut impl Write, segment: &Segment, range: &Range) -> std::io::Result<usize> {
    let mut n = 0;
    for (i, e) in segment.events.iter().enumerate() {
        let after = range.from_time.is_none_or(|t| e.occurred_at >= t);
        let before = range.to_time.is_none_or(|t| e.occurred_at < t);
        if after && before {
            out.write_all(&segment.raw_event(i))?;
            out.write_all(b"\n")?;
            n += 1;
        }
    }
    Ok(n)
}

async fn open(config: &Config) -> anyhow::Result<Tail> {
    let db = Database::open(&config.database).await?;
    Ok(Tail::new(EventLog::open(&config.log)?, db.index.clone()))
}


/// `tail`: how often it looks for new segments when the log has nothing new.
const FOLLOW_POLL: Duration = Duration::from_millis(100);
pub async fn get(config: &Config, position: u64) -> anyhow::Result<()> {
    let log = EventLog::open(&config.log)?;
    let segment = log.get_segment(position).await?.ok_or_else(|| anyhow::anyhow!("position {position} is not written"))?;
    write_segment(&mut std::io::stdout().lock(), &segment, &Range::default())?;
    Ok(())
}

/// Prints a position (and time) range; stops at the end of the log.
pub async fn export(config: &Config, range: Range) -> anyhow::Result<()> {
    let tail = open(config).await?;
    let mut next = range.from_position.unwrap_or(1).max(1);
    let last = range.to_position.unwrap_or(u64::MAX);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut count = 0;
    while next <= last {
        let segments = tail.read(next, (last - next).saturating_add(1).min(64) as usize).await?;
        let Some(end) = segments.last().map(|s| s.position) else { break };
        for s in &segments {
            count += write_segment(&mut out, s, &range)?;
        }
        next = end + 1;
    }
    out.flush()?;
    eprintln!("log: exported {count} envelope(s) from positions {}..={}", range.from_position.unwrap_or(1).max(1), next - 1);
    Ok(())
}

/// Follows the log from `from` (default: what comes next) until `shutdown`.
pub async fn tail(config: &Config, from: Option<u64>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let tail = open(config).await?;
    let mut next = match from {
        Some(p) => p.max(1),
        None => tail.head().await? + 1,
    };
    while !shutdown.is_cancelled() {
        let segments = tail.read(next, 64).await?;
        let mut out = std::io::stdout().lock();
        for s in &segments {
            write_segment(&mut out, s, &Range::default())?;
            next = s.position + 1;
        }
        out.flush()?;
        drop(out);
        if segments.is_empty() {
            crate::backoff::pause(&shutdown, FOLLOW_POLL).await;
        }
    }
    Ok(())
}
