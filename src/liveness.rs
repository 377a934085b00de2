//! Liveness: whether each running stage of a process is making progress.
//!
//! Safety (nothing lost, nothing doubled) holds whatever a dependency does; liveness is the
//! other half: a stage that is alive makes progress or steps aside. Every stage (the relay,
//! each worker role, the projection) holds a [`Stage`] and says when it
//! moved forward and when it has nothing to do. A stage with work waiting that has not moved
//! for longer than its bound is *stalled*, and then, at once:
//! - `/readyz` of the process answers 503 naming the stage;
//! - the systemd watchdog is no longer fed, so systemd restarts a process that cannot recover
//!   by itself (the relay steps down on its own first, see `relay`);
//! - `spiced_stage_stalled{stage}` is 1, beside `spiced_stage_seconds_since_progress` and
//!   `spiced_stage_work_waiting`, and `spiced status` shows the same from `stage_liveness`.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// One stage's progress, shared between the stage and its observers.
#[derive(Debug)]
pub struct Stage {
    stage: String,
    stall_after: Duration,
    origin: Instant,
    /// Milliseconds after `origin` of the last progress (or idle moment).
    last: AtomicU64,
    waiting: AtomicBool,
    /// Units of work started and not finished (a consumer's messages in its lanes).
    in_flight: AtomicUsize,
    /// Why the stage last failed to move, for `/readyz`; empty once it moves again.
    last_error: Mutex<String>,
    /// The log position the stage has reached, 0 before it has one (positions start at 1).
    position: AtomicU64,
}

impl Stage {
    fn new(stage: &str, stall_after: Duration) -> Stage {
        Stage {
            stage: stage.to_string(),
            stall_after,
            origin: Instant::now(),
            last: AtomicU64::new(0),
            waiting: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            last_error: Mutex::new(String::new()),
            position: AtomicU64::new(0),
        }
    }

    /// The stage has reached log position `position`. The highest this process reached: lanes
    /// finish out of order, and the relay's checkpoint (not this) is the truth when an
    /// operator moves it back.
    pub fn reached(&self, position: u64) {
        self.position.fetch_max(position, Ordering::Relaxed);
    }

    /// The log position reached, if any.
    pub fn position(&self) -> Option<u64> {
        Some(self.position.load(Ordering::Relaxed)).filter(|p| *p > 0)
    }

    pub fn stage(&self) -> &str {
        &self.stage
    }

    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// The stage moved forward (published, applied, committed a batch).
    pub fn progressed(&self) {
        self.last.store(self.now_ms(), Ordering::Relaxed);
        self.clear_error();
    }

    /// The stage has nothing to do: as good as progress, and nothing is waiting.
    pub fn idle(&self) {
        self.waiting.store(false, Ordering::Relaxed);
        self.progressed();
    }

    /// The stage has work it has not done yet.
    pub fn work_waiting(&self) {
        if !self.waiting.swap(true, Ordering::Relaxed) {
            // Waiting starts now: the time before it was idle, not stalled.
            self.last.fetch_max(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// A unit of work (a consumed message) starts.
    pub fn started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.work_waiting();
    }

    /// A unit of work is done: progress.
    pub fn finished(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.progressed();
    }

    /// What a consumer has not read yet (its lag): with nothing unread and nothing in flight
    /// the stage is idle, else work is waiting. The lag is the only way to see work that is
    /// stuck before it reaches the stage (a consumer that cannot fetch).
    pub fn backlog(&self, unread: u64) {
        if unread == 0 && self.in_flight.load(Ordering::Relaxed) == 0 && self.last_error().is_none() {
            self.idle();
        } else {
            self.work_waiting();
        }
    }

    /// Whether the stage has work waiting (the last word it said).
    pub fn has_work(&self) -> bool {
        self.waiting.load(Ordering::Relaxed)
    }

    /// The stage tried and failed: work is waiting, and `error` says why.
    pub fn failed(&self, error: &dyn std::fmt::Display) {
        self.work_waiting();
        *self.last_error.lock().expect("liveness mutex") = error.to_string();
    }

    fn clear_error(&self) {
        let mut e = self.last_error.lock().expect("liveness mutex");
        if !e.is_empty() {
            e.clear();
        }
    }

    /// The last failure since the stage last moved, if any.
    pub fn last_error(&self) -> Option<String> {
        let e = self.last_error.lock().expect("liveness mutex");
        (!e.is_empty()).then(|| e.clone())
    }

    /// Time since the stage last moved forward or was idle.
    pub fn since_progress(&self) -> Duration {
        Duration::from_millis(self.now_ms().saturating_sub(self.last.load(Ordering::Relaxed)))
    }

    /// Work is waiting and nothing moved for longer than the stage's bound.
    pub fn stalled(&self) -> bool {
        self.has_work() && self.since_progress() > self.stall_after
    }

    /// Why the stage cannot make progress now, if it cannot: stalled past its bound, or its
    /// last attempt failed with work waiting.
    pub fn trouble(&self) -> Option<String> {
        let error = self.last_error().filter(|_| self.has_work());
        match (self.stalled(), error) {
            (true, Some(e)) => Some(format!("{}: no progress for {:?} with work waiting: {e}", self.stage, self.since_progress())),
            (true, None) => Some(format!("{}: no progress for {:?} with work waiting", self.stage, self.since_progress())),
            (false, Some(e)) => Some(format!("{}: {e}", self.stage)),
            (false, None) => None,
        }
    }

    fn export(&self) {
        let stage = self.stage.clone();
        metrics::gauge!("spiced_stage_seconds_since_progress", "stage" => stage.clone()).set(self.since_progress().as_secs_f64());
        metrics::gauge!("spiced_stage_work_waiting", "stage" => stage.clone()).set(if self.has_work() { 1.0 } else { 0.0 });
        metrics::gauge!("spiced_stage_stalled", "stage" => stage).set(if self.stalled() { 1.0 } else { 0.0 });
    }
}

fn stages() -> &'static Mutex<Vec<Arc<Stage>>> {
    static STAGES: OnceLock<Mutex<Vec<Arc<Stage>>>> = OnceLock::new();
    STAGES.get_or_init(Mutex::default)
}

/// Registers a stage of this process, stalled after `stall_after` without progress while work
/// waits. A stage registered again under the same name replaces the old one (tests run
/// several roles in one process, one after the other).
pub fn register(stage: &str, stall_after: Duration) -> Arc<Stage> {
    let progress = Arc::new(Stage::new(stage, stall_after));
    let mut all = stages().lock().expect("liveness mutex");
    all.retain(|p| p.stage != stage);
    all.push(progress.clone());
    progress
}

/// Removes a stage that has stopped (it no longer speaks for the process).
pub fn unregister(progress: &Arc<Stage>) {
    stages().lock().expect("liveness mutex").retain(|p| !Arc::ptr_eq(p, progress));
}

/// Every registered stage of this process.
pub fn all() -> Vec<Arc<Stage>> {
    stages().lock().expect("liveness mutex").clone()
}

/// The stalled stages, as `stage: reason` lines; empty when every stage is live.
pub fn stalled() -> Vec<String> {
    all().iter().filter(|p| p.stalled()).filter_map(|p| p.trouble()).collect()
}

/// Exports every stage's gauges (called by the metrics endpoint and the watchdog tick).
pub fn export() {
    for p in all() {
        p.export();
    }
}

/// How often each process records its stages in `stage_liveness`.
pub const REPORT_EVERY: Duration = Duration::from_secs(5);

/// This process, as `stage_liveness.instance`: `host-pid`.
pub fn instance() -> String {
    let host = std::fs::read_to_string("/etc/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "host".into());
    format!("{host}-{}", std::process::id())
}

impl Stage {
    fn report(&self, instance: &str) -> crate::db::StageReport {
        let now = chrono::Utc::now();
        let since = chrono::Duration::from_std(self.since_progress()).unwrap_or_default();
        crate::db::StageReport {
            stage: self.stage.clone(),
            instance: instance.to_string(),
            progressed_at: now - since,
            work_waiting: self.has_work(),
            stalled: self.stalled(),
            last_error: self.last_error(),
            reported_at: now,
            position: self.position(),
        }
    }
}

/// A role's stages, reported in `stage_liveness` while it runs ([`Reporting::start`]) and
/// taken out of the process's list and the table when it ends ([`Reporting::finish`]).
pub struct Reporting {
    stages: Vec<Arc<Stage>>,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Reporting {
    /// Starts reporting `stages` until [`Reporting::finish`] (or `shutdown`).
    pub fn start(db: crate::db::Database, stages: Vec<Arc<Stage>>, shutdown: &tokio_util::sync::CancellationToken) -> Reporting {
        let stop = shutdown.child_token();
        let task = spawn_reporter(db, stages.clone(), stop.clone());
        Reporting { stages, stop, task }
    }

    /// Stops reporting, removes this process's rows and unregisters the stages.
    pub async fn finish(self) {
        self.stop.cancel();
        let _ = self.task.await;
        for stage in &self.stages {
            unregister(stage);
        }
    }
}

/// Records `stages` in `stage_liveness` every [`REPORT_EVERY`] until `shutdown`, then removes
/// this process's rows. A database that does not answer only delays the report: `spiced
/// status` then shows it as old, which is the truth.
fn spawn_reporter(db: crate::db::Database, stages: Vec<Arc<Stage>>, shutdown: tokio_util::sync::CancellationToken) -> tokio::task::JoinHandle<()> {
    let instance = instance();
    tokio::spawn(async move {
        loop {
            let reports: Vec<_> = stages.iter().map(|s| s.report(&instance)).collect();
            for s in &stages {
                s.export();
            }
            match tokio::time::timeout(REPORT_EVERY, db.stages.report(&reports)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "cannot record stage liveness this round"),
                Err(_) => tracing::debug!("recording stage liveness did not finish this round"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(REPORT_EVERY) => {}
            }
        }
        if let Ok(Err(e)) = tokio::time::timeout(REPORT_EVERY, db.stages.forget(&instance)).await {
            tracing::debug!(error = %e, "cannot remove this process's stage liveness rows");
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_reports_the_highest_position_it_reached() {
        let p = Stage::new("t", Duration::from_secs(1));
        assert_eq!(p.report("h-1").position, None, "no position before the first");
        p.reached(5);
        p.reached(3);
        assert_eq!(p.report("h-1").position, Some(5), "a lane finishing late does not move it back");
    }

    #[test]
    fn idle_is_never_stalled_and_waiting_is_after_its_bound() {
        let p = Stage::new("t", Duration::from_millis(30));
        p.idle();
        std::thread::sleep(Duration::from_millis(40));
        assert!(!p.stalled(), "nothing to do is not a stall");
        p.work_waiting();
        assert!(!p.stalled(), "waiting starts the clock, it does not inherit the idle time");
        std::thread::sleep(Duration::from_millis(40));
        assert!(p.stalled());
        p.failed(&"broker down");
        assert_eq!(p.last_error().as_deref(), Some("broker down"));
        let trouble = p.trouble().expect("a stalled stage is in trouble");
        assert!(trouble.contains("no progress") && trouble.contains("broker down"), "{trouble}");
        p.progressed();
        assert!(!p.stalled());
        assert_eq!(p.last_error(), None, "progress clears the error");
        assert!(p.has_work(), "progress alone does not say the work is done");
        assert_eq!(p.trouble(), None, "moving again is no trouble");
        p.failed(&"timed out");
        assert_eq!(p.trouble().as_deref(), Some("t: timed out"), "failing before the bound is trouble too");
    }

    #[test]
    fn a_consumer_is_idle_only_with_nothing_unread_and_nothing_in_flight() {
        let p = Stage::new("t", Duration::from_secs(60));
        p.backlog(0);
        assert!(!p.has_work());
        p.started();
        p.backlog(0);
        assert!(p.has_work(), "a message in a lane is work");
        p.finished();
        p.backlog(3);
        assert!(p.has_work(), "unread messages are work");
        p.backlog(0);
        assert!(!p.has_work());
    }

    #[test]
    fn register_replaces_a_stage_of_the_same_name() {
        let a = register("liveness-test-stage", Duration::from_secs(1));
        let b = register("liveness-test-stage", Duration::from_secs(1));
        let named: Vec<_> = all().into_iter().filter(|p| p.stage() == "liveness-test-stage").collect();
        assert_eq!(named.len(), 1);
        assert!(Arc::ptr_eq(&named[0], &b));
        unregister(&a);
        assert_eq!(all().iter().filter(|p| p.stage() == "liveness-test-stage").count(), 1, "unregistering a replaced stage changes nothing");
        unregister(&b);
        assert_eq!(all().iter().filter(|p| p.stage() == "liveness-test-stage").count(), 0);
    }
}
