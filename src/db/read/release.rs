//! References that give way (`on_delete: nullify`) in the read models. The worker decides a
//! referrer's commands as if such a reference to a deleted instance were not there, but the
//! referrer's row keeps the state of its last outcome, which may still name the instance; and
//! outcomes reach the read store in any order across partitions (a referrer's outcome written
//! before the deletion can arrive after it). So a batch applies one rule from both ends, after
//! its rows, in the same transaction:
//!
//! * a deletion whose outcome notes `released` takes the instance out of the live rows of each
//!   noted (class, property) that name it;
//! * a row whose outcome notes `gives_way` drops each such reference whose target's row is a
//!   deletion.
//!
//! Whichever of the two arrives second does the work, and taking an id out twice changes
//! nothing, so any order converges on the state applying the log in order gives.

use super::Change;
use crate::domain::values::{ids_in, release};
use serde_json::Value;

/// A (referencing rows' parent, property, released id) the deletion `c` asks for.
pub(crate) fn released_by(c: &Change) -> Vec<(String, String, String)> {
    if !c.row.deleted {
        return Vec::new();
    }
    let Some([db, branch, _, id]) = parts(&c.row.key) else { return Vec::new() };
    c.released.iter().map(|(class_id, property)| (format!("{db}:{branch}:{class_id}"), property.clone(), id.to_string())).collect()
}

/// The references of `c`'s state that give way: (property, id, the target's row key).
pub(crate) fn giving_way(c: &Change) -> Vec<(String, String, String)> {
    let (Some(state), Some([db, branch, _, _])) = (&c.row.state, parts(&c.row.key)) else { return Vec::new() };
    let Some(data) = state["data"].as_object() else { return Vec::new() };
    let mut found = Vec::new();
    for (property, class_id) in &c.gives_way {
        for id in ids_in(data, property) {
            found.push((property.clone(), id.to_string(), format!("{db}:{branch}:{class_id}:{id}")));
        }
    }
    found
}

/// `state` without the references to `released` ((property, id) pairs); `None` if it names none.
pub(crate) fn without(state: &Value, released: &[(&str, &str)]) -> Option<Value> {
    let mut state = state.clone();
    let data = state.get_mut("data")?.as_object_mut()?;
    let mut changed = false;
    for (property, id) in released {
        changed |= release(data, property, id);
    }
    changed.then_some(state)
}

/// An instance row key's four names.
fn parts(key: &str) -> Option<[&str; 4]> {
    let mut it = key.splitn(4, ':');
    Some([it.next()?, it.next()?, it.next()?, it.next()?])
}
