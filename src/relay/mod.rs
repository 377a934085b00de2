//! `spiced relay`: publishes the event log to Kafka, at least once, in log order.
//!
//! One relay leads (a lease in PostgreSQL); standbys wait to take over. The leader reads the
//! segments after its checkpoint, produces each envelope's stored bytes unchanged to
//! `metadata.kafka_topic` keyed by `ordering_key()` (so one aggregate stays in one partition),
//! waits for every delivery report of the batch, and only then moves the checkpoint. A failed
//! delivery re-publishes the batch from the checkpoint: duplicates, never a gap.
//!
//! Liveness: a producer that can no longer deliver is replaced ([`Publisher`]). A leader whose
//! checkpoint has not moved for `relay.stall_timeout_ms` while the log has more (whatever the
//! cause: broker, S3, PostgreSQL, a step that never returns) steps down: it releases its lease,
//! replaces its producer and stands by for a lease period, so a standby takes over, or it
//! leads again with fresh clients.

pub mod lease;

use crate::backoff::{pause, Backoff};
use crate::bus::kafka::{ensure_topics, Publisher};
use crate::routing::all_topics;
use crate::liveness::Stage;
use crate::config::{Config, RelayCrash};
use crate::db::Database;
use crate::envelope::EventEnvelope;
use crate::log::tail::Tail;
use crate::log::{EventLog, Segment};
use chrono::{DateTime, Utc};
use lease::{Lease, LeaseStore};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use crate::bus::kafka::POSITION_HEADER;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureRecord, Producer};
use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A failed step is retried after 100 ms, doubling to 5 s.
const RETRY: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));

/// How the relay should start, from the command line.
#[derive(Debug, Clone, Default)]
pub struct RelayOptions {
    /// Start after this position is published: the checkpoint is set to `N - 1`.
    pub from_position: Option<u64>,
    /// Start at the first segment written at or after this time.
    pub from_time: Option<DateTime<Utc>>,
    /// Re-publish positions `from..=to` once, without lease or checkpoint, then exit.
    pub republish: Option<(u64, u64)>,
}

/// Counters for metrics, `spiced status` and tests.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Last position whose every envelope is acknowledged by Kafka.
    pub published_position: AtomicU64,
    /// Log head seen at the last batch.
    pub head_position: AtomicU64,
    pub events_published: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub produce_errors: AtomicU64,
    /// Seconds between the oldest unpublished envelope and now, at the last batch.
    pub lag_seconds: AtomicU64,
    /// The relay's requests to the log store.
    pub log_requests: Arc<crate::log::RequestCounts>,
}

pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    run_with(config, RelayOptions::default(), shutdown, Arc::default()).await
}

/// Runs the relay until `shutdown` (or, with `republish`, until that range is published).
pub async fn run_with(
    config: Config,
    options: RelayOptions,
    shutdown: CancellationToken,
    stats: Arc<RelayStats>,
) -> anyhow::Result<()> {
    let (db, log) = crate::storage::open(&config).await?;
    let log = log.with_counts(stats.log_requests.clone());
    let relay = Relay::new(&config, &db, log.clone(), stats)?;
    let _ops = if options.republish.is_none() {
        let ready = crate::telemetry::readiness(db.clone(), log, vec![relay.progress.clone()]);
        Some(crate::telemetry::start_ops(&config.metrics.relay_listen, ready).await?)
    } else {
        None
    };
    if config.relay.create_topics {
        ensure_topics(&config.kafka, &all_topics(&config)).await?;
    }
    crate::systemd::ready();
    match options.republish {
        Some((from, to)) => relay.republish(from, to).await,
        None => {
            let lag = tokio::spawn(export_lag_events(db.clone(), config.relay.name.clone(), LAG_EVENTS_EVERY, shutdown.clone()));
            let reporting = crate::liveness::Reporting::start(db.clone(), vec![relay.progress.clone()], &shutdown);
            let result = relay.lead_or_wait(&options, &shutdown).await;
            lag.abort();
            reporting.finish().await;
            result
        }
    }
}

/// How often `spiced_relay_lag_events` is counted: a range count in the index, too costly for
/// every batch when the relay is far behind.
pub const LAG_EVENTS_EVERY: Duration = Duration::from_secs(5);

/// Exports `spiced_relay_lag_events`: envelopes in the log after the durable checkpoint. The
/// checkpoint is shared by every relay of the name, so a standby reports the same lag as the
/// leader instead of its own (empty) progress.
async fn export_lag_events(db: Database, name: String, every: Duration, shutdown: CancellationToken) {
    loop {
        match lag_events(&db, &name).await {
            Ok(n) => metrics::gauge!("spiced_relay_lag_events").set(n as f64),
            Err(e) => tracing::debug!(error = %e, "relay lag in events not available this round"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

async fn lag_events(db: &Database, name: &str) -> Result<u64, crate::db::DbError> {
    let checkpoint = db.checkpoints.position(name).await?;
    db.index.events_after(checkpoint).await
}

struct Relay {
    config: Config,
    tail: Tail,
    producer: Publisher,
    leases: LeaseStore,
    topics: HashSet<String>,
    stats: Arc<RelayStats>,
    progress: Arc<Stage>,
}

enum Stop {
    Shutdown,
    LeaseLost,
    /// No progress for `relay.stall_timeout_ms` with work waiting.
    Stalled,
}

/// One step of the publish loop failed or timed out.
#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error("cannot read the log: {0}")]
    Read(crate::log::LogError),
    #[error("delivery failed: {0}")]
    Deliver(KafkaError),
    #[error("checkpoint write failed: {0}")]
    Checkpoint(crate::db::DbError),
    #[error("{0} did not finish within relay.stall_timeout_ms")]
    Timeout(&'static str),
}

impl Relay {
    fn new(config: &Config, db: &Database, log: EventLog, stats: Arc<RelayStats>) -> anyhow::Result<Relay> {
        let me = format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple());
        let leases = LeaseStore::new(
            db.leases.clone(),
            &config.relay.name,
            me,
            Duration::from_millis(config.relay.lease_ms),
            Duration::from_millis(config.kafka.message_timeout_ms),
        );
        // Envelopes may be routed to command and event topics, never to a dead-letter topic.
        let t = &config.topics;
        let topics: HashSet<String> = [
            &t.ontology_commands, &t.instance_commands,
            &t.ontology_events, &t.instance_events,
        ]
        .into_iter()
        .cloned()
        .collect();
        Ok(Relay {
            config: config.clone(),
            tail: Tail::new(log, db.index.clone()),
            producer: Publisher::new(&config.kafka)?,
            leases,
            topics,
            stats,
            progress: crate::liveness::register("relay", Duration::from_millis(config.relay.stall_timeout_ms)),
        })
    }

    /// Standby until the lease is ours, then publish until shutdown or the lease is lost.
    async fn lead_or_wait(&self, options: &RelayOptions, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let mut start_override = self.start_override(options).await?;
        loop {
            let Some(lease) = self.acquire(shutdown).await else { return Ok(()) };
            let mut checkpoint = lease.position;
            if let Some(position) = start_override.take() {
                if !self.leases.reset(&lease, position).await? {
                    continue;
                }
                tracing::warn!(checkpoint = position, "checkpoint set by the operator");
                checkpoint = position;
            }
            tracing::info!(epoch = lease.epoch, checkpoint, "relay is the leader");
            let renewing = CancellationToken::new();
            let renewer = self.renew_until(&lease, renewing.clone());
            let (stop, _) = tokio::join!(
                async {
                    let stop = self.publish(&lease, checkpoint, shutdown).await;
                    renewing.cancel();
                    stop
                },
                renewer
            );
            match stop {
                Stop::Shutdown => {
                    self.leases.release(&lease).await?;
                    tracing::info!("relay stopped; lease released");
                    return Ok(());
                }
                Stop::LeaseLost => tracing::warn!(epoch = lease.epoch, "lease lost; back to standby"),
                Stop::Stalled => self.step_down(&lease, shutdown).await,
            }
        }
    }

    /// The checkpoint the operator asked for with `--from-position` / `--from-time`.
    async fn start_override(&self, options: &RelayOptions) -> anyhow::Result<Option<u64>> {
        if let Some(p) = options.from_position {
            anyhow::ensure!(p >= 1, "--from-position starts at 1");
            return Ok(Some(p - 1));
        }
        match options.from_time {
            Some(t) => Ok(Some(self.tail.first_position_at(t).await?.saturating_sub(1))),
            None => Ok(None),
        }
    }

    /// Waits for the lease; `None` on shutdown. Failures to reach the lease table are retried.
    async fn acquire(&self, shutdown: &CancellationToken) -> Option<Lease> {
        let wait = Duration::from_millis((self.config.relay.lease_ms / 5).max(50));
        let mut announced = false;
        loop {
            // A standby has nothing to do; one that cannot reach the lease table says why.
            match self.leases.try_acquire().await {
                Ok(Some(lease)) => return Some(lease),
                Ok(None) if !announced => {
                    tracing::info!("another relay holds the lease; standing by");
                    announced = true;
                    self.progress.idle();
                }
                Ok(None) => self.progress.idle(),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reach the lease table; retrying");
                    self.progress.failed(&e);
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Renews the lease every third of its length until `done` or until it is lost.
    async fn renew_until(&self, lease: &Lease, done: CancellationToken) {
        let every = self.leases.lease_duration() / 3;
        loop {
            tokio::select! {
                _ = done.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            match self.leases.renew(lease).await {
                Ok(true) => {}
                Ok(false) => return,
                // Not renewed: the local validity runs out on its own and publishing stops.
                Err(e) => tracing::warn!(error = %e, "lease renewal failed"),
            }
        }
    }

    /// Publishes until shutdown, a lost lease or a stall; every failure is retried from the
    /// checkpoint, so this never fails.
    async fn publish(&self, lease: &Lease, checkpoint: u64, shutdown: &CancellationToken) -> Stop {
        let mut next = checkpoint + 1;
        self.stats.published_position.store(checkpoint, Ordering::Relaxed);
        // Leading starts the clock: the time spent standing by was not a stall.
        self.progress.progressed();
        let mut backoff = RETRY;
        loop {
            if shutdown.is_cancelled() {
                return Stop::Shutdown;
            }
            if !lease.valid() {
                return Stop::LeaseLost;
            }
            if self.progress.stalled() {
                return Stop::Stalled;
            }
            match self.step(lease, next).await {
                Ok(Step::Idle) => {
                    self.progress.idle();
                    self.stats.lag_seconds.store(0, Ordering::Relaxed);
                    pause(shutdown, Duration::from_millis(self.config.relay.poll_interval_ms)).await;
                }
                Ok(Step::Published(last)) => {
                    backoff.reset();
                    next = last + 1;
                    self.stats.published_position.store(last, Ordering::Relaxed);
                    self.progress.reached(last);
                    self.progress.progressed();
                    self.export_metrics();
                }
                Ok(Step::LeaseLost) => return Stop::LeaseLost,
                Err(e) => {
                    self.progress.failed(&e);
                    if matches!(e, StepError::Deliver(_) | StepError::Timeout("delivery")) {
                        self.stats.produce_errors.fetch_add(1, Ordering::Relaxed);
                    }
                    self.export_metrics();
                    tracing::warn!(error = %e, from = next, "batch not published; retrying from the checkpoint");
                    backoff.wait(shutdown).await;
                }
            }
        }
    }

    /// One round: read what follows `next`, publish it, move the checkpoint. Each part is
    /// bounded by the stall timeout, so a dependency that never answers cannot hold the loop.
    async fn step(&self, lease: &Lease, next: u64) -> Result<Step, StepError> {
        let bound = Duration::from_millis(self.config.relay.stall_timeout_ms);
        let read = self.tail.read(next, self.config.relay.batch_segments);
        let segments = tokio::time::timeout(bound, read)
            .await
            .map_err(|_| StepError::Timeout("reading the log"))?
            .map_err(StepError::Read)?;
        let Some(last) = segments.last().map(|s| s.position) else { return Ok(Step::Idle) };
        self.progress.work_waiting();
        self.note_lag(&segments);
        // Reading may have taken a while: the lease must still hold when producing starts.
        if !lease.valid() {
            return Ok(Step::LeaseLost);
        }
        let delivered = tokio::time::timeout(bound, self.publish_batch(&segments))
            .await
            .map_err(|_| StepError::Timeout("delivery"))?;
        if let Err(e) = delivered {
            self.producer.recover(&e);
            return Err(StepError::Deliver(e));
        }
        self.crash_point(RelayCrash::AfterDelivery);
        let crash = || self.crash_point(RelayCrash::DuringCheckpoint);
        let written = tokio::time::timeout(bound, self.leases.checkpoint(lease, last, &crash))
            .await
            .map_err(|_| StepError::Timeout("the checkpoint write"))?;
        match written {
            Ok(true) => Ok(Step::Published(last)),
            Ok(false) => Ok(Step::LeaseLost),
            // Delivered but not recorded: the next checkpoint covers it; a crash before then
            // re-publishes this batch once.
            Err(e) => Err(StepError::Checkpoint(e)),
        }
    }

    /// After a stall: give the lease up so a standby can lead, start over with a fresh
    /// producer, and stand by for a lease period before competing for the lease again.
    async fn step_down(&self, lease: &Lease, shutdown: &CancellationToken) {
        tracing::error!(
            epoch = lease.epoch,
            stalled_for = ?self.progress.since_progress(),
            error = self.progress.last_error().unwrap_or_default(),
            "relay made no progress for relay.stall_timeout_ms with work waiting; stepping down"
        );
        metrics::counter!("spiced_relay_step_downs_total").increment(1);
        let bound = Duration::from_millis(self.config.relay.stall_timeout_ms);
        match tokio::time::timeout(bound, self.leases.release(lease)).await {
            Ok(Ok(())) => {}
            // The lease then runs out on its own; the local validity has already ended.
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot release the lease"),
            Err(_) => tracing::warn!("releasing the lease did not finish; it expires on its own"),
        }
        self.producer.replace();
        // Standing by is not a stall: the clock restarts when this relay leads again.
        self.progress.idle();
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(self.leases.lease_duration()) => {}
        }
    }

    fn export_metrics(&self) {
        let s = &self.stats;
        let published = s.published_position.load(Ordering::Relaxed);
        let head = s.head_position.load(Ordering::Relaxed).max(published);
        metrics::gauge!("spiced_relay_published_position").set(published as f64);
        metrics::gauge!("spiced_relay_log_head_position").set(head as f64);
        metrics::gauge!("spiced_relay_lag_positions").set((head - published) as f64);
        metrics::gauge!("spiced_relay_lag_seconds").set(s.lag_seconds.load(Ordering::Relaxed) as f64);
        metrics::counter!("spiced_relay_events_published_total").absolute(s.events_published.load(Ordering::Relaxed));
        metrics::counter!("spiced_relay_dead_letters_total").absolute(s.dead_lettered.load(Ordering::Relaxed));
        metrics::counter!("spiced_relay_produce_errors_total").absolute(s.produce_errors.load(Ordering::Relaxed));
    }

    fn note_lag(&self, segments: &[Segment]) {
        let head = self.stats.head_position.load(Ordering::Relaxed);
        let last = segments.last().map(|s| s.position).unwrap_or(0);
        self.stats.head_position.store(head.max(last), Ordering::Relaxed);
        if let Some(first) = segments.first().and_then(|s| s.events.first()) {
            let lag = (Utc::now() - first.occurred_at).num_seconds().max(0) as u64;
            self.stats.lag_seconds.store(lag, Ordering::Relaxed);
        }
    }

    /// Produces every envelope of `segments` in order and waits for every delivery report.
    #[tracing::instrument(name = "publish", skip_all, fields(
        from = segments.first().map(|s| s.position), to = segments.last().map(|s| s.position)))]
    async fn publish_batch(&self, segments: &[Segment]) -> Result<(), KafkaError> {
        let mut pending: VecDeque<DeliveryFuture> = VecDeque::new();
        let mut dead = 0;
        for segment in segments {
            let position = segment.position.to_string();
            for (i, envelope) in segment.events.iter().enumerate() {
                let payload = segment.raw_event(i);
                let route = self.route(envelope);
                tracing::debug!(
                    position = segment.position, event_id = %envelope.event_id, command_id = envelope.command_id().map(tracing::field::display),
                    aggregate_id = %envelope.aggregate_id, sequence_number = envelope.sequence_number, topic = route.topic(),
                    "publishing"
                );
                // The log position lets consumers (the projection) say how far they are.
                let mut headers = OwnedHeaders::new().insert(Header { key: POSITION_HEADER, value: Some(position.as_str()) });
                if let Route::DeadLetter { reason, .. } = &route {
                    dead += 1;
                    tracing::warn!(position = segment.position, event_id = %envelope.event_id, reason, "envelope sent to the dead-letter topic");
                    headers = headers.insert(Header { key: "spiced-dead-letter-reason", value: Some(reason.as_str()) });
                }
                let record = FutureRecord::to(route.topic())
                    .key(envelope.ordering_key())
                    .payload(&payload[..])
                    .headers(headers);
                let delivery = self.send(record, &mut pending).await?;
                pending.push_back(delivery);
            }
        }
        self.crash_point(RelayCrash::AfterProduce);
        let count = pending.len() as u64;
        while let Some(delivery) = pending.pop_front() {
            settle(delivery).await?;
        }
        self.stats.events_published.fetch_add(count, Ordering::Relaxed);
        self.stats.dead_lettered.fetch_add(dead, Ordering::Relaxed);
        Ok(())
    }

    /// Enqueues one record; while librdkafka's queue is full, settles the oldest delivery.
    async fn send<'a>(
        &self,
        mut record: FutureRecord<'a, str, [u8]>,
        pending: &mut VecDeque<DeliveryFuture>,
    ) -> Result<DeliveryFuture, KafkaError> {
        let producer = self.producer.get();
        loop {
            match producer.send_result(record) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    match pending.pop_front() {
                        Some(oldest) => settle(oldest).await?,
                        None => tokio::time::sleep(Duration::from_millis(5)).await,
                    }
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    fn route(&self, envelope: &EventEnvelope) -> Route {
        match envelope.kafka_topic() {
            Some(topic) if self.topics.contains(topic) => Route::Topic(topic.to_string()),
            Some(topic) => Route::DeadLetter {
                topic: self.config.relay.dead_letter_topic.clone(),
                reason: format!("metadata.kafka_topic {topic:?} is not a configured topic"),
            },
            None => Route::DeadLetter {
                topic: self.config.relay.dead_letter_topic.clone(),
                reason: "metadata.kafka_topic is missing".to_string(),
            },
        }
    }

    /// Publishes positions `from..=to` once: Kafka is a cache of the log that can be refilled.
    async fn republish(&self, from: u64, to: u64) -> anyhow::Result<()> {
        anyhow::ensure!(from >= 1 && from <= to, "--republish needs 1 <= --from-position <= --to-position");
        let mut next = from;
        while next <= to {
            let max = (to - next + 1).min(self.config.relay.batch_segments as u64) as usize;
            let segments = self.tail.read(next, max).await?;
            anyhow::ensure!(!segments.is_empty(), "log position {next} is not written");
            self.publish_batch(&segments).await?;
            next = segments.last().map(|s| s.position + 1).unwrap_or(next);
        }
        self.producer.get().flush(Duration::from_secs(30))?;
        println!("re-published positions {from}..={to}");
        Ok(())
    }

    fn crash_point(&self, point: RelayCrash) {
        if self.config.relay.crash_at == point {
            eprintln!("spiced: relay.crash_at = {point:?}: aborting as configured (testing only)");
            std::process::abort();
        }
    }
}

/// What one round of the publish loop did.
enum Step {
    /// The log has nothing after the checkpoint.
    Idle,
    /// Published and checkpointed up to this position.
    Published(u64),
    LeaseLost,
}

enum Route {
    Topic(String),
    DeadLetter { topic: String, reason: String },
}

impl Route {
    fn topic(&self) -> &str {
        match self {
            Route::Topic(t) | Route::DeadLetter { topic: t, .. } => t,
        }
    }
}

async fn settle(delivery: DeliveryFuture) -> Result<(), KafkaError> {
    match delivery.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(e),
        Err(_canceled) => Err(KafkaError::Canceled),
    }
}

