//! Events a read-model schema could not apply because the read store refused their content (a
//! NUL in jsonb, a row over a size limit, a constraint): set aside in `projection_failures`,
//! one row per schema and event with its log position, aggregate, error, attempts and when it
//! was first and last refused, so that the projection goes on with the events after it. Such
//! an event is missing from that schema's read models until [`super::ReadStore::reapply`]
//! applies it again.

use super::ReadSchema;
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// A recorded failure.
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectionFailure {
    /// The read-model schema missing the event (`spiced_read` is the live one).
    pub schema: String,
    pub event_id: Uuid,
    pub position: u64,
    pub aggregate_id: String,
    /// The read store's last refusal.
    pub error: String,
    /// How many times it was refused.
    pub attempts: u32,
    pub first_seen_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
}

/// The swap's renaming of the two schemas' failures, as of the schemas themselves (names are
/// checked identifiers, see [`ReadSchema::named`]). Same SQL on both backends.
pub(crate) fn exchange(live: &ReadSchema, target: &ReadSchema) -> String {
    let (l, t) = (live.name(), target.name());
    format!(
        "UPDATE projection_failures SET schema_name = '{t}__swapping' WHERE schema_name = '{l}';
         UPDATE projection_failures SET schema_name = '{l}' WHERE schema_name = '{t}';
         UPDATE projection_failures SET schema_name = '{t}' WHERE schema_name = '{t}__swapping';"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_swap_exchanges_the_failures_of_the_two_schemas() {
        let target = ReadSchema::named("rebuilt").unwrap();
        let sql = exchange(&ReadSchema::live(), &target);
        let steps: Vec<&str> = sql.lines().map(str::trim).collect();
        assert_eq!(
            steps,
            [
                "UPDATE projection_failures SET schema_name = 'rebuilt__swapping' WHERE schema_name = 'spiced_read';",
                "UPDATE projection_failures SET schema_name = 'spiced_read' WHERE schema_name = 'rebuilt';",
                "UPDATE projection_failures SET schema_name = 'rebuilt' WHERE schema_name = 'rebuilt__swapping';",
            ]
        );
    }
}
