//! The rules every command shares: the facts a decision is made from, the decision itself,
//! and how an instance's state is built. Pure functions. What a class may declare is
//! [`super::schema`]; whether instance data fits it, [`super::values`].
//!
//! Domain events carry the aggregate's full resulting state in `data.state` (`null` once
//! deleted), so the state of any aggregate is its last outcome's `data.state`, and a
//! projection never has to merge patches (the reference lost fields that way).

use super::ids::IdError;
use serde_json::{Map, Value};

/// A request the API refuses before anything is appended: a 400 with `code`.
#[derive(Debug, thiserror::Error)]
pub enum Invalid {
    #[error(transparent)]
    Id(#[from] IdError),
    #[error("{message}")]
    Request { code: &'static str, message: String },
}

impl Invalid {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Invalid::Request { code, message: message.into() }
    }
}

/// What the log says, as needed by a command.
#[derive(Debug, Default, Clone)]
pub struct Facts {
    /// The aggregate's current state (`None`: never created, or deleted).
    pub current: Option<Value>,
    /// The state of the database the aggregate belongs to.
    pub database: Option<Value>,
    /// The instance's class, then its ancestors (for instance commands), or the parent class
    /// a class command names (for class commands).
    pub classes: Vec<Value>,
    /// Whether the database still has live classes (for DELETE_DATABASE).
    pub database_has_classes: bool,
    /// What still uses the class or instance a delete names (a live child class, a live
    /// instance of the class, a live instance referencing the instance), described for the
    /// `class_in_use` / `instance_in_use` message.
    pub in_use: Option<String>,
    /// A live instance of the class, other than the command's own, that already holds a value
    /// the command's data gives a `unique` property: (property, that instance's id).
    pub duplicate: Option<(String, String)>,
    /// What the outcome records besides the state, for the read models: an instance's
    /// references that give way (`gives_way`), a deletion's referrers that must let go of it
    /// (`released`).
    pub notes: Map<String, Value>,
    /// A `ref:<ClassId>` property of a class command whose target class does not exist:
    /// (property, class).
    pub missing_ref: Option<(String, String)>,
    /// An instance the command's data references (through a `ref` property it sets) that does
    /// not exist as of the command's place in the log.
    pub missing_reference: Option<Reference>,
    /// For an UPDATE_ONTOLOGY_CLASS: how many live instances the new definition would refuse,
    /// and the first of them with why.
    pub incompatible: Option<(u64, String)>,
}

/// One instance that data names through a `ref` property.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// The property's path (`a.b` inside objects).
    pub property: String,
    pub class_id: String,
    pub instance_id: String,
}

/// A command's one outcome.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// A domain event: its type and the aggregate's resulting state.
    Event { event_type: &'static str, state: Value },
    /// `COMMAND_FAILED` with a machine-readable code and a message.
    Failed { code: &'static str, message: String },
}

pub fn fail(code: &'static str, message: impl Into<String>) -> Decision {
    Decision::Failed { code, message: message.into() }
}

/// The ids an instance's state carries.
pub fn instance_key(payload: &Value) -> Map<String, Value> {
    ["db", "branch", "class_id", "instance_id"]
        .iter()
        .map(|k| (k.to_string(), payload[*k].clone()))
        .collect()
}

/// RFC 7386 merge patch: `null` removes a key, objects merge, anything else replaces.
pub fn merge_patch(target: &mut Map<String, Value>, patch: Map<String, Value>) {
    for (k, v) in patch {
        match v {
            Value::Null => {
                target.remove(&k);
            }
            Value::Object(p) => match target.get_mut(&k) {
                Some(Value::Object(t)) => merge_patch(t, p),
                _ => {
                    let mut fresh = Map::new();
                    merge_patch(&mut fresh, p);
                    target.insert(k, Value::Object(fresh));
                }
            },
            other => {
                target.insert(k, other);
            }
        }
    }
}
