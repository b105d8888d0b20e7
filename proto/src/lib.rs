//! The Cloud Provider Interface (`cloudprovider.v1`) as generated Rust types, plus its error
//! model: [`CpiError`] maps each upstream sentinel error and each safety class onto a gRPC status
//! carrying `google.rpc.ErrorInfo` / `google.rpc.RetryInfo` details, and back.
//!
//! The `.proto` file in `cloudprovider/v1/` is the language-neutral source of truth; read its
//! header for the evolution rules and the error table.

pub mod error;

/// Generated messages, clients and servers of `cloudprovider.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("cloudprovider.v1");
}

pub use error::{CpiError, ERROR_DOMAIN};

/// Label keys and provider-ID helpers shared by every component.
pub mod provider_id {
    /// Splits `"<scheme>://<id>"` into its scheme and ID; `None` for anything else (no scheme,
    /// empty scheme or empty ID), so malformed IDs are rejected per node, never process-wide.
    pub fn split(provider_id: &str) -> Option<(&str, &str)> {
        let (scheme, id) = provider_id.split_once("://")?;
        if scheme.is_empty() || id.is_empty() {
            return None;
        }
        Some((scheme, id))
    }

    /// Builds `"<provider>://<instance-id>"`, the upstream provider-ID convention.
    pub fn join(provider: &str, instance_id: &str) -> String {
        format!("{provider}://{instance_id}")
    }

    /// The ownership rule every component applies: the instance part of `provider_id` when it
    /// belongs to the provider `name` claiming the prefixes `claimed` (none claimed means
    /// `"<name>://"`), with something after the prefix. Empty claimed prefixes own nothing.
    pub fn strip_owned<'a>(
        name: &str,
        claimed: &[String],
        provider_id: &'a str,
    ) -> Option<&'a str> {
        if claimed.is_empty() {
            let (scheme, rest) = split(provider_id)?;
            return (scheme == name).then_some(rest);
        }
        claimed
            .iter()
            .filter(|prefix| !prefix.is_empty())
            .find_map(|prefix| provider_id.strip_prefix(prefix.as_str()))
            .filter(|rest| !rest.is_empty())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn split_accepts_scheme_and_id() {
            assert_eq!(split("local://m-1"), Some(("local", "m-1")));
            assert_eq!(
                split("aws:///us-east-1a/i-1"),
                Some(("aws", "/us-east-1a/i-1"))
            );
        }

        #[test]
        fn split_rejects_malformed_ids() {
            for bad in ["", "local", "local://", "://x", "aws", "local:/x"] {
                assert_eq!(split(bad), None, "{bad:?}");
            }
        }

        #[test]
        fn ownership_by_name_or_claimed_prefixes() {
            let none: &[String] = &[];
            assert_eq!(strip_owned("local", none, "local://m-1"), Some("m-1"));
            assert_eq!(strip_owned("local", none, "local://"), None);
            assert_eq!(strip_owned("local", none, "localhost://x"), None);
            let claimed = [
                "hcloud://".to_string(),
                "hrobot://".to_string(),
                String::new(),
            ];
            assert_eq!(strip_owned("hcloud", &claimed, "hrobot://42"), Some("42"));
            assert_eq!(strip_owned("hcloud", &claimed, "hrobot://"), None);
            assert_eq!(strip_owned("hcloud", &claimed, "talos://x"), None);
        }

        #[test]
        fn join_builds_upstream_form() {
            assert_eq!(join("fake", "12345"), "fake://12345");
        }
    }
}

/// CPI views of Kubernetes objects, shared by every caller that builds them (the
/// controller-manager from its caches, the webhook from objects under admission).
#[cfg(feature = "k8s")]
pub mod k8s_view {
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    use crate::v1;

    /// The CPI view of object metadata.
    pub fn object_meta(m: &ObjectMeta) -> v1::ObjectMeta {
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

    /// A Kubernetes timestamp as a protobuf one.
    pub fn timestamp(time: &Time) -> prost_types::Timestamp {
        let t = time.0;
        prost_types::Timestamp {
            seconds: t.as_second(),
            nanos: t.subsec_nanosecond(),
        }
    }

    /// The CPI view of a Service's spec; the caller adds metadata, status and the raw object.
    pub fn service_spec(spec: &ServiceSpec) -> v1::Service {
        v1::Service {
            r#type: spec.type_.clone().unwrap_or_default(),
            ports: spec
                .ports
                .as_deref()
                .unwrap_or_default()
                .iter()
                .map(service_port)
                .collect(),
            cluster_ips: spec.cluster_ips.clone().unwrap_or_default(),
            external_ips: spec.external_ips.clone().unwrap_or_default(),
            load_balancer_ip: spec.load_balancer_ip.clone(),
            load_balancer_source_ranges: spec
                .load_balancer_source_ranges
                .clone()
                .unwrap_or_default(),
            load_balancer_class: spec.load_balancer_class.clone(),
            external_traffic_policy: spec.external_traffic_policy.clone(),
            internal_traffic_policy: spec.internal_traffic_policy.clone(),
            health_check_node_port: spec.health_check_node_port,
            session_affinity: spec.session_affinity.clone().unwrap_or_default(),
            session_affinity_timeout_seconds: spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds),
            ip_families: spec.ip_families.clone().unwrap_or_default(),
            ip_family_policy: spec.ip_family_policy.clone(),
            allocate_load_balancer_node_ports: spec.allocate_load_balancer_node_ports,
            ..v1::Service::default()
        }
    }

    /// The CPI view of one Service port; a port without a protocol is TCP (the API server's
    /// default).
    pub fn service_port(p: &ServicePort) -> v1::ServicePort {
        let (target_port_number, target_port_name) = match &p.target_port {
            Some(IntOrString::Int(n)) => (Some(*n), None),
            Some(IntOrString::String(s)) => (None, Some(s.clone())),
            None => (None, None),
        };
        v1::ServicePort {
            name: p.name.clone().unwrap_or_default(),
            protocol: p.protocol.clone().unwrap_or_else(|| "TCP".to_string()),
            port: p.port,
            target_port_number,
            target_port_name,
            node_port: p.node_port,
            app_protocol: p.app_protocol.clone(),
        }
    }
}
