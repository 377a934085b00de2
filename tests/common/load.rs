//! A careful client for process tests: commands sent with an Idempotency-Key and retried
//! through restarts and 503s, and a background load of instance creates and updates.

use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// How long one command may take to be decided, through every fault a test injects.
pub const DECIDE: Duration = Duration::from_secs(120);

/// Sends one command until the API decides it (202 or 4xx), retrying through restarts and
/// 503s with the same Idempotency-Key, as a careful client does.
pub async fn send(http: &reqwest::Client, base: &str, method: &str, path: &str, body: Value) -> (u16, Value) {
    let key = Uuid::new_v4().to_string();
    let deadline = Instant::now() + DECIDE;
    loop {
        let r = http
            .request(method.parse().unwrap(), format!("{base}{path}"))
            .header("Idempotency-Key", &key)
            .timeout(Duration::from_secs(30))
            .json(&body)
            .send()
            .await;
        if let Ok(r) = r {
            let status = r.status().as_u16();
            if status != 503 {
                return (status, r.json().await.unwrap_or(Value::Null));
            }
        }
        assert!(Instant::now() < deadline, "{method} {path} never got an answer");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `{root}/readyz` until it answers 200 (bounded).
pub async fn wait_ready(root: &str) {
    let http = super::http();
    let deadline = Instant::now() + DECIDE;
    while !http.get(format!("{root}/readyz")).send().await.is_ok_and(|r| r.status() == 200) {
        assert!(Instant::now() < deadline, "{root} not ready");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Clients creating instances of `shop/Item` (which must exist) and updating each once, until
/// stopped. `accepted` maps each accepted command id to its instance id.
pub struct Load {
    pub accepted: Arc<Mutex<HashMap<String, String>>>,
    stop: Arc<AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// `clients` loops, each pausing `pace` between commands.
    pub fn start(http: &reqwest::Client, base: &str, clients: usize, pace: Duration) -> Load {
        let accepted: Arc<Mutex<HashMap<String, String>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let clients = (0..clients)
            .map(|c| {
                let (http, base, accepted, stop) = (http.clone(), base.to_string(), accepted.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let id = format!("c{c}-{i}-{}", &Uuid::new_v4().simple().to_string()[..6]);
                        let create = json!({"id": id, "data": {"n": i}});
                        let (s, b) = send(&http, &base, "POST", "/databases/shop/classes/Item/instances", create).await;
                        assert_eq!(s, 202, "{b}");
                        accepted.lock().unwrap().insert(b["command_id"].as_str().unwrap().to_string(), id.clone());
                        let path = format!("/databases/shop/classes/Item/instances/{id}?expected_seq=1");
                        let (s, b) = send(&http, &base, "PUT", &path, json!({"data": {"n": i + 1}})).await;
                        assert_eq!(s, 202, "{b}");
                        accepted.lock().unwrap().insert(b["command_id"].as_str().unwrap().to_string(), id);
                        i += 1;
                        tokio::time::sleep(pace).await;
                    }
                })
            })
            .collect();
        Load { accepted, stop, clients }
    }

    pub fn count(&self) -> usize {
        self.accepted.lock().unwrap().len()
    }

    /// Stops the clients (each finishes the command it is sending) and returns what was
    /// accepted.
    pub async fn stop(self) -> HashMap<String, String> {
        self.stop.store(true, Ordering::Relaxed);
        for c in self.clients {
            c.await.unwrap();
        }
        let accepted = self.accepted.lock().unwrap().clone();
        accepted
    }
}

/// Creates database `shop` with class `Item` (one integer property `n`).
pub async fn create_shop(http: &reqwest::Client, base: &str) {
    assert_eq!(send(http, base, "POST", "/databases", json!({"name": "shop"})).await.0, 202);
    let class = json!({"id": "Item", "properties": [{"name": "n", "type": "integer"}]});
    assert_eq!(send(http, base, "POST", "/databases/shop/classes", class).await.0, 202);
}

/// Waits until every command in `ids` is COMPLETED (none FAILED), bounded by `timeout`.
pub async fn wait_completed<'a>(http: &reqwest::Client, base: &str, ids: impl IntoIterator<Item = &'a String>, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    for command_id in ids {
        loop {
            let r = http.get(format!("{base}/commands/{command_id}")).timeout(Duration::from_secs(10)).send().await;
            if let Ok(r) = r {
                let s: Value = r.json().await.unwrap_or(Value::Null);
                if s["status"] == "COMPLETED" {
                    break;
                }
                assert_ne!(s["status"], "FAILED", "{s}");
            }
            assert!(Instant::now() < deadline, "{command_id} not completed within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
