//! `spiced verify`: checks the log against its guarantees, and the index against the log.
//! It also reports every event the live read models are missing because the read store
//! refused it (`projection_failures`): the log holds it, the read models do not, and only an
//! operator can change that. Prints a report; any violation makes the command fail (non-zero
//! exit).

use crate::config::Config;
use crate::db::read::{ProjectionFailure, ReadSchema};
use crate::db::Database;
use crate::domain::{AggregateKey, AggregateType};
use crate::envelope::Kind;
use crate::db::IndexRow;
use crate::log::{EventLog, Segment};
use futures::{StreamExt, TryStreamExt};
use std::collections::{BTreeMap, HashMap, HashSet};

/// What the checks look at.
pub struct Inputs {
    /// Positions found by listing the log.
    pub listed: Vec<u64>,
    /// The segments from `from` on, in position order.
    pub segments: Vec<Segment>,
    pub from: u64,
    pub index_head: u64,
    pub index_rows: Vec<IndexRow>,
    pub versions: HashMap<AggregateKey, u64>,
    pub relay_checkpoint: u64,
    /// The events the live read models are missing (refused by the read store).
    pub projection_failures: Vec<ProjectionFailure>,
}

/// Each check's name and the violations it found; plus notes that are not violations.
#[derive(Debug, Default)]
pub struct Report {
    pub checks: Vec<(&'static str, Vec<String>)>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn violations(&self) -> usize {
        self.checks.iter().map(|(_, v)| v.len()).sum()
    }

    pub fn failed(&self, check: &str) -> bool {
        self.checks.iter().any(|(name, v)| *name == check && !v.is_empty())
    }

    pub fn print(&self) {
        for (name, violations) in &self.checks {
            let mark = if violations.is_empty() { "ok  " } else { "FAIL" };
            println!("{mark} {name}");
            for v in violations.iter().take(20) {
                println!("       {v}");
            }
            if violations.len() > 20 {
                println!("       ... and {} more", violations.len() - 20);
            }
        }
        for note in &self.notes {
            println!("note {note}");
        }
    }
}

pub const GAPLESS: &str = "log positions are gapless";
pub const UNIQUE_SEQ: &str = "no (aggregate, kind, sequence) twice";
pub const UNIQUE_ID: &str = "no event_id twice";
pub const AGG_GAPLESS: &str = "per-aggregate command sequences are gapless; outcomes answer commands in order";
pub const VERSIONS: &str = "aggregate versions agree with the log";
pub const INDEX: &str = "the per-aggregate read index agrees with the log";
pub const HEAD: &str = "the index head is not ahead of the log";
pub const RELAY: &str = "the relay checkpoint is within the log";
pub const PROJECTION: &str = "the read models hold every outcome event they have passed (none refused)";

type Key = (AggregateKey, Kind);

pub fn check(input: &Inputs) -> Report {
    let mut report = Report::default();
    let max = input.listed.last().copied().unwrap_or(0);
    let listed: HashSet<u64> = input.listed.iter().copied().collect();
    report.checks.push((GAPLESS, (1..=max).filter(|p| !listed.contains(p)).map(|p| format!("position {p} is missing")).collect()));

    let mut seen_seq: HashMap<(Key, u64), u64> = HashMap::new();
    let mut seen_id: HashMap<uuid::Uuid, u64> = HashMap::new();
    let (mut dup_seq, mut dup_id) = (Vec::new(), Vec::new());
    let mut sequences: BTreeMap<Key, Vec<u64>> = BTreeMap::new();
    let mut from_log: HashSet<(uuid::Uuid, Key, u64, u64)> = HashSet::new();
    for segment in &input.segments {
        for e in &segment.events {
            let Some(ty) = AggregateType::parse(&e.aggregate_type) else { continue };
            let key = (AggregateKey::new(ty, e.aggregate_id.clone()), e.kind().unwrap_or(Kind::Command));
            let seq = e.sequence_number.unwrap_or(0);
            if let Some(first) = seen_seq.insert((key.clone(), seq), segment.position) {
                dup_seq.push(format!("{} {} sequence {seq} at positions {first} and {}", key.0, key.1.as_str(), segment.position));
            }
            if let Some(first) = seen_id.insert(e.event_id, segment.position) {
                dup_id.push(format!("event {} at positions {first} and {}", e.event_id, segment.position));
            }
            sequences.entry(key.clone()).or_default().push(seq);
            if segment.position <= input.index_head {
                from_log.insert((e.event_id, key, seq, segment.position));
            }
        }
    }
    report.checks.push((UNIQUE_SEQ, dup_seq));
    report.checks.push((UNIQUE_ID, dup_id));
    report.checks.push((AGG_GAPLESS, aggregate_gaps(&sequences, input.from)));
    report.checks.push((VERSIONS, versions(&sequences, &input.versions, input.from, &mut report.notes)));
    let from_index: HashSet<(uuid::Uuid, Key, u64, u64)> = input
        .index_rows
        .iter()
        .filter(|r| r.position >= input.from)
        .map(|r| (r.event_id, (r.key.clone(), r.kind), r.seq, r.position))
        .collect();
    let mut index = Vec::new();
    for (id, key, seq, p) in from_log.difference(&from_index) {
        index.push(format!("{} {} sequence {seq} (event {id}) at position {p} is missing from the index", key.0, key.1.as_str()));
    }
    for (id, key, seq, p) in from_index.difference(&from_log) {
        index.push(format!("index names {} {} sequence {seq} (event {id}) at position {p}, which the log does not hold", key.0, key.1.as_str()));
    }
    report.checks.push((INDEX, index));
    let mut head = Vec::new();
    if input.index_head > max {
        head.push(format!("index head {} is past the last segment {max}", input.index_head));
    } else if input.index_head < max {
        report.notes.push(format!(
            "the index is {} segment(s) behind the log (a writer crashed after its log write); the next write or start of `spiced serve` records them",
            max - input.index_head
        ));
    }
    report.checks.push((HEAD, head));
    let relay = if input.relay_checkpoint > max {
        vec![format!("relay checkpoint {} is past the last segment {max}", input.relay_checkpoint)]
    } else {
        Vec::new()
    };
    report.checks.push((RELAY, relay));
    report.checks.push((PROJECTION, refused(&input.projection_failures)));
    report
}

fn refused(failures: &[ProjectionFailure]) -> Vec<String> {
    failures
        .iter()
        .map(|f| {
            format!(
                "event {} at position {} ({}) is missing from the read models: refused {} time(s), last: {}; fix the cause, then `spiced project failures retry`",
                f.event_id, f.position, f.aggregate_id, f.attempts, f.error
            )
        })
        .collect()
}

fn aggregate_gaps(sequences: &BTreeMap<Key, Vec<u64>>, from: u64) -> Vec<String> {
    let mut out = Vec::new();
    for ((aggregate, kind), seqs) in sequences {
        let ordered = seqs.windows(2).all(|w| w[0] < w[1]);
        if !ordered {
            out.push(format!("{aggregate} {} sequences out of log order: {seqs:?}", kind.as_str()));
        }
        if *kind == Kind::Command && from <= 1 {
            let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
            if *seqs != expected && ordered {
                out.push(format!("{aggregate} command sequences are not 1..{}: {seqs:?}", seqs.len()));
            }
        }
        if *kind == Kind::Domain {
            let commands: HashSet<u64> = sequences
                .get(&(aggregate.clone(), Kind::Command))
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default();
            for s in seqs.iter().filter(|s| !commands.contains(s) && from <= 1) {
                out.push(format!("{aggregate} outcome {s} answers no command"));
            }
        }
    }
    out
}

fn versions(
    sequences: &BTreeMap<Key, Vec<u64>>,
    versions: &HashMap<AggregateKey, u64>,
    from: u64,
    notes: &mut Vec<String>,
) -> Vec<String> {
    if from > 1 {
        notes.push("versions are only checked against the whole log (no --from-position)".into());
        return Vec::new();
    }
    let mut out = Vec::new();
    for ((aggregate, kind), seqs) in sequences.iter().filter(|((_, k), _)| *k == Kind::Command) {
        let _ = kind;
        let last = seqs.iter().max().copied().unwrap_or(0);
        let stored = versions.get(aggregate).copied().unwrap_or(0);
        if stored != last {
            out.push(format!("{aggregate}: version table says {stored}, the log says {last}"));
        }
    }
    for (aggregate, v) in versions {
        if !sequences.contains_key(&(aggregate.clone(), Kind::Command)) {
            out.push(format!("{aggregate}: version table says {v}, the log has no command for it"));
        }
    }
    out
}

/// Reads everything the checks need and runs them.
pub async fn run(config: &Config, from: u64) -> anyhow::Result<Report> {
    let db = Database::open(&config.database).await?;
    let log = EventLog::open(&config.log)?;
    let listed = log.list_positions().await?;
    let segments = read_segments(&log, &listed, from).await?;
    let inputs = Inputs {
        listed,
        segments,
        from: from.max(1),
        index_head: db.index.head().await?,
        index_rows: db.index.all_rows().await?,
        versions: db.index.all_versions().await?,
        relay_checkpoint: db.checkpoints.position(&config.relay.name).await?,
        projection_failures: db.read.failures(&ReadSchema::live()).await?,
    };
    Ok(check(&inputs))
}

async fn read_segments(log: &EventLog, listed: &[u64], from: u64) -> anyhow::Result<Vec<Segment>> {
    let wanted: Vec<u64> = listed.iter().copied().filter(|p| *p >= from).collect();
    let segments: Vec<Option<Segment>> = futures::stream::iter(wanted)
        .map(|p| log.get_segment(p))
        .buffered(16)
        .try_collect()
        .await?;
    Ok(segments.into_iter().flatten().collect())
}
