//! Conversions between Kubernetes API objects and their CPI views.

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

use cpi_proto::v1;
use kube::Resource;

use crate::k8s::{CachedNode, Labels};

/// Builds the CPI view of a cached Node; `raw` also embeds the object as JSON.
pub fn node(node: &CachedNode, raw: bool) -> v1::Node {
    let spec = node.spec();
    let mut metadata = meta(node.meta());
    metadata.labels = pairs(node.labels());
    metadata.annotations = pairs(node.annotations());
    v1::Node {
        metadata: Some(metadata),
        provider_id: node.provider_id().map(str::to_string),
        pod_cidrs: spec.pod_cidrs.clone().unwrap_or_default(),
        taints: node.taints().iter().map(taint).collect(),
        unschedulable: spec.unschedulable.unwrap_or(false),
        addresses: node.addresses().iter().map(address_to_proto).collect(),
        conditions: node.conditions().iter().map(condition).collect(),
        node_info: node.node_info().map(|i| v1::NodeSystemInfo {
            machine_id: i.machine_id.clone(),
            system_uuid: i.system_uuid.clone(),
            boot_id: i.boot_id.clone(),
            kernel_version: i.kernel_version.clone(),
            os_image: i.os_image.clone(),
            operating_system: i.operating_system.clone(),
            architecture: i.architecture.clone(),
            kubelet_version: i.kubelet_version.clone(),
        }),
        raw_json: if raw {
            serde_json::to_vec(&node.to_node()).unwrap_or_default()
        } else {
            Vec::new()
        },
    }
}

fn pairs(labels: &Labels) -> std::collections::HashMap<String, String> {
    labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn timestamp(time: &Time) -> prost_types::Timestamp {
    let t = time.0;
    prost_types::Timestamp {
        seconds: t.as_second(),
        nanos: t.subsec_nanosecond(),
    }
}

/// Builds the CPI view of object metadata.
pub fn meta(m: &ObjectMeta) -> v1::ObjectMeta {
    v1::ObjectMeta {
        name: m.name.clone().unwrap_or_default(),
        namespace: m.namespace.clone().unwrap_or_default(),
        uid: m.uid.clone().unwrap_or_default(),
        resource_version: m.resource_version.clone().unwrap_or_default(),
        generation: m.generation.unwrap_or_default(),
        creation_timestamp: m.creation_timestamp.as_ref().map(timestamp),
        deletion_timestamp: m.deletion_timestamp.as_ref().map(timestamp),
        labels: m.labels.clone().unwrap_or_default().into_iter().collect(),
        annotations: m
            .annotations
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect(),
        finalizers: m.finalizers.clone().unwrap_or_default(),
    }
}

fn taint(t: &core::Taint) -> v1::Taint {
    v1::Taint {
        key: t.key.clone(),
        value: t.value.clone().unwrap_or_default(),
        effect: t.effect.clone(),
        time_added: t.time_added.as_ref().map(timestamp),
    }
}

fn condition(c: &core::NodeCondition) -> v1::NodeCondition {
    v1::NodeCondition {
        r#type: c.type_.clone(),
        status: c.status.clone(),
        reason: c.reason.clone().unwrap_or_default(),
        message: c.message.clone().unwrap_or_default(),
        last_transition_time: c.last_transition_time.as_ref().map(timestamp),
    }
}

/// Converts a Kubernetes address to its CPI form.
pub fn address_to_proto(a: &core::NodeAddress) -> v1::NodeAddress {
    use v1::NodeAddressType as T;
    let kind = match a.type_.as_str() {
        "Hostname" => T::Hostname,
        "InternalIP" => T::InternalIp,
        "ExternalIP" => T::ExternalIp,
        "InternalDNS" => T::InternalDns,
        "ExternalDNS" => T::ExternalDns,
        _ => T::Unspecified,
    };
    v1::NodeAddress {
        r#type: kind as i32,
        address: a.address.clone(),
    }
}

/// Converts CPI addresses to Kubernetes ones, dropping addresses of unknown type (a newer
/// shim's type we cannot represent) and empty ones.
pub fn addresses_from_proto(addresses: &[v1::NodeAddress]) -> Vec<core::NodeAddress> {
    use v1::NodeAddressType as T;
    addresses
        .iter()
        .filter(|a| !a.address.is_empty())
        .filter_map(|a| {
            let kind = match T::try_from(a.r#type).ok()? {
                T::Hostname => "Hostname",
                T::InternalIp => "InternalIP",
                T::ExternalIp => "ExternalIP",
                T::InternalDns => "InternalDNS",
                T::ExternalDns => "ExternalDNS",
                T::Unspecified => return None,
            };
            Some(core::NodeAddress {
                type_: kind.to_string(),
                address: a.address.clone(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn addresses_round_trip_and_unknown_types_are_dropped() {
        let k = vec![
            core::NodeAddress {
                type_: "InternalIP".into(),
                address: "10.0.0.1".into(),
            },
            core::NodeAddress {
                type_: "Hostname".into(),
                address: "n1".into(),
            },
        ];
        let p: Vec<_> = k.iter().map(address_to_proto).collect();
        assert_eq!(addresses_from_proto(&p), k);
        let odd = vec![v1::NodeAddress {
            r#type: 99,
            address: "x".into(),
        }];
        assert!(addresses_from_proto(&odd).is_empty());
    }

    #[test]
    fn node_view_carries_identity_and_presence() {
        let mut n = core::Node::default();
        n.metadata.name = Some("n1".into());
        n.metadata.labels = Some([("a".to_string(), "b".to_string())].into());
        n.spec = Some(core::NodeSpec {
            provider_id: Some(String::new()),
            ..Default::default()
        });
        let n = CachedNode::from(n);
        let v = node(&n, false);
        assert_eq!(v.metadata.as_ref().unwrap().name, "n1");
        assert_eq!(v.metadata.unwrap().labels.get("a").unwrap(), "b");
        // An empty providerID is "not set", never an empty ID.
        assert_eq!(v.provider_id, None);
        assert!(v.raw_json.is_empty());
        assert!(!node(&n, true).raw_json.is_empty());
    }
}
