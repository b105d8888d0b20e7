//! ValidateLoadBalancer: the verdict on a Service's load-balancer settings at admission time,
//! from the very functions EnsureLoadBalancer uses later ([`read_service`] for the Service,
//! [`check_pools`] and [`replacement_wanted`] for the pools), so a Service admitted here is one
//! the load balancer accepts, and one refused here would have failed there.
//!
//! Checked: every field `parse_service` reads (requested address and its family, ports, source
//! ranges in upstream's forms, affinity, traffic policy), the address-pool annotation naming a
//! pool, a requested address inside a pool (the named one if any), a pool with addresses of the
//! Service's family, and protocols the proxy serves (SCTP is refused per port). Not checked:
//! anything that depends on other Services (a taken or held address, a shared port), which
//! EnsureLoadBalancer reports when it happens.

use std::net::IpAddr;

use cpi_proto::CpiError;
use cpi_proto::v1::{Service, ValidateLoadBalancerResponse, Violation};

use super::alloc::{check_pools, replacement_wanted};
use super::pool::Pools;
use super::provider::LocalLoadBalancer;
use super::spec::{FieldViolation, read_service};

/// The verdict on `service` (and, on UPDATE, the stored `old_service`) against `pools`: every
/// refused field with its path from the Service (`spec.ports[1].protocol`) and why; a warning
/// and `requires_replacement` when the change moves the load balancer's address.
pub fn validate_service(
    pools: &Pools,
    service: &Service,
    old_service: Option<&Service>,
) -> ValidateLoadBalancerResponse {
    let reading = read_service("", service);
    let mut violations = reading.violations;
    for (i, port) in service.ports.iter().enumerate() {
        if port.protocol == "SCTP" {
            violations.push(FieldViolation {
                field: format!("service.spec.ports[{i}].protocol"),
                message: format!(
                    "port {} is SCTP; the local load balancer serves TCP and UDP only",
                    port_label(&port.name, port.port)
                ),
            });
        }
    }
    for err in check_pools(pools, &reading.spec, reading.address_read) {
        if let Some(field) = err.field(service) {
            violations.push(FieldViolation {
                field,
                message: err.to_string(),
            });
        }
    }
    let mut response = ValidateLoadBalancerResponse {
        violations: violations.into_iter().map(to_violation).collect(),
        ..Default::default()
    };
    if response.violations.is_empty()
        && let Some(current) = old_service.and_then(current_address)
        && let Some(wanted) = replacement_wanted(pools, &reading.spec, current)
    {
        response.requires_replacement = true;
        response.warnings.push(format!(
            "the load balancer's address {current} is replaced by {wanted}; clients of {current} \
             lose it"
        ));
    }
    response
}

/// `http (80)` for a named port, `80` otherwise.
fn port_label(name: &str, port: i32) -> String {
    if name.is_empty() {
        port.to_string()
    } else {
        format!("{name} ({port})")
    }
}

/// The address the stored Service's load balancer has, from its status.
fn current_address(service: &Service) -> Option<IpAddr> {
    service
        .status
        .as_ref()?
        .ingress
        .iter()
        .find_map(|i| i.ip.parse().ok())
}

/// A violation with its path from the Service, as the webhook reports it.
fn to_violation(v: FieldViolation) -> Violation {
    Violation {
        field: v
            .field
            .strip_prefix("service.")
            .map_or_else(|| v.field.clone(), str::to_string),
        message: v.message,
    }
}

#[tonic::async_trait]
impl shim_framework::LoadBalancerValidation for LocalLoadBalancer {
    async fn validate_load_balancer(
        &self,
        _cluster_name: String,
        service: Service,
        old_service: Option<Service>,
    ) -> Result<ValidateLoadBalancerResponse, CpiError> {
        Ok(validate_service(
            self.pools(),
            &service,
            old_service.as_ref(),
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::path::Path;

    use cpi_proto::v1::{LoadBalancerIngress, LoadBalancerStatus, ObjectMeta, ServicePort};

    use super::*;
    use crate::lb::config::parse_pools;
    use crate::lb::spec::tests::annotate;
    use crate::lb::spec::{IP_ANNOTATION, POOL_ANNOTATION, SOURCE_RANGES_ANNOTATION};

    const POOLS: &str = "pools:\n  - name: blue\n    addresses: [10.0.0.0/24]\n  - name: \
                         green\n    addresses: [10.0.1.10-10.0.1.20]\n    autoAssign: false\n";

    fn pools() -> Pools {
        parse_pools(Path::new("lb.yaml"), POOLS).unwrap()
    }

    /// A Service as admission sees it on CREATE: no UID yet.
    fn service() -> Service {
        Service {
            metadata: Some(ObjectMeta {
                name: "web".into(),
                namespace: "default".into(),
                ..Default::default()
            }),
            r#type: "LoadBalancer".into(),
            ports: vec![
                ServicePort {
                    name: "http".into(),
                    protocol: "TCP".into(),
                    port: 80,
                    ..Default::default()
                },
                ServicePort {
                    name: "dns".into(),
                    protocol: "UDP".into(),
                    port: 53,
                    ..Default::default()
                },
            ],
            ..Default::default()
        }
    }

    fn with(f: impl FnOnce(&mut Service)) -> Service {
        let mut s = service();
        f(&mut s);
        s
    }

    fn fields(response: &ValidateLoadBalancerResponse) -> Vec<&str> {
        response
            .violations
            .iter()
            .map(|v| v.field.as_str())
            .collect()
    }

    #[test]
    fn validation_table() {
        let pool_ann = format!("metadata.annotations[{POOL_ANNOTATION}]");
        let ip_ann = format!("metadata.annotations[{IP_ANNOTATION}]");
        let ranges_ann = format!("metadata.annotations[{SOURCE_RANGES_ANNOTATION}]");
        let cases: Vec<(&str, Service, Vec<String>)> = vec![
            ("good Service", service(), vec![]),
            (
                "named pool exists",
                with(|s| annotate(s, POOL_ANNOTATION, "green")),
                vec![],
            ),
            (
                "address inside the named pool",
                with(|s| {
                    annotate(s, POOL_ANNOTATION, "green");
                    s.load_balancer_ip = Some("10.0.1.15".into());
                }),
                vec![],
            ),
            (
                "unknown pool",
                with(|s| annotate(s, POOL_ANNOTATION, "red")),
                vec![pool_ann.clone()],
            ),
            (
                "unknown pool with an address in another pool reported once",
                with(|s| {
                    annotate(s, POOL_ANNOTATION, "red");
                    s.load_balancer_ip = Some("10.0.0.5".into());
                }),
                vec![pool_ann.clone()],
            ),
            (
                "loadBalancerIP not an address",
                with(|s| s.load_balancer_ip = Some("10.0.0.x".into())),
                vec!["spec.loadBalancerIP".into()],
            ),
            (
                "loadBalancerIP in no pool",
                with(|s| s.load_balancer_ip = Some("192.0.2.1".into())),
                vec!["spec.loadBalancerIP".into()],
            ),
            (
                "annotation address outside the named pool",
                with(|s| {
                    annotate(s, POOL_ANNOTATION, "green");
                    annotate(s, IP_ANNOTATION, "10.0.0.7");
                }),
                vec![ip_ann.clone()],
            ),
            (
                "annotation address of a family the Service does not allow",
                with(|s| {
                    s.ip_families = vec!["IPv4".into()];
                    annotate(s, IP_ANNOTATION, "fd00::1");
                }),
                vec![ip_ann.clone()],
            ),
            (
                "field and annotation disagree",
                with(|s| {
                    s.load_balancer_ip = Some("10.0.0.5".into());
                    annotate(s, IP_ANNOTATION, "10.0.0.6");
                }),
                vec!["spec.loadBalancerIP".into()],
            ),
            (
                "IPv6 Service without an IPv6 pool",
                with(|s| s.ip_families = vec!["IPv6".into()]),
                vec!["spec.ipFamilies".into()],
            ),
            (
                "source ranges: each bad entry",
                with(|s| {
                    s.load_balancer_source_ranges =
                        vec!["10.0.0.0/8".into(), "10.0.0.1".into(), "10.0.0.0/+8".into()];
                }),
                vec![
                    "spec.loadBalancerSourceRanges[1]".into(),
                    "spec.loadBalancerSourceRanges[2]".into(),
                ],
            ),
            (
                "source ranges annotation entry",
                with(|s| annotate(s, SOURCE_RANGES_ANNOTATION, "10.0.0.0/8, ::/129")),
                vec![format!("{ranges_ann}[1]")],
            ),
            (
                "source ranges annotation ignored when the field is set",
                with(|s| {
                    s.load_balancer_source_ranges = vec![" 192.168.0.0/16 ".into()];
                    annotate(s, SOURCE_RANGES_ANNOTATION, "garbage");
                }),
                vec![],
            ),
            (
                "SCTP refused per port",
                with(|s| {
                    s.ports[1].protocol = "SCTP".into();
                    s.ports.push(ServicePort {
                        protocol: "SCTP".into(),
                        port: 9,
                        ..Default::default()
                    });
                }),
                vec![
                    "spec.ports[1].protocol".into(),
                    "spec.ports[2].protocol".into(),
                ],
            ),
            (
                "unknown protocol",
                with(|s| s.ports[0].protocol = "QUIC".into()),
                vec!["spec.ports[0].protocol".into()],
            ),
            (
                "every violation at once",
                with(|s| {
                    annotate(s, POOL_ANNOTATION, "red");
                    s.load_balancer_ip = Some("nope".into());
                    s.load_balancer_source_ranges = vec!["bad".into()];
                    s.ports[0].protocol = "SCTP".into();
                }),
                vec![
                    "spec.loadBalancerIP".into(),
                    "spec.loadBalancerSourceRanges[0]".into(),
                    "spec.ports[0].protocol".into(),
                    pool_ann.clone(),
                ],
            ),
        ];
        let pools = pools();
        for (name, svc, want) in cases {
            let response = validate_service(&pools, &svc, None);
            assert_eq!(fields(&response), want, "{name}: {response:?}");
            assert!(
                response.violations.iter().all(|v| !v.message.is_empty()),
                "{name}"
            );
            assert!(!response.requires_replacement, "{name}");
        }
    }

    #[test]
    fn messages_name_the_value_and_the_pools() {
        let pools = pools();
        let svc = with(|s| {
            annotate(s, POOL_ANNOTATION, "red");
            s.ports[1].protocol = "SCTP".into();
        });
        let messages: Vec<String> = validate_service(&pools, &svc, None)
            .violations
            .into_iter()
            .map(|v| v.message)
            .collect();
        assert_eq!(
            messages,
            vec![
                "port dns (53) is SCTP; the local load balancer serves TCP and UDP only",
                "no pool named \"red\" (pools: blue, green)",
            ]
        );
    }

    /// Validation refuses exactly what allocation refuses, for the configuration-only rules.
    #[test]
    fn agrees_with_ensure() {
        let pools = pools();
        let cases = [
            with(|s| annotate(s, POOL_ANNOTATION, "red")),
            with(|s| s.load_balancer_ip = Some("192.0.2.1".into())),
            with(|s| s.load_balancer_ip = Some("10.0.0.9".into())),
            with(|s| {
                annotate(s, POOL_ANNOTATION, "green");
                s.load_balancer_ip = Some("10.0.0.9".into());
            }),
            with(|s| s.ip_families = vec!["IPv6".into()]),
            service(),
        ];
        for svc in cases {
            let mut owned = svc.clone();
            owned.metadata.as_mut().unwrap().uid = "uid-1".into();
            let spec = crate::lb::spec::parse_service("c1", &owned).unwrap();
            let decided = crate::lb::alloc::decide(&crate::lb::alloc::AllocInput {
                pools: &pools,
                others: &[] as &[&crate::lb::alloc::LbRecord],
                holds: &[],
                spec: &spec,
                current: None,
                allow_replacement: false,
                now_ms: 0,
            });
            let verdict = validate_service(&pools, &svc, None);
            match decided {
                Ok(_) => assert!(verdict.violations.is_empty(), "{verdict:?}"),
                Err(err) => assert_eq!(
                    verdict.violations,
                    vec![Violation {
                        field: err.field(&owned).unwrap().replace("service.", ""),
                        message: err.to_string(),
                    }]
                ),
            }
        }
    }

    #[test]
    fn update_moving_the_address_requires_replacement() {
        let pools = pools();
        let old = with(|s| {
            s.status = Some(LoadBalancerStatus {
                ingress: vec![LoadBalancerIngress {
                    ip: "10.0.0.1".into(),
                    ..Default::default()
                }],
            });
        });
        let same = validate_service(&pools, &old, Some(&old));
        assert!(!same.requires_replacement && same.warnings.is_empty());
        let moved = with(|s| annotate(s, POOL_ANNOTATION, "green"));
        let verdict = validate_service(&pools, &moved, Some(&old));
        assert!(verdict.violations.is_empty(), "{verdict:?}");
        assert!(verdict.requires_replacement);
        assert!(
            verdict.warnings[0].contains("10.0.0.1 is replaced by pool green"),
            "{:?}",
            verdict.warnings
        );
    }
}
