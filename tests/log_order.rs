//! Outcomes are a function of the command log (issue 13, rule 1): random mixes of creates,
//! updates and deletes (some with cascade) of databases, classes and instances (which
//! reference each other), sent by concurrent clients through the real pipeline (API -> log ->
//! relay -> Kafka -> two workers per role, started at random times), end with exactly the
//! outcomes a sequential model gives when it applies the log's commands one at a time in log
//! order. Both storage backends.
//!
//! The instance workers start only after every command is sent, while the ontology workers run
//! from the start: class and database commands accepted *after* an instance command are taken
//! up before it (they wait for the instance outcomes they read), the ordering under which
//! outcomes used to depend on timing.

mod common;

use common::kafka::isolate_topics;
use common::{isolated_config, spawn_with, Backend, TestApp};
use serde_json::{json, Value};
use spiced::relay::{run_with, RelayOptions};
use spiced::routing::Role;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

backend_tests! {
    outcomes_equal_a_sequential_model_of_the_log,
}

const CLIENTS: usize = 4;
const COMMANDS_PER_CLIENT: usize = 40;
const DATABASES: [&str; 2] = ["d0", "d1"];
const CLASSES: [&str; 3] = ["A", "B", "C"];
const INSTANCES: [&str; 3] = ["i0", "i1", "i2"];

/// xorshift64*: a seeded, dependency-free generator, so a failing run can be replayed
/// (`SPICED_TEST_SEED`) as far as the interleaving allows.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// An aggregate the test addresses: a database, a class or an instance.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Target {
    Database(&'static str),
    Class(&'static str, &'static str),
    Instance(&'static str, &'static str, &'static str),
}

fn every_target() -> Vec<Target> {
    let mut all = Vec::new();
    for d in DATABASES {
        all.push(Target::Database(d));
        for c in CLASSES {
            all.push(Target::Class(d, c));
            for i in INSTANCES {
                all.push(Target::Instance(d, c, i));
            }
        }
    }
    all
}

/// One client: sends random commands on the aggregates it owns (so it knows their versions
/// exactly and every update or delete names the right `expected_seq`), and returns the ids of
/// the commands the API accepted.
async fn client(app: &TestApp, owned: Vec<Target>, created: &BTreeMap<Target, u64>, seed: u64) -> Vec<String> {
    let mut rng = Rng(seed);
    let mut versions: BTreeMap<Target, u64> = owned.iter().map(|t| (t.clone(), created.get(t).copied().unwrap_or(0))).collect();
    let mut accepted = Vec::new();
    for _ in 0..COMMANDS_PER_CLIENT {
        let target = owned[rng.below(owned.len())].clone();
        // A database command is a delete (half of them with cascade): rarer, or the mix
        // would be mostly commands on what is already gone.
        if matches!(target, Target::Database(_)) && rng.below(4) != 0 {
            continue;
        }
        let version = versions[&target];
        let (method, path, body) = command_for(&target, version, &mut rng);
        let (status, body) = match method {
            "POST" => app.post(&path, body).await,
            "PUT" => app.put(&path, body).await,
            _ => app.delete(&path).await,
        };
        if status == 409 && version > 0 && method == "POST" {
            continue; // a create on an aggregate that has commands: refused, nothing appended
        }
        if status == 404 && ["database_not_found", "class_not_found"].contains(&body["error"].as_str().unwrap_or("")) {
            continue; // its database or class was never named: refused, nothing appended
        }
        assert_eq!(status, 202, "{method} {path}: {body}");
        *versions.get_mut(&target).unwrap() += 1;
        accepted.push(body["command_id"].as_str().unwrap().to_string());
        // A few milliseconds now and then, so the clients' commands interleave differently.
        if rng.below(4) == 0 {
            tokio::time::sleep(Duration::from_millis(rng.below(5) as u64)).await;
        }
    }
    accepted
}

/// A create for a new aggregate; otherwise an update or a delete at its version.
fn command_for(target: &Target, version: u64, rng: &mut Rng) -> (&'static str, String, Value) {
    let at = |path: String| format!("{path}?expected_seq={version}");
    match (target, version) {
        (Target::Database(d), 0) => ("POST", "/databases".into(), json!({"name": d})),
        (Target::Database(d), _) if rng.below(2) == 0 => ("DELETE", at(format!("/databases/{d}")) + "&cascade=true", Value::Null),
        (Target::Database(d), _) => ("DELETE", at(format!("/databases/{d}")), Value::Null),
        (Target::Class(d, c), 0) => {
            let parent = CLASSES[rng.below(CLASSES.len())];
            let mut body = json!({"id": c, "properties": [{"name": "peer", "type": format!("ref:{c}")}]});
            if parent != *c && rng.below(2) == 0 {
                body["parent_class"] = json!(parent);
            }
            ("POST", format!("/databases/{d}/classes"), body)
        }
        (Target::Class(d, c), _) if rng.below(2) == 0 => {
            ("PUT", at(format!("/databases/{d}/classes/{c}")), json!({"patch": {"label": format!("v{version}")}}))
        }
        (Target::Class(d, c), _) => ("DELETE", at(format!("/databases/{d}/classes/{c}")), Value::Null),
        (Target::Instance(d, c, i), 0) => {
            ("POST", format!("/databases/{d}/classes/{c}/instances"), json!({"id": i, "data": peer(rng)}))
        }
        // Updates three times in four: a deleted instance is gone for good.
        (Target::Instance(d, c, i), _) if rng.below(4) != 0 => {
            ("PUT", at(format!("/databases/{d}/classes/{c}/instances/{i}")), json!({"data": peer(rng)}))
        }
        (Target::Instance(d, c, i), _) => ("DELETE", at(format!("/databases/{d}/classes/{c}/instances/{i}")), Value::Null),
    }
}

/// Instance data: half the time a reference to an instance of the same class (another
/// aggregate, likely on another partition, which the command then reads as of its place).
fn peer(rng: &mut Rng) -> Value {
    if rng.below(2) == 0 {
        json!({"peer": INSTANCES[rng.below(INSTANCES.len())]})
    } else {
        json!({})
    }
}

/// The peer a command's data names, if it names one.
fn peer_of(p: &Value) -> Option<String> {
    p["data"]["peer"].as_str().map(str::to_string)
}

/// The sequential reference: what is live after applying the log's commands in order.
#[derive(Default)]
struct Model {
    databases: HashSet<String>,
    /// Live classes, with the parent each names.
    classes: HashMap<(String, String), Option<String>>,
    /// Live instances, with the peer each names.
    instances: HashMap<(String, String, String), Option<String>>,
}

impl Model {
    /// Applies one command; `Err(code)` when it fails.
    fn apply(&mut self, command_type: &str, p: &Value) -> Result<(), &'static str> {
        let text = |k: &str| p[k].as_str().unwrap_or_default().to_string();
        let (db, class) = (text("db"), (text("db"), text("class_id")));
        let instance = (text("db"), text("class_id"), text("instance_id"));
        match command_type {
            "CREATE_DATABASE" if !self.databases.insert(db.clone()) => Err("database_exists"),
            "CREATE_DATABASE" => Ok(()),
            "DELETE_DATABASE" if !self.databases.contains(&db) => Err("database_not_found"),
            "DELETE_DATABASE" if p["cascade"] == true => {
                self.databases.remove(&db);
                self.classes.retain(|(d, _), _| *d != db);
                self.instances.retain(|(d, _, _), _| *d != db);
                Ok(())
            }
            "DELETE_DATABASE" if self.classes.keys().any(|(d, _)| *d == db) => Err("database_not_empty"),
            "DELETE_DATABASE" => {
                self.databases.remove(&db);
                Ok(())
            }
            "CREATE_ONTOLOGY_CLASS" => {
                let parent = p["parent_class"].as_str().map(str::to_string);
                if !self.databases.contains(&db) {
                    Err("database_not_found")
                } else if self.classes.contains_key(&class) {
                    Err("class_exists")
                } else if parent.as_ref().is_some_and(|parent| !self.classes.contains_key(&(db.clone(), parent.clone()))) {
                    Err("parent_class_not_found")
                } else {
                    self.classes.insert(class, parent);
                    Ok(())
                }
            }
            "UPDATE_ONTOLOGY_CLASS" | "DELETE_ONTOLOGY_CLASS" if !self.classes.contains_key(&class) => Err("class_not_found"),
            "UPDATE_ONTOLOGY_CLASS" => Ok(()),
            "DELETE_ONTOLOGY_CLASS" if self.in_use(&class) => Err("class_in_use"),
            "DELETE_ONTOLOGY_CLASS" => {
                self.classes.remove(&class);
                Ok(())
            }
            "CREATE_INSTANCE" if !self.classes.contains_key(&class) => Err("class_not_found"),
            "CREATE_INSTANCE" if self.instances.contains_key(&instance) => Err("instance_exists"),
            "CREATE_INSTANCE" if self.dangling(&instance, p) => Err("invalid_reference"),
            "CREATE_INSTANCE" => {
                self.instances.insert(instance, peer_of(p));
                Ok(())
            }
            "UPDATE_INSTANCE" | "DELETE_INSTANCE" if !self.instances.contains_key(&instance) => Err("instance_not_found"),
            "UPDATE_INSTANCE" if !self.classes.contains_key(&class) => Err("class_not_found"),
            "UPDATE_INSTANCE" if self.dangling(&instance, p) => Err("invalid_reference"),
            "UPDATE_INSTANCE" => {
                // A merge patch: data without `peer` leaves it as it was.
                if let Some(peer) = peer_of(p) {
                    self.instances.insert(instance, Some(peer));
                }
                Ok(())
            }
            "DELETE_INSTANCE" if self.referenced(&instance) => Err("instance_in_use"),
            "DELETE_INSTANCE" => {
                self.instances.remove(&instance);
                Ok(())
            }
            other => panic!("the test sends no {other}"),
        }
    }

    /// Whether the command's `peer` names an instance of its class that is not live (itself
    /// always counts as live).
    fn dangling(&self, (db, class, id): &(String, String, String), p: &Value) -> bool {
        p["data"]["peer"].as_str().is_some_and(|peer| peer != id && !self.instances.contains_key(&(db.clone(), class.clone(), peer.to_string())))
    }

    /// Whether another live instance of its class names the instance as its peer (the
    /// property is `ref:<its own class>`, so only instances of that class can).
    fn referenced(&self, (db, class, id): &(String, String, String)) -> bool {
        self.instances
            .iter()
            .any(|((d, c, other), peer)| d == db && c == class && other != id && peer.as_deref() == Some(id.as_str()))
    }

    /// A live child class or a live instance keeps a class from being deleted.
    fn in_use(&self, (db, class): &(String, String)) -> bool {
        self.classes.iter().any(|((d, _), parent)| d == db && parent.as_ref() == Some(class))
            || self.instances.keys().any(|(d, c, _)| d == db && c == class)
    }
}

async fn outcomes_equal_a_sequential_model_of_the_log(backend: Backend) {
    let seed = std::env::var("SPICED_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1);
    eprintln!("SPICED_TEST_SEED={seed}");
    let mut rng = Rng(seed);
    let (mut config, dir) = isolated_config(backend).await;
    isolate_topics(&mut config);
    // Class deletes wait for the instance outcomes before them, and the instance workers
    // start only once every command is sent.
    config.worker.gap_wait_ms = 60_000;
    config.worker.stall_timeout_ms = 120_000;
    let app = spawn_with(config.clone(), dir).await;
    let stop = CancellationToken::new();
    let _stop_all = stop.clone().drop_guard();
    tokio::spawn(run_with(config.clone(), RelayOptions::default(), stop.clone(), Default::default()));
    let start_worker = |role: Role, delay: Duration| {
        let (config, stop) = (config.clone(), stop.clone());
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            spiced::worker::run_roles(config, &[role], stop).await.expect("a worker stopped");
        })
    };
    for _ in 0..2 {
        start_worker(Role::Ontology, Duration::from_millis(rng.below(300) as u64));
    }

    // The databases and classes are created first (ordinary commands, checked like the rest),
    // so that most instance commands have a class to act on.
    let targets = every_target();
    let (mut accepted, mut created) = (Vec::new(), BTreeMap::new());
    for target in targets.iter().filter(|t| !matches!(t, Target::Instance(..))) {
        let (_, path, body) = command_for(target, 0, &mut rng);
        let (status, body) = app.post(&path, body).await;
        assert_eq!(status, 202, "{path}: {body}");
        accepted.push(body["command_id"].as_str().unwrap().to_string());
        created.insert(target.clone(), 1);
    }
    let sends = (0..CLIENTS).map(|n| {
        let owned: Vec<Target> = targets.iter().skip(n).step_by(CLIENTS).cloned().collect();
        let (app, created, seed) = (&app, &created, rng.next() | 1);
        async move { client(app, owned, created, seed).await }
    });
    accepted.extend(futures::future::join_all(sends).await.into_iter().flatten());
    for _ in 0..2 {
        start_worker(Role::Instance, Duration::from_millis(rng.below(500) as u64));
    }
    for id in &accepted {
        app.wait_command(id, Duration::from_secs(120)).await;
    }

    let (_, log) = app.storage().await;
    let events = common::read_whole_log(&log).await;
    let mut actual: BTreeMap<String, Result<(), String>> = BTreeMap::new();
    for (_, e) in events.iter().filter(|(_, e)| e.metadata["kind"] == "domain") {
        let id = e.data["command_id"].as_str().unwrap().to_string();
        let result = if e.event_type == "COMMAND_FAILED" { Err(e.data["error"]["code"].as_str().unwrap().to_string()) } else { Ok(()) };
        assert!(actual.insert(id, result).is_none(), "one outcome per command");
    }
    let mut model = Model::default();
    let (mut checked, mut failed) = (0, 0);
    let mut codes: BTreeMap<String, usize> = BTreeMap::new();
    for (position, e) in events.iter().filter(|(_, e)| e.metadata["kind"] == "command") {
        let (command_type, command_id) = (e.data["command_type"].as_str().unwrap(), e.data["command_id"].as_str().unwrap());
        let expected = model.apply(command_type, &e.data["payload"]).map_err(str::to_string);
        let got = actual.get(command_id).unwrap_or_else(|| panic!("{command_id} has no outcome"));
        assert_eq!(got, &expected, "{command_type} on {} at position {position} (seed {seed})", e.aggregate_id);
        checked += 1;
        failed += expected.is_err() as usize;
        if let Err(code) = expected {
            *codes.entry(code).or_insert(0) += 1;
        }
    }
    eprintln!("{checked} commands; failures by code: {codes:?}");
    assert_eq!(checked, accepted.len(), "every accepted command is in the log once");
    // The mix must exercise both sides, or the comparison proves little.
    assert!(failed > 0 && failed < checked, "{failed} of {checked} commands failed");
}
