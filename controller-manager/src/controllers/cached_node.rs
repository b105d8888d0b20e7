//! [`CachedNode`]: a Node as the controllers cache it. It decodes like `core/v1` Node but skips,
//! while parsing, what neither the controllers nor the CPI's view of a Node carry:
//! `metadata.managedFields` (field-ownership trees, most of a Node's JSON) and the bulky status
//! lists (capacity, allocatable, images, volumes, config, daemon endpoints, ...), kilobytes per
//! node that a cache of thousands of nodes would otherwise hold. Kept from `status`:
//! `addresses`, `conditions` and `nodeInfo` (providers identify machines by its system UUID).
//! Writes stay correct: a PUT without `managedFields` keeps the server's, a PUT of the main
//! resource ignores `status`, and status writes are merge patches of `addresses` only.

use std::borrow::Cow;
use std::fmt;
use std::ops::Deref;

use k8s_openapi::api::core::v1::{Node, NodeStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};

/// A `core/v1` Node decoded without `managedFields` and the bulky status lists.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CachedNode(pub Node);

impl Deref for CachedNode {
    type Target = Node;
    fn deref(&self) -> &Node {
        &self.0
    }
}

impl From<Node> for CachedNode {
    fn from(mut node: Node) -> Self {
        node.metadata.managed_fields = None;
        trim_status(&mut node);
        Self(node)
    }
}

/// Keeps only the status that is read: addresses, conditions and node info.
fn trim_status(node: &mut Node) {
    if let Some(status) = node.status.take() {
        node.status = Some(NodeStatus {
            addresses: status.addresses,
            conditions: status.conditions,
            node_info: status.node_info,
            ..NodeStatus::default()
        });
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
        &self.0.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.0.metadata
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
                let mut node = Node::default();
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    match key.as_ref() {
                        "metadata" => node.metadata = map.next_value::<TrimmedMeta>()?.0,
                        "spec" => node.spec = map.next_value()?,
                        "status" => {
                            node.status = map.next_value::<Option<TrimmedStatus>>()?.map(|s| s.0);
                        }
                        // apiVersion and kind are fixed for this type.
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(CachedNode(node))
            }
        }
        deserializer.deserialize_map(NodeVisitor)
    }
}

/// ObjectMeta decoded with `managedFields` skipped by the parser.
struct TrimmedMeta(ObjectMeta);

impl<'de> Deserialize<'de> for TrimmedMeta {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MetaVisitor;
        impl<'de> Visitor<'de> for MetaVisitor {
            type Value = TrimmedMeta;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("object metadata")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TrimmedMeta, A::Error> {
                // The rest of the metadata is small: collect it and let ObjectMeta's own
                // deserializer do the field mapping.
                let mut rest = serde_json::Map::new();
                while let Some(key) = map.next_key::<String>()? {
                    if key == "managedFields" {
                        map.next_value::<IgnoredAny>()?;
                    } else {
                        rest.insert(key, map.next_value::<serde_json::Value>()?);
                    }
                }
                ObjectMeta::deserialize(serde_json::Value::Object(rest))
                    .map(TrimmedMeta)
                    .map_err(de::Error::custom)
            }
        }
        deserializer.deserialize_map(MetaVisitor)
    }
}

/// NodeStatus decoded with everything but addresses, conditions and node info skipped.
struct TrimmedStatus(NodeStatus);

impl<'de> Deserialize<'de> for TrimmedStatus {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StatusVisitor;
        impl<'de> Visitor<'de> for StatusVisitor {
            type Value = TrimmedStatus;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a node status")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TrimmedStatus, A::Error> {
                let mut status = NodeStatus::default();
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    match key.as_ref() {
                        "addresses" => status.addresses = map.next_value()?,
                        "conditions" => status.conditions = map.next_value()?,
                        "nodeInfo" => status.node_info = map.next_value()?,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(TrimmedStatus(status))
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
            "labels": {"a": "b"}, "annotations": {"alpha.kubernetes.io/provided-node-ip": "10.0.0.1"},
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
        assert_eq!(cached.metadata.managed_fields, None);
        assert_eq!(cached.metadata.name.as_deref(), Some("n1"));
        assert_eq!(
            cached.metadata.labels.as_ref().map(|l| l["a"].as_str()),
            Some("b")
        );
        assert_eq!(
            cached.spec.as_ref().and_then(|s| s.provider_id.as_deref()),
            Some("local://m-1")
        );
        let status = cached.status.as_ref().expect("status");
        assert_eq!(status.images, None);
        assert_eq!(status.capacity, None);
        assert_eq!(status.addresses.as_ref().map(Vec::len), Some(1));
        assert_eq!(status.conditions.as_ref().map(Vec::len), Some(2));
        assert_eq!(
            status.node_info.as_ref().map(|i| i.system_uuid.as_str()),
            Some("s")
        );
    }

    #[test]
    fn null_and_missing_status_decode() {
        let null: CachedNode =
            serde_json::from_str(r#"{"metadata": {"name": "n"}, "status": null}"#).expect("null");
        assert_eq!(null.status, None);
        let missing: CachedNode =
            serde_json::from_str(r#"{"metadata": {"name": "n"}}"#).expect("missing");
        assert_eq!(missing.status, None);
    }

    #[test]
    fn malformed_status_is_an_error() {
        let bad = r#"{"metadata": {"name": "n"}, "status": {"conditions": [{"type": 5}]}}"#;
        assert!(serde_json::from_str::<CachedNode>(bad).is_err());
    }

    #[test]
    fn malformed_metadata_is_an_error() {
        let bad = r#"{"metadata": {"name": 5}}"#;
        assert!(serde_json::from_str::<CachedNode>(bad).is_err());
    }
}
