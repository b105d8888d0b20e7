//! The backend node lists callers put with `PutNodeSet`, so that EnsureLoadBalancer and
//! UpdateLoadBalancer can name one by id instead of carrying (and the shim decoding) the same
//! nodes with every call. Held in memory only, the most recently used few: a caller naming a
//! set that is gone gets `NODE_SET_UNKNOWN` and puts it again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use cpi_proto::CpiError;
use cpi_proto::v1::Node;

use crate::validate::{check_node, invalid};

/// How many sets are kept. A manager needs the current one and, briefly, the one before (a
/// Service kept on its previous backends names that); the rest covers several managers (one
/// per leader term) sharing the shim.
pub(crate) const NODE_SET_CAPACITY: usize = 16;

/// Longest accepted id, in bytes (the protocol's limit).
const MAX_ID_LEN: usize = 256;

/// The stored sets, evicting the least recently used beyond the capacity.
pub(crate) struct NodeSets {
    capacity: usize,
    entries: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    /// Set per id, with the tick it was last put or named at.
    sets: HashMap<Box<str>, (Arc<[Node]>, u64)>,
    tick: u64,
}

impl NodeSets {
    /// An empty store keeping at most `capacity` sets (at least one).
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            entries: Mutex::new(Entries::default()),
        }
    }

    /// Stores `nodes` under `id` (replacing what it named), after checking both.
    pub(crate) fn put(&self, id: String, nodes: Vec<Node>) -> Result<(), CpiError> {
        check_id(&id)?;
        check_nodes(&nodes)?;
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.tick += 1;
        let tick = entries.tick;
        entries
            .sets
            .insert(id.into_boxed_str(), (nodes.into(), tick));
        while entries.sets.len() > self.capacity {
            let oldest = entries
                .sets
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(id, _)| id.clone());
            match oldest {
                Some(id) => entries.sets.remove(&id),
                None => break,
            };
        }
        Ok(())
    }

    /// The backend nodes of an Ensure or Update call: `nodes` when `node_set_id` is empty, else
    /// the set it names (`NODE_SET_UNKNOWN` when not held; `nodes` must then be empty).
    pub(crate) fn resolve(
        &self,
        nodes: Vec<Node>,
        node_set_id: &str,
    ) -> Result<Arc<[Node]>, CpiError> {
        if node_set_id.is_empty() {
            check_nodes(&nodes)?;
            return Ok(nodes.into());
        }
        if !nodes.is_empty() {
            return Err(invalid(
                "nodes",
                format!(
                    "must be empty when node_set_id is set (got {} nodes and node_set_id {node_set_id:?})",
                    nodes.len()
                ),
            ));
        }
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.tick += 1;
        let tick = entries.tick;
        match entries.sets.get_mut(node_set_id) {
            Some((set, used)) => {
                *used = tick;
                Ok(Arc::clone(set))
            }
            None => Err(CpiError::NodeSetUnknown(format!(
                "node set {node_set_id:?} is not held by this shim (never put, evicted or the \
                 shim restarted); PutNodeSet it and retry"
            ))),
        }
    }
}

fn check_id(id: &str) -> Result<(), CpiError> {
    if id.is_empty() {
        return Err(invalid("node_set_id", "must not be empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(invalid(
            "node_set_id",
            format!(
                "is {} bytes long; at most {MAX_ID_LEN} are allowed",
                id.len()
            ),
        ));
    }
    Ok(())
}

/// Checks every backend node of an LB call is named.
fn check_nodes(nodes: &[Node]) -> Result<(), CpiError> {
    // `format_args!` defers building the field path until a node actually fails.
    nodes
        .iter()
        .enumerate()
        .try_for_each(|(i, node)| check_node(node, format_args!("nodes[{i}]")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use cpi_proto::v1::ObjectMeta;

    fn node(name: &str) -> Node {
        Node {
            metadata: Some(ObjectMeta {
                name: name.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn names(set: &[Node]) -> Vec<&str> {
        set.iter()
            .map(|n| n.metadata.as_ref().unwrap().name.as_str())
            .collect()
    }

    #[test]
    fn inline_nodes_pass_through_and_a_put_set_is_named_by_id() {
        let sets = NodeSets::new(4);
        let inline = sets.resolve(vec![node("a")], "").unwrap();
        assert_eq!(names(&inline), ["a"]);
        sets.put("s1".into(), vec![node("b"), node("c")]).unwrap();
        assert_eq!(names(&sets.resolve(Vec::new(), "s1").unwrap()), ["b", "c"]);
        // Putting an id again replaces what it names.
        sets.put("s1".into(), vec![node("d")]).unwrap();
        assert_eq!(names(&sets.resolve(Vec::new(), "s1").unwrap()), ["d"]);
    }

    #[test]
    fn an_unknown_set_is_node_set_unknown() {
        let sets = NodeSets::new(4);
        let err = sets.resolve(Vec::new(), "nope").unwrap_err();
        assert!(matches!(err, CpiError::NodeSetUnknown(ref m) if m.contains("\"nope\"")));
    }

    #[test]
    fn least_recently_used_set_is_evicted() {
        let sets = NodeSets::new(2);
        sets.put("old".into(), vec![node("a")]).unwrap();
        sets.put("used".into(), vec![node("b")]).unwrap();
        sets.resolve(Vec::new(), "old").unwrap();
        sets.put("new".into(), vec![node("c")]).unwrap();
        assert!(sets.resolve(Vec::new(), "old").is_ok());
        assert!(sets.resolve(Vec::new(), "new").is_ok());
        assert!(matches!(
            sets.resolve(Vec::new(), "used"),
            Err(CpiError::NodeSetUnknown(_))
        ));
    }

    #[test]
    fn bad_input_names_the_field() {
        let sets = NodeSets::new(2);
        let field = |err: CpiError| match err {
            CpiError::InvalidObject { field, .. } => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            field(sets.put(String::new(), vec![node("a")]).unwrap_err()),
            "node_set_id"
        );
        assert_eq!(
            field(sets.put("x".repeat(257), vec![node("a")]).unwrap_err()),
            "node_set_id"
        );
        assert_eq!(
            field(sets.put("s".into(), vec![node("a"), node("")]).unwrap_err()),
            "nodes[1].metadata.name"
        );
        assert_eq!(
            field(sets.resolve(vec![node("a")], "s").unwrap_err()),
            "nodes"
        );
        assert_eq!(
            field(sets.resolve(vec![Node::default()], "").unwrap_err()),
            "nodes[0].metadata"
        );
    }
}
