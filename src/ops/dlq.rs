//! `spiced dlq list|show|redrive`: inspect dead letters and send them back.
//!
//! A re-drive resets the command's registry row from `failed` to `retrying` (so the next claim
//! runs it) and publishes the stored envelope to its original topic again.

use crate::bus::kafka::{base_config, producer, with_properties};
use crate::config::Config;
use crate::routing::Role;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureRecord;
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

/// Resets the command's registry row and publishes its envelope to the original topic.
pub async fn redrive(config: &Config, role: Role, event_id: Uuid) -> anyhow::Result<()> {
    let letter = find(config, role, event_id).await?;
    let topic = letter.body["original_topic"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("the dead letter names no original topic"))?
        .to_string();
    let envelope = &letter.body["envelope"];
    let key = envelope["aggregate_id"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("the dead letter holds no EventEnvelope; nothing to re-drive"))?;
    let db = crate::db::Database::open(&config.database).await?;
    let reset = db.registry.redrive(role.handler(), event_id).await?;
    let payload = serde_json::to_vec(envelope)?;
    producer(&config.kafka)?
        .send(FutureRecord::to(&topic).key(key).payload(&payload), Duration::from_secs(30))
        .await
        .map_err(|(e, _)| e)?;
    println!(
        "re-drove event {event_id} to {topic}{}",
        if reset { " (registry row reset from failed)" } else { " (no failed registry row: it runs if not done)" }
    );
    Ok(())
}
