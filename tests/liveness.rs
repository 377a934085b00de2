//! Liveness under dependency stalls: each dependency (the Kafka broker, S3, PostgreSQL) is
//! frozen mid-load for longer than the clients' timeouts, then resumed, and every role must
//! catch up by itself within a bound, with no operator action. The broker is a private one
//! paused with SIGSTOP; S3 and PostgreSQL are paused through a TCP proxy that stops forwarding
//! (connections stay open, nothing answers), so the shared servers are never touched.
//!
//! The recovery times are printed (`--nocapture`) for the design document's table.

mod common;

use common::broker::Broker;
use common::kafka::isolate_topics;
use common::load::{create_shop, wait_completed, wait_ready, Load};
use common::process::{free_port, Spiced};
use common::proxy::Proxy;
use common::{isolated_config, Backend};
use spiced::config::{Config, Secret};
use spiced::db::Database;
use std::time::{Duration, Instant};

/// How long each role gets to catch up after a dependency returns. The measured times are far
/// below (see the printed figures); the bound is what `docs/design.md` promises.
const RECOVERY: Duration = Duration::from_secs(60);

/// The production stack against a private broker, with S3 and PostgreSQL behind proxies.
struct Stack {
    config: Config,
    /// The same, talking to the real servers directly: what the test itself reads through.
    direct: Config,
    broker: Broker,
    s3: Proxy,
    pg: Proxy,
    _dir: tempfile::TempDir,
    _storage: tempfile::TempDir,
}

impl Stack {
    async fn new() -> Stack {
        let (mut direct, storage) = isolated_config(Backend::S3Postgres).await;
        isolate_topics(&mut direct);
        let broker = Broker::start().await;
        direct.kafka.brokers = broker.addr.clone();
        direct.worker.lease_ms = 3000;
        direct.worker.heartbeat_ms = 1000;
        direct.relay.stall_timeout_ms = 6000;
        direct.worker.stall_timeout_ms = 40_000;
        direct.project.stall_timeout_ms = 20_000;
        direct.log.s3.request_timeout_ms = 2000;
        direct.log.s3.retry_timeout_ms = 3000;
        let mut config = direct.clone();
        let s3 = Proxy::start(direct.log.s3.endpoint.trim_start_matches("http://")).await;
        config.log.s3.endpoint = format!("http://{}", s3.addr);
        let mut url = url::Url::parse(direct.database.url.expose()).unwrap();
        let pg = Proxy::start(&format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432))).await;
        url.set_port(Some(pg.addr.port())).unwrap();
        config.database.url = Secret::new(url.to_string());
        Stack { config, direct, broker, s3, pg, _dir: tempfile::tempdir().unwrap(), _storage: storage }
    }

    fn spawn(&self, args: &[&str], env: &[(&str, String)]) -> Spiced {
        Spiced::spawn(args, &self.config, self._dir.path(), env)
    }
}

/// Where the pipeline stands, read directly from PostgreSQL.
async fn clocks(db: &Database) -> (u64, u64, u64) {
    let head = db.index.head().await.unwrap();
    let relayed = db.checkpoint("relay").await.unwrap();
    let projected = db.projection_position().await.unwrap_or(0);
    (head, relayed, projected)
}

/// Waits until the relay checkpoint and the read models reach `head`; returns how long each
/// took from `since`.
async fn caught_up(db: &Database, head: u64, since: Instant) -> (Duration, Duration) {
    let (mut relay, mut project) = (None, None);
    loop {
        let (_, relayed, projected) = clocks(db).await;
        if relay.is_none() && relayed >= head {
            relay = Some(since.elapsed());
        }
        if project.is_none() && projected >= head {
            project = Some(since.elapsed());
        }
        if let (Some(r), Some(p)) = (relay, project) {
            return (r, p);
        }
        assert!(since.elapsed() < RECOVERY, "not caught up {RECOVERY:?} after resuming: head {head}, relay {relayed}, projection {projected}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Pauses one dependency for `pause` under load, resumes it, stops the load and measures how
/// long the relay, the read models and the workers take to finish everything accepted.
async fn stall(stack: &Stack, name: &str, pause: Duration, http: &reqwest::Client, base: &str, db: &Database) {
    let load = Load::start(http, base, 4, Duration::from_millis(10));
    let before = Instant::now();
    while load.count() < 40 {
        assert!(before.elapsed() < RECOVERY, "load did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    match name {
        "kafka" => stack.broker.pause(),
        "s3" => stack.s3.pause(),
        "postgres" => stack.pg.pause(),
        _ => unreachable!(),
    }
    tokio::time::sleep(pause).await;
    match name {
        "kafka" => stack.broker.resume(),
        "s3" => stack.s3.resume(),
        "postgres" => stack.pg.resume(),
        _ => unreachable!(),
    }
    let resumed = Instant::now();
    // Commands go on a little after the dependency returns, then stop: everything accepted
    // up to here must get through.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let accepted = load.stop().await;
    let head = db.index.head().await.unwrap();
    let (relay, project) = caught_up(db, head, resumed).await;
    wait_completed(http, base, accepted.keys(), RECOVERY).await;
    let workers = resumed.elapsed();
    println!(
        "liveness: {name} paused {pause:?}: relay caught up {:.1} s, read models {:.1} s, every command completed {:.1} s after resuming ({} commands)",
        relay.as_secs_f64(), project.as_secs_f64(), workers.as_secs_f64(), accepted.len()
    );
}

/// serve, two relays, two workers and the projection as processes; each dependency frozen in
/// turn for longer than the timeouts that guard it; every role catches up by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_role_catches_up_after_each_dependency_stalls() {
    let stack = Stack::new().await;
    let port = free_port();
    let root = format!("http://127.0.0.1:{port}");
    let base = format!("{root}/api/v1");
    let _serve = stack.spawn(&["serve"], &[("SPICED_SERVE__LISTEN", format!("127.0.0.1:{port}"))]);
    wait_ready(&root).await;
    let _relays = [stack.spawn(&["relay"], &[]), stack.spawn(&["relay"], &[])];
    let _workers = [stack.spawn(&["worker"], &[]), stack.spawn(&["worker"], &[])];
    let _project = stack.spawn(&["project"], &[]);
    let http = reqwest::Client::new();
    create_shop(&http, &base).await;
    let db = Database::open(&stack.direct.database).await.unwrap();
    // Longer than kafka.message_timeout_ms (1 s here), the S3 request timeout (2 s) and the
    // lease of the workers' claims (3 s).
    let pause = Duration::from_secs(5);
    for dependency in ["kafka", "s3", "postgres"] {
        stall(&stack, dependency, pause, &http, &base, &db).await;
    }
    let report = spiced::ops::verify::run(&stack.direct, 1).await.unwrap();
    assert_eq!(report.violations(), 0, "{report:?}");
}

/// The repro of the wedged relay: one relay, the broker frozen past the message timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lone_relay_recovers_from_a_broker_stall() {
    let stack = Stack::new().await;
    let port = free_port();
    let root = format!("http://127.0.0.1:{port}");
    let base = format!("{root}/api/v1");
    let _serve = stack.spawn(&["serve"], &[("SPICED_SERVE__LISTEN", format!("127.0.0.1:{port}"))]);
    wait_ready(&root).await;
    let _relay = stack.spawn(&["relay"], &[]);
    let _worker = stack.spawn(&["worker"], &[]);
    let _project = stack.spawn(&["project"], &[]);
    let http = reqwest::Client::new();
    create_shop(&http, &base).await;
    let db = Database::open(&stack.direct.database).await.unwrap();
    stall(&stack, "kafka", Duration::from_secs(3), &http, &base, &db).await;
}
