//! A batch of read-model changes and the order it is applied in, the same on every backend.
//!
//! Several changes to one row go in rounds, in order, so each statement touches a row at most
//! once; databases go before their classes and instances, so a cascade sees them in log order.

use super::{ReadKind, ReadRow};
use crate::db::DbError;
use std::collections::HashMap;
use uuid::Uuid;

/// One outcome event as a row change.
#[derive(Debug, Clone)]
pub struct Change {
    pub event_id: Uuid,
    pub row: ReadRow,
    /// A database deletion: its classes and instances go with it.
    pub cascade: bool,
    /// An instance's references that give way when their target is deleted, as its outcome
    /// notes them: (property, target class) (`release`).
    pub gives_way: Vec<(String, String)>,
    /// An instance deletion's referrers that let go of it, as its outcome notes them: (class,
    /// property) (`release`).
    pub released: Vec<(String, String)>,
}

/// How far a batch takes the projection.
#[derive(Debug, Clone)]
pub enum Progress {
    /// Following the log: the batch holds every outcome of the segments up to `to` that come
    /// after the schema's position.
    Log { to: u64 },
    /// Consuming Kafka: per (topic, partition), every event up to this log position is applied.
    /// Each event is claimed in `processed_events`, so a redelivery changes nothing.
    Kafka(Vec<(String, i32, u64)>),
}

#[derive(Debug, Clone)]
pub struct ReadBatch {
    pub changes: Vec<Change>,
    pub progress: Progress,
}

impl ReadBatch {
    /// The span a role applies this batch in: its size and how far it reaches in the log (each
    /// event's id, aggregate and sequence are on its own line, written as the batch is built).
    pub fn span(&self) -> tracing::Span {
        match &self.progress {
            Progress::Log { to } => tracing::info_span!("apply", events = self.changes.len(), position = to),
            Progress::Kafka(partitions) => {
                let position = partitions.iter().map(|(_, _, p)| *p).max();
                tracing::info_span!("apply", events = self.changes.len(), position)
            }
        }
    }
}

/// What applying a batch did.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    /// The schema's position afterwards.
    pub position: u64,
    /// Events the read store refused for their content: recorded in `projection_failures`,
    /// not in the read models; the rest of the batch and its progress are committed.
    pub refused: Vec<Refused>,
}

/// A statement tried in a savepoint.
pub(crate) enum Tried<T> {
    Done(T),
    /// The read store refused it for its content; the savepoint is rolled back.
    Refused(DbError),
}

/// The changes of a `Progress::Log` batch not yet applied, or `None` when the schema's
/// position `stored` is already at or past the batch.
pub(crate) fn unapplied(stored: u64, to: u64, changes: &[Change]) -> Option<Vec<&Change>> {
    (stored < to).then(|| changes.iter().filter(|c| c.row.position > stored).collect())
}

/// The changes one at a time in the order a batch applies them: databases (each with its own
/// cascade, which touches only other rows), then classes and instances, each in batch order.
pub(crate) fn one_by_one<'a>(changes: &[&'a Change]) -> Vec<&'a Change> {
    let (databases, children): (Vec<&Change>, Vec<&Change>) = changes.iter().copied().partition(is_database);
    databases.into_iter().chain(children).collect()
}

/// Adds `c` to the refused events, once per event (Kafka may deliver one twice in a batch).
pub(crate) fn refuse(refused: &mut Vec<Refused>, c: &Change, e: &DbError) {
    if !refused.iter().any(|r| r.event_id == c.event_id) {
        refused.push(Refused::of(c, e));
    }
}

/// Changes grouped so that each group holds a row at most once, in order.
pub(crate) fn rounds<'a>(changes: impl Iterator<Item = &'a Change>) -> Vec<Vec<&'a Change>> {
    let mut seen: HashMap<(ReadKind, &str), usize> = HashMap::new();
    let mut rounds: Vec<Vec<&Change>> = Vec::new();
    for c in changes {
        let n = seen.entry((c.row.kind, c.row.key.as_str())).or_default();
        if rounds.len() <= *n {
            rounds.push(Vec::new());
        }
        rounds[*n].push(c);
        *n += 1;
    }
    rounds
}

pub(crate) fn is_database(c: &&Change) -> bool {
    c.row.kind == ReadKind::Database
}

pub(crate) fn cascade_position(c: &Change) -> i64 {
    if c.cascade {
        c.row.position as i64
    } else {
        0
    }
}

/// An event the read store refused, as the projection saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    pub event_id: Uuid,
    pub position: u64,
    pub aggregate_id: String,
    pub error: String,
}

impl Refused {
    pub(crate) fn of(c: &Change, e: &DbError) -> Refused {
        Refused { event_id: c.event_id, position: c.row.position, aggregate_id: c.row.key.clone(), error: e.to_string() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn change(key: &str, version: u64) -> Change {
        Change {
            event_id: Uuid::new_v4(),
            cascade: false,
            gives_way: Vec::new(),
            released: Vec::new(),
            row: ReadRow {
                kind: ReadKind::Instance,
                key: key.into(),
                parent: String::new(),
                db: "d".into(),
                state: None,
                version,
                position: version,
                deleted: false,
                created_at: Utc::now(),
                updated_at: Utc::now(),
            },
        }
    }

    #[test]
    fn rounds_hold_each_row_once_and_keep_its_order() {
        let changes = [change("a", 1), change("b", 1), change("a", 2), change("a", 3), change("b", 2)];
        let rounds = rounds(changes.iter());
        let shape: Vec<Vec<(&str, u64)>> = rounds
            .iter()
            .map(|r| r.iter().map(|c| (c.row.key.as_str(), c.row.version)).collect())
            .collect();
        assert_eq!(shape, vec![vec![("a", 1), ("b", 1)], vec![("a", 2), ("b", 2)], vec![("a", 3)]]);
    }

    #[test]
    fn one_by_one_puts_databases_first_and_keeps_batch_order() {
        let mut db = change("d", 1);
        db.row.kind = ReadKind::Database;
        let changes = [change("a", 1), db.clone(), change("b", 1), change("a", 2)];
        let refs: Vec<&Change> = changes.iter().collect();
        let order: Vec<(&str, u64)> = one_by_one(&refs).iter().map(|c| (c.row.key.as_str(), c.row.version)).collect();
        assert_eq!(order, [("d", 1), ("a", 1), ("b", 1), ("a", 2)]);
    }

    #[test]
    fn a_log_batch_skips_what_the_schema_holds() {
        let changes = [change("a", 1), change("a", 2), change("a", 3)];
        let left: Vec<u64> = unapplied(1, 3, &changes).unwrap().iter().map(|c| c.row.position).collect();
        assert_eq!(left, [2, 3]);
        assert!(unapplied(3, 3, &changes).is_none());
    }
}
