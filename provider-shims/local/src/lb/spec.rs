//! What a Service asks of its load balancer, read and validated from the request without IO.
//! Every refusal is `INVALID_OBJECT` naming the offending field.

use std::net::IpAddr;

use cpi_proto::CpiError;
use cpi_proto::v1::{Node, NodeAddressType, Service};
use serde::{Deserialize, Serialize};

use super::pool::{Cidr, Family};

/// Annotation naming the pool a Service's address comes from.
pub const POOL_ANNOTATION: &str = "lb.local-shim/address-pool";
/// Annotation requesting an address (used when `spec.loadBalancerIP` is empty).
pub const IP_ANNOTATION: &str = "lb.local-shim/load-balancer-ip";
/// Annotation letting Services with the same value share one address (on distinct ports).
pub const SHARING_ANNOTATION: &str = "lb.local-shim/allow-shared-ip";
/// Upstream's source-ranges annotation, read when `spec.loadBalancerSourceRanges` is empty.
pub const SOURCE_RANGES_ANNOTATION: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";
/// Default `sessionAffinityConfig.clientIP.timeoutSeconds` (upstream's, three hours).
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: u32 = 10_800;
/// Upstream's upper bound of the affinity timeout (one day).
const MAX_AFFINITY_TIMEOUT_SECONDS: u32 = 86_400;

/// L4 protocol of a Service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP (reported per port as unsupported).
    Sctp,
}

impl Protocol {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }
}

/// One Service port as the load balancer serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSpec {
    /// Protocol.
    pub protocol: Protocol,
    /// Service port: what the listener binds.
    pub port: u16,
    /// Node port: where backends are reached; `None` when the Service has none.
    pub node_port: Option<u16>,
}

/// How backends are health-checked (`externalTrafficPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HealthPolicy {
    /// `Cluster`: kube-proxy's health port, else a TCP connect to the node port.
    Cluster,
    /// `Local`: `/healthz` on `spec.healthCheckNodePort`.
    Local {
        /// The health-check node port.
        port: u16,
    },
}

/// The validated load-balancer part of a Service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbSpec {
    /// Caller's cluster name.
    pub cluster: String,
    /// Service UID.
    pub uid: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Address family of the load balancer's address.
    pub family: Family,
    /// Address asked for (`spec.loadBalancerIP` or the annotation).
    pub requested_ip: Option<IpAddr>,
    /// Pool asked for by annotation.
    pub pool: Option<String>,
    /// Sharing key by annotation.
    pub sharing_key: Option<String>,
    /// Ports in Service order.
    pub ports: Vec<PortSpec>,
    /// Allowed client ranges; empty allows every client.
    pub source_ranges: Vec<Cidr>,
    /// `ClientIP` affinity timeout in seconds; `None` without affinity.
    pub affinity_timeout: Option<u32>,
    /// Health checking.
    pub health: HealthPolicy,
}

impl LbSpec {
    /// `namespace/name`, for messages.
    pub fn service_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// One backend: a node's InternalIP of the load balancer's family.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Backend {
    /// Node name.
    pub node: String,
    /// The node's InternalIP.
    pub ip: IpAddr,
}

/// One refused field of a Service: its path in the request (`service.spec...`) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// Field path, rooted at the request's `service`.
    pub field: String,
    /// Why it is refused.
    pub message: String,
}

impl From<FieldViolation> for CpiError {
    fn from(v: FieldViolation) -> Self {
        CpiError::InvalidObject {
            field: v.field,
            message: v.message,
        }
    }
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> FieldViolation {
    FieldViolation {
        field: field.into(),
        message: message.into(),
    }
}

/// A Service read as far as it could be: every violation, and a spec whose unreadable parts
/// hold defaults (so validation can go on checking what was readable).
#[derive(Debug)]
pub(crate) struct Reading {
    /// The settings; only trustworthy where no violation names the field.
    pub spec: LbSpec,
    /// Whether the requested address and the family were read (pool checks need them).
    pub address_read: bool,
    /// Every refused field, in field order.
    pub violations: Vec<FieldViolation>,
}

/// Reads the load-balancer settings of `service` for `cluster`; the first refused field is the
/// error (validation reports all of them, see [`read_service`]).
pub fn parse_service(cluster: &str, service: &Service) -> Result<LbSpec, CpiError> {
    if cluster.is_empty() {
        return Err(invalid(
            "cluster_name",
            "must not be empty: load balancers are owned by cluster name and Service UID",
        )
        .into());
    }
    if service.metadata.as_ref().is_none_or(|m| m.uid.is_empty()) {
        return Err(invalid(
            "service.metadata.uid",
            "must not be empty: load balancers are owned by cluster name and Service UID",
        )
        .into());
    }
    let reading = read_service(cluster, service);
    match reading.violations.into_iter().next() {
        Some(first) => Err(first.into()),
        None => Ok(reading.spec),
    }
}

/// Reads every load-balancer setting of `service`, collecting each refused field instead of
/// stopping at the first. Ownership (cluster name, UID) is not checked: a Service being admitted
/// may not have its UID yet.
pub(crate) fn read_service(cluster: &str, service: &Service) -> Reading {
    let mut violations = Vec::new();
    let meta = service.metadata.clone().unwrap_or_default();
    let annotation = |key: &str| {
        meta.annotations
            .get(key)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    };
    let address = requested_ip(service, annotation(IP_ANNOTATION)).and_then(|requested| {
        let ip = requested.as_ref().map(|(ip, _)| *ip);
        Ok((ip, family_of(service, requested)?))
    });
    let (requested_ip, family, address_read) = match address {
        Ok((ip, family)) => (ip, family, true),
        Err(v) => {
            violations.push(v);
            (None, Family::V4, false)
        }
    };
    let ports = ports(service, &mut violations);
    let source_ranges = source_ranges(service, &meta.annotations, &mut violations);
    let affinity_timeout = affinity_timeout(service).unwrap_or_else(|v| {
        violations.push(v);
        None
    });
    let health = health(service).unwrap_or_else(|v| {
        violations.push(v);
        HealthPolicy::Cluster
    });
    Reading {
        spec: LbSpec {
            cluster: cluster.to_string(),
            uid: meta.uid.clone(),
            namespace: meta.namespace.clone(),
            name: meta.name.clone(),
            family,
            requested_ip,
            pool: annotation(POOL_ANNOTATION).map(str::to_string),
            sharing_key: annotation(SHARING_ANNOTATION).map(str::to_string),
            ports,
            source_ranges,
            affinity_timeout,
            health,
        },
        address_read,
        violations,
    }
}

/// The address asked for (`spec.loadBalancerIP`, else the annotation) with the field it came
/// from; both set to different values is refused.
fn requested_ip(
    service: &Service,
    ip_annotation: Option<&str>,
) -> Result<Option<(IpAddr, String)>, FieldViolation> {
    let ip_field = service
        .load_balancer_ip
        .as_deref()
        .map(str::trim)
        .filter(|v| !v.is_empty());
    let parse = |field: String, text: &str| {
        text.parse()
            .map(|ip| Some((ip, field.clone())))
            .map_err(|_| invalid(field, format!("{text:?} is not an IP address")))
    };
    match (ip_field, ip_annotation) {
        (Some(f), Some(a)) if f != a => Err(invalid(
            "service.spec.loadBalancerIP",
            format!("{f} differs from annotation {IP_ANNOTATION}={a}; set only one"),
        )),
        (Some(f), _) => parse("service.spec.loadBalancerIP".into(), f),
        (None, Some(a)) => parse(format!("service.metadata.annotations[{IP_ANNOTATION}]"), a),
        (None, None) => Ok(None),
    }
}

/// The ports in Service order; a refused port is reported and left out.
fn ports(service: &Service, violations: &mut Vec<FieldViolation>) -> Vec<PortSpec> {
    let mut ports: Vec<PortSpec> = Vec::with_capacity(service.ports.len());
    for (i, port) in service.ports.iter().enumerate() {
        let read = || -> Result<PortSpec, FieldViolation> {
            let protocol = match port.protocol.as_str() {
                "" | "TCP" => Protocol::Tcp,
                "UDP" => Protocol::Udp,
                "SCTP" => Protocol::Sctp,
                other => {
                    return Err(invalid(
                        format!("service.spec.ports[{i}].protocol"),
                        format!("{other:?} is not one of TCP, UDP, SCTP"),
                    ));
                }
            };
            let number = |value: i32, field: &str| -> Result<u16, FieldViolation> {
                u16::try_from(value)
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| {
                        invalid(
                            format!("service.spec.ports[{i}].{field}"),
                            format!("{value} is not a port number (1-65535)"),
                        )
                    })
            };
            Ok(PortSpec {
                protocol,
                port: number(port.port, "port")?,
                node_port: port
                    .node_port
                    .filter(|p| *p != 0)
                    .map(|p| number(p, "nodePort"))
                    .transpose()?,
            })
        };
        match read() {
            Ok(spec)
                if ports
                    .iter()
                    .any(|p| p.protocol == spec.protocol && p.port == spec.port) =>
            {
                violations.push(invalid(
                    format!("service.spec.ports[{i}]"),
                    format!("{}/{} is listed twice", spec.port, spec.protocol.as_str()),
                ));
            }
            Ok(spec) => ports.push(spec),
            Err(v) => violations.push(v),
        }
    }
    ports
}

/// `ClientIP` affinity's timeout (upstream's default and bound); `None` without affinity.
fn affinity_timeout(service: &Service) -> Result<Option<u32>, FieldViolation> {
    match service.session_affinity.as_str() {
        "" | "None" => Ok(None),
        "ClientIP" => {
            let raw = service
                .session_affinity_timeout_seconds
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_SECONDS as i32);
            u32::try_from(raw)
                .ok()
                .filter(|t| (1..=MAX_AFFINITY_TIMEOUT_SECONDS).contains(t))
                .map(Some)
                .ok_or_else(|| {
                    invalid(
                        "service.spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!("{raw} is not in 1..={MAX_AFFINITY_TIMEOUT_SECONDS}"),
                    )
                })
        }
        other => Err(invalid(
            "service.spec.sessionAffinity",
            format!("{other:?} is not one of None, ClientIP"),
        )),
    }
}

/// How backends are checked, from `externalTrafficPolicy`.
fn health(service: &Service) -> Result<HealthPolicy, FieldViolation> {
    match service.external_traffic_policy.as_deref() {
        None | Some("") | Some("Cluster") => Ok(HealthPolicy::Cluster),
        Some("Local") => {
            let raw = service.health_check_node_port.unwrap_or(0);
            let port = u16::try_from(raw).ok().filter(|p| *p != 0).ok_or_else(|| {
                invalid(
                    "service.spec.healthCheckNodePort",
                    format!(
                        "{raw} is not a port number; externalTrafficPolicy Local needs the \
                         health-check node port kube-proxy serves"
                    ),
                )
            })?;
            Ok(HealthPolicy::Local { port })
        }
        Some(other) => Err(invalid(
            "service.spec.externalTrafficPolicy",
            format!("{other:?} is not one of Cluster, Local"),
        )),
    }
}

/// The family of the requested address (refused when the Service's `ipFamilies` do not allow
/// it, naming the field the address came from), else of the first `spec.ipFamilies` entry
/// (IPv4 when the caller sent none).
fn family_of(
    service: &Service,
    requested: Option<(IpAddr, String)>,
) -> Result<Family, FieldViolation> {
    let primary = match service.ip_families.first().map(String::as_str) {
        None | Some("") | Some("IPv4") => Family::V4,
        Some("IPv6") => Family::V6,
        Some(other) => {
            return Err(invalid(
                "service.spec.ipFamilies[0]",
                format!("{other:?} is not one of IPv4, IPv6"),
            ));
        }
    };
    match requested {
        Some((ip, field)) => {
            let family = Family::of(ip);
            if !service.ip_families.is_empty()
                && !service.ip_families.iter().any(|f| f == &family.to_string())
            {
                return Err(invalid(
                    field,
                    format!("{ip} is {family}, not one of the Service's ipFamilies"),
                ));
            }
            Ok(family)
        }
        None => Ok(primary),
    }
}

/// Upstream's `GetLoadBalancerSourceRanges`: the field when it is set, else the annotation
/// (comma-separated); entries are trimmed; nothing at all allows every client. Every entry that
/// is no CIDR is reported; the others are kept.
fn source_ranges(
    service: &Service,
    annotations: &std::collections::HashMap<String, String>,
    violations: &mut Vec<FieldViolation>,
) -> Vec<Cidr> {
    let mut parse = |field: String, text: &str| match Cidr::parse(text.trim()) {
        Ok(cidr) => Some(cidr),
        Err(message) => {
            violations.push(invalid(
                field,
                format!("{message}; expecting IP ranges such as 10.0.0.0/24"),
            ));
            None
        }
    };
    if !service.load_balancer_source_ranges.is_empty() {
        return service
            .load_balancer_source_ranges
            .iter()
            .enumerate()
            .filter_map(|(i, s)| parse(format!("service.spec.loadBalancerSourceRanges[{i}]"), s))
            .collect();
    }
    let Some(value) = annotations
        .get(SOURCE_RANGES_ANNOTATION)
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
    else {
        return Vec::new();
    };
    value
        .split(',')
        .enumerate()
        .filter_map(|(i, s)| {
            parse(
                format!("service.metadata.annotations[{SOURCE_RANGES_ANNOTATION}][{i}]"),
                s,
            )
        })
        .collect()
}

/// Whether `client` may use a load balancer allowing `ranges` (empty: everyone).
pub fn source_allowed(ranges: &[Cidr], client: IpAddr) -> bool {
    let client = match client {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(client, IpAddr::V4),
        v4 => v4,
    };
    ranges.is_empty() || ranges.iter().any(|r| r.contains(client))
}

/// The backends of `nodes` for a load balancer of `family`: each node's first InternalIP of
/// that family; nodes without one are left out (they cannot be reached in that family).
pub fn backends(nodes: &[Node], family: Family) -> Vec<Backend> {
    let mut out: Vec<Backend> = nodes
        .iter()
        .filter_map(|node| {
            let ip = node
                .addresses
                .iter()
                .filter(|a| a.r#type == NodeAddressType::InternalIp as i32)
                .filter_map(|a| a.address.parse::<IpAddr>().ok())
                .find(|ip| Family::of(*ip) == family)?;
            Some(Backend {
                node: shim_framework::node_name(node).to_string(),
                ip,
            })
        })
        .collect();
    // Sorted, so an unchanged node set is an unchanged record whatever the caller's order.
    out.sort_by(|a, b| a.node.cmp(&b.node).then(a.ip.cmp(&b.ip)));
    out.dedup();
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod tests {
    use super::*;
    use cpi_proto::v1::{NodeAddress, ObjectMeta, ServicePort};

    fn service() -> Service {
        Service {
            metadata: Some(ObjectMeta {
                name: "web".into(),
                namespace: "default".into(),
                uid: "uid-1".into(),
                ..Default::default()
            }),
            r#type: "LoadBalancer".into(),
            ports: vec![ServicePort {
                protocol: "TCP".into(),
                port: 80,
                node_port: Some(30080),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn with(f: impl FnOnce(&mut Service)) -> Service {
        let mut s = service();
        f(&mut s);
        s
    }

    /// Sets annotation `k` of `s` (shared with the validation tests).
    pub(crate) fn annotate(s: &mut Service, k: &str, v: &str) {
        s.metadata
            .as_mut()
            .unwrap()
            .annotations
            .insert(k.into(), v.into());
    }

    fn field(err: CpiError) -> String {
        match err {
            CpiError::InvalidObject { field, .. } => field,
            other => panic!("not InvalidObject: {other:?}"),
        }
    }

    #[test]
    fn invalid_fields_are_named() {
        let cases: Vec<(&str, Service, &str)> = vec![
            (
                "no uid",
                with(|s| s.metadata.as_mut().unwrap().uid.clear()),
                "service.metadata.uid",
            ),
            (
                "bad source range",
                with(|s| s.load_balancer_source_ranges = vec!["10.0.0.0/8".into(), "nope".into()]),
                "service.spec.loadBalancerSourceRanges[1]",
            ),
            (
                "bad annotation range",
                with(|s| annotate(s, SOURCE_RANGES_ANNOTATION, "10.0.0.0/8, 1.2.3.4/99")),
                "service.metadata.annotations[service.beta.kubernetes.io/load-balancer-source-ranges][1]",
            ),
            (
                "bad loadBalancerIP",
                with(|s| s.load_balancer_ip = Some("10.0.0.x".into())),
                "service.spec.loadBalancerIP",
            ),
            (
                "bad protocol",
                with(|s| s.ports[0].protocol = "QUIC".into()),
                "service.spec.ports[0].protocol",
            ),
            (
                "Local without health port",
                with(|s| s.external_traffic_policy = Some("Local".into())),
                "service.spec.healthCheckNodePort",
            ),
            (
                "affinity timeout too long",
                with(|s| {
                    s.session_affinity = "ClientIP".into();
                    s.session_affinity_timeout_seconds = Some(86_401);
                }),
                "service.spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            ),
            (
                "duplicate port",
                with(|s| s.ports.push(s.ports[0].clone())),
                "service.spec.ports[1]",
            ),
            (
                "requested v6 on a v4-only Service",
                with(|s| {
                    s.ip_families = vec!["IPv4".into()];
                    s.load_balancer_ip = Some("fd00::1".into());
                }),
                "service.spec.loadBalancerIP",
            ),
        ];
        for (name, svc, want) in cases {
            assert_eq!(
                field(parse_service("c1", &svc).unwrap_err()),
                want,
                "{name}"
            );
        }
        assert_eq!(
            field(parse_service("", &service()).unwrap_err()),
            "cluster_name"
        );
    }

    #[test]
    fn source_ranges_follow_upstream_helper() {
        // Field wins over the annotation; the annotation is comma-separated and trimmed.
        let both = with(|s| {
            s.load_balancer_source_ranges = vec![" 10.0.0.0/8 ".into()];
            annotate(s, SOURCE_RANGES_ANNOTATION, "192.168.0.0/16");
        });
        let spec = parse_service("c1", &both).unwrap();
        assert_eq!(spec.source_ranges, vec![Cidr::parse("10.0.0.0/8").unwrap()]);
        let annotation =
            with(|s| annotate(s, SOURCE_RANGES_ANNOTATION, " 10.0.0.0/8 ,  127.0.0.1/32 "));
        assert_eq!(
            parse_service("c1", &annotation)
                .unwrap()
                .source_ranges
                .len(),
            2
        );
        assert!(
            parse_service("c1", &service())
                .unwrap()
                .source_ranges
                .is_empty()
        );
    }

    #[test]
    fn source_allowed_cases() {
        let ranges = vec![Cidr::parse("127.0.0.0/24").unwrap()];
        let cases: &[(&str, &[Cidr], &str, bool)] = &[
            ("no ranges allow all", &[], "203.0.113.9", true),
            ("inside", &ranges, "127.0.0.5", true),
            ("outside", &ranges, "127.0.1.5", false),
            ("v4-mapped v6 client", &ranges, "::ffff:127.0.0.5", true),
            ("other family", &ranges, "::1", false),
        ];
        for (name, ranges, client, want) in cases {
            assert_eq!(
                source_allowed(ranges, client.parse().unwrap()),
                *want,
                "{name}"
            );
        }
    }

    #[test]
    fn defaults_and_policies() {
        let spec = parse_service("c1", &service()).unwrap();
        assert_eq!(spec.family, Family::V4);
        assert_eq!(spec.affinity_timeout, None);
        assert_eq!(spec.health, HealthPolicy::Cluster);
        let sticky = with(|s| s.session_affinity = "ClientIP".into());
        assert_eq!(
            parse_service("c1", &sticky).unwrap().affinity_timeout,
            Some(DEFAULT_AFFINITY_TIMEOUT_SECONDS)
        );
        let local = with(|s| {
            s.external_traffic_policy = Some("Local".into());
            s.health_check_node_port = Some(32000);
            s.ip_families = vec!["IPv6".into()];
        });
        let spec = parse_service("c1", &local).unwrap();
        assert_eq!(spec.health, HealthPolicy::Local { port: 32000 });
        assert_eq!(spec.family, Family::V6);
        let annotated = with(|s| {
            annotate(s, IP_ANNOTATION, "127.0.100.9");
            annotate(s, POOL_ANNOTATION, "blue");
        });
        let spec = parse_service("c1", &annotated).unwrap();
        assert_eq!(spec.requested_ip, Some("127.0.100.9".parse().unwrap()));
        assert_eq!(spec.pool.as_deref(), Some("blue"));
    }

    #[test]
    fn backends_pick_the_family_and_sort() {
        let node = |name: &str, addrs: &[(NodeAddressType, &str)]| Node {
            metadata: Some(ObjectMeta {
                name: name.into(),
                ..Default::default()
            }),
            addresses: addrs
                .iter()
                .map(|(t, a)| NodeAddress {
                    r#type: *t as i32,
                    address: a.to_string(),
                })
                .collect(),
            ..Default::default()
        };
        let nodes = vec![
            node("b", &[(NodeAddressType::InternalIp, "10.0.0.2")]),
            node(
                "a",
                &[
                    (NodeAddressType::ExternalIp, "203.0.113.1"),
                    (NodeAddressType::InternalIp, "fd00::1"),
                    (NodeAddressType::InternalIp, "10.0.0.1"),
                ],
            ),
            node("c", &[(NodeAddressType::Hostname, "c")]),
        ];
        let v4 = backends(&nodes, Family::V4);
        assert_eq!(
            v4.iter()
                .map(|b| (b.node.as_str(), b.ip.to_string()))
                .collect::<Vec<_>>(),
            vec![("a", "10.0.0.1".to_string()), ("b", "10.0.0.2".to_string())]
        );
        let v6 = backends(&nodes, Family::V6);
        assert_eq!(v6.len(), 1);
    }
}
