//! How route changes overlap: one change per destination at a time (two creates for one CIDR
//! never interleave their record and kernel steps), any number of destinations at once, and
//! the records of concurrent changes made durable by one shared redb commit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use ipnet::IpNet;
use tokio::sync::{OwnedMutexGuard, oneshot};

use crate::lb::commit::{CommitError, Queue, settle};
use crate::store::{RouteWrite, Store};

/// One async lock per destination being changed; an entry lives only while someone holds or
/// waits for it, so the map stays as small as the number of calls in flight.
#[derive(Default)]
pub struct DestinationLocks {
    held: Mutex<HashMap<IpNet, Arc<tokio::sync::Mutex<()>>>>,
}

/// Holds one destination; dropping it lets the next change of that destination go.
pub struct DestinationGuard<'a> {
    locks: &'a DestinationLocks,
    destination: IpNet,
    guard: Option<OwnedMutexGuard<()>>,
}

impl DestinationLocks {
    /// Waits until no other change of `destination` runs.
    pub async fn lock(&self, destination: IpNet) -> DestinationGuard<'_> {
        let lock = {
            // Only plain map updates happen under this lock; a panic cannot leave it half-done.
            let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(held.entry(destination).or_default())
        };
        DestinationGuard {
            locks: self,
            destination,
            guard: Some(lock.lock_owned().await),
        }
    }
}

impl Drop for DestinationGuard<'_> {
    fn drop(&mut self) {
        let mut held = self
            .locks
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        drop(self.guard.take());
        // Nobody else holds or waits for it when the map has the last reference.
        if held
            .get(&self.destination)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            held.remove(&self.destination);
        }
    }
}

type Waiter = oneshot::Sender<Result<(), CommitError>>;

/// Group commit of route rows: a caller queues its row and becomes the committer unless one
/// is running; a committer takes everything queued, commits it in one transaction and answers
/// every caller in it, so calls arriving during an fsync share the next one.
///
/// Rows of different destinations are independent and a destination has one change in flight
/// ([`DestinationLocks`]), so a failed commit fails only its own batch.
pub struct RouteCommits {
    store: Store,
    queue: Mutex<Queue<Waiter, RouteWrite>>,
    committer: Arc<tokio::sync::Mutex<()>>,
}

impl RouteCommits {
    /// Commits into `store`.
    pub fn new(store: Store) -> Self {
        Self {
            store,
            queue: Mutex::new(Queue::default()),
            committer: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// Returns once `write` is durable, or why it is not.
    pub async fn write(&self, write: RouteWrite) -> Result<(), CommitError> {
        let (waiter, mut answer) = oneshot::channel();
        // Only plain queue updates happen under this lock; a panic cannot leave it half-done.
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(write, waiter);
        let committer = tokio::select! {
            biased;
            // A running committer took this write along: no need to queue for the next turn.
            answered = &mut answer => return answered.unwrap_or(Err(CommitError::WriterGone)),
            committer = Arc::clone(&self.committer).lock_owned() => committer,
        };
        if let Ok(answered) = answer.try_recv() {
            // The previous committer took this write along.
            return answered;
        }
        let batch = self
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let store = self.store.clone();
        // A task of its own, so that a caller going away mid-commit still answers the others.
        tokio::spawn(async move {
            let writes = batch.writes;
            // redb commits block (fsync); keep them off the runtime's workers.
            let outcome =
                match tokio::task::spawn_blocking(move || store.write_routes(&writes)).await {
                    Ok(result) => result.map_err(|e| e.to_string()),
                    Err(join) => Err(format!("the commit task failed: {join}")),
                };
            if let Err(error) = &outcome {
                tracing::error!(%error, calls = batch.waiters.len(), "persisting routes failed");
            }
            let (answers, _) = settle(batch.waiters, Vec::new(), &outcome);
            for (waiter, answer) in answers {
                // A caller that went away needs no answer.
                let _ = waiter.send(answer);
            }
            drop(committer);
        });
        answer.await.unwrap_or(Err(CommitError::WriterGone))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn row(destination: String) -> RouteWrite {
        RouteWrite {
            cluster: "c1".into(),
            destination,
            value: Some(b"{}".to_vec()),
        }
    }

    #[tokio::test]
    async fn concurrent_writes_all_become_durable() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let commits = Arc::new(RouteCommits::new(store.clone()));
        let writes = (0..50).map(|i| {
            let commits = Arc::clone(&commits);
            tokio::spawn(async move { commits.write(row(format!("10.244.{i}.0/24"))).await })
        });
        for write in futures::future::join_all(writes).await {
            write.unwrap().unwrap();
        }
        assert_eq!(store.load_routes().unwrap().len(), 50);
    }

    #[tokio::test]
    async fn a_destination_is_held_by_one_change_at_a_time_and_forgotten_after() {
        let locks = DestinationLocks::default();
        let a: IpNet = "10.244.1.0/24".parse().unwrap();
        let b: IpNet = "10.244.2.0/24".parse().unwrap();
        let held = locks.lock(a).await;
        // Another destination goes at once; the same one waits.
        drop(locks.lock(b).await);
        let same = tokio::time::timeout(std::time::Duration::from_millis(50), locks.lock(a));
        assert!(same.await.is_err());
        drop(held);
        drop(locks.lock(a).await);
        assert!(locks.held.lock().unwrap().is_empty());
    }
}
