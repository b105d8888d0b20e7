//! The service work queue (client-go's rate-limited delaying queue, as upstream uses it): a key
//! is queued at most once, never handed to two workers at once, re-queued when it changed while
//! being processed, delayed by `add_after`, and backed off per key by `add_rate_limited`.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::decide::{Requeue, backoff};

#[derive(Default)]
struct State {
    queue: VecDeque<String>,
    dirty: HashSet<String>,
    processing: HashSet<String>,
    /// Delayed keys by due time (the earliest per key wins, as client-go's delaying queue).
    waiting: BTreeSet<(Instant, String)>,
    due: HashMap<String, Instant>,
    failures: HashMap<String, u32>,
    shut_down: bool,
}

impl State {
    fn add(&mut self, key: String) -> bool {
        if self.shut_down || self.dirty.contains(&key) {
            return false;
        }
        self.dirty.insert(key.clone());
        if self.processing.contains(&key) {
            return false;
        }
        self.queue.push_back(key);
        true
    }

    /// Moves due delayed keys to the queue; returns when the next one is due.
    fn promote(&mut self, now: Instant) -> Option<Instant> {
        while let Some((at, _)) = self.waiting.first() {
            if *at > now {
                return Some(*at);
            }
            if let Some((_, key)) = self.waiting.pop_first() {
                self.due.remove(&key);
                self.add(key);
            }
        }
        None
    }
}

/// A rate-limited, delaying work queue of `namespace/name` keys.
#[derive(Default)]
pub struct WorkQueue {
    state: Mutex<State>,
    notify: Notify,
}

impl WorkQueue {
    fn state(&self) -> MutexGuard<'_, State> {
        // Every update leaves the state consistent before anything that could panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `key` now (client-go `Add`).
    pub fn add(&self, key: String) {
        if self.state().add(key) {
            self.notify.notify_one();
        }
    }

    /// Queues `key` after `delay` (client-go `AddAfter`); the earliest pending time wins.
    pub fn add_after(&self, key: String, delay: Duration) {
        if delay.is_zero() {
            return self.add(key);
        }
        let at = Instant::now() + delay;
        let mut state = self.state();
        if state.shut_down {
            return;
        }
        if let Some(&existing) = state.due.get(&key) {
            if existing <= at {
                return;
            }
            state.waiting.remove(&(existing, key.clone()));
        }
        state.due.insert(key.clone(), at);
        state.waiting.insert((at, key));
        drop(state);
        // Waiting workers recompute when to wake.
        self.notify.notify_waiters();
    }

    /// Queues `key` after its backoff and counts the failure (client-go `AddRateLimited`).
    pub fn add_rate_limited(&self, key: String) {
        let delay = {
            let mut state = self.state();
            let failures = state.failures.entry(key.clone()).or_insert(0);
            *failures = failures.saturating_add(1);
            backoff(*failures)
        };
        self.add_after(key, delay);
    }

    /// Requeues `key` as a sync's outcome says: forget it, add it after the provider's delay
    /// (no backoff), or add it rate-limited.
    pub fn requeue(&self, key: &str, requeue: Requeue) {
        match requeue {
            Requeue::Forget => self.forget(key),
            Requeue::After(delay) => self.add_after(key.to_string(), delay),
            Requeue::RateLimited => self.add_rate_limited(key.to_string()),
        }
    }

    /// Forgets `key`'s failures (client-go `Forget`).
    pub fn forget(&self, key: &str) {
        self.state().failures.remove(key);
    }

    /// How many times `key` was rate-limited since it was last forgotten.
    pub fn num_requeues(&self, key: &str) -> u32 {
        self.state().failures.get(key).copied().unwrap_or(0)
    }

    /// Keys queued now (not delayed, not being processed).
    pub fn len(&self) -> usize {
        self.state().queue.len()
    }

    /// Whether no key is queued now.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys waiting for their delay.
    pub fn delayed(&self) -> usize {
        self.state().waiting.len()
    }

    /// The next key to process, waiting for one; `None` once shut down. The key is the
    /// caller's until [`done`](Self::done).
    pub async fn get(&self) -> Option<String> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let next_due = {
                let mut state = self.state();
                if state.shut_down {
                    return None;
                }
                let next_due = state.promote(Instant::now());
                if let Some(key) = state.queue.pop_front() {
                    state.dirty.remove(&key);
                    state.processing.insert(key.clone());
                    return Some(key);
                }
                next_due
            };
            match next_due {
                Some(at) => {
                    tokio::select! {
                        () = notified => {}
                        () = tokio::time::sleep_until(at) => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    /// Marks `key` processed; re-queues it if it was added meanwhile.
    pub fn done(&self, key: &str) {
        let requeued = {
            let mut state = self.state();
            state.processing.remove(key);
            if state.dirty.contains(key) && !state.shut_down {
                state.queue.push_back(key.to_string());
                true
            } else {
                false
            }
        };
        if requeued {
            self.notify.notify_one();
        }
    }

    /// Stops handing out keys; waiting workers get `None`.
    pub fn shut_down(&self) {
        self.state().shut_down = true;
        self.notify.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_key_is_queued_once_and_requeued_when_added_while_processing() {
        let q = WorkQueue::default();
        q.add("a".into());
        q.add("a".into());
        assert_eq!(q.len(), 1);
        let key = q.get().await.unwrap();
        q.add("a".into());
        assert_eq!(q.len(), 0, "not handed out twice while processing");
        q.done(&key);
        assert_eq!(q.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn add_after_waits_and_the_earliest_time_wins() {
        let q = WorkQueue::default();
        q.add_after("a".into(), Duration::from_secs(42));
        q.add_after("a".into(), Duration::from_secs(10));
        assert_eq!(q.delayed(), 1);
        let start = Instant::now();
        assert_eq!(q.get().await.unwrap(), "a");
        assert_eq!(start.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limited_backs_off_per_key_until_forgotten() {
        let q = WorkQueue::default();
        for expected in [5, 10, 20, 40] {
            let start = Instant::now();
            q.add_rate_limited("a".into());
            let key = q.get().await.unwrap();
            assert_eq!(start.elapsed(), Duration::from_secs(expected));
            q.done(&key);
        }
        assert_eq!(q.num_requeues("a"), 4);
        q.forget("a");
        assert_eq!(q.num_requeues("a"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn shut_down_releases_waiting_workers() {
        let q = std::sync::Arc::new(WorkQueue::default());
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.get().await }
        });
        tokio::task::yield_now().await;
        q.shut_down();
        assert_eq!(waiter.await.unwrap(), None);
    }
}
