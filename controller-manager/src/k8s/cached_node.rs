//! [`CachedNode`]: a Node as the controllers cache it, laid out for a cache of thousands.
//!
//! It holds what the controllers and the CPI's view of a Node read: the metadata (without
//! `managedFields`, the field-ownership trees that are most of a Node's JSON), the whole spec,
//! and from the status the addresses, conditions and node info (providers identify machines by
//! its system UUID). The bulky status lists (capacity, allocatable, images, volumes, config,
//! daemon endpoints) are skipped while parsing. Labels and annotations are kept as sorted
//! slices rather than B-trees, and the node info boxed: a `core/v1` Node with a dozen labels
//! costs about twice as much memory.
//!
//! Writes stay correct: [`CachedNode::to_node`] rebuilds a Node for a PUT, which keeps the
//! server's `managedFields` and ignores `status`; status writes are merge patches of
//! `addresses` only.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::{
    Node, NodeAddress, NodeCondition, NodeSpec, NodeStatus, NodeSystemInfo, Taint,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};

/// A string map stored as one slice sorted by key: the labels or annotations of a cached node
/// without a B-tree's per-node overhead.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Labels(Box<[(Box<str>, Box<str>)]>);

impl Labels {
    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| k.as_ref().cmp(key))
            .ok()
            .map(|i| self.0[i].1.as_ref())
    }

    /// The pairs, sorted by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_ref(), v.as_ref()))
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no pairs.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The map form Kubernetes objects use; `None` when empty, as the API server omits it.
    pub fn to_map(&self) -> Option<BTreeMap<String, String>> {
        (!self.is_empty()).then(|| {
            self.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
    }

    /// Sorts `pairs` by key; of duplicate keys the last one wins (as JSON decoders do).
    fn from_pairs(mut pairs: Vec<(Box<str>, Box<str>)>) -> Self {
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        pairs.dedup_by(|later, earlier| {
            if later.0 == earlier.0 {
                std::mem::swap(later, earlier);
                true
            } else {
                false
            }
        });
        Self(pairs.into_boxed_slice())
    }
}

impl From<BTreeMap<String, String>> for Labels {
    fn from(map: BTreeMap<String, String>) -> Self {
        // A BTreeMap iterates in key order already.
        Self(
            map.into_iter()
                .map(|(k, v)| (k.into_boxed_str(), v.into_boxed_str()))
                .collect(),
        )
    }
}

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PairsVisitor;
        impl<'de> Visitor<'de> for PairsVisitor {
            type Value = Labels;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of strings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Labels, A::Error> {
                let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some((k, v)) = map.next_entry::<String, String>()? {
                    pairs.push((k.into_boxed_str(), v.into_boxed_str()));
                }
                Ok(Labels::from_pairs(pairs))
            }
        }
        deserializer.deserialize_map(PairsVisitor)
    }
}

/// A field name, borrowed from the input when it has no escapes (serde's own `Cow` always
/// allocates).
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// A `core/v1` Node as the controllers cache it (see the module documentation).
///
/// `metadata` carries neither labels nor annotations (read them through [`labels`] and
/// [`annotations`], which shadow `ResourceExt`'s methods of the same names).
///
/// [`labels`]: CachedNode::labels
/// [`annotations`]: CachedNode::annotations
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CachedNode {
    metadata: ObjectMeta,
    labels: Labels,
    annotations: Labels,
    spec: NodeSpec,
    addresses: Vec<NodeAddress>,
    conditions: Vec<NodeCondition>,
    node_info: Option<Box<NodeSystemInfo>>,
}

impl CachedNode {
    /// `metadata.labels`.
    pub fn labels(&self) -> &Labels {
        &self.labels
    }

    /// `metadata.annotations`.
    pub fn annotations(&self) -> &Labels {
        &self.annotations
    }

    /// `spec`.
    pub fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    /// `spec.providerID`, when set and non-empty.
    pub fn provider_id(&self) -> Option<&str> {
        self.spec.provider_id.as_deref().filter(|id| !id.is_empty())
    }

    /// `spec.taints`.
    pub fn taints(&self) -> &[Taint] {
        self.spec.taints.as_deref().unwrap_or_default()
    }

    /// Whether a taint with `key` is present (any value or effect).
    pub fn has_taint(&self, key: &str) -> bool {
        self.taints().iter().any(|t| t.key == key)
    }

    /// `status.addresses`.
    pub fn addresses(&self) -> &[NodeAddress] {
        &self.addresses
    }

    /// `status.conditions`.
    pub fn conditions(&self) -> &[NodeCondition] {
        &self.conditions
    }

    /// `status.nodeInfo`.
    pub fn node_info(&self) -> Option<&NodeSystemInfo> {
        self.node_info.as_deref()
    }

    /// The status of the `Ready` condition, `"Unknown"` when absent.
    pub fn ready_status(&self) -> &str {
        self.conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .map_or("Unknown", |c| c.status.as_str())
    }

    /// The cached node as a `core/v1` Node (for a PUT, or a shim that wants raw objects).
    pub fn to_node(&self) -> Node {
        let status = NodeStatus {
            addresses: (!self.addresses.is_empty()).then(|| self.addresses.clone()),
            conditions: (!self.conditions.is_empty()).then(|| self.conditions.clone()),
            node_info: self.node_info.as_deref().cloned(),
            ..NodeStatus::default()
        };
        Node {
            metadata: ObjectMeta {
                labels: self.labels.to_map(),
                annotations: self.annotations.to_map(),
                ..self.metadata.clone()
            },
            spec: Some(self.spec.clone()),
            status: Some(status),
        }
    }
}

impl From<Node> for CachedNode {
    fn from(node: Node) -> Self {
        let mut metadata = node.metadata;
        metadata.managed_fields = None;
        let labels = metadata.labels.take().map(Labels::from).unwrap_or_default();
        let annotations = metadata
            .annotations
            .take()
            .map(Labels::from)
            .unwrap_or_default();
        let status = node.status.unwrap_or_default();
        Self {
            metadata,
            labels,
            annotations,
            spec: node.spec.unwrap_or_default(),
            addresses: status.addresses.unwrap_or_default(),
            conditions: status.conditions.unwrap_or_default(),
            node_info: status.node_info.map(Box::new),
        }
    }
}

impl kube::Resource for CachedNode {
    type DynamicType = ();
    type Scope = k8s_openapi::ClusterResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("Node")
    }
    fn group(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("")
    }
    fn version(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("v1")
    }
    fn plural(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("nodes")
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl<'de> Deserialize<'de> for CachedNode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NodeVisitor;
        impl<'de> Visitor<'de> for NodeVisitor {
            type Value = CachedNode;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a core/v1 Node")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<CachedNode, A::Error> {
                let mut node = CachedNode::default();
                while let Some(key) = map.next_key::<Key<'de>>()? {
                    match key.0.as_ref() {
                        "metadata" => {
                            let meta = map.next_value::<TrimmedMeta>()?;
                            node.metadata = meta.metadata;
                            node.labels = meta.labels;
                            node.annotations = meta.annotations;
                        }
                        "spec" => node.spec = map.next_value::<Option<_>>()?.unwrap_or_default(),
                        "status" => {
                            if let Some(status) = map.next_value::<Option<TrimmedStatus>>()? {
                                node.addresses = status.addresses;
                                node.conditions = status.conditions;
                                node.node_info = status.node_info;
                            }
                        }
                        // apiVersion and kind are fixed for this type.
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(node)
            }
        }
        deserializer.deserialize_map(NodeVisitor)
    }
}

/// ObjectMeta decoded with `managedFields` skipped and labels and annotations set apart.
#[derive(Default)]
struct TrimmedMeta {
    metadata: ObjectMeta,
    labels: Labels,
    annotations: Labels,
}

impl<'de> Deserialize<'de> for TrimmedMeta {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MetaVisitor;
        impl<'de> Visitor<'de> for MetaVisitor {
            type Value = TrimmedMeta;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("object metadata")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TrimmedMeta, A::Error> {
                let mut meta = TrimmedMeta::default();
                // The rest of the metadata is small: collect it and let ObjectMeta's own
                // deserializer do the field mapping.
                let mut rest = serde_json::Map::new();
                while let Some(key) = map.next_key::<Key<'de>>()? {
                    match key.0.as_ref() {
                        "managedFields" => {
                            map.next_value::<IgnoredAny>()?;
                        }
                        "labels" => {
                            meta.labels = map.next_value::<Option<Labels>>()?.unwrap_or_default();
                        }
                        "annotations" => {
                            meta.annotations =
                                map.next_value::<Option<Labels>>()?.unwrap_or_default();
                        }
                        other => {
                            rest.insert(other.to_string(), map.next_value::<serde_json::Value>()?);
                        }
                    }
                }
                meta.metadata = ObjectMeta::deserialize(serde_json::Value::Object(rest))
                    .map_err(de::Error::custom)?;
                Ok(meta)
            }
        }
        deserializer.deserialize_map(MetaVisitor)
    }
}

/// The parts of a NodeStatus that are kept; everything else is skipped by the parser.
#[derive(Default)]
struct TrimmedStatus {
    addresses: Vec<NodeAddress>,
    conditions: Vec<NodeCondition>,
    node_info: Option<Box<NodeSystemInfo>>,
}

impl<'de> Deserialize<'de> for TrimmedStatus {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StatusVisitor;
        impl<'de> Visitor<'de> for StatusVisitor {
            type Value = TrimmedStatus;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a node status")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TrimmedStatus, A::Error> {
                let mut status = TrimmedStatus::default();
                while let Some(key) = map.next_key::<Key<'de>>()? {
                    match key.0.as_ref() {
                        "addresses" => {
                            status.addresses = map.next_value::<Option<_>>()?.unwrap_or_default();
                        }
                        "conditions" => {
                            status.conditions = map.next_value::<Option<_>>()?.unwrap_or_default();
                        }
                        "nodeInfo" => {
                            status.node_info =
                                map.next_value::<Option<NodeSystemInfo>>()?.map(Box::new);
                        }
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(status)
            }
        }
        deserializer.deserialize_map(StatusVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE: &str = r#"{
        "kind": "Node", "apiVersion": "v1",
        "metadata": {
            "name": "n1", "uid": "u1", "resourceVersion": "7",
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "labels": {"b": "2", "a": "1"},
            "annotations": {"alpha.kubernetes.io/provided-node-ip": "10.0.0.1"},
            "finalizers": ["example.com/keep"],
            "managedFields": [{"manager": "kubelet", "operation": "Update", "apiVersion": "v1",
                "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:taints": {}}}}]
        },
        "spec": {"providerID": "local://m-1", "taints": [{"key": "k", "effect": "NoSchedule"}]},
        "status": {
            "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}],
            "images": [{"names": ["registry/image:1"], "sizeBytes": 1}],
            "conditions": [{"type": "MemoryPressure", "status": "False"}, {"type": "Ready", "status": "True"}],
            "capacity": {"cpu": "4", "memory": "16Gi"},
            "nodeInfo": {"machineID": "m", "systemUUID": "s", "bootID": "b", "kernelVersion": "k",
                "osImage": "o", "containerRuntimeVersion": "c", "kubeletVersion": "v1.33.0",
                "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"}
        }
    }"#;

    #[test]
    fn decodes_like_node_without_managed_fields_and_bulky_status() {
        let cached: CachedNode = serde_json::from_str(NODE).expect("decodes");
        let full: Node = serde_json::from_str(NODE).expect("decodes as Node");
        assert_eq!(cached, CachedNode::from(full.clone()));
        assert!(full.metadata.managed_fields.is_some());
        assert_eq!(kube::Resource::meta(&cached).managed_fields, None);
        assert_eq!(kube::ResourceExt::name_any(&cached), "n1");
        assert_eq!(cached.labels().get("a"), Some("1"));
        assert_eq!(cached.labels().get("b"), Some("2"));
        assert_eq!(cached.labels().get("c"), None);
        assert_eq!(
            cached
                .annotations()
                .get("alpha.kubernetes.io/provided-node-ip"),
            Some("10.0.0.1")
        );
        assert_eq!(cached.provider_id(), Some("local://m-1"));
        assert!(cached.has_taint("k"));
        assert_eq!(cached.addresses().len(), 1);
        assert_eq!(cached.conditions().len(), 2);
        assert_eq!(cached.ready_status(), "True");
        assert_eq!(
            cached.node_info().map(|i| i.system_uuid.as_str()),
            Some("s")
        );
    }

    #[test]
    fn labels_resolve_to_the_cached_ones_through_an_arc() {
        // `ResourceExt::labels` would read the (empty) metadata map; the inherent method must
        // win, also through the `Arc` the store hands out. The trait is in scope on purpose
        // (and so "unused" when resolution is right).
        #[allow(unused_imports)]
        use kube::ResourceExt as _;
        let cached: std::sync::Arc<CachedNode> =
            std::sync::Arc::new(serde_json::from_str(NODE).expect("decodes"));
        assert_eq!(cached.labels().get("a"), Some("1"));
        assert_eq!(cached.annotations().len(), 1);
    }

    #[test]
    fn to_node_keeps_metadata_spec_and_kept_status() {
        let cached: CachedNode = serde_json::from_str(NODE).expect("decodes");
        let node = cached.to_node();
        let full: Node = serde_json::from_str(NODE).expect("decodes as Node");
        assert_eq!(node.metadata.labels, full.metadata.labels);
        assert_eq!(node.metadata.annotations, full.metadata.annotations);
        assert_eq!(node.metadata.finalizers, full.metadata.finalizers);
        assert_eq!(
            node.metadata.resource_version,
            full.metadata.resource_version
        );
        assert_eq!(node.metadata.managed_fields, None);
        assert_eq!(node.spec, full.spec);
        assert_eq!(CachedNode::from(node.clone()), cached);
        let status = node.status.expect("status");
        assert_eq!(status.capacity, None);
        assert_eq!(status.images, None);
        let full_status = full.status.expect("status");
        assert_eq!(status.addresses, full_status.addresses);
        assert_eq!(status.conditions, full_status.conditions);
        assert_eq!(status.node_info, full_status.node_info);
    }

    #[test]
    fn null_and_missing_parts_decode() {
        let null: CachedNode = serde_json::from_str(
            r#"{"metadata": {"name": "n", "labels": null}, "spec": null, "status": null}"#,
        )
        .expect("nulls");
        assert!(null.labels().is_empty());
        assert_eq!(null.ready_status(), "Unknown");
        let missing: CachedNode =
            serde_json::from_str(r#"{"metadata": {"name": "n"}}"#).expect("missing");
        assert_eq!(missing, null);
    }

    #[test]
    fn duplicate_label_keys_keep_the_last_value() {
        let node: CachedNode =
            serde_json::from_str(r#"{"metadata": {"labels": {"a": "1", "b": "x", "a": "2"}}}"#)
                .expect("decodes");
        assert_eq!(
            node.labels().iter().collect::<Vec<_>>(),
            [("a", "2"), ("b", "x")]
        );
    }

    #[test]
    fn malformed_metadata_is_an_error() {
        let bad = r#"{"metadata": {"name": 5}}"#;
        assert!(serde_json::from_str::<CachedNode>(bad).is_err());
        let bad_labels = r#"{"metadata": {"labels": {"a": 1}}}"#;
        assert!(serde_json::from_str::<CachedNode>(bad_labels).is_err());
    }

    #[test]
    fn malformed_status_is_an_error() {
        let bad = r#"{"metadata": {"name": "n"}, "status": {"conditions": [{"type": 5}]}}"#;
        assert!(serde_json::from_str::<CachedNode>(bad).is_err());
    }
}
