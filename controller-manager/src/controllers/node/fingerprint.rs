//! Which node changes can alter a sync's outcome. The shared watch delivers every change of
//! every Node — kubelet status heartbeats, our own writes — but a sync reads only some fields;
//! a change that leaves them as they were needs no reconcile.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Mutex, PoisonError};

use kube::ResourceExt;

use crate::k8s::CachedNode;
use crate::k8s::well_known::{ANNOTATION_PROVIDED_NODE_IP, TAINT_UNINITIALIZED};

/// The last fingerprint reconciled (or written by us) per node name.
#[derive(Debug, Default)]
pub struct Fingerprints {
    by_name: Mutex<HashMap<String, u64>>,
}

impl Fingerprints {
    /// Whether `node` differs from what was last seen in the fields a sync reads; records it.
    pub fn changed(&self, node: &CachedNode) -> bool {
        let print = fingerprint(node);
        let previous = self.map().insert(node.name_any(), print);
        previous != Some(print)
    }

    /// Records `node` as seen: the state our own write leaves, so its watch event is skipped.
    pub fn record(&self, node: &CachedNode) {
        self.map().insert(node.name_any(), fingerprint(node));
    }

    /// Keeps only the nodes `keep` says still exist.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.map().retain(|name, _| keep(name));
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        // Entries are replaced whole: a poisoned map is still consistent.
        self.by_name.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Hash of what a sync of `node` reads. A tainted node is initialised from the whole object
/// (an InstancesV2 provider sees all of it), so any new version counts; an initialised node
/// only has its labels reconciled, so its status (heartbeats, addresses) is left out.
pub fn fingerprint(node: &CachedNode) -> u64 {
    let mut h = DefaultHasher::new();
    node.uid().hash(&mut h);
    let tainted = node.has_taint(TAINT_UNINITIALIZED);
    tainted.hash(&mut h);
    if tainted {
        node.resource_version().hash(&mut h);
    }
    node.provider_id().hash(&mut h);
    for (key, value) in node.labels().iter() {
        key.hash(&mut h);
        value.hash(&mut h);
    }
    node.annotations()
        .get(ANNOTATION_PROVIDED_NODE_IP)
        .hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeSpec, NodeStatus, Taint};

    fn node(tainted: bool, rv: &str, address: &str) -> CachedNode {
        let mut node = Node::default();
        node.metadata.name = Some("n1".into());
        node.metadata.uid = Some("u1".into());
        node.metadata.resource_version = Some(rv.into());
        node.spec = Some(NodeSpec {
            taints: tainted.then(|| {
                vec![Taint {
                    key: TAINT_UNINITIALIZED.into(),
                    effect: "NoSchedule".into(),
                    ..Taint::default()
                }]
            }),
            ..NodeSpec::default()
        });
        node.status = Some(NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "InternalIP".into(),
                address: address.into(),
            }]),
            ..NodeStatus::default()
        });
        CachedNode::from(node)
    }

    #[test]
    fn status_heartbeat_of_an_initialised_node_is_skipped() {
        let seen = Fingerprints::default();
        assert!(seen.changed(&node(false, "1", "10.0.0.1")));
        assert!(!seen.changed(&node(false, "2", "10.0.0.2")));
    }

    #[test]
    fn any_new_version_of_a_tainted_node_counts() {
        let seen = Fingerprints::default();
        assert!(seen.changed(&node(true, "1", "10.0.0.1")));
        assert!(seen.changed(&node(true, "2", "10.0.0.1")));
        assert!(!seen.changed(&node(true, "2", "10.0.0.1")));
    }

    #[test]
    fn our_own_write_is_skipped() {
        let seen = Fingerprints::default();
        assert!(seen.changed(&node(true, "1", "10.0.0.1")));
        // We initialised it: the watch then delivers the untainted node, then its new status.
        seen.record(&node(false, "", "10.0.0.1"));
        assert!(!seen.changed(&node(false, "2", "10.0.0.1")));
        assert!(!seen.changed(&node(false, "3", "10.0.0.9")));
    }

    #[test]
    fn a_recreated_node_counts_again() {
        let seen = Fingerprints::default();
        let first = node(false, "1", "10.0.0.1");
        assert!(seen.changed(&first));
        let mut again = first.to_node();
        again.metadata.uid = Some("u2".into());
        assert!(seen.changed(&CachedNode::from(again)));
    }

    #[test]
    fn forgotten_nodes_count_again() {
        let seen = Fingerprints::default();
        assert!(seen.changed(&node(false, "1", "10.0.0.1")));
        seen.retain(|_| false);
        assert!(seen.changed(&node(false, "1", "10.0.0.1")));
    }
}
