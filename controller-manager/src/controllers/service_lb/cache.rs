//! The controller's own state: the Services it has processed (upstream `serviceCache`), the
//! backend set each load balancer was last given (upstream `lastSyncedNodes`), and the current
//! backend set, built once per change of the nodes and shared by every service.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use cpi_proto::v1;
use kube::{Resource, ResourceExt};

use super::decide::{Host, stable_node};
use crate::cloud::NodeSet;
use crate::k8s::{CachedNode, CachedService};

/// One backend set: the nodes passing the stable predicates, sorted by name, with their CPI
/// views. Shared (`Arc`) by every service synced while the nodes did not change.
#[derive(Debug, Default)]
pub struct Backends {
    /// `(name, providerID)` per node: what `nodesSufficientlyEqual` compares.
    pub hosts: Box<[Host]>,
    /// `resourceVersion` per node: whether the views are still current.
    versions: Box<[Box<str>]>,
    /// The CPI views handed to Ensure and Update, put to the shim once.
    pub nodes: NodeSet,
}

impl Backends {
    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    fn matches(&self, nodes: &[&CachedNode]) -> bool {
        self.hosts.len() == nodes.len()
            && self.hosts.iter().zip(&*self.versions).zip(nodes).all(
                |(((name, _), version), node)| {
                    **name == *node.name_any()
                        && **version == *node.resource_version().unwrap_or_default()
                },
            )
    }
}

/// The current backend set, rebuilt only when a node passing the predicates changed.
#[derive(Default)]
pub struct BackendCache {
    latest: Mutex<Latest>,
}

/// The last backend set and the node cache generation it was taken at.
#[derive(Default)]
struct Latest {
    generation: Option<u64>,
    backends: Arc<Backends>,
}

impl BackendCache {
    /// The backend set of the node cache at `generation` (its change counter, read before
    /// `nodes`), reusing the last one when the generation is the same or no node in the set
    /// changed; `nodes` lists every cached node and `view` converts those passing the
    /// predicates. A generation read before the cache changed only costs a rebuild later.
    pub fn current(
        &self,
        generation: u64,
        nodes: impl FnOnce() -> Vec<Arc<CachedNode>>,
        view: impl FnOnce(&[&CachedNode]) -> Vec<v1::Node>,
    ) -> Arc<Backends> {
        let latest = {
            let latest = self.lock();
            if latest.generation == Some(generation) {
                return Arc::clone(&latest.backends);
            }
            Arc::clone(&latest.backends)
        };
        let nodes = nodes();
        let mut stable: Vec<&CachedNode> = nodes
            .iter()
            .map(AsRef::as_ref)
            .filter(|n| stable_node(n))
            .collect();
        stable.sort_unstable_by(|a, b| a.meta().name.cmp(&b.meta().name));
        let backends = if latest.matches(&stable) {
            latest
        } else {
            Arc::new(Backends {
                hosts: stable
                    .iter()
                    .map(|n| (Box::from(n.name_any()), n.provider_id().map(Box::from)))
                    .collect(),
                versions: stable
                    .iter()
                    .map(|n| Box::from(n.resource_version().unwrap_or_default()))
                    .collect(),
                nodes: NodeSet::new(view(&stable)),
            })
        };
        *self.lock() = Latest {
            generation: Some(generation),
            backends: Arc::clone(&backends),
        };
        backends
    }

    fn lock(&self) -> MutexGuard<'_, Latest> {
        self.latest.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Default)]
struct Entries {
    services: HashMap<String, Arc<CachedService>>,
    last_synced: HashMap<String, Arc<Backends>>,
}

/// The Services the controller has processed, by `namespace/name`, and the backend set each
/// load balancer was last given.
#[derive(Default)]
pub struct ServiceCache {
    entries: Mutex<Entries>,
}

impl ServiceCache {
    fn entries(&self) -> MutexGuard<'_, Entries> {
        // Each operation is one map update: a poisoned lock still guards consistent maps.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The cached Service of `key`.
    pub fn get(&self, key: &str) -> Option<Arc<CachedService>> {
        self.entries().services.get(key).cloned()
    }

    /// Caches `svc` under `key`.
    pub fn set(&self, key: &str, svc: Arc<CachedService>) {
        self.entries().services.insert(key.to_string(), svc);
    }

    /// Forgets `key` and its last backend set.
    pub fn delete(&self, key: &str) {
        let mut entries = self.entries();
        entries.services.remove(key);
        entries.last_synced.remove(key);
    }

    /// The cached keys.
    pub fn keys(&self) -> Vec<String> {
        self.entries().services.keys().cloned().collect()
    }

    /// Every cached Service.
    pub fn all_services(&self) -> Vec<Arc<CachedService>> {
        self.entries().services.values().cloned().collect()
    }

    /// Number of cached Services.
    pub fn len(&self) -> usize {
        self.entries().services.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The backend set `key`'s load balancer was last given.
    pub fn last_synced(&self, key: &str) -> Option<Arc<Backends>> {
        self.entries().last_synced.get(key).cloned()
    }

    /// Records the backend set `key`'s load balancer is being given, returning the previous.
    pub fn store_last_synced(&self, key: &str, backends: Arc<Backends>) -> Option<Arc<Backends>> {
        self.entries().last_synced.insert(key.to_string(), backends)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, non_snake_case)]
    use super::*;
    use k8s_openapi::api::core::v1::{Node, NodeSpec, Service};

    fn service(name: &str) -> Arc<CachedService> {
        let mut svc = Service::default();
        svc.metadata.name = Some(name.into());
        svc.metadata.namespace = Some("default".into());
        Arc::new(svc.into())
    }

    // Upstream TestServiceCache, in sequence on one cache.
    #[test]
    fn service_cache__add_del_set_get_list_keys_get_by_keys_all_services() {
        let cache = ServiceCache::default();
        // "Add"
        cache.set("default/a", service("a"));
        assert_eq!(cache.len(), 1);
        // "Del"
        cache.delete("default/a");
        assert_eq!(cache.len(), 0);
        // "Set and Get"
        cache.set("default/b", service("b"));
        assert!(cache.get("default/b").is_some());
        // "ListKeys"
        cache.set("default/c", service("c"));
        let mut keys = cache.keys();
        keys.sort();
        assert_eq!(keys, ["default/b", "default/c"]);
        // "GetbyKeys"
        assert_eq!(cache.get("default/c").unwrap().key(), "default/c");
        // "allServices"
        assert_eq!(cache.all_services().len(), 2);
    }

    fn node(name: &str, version: &str, provider_id: &str) -> Arc<CachedNode> {
        let mut n = Node::default();
        n.metadata.name = Some(name.into());
        n.metadata.resource_version = Some(version.into());
        n.spec = Some(NodeSpec {
            provider_id: Some(provider_id.into()),
            ..NodeSpec::default()
        });
        Arc::new(n.into())
    }

    #[test]
    fn backends_are_reused_until_a_stable_node_changes() {
        let cache = BackendCache::default();
        let mut built = 0;
        let mut view = |nodes: &[&CachedNode]| {
            built += 1;
            vec![v1::Node::default(); nodes.len()]
        };
        let nodes = vec![node("b", "1", "fake://b"), node("a", "1", "fake://a")];
        let first = cache.current(1, || nodes.clone(), &mut view);
        assert_eq!(
            first.hosts.iter().map(|h| &*h.0).collect::<Vec<_>>(),
            ["a", "b"]
        );
        // A new generation whose stable nodes are the same keeps the set.
        let again = cache.current(2, || nodes.clone(), &mut view);
        assert!(Arc::ptr_eq(&first, &again));
        let changed = vec![node("b", "2", "fake://b"), node("a", "1", "fake://a")];
        let third = cache.current(3, || changed.clone(), &mut view);
        assert!(!Arc::ptr_eq(&first, &third));
        assert_eq!(first.hosts, third.hosts);
        assert_eq!(built, 2);
    }

    #[test]
    fn backends_of_an_unchanged_generation_do_not_list_the_nodes() {
        let cache = BackendCache::default();
        let view = |nodes: &[&CachedNode]| vec![v1::Node::default(); nodes.len()];
        let first = cache.current(7, || vec![node("a", "1", "fake://a")], view);
        let listed = std::cell::Cell::new(0);
        let again = cache.current(
            7,
            || {
                listed.set(listed.get() + 1);
                vec![node("a", "2", "fake://a")]
            },
            view,
        );
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(listed.get(), 0);
        // The next generation looks at the nodes again and sees the change.
        let next = cache.current(8, || vec![node("a", "2", "fake://a")], view);
        assert!(!Arc::ptr_eq(&first, &next));
    }
}
