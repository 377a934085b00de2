//! The operator tools on a `spiced dev` data directory, as a user runs them: `spiced log`,
//! `spiced verify`, `spiced config check`, with no --config (the embedded defaults).

mod common;

use serde_json::json;
use std::process::Command;
use std::time::Duration;

fn spiced(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_spiced"))
        .args(args)
        .current_dir(dir)
        .env("SPICED_LOG", "warn")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tools_work_on_a_dev_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::process::free_port();
    let mut dev = Command::new(env!("CARGO_BIN_EXE_spiced"))
        .arg("dev")
        .current_dir(dir.path())
        .env("SPICED_SERVE__LISTEN", format!("127.0.0.1:{port}"))
        .env("SPICED_LOG", "warn")
        .spawn()
        .unwrap();
    let http = common::http();
    let base = format!("http://127.0.0.1:{port}/api/v1");
    let mut ready = false;
    for _ in 0..200 {
        if http.get(format!("http://127.0.0.1:{port}/readyz")).send().await.is_ok_and(|r| r.status() == 200) {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(ready, "spiced dev did not become ready");
    let mut last = String::new();
    for name in ["a", "b", "c"] {
        let r: serde_json::Value = http.post(format!("{base}/databases")).json(&json!({"name": name})).send().await.unwrap().json().await.unwrap();
        last = r["command_id"].as_str().unwrap().to_string();
    }
    for _ in 0..400 {
        let s: serde_json::Value = http.get(format!("{base}/commands/{last}")).send().await.unwrap().json().await.unwrap();
        if s["status"] == "COMPLETED" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let served: serde_json::Value = http.get(format!("{base}/status")).send().await.unwrap().json().await.unwrap();
    Command::new("kill").args(["-TERM", &dev.id().to_string()]).status().unwrap();
    assert!(dev.wait().unwrap().success(), "spiced dev exits 0 on SIGTERM");

    // `spiced status --json` prints what GET /api/v1/status answered, for the same log (the
    // stages are gone: a process that stops takes its rows with it).
    let out = spiced(dir.path(), &["status", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for clock in ["log_head", "index_head", "relay", "projection", "projection_refused"] {
        assert_eq!(printed[clock], served[clock], "{clock}: {printed} vs {served}");
    }
    assert!(printed["log_head"].as_u64().unwrap() >= 2, "commands and outcomes are in the log: {printed}");
    assert_eq!(printed["relay"], serde_json::Value::Null, "no relay under spiced dev: {printed}");
    assert!(printed["embedded_workers"]["position"].is_u64(), "{printed}");
    assert!(served["stages"].as_array().is_some_and(|s| !s.is_empty()), "dev's stages report while it runs: {served}");
    assert_eq!(printed["stages"], json!([]), "{printed}");

    let out = spiced(dir.path(), &["log", "export"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = lines.iter().map(|e| e["metadata"]["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "command").count(), 3);
    assert_eq!(kinds.iter().filter(|k| **k == "domain").count(), 3, "each command has its outcome");
    let out = spiced(dir.path(), &["log", "get", "1"]);
    let first: serde_json::Value = serde_json::from_slice(out.stdout.split(|b| *b == b'\n').next().unwrap()).unwrap();
    assert_eq!(first, lines[0]);
    let out = spiced(dir.path(), &["log", "export", "--from-position", "2", "--to-position", "2"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("positions 2..=2"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = spiced(dir.path(), &["verify"]);
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let out = spiced(dir.path(), &["status"]);
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{table}");
    let row = |name: &str| -> Vec<String> {
        table.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} in {table}"))
            .split_whitespace().rev().take(2).map(str::to_string).collect()
    };
    assert_eq!(row("commands with an outcome"), ["0", "3"], "{table}");
    assert_eq!(row("allocated (index head)")[0], "0", "{table}");
    let projection = row("read models (projection)");
    assert!(projection[1].parse::<u64>().is_ok(), "spiced dev's read models have a position: {table}");
    assert_eq!(row("read models: events refused")[0], "0", "{table}");
    let relay = table.lines().find(|l| l.starts_with("published to Kafka (relay)")).unwrap();
    assert!(relay.ends_with("not used (spiced dev)"), "no relay runs under spiced dev: {table}");
    let out = spiced(dir.path(), &["config", "check"]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && shown.contains("[writer]"));
    assert!(shown.contains("`spiced dev` runs its workers and projection from the log"), "{shown}");
    // The one tool that needs Kafka says so in one line, naming the broker it could not reach.
    let out = Command::new(env!("CARGO_BIN_EXE_spiced"))
        .args(["dlq", "list"])
        .current_dir(dir.path())
        .env("SPICED_KAFKA__BROKERS", "127.0.0.1:1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("127.0.0.1:1 (kafka.brokers)"), "{stderr}");
    let out = spiced(dir.path(), &["log", "get", "999"]);
    assert!(!out.status.success(), "a missing position is an error");
}

/// Enum settings are parsed once, at start-up: an unknown worker role in the file, the
/// environment or on the command line stops the process with the key that names it.
#[test]
fn an_unknown_worker_role_is_refused_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("spiced.toml");
    std::fs::write(&file, "[worker]\nroles = [\"ontology\", \"bogus\"]\n").unwrap();
    let out = spiced(dir.path(), &["config", "check", "--config", file.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("worker.roles[1]") && stderr.contains("`bogus`"), "{stderr}");
    let out = spiced(dir.path(), &["worker", "--role", "bogus"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "a command line that does not parse: {stderr}");
    assert!(stderr.contains("unknown worker role \"bogus\""), "{stderr}");
}
