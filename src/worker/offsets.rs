//! Which Kafka offsets may be committed: messages finish out of order across lanes, and an
//! offset is committed only once every message before it in its partition is finished.

use std::collections::{BTreeSet, HashMap};

#[derive(Debug, Default)]
pub struct Offsets {
    partitions: HashMap<(String, i32), Partition>,
}

#[derive(Debug, Default)]
struct Partition {
    in_flight: BTreeSet<i64>,
    highest: Option<i64>,
    committed: Option<i64>,
}

impl Offsets {
    pub fn received(&mut self, topic: &str, partition: i32, offset: i64) {
        let p = self.partitions.entry((topic.to_string(), partition)).or_default();
        p.in_flight.insert(offset);
        p.highest = Some(p.highest.map_or(offset, |h| h.max(offset)));
        // Nothing before the first message seen here is ours to commit.
        p.committed.get_or_insert(offset);
    }

    /// Marks a message finished; returns the offset to commit (the next one to read) if it
    /// moved forward.
    pub fn finished(&mut self, topic: &str, partition: i32, offset: i64) -> Option<i64> {
        let p = self.partitions.get_mut(&(topic.to_string(), partition))?;
        p.in_flight.remove(&offset);
        let next = match p.in_flight.first() {
            Some(lowest) => *lowest,
            None => p.highest? + 1,
        };
        if p.committed.is_none_or(|c| next > c) {
            p.committed = Some(next);
            Some(next)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_only_a_finished_prefix() {
        let mut o = Offsets::default();
        for off in 10..13 {
            o.received("t", 0, off);
        }
        assert_eq!(o.finished("t", 0, 11), None, "10 is still in flight");
        assert_eq!(o.finished("t", 0, 10), Some(12));
        assert_eq!(o.finished("t", 0, 12), Some(13));
        o.received("t", 1, 5);
        assert_eq!(o.finished("t", 1, 5), Some(6));
        assert_eq!(o.finished("t", 9, 1), None, "unknown partition");
    }
}
