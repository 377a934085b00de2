//! `spiced worker`: command workers. Each role consumes its command topics in a consumer
//! group with auto-commit off, runs each command through the [`handler`] (claim, decide from
//! the log, append the outcome, mark done), and commits an offset only when every message up
//! to it is done or dead-lettered.
//!
//! [`lanes`] runs one Kafka key (aggregate) at a time, in order, and different keys
//! concurrently; a command waiting for another aggregate steps aside for the others.

pub mod embedded;
pub mod facts;
pub mod handler;
pub mod lanes;
pub mod lease;
pub mod offsets;

pub use crate::routing::Role;

use crate::bus::kafka::{base_config, ensure_topics, with_properties, Publisher};
use crate::liveness::Stage;
use crate::config::Config;
use crate::shutdown::Graceful;
use facts::LogState;
use handler::{CommandHandler, Disposition};
use lanes::{Lanes, Run, Slot};
use offsets::Offsets;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::FutureRecord;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Roles from `--role` arguments, else from `worker.roles`.
pub fn roles(config: &Config, requested: &[Role]) -> anyhow::Result<Vec<Role>> {
    let chosen = if requested.is_empty() { &config.worker.roles } else { requested };
    let mut roles = Vec::new();
    for role in chosen {
        if !roles.contains(role) {
            roles.push(*role);
        }
    }
    anyhow::ensure!(!roles.is_empty(), "no worker role to run");
    Ok(roles)
}

/// The pieces every role shares in one process.
pub struct Shared {
    pub config: Arc<Config>,
    pub db: crate::db::Database,
    pub log: crate::log::EventLog,
    pub state: LogState,
    pub writer: crate::log::writer::LogWriter,
    pub owner: String,
}

impl Shared {
    pub async fn open(config: &Config, tasks: &TaskTracker) -> anyhow::Result<Shared> {
        let (db, log) = crate::storage::open(config).await?;
        let writer = crate::log::writer::LogWriter::start(log.clone(), db.index.clone(), config.writer.clone(), tasks).await?;
        Ok(Shared {
            config: Arc::new(config.clone()),
            state: LogState::new(log.clone(), db.index.clone()),
            log,
            db,
            writer,
            owner: format!("{}-{}", crate::liveness::instance(), &uuid::Uuid::new_v4().simple().to_string()[..8]),
        })
    }

    pub fn handler(&self, role: Role) -> CommandHandler {
        CommandHandler::new(
            role,
            self.owner.clone(),
            self.config.clone(),
            self.db.registry.clone(),
            self.state.clone(),
            self.writer.clone(),
        )
    }
}

pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    run_roles(config, &[], shutdown).await
}

/// Runs the given roles (or `worker.roles`) against Kafka until `shutdown`, then stops
/// gracefully within `worker.shutdown_grace_ms`.
pub async fn run_roles(config: Config, requested: &[Role], shutdown: CancellationToken) -> anyhow::Result<()> {
    let roles = roles(&config, requested)?;
    let shutdown = Graceful::new(shutdown, Duration::from_millis(config.worker.shutdown_grace_ms));
    let tasks = TaskTracker::new();
    let shared = Shared::open(&config, &tasks).await?;
    let mut topics = crate::routing::all_topics(&config);
    topics.extend(roles.iter().map(|r| r.dead_letter_topic(&config).to_string()));
    ensure_topics(&config.kafka, &topics).await?;
    let dead_letters = Arc::new(Publisher::new(&config.kafka)?);
    let stall = Duration::from_millis(config.worker.stall_timeout_ms);
    let progress: Vec<Arc<Stage>> =
        roles.iter().map(|r| crate::liveness::register(&format!("worker:{}", r.name()), stall)).collect();
    let _ops = crate::telemetry::start_ops(
        &config.metrics.worker_listen,
        crate::telemetry::readiness(shared.db.clone(), shared.log.clone(), progress.clone()),
    )
    .await?;
    let reporting = crate::liveness::Reporting::start(shared.db.clone(), progress.clone(), &shutdown.stop);
    tracing::info!(roles = ?roles.iter().map(|r| r.name()).collect::<Vec<_>>(), owner = %shared.owner, "spiced worker starting");
    crate::systemd::ready();
    let results = futures::future::join_all(
        roles.iter().zip(&progress).map(|(role, p)| consume_role(&shared, *role, &dead_letters, p, &shutdown)),
    )
    .await;
    reporting.finish().await;
    drop(shared);
    tasks.close();
    // The log writer drains what the lanes queued; past the grace period its appends are
    // abandoned like any effect (outcome ids are deterministic, and a segment written without
    // its index commit is repaired from the log by the next writer).
    tokio::select! {
        _ = tasks.wait() => {}
        _ = shutdown.deadline.cancelled() => tracing::warn!("shutdown grace period over: abandoning log appends in flight"),
    }
    results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    Ok(())
}

struct Job {
    topic: String,
    partition: i32,
    offset: i64,
    position: Option<u64>,
    key: Vec<u8>,
    payload: Vec<u8>,
}

fn consumer(config: &Config, role: Role) -> anyhow::Result<StreamConsumer> {
    let mut c = base_config(&config.kafka);
    c.set("group.id", format!("{}-{}-worker", config.worker.group_prefix, role.name()))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", config.worker.session_timeout_ms.to_string());
    Ok(with_properties(c, &config.kafka).create()?)
}

async fn consume_role(
    shared: &Shared,
    role: Role,
    dead_letters: &Arc<Publisher>,
    progress: &Arc<Stage>,
    shutdown: &Graceful,
) -> anyhow::Result<()> {
    let consumer = Arc::new(consumer(&shared.config, role)?);
    let lag = crate::bus::kafka::spawn_lag_export(consumer.clone(), role.handler(), LAG_EVERY, shutdown.stop.clone(), progress.clone());
    let topics = role.command_topics(&shared.config);
    consumer.subscribe(&topics.iter().map(String::as_str).collect::<Vec<_>>())?;
    let lanes_n = shared.config.worker.lanes;
    let runner = Arc::new(JobRunner {
        handler: Arc::new(shared.handler(role)),
        consumer: consumer.clone(),
        offsets: Arc::new(Mutex::new(Offsets::default())),
        dead_letters: dead_letters.clone(),
        progress: progress.clone(),
        config: shared.config.clone(),
        shutdown: shutdown.clone(),
    });
    let lanes = Lanes::new(lanes_n, lanes_n * IN_HAND_PER_LANE, runner.clone());
    loop {
        let room = tokio::select! {
            _ = shutdown.stop.cancelled() => break,
            room = lanes.room() => room,
        };
        let message = tokio::select! {
            _ = shutdown.stop.cancelled() => break,
            m = consumer.recv() => m,
        };
        let m = match message {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, role = role.name(), "consumer error");
                continue;
            }
        };
        let job = Job {
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
            position: crate::bus::kafka::log_position(&m),
            key: m.key().unwrap_or_default().to_vec(),
            payload: m.payload().unwrap_or_default().to_vec(),
        };
        runner.offsets.lock().expect("offsets mutex").received(&job.topic, job.partition, job.offset);
        progress.started();
        lanes.push(job.key.clone(), job, room);
    }
    tracing::info!(role = role.name(), grace_ms = shared.config.worker.shutdown_grace_ms, queued = lanes.queued(),
        "shutdown: taking no new messages; in-flight commands get the grace period");
    // Queued messages not started are dropped uncommitted: they are delivered again.
    lanes.close().await;
    let _ = lag.await;
    Ok(())
}

/// Messages in hand per running place: enough that a busy aggregate's queue does not starve
/// the others of intake.
const IN_HAND_PER_LANE: usize = 64;

/// How often each role exports its consumer lag.
const LAG_EVERY: Duration = Duration::from_secs(5);

/// What a role does with each message its lanes hand it.
struct JobRunner {
    handler: Arc<CommandHandler>,
    consumer: Arc<StreamConsumer>,
    offsets: Arc<Mutex<Offsets>>,
    dead_letters: Arc<Publisher>,
    progress: Arc<Stage>,
    config: Arc<Config>,
    shutdown: Graceful,
}

#[async_trait::async_trait]
impl Run<Job> for JobRunner {
    async fn run(&self, job: Job, slot: &Slot) -> bool {
        let disposition = match self.handler.handle(&job.payload, slot, &self.shutdown).await {
            Ok(d) => d,
            // Not finished: its offset is not committed, so it is delivered again.
            Err(handler::Interrupted) => return false,
        };
        if let Disposition::DeadLetter { reason, attempts } = &disposition {
            // Publishing the dead letter is part of the message's effect: it gets the grace
            // period, not just until the first signal.
            let letter = DeadLetter { job: &job, reason, attempts: *attempts };
            if !publish_dead_letter(&self.dead_letters, &self.config, &self.handler, &letter, &self.progress, &self.shutdown.deadline).await {
                return false;
            }
        }
        self.handler.crash_point(crate::config::WorkerCrash::BeforeCommit);
        if let Some(position) = job.position {
            self.handler.note_processed(position);
            self.progress.reached(position);
        }
        let next = self.offsets.lock().expect("offsets mutex").finished(&job.topic, job.partition, job.offset);
        if let Some(next) = next {
            let mut tpl = TopicPartitionList::new();
            if tpl.add_partition_offset(&job.topic, job.partition, Offset::Offset(next)).is_ok() {
                if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
                    tracing::warn!(error = %e, "offset commit failed; the next commit covers it");
                }
            }
        }
        self.progress.finished();
        true
    }
}

/// A message that is to go to the dead-letter topic, and why.
struct DeadLetter<'a> {
    job: &'a Job,
    reason: &'a str,
    attempts: u32,
}

/// Publishes a dead letter, retrying until delivered: moving past the message without it
/// would lose it. A producer that cannot deliver again is replaced. `false` when `shutdown`
/// fires first.
async fn publish_dead_letter(
    producer: &Publisher,
    config: &Config,
    handler: &CommandHandler,
    letter: &DeadLetter<'_>,
    progress: &Stage,
    shutdown: &CancellationToken,
) -> bool {
    let job = letter.job;
    let envelope = serde_json::from_slice::<serde_json::Value>(&job.payload)
        .unwrap_or_else(|_| json!(String::from_utf8_lossy(&job.payload)));
    let body = json!({
        "original_topic": job.topic, "partition": job.partition, "offset": job.offset,
        "envelope": envelope, "error": letter.reason, "attempt_count": letter.attempts,
        "worker": handler.owner, "at": chrono::Utc::now(),
    })
    .to_string();
    let topic = handler.role.dead_letter_topic(config);
    tracing::warn!(topic, reason = letter.reason, "message dead-lettered");
    loop {
        let record = FutureRecord::to(topic).key(&job.key[..]).payload(body.as_bytes());
        match producer.get().send(record, Duration::from_secs(10)).await {
            Ok(_) => return true,
            Err((e, _)) => {
                tracing::warn!(error = %e, "dead-letter publish failed; retrying");
                progress.failed(&e);
                producer.recover(&e);
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
