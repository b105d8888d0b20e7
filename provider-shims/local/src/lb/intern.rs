//! Sharing of identical backend lists, decided without IO.
//!
//! The controller sends every load balancer the same node list, so at the bench's scale (1000
//! Services on 100 nodes) the shim would otherwise keep 1000 copies of one 100-entry list and
//! of its health-check handles. [`Interner`] hands out one `Arc<[T]>` per distinct list;
//! [`reuse_plan`] says which entries of an old list a new one can take over, so a changed node
//! list registers health checks only for the nodes that changed.

use std::collections::HashSet;
use std::hash::Hash;
use std::sync::Arc;

/// Lists interned; an entry only the interner still holds is forgotten on a later call.
#[derive(Debug)]
pub struct Interner<T> {
    lists: HashSet<Arc<[T]>>,
    /// Size at which unused entries are pruned next (doubles with the live count, so pruning
    /// costs O(1) per call amortised).
    prune_at: usize,
}

/// Entries the interner keeps before its first prune.
const FIRST_PRUNE_AT: usize = 64;

impl<T> Default for Interner<T> {
    fn default() -> Self {
        Self {
            lists: HashSet::new(),
            prune_at: FIRST_PRUNE_AT,
        }
    }
}

impl<T: Eq + Hash> Interner<T> {
    /// The shared list equal to `list`, creating it when none is held.
    pub fn intern(&mut self, list: Vec<T>) -> Arc<[T]> {
        if let Some(shared) = self.lists.get(list.as_slice()) {
            return Arc::clone(shared);
        }
        if self.lists.len() >= self.prune_at {
            self.lists.retain(|l| Arc::strong_count(l) > 1);
            self.prune_at = (self.lists.len() * 2).max(FIRST_PRUNE_AT);
        }
        let shared: Arc<[T]> = list.into();
        self.lists.insert(Arc::clone(&shared));
        shared
    }

    /// Lists held (used or not yet pruned).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lists.len()
    }
}

/// For each key of `new`, the index of the same key in `old`, if any: those entries are taken
/// over as they are; only the `None`s are built afresh.
pub fn reuse_plan<K: Eq + Hash>(old: &[K], new: &[K]) -> Vec<Option<usize>> {
    let index: std::collections::HashMap<&K, usize> =
        old.iter().enumerate().map(|(i, k)| (k, i)).collect();
    new.iter().map(|k| index.get(k).copied()).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn identical_lists_share_one_allocation() {
        let mut interner = Interner::default();
        let a = interner.intern(vec![1, 2, 3]);
        let b = interner.intern(vec![1, 2, 3]);
        let c = interner.intern(vec![1, 2, 3, 4]);
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(interner.len(), 2);
    }

    #[test]
    fn lists_nobody_uses_are_forgotten() {
        let mut interner = Interner::default();
        let kept = interner.intern(vec![0]);
        for i in 1..=1000 {
            drop(interner.intern(vec![i]));
        }
        // Pruned as it grew: bounded by twice the live entries (or the first threshold).
        assert!(interner.len() <= FIRST_PRUNE_AT + 1, "{}", interner.len());
        assert!(Arc::ptr_eq(&kept, &interner.intern(vec![0])));
    }

    #[test]
    fn unchanged_nodes_are_taken_over_and_only_new_ones_built() {
        let plan = reuse_plan(&["a", "b", "c"], &["b", "c", "d"]);
        assert_eq!(plan, vec![Some(1), Some(2), None]);
        assert_eq!(reuse_plan::<&str>(&[], &["a"]), vec![None]);
        assert_eq!(reuse_plan(&["a"], &[]), Vec::<Option<usize>>::new());
    }
}
