//! `spiced relay`: publishes the event log to Kafka, at least once, in log order.
//!
//! One relay leads (a lease in PostgreSQL); standbys wait to take over. The leader reads the
//! segments after its checkpoint, produces each envelope's stored bytes unchanged to
//! `metadata.kafka_topic` keyed by `ordering_key()` (so one aggregate stays in one partition),
//! waits for every delivery report of the batch, and only then moves the checkpoint. A failed
//! delivery re-publishes the batch from the checkpoint: duplicates, never a gap.

pub mod lease;

use crate::bus::kafka::{all_topics, ensure_topics, producer};
use crate::config::Config;
use crate::db::Database;
use crate::envelope::EventEnvelope;
use crate::log::tail::Tail;
use crate::log::{EventLog, Segment};
use chrono::{DateTime, Utc};
use lease::{Lease, LeaseStore};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use crate::bus::kafka::POSITION_HEADER;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

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
    let (db, log) = crate::serve::open_storage(&config).await?;
    let log = log.with_counts(stats.log_requests.clone());
    let _ops = if options.republish.is_none() {
        Some(crate::telemetry::start_ops(&config.metrics.relay_listen, crate::telemetry::storage_readiness(db.clone(), log.clone())).await?)
    } else {
        None
    };
    let relay = Relay::new(&config, &db, log, stats)?;
    if config.relay.create_topics {
        ensure_topics(&config.kafka, &all_topics(&config)).await?;
    }
    crate::systemd::ready();
    match options.republish {
        Some((from, to)) => relay.republish(from, to).await,
        None => {
            let lag = tokio::spawn(export_lag_events(db.clone(), config.relay.name.clone(), LAG_EVENTS_EVERY, shutdown.clone()));
            let result = relay.lead_or_wait(&options, &shutdown).await;
            lag.abort();
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
    let checkpoint = db.checkpoint(name).await?;
    db.index.events_after(checkpoint).await
}

struct Relay {
    config: Config,
    tail: Tail,
    producer: FutureProducer,
    leases: LeaseStore,
    topics: HashSet<String>,
    stats: Arc<RelayStats>,
}

enum Stop {
    Shutdown,
    LeaseLost,
}

impl Relay {
    fn new(config: &Config, db: &Database, log: EventLog, stats: Arc<RelayStats>) -> anyhow::Result<Relay> {
        let pg = db.postgres().ok_or_else(|| {
            anyhow::anyhow!("the relay keeps its lease in PostgreSQL: database.url must be postgres:// (spiced dev needs no relay)")
        })?;
        let me = format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple());
        let leases = LeaseStore::new(
            pg.pool().clone(),
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
            producer: producer(&config.kafka)?,
            leases,
            topics,
            stats,
        })
    }

    /// Standby until the lease is ours, then publish until shutdown or the lease is lost.
    async fn lead_or_wait(&self, options: &RelayOptions, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let mut start_override = self.start_override(options).await?;
        loop {
            let Some(lease) = self.acquire(shutdown).await? else { return Ok(()) };
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
            match stop? {
                Stop::Shutdown => {
                    self.leases.release(&lease).await?;
                    tracing::info!("relay stopped; lease released");
                    return Ok(());
                }
                Stop::LeaseLost => tracing::warn!(epoch = lease.epoch, "lease lost; back to standby"),
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
            Some(t) => Ok(Some(self.first_position_at(t).await?.saturating_sub(1))),
            None => Ok(None),
        }
    }

    /// Binary search for the first segment whose first envelope occurred at or after `t`.
    async fn first_position_at(&self, t: DateTime<Utc>) -> anyhow::Result<u64> {
        let head = self.tail.head().await?;
        let (mut lo, mut hi) = (1u64, head + 1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let seg = self.tail.log().get_segment(mid).await?;
            let at = seg.and_then(|s| s.events.first().map(|e| e.occurred_at));
            match at {
                Some(at) if at < t => lo = mid + 1,
                _ => hi = mid,
            }
        }
        Ok(lo)
    }

    async fn acquire(&self, shutdown: &CancellationToken) -> anyhow::Result<Option<Lease>> {
        let wait = Duration::from_millis((self.config.relay.lease_ms / 5).max(50));
        let mut announced = false;
        loop {
            match self.leases.try_acquire().await {
                Ok(Some(lease)) => return Ok(Some(lease)),
                Ok(None) if !announced => {
                    tracing::info!("another relay holds the lease; standing by");
                    announced = true;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "cannot reach the lease table; retrying"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
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

    async fn publish(&self, lease: &Lease, checkpoint: u64, shutdown: &CancellationToken) -> anyhow::Result<Stop> {
        let mut next = checkpoint + 1;
        self.stats.published_position.store(checkpoint, Ordering::Relaxed);
        let mut backoff = Backoff::default();
        loop {
            if shutdown.is_cancelled() {
                return Ok(Stop::Shutdown);
            }
            if !lease.valid() {
                return Ok(Stop::LeaseLost);
            }
            let segments = match self.tail.read(next, self.config.relay.batch_segments).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, position = next, "cannot read the log; backing off");
                    backoff.wait(shutdown).await;
                    continue;
                }
            };
            let Some(last) = segments.last().map(|s| s.position) else {
                self.stats.lag_seconds.store(0, Ordering::Relaxed);
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_millis(self.config.relay.poll_interval_ms)) => {}
                }
                continue;
            };
            self.note_lag(&segments);
            // Reading may have taken a while: the lease must still hold when producing starts.
            if !lease.valid() {
                return Ok(Stop::LeaseLost);
            }
            if let Err(e) = self.publish_batch(&segments).await {
                self.stats.produce_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, from = next, "delivery failed; re-publishing the batch from the checkpoint");
                backoff.wait(shutdown).await;
                continue;
            }
            backoff.reset();
            self.crash_point("after_delivery");
            let crash = || self.crash_point("during_checkpoint");
            match self.leases.checkpoint(lease, last, crash).await {
                Ok(true) => {}
                Ok(false) => return Ok(Stop::LeaseLost),
                // Delivered but not recorded: the next checkpoint covers it; a crash before then
                // re-publishes this batch once.
                Err(e) => tracing::warn!(error = %e, position = last, "checkpoint write failed"),
            }
            next = last + 1;
            self.stats.published_position.store(last, Ordering::Relaxed);
            self.export_metrics();
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
    async fn publish_batch(&self, segments: &[Segment]) -> Result<(), KafkaError> {
        let mut pending: VecDeque<DeliveryFuture> = VecDeque::new();
        let mut dead = 0;
        for segment in segments {
            let position = segment.position.to_string();
            for (i, envelope) in segment.events.iter().enumerate() {
                let payload = segment.raw_event(i);
                let route = self.route(envelope);
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
        self.crash_point("after_produce");
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
        loop {
            match self.producer.send_result(record) {
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
        self.producer.flush(Duration::from_secs(30))?;
        println!("re-published positions {from}..={to}");
        Ok(())
    }

    fn crash_point(&self, name: &str) {
        if self.config.relay.crash_at == name {
            eprintln!("spiced: relay.crash_at = {name}: aborting as configured (testing only)");
            std::process::abort();
        }
    }
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

/// Exponential backoff with jitter, 100 ms to 5 s.
#[derive(Default)]
struct Backoff {
    attempt: u32,
}

impl Backoff {
    async fn wait(&mut self, shutdown: &CancellationToken) {
        let base = 100u64.saturating_mul(1 << self.attempt.min(6)).min(5_000);
        let jitter = jitter(base / 2);
        self.attempt += 1;
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(Duration::from_millis(base / 2 + jitter)) => {}
        }
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A cheap jitter in `0..=max` from the clock's nanoseconds; no RNG dependency needed.
pub fn jitter(max: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    if max == 0 { 0 } else { nanos % (max + 1) }
}
