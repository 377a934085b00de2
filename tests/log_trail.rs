//! One command followed through the JSON logs of every role by its id: with `SPICED_LOG=debug`
//! and `--log-format json`, serve, the relay, a worker and the projection each write a line for
//! it whose fields (or whose span's) carry the command id with its aggregate, sequence number
//! and log position, so an operator can grep one id across the processes.

mod common;

use common::kafka::isolate_topics;
use common::load::{wait_completed, wait_ready};
use common::process::{free_port, Spiced};
use common::{isolated_config, Backend};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

/// The first JSON line of `log` that mentions `id`, once there is one (bounded).
async fn line_with(log: &Path, id: &str, what: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let found = text.lines().filter(|l| l.contains(id)).filter_map(|l| serde_json::from_str::<Value>(l).ok()).find(|l| what(l));
        if let Some(line) = found {
            return line;
        }
        assert!(Instant::now() < deadline, "no line for {id} in {}:\n{text}", log.display());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_can_be_followed_through_every_roles_log() {
    let (mut config, dir) = isolated_config(Backend::S3Postgres).await;
    isolate_topics(&mut config);
    let logs = tempfile::tempdir().unwrap();
    let debug = ("SPICED_LOG", "spiced=debug".to_string());
    let port = free_port();
    let spawn = |role: &str, env: Vec<(&str, String)>| {
        let log = logs.path().join(format!("{role}.log"));
        Spiced::spawn_logging(&[role, "--log-format", "json"], &config, dir.path(), &env, &log)
    };
    let _serve = spawn("serve", vec![debug.clone(), ("SPICED_SERVE__LISTEN", format!("127.0.0.1:{port}"))]);
    let root = format!("http://127.0.0.1:{port}");
    wait_ready(&root).await;
    let _relay = spawn("relay", vec![debug.clone()]);
    let _worker = spawn("worker", vec![debug.clone()]);
    let _project = spawn("project", vec![debug.clone()]);

    let http = common::http();
    let base = format!("{root}/api/v1");
    let answer: Value = http.post(format!("{base}/databases")).json(&json!({"name": "traced"})).send().await.unwrap().json().await.unwrap();
    let id = answer["command_id"].as_str().unwrap().to_string();
    wait_completed(&http, &base, [&id], Duration::from_secs(60)).await;

    let log = |role: &str| logs.path().join(format!("{role}.log"));
    let serve = line_with(&log("serve"), &id, |l| l["span"]["command_id"] == id.as_str()).await;
    assert_eq!(serve["fields"]["aggregate_id"], "traced", "{serve}");
    assert_eq!(serve["fields"]["sequence_number"], 1, "{serve}");
    let position = serve["fields"]["position"].as_u64().expect("the log position");
    assert_eq!(serve["spans"][0]["route"], "/api/v1/databases", "the request span encloses it: {serve}");

    let relay = line_with(&log("relay"), &id, |l| l["fields"]["command_id"] == id.as_str()).await;
    assert_eq!((relay["fields"]["position"].as_u64(), &relay["fields"]["aggregate_id"]), (Some(position), &json!("traced")), "{relay}");

    let worker = line_with(&log("worker"), &id, |l| l["span"]["command_id"] == id.as_str()).await;
    assert_eq!((&worker["span"]["handler"], &worker["span"]["sequence_number"]), (&json!("ontology-worker"), &json!(1)), "{worker}");

    let project = line_with(&log("project"), &id, |l| l["fields"]["command_id"] == id.as_str()).await;
    assert_eq!(project["fields"]["aggregate_id"], "traced", "{project}");
    assert!(project["fields"]["position"].as_u64() > Some(position), "the outcome comes after the command: {project}");
}
