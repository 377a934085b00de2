//! `spiced dlq list|show|redrive`: inspect dead letters and send them back.
//!
//! A re-drive resets the command's registry row from `failed` to `retrying` (so the next claim
//! runs it) and publishes its envelope, from the log, to its topic again (`bus::redrive`).

use crate::bus::kafka::{base_config, with_properties};
use crate::bus::redrive::Via;
use crate::config::Config;
use crate::routing::Role;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::Message;
use serde_json::Value;
use std::time::Duration;
use uuid::Uuid;

/// One dead letter as stored on its topic.
#[derive(Debug, Clone)]
pub struct Letter {
    pub offset: i64,
    pub body: Value,
}

impl Letter {
    pub fn event_id(&self) -> Option<Uuid> {
        self.body["envelope"]["event_id"].as_str().and_then(|s| s.parse().ok())
    }
}

/// Reads the role's whole dead-letter topic: until nothing arrives for `idle` (the broker's
/// high watermarks are not trusted).
pub async fn read(config: &Config, role: Role, idle: Duration) -> anyhow::Result<Vec<Letter>> {
    crate::bus::kafka::reachable(&config.kafka, Duration::from_secs(5)).await.map_err(|e| {
        anyhow::anyhow!("{e}; spiced dlq reads the dead-letter topics in Kafka (spiced dev has none: its failed commands are in `spiced status` and GET /commands/{{id}})")
    })?;
    let mut c = base_config(&config.kafka);
    c.set("group.id", format!("spiced-dlq-reader-{}", Uuid::new_v4().simple()))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000");
    let consumer: StreamConsumer = with_properties(c, &config.kafka).create()?;
    consumer.subscribe(&[role.dead_letter_topic(config)])?;
    let mut letters = Vec::new();
    // The first message can take a group join; wait longer for it.
    let mut wait = idle.max(Duration::from_secs(10));
    while let Ok(message) = tokio::time::timeout(wait, consumer.recv()).await {
        let m = message?;
        let body = serde_json::from_slice(m.payload().unwrap_or_default())
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(m.payload().unwrap_or_default()).into()));
        letters.push(Letter { offset: m.offset(), body });
        wait = idle;
    }
    Ok(letters)
}

pub async fn list(config: &Config, role: Role) -> anyhow::Result<()> {
    let letters = read(config, role, Duration::from_secs(2)).await?;
    println!("{} dead letter(s) on {}", letters.len(), role.dead_letter_topic(config));
    for l in &letters {
        let b = &l.body;
        println!(
            "offset {:>6}  event {}  from {}:{}@{}  attempts {}  at {}  error: {}",
            l.offset,
            l.event_id().map(|u| u.to_string()).unwrap_or_else(|| "-".into()),
            b["original_topic"].as_str().unwrap_or("?"),
            b["partition"],
            b["offset"],
            b["attempt_count"],
            b["at"].as_str().unwrap_or("?"),
            b["error"].as_str().unwrap_or("?"),
        );
    }
    Ok(())
}

pub async fn show(config: &Config, role: Role, event_id: Uuid) -> anyhow::Result<()> {
    let letter = find(config, role, event_id).await?;
    println!("{}", serde_json::to_string_pretty(&letter.body)?);
    Ok(())
}

async fn find(config: &Config, role: Role, event_id: Uuid) -> anyhow::Result<Letter> {
    read(config, role, Duration::from_secs(2))
        .await?
        .into_iter()
        .rev()
        .find(|l| l.event_id() == Some(event_id))
        .ok_or_else(|| anyhow::anyhow!("no dead letter for event {event_id} on {}", role.dead_letter_topic(config)))
}

/// Re-drives the command (`bus::redrive`, the same as `POST /api/v1/dead-letters/{role}/{id}/redrive`):
/// its registry row is reset and its envelope, read from the log, published to its topic.
pub async fn redrive(config: &Config, role: Role, event_id: Uuid) -> anyhow::Result<()> {
    let (db, log) = crate::storage::open(config).await?;
    let done = crate::bus::redrive::redrive(&db, &log, role, event_id, Via::Kafka(&config.kafka)).await?;
    println!(
        "re-drove event {event_id} (log position {}) to {}{}",
        done.position,
        done.topic.unwrap_or_default(),
        if done.reset { " (registry row reset from failed)" } else { " (already reset by an earlier re-drive: published again)" }
    );
    Ok(())
}
