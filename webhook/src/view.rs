//! The CPI views of the objects under admission. The controller-manager has its own
//! conversions of cached objects (`cloud::convert`); these read objects as the API server is
//! about to store them, which have no status or timestamps worth sending.

use cpi_proto::v1 as pb;
use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// The CPI view of an object's metadata (no timestamps: a CREATE has none yet, and the
/// provider judges settings, not history).
pub(crate) fn meta(m: &ObjectMeta) -> pb::ObjectMeta {
    pb::ObjectMeta {
        name: m.name.clone().unwrap_or_default(),
        namespace: m.namespace.clone().unwrap_or_default(),
        uid: m.uid.clone().unwrap_or_default(),
        resource_version: m.resource_version.clone().unwrap_or_default(),
        generation: m.generation.unwrap_or_default(),
        labels: m.labels.clone().unwrap_or_default().into_iter().collect(),
        annotations: m
            .annotations
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect(),
        finalizers: m.finalizers.clone().unwrap_or_default(),
        ..pb::ObjectMeta::default()
    }
}

/// The CPI view of a Service under admission; `raw` embeds it as JSON.
pub(crate) fn service_view(service: &Service, raw: bool) -> pb::Service {
    let spec = service.spec.clone().unwrap_or_default();
    pb::Service {
        metadata: Some(meta(&service.metadata)),
        r#type: spec.type_.unwrap_or_default(),
        ports: spec
            .ports
            .unwrap_or_default()
            .iter()
            .map(port_view)
            .collect(),
        cluster_ips: spec.cluster_ips.unwrap_or_default(),
        external_ips: spec.external_ips.unwrap_or_default(),
        load_balancer_ip: spec.load_balancer_ip,
        load_balancer_source_ranges: spec.load_balancer_source_ranges.unwrap_or_default(),
        load_balancer_class: spec.load_balancer_class,
        external_traffic_policy: spec.external_traffic_policy,
        internal_traffic_policy: spec.internal_traffic_policy,
        health_check_node_port: spec.health_check_node_port,
        session_affinity: spec.session_affinity.unwrap_or_default(),
        session_affinity_timeout_seconds: spec
            .session_affinity_config
            .and_then(|c| c.client_ip)
            .and_then(|c| c.timeout_seconds),
        ip_families: spec.ip_families.unwrap_or_default(),
        ip_family_policy: spec.ip_family_policy,
        allocate_load_balancer_node_ports: spec.allocate_load_balancer_node_ports,
        status: None,
        raw_json: if raw {
            serde_json::to_vec(service).unwrap_or_default()
        } else {
            Vec::new()
        },
    }
}

fn port_view(p: &ServicePort) -> pb::ServicePort {
    let (target_port_number, target_port_name) = match &p.target_port {
        Some(IntOrString::Int(n)) => (Some(*n), None),
        Some(IntOrString::String(s)) => (None, Some(s.clone())),
        None => (None, None),
    };
    pb::ServicePort {
        name: p.name.clone().unwrap_or_default(),
        // The API server defaults the protocol before admission; TCP if it did not.
        protocol: p.protocol.clone().unwrap_or_else(|| "TCP".to_string()),
        port: p.port,
        target_port_number,
        target_port_name,
        node_port: p.node_port,
        app_protocol: p.app_protocol.clone(),
    }
}
