//! The aggregates the API has seen named in the log, so the "was it ever created" check before
//! an append costs one index look-up per database or class per process, not one per command.
//!
//! Only positive answers are kept, and they stay true: an aggregate's version in the log index
//! never goes down (a delete is one more command on it), so "named at least once" cannot
//! become false. A negative answer is never cached: the aggregate may be created the next
//! moment.

use std::collections::HashSet;
use std::sync::Mutex;

/// Most names kept; past it the set starts over (each name then costs one look-up again).
pub const MAX_NAMED: usize = 100_000;

#[derive(Debug, Default)]
pub struct Named {
    seen: Mutex<HashSet<String>>,
}

impl Named {
    pub fn contains(&self, key: &str) -> bool {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).contains(key)
    }

    /// Records that `key` has a command in the log.
    pub fn insert(&self, key: &str) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= MAX_NAMED {
            seen.clear();
        }
        seen.insert(key.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_kept_until_the_bound_then_the_set_starts_over() {
        let named = Named::default();
        assert!(!named.contains("db"));
        named.insert("db");
        assert!(named.contains("db"));
        for i in 0..MAX_NAMED {
            named.insert(&format!("k{i}"));
        }
        assert!(!named.contains("db"), "the set started over at the bound");
        assert!(named.contains(&format!("k{}", MAX_NAMED - 1)));
    }
}
