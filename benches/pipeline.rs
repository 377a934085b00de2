//! End-to-end benchmark: API -> log -> relay -> Kafka -> 2 worker processes -> outcome in the
//! log. Prints commands completed per second, and 202-to-outcome latency at 500 commands/s,
//! with each process's CPU share. Run through `scripts/bench.sh`.

mod common;

use common::percentile;
use serde_json::json;
use spiced::config::Config;
use spiced::relay::{run_with, RelayOptions};
use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Concurrent HTTP clients for the throughput run.
const CLIENTS: usize = 128;

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// The pid a service script started, from the environment (`scripts/bench.sh` exports them
/// from its pid files); `None` for a server this run did not start, whose CPU it cannot
/// tell apart from other jobs'.
fn pid_from_env(var: &str) -> Option<u32> {
    std::env::var(var).ok()?.trim().parse().ok()
}

/// The PostgreSQL backends serving this run's own database (a fresh one per run), so other
/// databases' work on a shared server is not counted.
async fn own_backends(config: &Config) -> Vec<u32> {
    let (client, conn) = tokio_postgres::connect(config.database.url.expose(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let rows = client
        .query("SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()", &[])
        .await
        .unwrap();
    rows.iter().map(|r| r.get::<_, i32>(0) as u32).collect()
}

struct Pipeline {
    base: String,
    config: Config,
    workers: Vec<Child>,
    stop: CancellationToken,
    dir: tempfile::TempDir,
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.stop.cancel();
        for w in &mut self.workers {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

async fn start() -> Pipeline {
    let config = common::production_config().await;
    let (base, _) = common::start_api(&config).await;
    let stop = CancellationToken::new();
    tokio::spawn(run_with(config.clone(), RelayOptions::default(), stop.clone(), Arc::default()));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("spiced.toml");
    std::fs::write(&file, toml::to_string(&config).unwrap()).unwrap();
    let workers = (0..2)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_spiced"))
                .args(["worker", "--config"])
                .arg(&file)
                .env("SPICED_DATABASE__URL", config.database.url.expose())
                .env("SPICED_LOG", "warn")
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    Pipeline { base, config, workers, stop, dir }
}

/// Outcomes in the log per command id, with the outcome's time.
async fn outcomes(config: &Config) -> HashMap<Uuid, chrono::DateTime<chrono::Utc>> {
    let (db, log) = spiced::storage::open(config).await.unwrap();
    let head = db.index.head().await.unwrap();
    let mut out = HashMap::new();
    for p in 1..=head {
        if let Some(seg) = log.get_segment(p).await.unwrap() {
            for e in seg.events.iter().filter(|e| e.kind() == Some(spiced::envelope::Kind::Domain)) {
                out.insert(e.command_id().unwrap(), e.occurred_at);
            }
        }
    }
    out
}

async fn count_outcomes(config: &Config) -> i64 {
    let (client, conn) = tokio_postgres::connect(config.database.url.expose(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client.query_one("SELECT count(*) FROM log_index WHERE kind = 'domain'", &[]).await.unwrap().get(0)
}

async fn send(http: &reqwest::Client, base: &str, name: String) -> (Uuid, chrono::DateTime<chrono::Utc>) {
    let r = http.post(format!("{base}/databases")).json(&json!({"name": name})).send().await.unwrap();
    let at = chrono::Utc::now();
    let body: serde_json::Value = r.json().await.unwrap();
    (body["command_id"].as_str().unwrap().parse().unwrap(), at)
}

async fn wait_outcomes(config: &Config, n: i64, timeout: Duration) -> Duration {
    let start = Instant::now();
    while count_outcomes(config).await < n {
        assert!(start.elapsed() < timeout, "only {} of {n} outcomes after {timeout:?}", count_outcomes(config).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

async fn throughput(p: &Pipeline, n: usize) {
    let http = reqwest::Client::new();
    // Warm-up: the workers join their group and the first command completes.
    send(&http, &p.base, "warmup".into()).await;
    wait_outcomes(&p.config, 1, Duration::from_secs(60)).await;
    let cpu0: HashMap<u32, f64> = processes(p).await.into_iter().map(|(_, pid)| (pid, cpu_seconds(pid))).collect();
    let started = Instant::now();
    let sends = futures::stream::iter(0..n)
        .map(|i| send(&http, &p.base, format!("t{i}")));
    use futures::StreamExt;
    sends.buffer_unordered(CLIENTS).collect::<Vec<_>>().await;
    let accepted = started.elapsed();
    wait_outcomes(&p.config, n as i64 + 1, Duration::from_secs(300)).await;
    let elapsed = started.elapsed();
    println!(
        "end to end: {n} commands accepted in {:.2} s, all completed in {:.2} s = {:.0} commands/s completed",
        accepted.as_secs_f64(),
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64()
    );
    // Listed again at the end: a pool may have opened backends during the run, whose CPU
    // is all the run's.
    let mut shares: Vec<(String, f64)> = Vec::new();
    for (name, pid) in processes(p).await {
        let before = cpu0.get(&pid).copied().unwrap_or(0.0);
        let share = 100.0 * (cpu_seconds(pid) - before) / elapsed.as_secs_f64();
        match shares.iter_mut().find(|(n, _)| *n == name) {
            Some((_, total)) => *total += share,
            None => shares.push((name, share)),
        }
    }
    for (name, share) in shares {
        println!("  CPU {name:<22} {share:>5.0}% of one core");
    }
    for (name, var) in SERVICES {
        if pid_from_env(var).is_none() {
            println!("  CPU {name:<22} not measured (not started by this run)");
        }
    }
}

/// The run's own processes: this one (API and relay), the workers it started, the
/// PostgreSQL backends of its database, and the S3 and Kafka servers the bench script
/// started (by pid, never by name: a shared machine runs other jobs' servers too).
async fn processes(p: &Pipeline) -> Vec<(String, u32)> {
    let mut v = vec![("bench (api+relay)".to_string(), std::process::id())];
    v.extend(p.workers.iter().enumerate().map(|(i, w)| (format!("worker {i}"), w.id())));
    v.extend(own_backends(&p.config).await.into_iter().map(|pid| ("postgres (own db)".to_string(), pid)));
    for (name, var) in SERVICES {
        v.extend(pid_from_env(var).map(|pid| (name.to_string(), pid)));
    }
    v
}

/// The servers whose pids the bench script exports, when it started them.
const SERVICES: [(&str, &str); 2] = [("moto (S3)", "SPICED_BENCH_S3_PID"), ("tansu (Kafka)", "SPICED_BENCH_KAFKA_PID")];

async fn latency(p: &Pipeline, rate: u64, secs: u64) {
    let http = reqwest::Client::new();
    let sent: Arc<Mutex<HashMap<Uuid, chrono::DateTime<chrono::Utc>>>> = Arc::default();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    let mut tasks = Vec::new();
    for i in 0..rate * secs {
        tick.tick().await;
        let (http, base, sent) = (http.clone(), p.base.clone(), sent.clone());
        tasks.push(tokio::spawn(async move {
            let (id, at) = send(&http, &base, format!("l{i}")).await;
            sent.lock().unwrap().insert(id, at);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let before = count_outcomes(&p.config).await;
    let _ = before;
    let total = (rate * secs) as i64;
    let already = count_outcomes(&p.config).await;
    wait_outcomes(&p.config, already.max(total), Duration::from_secs(120)).await;
    let done = outcomes(&p.config).await;
    let sent = sent.lock().unwrap().clone();
    let mut lat: Vec<Duration> = sent
        .iter()
        .filter_map(|(id, at)| done.get(id).map(|d| (*d - *at).to_std().unwrap_or_default()))
        .collect();
    lat.sort();
    println!(
        "202 -> COMPLETED at {rate} commands/s for {secs} s: {} of {} completed; p50 {:.0} ms, p99 {:.0} ms",
        lat.len(),
        sent.len(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("SPICED_BENCH_COMMANDS").ok().and_then(|s| s.parse().ok()).unwrap_or(5000);
    let secs = std::env::var("SPICED_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    let p = start().await;
    throughput(&p, n).await;
    drop(p);
    let p = start().await;
    let http = reqwest::Client::new();
    send(&http, &p.base, "warmup".into()).await;
    wait_outcomes(&p.config, 1, Duration::from_secs(60)).await;
    latency(&p, 500, secs).await;
    let _ = &p.dir;
    common::drop_databases().await;
}
