//! The log writer: group commit of concurrent appends, and the commit protocol that keeps the
//! log and its index in agreement across crashes.
//!
//! Protocol for one batch (see `docs/design.md` for each crash point):
//! 1. `begin`: take the log-head lock in the index, read the next position `p`.
//! 2. Look up the batch's command ids and aggregate versions; decide each command (duplicate,
//!    key reused, conflict, accepted) and assign sequences.
//! 3. Write segment `p` with put-if-absent and, at the same time, the batch's index writes in
//!    its transaction (seen by no one before the commit). If `p` already exists, a writer died
//!    after its log write and before its index commit: roll back, record that segment in the
//!    index, and start the batch again (its decisions may change).
//! 4. Once the segment is durable, commit; answer every command. Steps 1 and 2 of the batch
//!    queued behind are sent with this commit, and wait for it on the lock.
//!
//! Sequences are only ever handed out inside the transaction that writes their segment, so a
//! failed write leaves no hole, and the head lock makes log order equal sequence order.
//!
//! That is the serial protocol. With `writer.max_in_flight` above 1 on PostgreSQL, the
//! pipelined commit ([`super::pipeline`]) runs instead.

use super::plan::{lookup_request, plan, rows_of_segment, AppendCommand, AppendOutcome};
use super::{EventLog, LogError, Segment};
use crate::config::{WriterConfig, WriterCrash};
use crate::db::{DbError, IndexTx, LogIndex, Lookup};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;

/// Why an append could not be decided. Every variant means "nothing is known to be appended";
/// a client retrying with the same command id gets the right answer either way.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AppendError {
    #[error("the log writer queue is full")]
    Overloaded,
    #[error("the log writer has stopped")]
    Stopped,
    #[error("event log unavailable: {0}")]
    Unavailable(String),
}

impl From<LogError> for AppendError {
    fn from(e: LogError) -> Self {
        AppendError::Unavailable(e.to_string())
    }
}

impl From<DbError> for AppendError {
    fn from(e: DbError) -> Self {
        AppendError::Unavailable(e.to_string())
    }
}

/// Counters for metrics and benchmarks.
#[derive(Debug, Default)]
pub struct WriterStats {
    pub segments: AtomicU64,
    pub events: AtomicU64,
    pub repairs: AtomicU64,
}

pub(super) struct Job {
    /// The command's encoded size, reserved from the queue's byte budget until it is answered.
    pub(super) bytes: usize,
    pub(super) command: AppendCommand,
    pub(super) reply: oneshot::Sender<Result<AppendOutcome, AppendError>>,
    /// Handed back after its batch's position was taken: its id is looked up even if the
    /// server made it (that position may hold it).
    pub(super) recheck: bool,
}

/// Handle for appending commands; cheap to clone. The writer task stops when every handle is
/// dropped and the queue is drained.
#[derive(Clone)]
pub struct LogWriter {
    jobs: mpsc::Sender<Job>,
    stats: Arc<WriterStats>,
    budget: Arc<QueueBudget>,
}

/// Bytes of commands queued or being written, against `writer.queue_bytes`: the queue is
/// bounded in memory, not only in commands (10,000 commands of 1 MiB would be 10 GiB).
#[derive(Debug)]
pub(super) struct QueueBudget {
    used: std::sync::atomic::AtomicUsize,
    limit: usize,
}

impl QueueBudget {
    /// Reserves `bytes`; refused when that would pass the limit, unless nothing is queued (so
    /// a command of any accepted size always gets through alone).
    fn reserve(&self, bytes: usize) -> bool {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            if used > 0 && used + bytes > self.limit {
                return false;
            }
            match self.used.compare_exchange_weak(used, used + bytes, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(now) => used = now,
            }
        }
    }

    pub(super) fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }
}

impl LogWriter {
    /// Repairs the index from any segments written after its head, then starts the writer task.
    pub async fn start(
        log: EventLog,
        index: Arc<dyn LogIndex>,
        config: WriterConfig,
        tasks: &TaskTracker,
    ) -> Result<LogWriter, AppendError> {
        let stats = Arc::new(WriterStats::default());
        let owner = format!("pid {} ({})", std::process::id(), uuid::Uuid::new_v4());
        let writer = Writer { log, index, config, stats: stats.clone(), behind: Default::default(), owner };
        writer.recover().await?;
        let (jobs, rx) = mpsc::channel(writer.config.queue_depth);
        let budget = Arc::new(QueueBudget { used: Default::default(), limit: writer.config.queue_bytes });
        if writer.index.reservations().is_some() && writer.config.max_in_flight > 1 {
            tasks.spawn(Arc::new(writer).run_pipelined(rx, budget.clone(), tasks.clone()));
        } else {
            tasks.spawn(writer.run(rx, budget.clone()));
        }
        Ok(LogWriter { jobs, stats, budget })
    }

    /// Appends one command and waits until it is durably in the log (or decided otherwise).
    pub async fn append(&self, command: AppendCommand) -> Result<AppendOutcome, AppendError> {
        let (reply, rx) = oneshot::channel();
        let bytes = command_bytes(&command);
        if !self.budget.reserve(bytes) {
            return Err(AppendError::Overloaded);
        }
        self.jobs.try_send(Job { bytes, command, reply, recheck: false }).map_err(|e| {
            self.budget.release(bytes);
            match e {
                mpsc::error::TrySendError::Full(_) => AppendError::Overloaded,
                mpsc::error::TrySendError::Closed(_) => AppendError::Stopped,
            }
        })?;
        rx.await.map_err(|_| AppendError::Stopped)?
    }

    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }
}

pub(super) struct Writer {
    pub(super) log: EventLog,
    pub(super) index: Arc<dyn LogIndex>,
    pub(super) config: WriterConfig,
    pub(super) stats: Arc<WriterStats>,
    /// Set when a segment was written but its index commit failed: the index must catch up
    /// before readers that rely on it (workers, the relay's hint) see the segment's commands.
    pub(super) behind: std::sync::atomic::AtomicBool,
    /// Names this process's reservations, for the operator who finds one voided.
    pub(super) owner: String,
}

/// How often one batch may find its position taken before giving up; each time means a
/// segment the index did not record was repaired: a crashed writer's, or one of the commits a
/// database crash lost when they did not wait for the WAL flush (at most the last few hundred
/// milliseconds of segments, `database.synchronous_index_commit`). So this only trips on a
/// broken index.
const MAX_REPAIRS_PER_BATCH: usize = 4096;

enum Step {
    /// Answered, with no commit to send: nothing to write (duplicates, conflicts), or a
    /// segment written whose index writes failed (the index catches up from the log).
    Done(Vec<AppendOutcome>),
    /// The segment is durable and its index writes are made; their commit is still to send.
    Written(Durable, Vec<AppendOutcome>),
    Repaired,
}

/// A batch's first step, `BEGIN` with the head lock and the look-ups, as
/// [`LogIndex::begin_lookup`] answered it.
type Opened = Result<(Box<dyn IndexTx>, Lookup), DbError>;

/// A batch whose segment is durable and whose index writes are made, holding the head lock
/// until its commit.
struct Durable {
    tx: Box<dyn IndexTx>,
    position: u64,
    events: usize,
    commands: usize,
}

impl Writer {
    async fn run(self, mut rx: mpsc::Receiver<Job>, budget: Arc<QueueBudget>) {
        let mut carried: Option<Job> = None;
        // The next batch, already collected, and its opening if it was sent behind a commit.
        let mut next: Option<(Vec<Job>, Option<Opened>)> = None;
        loop {
            let (batch, opened) = match next.take() {
                Some(next) => next,
                None => {
                    let first = match carried.take() {
                        Some(job) => job,
                        None => match rx.recv().await {
                            Some(job) => job,
                            None => return,
                        },
                    };
                    let (batch, overflow) = self.collect(first, &mut rx, self.config.linger_ms).await;
                    carried = overflow;
                    (batch, None)
                }
            };
            match self.commit_batch(&batch, opened).await {
                Ok((outcomes, Some(durable))) => {
                    next = self.commit_overlapped(durable, batch, outcomes, &mut carried, &mut rx, &budget).await;
                }
                Ok((outcomes, None)) => answer(batch, Ok(outcomes), &budget),
                Err(e) => {
                    if self.index.reservations().is_some() {
                        // Positions that a dead pipelined writer reserved refuse serial batches
                        // until they are settled (published, or voided once their lease passes).
                        self.behind.store(true, Ordering::Relaxed);
                    }
                    answer(batch, Err(e), &budget);
                }
            }
            self.catch_up().await;
        }
    }

    /// Sends a written batch's index commit and, with it, the opening of the batch queued
    /// behind it (`BEGIN`, the head lock, its look-ups): the server holds that lock request
    /// until the commit ends and then answers the look-ups at once, which saves the next batch
    /// a round trip and a wake-up. The look-ups still read the committed state, since they run
    /// after the lock is granted. Returns the next batch, unless nothing was queued.
    async fn commit_overlapped(
        &self,
        durable: Durable,
        batch: Vec<Job>,
        outcomes: Vec<AppendOutcome>,
        carried: &mut Option<Job>,
        rx: &mut mpsc::Receiver<Job>,
        budget: &QueueBudget,
    ) -> Option<(Vec<Job>, Option<Opened>)> {
        // The segment is durable: the commands are answered whatever the commit does.
        let commit = async {
            let committed = self.commit(durable).await;
            answer(batch, Ok(outcomes), budget);
            committed
        };
        let Some(following) = self.take_queued(carried, rx).await else {
            commit.await;
            return None;
        };
        let request = lookup_request(following.iter().map(|j| &j.command), false);
        let (committed, opened) = tokio::join!(commit, timed("lookup_behind_commit", self.index.begin_lookup(&request)));
        if committed {
            return Some((following, Some(opened)));
        }
        // The commit failed: the head lock is needed to catch the index up, so let go of it.
        if let Ok((tx, _)) = opened {
            let _ = tx.rollback().await;
        }
        Some((following, None))
    }

    /// Records, without waiting for the next append, segments whose index commit failed.
    pub(super) async fn catch_up(&self) {
        let mut retry = crate::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        while self.behind.load(Ordering::Relaxed) {
            // With reservations, positions still in a live writer's hands are theirs to publish.
            let caught_up = match self.index.reservations() {
                Some(_) => self.advance().await.map(drop),
                None => self.recover().await,
            };
            match caught_up {
                Ok(_) => self.behind.store(false, Ordering::Relaxed),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot bring the index up to the log yet; retrying");
                    tokio::time::sleep(retry.next_delay()).await;
                }
            }
        }
    }

    /// The batch that is queued now, if any, without lingering for more.
    async fn take_queued(&self, carried: &mut Option<Job>, rx: &mut mpsc::Receiver<Job>) -> Option<Vec<Job>> {
        let first = match carried.take() {
            Some(job) => job,
            None => rx.try_recv().ok()?,
        };
        let (batch, overflow) = self.collect(first, rx, 0).await;
        *carried = overflow;
        Some(batch)
    }

    /// Takes what is queued, up to the batch limits, waiting `linger_ms` for more if above 0. A
    /// job that would overflow the limits is returned separately to open the next batch.
    async fn collect(&self, first: Job, rx: &mut mpsc::Receiver<Job>, linger_ms: u64) -> (Vec<Job>, Option<Job>) {
        let mut bytes = first.bytes;
        let mut events = first.command.events.len();
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + Duration::from_millis(linger_ms);
        while events < self.config.max_batch_events && bytes < self.config.max_batch_bytes {
            let next = match rx.try_recv() {
                Ok(job) => job,
                Err(_) if linger_ms == 0 => break,
                Err(_) => match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(job)) => job,
                    _ => break,
                },
            };
            let size = next.bytes;
            let more = next.command.events.len();
            if events + more > self.config.max_batch_events
                || bytes + size > self.config.max_batch_bytes
            {
                return (batch, Some(next));
            }
            bytes += size;
            events += more;
            batch.push(next);
        }
        (batch, None)
    }

    /// Decides a batch and writes its segment, repairing the index first if the position
    /// turns out to be taken. Returns the outcomes and, if a segment was written, its index
    /// commit, which is the caller's to send. `opened` is the batch's first opening, if it was
    /// sent ahead ([`Writer::commit_overlapped`]).
    async fn commit_batch(&self, batch: &[Job], mut opened: Option<Opened>) -> Result<(Vec<AppendOutcome>, Option<Durable>), AppendError> {
        // After a repair, the repaired segment may hold this very batch (a PUT that succeeded
        // but whose answer was lost, then retried into `AlreadyExists`): look every id up.
        let mut check_all_ids = false;
        for _ in 0..MAX_REPAIRS_PER_BATCH {
            match self.try_commit(batch, check_all_ids, opened.take()).await? {
                Step::Done(outcomes) => return Ok((outcomes, None)),
                Step::Written(durable, outcomes) => return Ok((outcomes, Some(durable))),
                Step::Repaired => check_all_ids = true,
            }
        }
        Err(AppendError::Unavailable(format!(
            "log position still taken after {MAX_REPAIRS_PER_BATCH} repairs; run `spiced verify`"
        )))
    }

    async fn try_commit(&self, batch: &[Job], check_all_ids: bool, opened: Option<Opened>) -> Result<Step, AppendError> {
        // The commands are read in place: cloning a batch's envelopes showed in serve's profile.
        let commands = || batch.iter().map(|j| &j.command);
        let (mut tx, state) = match opened {
            Some(opened) => opened?,
            None => timed("lookup", self.index.begin_lookup(&lookup_request(commands(), check_all_ids))).await?,
        };
        let position = tx.next_position();
        let plan = plan(position, commands(), &state);
        if plan.envelopes.is_empty() {
            tx.rollback().await?;
            return Ok(Step::Done(plan.outcomes));
        }
        self.crash_point(WriterCrash::BeforePut);
        // The index writes travel while the segment is written, inside the batch's transaction:
        // no one sees them before its commit, which is sent only once the segment is durable.
        let (put, recorded) = tokio::join!(
            timed("put", self.log.put_segment(position, Segment::encode(&plan.envelopes))),
            timed("record", tx.record(position, &plan.rows)),
        );
        match put {
            Ok(()) => {}
            Err(LogError::AlreadyExists(_)) => {
                // A crashed writer's segment: this plan's writes go, that segment's are recorded.
                let _ = tx.rollback().await;
                self.repair_taken(position).await?;
                return Ok(Step::Repaired);
            }
            Err(e) => {
                // The write may or may not have landed; the next batch finds out through the
                // put-if-absent fence and repairs. Nothing was acknowledged.
                let _ = tx.rollback().await;
                return Err(e.into());
            }
        }
        self.crash_point(WriterCrash::AfterPut);
        self.count_segment(position, plan.envelopes.len());
        if let Err(e) = recorded {
            // The segment is durable: the commands are accepted, and the index catches up from
            // the log. Dropping the transaction rolls it back.
            tracing::warn!(position, error = %e, "segment written but its index writes failed; repairing from the log");
            self.behind.store(true, Ordering::Relaxed);
            return Ok(Step::Done(plan.outcomes));
        }
        let durable = Durable { tx, position, events: plan.envelopes.len(), commands: batch.len() };
        Ok(Step::Written(durable, plan.outcomes))
    }

    /// Records the segment a batch found at its position, once the batch's own transaction
    /// (holding its plan's writes) is rolled back: in a new one, unless another writer
    /// recorded it in between.
    async fn repair_taken(&self, position: u64) -> Result<(), AppendError> {
        let tx = self.index.begin().await?;
        if tx.next_position() != position {
            return Ok(tx.rollback().await?);
        }
        self.repair(tx, position).await
    }

    /// Commits a durable segment's index writes; `false` if that failed. The commands are
    /// accepted whatever happens here: if the commit fails, the index catches up from the log
    /// at once, and a batch in between finds the position taken and repairs it.
    async fn commit(&self, durable: Durable) -> bool {
        let Durable { tx, position, events, commands } = durable;
        let span = tracing::info_span!("commit", position, events, commands);
        let committed = tracing::Instrument::instrument(timed("commit", tx.commit()), span.clone()).await;
        span.in_scope(|| match &committed {
            Ok(()) => tracing::debug!("segment written and indexed"),
            Err(e) => {
                tracing::warn!(error = %e, "segment written but index commit failed; repairing from the log");
                self.behind.store(true, Ordering::Relaxed);
            }
        });
        self.crash_point(WriterCrash::AfterCommit);
        committed.is_ok()
    }

    /// Records an already-written segment found at the batch's position.
    async fn repair(&self, tx: Box<dyn IndexTx>, position: u64) -> Result<(), AppendError> {
        let segment = self.log.get_segment(position).await?.ok_or_else(|| {
            AppendError::Unavailable(format!(
                "position {position} reported as written but cannot be read"
            ))
        })?;
        tx.record_and_commit(position, &rows_of_segment(&segment)).await?;
        self.stats.repairs.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("spiced_log_repairs_total").increment(1);
        tracing::info!(position, events = segment.len(), "repaired the log index from a segment written by a crashed writer");
        Ok(())
    }

    /// At start: records every segment written past the index head (a writer crashed between
    /// log write and index commit while nothing else was writing). With reservations, settles
    /// every position reserved before the start ([`Writer::settle_reserved`]).
    async fn recover(&self) -> Result<(), AppendError> {
        if self.index.reservations().is_some() {
            return self.settle_reserved().await;
        }
        loop {
            let tx = self.index.begin().await?;
            let position = tx.next_position();
            if self.log.get_segment(position).await?.is_none() {
                return Ok(tx.rollback().await?);
            }
            self.repair(tx, position).await?;
        }
    }

    /// A durable segment of `events` envelopes at `position`, for the stats and metrics.
    pub(super) fn count_segment(&self, position: u64, events: usize) {
        self.stats.segments.fetch_add(1, Ordering::Relaxed);
        self.stats.events.fetch_add(events as u64, Ordering::Relaxed);
        metrics::counter!("spiced_log_segments_total").increment(1);
        metrics::counter!("spiced_log_appends_total").increment(events as u64);
        metrics::histogram!("spiced_group_commit_batch_size").record(events as f64);
        metrics::gauge!("spiced_log_head_position").set(position as f64);
    }

    pub(super) fn crash_point(&self, point: WriterCrash) {
        if self.config.crash_at == point {
            eprintln!("spiced: writer.crash_at = {point:?}: aborting as configured (testing only)");
            std::process::abort();
        }
    }
}

/// Runs one step of a batch's commit, timed into `spiced_log_commit_step_seconds{step}`: the
/// serial commit's `lookup` (lock and look-ups; `lookup_behind_commit` when they were sent
/// with the commit before, whose time they include), `put`, `record` (the index writes, sent
/// beside the put) and `commit`; the pipelined commit's `reserve`, `put` and `publish` (which
/// includes its wait for the positions before it). They show where a batch's time goes when
/// the writer, not the machine, bounds throughput.
pub(super) async fn timed<T>(step: &'static str, work: impl std::future::Future<Output = T>) -> T {
    let started = std::time::Instant::now();
    let done = work.await;
    metrics::histogram!("spiced_log_commit_step_seconds", "step" => step).record(started.elapsed().as_secs_f64());
    done
}

/// Answers each command of a batch with its outcome, in order, or all with the batch's error.
pub(super) fn answer(batch: Vec<Job>, result: Result<Vec<AppendOutcome>, AppendError>, budget: &QueueBudget) {
    for (i, job) in batch.into_iter().enumerate() {
        let answer = match &result {
            Ok(outcomes) => Ok(outcomes[i].clone()),
            Err(e) => Err(e.clone()),
        };
        // The client may have gone away; its command's fate is in the log either way.
        budget.release(job.bytes);
        let _ = job.reply.send(answer);
    }
}

/// The bytes the command's envelopes take in a segment (a line each), for the queue budget
/// and the batch limits. Counted while serialising, not kept: allocating each envelope's JSON
/// only to measure it showed as 6.6 % of `serve`'s CPU at saturation (issue 17).
fn command_bytes(command: &AppendCommand) -> usize {
    command
        .events
        .iter()
        .map(|e| {
            let mut counted = Counted(0);
            serde_json::to_writer(&mut counted, &e.envelope).map(|_| counted.0 + 1).unwrap_or(0)
        })
        .sum()
}

/// A writer that only counts what it is given.
struct Counted(usize);

impl std::io::Write for Counted {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0 += bytes.len();
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counting_gives_the_length_serialising_would() {
        let value = serde_json::json!({"s": "line\nbreak \"quoted\" 제품 \u{1}", "n": [1, 2.5, -3], "o": {"k": null}});
        let mut counted = Counted(0);
        serde_json::to_writer(&mut counted, &value).unwrap();
        assert_eq!(counted.0, serde_json::to_vec(&value).unwrap().len());
    }
}
