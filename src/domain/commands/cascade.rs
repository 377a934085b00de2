//! What `DELETE /databases/{db}?cascade=true` leaves behind. It deletes the database with one
//! outcome and leaves its classes' and instances' last states in the log as they were; what
//! makes them gone is this rule, applied to every state a command reads (its own included): a
//! class or instance is live only while its database is. A name is never used again (a create
//! needs an aggregate with no commands), so a database deleted once stays deleted, and so do
//! they. Without `cascade` a database is deleted only when it has no live class (and a class
//! only when it has no live instance), so the rule changes nothing there.

use super::StateReader;
use crate::domain::{AggregateKey, AggregateType};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Mutex;

/// A [`StateReader`] that applies the rule to every class and instance it reads.
pub struct LiveDatabases<'a, R> {
    log: &'a R,
    /// Whether each database read so far (as of the same place) is live, by name.
    databases: Mutex<HashMap<String, bool>>,
}

impl<'a, R: StateReader> LiveDatabases<'a, R> {
    pub fn new(log: &'a R) -> Self {
        LiveDatabases { log, databases: Mutex::default() }
    }

    /// `state` (of an aggregate of `aggregate_type`) if it is live by the rule.
    pub async fn alive(&self, aggregate_type: AggregateType, state: Option<Value>) -> Result<Option<Value>, R::Error> {
        let Some(state) = state else { return Ok(None) };
        if aggregate_type == AggregateType::Database {
            return Ok(Some(state));
        }
        let db = state["db"].as_str().unwrap_or_default().to_string();
        let cached = self.databases.lock().expect("databases mutex").get(&db).copied();
        let live = match cached {
            Some(live) => live,
            None => {
                let live = self.log.state(&AggregateKey::database(&db)).await?.is_some();
                self.databases.lock().expect("databases mutex").insert(db, live);
                live
            }
        };
        Ok(live.then_some(state))
    }
}

#[async_trait::async_trait]
impl<R: StateReader> StateReader for LiveDatabases<'_, R> {
    type Error = R::Error;

    async fn state(&self, key: &AggregateKey) -> Result<Option<Value>, R::Error> {
        let state = self.log.state(key).await?;
        self.alive(key.aggregate_type, state).await
    }

    async fn aggregates_with_prefix(&self, aggregate_type: AggregateType, prefix: &str) -> Result<Vec<String>, R::Error> {
        self.log.aggregates_with_prefix(aggregate_type, prefix).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// States by aggregate id.
    struct Fixed(HashMap<String, Value>);

    #[async_trait::async_trait]
    impl StateReader for Fixed {
        type Error = ();
        async fn state(&self, key: &AggregateKey) -> Result<Option<Value>, ()> {
            Ok(self.0.get(&key.aggregate_id).cloned())
        }
        async fn aggregates_with_prefix(&self, _: AggregateType, _: &str) -> Result<Vec<String>, ()> {
            Ok(vec![])
        }
    }

    #[tokio::test]
    async fn classes_and_instances_of_a_deleted_database_are_gone() {
        let log = Fixed(HashMap::from([
            ("live".to_string(), json!({"db": "live"})),
            ("live:main:C".to_string(), json!({"db": "live", "class_id": "C"})),
            ("live:main:C:i".to_string(), json!({"db": "live", "class_id": "C", "instance_id": "i"})),
            ("gone:main:C".to_string(), json!({"db": "gone", "class_id": "C"})),
            ("gone:main:C:i".to_string(), json!({"db": "gone", "class_id": "C", "instance_id": "i"})),
        ]));
        let reader = LiveDatabases::new(&log);
        let live = |key: AggregateKey| {
            let reader = &reader;
            async move { reader.state(&key).await.unwrap().is_some() }
        };
        assert!(live(AggregateKey::class("live", "main", "C")).await);
        assert!(live(AggregateKey::instance("live", "main", "C", "i")).await);
        assert!(!live(AggregateKey::class("gone", "main", "C")).await, "its database was deleted with cascade");
        assert!(!live(AggregateKey::instance("gone", "main", "C", "i")).await);
        assert!(live(AggregateKey::database("live")).await);
    }
}
