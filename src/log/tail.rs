//! Following the log in order: ask for the next position until it exists.
//!
//! With nothing new this costs one GET per call and never lists. When the next segment exists,
//! the index head (positions up to it are known to be written) says how many more can be
//! fetched at once, so catching up costs one GET per segment and nothing is fetched in vain.

use super::{EventLog, LogError, Segment};
use crate::db::LogIndex;
use futures::{StreamExt, TryStreamExt};
use std::sync::Arc;
use std::time::Duration;
use crate::backoff::{pause, Backoff};
use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

/// Segments fetched concurrently when catching up.
const FETCH_CONCURRENCY: usize = 16;

#[derive(Clone)]
pub struct Tail {
    log: EventLog,
    index: Arc<dyn LogIndex>,
}

impl Tail {
    pub fn new(log: EventLog, index: Arc<dyn LogIndex>) -> Self {
        Tail { log, index }
    }

    pub fn log(&self) -> &EventLog {
        &self.log
    }

    /// The last position recorded in the index (every position up to it is written).
    pub async fn head(&self) -> Result<u64, crate::db::DbError> {
        self.index.head().await
    }

    /// Up to `max` consecutive segments starting at `from`; empty when `from` is not written.
    pub async fn read(&self, from: u64, max: usize) -> Result<Vec<Segment>, LogError> {
        let Some(first) = self.log.get_segment(from).await? else {
            return Ok(Vec::new());
        };
        let mut segments = vec![first];
        if max <= 1 {
            return Ok(segments);
        }
        // The index is only a hint here: if it is unreachable, go on one segment at a time.
        let head = match self.index.head().await {
            Ok(head) => head,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the log head hint; reading one segment");
                return Ok(segments);
            }
        };
        let last = head.min(from + max as u64 - 1);
        if last <= from {
            return Ok(segments);
        }
        let rest: Vec<Option<Segment>> = futures::stream::iter(from + 1..=last)
            .map(|p| self.log.get_segment(p))
            .buffered(FETCH_CONCURRENCY)
            .try_collect()
            .await?;
        // Positions up to the index head are written; stop at the first that is not (possible
        // only if the index is ahead of the log, which `spiced verify` reports).
        segments.extend(rest.into_iter().map_while(|s| s));
        Ok(segments)
    }

    /// The first position whose first envelope occurred at or after `t` (the head + 1 if
    /// none did), by binary search over segments. An empty segment (a position written with
    /// no envelopes) has no time of its own and takes that of the next segment with one.
    pub async fn first_position_at(&self, t: DateTime<Utc>) -> anyhow::Result<u64> {
        let end = self.head().await? + 1;
        let (mut lo, mut hi) = (1u64, end);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.first_time_from(mid, end).await? {
                Some(at) if at < t => lo = mid + 1,
                _ => hi = mid,
            }
        }
        Ok(lo)
    }

    /// When the first envelope of the first non-empty segment in `from..end` occurred; `None`
    /// if there is none (or a position there is not written).
    async fn first_time_from(&self, from: u64, end: u64) -> Result<Option<DateTime<Utc>>, LogError> {
        for position in from..end {
            let Some(segment) = self.log.get_segment(position).await? else { break };
            if let Some(first) = segment.events.first() {
                return Ok(Some(first.occurred_at));
            }
        }
        Ok(None)
    }
}

/// Follows the log from a position for a consumer that keeps its own checkpoint (embedded
/// workers, the projection): waits one poll interval when nothing is new, backs off on read
/// errors, and hands out segments in order.
pub struct Follower {
    tail: Tail,
    next: u64,
    batch: usize,
    poll: Duration,
    progress: Option<std::sync::Arc<crate::liveness::Stage>>,
    retry: Backoff,
}

impl Follower {
    pub fn new(tail: Tail, from: u64, batch: usize, poll: Duration) -> Self {
        Follower { tail, next: from.max(1), batch, poll, progress: None, retry: crate::backoff::STORAGE }
    }

    /// Reports to `progress`: idle when the log has nothing new, waiting when it has (or
    /// cannot be read), progress at each [`Follower::done`].
    pub fn reporting(mut self, progress: std::sync::Arc<crate::liveness::Stage>) -> Self {
        self.progress = Some(progress);
        self
    }

    /// The next segments after the last one marked done, or `None` once `shutdown` fires.
    pub async fn next(&mut self, shutdown: &CancellationToken) -> Option<Vec<Segment>> {
        loop {
            if shutdown.is_cancelled() {
                return None;
            }
            let progress = self.progress.as_deref();
            match self.tail.read(self.next, self.batch).await {
                Ok(segments) if !segments.is_empty() => {
                    self.retry.reset();
                    if let Some(p) = progress {
                        p.work_waiting();
                    }
                    return Some(segments);
                }
                Ok(_) => {
                    if let Some(p) = progress {
                        p.idle();
                    }
                    pause(shutdown, self.poll).await
                }
                Err(e) => {
                    tracing::warn!(error = %e, position = self.next, "cannot read the log; retrying");
                    if let Some(p) = progress {
                        p.failed(&e);
                    }
                    self.retry.wait(shutdown).await;
                }
            }
        }
    }

    /// `position` is handled: the next read starts after it.
    pub fn done(&mut self, position: u64) {
        self.next = position + 1;
        if let Some(p) = &self.progress {
            p.progressed();
        }
    }
}

