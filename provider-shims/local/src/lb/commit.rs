//! Group commit, decided without IO: the queue of writes decided but not yet durable, and who
//! is told what when the transaction carrying them commits or fails.
//!
//! The provider decides and applies a change to its in-memory state under the state lock and
//! queues the write there, so the queue's order is the decision order and every decision sees
//! the writes queued before it. A single writer takes everything queued, commits it in one
//! transaction and only then answers the callers. Because later decisions may rest on earlier
//! queued writes, a failed commit fails its batch *and* everything queued behind it; the
//! provider then reloads its state from the database, so what is durable is always a prefix of
//! what was decided.

use crate::store::LbWrite;

/// Why a call's change did not become durable. Every variant is worth retrying: nothing of the
/// call was kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    /// The transaction carrying the write failed.
    #[error("persisting the load balancer: {0}")]
    Failed(String),
    /// An earlier write this call's decision may rest on failed, so this one was dropped.
    #[error(
        "persisting the load balancer: an earlier change it was decided after failed to \
         persist ({0}); nothing of this call was kept"
    )]
    Behind(String),
    /// The writer stopped before answering (the shim is shutting down).
    #[error("persisting the load balancer: the state writer stopped")]
    WriterGone,
    /// The in-memory state could not be reloaded after a failed commit; changes are refused
    /// until it can.
    #[error("the load-balancer state could not be reloaded after a failed write: {0}")]
    Stale(String),
}

/// Writes decided but not yet committed, in decision order, each with its waiter. The write
/// type is the load balancer's by default; the routes queue their own rows.
#[derive(Debug)]
pub struct Queue<W, T = LbWrite> {
    writes: Vec<T>,
    waiters: Vec<W>,
}

impl<W, T> Default for Queue<W, T> {
    fn default() -> Self {
        Self {
            writes: Vec::new(),
            waiters: Vec::new(),
        }
    }
}

impl<W, T> Queue<W, T> {
    /// Queues `write`, to be answered through `waiter`.
    pub fn push(&mut self, write: T, waiter: W) {
        self.writes.push(write);
        self.waiters.push(waiter);
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// Everything queued, as one batch, leaving the queue empty.
    pub fn take(&mut self) -> Batch<W, T> {
        Batch {
            writes: std::mem::take(&mut self.writes),
            waiters: std::mem::take(&mut self.waiters),
        }
    }
}

/// Writes committed together, in decision order.
#[derive(Debug)]
pub struct Batch<W, T = LbWrite> {
    /// The writes, applied in this order in one transaction.
    pub writes: Vec<T>,
    /// Their waiters, in the same order.
    pub waiters: Vec<W>,
}

/// A waiter and what it is told.
pub type Answer<W> = (W, Result<(), CommitError>);

/// The answer of every waiter of `batch` given the commit's `outcome`, and of every waiter
/// `behind` it (queued while it was committing): on success the batch is answered and
/// `behind` waits for its own commit (returned untouched); on failure everyone fails.
pub fn settle<W>(
    batch: Vec<W>,
    behind: Vec<W>,
    outcome: &Result<(), String>,
) -> (Vec<Answer<W>>, Vec<W>) {
    match outcome {
        Ok(()) => (batch.into_iter().map(|w| (w, Ok(()))).collect(), behind),
        Err(error) => {
            let failed = batch
                .into_iter()
                .map(|w| (w, Err(CommitError::Failed(error.clone()))))
                .chain(
                    behind
                        .into_iter()
                        .map(|w| (w, Err(CommitError::Behind(error.clone())))),
                )
                .collect();
            (failed, Vec::new())
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn write(key: &str) -> LbWrite {
        LbWrite {
            put_records: vec![(key.into(), Vec::new())],
            ..LbWrite::default()
        }
    }

    #[test]
    fn a_batch_takes_everything_queued_in_decision_order() {
        let mut queue = Queue::default();
        queue.push(write("a"), 1);
        queue.push(write("b"), 2);
        let batch = queue.take();
        assert!(queue.is_empty());
        assert_eq!(batch.waiters, vec![1, 2]);
        let keys: Vec<_> = batch
            .writes
            .iter()
            .map(|w| w.put_records[0].0.as_str())
            .collect();
        assert_eq!(keys, vec!["a", "b"]);
    }

    #[test]
    fn a_good_commit_answers_its_batch_and_leaves_later_writes_queued() {
        let (answers, still_queued) = settle(vec![1, 2], vec![3], &Ok(()));
        assert_eq!(answers, vec![(1, Ok(())), (2, Ok(()))]);
        assert_eq!(still_queued, vec![3]);
    }

    #[test]
    fn a_failed_commit_fails_every_call_in_the_batch_and_every_call_queued_behind_it() {
        let (answers, still_queued) = settle(vec![1, 2], vec![3], &Err("disk full".into()));
        assert!(still_queued.is_empty());
        assert_eq!(
            answers,
            vec![
                (1, Err(CommitError::Failed("disk full".into()))),
                (2, Err(CommitError::Failed("disk full".into()))),
                (3, Err(CommitError::Behind("disk full".into()))),
            ]
        );
        // The message names the cause either way.
        for (_, answer) in answers {
            assert!(answer.unwrap_err().to_string().contains("disk full"));
        }
    }
}
