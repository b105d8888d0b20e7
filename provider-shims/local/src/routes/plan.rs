//! Pure route decisions: the next hop of a route, what CreateRoute and DeleteRoute do given the
//! records and the kernel table, what start-up repairs, and how a table reads in ListRoutes.

use std::collections::BTreeMap;
use std::net::IpAddr;

use cpi_proto::v1 as pb;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// What the state database keeps about a route the shim made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteRecord {
    /// Target node name.
    pub target_node: String,
    /// The node's addresses as CreateRoute sent them, `(type, address)`.
    pub node_addresses: Vec<(i32, String)>,
    /// CreateRoute's name hint (the Node UID upstream).
    pub name_hint: String,
    /// Next hop programmed.
    pub gateway: IpAddr,
    /// When the route was first recorded, seconds since the Unix epoch.
    pub created_unix: u64,
}

/// A recorded route and the cluster it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owned {
    /// `--cluster-name` of the caller that created it.
    pub cluster: String,
    /// The record.
    pub record: RouteRecord,
}

/// Every recorded route, by destination (a destination belongs to at most one cluster).
pub type Records = BTreeMap<IpNet, Owned>;

/// One route of the programmed table, as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelRoute {
    /// Destination prefix.
    pub destination: IpNet,
    /// Next hop, if any (connected and blackhole routes have none).
    pub gateway: Option<IpAddr>,
    /// Protocol marker.
    pub protocol: u8,
    /// Whether the route drops traffic (blackhole, unreachable, prohibit).
    pub blackhole: bool,
}

/// A request the shim refuses, before anything is changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// A request field is unusable.
    #[error("invalid {field}: {message}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        message: String,
    },
    /// The destination holds a route the caller does not own.
    #[error("{0}")]
    NotOwned(String),
}

impl From<PlanError> for cpi_proto::CpiError {
    fn from(err: PlanError) -> Self {
        match err {
            PlanError::Invalid { field, message } => Self::InvalidObject {
                field: field.into(),
                message,
            },
            PlanError::NotOwned(message) => Self::NotOwned(message),
        }
    }
}

/// Parses `route.destination_cidr`, normalised to its network (`10.0.1.5/24` is refused: a
/// pod CIDR is a network).
pub fn parse_destination(cidr: &str) -> Result<IpNet, PlanError> {
    let invalid = |message: String| PlanError::Invalid {
        field: "route.destination_cidr",
        message,
    };
    let net: IpNet = cidr
        .parse()
        .map_err(|_| invalid(format!("{cidr:?} is not a CIDR")))?;
    if net.trunc() != net {
        return Err(invalid(format!(
            "{cidr:?} has host bits set (the network is {})",
            net.trunc()
        )));
    }
    Ok(net)
}

fn family(net: &IpNet) -> &'static str {
    match net {
        IpNet::V4(_) => "IPv4",
        IpNet::V6(_) => "IPv6",
    }
}

/// The next hop of `destination` for `node`: its first InternalIP of the destination's family.
///
/// ExternalIPs are never used: on the clouds and networks that have them they are often
/// translated (NAT, elastic addresses) and not on the node's interface, so a route through
/// one would silently black-hole pod traffic. A node without an InternalIP of the family needs
/// one added (or the route made by another means).
pub fn choose_gateway(
    node: &str,
    destination: &IpNet,
    addresses: &[pb::NodeAddress],
) -> Result<IpAddr, PlanError> {
    let want_v4 = matches!(destination, IpNet::V4(_));
    addresses
        .iter()
        .filter(|a| a.r#type == pb::NodeAddressType::InternalIp as i32)
        .filter_map(|a| a.address.parse::<IpAddr>().ok())
        .find(|ip| ip.is_ipv4() == want_v4 && !ip.is_unspecified() && !ip.is_multicast())
        .ok_or_else(|| PlanError::Invalid {
            field: "route.target_node_addresses",
            message: format!(
                "node {node:?} has no {} InternalIP to route {destination} through (addresses \
                 sent: {})",
                family(destination),
                describe(addresses)
            ),
        })
}

fn describe(addresses: &[pb::NodeAddress]) -> String {
    if addresses.is_empty() {
        return "none".into();
    }
    addresses
        .iter()
        .map(|a| {
            let kind = pb::NodeAddressType::try_from(a.r#type)
                .map(|t| t.as_str_name().to_string())
                .unwrap_or_else(|_| a.r#type.to_string());
            format!("{kind} {}", a.address)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// What CreateRoute does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatePlan {
    /// Write the new record (before programming).
    pub write_record: bool,
    /// Add or replace the kernel route.
    pub program: bool,
}

impl CreatePlan {
    /// Nothing to do: the route exists as asked.
    pub fn is_noop(&self) -> bool {
        !self.write_record && !self.program
    }
}

/// Our route at `destination` in `kernel`, if any.
pub fn ours_at<'a>(
    kernel: &'a [KernelRoute],
    destination: &IpNet,
    protocol: u8,
) -> Option<&'a KernelRoute> {
    kernel
        .iter()
        .find(|r| r.destination == *destination && r.protocol == protocol)
}

fn foreign_at<'a>(
    kernel: &'a [KernelRoute],
    destination: &IpNet,
    protocol: u8,
) -> Option<&'a KernelRoute> {
    kernel
        .iter()
        .find(|r| r.destination == *destination && r.protocol != protocol)
}

fn other_cluster(
    owned: Option<&Owned>,
    cluster: &str,
    destination: &IpNet,
) -> Result<(), PlanError> {
    match owned {
        Some(owned) if owned.cluster != cluster => Err(PlanError::NotOwned(format!(
            "route {destination} belongs to cluster {:?}, not {cluster:?}",
            owned.cluster
        ))),
        _ => Ok(()),
    }
}

/// CreateRoute for `cluster`: the same route already in place is success, another next hop of
/// ours is replaced, a destination held by another protocol or cluster is refused.
pub fn plan_create(
    cluster: &str,
    destination: &IpNet,
    wanted: &RouteRecord,
    recorded: Option<&Owned>,
    kernel: &[KernelRoute],
    protocol: u8,
) -> Result<CreatePlan, PlanError> {
    if let Some(foreign) = foreign_at(kernel, destination, protocol) {
        return Err(PlanError::NotOwned(format!(
            "{destination} is already routed by protocol {} (not made by local-shim); refusing \
             to add a second route for it",
            foreign.protocol
        )));
    }
    other_cluster(recorded, cluster, destination)?;
    let same_record = recorded.is_some_and(|owned| {
        owned.record.target_node == wanted.target_node
            && owned.record.gateway == wanted.gateway
            && owned.record.node_addresses == wanted.node_addresses
            && owned.record.name_hint == wanted.name_hint
    });
    let in_kernel = ours_at(kernel, destination, protocol)
        .is_some_and(|r| r.gateway == Some(wanted.gateway) && !r.blackhole);
    Ok(CreatePlan {
        write_record: !same_record,
        program: !in_kernel,
    })
}

/// What DeleteRoute does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeletePlan {
    /// Remove the record (first: a crash after it leaves an unrecorded route of ours, which
    /// ListRoutes reports for the controller to remove, never a route that comes back).
    pub forget_record: bool,
    /// Remove the kernel route of our protocol.
    pub unprogram: bool,
}

/// DeleteRoute for `cluster`: absent is success, a route of another protocol or cluster is
/// refused.
pub fn plan_delete(
    cluster: &str,
    destination: &IpNet,
    recorded: Option<&Owned>,
    kernel: &[KernelRoute],
    protocol: u8,
) -> Result<DeletePlan, PlanError> {
    other_cluster(recorded, cluster, destination)?;
    let ours = ours_at(kernel, destination, protocol).is_some();
    if !ours && let Some(foreign) = foreign_at(kernel, destination, protocol) {
        return Err(PlanError::NotOwned(format!(
            "route {destination} was made by protocol {}, not by local-shim (protocol \
             {protocol}); it is never deleted",
            foreign.protocol
        )));
    }
    Ok(DeletePlan {
        forget_record: recorded.is_some(),
        unprogram: ours,
    })
}

/// A repair made at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupAction {
    /// A recorded route missing from the table: add it.
    Add {
        /// Destination.
        destination: IpNet,
        /// Recorded next hop.
        gateway: IpAddr,
    },
    /// A recorded route whose kernel next hop differs: program the record's.
    Reprogram {
        /// Destination.
        destination: IpNet,
        /// Recorded next hop.
        gateway: IpAddr,
    },
}

/// The start-up reconciliation of the records with the table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StartupPlan {
    /// Repairs, by destination.
    pub actions: Vec<StartupAction>,
    /// Recorded routes found as recorded.
    pub in_place: usize,
    /// Routes of ours with no record, left for the controller.
    pub unrecorded: usize,
    /// Recorded destinations now held by a route of another protocol, left alone.
    pub blocked: Vec<IpNet>,
}

/// Compares the records with the table at start-up; foreign routes are never touched.
pub fn plan_startup(records: &Records, kernel: &[KernelRoute], protocol: u8) -> StartupPlan {
    let mut plan = StartupPlan::default();
    for (destination, owned) in records {
        let gateway = owned.record.gateway;
        match ours_at(kernel, destination, protocol) {
            Some(route) if route.gateway == Some(gateway) && !route.blackhole => plan.in_place += 1,
            Some(_) => plan.actions.push(StartupAction::Reprogram {
                destination: *destination,
                gateway,
            }),
            None if foreign_at(kernel, destination, protocol).is_some() => {
                plan.blocked.push(*destination)
            }
            None => plan.actions.push(StartupAction::Add {
                destination: *destination,
                gateway,
            }),
        }
    }
    plan.unrecorded = kernel
        .iter()
        .filter(|r| r.protocol == protocol && !records.contains_key(&r.destination))
        .count();
    plan
}

/// The table as `cluster` sees it in ListRoutes, one route per destination in destination
/// order: ours with their record (owned, target node, the recorded addresses while the kernel
/// next hop is the recorded one), ours without a record (owned, no target, so the controller
/// may remove it), and the others (not owned, no target, never a blackhole).
pub fn view(
    cluster: &str,
    records: &Records,
    kernel: &[KernelRoute],
    protocol: u8,
) -> Vec<(IpNet, pb::Route)> {
    let mut by_destination: BTreeMap<IpNet, &KernelRoute> = BTreeMap::new();
    for route in kernel {
        // One route per destination: ours wins over another protocol's at the same prefix.
        let slot = by_destination.entry(route.destination).or_insert(route);
        if slot.protocol != protocol && route.protocol == protocol {
            *slot = route;
        }
    }
    by_destination
        .into_iter()
        .map(|(destination, route)| {
            let listed = if route.protocol != protocol {
                foreign_view(&destination)
            } else {
                match records.get(&destination) {
                    Some(owned) if owned.cluster != cluster => pb::Route {
                        destination_cidr: destination.to_string(),
                        ownership: Some(pb::Ownership {
                            owned: false,
                            cluster_id: Some(owned.cluster.clone()),
                            object_uid: None,
                        }),
                        ..Default::default()
                    },
                    Some(owned) => owned_view(cluster, &destination, owned, route),
                    None => pb::Route {
                        destination_cidr: destination.to_string(),
                        blackhole: route.blackhole,
                        ownership: Some(pb::Ownership {
                            owned: true,
                            cluster_id: None,
                            object_uid: None,
                        }),
                        ..Default::default()
                    },
                }
            };
            (destination, listed)
        })
        .collect()
}

fn foreign_view(destination: &IpNet) -> pb::Route {
    pb::Route {
        destination_cidr: destination.to_string(),
        ownership: Some(pb::Ownership {
            owned: false,
            cluster_id: None,
            object_uid: None,
        }),
        ..Default::default()
    }
}

fn owned_view(cluster: &str, destination: &IpNet, owned: &Owned, route: &KernelRoute) -> pb::Route {
    let record = &owned.record;
    // A next hop changed behind the shim's back reads as that address only, so the
    // controller sees the node's addresses differ and re-creates the route.
    let target_node_addresses = if route.gateway == Some(record.gateway) {
        record
            .node_addresses
            .iter()
            .map(|(kind, address)| pb::NodeAddress {
                r#type: *kind,
                address: address.clone(),
            })
            .collect()
    } else {
        route
            .gateway
            .map(|gateway| pb::NodeAddress {
                r#type: pb::NodeAddressType::InternalIp as i32,
                address: gateway.to_string(),
            })
            .into_iter()
            .collect()
    };
    pb::Route {
        name: record.name_hint.clone(),
        target_node: record.target_node.clone(),
        enable_node_addresses: true,
        target_node_addresses,
        destination_cidr: destination.to_string(),
        blackhole: route.blackhole,
        ownership: Some(pb::Ownership {
            owned: true,
            cluster_id: Some(cluster.to_string()),
            object_uid: None,
        }),
    }
}

/// The table `state-only` mode reports: every record as a route of ours with its next hop.
pub fn recorded_table(records: &Records, protocol: u8) -> Vec<KernelRoute> {
    records
        .iter()
        .map(|(destination, owned)| KernelRoute {
            destination: *destination,
            gateway: Some(owned.record.gateway),
            protocol,
            blackhole: false,
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(super) mod tests {
    use super::*;

    /// The shim's protocol in the tests.
    pub(in crate::routes) const OURS: u8 = 108;
    /// `static`, another protocol.
    pub(in crate::routes) const STATIC: u8 = 4;

    /// Parses a CIDR.
    pub(in crate::routes) fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn addr(kind: pb::NodeAddressType, address: &str) -> pb::NodeAddress {
        pb::NodeAddress {
            r#type: kind as i32,
            address: address.into(),
        }
    }

    fn record(node: &str, gateway: &str) -> RouteRecord {
        RouteRecord {
            target_node: node.into(),
            node_addresses: vec![(pb::NodeAddressType::InternalIp as i32, gateway.into())],
            name_hint: format!("uid-{node}"),
            gateway: ip(gateway),
            created_unix: 1,
        }
    }

    fn owned(cluster: &str, node: &str, gateway: &str) -> Owned {
        Owned {
            cluster: cluster.into(),
            record: record(node, gateway),
        }
    }

    /// Records of `(destination, cluster, node, gateway)`.
    fn records_of(rows: &[(&str, &str, &str, &str)]) -> Records {
        rows.iter()
            .map(|(dst, cluster, node, gateway)| (net(dst), owned(cluster, node, gateway)))
            .collect()
    }

    /// A kernel route at `dst` through `gateway`.
    pub(in crate::routes) fn kroute(dst: &str, gateway: Option<&str>, protocol: u8) -> KernelRoute {
        KernelRoute {
            destination: net(dst),
            gateway: gateway.map(ip),
            protocol,
            blackhole: false,
        }
    }

    #[test]
    fn destinations_must_be_networks() {
        assert_eq!(
            parse_destination("10.244.1.0/24").unwrap(),
            net("10.244.1.0/24")
        );
        assert_eq!(
            parse_destination("fd00:1::/64").unwrap(),
            net("fd00:1::/64")
        );
        let err = parse_destination("10.244.1.5/24").unwrap_err().to_string();
        assert!(
            err.contains("host bits") && err.contains("10.244.1.0/24"),
            "{err}"
        );
        let err = parse_destination("banana").unwrap_err().to_string();
        assert!(err.contains("route.destination_cidr"), "{err}");
    }

    #[test]
    fn gateway_is_the_internal_ip_of_the_same_family() {
        use pb::NodeAddressType::*;
        let addresses = [
            addr(Hostname, "n1"),
            addr(ExternalIp, "203.0.113.7"),
            addr(InternalIp, "fd00::7"),
            addr(InternalIp, "10.99.0.7"),
        ];
        assert_eq!(
            choose_gateway("n1", &net("10.244.1.0/24"), &addresses).unwrap(),
            ip("10.99.0.7")
        );
        assert_eq!(
            choose_gateway("n1", &net("fd10:1::/64"), &addresses).unwrap(),
            ip("fd00::7")
        );
    }

    #[test]
    fn no_internal_ip_of_the_family_names_node_and_family() {
        use pb::NodeAddressType::*;
        let addresses = [
            addr(ExternalIp, "2001:db8::7"),
            addr(InternalIp, "10.99.0.7"),
        ];
        let err = choose_gateway("n1", &net("fd10:1::/64"), &addresses).unwrap_err();
        let PlanError::Invalid { field, message } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(*field, "route.target_node_addresses");
        assert!(
            message.contains("\"n1\"") && message.contains("IPv6"),
            "{message}"
        );
        assert!(message.contains("EXTERNAL_IP 2001:db8::7"), "{message}");
        let err = choose_gateway("n2", &net("10.244.0.0/24"), &[]).unwrap_err();
        assert!(err.to_string().contains("none"), "{err}");
    }

    #[test]
    fn create_same_target_is_a_noop() {
        let dst = net("10.244.1.0/24");
        let have = owned("c1", "n1", "10.99.0.1");
        let kernel = [kroute("10.244.1.0/24", Some("10.99.0.1"), OURS)];
        let plan = plan_create("c1", &dst, &have.record, Some(&have), &kernel, OURS).unwrap();
        assert!(plan.is_noop(), "{plan:?}");
    }

    #[test]
    fn create_new_gateway_writes_then_replaces() {
        let dst = net("10.244.1.0/24");
        let have = owned("c1", "n1", "10.99.0.1");
        let kernel = [kroute("10.244.1.0/24", Some("10.99.0.1"), OURS)];
        let wanted = record("n2", "10.99.0.2");
        let plan = plan_create("c1", &dst, &wanted, Some(&have), &kernel, OURS).unwrap();
        assert_eq!(
            plan,
            CreatePlan {
                write_record: true,
                program: true
            }
        );
    }

    #[test]
    fn create_recorded_but_missing_from_the_kernel_programs_only() {
        let dst = net("10.244.1.0/24");
        let have = owned("c1", "n1", "10.99.0.1");
        let plan = plan_create("c1", &dst, &have.record, Some(&have), &[], OURS).unwrap();
        assert_eq!(
            plan,
            CreatePlan {
                write_record: false,
                program: true
            }
        );
    }

    #[test]
    fn create_over_a_foreign_route_or_cluster_is_not_owned() {
        let dst = net("10.244.1.0/24");
        let wanted = record("n1", "10.99.0.1");
        let kernel = [kroute("10.244.1.0/24", Some("10.99.0.9"), STATIC)];
        let err = plan_create("c1", &dst, &wanted, None, &kernel, OURS).unwrap_err();
        assert!(
            matches!(err, PlanError::NotOwned(ref m) if m.contains("protocol 4")),
            "{err}"
        );
        let theirs = owned("c2", "n1", "10.99.0.1");
        let err = plan_create("c1", &dst, &wanted, Some(&theirs), &[], OURS).unwrap_err();
        assert!(
            matches!(err, PlanError::NotOwned(ref m) if m.contains("\"c2\"")),
            "{err}"
        );
    }

    #[test]
    fn delete_absent_is_success_and_foreign_is_refused() {
        let dst = net("10.244.1.0/24");
        assert_eq!(
            plan_delete("c1", &dst, None, &[], OURS).unwrap(),
            DeletePlan {
                forget_record: false,
                unprogram: false
            }
        );
        let kernel = [kroute("10.244.1.0/24", Some("10.99.0.9"), STATIC)];
        assert!(matches!(
            plan_delete("c1", &dst, None, &kernel, OURS),
            Err(PlanError::NotOwned(_))
        ));
        let theirs = owned("c2", "n1", "10.99.0.1");
        assert!(matches!(
            plan_delete("c1", &dst, Some(&theirs), &[], OURS),
            Err(PlanError::NotOwned(_))
        ));
    }

    #[test]
    fn delete_unrecorded_route_of_ours_unprograms_it() {
        let dst = net("10.244.1.0/24");
        let kernel = [kroute("10.244.1.0/24", Some("10.99.0.1"), OURS)];
        assert_eq!(
            plan_delete("c1", &dst, None, &kernel, OURS).unwrap(),
            DeletePlan {
                forget_record: false,
                unprogram: true
            }
        );
        let have = owned("c1", "n1", "10.99.0.1");
        assert_eq!(
            plan_delete("c1", &dst, Some(&have), &kernel, OURS).unwrap(),
            DeletePlan {
                forget_record: true,
                unprogram: true
            }
        );
    }

    #[test]
    fn startup_readds_missing_reprograms_changed_and_counts_the_rest() {
        let records = records_of(&[
            ("10.244.1.0/24", "c1", "n1", "10.99.0.1"),
            ("10.244.2.0/24", "c1", "n2", "10.99.0.2"),
            ("10.244.3.0/24", "c1", "n3", "10.99.0.3"),
            ("10.244.4.0/24", "c1", "n4", "10.99.0.4"),
        ]);
        let kernel = [
            kroute("10.244.1.0/24", Some("10.99.0.1"), OURS),
            kroute("10.244.2.0/24", Some("10.99.0.9"), OURS),
            kroute("10.244.4.0/24", Some("10.99.0.4"), STATIC),
            kroute("10.244.5.0/24", Some("10.99.0.5"), OURS),
            kroute("0.0.0.0/0", Some("10.99.0.254"), STATIC),
        ];
        let plan = plan_startup(&records, &kernel, OURS);
        assert_eq!(plan.in_place, 1);
        assert_eq!(plan.unrecorded, 1);
        assert_eq!(plan.blocked, vec![net("10.244.4.0/24")]);
        assert_eq!(
            plan.actions,
            vec![
                StartupAction::Reprogram {
                    destination: net("10.244.2.0/24"),
                    gateway: ip("10.99.0.2")
                },
                StartupAction::Add {
                    destination: net("10.244.3.0/24"),
                    gateway: ip("10.99.0.3")
                },
            ]
        );
    }

    #[test]
    fn view_marks_ownership_per_route() {
        let records = records_of(&[
            ("10.244.1.0/24", "c1", "n1", "10.99.0.1"),
            ("10.244.2.0/24", "c1", "n2", "10.99.0.2"),
            ("10.244.3.0/24", "c2", "m3", "10.99.0.3"),
        ]);
        let kernel = [
            kroute("10.244.3.0/24", Some("10.99.0.3"), OURS),
            kroute("10.244.2.0/24", Some("10.99.0.9"), OURS),
            kroute("10.244.1.0/24", Some("10.99.0.1"), OURS),
            kroute("10.244.5.0/24", Some("10.99.0.5"), OURS),
            kroute("192.168.0.0/16", Some("10.99.0.254"), STATIC),
        ];
        let listed = view("c1", &records, &kernel, OURS);
        let cidrs: Vec<_> = listed
            .iter()
            .map(|(_, r)| r.destination_cidr.as_str())
            .collect();
        assert_eq!(
            cidrs,
            [
                "10.244.1.0/24",
                "10.244.2.0/24",
                "10.244.3.0/24",
                "10.244.5.0/24",
                "192.168.0.0/16"
            ]
        );
        let route = |i: usize| &listed[i].1;
        let owner = |i: usize| route(i).ownership.clone().unwrap();
        // Ours, as recorded.
        assert_eq!(route(0).target_node, "n1");
        assert!(owner(0).owned);
        assert_eq!(owner(0).cluster_id.as_deref(), Some("c1"));
        assert_eq!(route(0).target_node_addresses[0].address, "10.99.0.1");
        // Ours, next hop changed behind our back: reads as the kernel's next hop.
        assert_eq!(route(1).target_node, "n2");
        assert_eq!(route(1).target_node_addresses[0].address, "10.99.0.9");
        // Another cluster's.
        assert!(!owner(2).owned);
        assert_eq!(owner(2).cluster_id.as_deref(), Some("c2"));
        assert_eq!(route(2).target_node, "");
        // Ours without a record: owned, no target.
        assert!(owner(3).owned);
        assert_eq!(route(3).target_node, "");
        // Someone else's.
        assert!(!owner(4).owned);
        assert_eq!(route(4).target_node, "");
        assert!(!route(4).blackhole);
    }

    #[test]
    fn view_lists_one_route_per_destination_preferring_ours() {
        let kernel = [
            kroute("fd10::/64", Some("fd00::9"), STATIC),
            kroute("fd10::/64", Some("fd00::1"), OURS),
        ];
        let listed = view("c1", &Records::new(), &kernel, OURS);
        assert_eq!(listed.len(), 1);
        assert!(listed[0].1.ownership.clone().unwrap().owned);
    }
}
