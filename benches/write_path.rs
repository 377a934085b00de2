//! Write-path benchmark: accepted commands per second over HTTP with 32 concurrent clients,
//! on distinct aggregates (database creates; instance creates, which also pay the API's
//! class-was-named look-up) and on one hot aggregate, with p50/p99 latency and S3 requests per
//! accepted command. Run through `scripts/bench.sh` (release build, real services).
//!
//! Backends: `local+postgres` (log on local disk), `s3+postgres` (the local S3-compatible
//! server), `local+sqlite` (the embedded default).

mod common;

use common::{fresh_pg, percentile};
use serde_json::json;
use spiced::config::{Config, Secret};
use spiced::log::EventLog;
use std::time::{Duration, Instant};
use uuid::Uuid;

const CLIENTS: usize = 32;

struct Server {
    base: String,
    log: EventLog,
}

async fn start(config: Config) -> Server {
    let (base, log) = common::start_api(&config).await;
    Server { base, log }
}

async fn config_for(backend: &str, dir: &std::path::Path) -> Config {
    let mut c = Config::dev();
    c.database.pool_size = 16;
    match backend {
        "local+postgres" => {
            c.log.url = dir.join("log").display().to_string();
            c.database.url = Secret::new(fresh_pg().await);
        }
        "s3+postgres" => {
            common::use_s3(&mut c);
            c.database.url = Secret::new(fresh_pg().await);
        }
        "local+sqlite" => {
            c.log.url = dir.join("log").display().to_string();
            c.database.url = Secret::new(format!("sqlite://{}", dir.join("db.sqlite").display()));
        }
        other => panic!("unknown backend {other}"),
    }
    c
}

/// CPU seconds used so far by a process (utime + stime from /proc).
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// CPU seconds used so far by this process (spiced's API and writer, and the HTTP clients) and
/// by the PostgreSQL backends connected to the run's own database (found by pid in
/// `pg_stat_activity`; the server runs on this machine). The server's shared processes (WAL
/// writer, checkpointer) are not counted, for spiced or the baseline.
async fn cpu_now(database_url: &str) -> (f64, f64) {
    if !database_url.starts_with("postgres") {
        return (cpu_seconds("self").unwrap_or(0.0), 0.0);
    }
    let (client, conn) = tokio_postgres::connect(database_url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let sql = "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()";
    let pids: Vec<i32> = client.query(sql, &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    let postgres = pids.iter().filter_map(|pid| cpu_seconds(&pid.to_string())).sum();
    (cpu_seconds("self").unwrap_or(0.0), postgres)
}

struct Run {
    accepted: u64,
    conflicts: u64,
    latencies: Vec<Duration>,
    elapsed: Duration,
    /// CPU seconds of (this process, the database's backends) during the run.
    cpu: (f64, f64),
}

/// 32 clients, each creating databases with fresh names, for `secs` seconds.
async fn distinct(server: &Server, http: &reqwest::Client, secs: u64) -> Run {
    let url = format!("{}/databases", server.base);
    creates(http, url, secs, |name| json!({"name": name})).await
}

/// 32 clients creating instances (fresh ids) of one class: each command also costs the API's
/// look-up that the class was ever named (the 404 `class_not_found` check), so side by side
/// with `distinct` it shows that look-up's price.
async fn instances(server: &Server, http: &reqwest::Client, secs: u64) -> Run {
    let db = format!("inst{}", Uuid::new_v4().simple());
    http.post(format!("{}/databases", server.base)).json(&json!({"name": db})).send().await.unwrap();
    let r = http.post(format!("{}/databases/{db}/classes", server.base)).json(&json!({"id": "C"})).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let url = format!("{}/databases/{db}/classes/C/instances", server.base);
    creates(http, url, secs, |name| json!({"id": name, "data": {}})).await
}

/// 32 clients POSTing `body(fresh name)` to `url` for `secs` seconds.
async fn creates(http: &reqwest::Client, url: String, secs: u64, body: fn(&str) -> serde_json::Value) -> Run {
    let stop = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (http, url) = (http.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < stop {
                let t = Instant::now();
                let name = format!("d{}", Uuid::new_v4().simple());
                let r = http.post(&url).json(&body(&name)).send().await.unwrap();
                assert_eq!(r.status(), 202, "{:?}", r.text().await);
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.unwrap());
    }
    Run { accepted: latencies.len() as u64, conflicts: 0, latencies, elapsed: start.elapsed(), cpu: (0.0, 0.0) }
}

/// 32 clients updating one class: read the version, send it as expected_seq.
async fn hot(server: &Server, http: &reqwest::Client, secs: u64) -> Run {
    let db = format!("hot{}", Uuid::new_v4().simple());
    http.post(format!("{}/databases", server.base)).json(&json!({"name": db})).send().await.unwrap();
    let r = http
        .post(format!("{}/databases/{db}/classes", server.base))
        .json(&json!({"id": "C"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let stop = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let http = http.clone();
        let base = server.base.clone();
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut conflicts) = (Vec::new(), 0u64);
            let mut expected = 1u64;
            while Instant::now() < stop {
                let t = Instant::now();
                let r = http
                    .put(format!("{base}/databases/{db}/classes/C?expected_seq={expected}"))
                    .json(&json!({"patch": {"label": "x"}}))
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let body: serde_json::Value = r.json().await.unwrap();
                match status {
                    202 => {
                        lat.push(t.elapsed());
                        expected = body["sequence_number"].as_u64().unwrap();
                    }
                    409 => {
                        conflicts += 1;
                        expected = body["actual_seq"].as_u64().unwrap();
                    }
                    s => panic!("unexpected {s}: {body}"),
                }
            }
            (lat, conflicts)
        }));
    }
    let (mut latencies, mut conflicts) = (Vec::new(), 0);
    for t in tasks {
        let (l, c) = t.await.unwrap();
        latencies.extend(l);
        conflicts += c;
    }
    Run { accepted: latencies.len() as u64, conflicts, latencies, elapsed: start.elapsed(), cpu: (0.0, 0.0) }
}

/// The baseline, in this process beside spiced's runs: 32 connections doing what
/// `../shared/bench/raw_cas_insert.sql` does under pgbench, a compare-and-set of an
/// aggregate's sequence and an event insert in one statement, on a fresh database.
async fn cas_baseline(secs: u64) -> Run {
    const SETUP: &str = "CREATE TABLE agg (id bigint PRIMARY KEY, seq bigint NOT NULL);
        INSERT INTO agg SELECT g, 0 FROM generate_series(1, 100000) g;
        CREATE TABLE ev (id bigserial PRIMARY KEY, agg_id bigint NOT NULL, seq bigint NOT NULL, data jsonb NOT NULL);";
    const CAS: &str = "WITH s AS (UPDATE agg SET seq = seq + 1 WHERE id = $1 AND seq = (SELECT seq FROM agg WHERE id = $1) \
        RETURNING id, seq) INSERT INTO ev (agg_id, seq, data) SELECT id, seq, $2::jsonb FROM s";
    let url = fresh_pg().await;
    let connect = || async {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        client
    };
    let admin = connect().await;
    admin.batch_execute(SETUP).await.unwrap();
    // Alone: VACUUM cannot run inside the implicit transaction of a multi-statement batch.
    admin.batch_execute("VACUUM ANALYZE agg").await.unwrap();
    let cpu0 = cpu_now(&url).await; // after the set-up, which is not the baseline's work
    let data = json!({"type": "Appended", "amount": 1, "note": "x".repeat(454)});
    let stop = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (client, data) = (connect().await, data.clone());
        tasks.push(tokio::spawn(async move {
            let cas = client.prepare(CAS).await.unwrap();
            let (mut lat, mut lost) = (Vec::new(), 0);
            while Instant::now() < stop {
                let t = Instant::now();
                let id = (Uuid::new_v4().as_u128() % 100_000) as i64 + 1;
                match client.execute(&cas, &[&id, &data]).await.unwrap() {
                    1 => lat.push(t.elapsed()),
                    _ => lost += 1,
                }
            }
            (lat, lost, client)
        }));
    }
    let (mut latencies, mut conflicts, mut clients) = (Vec::new(), 0, Vec::new());
    for t in tasks {
        let (lat, lost, client) = t.await.unwrap();
        latencies.extend(lat);
        conflicts += lost;
        clients.push(client); // open until the CPU is read: a closed backend's CPU is gone
    }
    let elapsed = start.elapsed();
    let cpu1 = cpu_now(&url).await;
    Run { accepted: latencies.len() as u64, conflicts, latencies, elapsed, cpu: (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1) }
}

/// Per commit step, the (sum, count) of its `spiced_log_commit_step_seconds`.
type Steps = std::collections::BTreeMap<String, (f64, f64)>;

/// `spiced_log_commit_step_seconds` so far, from this process's metrics.
fn commit_steps() -> Steps {
    let mut steps = Steps::new();
    for line in spiced::telemetry::metrics().render().lines() {
        let Some(rest) = line.strip_prefix("spiced_log_commit_step_seconds_") else { continue };
        let Some((kind, rest)) = rest.split_once("{step=\"") else { continue };
        let Some((step, value)) = rest.split_once("\"} ") else { continue };
        let Ok(value) = value.parse::<f64>() else { continue };
        match kind {
            "sum" => steps.entry(step.to_string()).or_default().0 = value,
            "count" => steps.entry(step.to_string()).or_default().1 = value,
            _ => {} // the buckets
        }
    }
    steps
}

/// The mean time of each commit step between two `commit_steps` readings, in ms.
fn step_means(before: &Steps, after: &Steps) -> String {
    let means: Vec<String> = after
        .iter()
        .filter_map(|(step, (sum, count))| {
            let (sum0, count0) = before.get(step).copied().unwrap_or_default();
            let n = count - count0;
            (n > 0.0).then(|| format!("{step} {:.2} ms (x{n})", 1000.0 * (sum - sum0) / n))
        })
        .collect();
    means.join(", ")
}

/// Prints a run; returns its accepted commands per second.
fn report(backend: &str, workload: &str, mut run: Run, puts: u64, gets: u64, s3_cpu: Option<f64>) -> f64 {
    run.latencies.sort();
    let rate = run.accepted as f64 / run.elapsed.as_secs_f64();
    let mut line = format!(
        "{backend:<17} {workload:<9} accepted/s {rate:>8.0}  p50 {:>6.2} ms  p99 {:>6.2} ms  \
         409s {:>6}  PUT/cmd {:.3}  GET/cmd {:.3}",
        percentile(&run.latencies, 0.50),
        percentile(&run.latencies, 0.99),
        run.conflicts,
        puts as f64 / run.accepted.max(1) as f64,
        gets as f64 / run.accepted.max(1) as f64,
    );
    if let Some(cpu) = s3_cpu {
        line.push_str(&format!("  s3-server CPU {:.0}%", 100.0 * cpu / run.elapsed.as_secs_f64()));
    }
    let per_command = |seconds: f64| 1000.0 * seconds / run.accepted.max(1) as f64;
    line.push_str(&format!(
        "  CPU ms/cmd: this process {:.3} + postgres {:.3}",
        per_command(run.cpu.0),
        per_command(run.cpu.1)
    ));
    println!("{line}");
    rate
}

#[tokio::main]
async fn main() {
    let secs: u64 = std::env::var("SPICED_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    let backends = std::env::var("SPICED_BENCH_BACKENDS")
        .unwrap_or_else(|_| "local+postgres,s3+postgres,local+sqlite".into());
    let s3_pid = std::env::var("SPICED_BENCH_S3_PID").ok();
    println!("write path: {CLIENTS} concurrent HTTP clients, {secs} s per run");
    let baseline = if backends.contains("postgres") {
        Some(report("postgres CAS", "baseline", cas_baseline(secs).await, 0, 0, None))
    } else {
        None
    };
    // Which runs, for profiling one alone: distinct, instances, hot.
    let workloads = std::env::var("SPICED_BENCH_WORKLOADS").unwrap_or_else(|_| "distinct,instances,hot".into());
    let mut ratios = Vec::new();
    // Writer protocols to compare side by side: 1 is the serial commit, above 1 the pipelined
    // commit with that many batches in flight (PostgreSQL only).
    let windows = std::env::var("SPICED_BENCH_MAX_IN_FLIGHT").unwrap_or_else(|_| "1".into());
    let runs = backends.split(',').flat_map(|b| windows.split(',').map(move |w| (b, w.parse::<usize>().expect("SPICED_BENCH_MAX_IN_FLIGHT: numbers"))));
    // And `database.synchronous_index_commit` (false, the default; true adds a WAL flush per
    // serial batch, shown as "+flush").
    let flushes = std::env::var("SPICED_BENCH_SYNC_INDEX_COMMIT").unwrap_or_else(|_| "false".into());
    let runs = runs.flat_map(|run| flushes.split(',').map(move |f| (run, f.parse::<bool>().expect("SPICED_BENCH_SYNC_INDEX_COMMIT: true/false"))));
    // The pipelined commit needs PostgreSQL; the flush setting is the serial commit's on
    // PostgreSQL (the pipelined one always flushes, SQLite has none).
    let wanted = |((b, w), flush): &((&str, usize), bool)| {
        let serial_pg = *w == 1 && b.ends_with("postgres");
        (*w == 1 || b.ends_with("postgres")) && (!*flush || serial_pg)
    };
    for ((backend, window), flush) in runs.filter(wanted).collect::<Vec<_>>() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config_for(backend, dir.path()).await;
        config.writer.max_in_flight = window;
        config.database.synchronous_index_commit = flush;
        let label = match (window, flush) {
            (1, false) => backend.to_string(),
            (1, true) => format!("{backend}+flush"),
            (w, _) => format!("{backend}/{w}"),
        };
        let backend = label.as_str();
        let database_url = config.database.url.expose().to_string();
        let server = start(config).await;
        let http = reqwest::Client::builder().pool_max_idle_per_host(CLIENTS).build().unwrap();
        distinct(&server, &http, 1).await; // warm-up: connections, prepared statements
        for workload in workloads.split(',') {
            let (p0, g0, _) = server.log.counts().snapshot();
            let cpu0 = s3_pid.as_deref().and_then(cpu_seconds);
            let own0 = cpu_now(&database_url).await;
            let steps0 = commit_steps();
            let mut run = match workload {
                "distinct" => distinct(&server, &http, secs).await,
                "instances" => instances(&server, &http, secs).await,
                "hot" => hot(&server, &http, secs).await,
                other => panic!("SPICED_BENCH_WORKLOADS: no workload {other:?} (distinct, instances, hot)"),
            };
            let own1 = cpu_now(&database_url).await;
            run.cpu = (own1.0 - own0.0, own1.1 - own0.1);
            let (p1, g1, _) = server.log.counts().snapshot();
            let s3_cpu = if backend.starts_with("s3") {
                s3_pid.as_deref().and_then(cpu_seconds).zip(cpu0).map(|(a, b)| a - b)
            } else {
                None
            };
            let rate = report(backend, workload, run, p1 - p0, g1 - g0, s3_cpu);
            println!("{:<17} {workload:<9} per batch: {}", "", step_means(&steps0, &commit_steps()));
            ratios.extend(baseline.map(|b| format!("{backend} {workload} {:.2}x", rate / b)));
        }
    }
    if !ratios.is_empty() {
        println!("accepted/s against the CAS baseline of this run: {}", ratios.join(", "));
    }
    common::drop_databases().await;
}
