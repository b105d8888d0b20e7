//! Sharing of identical backend lists, decided without IO.
//!
//! The controller sends every load balancer the same node list, so at the bench's scale (1000
//! Services on 100 nodes) the shim would otherwise keep 1000 copies of one 100-entry list and
//! of its health-check handles. [`Interner`] hands out one `Arc<[T]>` per distinct list, with
//! what was derived from it once (the digest it is stored under); [`LastDerived`] skips even
//! building the list when a call names the node set the previous one did; [`reuse_plan`] says
//! which entries of an old list a new one can take over, so a changed node list registers
//! health checks only for the nodes that changed.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

/// Lists interned, each with a value derived from it when it was first interned; an entry only
/// the interner still holds is forgotten on a later call.
#[derive(Debug)]
pub struct Interner<T, D> {
    lists: HashMap<Arc<[T]>, D>,
    /// Size at which unused entries are pruned next (doubles with the live count, so pruning
    /// costs O(1) per call amortised).
    prune_at: usize,
}

/// Entries the interner keeps before its first prune.
const FIRST_PRUNE_AT: usize = 64;

impl<T, D> Default for Interner<T, D> {
    fn default() -> Self {
        Self {
            lists: HashMap::new(),
            prune_at: FIRST_PRUNE_AT,
        }
    }
}

impl<T: Eq + Hash, D: Clone> Interner<T, D> {
    /// The shared list equal to `list` and its derived value; `derive` runs only for a list
    /// not held yet, and its error leaves the interner unchanged.
    pub fn intern<E>(
        &mut self,
        list: impl AsRef<[T]> + Into<Arc<[T]>>,
        derive: impl FnOnce(&[T]) -> Result<D, E>,
    ) -> Result<(Arc<[T]>, D), E> {
        if let Some((shared, derived)) = self.lists.get_key_value(list.as_ref()) {
            return Ok((Arc::clone(shared), derived.clone()));
        }
        let derived = derive(list.as_ref())?;
        if self.lists.len() >= self.prune_at {
            self.lists.retain(|l, _| Arc::strong_count(l) > 1);
            self.prune_at = (self.lists.len() * 2).max(FIRST_PRUNE_AT);
        }
        let shared: Arc<[T]> = list.into();
        self.lists.insert(Arc::clone(&shared), derived.clone());
        Ok((shared, derived))
    }

    /// Lists held (used or not yet pruned).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lists.len()
    }
}

/// What was last derived from a shared slice, per key, found by the slice's identity: a caller
/// handing over the same `Arc<[S]>` again gets it back without the slice being read. The entry
/// holds its `Arc`, so the address cannot be reused by another slice while it is kept.
#[derive(Debug)]
pub struct LastDerived<S, K, V> {
    /// One entry per key (a handful: the keys are address families).
    entries: Vec<(K, Arc<[S]>, V)>,
}

impl<S, K, V> Default for LastDerived<S, K, V> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
        }
    }
}

impl<S, K: PartialEq, V> LastDerived<S, K, V> {
    /// The value kept for `key`, if it was derived from this very `source`.
    pub fn get(&self, source: &Arc<[S]>, key: &K) -> Option<&V> {
        self.entries
            .iter()
            .find(|(k, s, _)| k == key && Arc::ptr_eq(s, source))
            .map(|(_, _, v)| v)
    }

    /// Keeps `value`, derived from `source`, as the value for `key` (replacing the one before).
    pub fn put(&mut self, source: Arc<[S]>, key: K, value: V) {
        match self.entries.iter_mut().find(|(k, _, _)| *k == key) {
            Some(entry) => *entry = (key, source, value),
            None => self.entries.push((key, source, value)),
        }
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

    use std::convert::Infallible;

    /// Interns `list` deriving its length, counting the derivations in `derived`.
    fn intern(
        interner: &mut Interner<i32, usize>,
        list: Vec<i32>,
        derived: &mut usize,
    ) -> Arc<[i32]> {
        let Ok((shared, len)) = interner.intern(list, |l| {
            *derived += 1;
            Ok::<_, Infallible>(l.len())
        });
        assert_eq!(len, shared.len());
        shared
    }

    #[test]
    fn identical_lists_share_one_allocation_and_one_derivation() {
        let mut interner = Interner::default();
        let mut derived = 0;
        let a = intern(&mut interner, vec![1, 2, 3], &mut derived);
        let b = intern(&mut interner, vec![1, 2, 3], &mut derived);
        let c = intern(&mut interner, vec![1, 2, 3, 4], &mut derived);
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(interner.len(), 2);
        assert_eq!(derived, 2);
        // An already shared list is taken as it is.
        let Ok((d, _)) = interner.intern(Arc::clone(&a), |_| Ok::<_, Infallible>(0));
        assert!(Arc::ptr_eq(&a, &d));
    }

    #[test]
    fn a_failed_derivation_interns_nothing() {
        let mut interner: Interner<i32, usize> = Interner::default();
        assert_eq!(interner.intern(vec![1], |_| Err("no")), Err("no"));
        assert_eq!(interner.len(), 0);
    }

    #[test]
    fn lists_nobody_uses_are_forgotten() {
        let mut interner = Interner::default();
        let mut derived = 0;
        let kept = intern(&mut interner, vec![0], &mut derived);
        for i in 1..=1000 {
            drop(intern(&mut interner, vec![i], &mut derived));
        }
        // Pruned as it grew: bounded by twice the live entries (or the first threshold).
        assert!(interner.len() <= FIRST_PRUNE_AT + 1, "{}", interner.len());
        assert!(Arc::ptr_eq(
            &kept,
            &intern(&mut interner, vec![0], &mut derived)
        ));
    }

    #[test]
    fn a_derived_value_is_found_by_the_same_slice_and_key_only() {
        let mut last: LastDerived<i32, u8, &str> = LastDerived::default();
        let nodes: Arc<[i32]> = Arc::from(vec![1, 2]);
        let equal: Arc<[i32]> = Arc::from(vec![1, 2]);
        assert_eq!(last.get(&nodes, &4), None);
        last.put(Arc::clone(&nodes), 4, "v4");
        last.put(Arc::clone(&nodes), 6, "v6");
        assert_eq!(last.get(&nodes, &4), Some(&"v4"));
        assert_eq!(last.get(&nodes, &6), Some(&"v6"));
        // Equal content is not the same slice: it is derived afresh.
        assert_eq!(last.get(&equal, &4), None);
        // A new slice for a key replaces the old entry of that key only.
        last.put(Arc::clone(&equal), 4, "v4 again");
        assert_eq!(last.get(&nodes, &4), None);
        assert_eq!(last.get(&equal, &4), Some(&"v4 again"));
        assert_eq!(last.get(&nodes, &6), Some(&"v6"));
        assert_eq!(last.entries.len(), 2);
    }

    #[test]
    fn unchanged_nodes_are_taken_over_and_only_new_ones_built() {
        let plan = reuse_plan(&["a", "b", "c"], &["b", "c", "d"]);
        assert_eq!(plan, vec![Some(1), Some(2), None]);
        assert_eq!(reuse_plan::<&str>(&[], &["a"]), vec![None]);
        assert_eq!(reuse_plan(&["a"], &[]), Vec::<Option<usize>>::new());
    }
}
