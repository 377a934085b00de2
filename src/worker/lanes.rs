//! Which message runs when. Messages with one Kafka key (one aggregate, or one database's
//! ontology) run one at a time in arrival order; different keys run concurrently, at most
//! `worker.lanes` at once, with at most `worker.lanes * 64` messages in hand.
//!
//! A command that waits for another aggregate's outcome steps aside ([`Slot::aside`]): while
//! it waits it holds neither a running place nor a place in hand, so the command it waits for
//! can still be received and run even if it arrived later. Every such wait points at a command
//! lower in the log, so the lowest unfinished command never waits on anything unfinished:
//! there is no cycle of waits, and a worker never deadlocks on correct waits (docs/design.md,
//! "Integrity rules"). A fixed set of FIFO lanes could put an earlier command behind a later
//! one that waits for it.

use async_trait::async_trait;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;

/// Carries out one message; `false` stops its key's queue (shutdown).
#[async_trait]
pub trait Run<J>: Send + Sync + 'static {
    async fn run(&self, job: J, slot: &Slot) -> bool;
}

/// The places a running message holds, which it gives back while it waits.
pub struct Slot {
    running: Option<Arc<Semaphore>>,
    held: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    running: Option<OwnedSemaphorePermit>,
    /// Only ever dropped: that frees room for one more message.
    _in_hand: Option<OwnedSemaphorePermit>,
    /// Waits in progress: a command may read several aggregates at once, and holds its running
    /// place again only once none of them is waiting.
    away: usize,
}

impl Slot {
    /// A slot with nothing to give back (the embedded workers bound their concurrency by
    /// segment instead).
    pub fn free() -> Slot {
        Slot { running: None, held: Mutex::default() }
    }

    /// Runs `wait` without the places this message holds. Its place in hand is given up for
    /// good (it was received; the bound is on messages not yet started); its running place is
    /// taken again when its last wait ends.
    pub async fn aside<F: Future>(&self, wait: F) -> F::Output {
        {
            let mut held = self.held.lock().expect("slot mutex");
            held.away += 1;
            held.running = None;
            held._in_hand = None;
        }
        let out = wait.await;
        let last = {
            let mut held = self.held.lock().expect("slot mutex");
            held.away -= 1;
            held.away == 0
        };
        if let (true, Some(running)) = (last, &self.running) {
            let permit = running.clone().acquire_owned().await.ok();
            let mut held = self.held.lock().expect("slot mutex");
            // Another wait may have begun meanwhile: then the place stays given back.
            if held.away == 0 {
                held.running = permit;
            }
        }
        out
    }
}

/// Messages waiting per key; a key is present while a task runs its queue.
type Queues<J> = Arc<Mutex<HashMap<Vec<u8>, VecDeque<Queued<J>>>>>;

struct Queued<J> {
    job: J,
    in_hand: OwnedSemaphorePermit,
}

pub struct Lanes<J> {
    running: Arc<Semaphore>,
    in_hand: Arc<Semaphore>,
    queues: Queues<J>,
    runner: Arc<dyn Run<J>>,
    tasks: TaskTracker,
}

impl<J: Send + 'static> Lanes<J> {
    pub fn new(running: usize, in_hand: usize, runner: Arc<dyn Run<J>>) -> Self {
        Lanes {
            running: Arc::new(Semaphore::new(running)),
            in_hand: Arc::new(Semaphore::new(in_hand)),
            queues: Arc::default(),
            runner,
            tasks: TaskTracker::new(),
        }
    }

    /// Waits until one more message may be taken in hand.
    pub async fn room(&self) -> OwnedSemaphorePermit {
        self.in_hand.clone().acquire_owned().await.expect("the in-hand semaphore is never closed")
    }

    /// Queues a message behind its key's earlier ones, starting the key's queue if idle.
    pub fn push(&self, key: Vec<u8>, job: J, in_hand: OwnedSemaphorePermit) {
        let mut queues = self.queues.lock().expect("queues mutex");
        if let Some(queue) = queues.get_mut(&key) {
            queue.push_back(Queued { job, in_hand });
            return;
        }
        queues.insert(key.clone(), VecDeque::from([Queued { job, in_hand }]));
        let (queues, running, runner) = (self.queues.clone(), self.running.clone(), self.runner.clone());
        self.tasks.spawn(run_queue(key, queues, running, runner));
    }

    /// Messages taken in hand and not finished (waiting ones included).
    pub fn queued(&self) -> usize {
        self.queues.lock().expect("queues mutex").values().map(VecDeque::len).sum()
    }

    /// Waits for every running queue to stop.
    pub async fn close(self) {
        self.tasks.close();
        self.tasks.wait().await;
    }
}

async fn run_queue<J: Send + 'static>(
    key: Vec<u8>,
    queues: Queues<J>,
    running: Arc<Semaphore>,
    runner: Arc<dyn Run<J>>,
) {
    loop {
        let next = {
            let mut queues = queues.lock().expect("queues mutex");
            let Some(queue) = queues.get_mut(&key) else { return };
            match queue.pop_front() {
                Some(q) => q,
                None => {
                    queues.remove(&key);
                    return;
                }
            }
        };
        // Waited for only once there is a message: an idle queue ends without queueing for a
        // place behind the busy ones.
        let permit = running.clone().acquire_owned().await.expect("the running semaphore is never closed");
        let slot = Slot { running: Some(running.clone()), held: Mutex::new(Held { running: Some(permit), _in_hand: Some(next.in_hand), away: 0 }) };
        if !runner.run(next.job, &slot).await {
            // Shutdown: what is queued behind it is dropped uncommitted and delivered again.
            queues.lock().expect("queues mutex").remove(&key);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::Notify;

    /// Jobs `(key, id)`; job 0 waits (aside) until job 1 has run, though both share the
    /// single running place and job 1 arrives after it.
    struct WaitsForLater {
        done: Mutex<Vec<u32>>,
        second_ran: Notify,
    }

    #[async_trait]
    impl Run<u32> for WaitsForLater {
        async fn run(&self, job: u32, slot: &Slot) -> bool {
            if job == 0 {
                slot.aside(self.second_ran.notified()).await;
            } else {
                self.second_ran.notify_one();
            }
            self.done.lock().unwrap().push(job);
            true
        }
    }

    #[tokio::test]
    async fn a_waiting_message_steps_aside_for_a_later_one() {
        let runner = Arc::new(WaitsForLater { done: Mutex::default(), second_ran: Notify::new() });
        // One running place and one place in hand: without stepping aside, job 1 could
        // neither be taken in hand nor run while job 0 waits for it.
        let lanes = Lanes::new(1, 1, runner.clone());
        let permit = lanes.room().await;
        lanes.push(b"a".to_vec(), 0, permit);
        let permit = lanes.room().await;
        lanes.push(b"b".to_vec(), 1, permit);
        tokio::time::timeout(std::time::Duration::from_secs(10), lanes.close()).await.expect("no deadlock");
        assert_eq!(*runner.done.lock().unwrap(), vec![1, 0]);
    }

    /// Job 0 reads two aggregates at once, each waiting for a later job: it must not take its
    /// running place back while one of the two still waits.
    struct TwoWaits {
        done: Mutex<Vec<u32>>,
        ran: [Notify; 2],
    }

    #[async_trait]
    impl Run<u32> for TwoWaits {
        async fn run(&self, job: u32, slot: &Slot) -> bool {
            match job {
                0 => {
                    futures::join!(slot.aside(self.ran[0].notified()), slot.aside(self.ran[1].notified()));
                }
                n => self.ran[n as usize - 1].notify_one(),
            }
            self.done.lock().unwrap().push(job);
            true
        }
    }

    #[tokio::test]
    async fn overlapping_waits_keep_the_place_given_back_until_the_last_ends() {
        let runner = Arc::new(TwoWaits { done: Mutex::default(), ran: [Notify::new(), Notify::new()] });
        let lanes = Lanes::new(1, 1, runner.clone());
        for (key, job) in [(b"a", 0), (b"b", 1), (b"c", 2)] {
            let permit = lanes.room().await;
            lanes.push(key.to_vec(), job, permit);
        }
        tokio::time::timeout(std::time::Duration::from_secs(10), lanes.close()).await.expect("no deadlock");
        assert_eq!(*runner.done.lock().unwrap(), vec![1, 2, 0]);
    }

    struct Records(Mutex<Vec<u32>>);

    #[async_trait]
    impl Run<u32> for Records {
        async fn run(&self, job: u32, _slot: &Slot) -> bool {
            tokio::task::yield_now().await;
            self.0.lock().unwrap().push(job);
            true
        }
    }

    #[tokio::test]
    async fn one_key_runs_in_arrival_order() {
        let runner = Arc::new(Records(Mutex::default()));
        let lanes = Lanes::new(8, 64, runner.clone());
        for job in 0..50 {
            let permit = lanes.room().await;
            lanes.push(b"k".to_vec(), job, permit);
        }
        lanes.close().await;
        assert_eq!(*runner.0.lock().unwrap(), (0..50).collect::<Vec<_>>());
    }
}
