//! Conversions between Kubernetes API objects and their CPI views.

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use cpi_proto::k8s_view::{self, timestamp};
use cpi_proto::v1;
use kube::Resource;

use crate::k8s::{CachedNode, CachedService, Labels};

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

/// Builds the CPI view of a load balancer's backend node: the node's view without its
/// conditions, so no shim can make a backend set depend on readiness (and a Ready flip changes
/// nothing a load-balancer call sends); `raw` still embeds the whole cached object.
pub fn backend_node(cached: &CachedNode, raw: bool) -> v1::Node {
    let mut view = node(cached, raw);
    view.conditions = Vec::new();
    view
}

/// Builds the CPI view of a cached Service; `raw` also embeds the object as JSON.
pub fn service(svc: &CachedService, raw: bool) -> v1::Service {
    v1::Service {
        metadata: Some(meta(svc.meta())),
        status: Some(load_balancer_status_to_proto(svc.load_balancer())),
        raw_json: if raw {
            serde_json::to_vec(&svc.to_service()).unwrap_or_default()
        } else {
            Vec::new()
        },
        ..k8s_view::service_spec(svc.spec())
    }
}

/// Converts a Kubernetes load-balancer status to its CPI form.
pub fn load_balancer_status_to_proto(status: &core::LoadBalancerStatus) -> v1::LoadBalancerStatus {
    v1::LoadBalancerStatus {
        ingress: status
            .ingress
            .as_deref()
            .unwrap_or_default()
            .iter()
            .map(|i| v1::LoadBalancerIngress {
                ip: i.ip.clone().unwrap_or_default(),
                hostname: i.hostname.clone().unwrap_or_default(),
                ip_mode: i.ip_mode.clone(),
                ports: i
                    .ports
                    .as_deref()
                    .unwrap_or_default()
                    .iter()
                    .map(|p| v1::PortStatus {
                        port: p.port,
                        protocol: p.protocol.clone(),
                        error: p.error.clone(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// Converts the status a shim returned to the one written to the Service: exactly the shim's
/// ingress points (never anything else), with `ipMode` only when the API server stores it
/// (`with_ip_mode`). No ingress is an absent list, as the API server stores it.
pub fn load_balancer_status_from_proto(
    status: &v1::LoadBalancerStatus,
    with_ip_mode: bool,
) -> core::LoadBalancerStatus {
    let ingress: Vec<core::LoadBalancerIngress> = status
        .ingress
        .iter()
        .map(|i| core::LoadBalancerIngress {
            ip: (!i.ip.is_empty()).then(|| i.ip.clone()),
            hostname: (!i.hostname.is_empty()).then(|| i.hostname.clone()),
            ip_mode: if with_ip_mode {
                i.ip_mode.clone()
            } else {
                None
            },
            ports: (!i.ports.is_empty()).then(|| {
                i.ports
                    .iter()
                    .map(|p| core::PortStatus {
                        port: p.port,
                        protocol: p.protocol.clone(),
                        error: p.error.clone(),
                    })
                    .collect()
            }),
        })
        .collect();
    core::LoadBalancerStatus {
        ingress: (!ingress.is_empty()).then_some(ingress),
    }
}

fn pairs(labels: &Labels) -> std::collections::HashMap<String, String> {
    labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Builds the CPI view of object metadata.
pub fn meta(m: &ObjectMeta) -> v1::ObjectMeta {
    k8s_view::object_meta(m)
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

    #[test]
    fn load_balancer_status_keeps_only_the_shims_ingress_and_ip_mode_when_stored() {
        let from_shim = v1::LoadBalancerStatus {
            ingress: vec![v1::LoadBalancerIngress {
                ip: "203.0.113.10".into(),
                hostname: String::new(),
                ip_mode: Some("Proxy".into()),
                ports: vec![v1::PortStatus {
                    port: 80,
                    protocol: "TCP".into(),
                    error: None,
                }],
            }],
        };
        let with = load_balancer_status_from_proto(&from_shim, true);
        let ingress = &with.ingress.as_ref().unwrap()[0];
        assert_eq!(ingress.ip.as_deref(), Some("203.0.113.10"));
        assert_eq!(ingress.hostname, None);
        assert_eq!(ingress.ip_mode.as_deref(), Some("Proxy"));
        assert_eq!(ingress.ports.as_ref().unwrap()[0].port, 80);
        let without = load_balancer_status_from_proto(&from_shim, false);
        assert_eq!(without.ingress.as_ref().unwrap()[0].ip_mode, None);
        let none = load_balancer_status_from_proto(&v1::LoadBalancerStatus::default(), true);
        assert_eq!(none.ingress, None);
        // And back: what the CPI's Service view carries.
        assert_eq!(load_balancer_status_to_proto(&with), from_shim);
    }

    #[test]
    fn service_view_and_backend_nodes() {
        use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
        let mut svc = core::Service::default();
        svc.metadata.name = Some("s".into());
        svc.metadata.namespace = Some("ns".into());
        svc.spec = Some(core::ServiceSpec {
            type_: Some("LoadBalancer".into()),
            ports: Some(vec![core::ServicePort {
                port: 80,
                node_port: Some(30080),
                target_port: Some(IntOrString::String("http".into())),
                ..Default::default()
            }]),
            ..Default::default()
        });
        let view = service(&CachedService::from(svc), false);
        assert_eq!(view.r#type, "LoadBalancer");
        assert_eq!(view.ports[0].protocol, "TCP");
        assert_eq!(view.ports[0].node_port, Some(30080));
        assert_eq!(view.ports[0].target_port_name.as_deref(), Some("http"));
        assert_eq!(view.metadata.unwrap().namespace, "ns");
        let mut n = core::Node::default();
        n.metadata.name = Some("n1".into());
        n.status = Some(core::NodeStatus {
            conditions: Some(vec![core::NodeCondition {
                type_: "Ready".into(),
                status: "False".into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        let backend = backend_node(&CachedNode::from(n), false);
        assert!(backend.conditions.is_empty(), "no readiness reaches a shim");
    }
}
