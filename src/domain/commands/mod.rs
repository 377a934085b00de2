//! Every command the API accepts, one file each. A command's file owns its request body (the
//! typed payload the API documents), its validation, the other aggregates it reads, its
//! decision and its event type; this module only dispatches on [`CommandType`], so adding a
//! command is its file, its variant here (the compiler then points at every match to extend)
//! and its route.

pub mod bulk_create_instances;
pub mod bulk_delete_instances;
pub mod bulk_update_instances;
pub mod create_class;
pub mod create_database;
pub mod create_instance;
pub mod delete_class;
pub mod delete_database;
pub mod delete_instance;
pub mod envelopes;
pub mod cascade;
pub mod update_class;
pub mod update_instance;

pub use envelopes::{bulk_member_event_id, outcome_envelope, Command, OutcomeRouting, Routing};
pub use bulk_create_instances::BulkCreateBody;
pub use bulk_delete_instances::{BulkDeleteBody, BulkDeleteMember};
pub use bulk_update_instances::{BulkUpdateBody, BulkUpdateMember};
pub use create_class::CreateClassBody;
pub use create_database::CreateDatabaseBody;
pub use create_instance::CreateInstanceBody;
pub use update_class::{ClassPatch, UpdateClassBody};
pub use update_instance::UpdateInstanceBody;
pub use super::rules::Invalid;
pub use super::schema::PropertyDef;

use super::ids::{AggregateKey, AggregateType};
use super::rules::{Decision, Facts};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// Every command the API accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CommandType {
    CreateDatabase,
    DeleteDatabase,
    CreateOntologyClass,
    UpdateOntologyClass,
    DeleteOntologyClass,
    CreateInstance,
    UpdateInstance,
    DeleteInstance,
    BulkCreateInstances,
    BulkUpdateInstances,
    BulkDeleteInstances,
}

impl CommandType {
    pub fn as_str(self) -> &'static str {
        match self {
            CommandType::CreateDatabase => "CREATE_DATABASE",
            CommandType::DeleteDatabase => "DELETE_DATABASE",
            CommandType::CreateOntologyClass => "CREATE_ONTOLOGY_CLASS",
            CommandType::UpdateOntologyClass => "UPDATE_ONTOLOGY_CLASS",
            CommandType::DeleteOntologyClass => "DELETE_ONTOLOGY_CLASS",
            CommandType::CreateInstance => "CREATE_INSTANCE",
            CommandType::UpdateInstance => "UPDATE_INSTANCE",
            CommandType::DeleteInstance => "DELETE_INSTANCE",
            CommandType::BulkCreateInstances => "BULK_CREATE_INSTANCES",
            CommandType::BulkUpdateInstances => "BULK_UPDATE_INSTANCES",
            CommandType::BulkDeleteInstances => "BULK_DELETE_INSTANCES",
        }
    }

    pub fn parse(s: &str) -> Option<CommandType> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
    }

    /// The aggregate type the command acts on.
    pub fn aggregate_type(self) -> AggregateType {
        match self {
            CommandType::CreateDatabase | CommandType::DeleteDatabase => AggregateType::Database,
            CommandType::CreateOntologyClass
            | CommandType::UpdateOntologyClass
            | CommandType::DeleteOntologyClass => AggregateType::OntologyClass,
            CommandType::CreateInstance
            | CommandType::UpdateInstance
            | CommandType::DeleteInstance
            | CommandType::BulkCreateInstances
            | CommandType::BulkUpdateInstances
            | CommandType::BulkDeleteInstances => AggregateType::Instance,
        }
    }

    /// Whether the command is one of many members, each its own aggregate with its own event
    /// id (derived from the command id and the member's aggregate).
    pub fn is_bulk(self) -> bool {
        matches!(
            self,
            CommandType::BulkCreateInstances | CommandType::BulkUpdateInstances | CommandType::BulkDeleteInstances
        )
    }

    /// The domain event type of a successful command.
    pub fn event_type(self) -> &'static str {
        match self {
            CommandType::CreateDatabase => create_database::EVENT_TYPE,
            CommandType::DeleteDatabase => delete_database::EVENT_TYPE,
            CommandType::CreateOntologyClass => create_class::EVENT_TYPE,
            CommandType::UpdateOntologyClass => update_class::EVENT_TYPE,
            CommandType::DeleteOntologyClass => delete_class::EVENT_TYPE,
            CommandType::CreateInstance => create_instance::EVENT_TYPE,
            CommandType::UpdateInstance => update_instance::EVENT_TYPE,
            CommandType::DeleteInstance => delete_instance::EVENT_TYPE,
            CommandType::BulkCreateInstances => bulk_create_instances::EVENT_TYPE,
            CommandType::BulkUpdateInstances => bulk_update_instances::EVENT_TYPE,
            CommandType::BulkDeleteInstances => bulk_delete_instances::EVENT_TYPE,
        }
    }

    /// The aggregate the command cannot succeed without, and the code it fails with when that
    /// aggregate was never commanded at all: the API answers 404 then, before appending (one
    /// index look-up). Whether it exists *as of* the command's place in the log (deleted, or a
    /// failed create) is still the worker's to decide.
    pub fn required(self, payload: &Value) -> Option<(AggregateKey, &'static str)> {
        match self.aggregate_type() {
            AggregateType::OntologyClass if self == CommandType::CreateOntologyClass => {
                Some((AggregateKey::database(&text(payload, "db")), "database_not_found"))
            }
            AggregateType::Instance => {
                let class = AggregateKey::class(&text(payload, "db"), &text(payload, "branch"), &text(payload, "class_id"));
                Some((class, "class_not_found"))
            }
            _ => None,
        }
    }

    /// Everything the command needs to be decided besides the aggregate's own state. Every
    /// class and instance, its own state included, is read through [`cascade`]'s rule: one of
    /// a database deleted with `cascade` is gone.
    pub async fn facts<R: StateReader>(self, payload: &Value, current: Option<Value>, log: &R) -> Result<Facts, R::Error> {
        let log = &cascade::LiveDatabases::new(log);
        let current = log.alive(self.aggregate_type(), current).await?;
        let mut facts = Facts { current, ..Default::default() };
        if self.aggregate_type() == AggregateType::Instance {
            instance_chain(payload, log, &mut facts).await?;
        }
        match self {
            CommandType::CreateDatabase => {}
            CommandType::DeleteInstance | CommandType::BulkDeleteInstances => delete_instance::facts(payload, log, &mut facts).await?,
            CommandType::DeleteOntologyClass => delete_class::facts(payload, log, &mut facts).await?,
            CommandType::DeleteDatabase => delete_database::facts(payload, log, &mut facts).await?,
            CommandType::CreateOntologyClass => create_class::facts(payload, log, &mut facts).await?,
            CommandType::UpdateOntologyClass => update_class::facts(payload, log, &mut facts).await?,
            CommandType::CreateInstance | CommandType::BulkCreateInstances => {
                create_instance::facts(payload, log, &mut facts).await?
            }
            CommandType::UpdateInstance => update_instance::facts(payload, log, &mut facts).await?,
            CommandType::BulkUpdateInstances => bulk_update_instances::facts(payload, log, &mut facts).await?,
        }
        Ok(facts)
    }

    /// The command's one outcome, from its payload and the facts read for it.
    pub fn decide(self, payload: &Value, facts: &Facts) -> Decision {
        match self {
            CommandType::CreateDatabase => create_database::decide(payload, facts),
            CommandType::DeleteDatabase => delete_database::decide(facts),
            CommandType::CreateOntologyClass => create_class::decide(payload, facts),
            CommandType::UpdateOntologyClass => update_class::decide(payload, facts),
            CommandType::DeleteOntologyClass => delete_class::decide(payload, facts),
            CommandType::CreateInstance | CommandType::BulkCreateInstances => create_instance::decide(payload, facts),
            CommandType::UpdateInstance => update_instance::decide(payload, facts),
            CommandType::DeleteInstance => delete_instance::decide(facts),
            CommandType::BulkUpdateInstances => bulk_update_instances::decide(payload, facts),
            CommandType::BulkDeleteInstances => bulk_delete_instances::decide(facts),
        }
    }
}

/// What deciding a command may read of the log: other aggregates' states as of the command's
/// place in the log (the worker's `AsOf` answers each with the outcome of that aggregate's last
/// command before it, so a decision never depends on commands accepted after it).
#[async_trait::async_trait]
pub trait StateReader: Sync {
    type Error: Send;
    /// The aggregate's state; `None` if it was not created, or was deleted, by then.
    async fn state(&self, key: &AggregateKey) -> Result<Option<Value>, Self::Error>;
    /// The ids of the aggregates of one type whose id starts with `prefix`.
    async fn aggregates_with_prefix(&self, aggregate_type: AggregateType, prefix: &str) -> Result<Vec<String>, Self::Error>;
}

/// What every instance command reads first: its class chain, and its own state under the
/// rule that makes an `on_delete: nullify` delete take effect without a command on the
/// referrers: a reference that gives way, to an instance gone as of the command's place, is
/// not there. The outcome notes which references give way, so the read models can apply the
/// same rule whatever order outcomes reach them in.
async fn instance_chain<R: StateReader>(payload: &Value, log: &R, facts: &mut Facts) -> Result<(), R::Error> {
    use futures::StreamExt;
    let (db, branch) = (text(payload, "db"), text(payload, "branch"));
    facts.classes = class_chain(log, &db, &branch, &text(payload, "class_id")).await?;
    let giving_way = super::values::giving_way(&facts.classes);
    if giving_way.is_empty() {
        return Ok(());
    }
    let notes = giving_way.iter().map(|(property, class_id)| serde_json::json!({"property": property, "class_id": class_id}));
    facts.notes.insert("gives_way".into(), Value::Array(notes.collect()));
    let Some(data) = facts.current.as_mut().and_then(|s| s["data"].as_object_mut()) else { return Ok(()) };
    for (property, target) in giving_way {
        let ids: Vec<String> = super::values::ids_in(data, &property).into_iter().map(str::to_string).collect();
        let keys = ids.iter().map(|id| AggregateKey::instance(&db, &branch, &target, id)).collect();
        let reads: Vec<_> = states(log, keys).collect().await;
        for (id, read) in ids.iter().zip(reads) {
            if read?.1.is_none() {
                super::values::release(data, &property, id);
            }
        }
    }
    Ok(())
}

/// How many aggregate states an integrity check reads at once.
const READS_AT_ONCE: usize = 16;

/// The states of `keys` as of the reader's place, in order, [`READS_AT_ONCE`] read at a time:
/// a check over a class's many instances goes at the speed of the index, not of one round
/// trip after another.
pub(crate) fn states<'a, R: StateReader>(
    log: &'a R,
    keys: Vec<AggregateKey>,
) -> impl futures::Stream<Item = Result<(AggregateKey, Option<Value>), R::Error>> + 'a {
    use futures::StreamExt;
    futures::stream::iter(keys)
        .map(move |key| async move { Ok((key.clone(), log.state(&key).await?)) })
        .buffered(READS_AT_ONCE)
}

/// The first of `keys` that is live (`live`) or not (`!live`) as of the reader's place.
pub(crate) async fn first_with_liveness<R: StateReader>(
    log: &R,
    keys: Vec<AggregateKey>,
    live: bool,
) -> Result<Option<AggregateKey>, R::Error> {
    use futures::StreamExt;
    let mut reads = std::pin::pin!(states(log, keys));
    while let Some(read) = reads.next().await {
        let (key, state) = read?;
        if state.is_some() == live {
            return Ok(Some(key));
        }
    }
    Ok(None)
}

/// The first of `keys` that is live as of the reader's place and whose state `matches`, with
/// that state.
pub(crate) async fn first_matching<R: StateReader>(
    log: &R,
    keys: Vec<AggregateKey>,
    matches: impl Fn(&Value) -> bool,
) -> Result<Option<(AggregateKey, Value)>, R::Error> {
    use futures::StreamExt;
    let mut reads = std::pin::pin!(states(log, keys));
    while let Some(read) = reads.next().await {
        if let (key, Some(state)) = read? {
            if matches(&state) {
                return Ok(Some((key, state)));
            }
        }
    }
    Ok(None)
}

/// Reads every one of `keys` as of the reader's place, for the waits alone: their earlier
/// commands' outcomes are in the log once it returns.
pub(crate) async fn read_all<R: StateReader>(log: &R, keys: Vec<AggregateKey>) -> Result<(), R::Error> {
    use futures::TryStreamExt;
    states(log, keys).try_for_each(|_| async { Ok(()) }).await
}

/// The first instance `data` references (through the class chain's `ref` properties) that does
/// not exist as of the reader's place; `own` (the instance itself) always counts as existing.
async fn missing_reference<R: StateReader>(
    log: &R,
    payload: &Value,
    data: &serde_json::Map<String, Value>,
    classes: &[Value],
) -> Result<Option<super::values::Reference>, R::Error> {
    let (db, branch) = (text(payload, "db"), text(payload, "branch"));
    let own = AggregateKey::instance(&db, &branch, &text(payload, "class_id"), &text(payload, "instance_id"));
    let refs = super::values::references(data, classes);
    let key = |r: &super::values::Reference| AggregateKey::instance(&db, &branch, &r.class_id, &r.instance_id);
    let keys = refs.iter().map(key).filter(|k| *k != own).collect();
    let missing = first_with_liveness(log, keys, false).await?;
    Ok(missing.and_then(|m| refs.into_iter().find(|r| key(r) == m)))
}

/// A live instance of the command's class, other than its own, holding one of `values` (its
/// data's `unique` properties) as of the reader's place: (property, instance id). Reads every
/// instance the class ever had, 16 at a time, so only data with a unique value pays for it.
async fn duplicate<R: StateReader>(log: &R, payload: &Value, values: Vec<(String, Value)>) -> Result<Option<(String, String)>, R::Error> {
    if values.is_empty() {
        return Ok(None);
    }
    let (db, branch, class_id) = (text(payload, "db"), text(payload, "branch"), text(payload, "class_id"));
    let own = AggregateKey::instance(&db, &branch, &class_id, &text(payload, "instance_id"));
    let prefix = format!("{db}:{branch}:{class_id}:");
    let ids = log.aggregates_with_prefix(AggregateType::Instance, &prefix).await?;
    let keys = ids.into_iter().map(|id| AggregateKey::new(AggregateType::Instance, id)).filter(|k| *k != own).collect();
    let held = |state: &Value| values.iter().find(|(p, v)| state["data"].get(p) == Some(v)).map(|(p, _)| p.clone());
    let found = first_matching(log, keys, |state| held(state).is_some()).await?;
    Ok(found.and_then(|(key, state)| Some((held(&state)?, key.aggregate_id[prefix.len()..].to_string()))))
}

/// The outcome of data whose unique property's value another live instance holds.
fn not_unique(data: &serde_json::Map<String, Value>, (property, holder): &(String, String)) -> Decision {
    let value = data.get(property).cloned().unwrap_or_default();
    super::rules::fail("unique_violation", format!("property {property:?} is unique, and instance {holder:?} already holds {value}"))
}

/// One route's command(s), validated and ready to append: one command, or the members of a
/// bulk command (all or nothing).
#[derive(Debug, Clone)]
pub struct Request {
    pub command_type: CommandType,
    pub commands: Vec<Command>,
}

impl Request {
    pub fn single(command: Command) -> Self {
        Request { command_type: command.command_type, commands: vec![command] }
    }
}

/// What the client sent besides the body: the branch (`main` when absent), the version it saw,
/// and the command id (its `Idempotency-Key`, or a fresh one), from which ids not given are
/// derived.
#[derive(Debug, Clone, Default)]
pub struct Context {
    pub branch: Option<String>,
    pub expected_seq: Option<u64>,
    pub command_id: Uuid,
}

impl Context {
    pub fn branch(&self) -> Result<String, Invalid> {
        let branch = self.branch.clone().unwrap_or_else(|| "main".to_string());
        super::ids::validate_name("branch", &branch)?;
        Ok(branch)
    }

    /// Updates and deletes name the version they act on.
    pub fn expected_for_update(&self) -> Result<u64, Invalid> {
        self.expected_seq.ok_or_else(|| {
            Invalid::new(
                "missing_expected_seq",
                "updates and deletes require ?expected_seq=N (the aggregate's current version)",
            )
        })
    }

    /// A create implies `expected_seq = 0`.
    pub fn expected_for_create(&self) -> Result<u64, Invalid> {
        match self.expected_seq {
            None | Some(0) => Ok(0),
            Some(n) => Err(Invalid::new("invalid_expected_seq", format!("a create implies expected_seq=0, got {n}"))),
        }
    }
}

/// A payload's text field (empty when absent: the API always sets them).
fn text(payload: &Value, key: &str) -> String {
    payload[key].as_str().unwrap_or_default().to_string()
}

/// The parent class a class command names, in a create's payload or an update's patch.
fn parent_class(payload: &Value) -> Option<&str> {
    payload
        .get("parent_class")
        .or_else(|| payload["patch"].get("parent_class"))
        .and_then(Value::as_str)
}

/// Ancestor classes followed at most (a cycle in parent links stops here).
pub(super) const MAX_CLASS_DEPTH: usize = 8;

/// The class and its ancestors' states, nearest first; empty if the class does not exist.
async fn class_chain<R: StateReader>(log: &R, db: &str, branch: &str, class_id: &str) -> Result<Vec<Value>, R::Error> {
    let mut chain = Vec::new();
    let mut next = Some(class_id.to_string());
    while let Some(id) = next.take() {
        if chain.len() >= MAX_CLASS_DEPTH {
            break;
        }
        let Some(state) = log.state(&AggregateKey::class(db, branch, &id)).await? else {
            break;
        };
        next = state["parent_class"].as_str().map(str::to_string);
        chain.push(state);
    }
    Ok(chain)
}

/// The ids of a database's classes, live or deleted.
async fn class_ids<R: StateReader>(log: &R, db: &str) -> Result<Vec<String>, R::Error> {
    log.aggregates_with_prefix(AggregateType::OntologyClass, &format!("{db}:")).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn class(props: Value) -> Value {
        json!({"class_id": "C", "properties": props, "abstract": false})
    }

    #[test]
    fn update_is_a_merge_patch_on_the_full_state() {
        let classes = vec![class(json!([{"name": "a", "type": "integer"}, {"name": "b", "type": "integer"}]))];
        let facts = Facts {
            current: Some(json!({"db": "d", "data": {"a": 1, "b": 2}})),
            classes,
            ..Default::default()
        };
        let payload = json!({"db": "d", "branch": "main", "class_id": "C", "instance_id": "i", "data": {"b": null, "a": 5}});
        match CommandType::UpdateInstance.decide(&payload, &facts) {
            Decision::Event { event_type, state } => {
                assert_eq!(event_type, "INSTANCE_UPDATED");
                assert_eq!(state["data"], json!({"a": 5}));
                assert_eq!(state["instance_id"], "i");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn class_updates_keep_every_field() {
        let facts = Facts {
            current: Some(json!({"class_id": "C", "label": "L", "description": "D", "properties": []})),
            database: Some(json!({})),
            ..Default::default()
        };
        let d = CommandType::UpdateOntologyClass.decide(&json!({"patch": {"label": "M"}}), &facts);
        assert_eq!(
            d,
            Decision::Event {
                event_type: "ONTOLOGY_CLASS_UPDATED",
                state: json!({"class_id": "C", "label": "M", "description": "D", "properties": []})
            }
        );
    }

    #[test]
    fn failures_have_codes() {
        let none = Facts::default();
        let cases = [
            (CommandType::CreateOntologyClass, "database_not_found"),
            (CommandType::DeleteDatabase, "database_not_found"),
            (CommandType::CreateInstance, "class_not_found"),
            (CommandType::UpdateInstance, "instance_not_found"),
            (CommandType::DeleteInstance, "instance_not_found"),
        ];
        for (ty, code) in cases {
            match ty.decide(&json!({"data": {}}), &none) {
                Decision::Failed { code: c, .. } => assert_eq!(c, code, "{ty:?}"),
                other => panic!("{ty:?}: {other:?}"),
            }
        }
        let non_empty = Facts { current: Some(json!({})), database_has_classes: true, ..Default::default() };
        assert!(matches!(
            CommandType::DeleteDatabase.decide(&json!({}), &non_empty),
            Decision::Failed { code: "database_not_empty", .. }
        ));
        let abstract_class = Facts { classes: vec![json!({"abstract": true})], ..Default::default() };
        assert!(matches!(
            CommandType::CreateInstance.decide(&json!({"data": {}}), &abstract_class),
            Decision::Failed { code: "class_is_abstract", .. }
        ));
    }

    #[test]
    fn every_success_has_its_event_type() {
        let all = [
            CommandType::CreateDatabase,
            CommandType::DeleteDatabase,
            CommandType::CreateOntologyClass,
            CommandType::UpdateOntologyClass,
            CommandType::DeleteOntologyClass,
            CommandType::CreateInstance,
            CommandType::UpdateInstance,
            CommandType::DeleteInstance,
            CommandType::BulkCreateInstances,
            CommandType::BulkUpdateInstances,
            CommandType::BulkDeleteInstances,
        ];
        for ty in all {
            assert_eq!(CommandType::parse(ty.as_str()), Some(ty));
            assert!(ty.event_type().starts_with(ty.aggregate_type().as_str().to_ascii_uppercase().get(..4).unwrap()), "{ty:?}");
        }
    }
}
