//! The pipelined commit (`docs/design.md`, "Pipelined commit"), on an index that has
//! [`Reservations`]. Up to `writer.max_in_flight` batches of this process are in flight, each
//! through three steps, of which only the first holds a lock:
//! 1. *reserve*: the next position, under the reservation lock. A command whose id or
//!    aggregate is in a batch in flight (this process's or another's) waits for a later batch,
//!    so an aggregate is never in two batches at once; the rest are planned from published
//!    versions, as in the serial protocol, and the reservation records them;
//! 2. *write* the segment with put-if-absent, outside any lock, beside the other batches';
//! 3. *publish* it, strictly in position order (head, index rows and versions in one
//!    statement), then answer its commands.
//!
//! A position whose writer died is settled by [`Writer::advance`]: published if its segment
//! was written, filled with a void (empty) segment once its lease has passed if not.
//! Put-if-absent decides, once for every racer, which of the two occupies the position.

use super::plan::{lookup_request, plan, rows_of_segment, AppendCommand, Plan};
use super::writer::{answer, timed, AppendError, Job, QueueBudget, Writer};
use super::{LogError, Segment};
use crate::backoff::Backoff;
use crate::config::WriterCrash;
use crate::db::{Published, Reservation, Reservations};
use crate::domain::AggregateKey;
use bytes::Bytes;
use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;
use uuid::Uuid;

/// The ids and aggregates of this process's batches in flight.
#[derive(Default)]
struct Busy {
    ids: HashSet<Uuid>,
    keys: HashSet<AggregateKey>,
}

impl Busy {
    fn touches(&self, command: &AppendCommand) -> bool {
        self.ids.contains(&command.command_id) || command.events.iter().any(|e| self.keys.contains(&e.key))
    }
}

/// What the writer loop shares with its batches in flight.
struct Window {
    busy: Mutex<Busy>,
    /// Signalled when a batch in flight ends: commands waiting on it may go.
    ended: Notify,
    slots: Arc<Semaphore>,
    /// Batches handed back because their position was taken, to be planned again.
    back: mpsc::UnboundedSender<Vec<Job>>,
}

impl Window {
    fn take(&self, jobs: &[Job]) {
        let mut busy = self.busy.lock().expect("busy set");
        for c in jobs.iter().map(|j| &j.command) {
            busy.ids.insert(c.command_id);
            busy.keys.extend(c.events.iter().map(|e| e.key.clone()));
        }
    }

    fn release(&self, jobs: &[Job]) {
        let mut busy = self.busy.lock().expect("busy set");
        for c in jobs.iter().map(|j| &j.command) {
            busy.ids.remove(&c.command_id);
            for e in &c.events {
                busy.keys.remove(&e.key);
            }
        }
        drop(busy);
        self.ended.notify_waiters();
    }
}

/// A reserved batch, on its way through the write and the publish.
struct Flight {
    position: u64,
    jobs: Vec<Job>,
    plan: Plan,
    /// Ends when this process's previous batch is published (or has given up).
    previous: Option<oneshot::Receiver<()>>,
    done: oneshot::Sender<()>,
    _slot: OwnedSemaphorePermit,
}

/// How a batch's segment write ended.
enum Written {
    Ours,
    /// Another segment is at the position (a void put there after the lease passed, or a
    /// segment of a writer that did not reserve): the batch is planned again.
    Taken,
    /// The write failed and a void now fills the position: nothing was appended.
    Voided(String),
}

/// The wait between reservations when every command of a batch waits on another process's
/// batch in flight.
const REMOTE_WAIT: Backoff = Backoff::new(Duration::from_millis(1), Duration::from_millis(50));

impl Writer {
    fn steps(&self) -> &dyn Reservations {
        self.index.reservations().expect("the pipelined writer runs only on an index with reservations")
    }

    pub(super) async fn run_pipelined(self: Arc<Self>, mut rx: mpsc::Receiver<Job>, budget: Arc<QueueBudget>, tasks: TaskTracker) {
        let (back, mut handed_back) = mpsc::unbounded_channel();
        let slots = Arc::new(Semaphore::new(self.config.max_in_flight));
        let window = Arc::new(Window { busy: Default::default(), ended: Notify::new(), slots: slots.clone(), back });
        let mut waiting = VecDeque::new();
        let mut previous: Option<oneshot::Receiver<()>> = None;
        let mut remote_wait = REMOTE_WAIT;
        while let Some(batch) = self.next_batch(&window, &mut rx, &mut handed_back, &mut waiting).await {
            let slot = slots.clone().acquire_owned().await.expect("the window is never closed");
            match timed("reserve", self.reserve(batch, &budget)).await {
                Reserve::Flying { position, jobs, plan, deferred } => {
                    remote_wait = REMOTE_WAIT;
                    requeue(&mut waiting, deferred);
                    window.take(&jobs);
                    let (done, next) = oneshot::channel();
                    let flight = Flight { position, jobs, plan, previous: previous.replace(next), done, _slot: slot };
                    tasks.spawn(self.clone().fly(flight, window.clone(), budget.clone()));
                }
                Reserve::Answered { deferred } => requeue(&mut waiting, deferred),
                Reserve::AllDeferred(deferred) => {
                    requeue(&mut waiting, deferred);
                    drop(slot);
                    // The batches in the way end within their lease; fill any that lapsed.
                    tokio::time::sleep(remote_wait.next_delay()).await;
                    if let Err(e) = self.advance().await {
                        tracing::warn!(error = %e, "cannot settle the positions ahead of the log head yet");
                    }
                }
            }
        }
        // The queue is closed: let the batches in flight end.
        let _ = slots.acquire_many(self.config.max_in_flight as u32).await;
    }

    /// The next batch: waiting commands that no batch in flight touches, then new ones, up to
    /// the batch limits. `None` once the queue is closed and nothing is waiting.
    async fn next_batch(
        &self,
        window: &Window,
        rx: &mut mpsc::Receiver<Job>,
        handed_back: &mut mpsc::UnboundedReceiver<Vec<Job>>,
        waiting: &mut VecDeque<Job>,
    ) -> Option<Vec<Job>> {
        let mut closed = false;
        loop {
            while let Ok(jobs) = handed_back.try_recv() {
                requeue(waiting, jobs);
            }
            // Registered before looking, so that a batch ending meanwhile is not missed.
            let ended = window.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            let batch = self.fill(window, rx, waiting);
            if !batch.is_empty() {
                return Some(self.linger(batch, window, rx, waiting).await);
            }
            // Batches still in flight are waited for by the caller; a command one of them
            // hands back now gets "stopped" (nothing of it was acknowledged).
            if closed && waiting.is_empty() {
                return None;
            }
            tokio::select! {
                job = rx.recv(), if !closed => match job {
                    Some(job) => waiting.push_back(job),
                    None => closed = true,
                },
                Some(jobs) = handed_back.recv() => requeue(waiting, jobs),
                _ = &mut ended => {}
            }
        }
    }

    /// Takes, in order, what is waiting and then what is queued, leaving in `waiting` what a
    /// batch in flight touches and what would pass the batch limits.
    fn fill(&self, window: &Window, rx: &mut mpsc::Receiver<Job>, waiting: &mut VecDeque<Job>) -> Vec<Job> {
        let busy = window.busy.lock().expect("busy set");
        let mut batch = Batch::default();
        let mut kept = VecDeque::new();
        while let Some(job) = waiting.pop_front() {
            batch.offer(job, &busy, &self.config, &mut kept);
        }
        *waiting = kept;
        while batch.has_room(&self.config) {
            let Ok(job) = rx.try_recv() else { break };
            batch.offer(job, &busy, &self.config, waiting);
        }
        batch.jobs
    }

    /// Waits up to `linger_ms` for more commands to join a batch.
    async fn linger(&self, jobs: Vec<Job>, window: &Window, rx: &mut mpsc::Receiver<Job>, waiting: &mut VecDeque<Job>) -> Vec<Job> {
        if self.config.linger_ms == 0 {
            return jobs;
        }
        let mut batch = Batch::default();
        jobs.into_iter().for_each(|j| batch.push(j));
        let deadline = tokio::time::Instant::now() + Duration::from_millis(self.config.linger_ms);
        while batch.has_room(&self.config) {
            let Ok(Some(job)) = tokio::time::timeout_at(deadline, rx.recv()).await else { break };
            batch.offer(job, &window.busy.lock().expect("busy set"), &self.config, waiting);
        }
        batch.jobs
    }

    /// Step 1: looks the batch up and reserves a position for the commands that no other
    /// process's batch in flight touches. Commands decided without a write (duplicates,
    /// conflicts) are answered when nothing else is written.
    async fn reserve(&self, batch: Vec<Job>, budget: &QueueBudget) -> Reserve {
        let recheck = batch.iter().any(|j| j.recheck);
        let request = lookup_request(batch.iter().map(|j| &j.command), recheck);
        let steps = self.steps();
        let (tx, state, open) = match steps.begin_reserve(&request).await {
            Ok(begun) => begun,
            Err(e) => {
                answer(batch, Err(e.into()), budget);
                return Reserve::Answered { deferred: Vec::new() };
            }
        };
        let (jobs, deferred): (Vec<Job>, Vec<Job>) = batch.into_iter().partition(|j| !reserved_elsewhere(&open, &j.command));
        if jobs.is_empty() {
            let _ = tx.rollback().await;
            return Reserve::AllDeferred(deferred);
        }
        let commands = || jobs.iter().map(|j| &j.command);
        let position = tx.position();
        let plan = plan(position, commands(), &state);
        if plan.envelopes.is_empty() {
            let _ = tx.rollback().await;
            answer(jobs, Ok(plan.outcomes), budget);
            return Reserve::Answered { deferred };
        }
        let ids: Vec<Uuid> = commands().map(|c| c.command_id).collect();
        let keys: Vec<AggregateKey> =
            commands().flat_map(|c| c.events.iter().map(|e| e.key.clone())).collect::<HashSet<_>>().into_iter().collect();
        let lease = Duration::from_millis(self.config.reservation_ms);
        if let Err(e) = tx.reserve(&self.owner, lease, &ids, &keys).await {
            answer(jobs, Err(e.into()), budget);
            return Reserve::Answered { deferred };
        }
        Reserve::Flying { position, jobs, plan, deferred }
    }

    /// Steps 2 and 3 of one batch, then its answers.
    async fn fly(self: Arc<Self>, flight: Flight, window: Arc<Window>, budget: Arc<QueueBudget>) {
        let Flight { position, jobs, plan, previous, done, _slot } = flight;
        self.crash_point(WriterCrash::BeforePut);
        let written = timed("put", self.write_reserved(position, Segment::encode(&plan.envelopes))).await;
        let (written_ours, put_failed) = (matches!(written, Ok(Written::Ours)), written.is_err());
        if written_ours {
            self.crash_point(WriterCrash::AfterPut);
            if self.config.crash_at == WriterCrash::WindowFull && window.slots.available_permits() == 0 {
                self.crash_point(WriterCrash::WindowFull);
            }
        }
        let result = match written {
            Ok(Written::Ours) => {
                if let Some(previous) = previous {
                    let _ = previous.await;
                }
                self.publish_ours(position, &plan).await;
                Some(Ok(plan.outcomes))
            }
            Ok(Written::Voided(reason)) => Some(Err(AppendError::Unavailable(reason))),
            Ok(Written::Taken) => None,
            Err(e) => Some(Err(e)),
        };
        window.release(&jobs);
        match result {
            Some(result) => answer(jobs, result, &budget),
            None => {
                let again = jobs.into_iter().map(|j| Job { recheck: true, ..j }).collect();
                // The loop is gone only once every handle is; then nobody waits for these.
                let _ = window.back.send(again);
            }
        }
        if put_failed {
            self.void_own(position).await;
        }
        let _ = done.send(());
        if !written_ours {
            // A void or another writer's segment is at the position: publish it (in turn).
            self.behind.store(true, Ordering::Relaxed);
        }
        self.catch_up().await;
    }

    /// After a segment write and its void both failed: the position is this writer's to void
    /// until its lease passes (then anyone's), so it tries again rather than make the log
    /// wait for the lease.
    async fn void_own(&self, position: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(self.config.reservation_ms);
        let mut retry = crate::backoff::STORAGE;
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(retry.next_delay()).await;
            match self.log.put_segment(position, Segment::encode(&[])).await {
                Ok(()) | Err(LogError::AlreadyExists(_)) => return,
                Err(e) => tracing::warn!(position, error = %e, "cannot fill the position of a failed write with a void segment yet; retrying"),
            }
        }
    }

    /// Step 2: the batch's segment at its reserved position, with put-if-absent. A write that
    /// failed may have landed or not: a void, put-if-absent too, settles which.
    async fn write_reserved(&self, position: u64, bytes: Bytes) -> Result<Written, AppendError> {
        match self.log.put_segment(position, bytes.clone()).await {
            Ok(()) => Ok(Written::Ours),
            Err(LogError::AlreadyExists(_)) => self.whose(position, &bytes).await,
            Err(e) => {
                tracing::warn!(position, error = %e, "segment write failed; filling its position with a void segment");
                match self.log.put_segment(position, Segment::encode(&[])).await {
                    Ok(()) => Ok(Written::Voided(e.to_string())),
                    Err(LogError::AlreadyExists(_)) => self.whose(position, &bytes).await,
                    Err(_) => Err(e.into()),
                }
            }
        }
    }

    /// Whether the segment at `position` is the one this batch meant to write.
    async fn whose(&self, position: u64, bytes: &Bytes) -> Result<Written, AppendError> {
        let found = self.log.get_segment(position).await?.ok_or_else(|| {
            AppendError::Unavailable(format!("position {position} reported as written but cannot be read"))
        })?;
        Ok(if found.raw() == bytes { Written::Ours } else { Written::Taken })
    }

    /// Step 3 for a batch whose segment is written: the commands are accepted whatever the
    /// index does next. If publishing fails, `behind` makes the writer record it later.
    async fn publish_ours(&self, position: u64, plan: &Plan) {
        let span = tracing::info_span!("publish", position, events = plan.envelopes.len());
        match tracing::Instrument::instrument(timed("publish", self.publish_in_order(position, plan)), span.clone()).await {
            Ok(()) => span.in_scope(|| tracing::debug!("segment written and published")),
            Err(e) => {
                span.in_scope(|| tracing::warn!(error = %e, "segment written but not published; recording it from the log"));
                self.behind.store(true, Ordering::Relaxed);
            }
        }
        self.crash_point(WriterCrash::AfterCommit);
        self.count_segment(position, plan.envelopes.len());
    }

    /// Publishes `position` once the head reaches the position before it, settling on the way
    /// the positions of other writers that died ([`Writer::advance`]); each waits at most its
    /// lease.
    async fn publish_in_order(&self, position: u64, plan: &Plan) -> Result<(), AppendError> {
        let mut wait = REMOTE_WAIT;
        loop {
            match self.steps().publish(position, &plan.rows).await? {
                Published::Now => return Ok(()),
                // A writer that found it while settling positions published it.
                Published::HeadAt(head) if head >= position => return Ok(()),
                // Moved since the statement's snapshot: try again.
                Published::HeadAt(head) if head + 1 == position => {}
                Published::HeadAt(_) => {
                    if self.advance().await? + 1 < position {
                        tokio::time::sleep(wait.next_delay()).await;
                    }
                }
            }
        }
    }

    /// Waits until every position reserved now is published or voided: each is within its
    /// lease. So a writer that starts after a crash has the index up to the log, as the serial
    /// protocol's recovery does.
    pub(super) async fn settle_reserved(&self) -> Result<(), AppendError> {
        let Some(last) = self.steps().open_reservations().await?.last().map(|r| r.position) else {
            return self.advance().await.map(drop);
        };
        let mut wait = REMOTE_WAIT;
        while self.advance().await? < last {
            tokio::time::sleep(wait.next_delay()).await;
        }
        Ok(())
    }

    /// Moves the head over every settled position: a written segment (a peer's, or one whose
    /// writer died before publishing it) is published; a reservation whose lease has passed
    /// with nothing written is filled with a void segment first. Stops at the first position
    /// still in a live writer's hands; returns the head.
    pub(super) async fn advance(&self) -> Result<u64, AppendError> {
        let steps = self.steps();
        loop {
            let head = self.index.head().await?;
            let next = head + 1;
            if let Some(segment) = self.log.get_segment(next).await? {
                if steps.publish(next, &rows_of_segment(&segment)).await? == Published::Now {
                    self.stats.repairs.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("spiced_log_repairs_total").increment(1);
                    tracing::info!(position = next, events = segment.len(), "published a segment whose writer did not");
                }
                continue;
            }
            let open = steps.open_reservations().await?;
            let Some(lapsed) = open.iter().find(|r| r.position == next && r.expired) else {
                return Ok(head);
            };
            tracing::warn!(
                position = next,
                owner = %lapsed.owner,
                commands = ?lapsed.command_ids,
                "a reserved position's lease passed with no segment; filling it with a void segment (those commands were not appended)"
            );
            match self.log.put_segment(next, Segment::encode(&[])).await {
                Ok(()) | Err(LogError::AlreadyExists(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// What reserving a batch came to.
enum Reserve {
    Flying { position: u64, jobs: Vec<Job>, plan: Plan, deferred: Vec<Job> },
    /// Answered without a write (or refused); `deferred` wait for a later batch.
    Answered { deferred: Vec<Job> },
    /// Every command touches another process's batch in flight.
    AllDeferred(Vec<Job>),
}

fn reserved_elsewhere(open: &[Reservation], command: &AppendCommand) -> bool {
    open.iter().any(|r| r.command_ids.contains(&command.command_id) || command.events.iter().any(|e| r.keys.contains(&e.key)))
}

/// Puts jobs back at the front of the waiting line, in their order.
fn requeue(waiting: &mut VecDeque<Job>, jobs: Vec<Job>) {
    for job in jobs.into_iter().rev() {
        waiting.push_front(job);
    }
}

/// A batch being filled, against the segment limits.
#[derive(Default)]
struct Batch {
    jobs: Vec<Job>,
    events: usize,
    bytes: usize,
}

impl Batch {
    fn has_room(&self, config: &crate::config::WriterConfig) -> bool {
        self.events < config.max_batch_events && self.bytes < config.max_batch_bytes
    }

    /// A batch always takes its first command, whatever its size.
    fn fits(&self, job: &Job, config: &crate::config::WriterConfig) -> bool {
        self.jobs.is_empty()
            || (self.events + job.command.events.len() <= config.max_batch_events && self.bytes + job.bytes <= config.max_batch_bytes)
    }

    /// Takes `job`, or leaves it in `waiting` when a batch in flight touches it or it would
    /// pass the limits.
    fn offer(&mut self, job: Job, busy: &Busy, config: &crate::config::WriterConfig, waiting: &mut VecDeque<Job>) {
        if busy.touches(&job.command) || !self.fits(&job, config) {
            waiting.push_back(job);
        } else {
            self.push(job);
        }
    }

    fn push(&mut self, job: Job) {
        self.events += job.command.events.len();
        self.bytes += job.bytes;
        self.jobs.push(job);
    }
}
