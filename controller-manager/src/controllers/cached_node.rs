//! [`CachedNode`]: a Node as the controllers cache it. It decodes like `core/v1` Node but skips
//! `metadata.managedFields` while parsing — those field-ownership trees are most of a Node's
//! JSON and allocations, and no controller reads them — and drops bulky status lists no
//! controller reads. Writes stay correct: a PUT without `managedFields` keeps the server's, a
//! PUT of the main resource ignores `status`, and status writes are merge patches.

use std::borrow::Cow;
use std::fmt;
use std::ops::Deref;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};

/// A `core/v1` Node decoded without `managedFields` and the status lists no controller reads.
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

/// Drops the status lists no controller reads (images can be hundreds of entries).
fn trim_status(node: &mut Node) {
    if let Some(status) = node.status.as_mut() {
        status.images = None;
        status.volumes_attached = None;
        status.volumes_in_use = None;
        status.config = None;
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
                        "status" => node.status = map.next_value()?,
                        // apiVersion and kind are fixed for this type.
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                trim_status(&mut node);
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
            "conditions": [{"type": "Ready", "status": "True"}]
        }
    }"#;

    #[test]
    fn decodes_like_node_without_managed_fields_and_images() {
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
        assert_eq!(status.addresses.as_ref().map(Vec::len), Some(1));
    }

    #[test]
    fn malformed_metadata_is_an_error() {
        let bad = r#"{"metadata": {"name": 5}}"#;
        assert!(serde_json::from_str::<CachedNode>(bad).is_err());
    }
}
