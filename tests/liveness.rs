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
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

/// One stack at a time: each test freezes a dependency and times the recovery, and three
/// stacks of five processes on two cores would time each other's scheduling instead.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl Stack {
    async fn new() -> Stack {
        let serial = SERIAL.lock().await;
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
        Stack { config, direct, broker, s3, pg, _dir: tempfile::tempdir().unwrap(), _storage: storage, _serial: serial }
    }

    fn spawn(&self, args: &[&str], env: &[(&str, String)]) -> Spiced {
        Spiced::spawn(args, &self.config, self._dir.path(), env)
    }

    /// `spiced serve` with `config` on a free port, once ready; and its API base URL.
    async fn serve(&self, config: &Config) -> (Spiced, String) {
        let port = free_port();
        let serve = Spiced::spawn(&["serve"], config, self._dir.path(), &[("SPICED_SERVE__LISTEN", format!("127.0.0.1:{port}"))]);
        let root = format!("http://127.0.0.1:{port}");
        wait_ready(&root).await;
        (serve, format!("{root}/api/v1"))
    }
}

/// Where the pipeline stands, read directly from PostgreSQL.
async fn clocks(db: &Database) -> (u64, u64, u64) {
    let head = db.index.head().await.unwrap();
    let relayed = db.checkpoints.position("relay").await.unwrap();
    let projected = db.read.live_position().await.unwrap_or(0);
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
    let (_serve, base) = stack.serve(&stack.config).await;
    let _relays = [stack.spawn(&["relay"], &[]), stack.spawn(&["relay"], &[])];
    let _workers = [stack.spawn(&["worker"], &[]), stack.spawn(&["worker"], &[])];
    let _project = stack.spawn(&["project"], &[]);
    let http = common::http();
    create_shop(&http, &base).await;
    let db = Database::open(&stack.direct.database).await.unwrap();
    // Longer than kafka.message_timeout_ms (1 s here), the S3 request timeout (2 s), the
    // workers' claim lease (3 s) and the relay's stall bound (6 s): every guard fires.
    let pause = Duration::from_secs(8);
    for dependency in ["kafka", "s3", "postgres"] {
        stall(&stack, dependency, pause, &http, &base, &db).await;
    }
    let report = spiced::ops::verify::run(&stack.direct, 1).await.unwrap();
    assert_eq!(report.violations(), 0, "{report:?}");
}

/// The repro of the wedged relay: one relay, the broker frozen past the message timeout and
/// past the relay's stall bound. While it cannot publish, its `/readyz` answers 503 and the
/// produce errors are exported; after the broker returns it publishes to the head by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lone_relay_recovers_from_a_broker_stall() {
    let stack = Stack::new().await;
    let (_serve, base) = stack.serve(&stack.config).await;
    let ops = format!("http://127.0.0.1:{}", free_port());
    let _relay = stack.spawn(&["relay"], &[("SPICED_METRICS__RELAY_LISTEN", ops.trim_start_matches("http://").to_string())]);
    let _worker = stack.spawn(&["worker"], &[]);
    let _project = stack.spawn(&["project"], &[]);
    let http = common::http();
    create_shop(&http, &base).await;
    wait_ready(&ops).await;
    let db = Database::open(&stack.direct.database).await.unwrap();
    let load = Load::start(&http, &base, 2, Duration::from_millis(10));
    // The relay must be publishing the load when the broker freezes.
    let deadline = Instant::now() + RECOVERY;
    while clocks(&db).await.1 < 3 {
        assert!(Instant::now() < deadline, "the relay never published the load");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stack.broker.pause();
    let paused = Instant::now();
    let (mut unready, mut errors, mut reported) = (false, 0.0, false);
    while paused.elapsed() < Duration::from_secs(8) {
        if let Ok(r) = http.get(format!("{ops}/readyz")).timeout(Duration::from_secs(3)).send().await {
            unready |= r.status() == 503;
        }
        errors = metric(&http, &ops, "spiced_relay_produce_errors_total").await.max(errors);
        reported |= relay_report(&stack.direct).await.is_some_and(|r| r.work_waiting && r.last_error.is_some());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stack.broker.resume();
    let resumed = Instant::now();
    assert!(unready, "/readyz of a relay that cannot publish answers 503");
    assert!(errors >= 1.0, "produce errors are exported while they happen (saw {errors})");
    assert!(reported, "spiced status shows the relay failing with work waiting");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let accepted = load.stop().await;
    let head = db.index.head().await.unwrap();
    let (relay, project) = caught_up(&db, head, resumed).await;
    wait_completed(&http, &base, accepted.keys(), RECOVERY).await;
    println!(
        "liveness: kafka paused 8s, one relay: relay caught up {:.1} s, read models {:.1} s, every command completed {:.1} s after resuming ({} commands)",
        relay.as_secs_f64(), project.as_secs_f64(), resumed.elapsed().as_secs_f64(), accepted.len()
    );
    wait_ready(&ops).await;
    // spiced status: every stage of the deployment reports, and the relay is well again.
    let deadline = Instant::now() + RECOVERY;
    loop {
        let status = spiced::ops::status::read(&stack.direct).await.unwrap();
        let stages: Vec<&str> = status.pipeline.stages.iter().map(|r| r.stage.as_str()).collect();
        for stage in ["relay", "worker:ontology", "worker:instance", "projection"] {
            assert!(stages.contains(&stage), "{stage} reports its liveness: {stages:?}");
        }
        if relay_report(&stack.direct).await.is_some_and(|r| r.last_error.is_none() && !r.stalled) {
            break;
        }
        assert!(Instant::now() < deadline, "the relay's report never recovered");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The relay's row of `spiced status`.
async fn relay_report(config: &Config) -> Option<spiced::db::StageReport> {
    let db = Database::open(&config.database).await.ok()?;
    db.stages.all().await.ok()?.into_iter().find(|r| r.stage == "relay")
}

/// One metric's value from a Prometheus text page (0 when absent).
async fn metric(http: &reqwest::Client, ops: &str, name: &str) -> f64 {
    let Ok(r) = http.get(format!("{ops}/metrics")).timeout(Duration::from_secs(3)).send().await else { return 0.0 };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, f64::max)
}

/// systemd's side of the watchdog: a datagram socket that records when each `WATCHDOG=1`
/// arrives.
struct NotifySocket {
    path: std::path::PathBuf,
    pings: std::sync::Arc<std::sync::Mutex<Vec<Instant>>>,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = tokio::net::UnixDatagram::bind(&path).unwrap();
        let pings: std::sync::Arc<std::sync::Mutex<Vec<Instant>>> = Default::default();
        let seen = pings.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 256];
            while let Ok(n) = socket.recv(&mut buf).await {
                if buf[..n].split(|b| *b == b'\n').any(|l| l == b"WATCHDOG=1") {
                    seen.lock().unwrap().push(Instant::now());
                }
            }
        });
        NotifySocket { path, pings, _dir: dir }
    }

    fn pings_between(&self, from: Instant, to: Instant) -> usize {
        self.pings.lock().unwrap().iter().filter(|t| **t >= from && **t < to).count()
    }
}

/// A projection whose PostgreSQL freezes while events keep coming: once its stall bound has
/// passed, its `/readyz` answers 503 and it stops feeding the systemd watchdog (so systemd
/// would restart it); when PostgreSQL returns it catches up and feeds the watchdog again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_projection_starves_the_watchdog_and_recovers() {
    let stack = Stack::new().await;
    // Only the projection goes through this proxy: the rest of the pipeline keeps running.
    let mut url = url::Url::parse(stack.direct.database.url.expose()).unwrap();
    let own_pg = Proxy::start(&format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432))).await;
    url.set_port(Some(own_pg.addr.port())).unwrap();
    let direct = |args: &[&str], env: &[(&str, String)]| Spiced::spawn(args, &stack.direct, stack._dir.path(), env);
    let (_serve, base) = stack.serve(&stack.direct).await;
    let _relay = direct(&["relay"], &[]);
    let _worker = direct(&["worker"], &[]);
    let notify = NotifySocket::bind();
    let ops = format!("127.0.0.1:{}", free_port());
    let mut project_config = stack.direct.clone();
    project_config.database.url = Secret::new(url.to_string());
    let _project = Spiced::spawn(&["project"], &project_config, stack._dir.path(), &[
        ("SPICED_METRICS__PROJECT_LISTEN", ops.clone()),
        ("SPICED_PROJECT__STALL_TIMEOUT_MS", "2000".into()),
        ("NOTIFY_SOCKET", notify.path.display().to_string()),
        ("WATCHDOG_USEC", "400000".into()),
    ]);
    let ops = format!("http://{ops}");
    wait_ready(&ops).await;
    let http = common::http();
    create_shop(&http, &base).await;
    // The projection must be applying before its database freezes: one still joining its
    // consumer group has no work yet, so nothing of it could stall.
    let deadline = Instant::now() + RECOVERY;
    while !http.get(format!("{base}/databases/shop")).send().await.is_ok_and(|r| r.status() == 200) {
        assert!(Instant::now() < deadline, "the projection never applied the shop database");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let load = Load::start(&http, &base, 2, Duration::from_millis(20));
    while load.count() < 20 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    own_pg.pause();
    let paused = Instant::now();
    let mut unready = false;
    while paused.elapsed() < Duration::from_secs(12) {
        if let Ok(r) = http.get(format!("{ops}/readyz")).timeout(Duration::from_secs(5)).send().await {
            unready |= r.status() == 503;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A database call fails (the pool's 5 s connect timeout) or hangs, and 2 s later the
    // stage is stalled: from then on, no keep-alive.
    let starved = notify.pings_between(paused + Duration::from_secs(8), Instant::now());
    own_pg.resume();
    let resumed = Instant::now();
    assert!(unready, "/readyz of a stalled projection answers 503");
    assert_eq!(starved, 0, "no watchdog keep-alive while the projection is stalled");
    let accepted = load.stop().await;
    let db = Database::open(&stack.direct.database).await.unwrap();
    let head = db.index.head().await.unwrap();
    let (_, project) = caught_up(&db, head, resumed).await;
    wait_completed(&http, &base, accepted.keys(), RECOVERY).await;
    let deadline = Instant::now() + RECOVERY;
    while notify.pings_between(resumed, Instant::now()) == 0 {
        assert!(Instant::now() < deadline, "the watchdog is fed again once the projection moves");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(notify.pings_between(paused - Duration::from_secs(60), paused) > 0, "fed before the stall");
    println!("liveness: projection's postgres paused 12s: read models caught up {:.1} s after resuming", project.as_secs_f64());
}
