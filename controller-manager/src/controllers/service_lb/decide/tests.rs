//! The pure cases of upstream `controllers/service/controller_test.go` and
//! `service/helpers/helper_test.go`, table-driven: each row carries the upstream case name and
//! a failure names it. Cases that need the API server or the provider are in
//! `tests/service_lb_controller.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used, non_snake_case)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ClientIPConfig, Node, NodeCondition, NodeSpec, NodeStatus, PortStatus, Service, ServiceSpec,
    SessionAffinityConfig, Taint,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::*;
use crate::controllers::service_lb::WorkQueue;

// ------------------------------------------------------------------------------------------
// Fixtures
// ------------------------------------------------------------------------------------------

fn svc_of(name: &str, type_: &str) -> Service {
    let mut svc = Service::default();
    svc.metadata.name = Some(name.into());
    svc.metadata.namespace = Some("default".into());
    svc.metadata.uid = Some(format!("{name}-uid"));
    svc.spec = Some(ServiceSpec {
        type_: Some(type_.into()),
        ports: Some(vec![ServicePort {
            port: 80,
            protocol: Some("TCP".into()),
            node_port: Some(30080),
            target_port: Some(IntOrString::Int(20)),
            ..ServicePort::default()
        }]),
        ..ServiceSpec::default()
    });
    svc
}

/// Upstream `newService(name, type)`.
fn new_service(name: &str, type_: &str) -> CachedService {
    svc_of(name, type_).into()
}

fn with(svc: &CachedService, change: impl FnOnce(&mut Service)) -> CachedService {
    let mut full = svc.to_service();
    change(&mut full);
    full.into()
}

fn spec(svc: &mut Service) -> &mut ServiceSpec {
    svc.spec.get_or_insert_with(Default::default)
}

fn time() -> Time {
    Time("2026-01-01T00:00:00Z".parse().unwrap())
}

struct N(Node);

fn node(name: &str) -> N {
    let mut n = Node::default();
    n.metadata.name = Some(name.into());
    N(n)
}

impl N {
    fn spec(&mut self) -> &mut NodeSpec {
        self.0.spec.get_or_insert_with(Default::default)
    }
    fn label(mut self, key: &str, value: &str) -> Self {
        self.0
            .metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(key.into(), value.into());
        self
    }
    fn empty_labels(mut self) -> Self {
        self.0.metadata.labels = Some(BTreeMap::new());
        self
    }
    fn excluded(self, value: &str) -> Self {
        self.label(LABEL_EXCLUDE_FROM_EXTERNAL_LB, value)
    }
    fn taint(mut self, key: &str) -> Self {
        self.spec().taints.get_or_insert_with(Vec::new).push(Taint {
            key: key.into(),
            effect: "NoSchedule".into(),
            ..Taint::default()
        });
        self
    }
    fn autoscaler_taint(self) -> Self {
        self.taint(TAINT_TO_BE_DELETED_BY_CLUSTER_AUTOSCALER)
    }
    fn provider_id(mut self, id: &str) -> Self {
        self.spec().provider_id = Some(id.into());
        self
    }
    fn condition(mut self, type_: &str, status: &str) -> Self {
        self.0
            .status
            .get_or_insert_with(NodeStatus::default)
            .conditions
            .get_or_insert_with(Vec::new)
            .push(NodeCondition {
                type_: type_.into(),
                status: status.into(),
                ..NodeCondition::default()
            });
        self
    }
    fn ready(self, status: &str) -> Self {
        self.condition("Ready", status)
    }
    fn deleting(mut self) -> Self {
        self.0.metadata.deletion_timestamp = Some(time());
        self
    }
    fn build(self) -> CachedNode {
        self.0.into()
    }
}

fn check<T: PartialEq + std::fmt::Debug>(cases: Vec<(&str, T, T)>) {
    let failures: Vec<String> = cases
        .into_iter()
        .filter(|(_, got, want)| got != want)
        .map(|(name, got, want)| format!("{name}: got {got:?}, want {want:?}"))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ------------------------------------------------------------------------------------------
// TestNeedsCleanup, wantsLoadBalancer, op selection
// ------------------------------------------------------------------------------------------

#[test]
fn needs_cleanup__table() {
    let base = new_service("s", "LoadBalancer");
    let finalized = |type_: &str, deleting: bool| {
        with(&base, |s| {
            spec(s).type_ = Some(type_.into());
            s.metadata.finalizers = Some(vec![FINALIZER_LOAD_BALANCER_CLEANUP.into()]);
            if deleting {
                s.metadata.deletion_timestamp = Some(time());
            }
        })
    };
    check(vec![
        ("service without finalizer", needs_cleanup(&base), false),
        (
            "service with finalizer without timestamp without LB",
            needs_cleanup(&finalized("NodePort", false)),
            true,
        ),
        (
            "service with finalizer without timestamp with LB",
            needs_cleanup(&finalized("LoadBalancer", false)),
            false,
        ),
        (
            "service with finalizer and timestamp",
            needs_cleanup(&finalized("LoadBalancer", true)),
            true,
        ),
    ]);
}

#[test]
fn sync_load_balancer_if_needed__op_selection() {
    // The pure half of TestSyncLoadBalancerIfNeeded: which operation each case takes (the
    // cloud calls and patches are asserted against the API server in the integration tests).
    let lb = new_service("s", "LoadBalancer");
    let finalizer = |s: &mut Service| {
        s.metadata.finalizers = Some(vec![FINALIZER_LOAD_BALANCER_CLEANUP.into()]);
    };
    check(vec![
        (
            "service doesn't want LB",
            op_for(&new_service("s", "ClusterIP")),
            Op::Delete,
        ),
        ("udp service that wants LB", op_for(&lb), Op::Ensure),
        (
            "service specifies loadBalancerClass",
            op_for(&with(&lb, |s| {
                spec(s).load_balancer_class = Some("custom-loadbalancer".into())
            })),
            Op::Delete,
        ),
        (
            "service with finalizer that no longer wants LB",
            op_for(&with(&lb, |s| {
                finalizer(s);
                spec(s).type_ = Some("ClusterIP".into());
            })),
            Op::Delete,
        ),
        (
            "service that needs cleanup",
            op_for(&with(&lb, |s| {
                finalizer(s);
                s.metadata.deletion_timestamp = Some(time());
            })),
            Op::Delete,
        ),
        (
            "service with finalizer that wants LB",
            op_for(&with(&lb, finalizer)),
            Op::Ensure,
        ),
    ]);
}

#[test]
fn wants_load_balancer__class_means_not_ours() {
    let lb = new_service("s", "LoadBalancer");
    assert!(wants_load_balancer(&lb));
    assert!(!wants_load_balancer(&with(&lb, |s| {
        spec(s).load_balancer_class = Some("x".into())
    })));
    assert!(!wants_load_balancer(&new_service("s", "NodePort")));
    // Added: enqueued only when it wants a load balancer or needs cleanup.
    assert!(enqueue_added(&lb));
    assert!(!enqueue_added(&new_service("s", "ClusterIP")));
}

// ------------------------------------------------------------------------------------------
// TestNeedsUpdate
// ------------------------------------------------------------------------------------------

#[test]
fn needs_update__table() {
    let lb = new_service("tcp-service", "LoadBalancer");
    fn port(s: &mut Service) -> &mut ServicePort {
        spec(s).ports.as_mut().unwrap().get_mut(0).unwrap()
    }
    let cases: Vec<(&str, CachedService, CachedService, bool)> = vec![
        (
            "If the service type is changed from LoadBalancer to ClusterIP",
            lb.clone(),
            with(&lb, |s| spec(s).type_ = Some("ClusterIP".into())),
            true,
        ),
        (
            "If the Ports are different",
            lb.clone(),
            with(&lb, |s| port(s).port = 8000),
            true,
        ),
        (
            "If externel ip counts are different",
            with(&lb, |s| {
                spec(s).external_ips = Some(vec!["1.1.1.1".into(), "2.2.2.2".into()])
            }),
            with(&lb, |s| {
                spec(s).external_ips =
                    Some(vec!["1.1.1.1".into(), "2.2.2.2".into(), "3.3.3.3".into()])
            }),
            true,
        ),
        (
            "If externel ips are different",
            with(&lb, |s| {
                spec(s).external_ips = Some(vec!["1.1.1.1".into(), "2.2.2.2".into()])
            }),
            with(&lb, |s| {
                spec(s).external_ips = Some(vec!["2.2.2.2".into(), "3.3.3.3".into()])
            }),
            true,
        ),
        (
            "If UID is different",
            lb.clone(),
            with(&lb, |s| s.metadata.uid = Some("another-uid".into())),
            true,
        ),
        (
            "If ExternalTrafficPolicy is different",
            lb.clone(),
            with(&lb, |s| {
                spec(s).external_traffic_policy = Some("Local".into())
            }),
            true,
        ),
        (
            "If HealthCheckNodePort is different",
            with(&lb, |s| {
                spec(s).external_traffic_policy = Some("Local".into());
                spec(s).health_check_node_port = Some(30000);
            }),
            with(&lb, |s| {
                spec(s).external_traffic_policy = Some("Local".into());
                spec(s).health_check_node_port = Some(30001);
            }),
            true,
        ),
        (
            "If TargetGroup is different 1",
            lb.clone(),
            with(&lb, |s| port(s).target_port = Some(IntOrString::Int(21))),
            true,
        ),
        (
            "If TargetGroup is different 2",
            lb.clone(),
            with(&lb, |s| {
                port(s).target_port = Some(IntOrString::String("dns".into()))
            }),
            true,
        ),
        ("If appProtocol is the same", lb.clone(), lb.clone(), false),
        (
            "If service IPFamilies from single stack to dual stack",
            with(&lb, |s| spec(s).ip_families = Some(vec!["IPv4".into()])),
            with(&lb, |s| {
                spec(s).ip_families = Some(vec!["IPv4".into(), "IPv6".into()])
            }),
            true,
        ),
        (
            "If service IPFamilies from dual stack to single stack",
            with(&lb, |s| {
                spec(s).ip_families = Some(vec!["IPv4".into(), "IPv6".into()])
            }),
            with(&lb, |s| spec(s).ip_families = Some(vec!["IPv4".into()])),
            true,
        ),
        (
            "If service IPFamilies not change",
            with(&lb, |s| spec(s).ip_families = Some(vec!["IPv4".into()])),
            with(&lb, |s| spec(s).ip_families = Some(vec!["IPv4".into()])),
            false,
        ),
        (
            "If appProtocol is set when previously unset",
            lb.clone(),
            with(&lb, |s| port(s).app_protocol = Some("http".into())),
            true,
        ),
        (
            "If appProtocol is set to a different value",
            with(&lb, |s| port(s).app_protocol = Some("http".into())),
            with(&lb, |s| port(s).app_protocol = Some("tcp".into())),
            true,
        ),
    ];
    check(
        cases
            .iter()
            .map(|(name, old, new, want)| (*name, needs_update(old, new).is_some(), *want))
            .collect(),
    );
}

#[test]
fn needs_update__other_fields() {
    let lb = new_service("s", "LoadBalancer");
    let cluster_ip = new_service("s", "ClusterIP");
    check(vec![
        (
            "neither wants a load balancer",
            needs_update(
                &cluster_ip,
                &with(&cluster_ip, |s| spec(s).type_ = Some("NodePort".into())),
            )
            .is_some(),
            false,
        ),
        (
            "source ranges",
            needs_update(
                &lb,
                &with(&lb, |s| {
                    spec(s).load_balancer_source_ranges = Some(vec!["10.0.0.0/8".into()])
                }),
            )
            .is_some(),
            true,
        ),
        (
            "session affinity",
            needs_update(
                &lb,
                &with(&lb, |s| spec(s).session_affinity = Some("ClientIP".into())),
            )
            .is_some(),
            true,
        ),
        (
            "session affinity config",
            needs_update(
                &lb,
                &with(&lb, |s| {
                    spec(s).session_affinity_config = Some(SessionAffinityConfig {
                        client_ip: Some(ClientIPConfig {
                            timeout_seconds: Some(10),
                        }),
                    })
                }),
            )
            .is_some(),
            true,
        ),
        (
            "loadBalancerIP",
            needs_update(
                &lb,
                &with(&lb, |s| spec(s).load_balancer_ip = Some("1.2.3.4".into())),
            )
            .is_some(),
            true,
        ),
        (
            "any annotation",
            needs_update(
                &lb,
                &with(&lb, |s| {
                    s.metadata.annotations = Some([("a".to_string(), "b".to_string())].into())
                }),
            )
            .is_some(),
            true,
        ),
        (
            "labels are not compared",
            needs_update(
                &lb,
                &with(&lb, |s| {
                    s.metadata.labels = Some([("a".to_string(), "b".to_string())].into())
                }),
            )
            .is_some(),
            false,
        ),
        (
            "status is not compared",
            needs_update(
                &lb,
                &with(&lb, |s| {
                    s.status = Some(Default::default());
                    s.metadata.resource_version = Some("9".into());
                }),
            )
            .is_some(),
            false,
        ),
    ]);
    let change = needs_update(
        &lb,
        &with(&lb, |s| spec(s).type_ = Some("ClusterIP".into())),
    );
    assert_eq!(
        change,
        Some(SpecChange {
            reason: Some("Type"),
            message: "LoadBalancer -> ClusterIP".into()
        })
    );
}

// ------------------------------------------------------------------------------------------
// Node predicates: Test_respectsPredicates, TestListWithPredicate, shouldSyncUpdatedNode
// ------------------------------------------------------------------------------------------

#[test]
fn respects_predicates__table() {
    let with_ready = |n: N| n.ready("True");
    check(vec![
        ("empty", all_node_predicates(&node("n").build()), false),
        (
            "ready node",
            all_node_predicates(&with_ready(node("n").provider_id("fake://n")).build()),
            true,
        ),
        (
            "ready node without providerID",
            all_node_predicates(&with_ready(node("n")).build()),
            true,
        ),
        (
            "unready node",
            all_node_predicates(&node("n").ready("False").build()),
            false,
        ),
        (
            "ready node with empty labels",
            all_node_predicates(&with_ready(node("n").empty_labels()).build()),
            true,
        ),
        (
            "excluded node (empty value)",
            all_node_predicates(&with_ready(node("n").excluded("")).build()),
            false,
        ),
        (
            "excluded=false node",
            all_node_predicates(&with_ready(node("n").excluded("false")).build()),
            true,
        ),
        (
            "excluded=true node",
            all_node_predicates(&with_ready(node("n").excluded("true")).build()),
            false,
        ),
        (
            "excluded=foo node",
            all_node_predicates(&with_ready(node("n").excluded("foo")).build()),
            false,
        ),
        (
            "node with ToBeDeletedByClusterAutoscaler taint",
            all_node_predicates(&with_ready(node("n").autoscaler_taint()).build()),
            false,
        ),
    ]);
}

#[test]
fn stable_node_set__ignores_readiness_and_honours_the_three_predicates() {
    check(vec![
        (
            "not ready",
            stable_node(&node("n").ready("False").build()),
            true,
        ),
        ("no conditions", stable_node(&node("n").build()), true),
        (
            "deleting",
            stable_node(&node("n").deleting().build()),
            false,
        ),
        (
            "excluded",
            stable_node(&node("n").excluded("").build()),
            false,
        ),
        (
            "excluded=0",
            stable_node(&node("n").excluded("0").build()),
            true,
        ),
        (
            "excluded=F",
            stable_node(&node("n").excluded("F").build()),
            true,
        ),
        (
            "autoscaler",
            stable_node(&node("n").autoscaler_taint().build()),
            false,
        ),
        (
            "other taint",
            stable_node(&node("n").taint("Other").build()),
            true,
        ),
    ]);
    for value in ["false", "0", "f", "F", "FALSE", "False"] {
        assert_eq!(parse_bool(value), Some(false), "{value}");
    }
    for value in ["true", "1", "t", "T", "TRUE", "True"] {
        assert_eq!(parse_bool(value), Some(true), "{value}");
    }
    assert_eq!(parse_bool(""), None);
    assert_eq!(parse_bool("no"), None);
}

#[test]
fn list_with_predicate__table() {
    // Upstream filters on node phase, which the node cache does not keep; the phase is a label
    // here and the predicate reads it (same listing rule).
    let phases = ["Pending", "Running", "Pending", "Running", "Pending"];
    let nodes: Vec<std::sync::Arc<CachedNode>> = phases
        .iter()
        .enumerate()
        .map(|(i, p)| std::sync::Arc::new(node(&format!("node-{i}")).label("phase", p).build()))
        .collect();
    let names = |phase: &str| -> Vec<String> {
        list_with_predicate(&nodes, |n| n.labels().get("phase") == Some(phase))
            .into_iter()
            .map(|n| n.name_any())
            .collect()
    };
    check(vec![
        (
            "filter running nodes",
            names("Running"),
            vec!["node-1".to_string(), "node-3".into()],
        ),
        (
            "filter pending nodes",
            names("Pending"),
            vec!["node-0".to_string(), "node-2".into(), "node-4".into()],
        ),
        ("filter terminated nodes", names("Terminated"), vec![]),
    ]);
}

#[test]
fn should_sync_updated_node__individual_predicates() {
    let n = || node("n");
    let cases: Vec<(&str, N, N, bool)> = vec![
        ("nothing changed", n(), n(), false),
        ("excluded F->T", n(), n().excluded(""), true),
        ("excluded T->F", n().excluded(""), n(), true),
        ("excluded T->T", n().excluded(""), n().excluded(""), false),
        ("other taint F->T", n(), n().taint("Other"), false),
        ("other taint T->F", n().taint("Other"), n(), false),
        ("other label F->T", n(), n().label("other", "x"), false),
        ("other label T->F", n().label("other", "x"), n(), false),
        (
            "readiness F->F",
            n().ready("False"),
            n().ready("False"),
            false,
        ),
        ("readiness F->unset", n().ready("False"), n(), false),
        ("readiness unset->F", n(), n().ready("False"), false),
        ("readiness unset->unset", n(), n(), false),
        (
            "ready F, other condition F->T",
            n().ready("False").condition("Other", "False"),
            n().ready("False").condition("Other", "True"),
            false,
        ),
        (
            "ready F, other condition T->F",
            n().ready("False").condition("Other", "True"),
            n().ready("False").condition("Other", "False"),
            false,
        ),
        (
            "ready T, other condition F->T",
            n().ready("True").condition("Other", "False"),
            n().ready("True").condition("Other", "True"),
            false,
        ),
        (
            "ready T, other condition T->F",
            n().ready("True").condition("Other", "True"),
            n().ready("True").condition("Other", "False"),
            false,
        ),
        ("deletionTimestamp F -> T", n(), n().deleting(), false),
        (
            "providerID set F -> T",
            n(),
            n().provider_id("fake://n"),
            true,
        ),
        (
            "providerID set F -> T (again)",
            n(),
            n().provider_id("fake://n"),
            true,
        ),
        (
            "providerID set T-> F",
            n().provider_id("fake://n"),
            n(),
            true,
        ),
        (
            "providerID change",
            n().provider_id("fake://n"),
            n().provider_id("fake://m"),
            true,
        ),
    ];
    check(
        cases
            .into_iter()
            .map(|(name, old, new, want)| {
                (
                    name,
                    should_sync_updated_node(&old.build(), &new.build()),
                    want,
                )
            })
            .collect(),
    );
}

#[test]
fn should_sync_updated_node__compounded_predicates() {
    let pid = |n: N| n.provider_id("fake://n");
    let tainted = || node("n").autoscaler_taint();
    let excluded = || node("n").excluded("");
    let not_ready = || node("n").ready("False");
    let unset = || node("n");
    let cases: Vec<(&str, N, N, bool)> = vec![
        // tainted T
        (
            "tainted T, excluded F->T",
            tainted(),
            tainted().excluded(""),
            true,
        ),
        (
            "tainted T, excluded T->F",
            tainted().excluded(""),
            tainted(),
            true,
        ),
        (
            "tainted T, providerID set F->T",
            tainted(),
            pid(tainted()),
            true,
        ),
        (
            "tainted T, providerID set T->F",
            pid(tainted()),
            tainted(),
            true,
        ),
        (
            "tainted T, providerID change",
            pid(tainted()),
            tainted().provider_id("fake://m"),
            true,
        ),
        (
            "tainted T, ready F->T",
            tainted().ready("False"),
            tainted().ready("True"),
            false,
        ),
        (
            "tainted T, ready T->F",
            tainted().ready("True"),
            tainted().ready("False"),
            false,
        ),
        // excluded T
        (
            "excluded T, tainted F->T",
            excluded(),
            excluded().autoscaler_taint(),
            false,
        ),
        (
            "excluded T, tainted T->F",
            excluded().autoscaler_taint(),
            excluded(),
            false,
        ),
        (
            "excluded T, ready F->T",
            excluded().ready("False"),
            excluded().ready("True"),
            false,
        ),
        (
            "excluded T, ready T->F",
            excluded().ready("True"),
            excluded().ready("False"),
            false,
        ),
        (
            "excluded T, providerID set F->T",
            excluded(),
            pid(excluded()),
            true,
        ),
        (
            "excluded T, providerID set T->F",
            pid(excluded()),
            excluded(),
            true,
        ),
        (
            "excluded T, providerID change",
            pid(excluded()),
            excluded().provider_id("fake://m"),
            true,
        ),
        // ready F
        (
            "ready F, tainted F->T",
            not_ready(),
            not_ready().autoscaler_taint(),
            false,
        ),
        (
            "ready F, tainted T->F",
            not_ready().autoscaler_taint(),
            not_ready(),
            false,
        ),
        (
            "ready F, excluded F->T",
            not_ready(),
            not_ready().excluded(""),
            true,
        ),
        (
            "ready F, excluded T->F",
            not_ready().excluded(""),
            not_ready(),
            true,
        ),
        (
            "ready F, providerID set F->T",
            not_ready(),
            pid(not_ready()),
            true,
        ),
        (
            "ready F, providerID set T->F",
            pid(not_ready()),
            not_ready(),
            true,
        ),
        (
            "ready F, providerID change",
            pid(not_ready()),
            not_ready().provider_id("fake://m"),
            true,
        ),
        // providerID unset
        (
            "providerID unset, excluded F->T",
            unset(),
            unset().excluded(""),
            true,
        ),
        (
            "providerID unset, excluded T->F",
            unset().excluded(""),
            unset(),
            true,
        ),
        (
            "providerID unset, ready T->F",
            unset().ready("True"),
            unset().ready("False"),
            false,
        ),
        (
            "providerID unset, ready F->T",
            unset().ready("False"),
            unset().ready("True"),
            false,
        ),
        (
            "providerID unset, tainted T->F",
            unset().autoscaler_taint(),
            unset(),
            false,
        ),
        (
            "providerID unset, tainted F->T",
            unset(),
            unset().autoscaler_taint(),
            false,
        ),
    ];
    check(
        cases
            .into_iter()
            .map(|(name, old, new, want)| {
                (
                    name,
                    should_sync_updated_node(&old.build(), &new.build()),
                    want,
                )
            })
            .collect(),
    );
}

#[test]
fn nodes_sufficiently_equal__names_and_provider_ids() {
    let hosts = |pairs: &[(&str, &str)]| -> Vec<Host> {
        pairs
            .iter()
            .map(|(n, p)| (Box::from(*n), (!p.is_empty()).then(|| Box::from(*p))))
            .collect()
    };
    check(vec![
        (
            "Nodes with updated providerID",
            nodes_sufficiently_equal(
                &hosts(&[("n1", ""), ("n2", "")]),
                &hosts(&[("n1", "p1"), ("n2", "p2")]),
            ),
            false,
        ),
        (
            "Nodes unchanged",
            nodes_sufficiently_equal(
                &hosts(&[("n1", "p1"), ("n2", "p2")]),
                &hosts(&[("n1", "p1"), ("n2", "p2")]),
            ),
            true,
        ),
        (
            "Change node with empty providerID",
            nodes_sufficiently_equal(
                &hosts(&[("n1", ""), ("n2", "")]),
                &hosts(&[("n1", ""), ("n3", "")]),
            ),
            false,
        ),
        (
            "different count",
            nodes_sufficiently_equal(&hosts(&[("n1", "")]), &hosts(&[("n1", ""), ("n2", "")])),
            false,
        ),
    ]);
}

// ------------------------------------------------------------------------------------------
// Patches: TestAddFinalizer / TestRemoveFinalizer / TestPatchStatus (no-op decisions),
// getPatchBytes, LoadBalancerStatusEqual
// ------------------------------------------------------------------------------------------

fn ingress(ip: &str) -> LoadBalancerStatus {
    LoadBalancerStatus {
        ingress: Some(vec![LoadBalancerIngress {
            ip: Some(ip.into()),
            ..LoadBalancerIngress::default()
        }]),
    }
}

#[test]
fn add_remove_finalizer_and_patch_status__noop_decisions() {
    let lb = new_service("s", "LoadBalancer");
    let finalized = with(&lb, |s| {
        s.metadata.finalizers = Some(vec![FINALIZER_LOAD_BALANCER_CLEANUP.into()])
    });
    let with_status = with(&lb, |s| {
        s.status.get_or_insert_with(Default::default).load_balancer = Some(ingress("8.8.8.8"))
    });
    check(vec![
        (
            "no-op add finalizer",
            add_finalizer_patch(&finalized).is_none(),
            true,
        ),
        ("add finalizer", add_finalizer_patch(&lb).is_some(), true),
        (
            "no-op remove finalizer",
            remove_finalizer_patch(&lb).is_none(),
            true,
        ),
        (
            "remove finalizer",
            remove_finalizer_patch(&finalized).is_some(),
            true,
        ),
        (
            "no-op add status",
            status_patch(&with_status, &ingress("8.8.8.8"), false).is_none(),
            true,
        ),
        (
            "add status",
            status_patch(&lb, &ingress("8.8.8.8"), false).is_some(),
            true,
        ),
        (
            "no-op clear status",
            status_patch(&lb, &LoadBalancerStatus::default(), false).is_none(),
            true,
        ),
        (
            "clear status",
            status_patch(&with_status, &LoadBalancerStatus::default(), false).is_some(),
            true,
        ),
    ]);
}

#[test]
fn patch_bodies__as_upstream_computes_them() {
    let lb = new_service("s", "LoadBalancer");
    let foo = with(&lb, |s| s.metadata.finalizers = Some(vec!["foo".into()]));
    assert_eq!(
        serde_json::to_string(&add_finalizer_patch(&foo).unwrap()).unwrap(),
        r#"{"metadata":{"$setElementOrder/finalizers":["foo","service.kubernetes.io/load-balancer-cleanup"],"finalizers":["service.kubernetes.io/load-balancer-cleanup"]}}"#
    );
    let both = with(&lb, |s| {
        s.metadata.finalizers = Some(vec!["foo".into(), FINALIZER_LOAD_BALANCER_CLEANUP.into()])
    });
    assert_eq!(
        serde_json::to_string(&remove_finalizer_patch(&both).unwrap()).unwrap(),
        r#"{"metadata":{"$deleteFromPrimitiveList/finalizers":["service.kubernetes.io/load-balancer-cleanup"],"$setElementOrder/finalizers":["foo"]}}"#
    );
    let with_status = with(&lb, |s| {
        s.status.get_or_insert_with(Default::default).load_balancer = Some(ingress("8.8.8.8"))
    });
    assert_eq!(
        serde_json::to_string(
            &status_patch(&with_status, &LoadBalancerStatus::default(), false).unwrap()
        )
        .unwrap(),
        r#"{"status":{"loadBalancer":{"ingress":null}}}"#
    );
    assert_eq!(
        serde_json::to_string(&status_patch(&lb, &ingress("1.2.3.4"), false).unwrap()).unwrap(),
        r#"{"status":{"loadBalancer":{"ingress":[{"ip":"1.2.3.4"}]}}}"#
    );
}

#[test]
fn load_balancer_status_equal__table() {
    let mode = |ip: &str, mode: Option<&str>| LoadBalancerStatus {
        ingress: Some(vec![LoadBalancerIngress {
            ip: Some(ip.into()),
            ip_mode: mode.map(Into::into),
            ..LoadBalancerIngress::default()
        }]),
    };
    let ports = |protocol: &str| LoadBalancerStatus {
        ingress: Some(vec![LoadBalancerIngress {
            ip: Some("1.1.1.1".into()),
            ports: Some(vec![PortStatus {
                port: 80,
                protocol: protocol.into(),
                error: None,
            }]),
            ..LoadBalancerIngress::default()
        }]),
    };
    let empty = LoadBalancerStatus::default();
    check(vec![
        (
            "empty",
            load_balancer_status_equal(
                &empty,
                &LoadBalancerStatus {
                    ingress: Some(vec![]),
                },
            ),
            true,
        ),
        (
            "same ip",
            load_balancer_status_equal(&ingress("1.1.1.1"), &ingress("1.1.1.1")),
            true,
        ),
        (
            "different ip",
            load_balancer_status_equal(&ingress("1.1.1.1"), &ingress("1.1.1.2")),
            false,
        ),
        (
            "same ipMode",
            load_balancer_status_equal(
                &mode("1.1.1.1", Some("Proxy")),
                &mode("1.1.1.1", Some("Proxy")),
            ),
            true,
        ),
        (
            "only one ipMode",
            load_balancer_status_equal(&mode("1.1.1.1", Some("Proxy")), &mode("1.1.1.1", None)),
            false,
        ),
        (
            "different ipMode",
            load_balancer_status_equal(
                &mode("1.1.1.1", Some("Proxy")),
                &mode("1.1.1.1", Some("VIP")),
            ),
            false,
        ),
        (
            "same ports",
            load_balancer_status_equal(&ports("TCP"), &ports("TCP")),
            true,
        ),
        (
            "different protocol",
            load_balancer_status_equal(&ports("TCP"), &ports("UDP")),
            false,
        ),
        (
            "one side without ports",
            load_balancer_status_equal(&ports("TCP"), &ingress("1.1.1.1")),
            false,
        ),
    ]);
    // An ipMode-aware API server defaults a missing mode to VIP: no patch for that alone.
    let stored = with(&new_service("s", "LoadBalancer"), |s| {
        s.status.get_or_insert_with(Default::default).load_balancer =
            Some(mode("1.1.1.1", Some("VIP")))
    });
    assert!(status_patch(&stored, &ingress("1.1.1.1"), true).is_none());
    assert!(status_patch(&stored, &ingress("1.1.1.1"), false).is_some());
}

// ------------------------------------------------------------------------------------------
// Source ranges (upstream GetLoadBalancerSourceRanges / IsAllowAll) and bad objects
// ------------------------------------------------------------------------------------------

#[test]
fn source_ranges__annotation_and_spec() {
    let lb = new_service("s", "LoadBalancer");
    let annotated = |value: &str| {
        with(&lb, |s| {
            s.metadata.annotations = Some(
                [(
                    ANNOTATION_LOAD_BALANCER_SOURCE_RANGES.to_string(),
                    value.to_string(),
                )]
                .into(),
            )
        })
    };
    for bad in [
        "10.0.0.1/33",
        "foo.bar",
        "*",
        "1.2.3.4/32,",
        "1.2.3.4/32, ",
        "1.2.3.4",
    ] {
        let err = source_ranges(&annotated(bad)).unwrap_err();
        assert_eq!(
            err.field,
            format!("metadata.annotations[{ANNOTATION_LOAD_BALANCER_SOURCE_RANGES}]"),
            "{bad}"
        );
    }
    let ranges = source_ranges(&annotated(" 1.2.3.0/24 ,1.2.3.4/24 , 10.0.0.0/8")).unwrap();
    assert_eq!(
        ranges.len(),
        2,
        "trimmed, normalised and de-duplicated: {ranges:?}"
    );
    assert!(is_allow_all(&source_ranges(&lb).unwrap()));
    assert!(is_allow_all(&source_ranges(&annotated("  ")).unwrap()));
    assert!(is_allow_all(
        &source_ranges(&annotated("192.168.0.0/0")).unwrap()
    ));
    assert!(!is_allow_all(
        &source_ranges(&annotated("10.0.0.0/8")).unwrap()
    ));
    let spec_bad = with(&lb, |s| {
        spec(s).load_balancer_source_ranges = Some(vec!["10.0.0.0/8".into(), "nope".into()])
    });
    assert_eq!(
        source_ranges(&spec_bad).unwrap_err().field,
        "spec.loadBalancerSourceRanges[1]"
    );
    // The spec wins over the annotation.
    let both = with(&annotated("bad"), |s| {
        spec(s).load_balancer_source_ranges = Some(vec!["10.0.0.0/8".into()])
    });
    assert_eq!(source_ranges(&both).unwrap().len(), 1);
    assert_eq!(
        source_ranges(&with(&lb, |s| {
            spec(s).load_balancer_source_ranges = Some(vec!["2001:db8::1/32".into()])
        }))
        .unwrap(),
        vec![("2001:db8::".parse().unwrap(), 32)]
    );
}

#[test]
fn validate_for_ensure__names_the_field() {
    let lb = new_service("s", "LoadBalancer");
    assert_eq!(validate_for_ensure(&lb), Ok(()));
    let no_node_port = with(&lb, |s| {
        spec(s).ports.as_mut().unwrap()[0].node_port = None;
    });
    assert_eq!(
        validate_for_ensure(&no_node_port).unwrap_err().field,
        "spec.ports[0].nodePort"
    );
    let not_allocated = with(&no_node_port, |s| {
        spec(s).allocate_load_balancer_node_ports = Some(false)
    });
    assert_eq!(validate_for_ensure(&not_allocated), Ok(()));
}

// ------------------------------------------------------------------------------------------
// Retry policy: TestServiceQueueDelay, backoff
// ------------------------------------------------------------------------------------------

#[test]
fn backoff__5s_doubling_to_300s() {
    let delays: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
    assert_eq!(delays, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
    assert_eq!(backoff(u32::MAX), MAX_RETRY_DELAY);
}

#[tokio::test(start_paused = true)]
async fn service_queue_delay__table() {
    use crate::controllers::service_lb::ServiceSyncError;
    use cpi_proto::CpiError;
    let key = "default/svc";
    let cases: Vec<(&str, Option<ServiceSyncError>, u32, usize)> = vec![
        ("processing successful", None, 0, 0),
        (
            "regular error",
            Some(ServiceSyncError::Ensure(CpiError::Cloud(
                "something went wrong".into(),
            ))),
            1,
            1,
        ),
        (
            "retry error",
            Some(ServiceSyncError::Ensure(CpiError::RetryAfter {
                message: "LB create in progress".into(),
                delay: Duration::from_secs(42),
            })),
            0,
            1,
        ),
    ];
    for (name, err, rate_limited, delayed) in cases {
        let queue = WorkQueue::default();
        let requeue = err
            .as_ref()
            .map_or(Requeue::Forget, ServiceSyncError::requeue);
        queue.requeue(key, requeue);
        assert_eq!(queue.num_requeues(key), rate_limited, "{name}");
        assert_eq!(queue.delayed(), delayed, "{name}");
        if name == "retry error" {
            assert_eq!(requeue, Requeue::After(Duration::from_secs(42)), "{name}");
            let start = tokio::time::Instant::now();
            assert_eq!(queue.get().await.as_deref(), Some(key));
            assert_eq!(
                start.elapsed(),
                Duration::from_secs(42),
                "{name}: AddAfter(42s)"
            );
        }
    }
}

// ------------------------------------------------------------------------------------------
// Messages and small helpers
// ------------------------------------------------------------------------------------------

#[test]
fn update_failure_message__caps_node_names_at_20() {
    let names: Vec<String> = (0..23).map(|i| format!("n{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let message = update_failure_message(&refs, &"boom");
    assert!(
        message.starts_with("Error updating load balancer with new hosts [n0 n1 "),
        "{message}"
    );
    assert!(
        message.ends_with(
            "n19 <3 more>] [node names limited, total number of nodes: 23], error: boom"
        ),
        "{message}"
    );
}

#[test]
fn split_key__as_client_go() {
    assert_eq!(split_key("default/svc"), Some(("default", "svc")));
    assert_eq!(split_key("svc"), Some(("", "svc")));
    assert_eq!(split_key("invalid/key/string"), None);
}

#[test]
fn stores_ip_mode__from_1_30() {
    check(vec![
        ("1.20", stores_ip_mode("1", "20"), false),
        ("1.29", stores_ip_mode("1", "29"), false),
        ("1.30", stores_ip_mode("1", "30"), true),
        ("1.33+", stores_ip_mode("1", "33+"), true),
        ("garbage", stores_ip_mode("x", "y"), false),
    ]);
}

#[test]
fn backends_never_shrink_to_empty_in_one_step() {
    check(vec![
        ("first set, empty", may_replace_backends(None, 0), true),
        ("first set, some nodes", may_replace_backends(None, 3), true),
        ("grows", may_replace_backends(Some(2), 3), true),
        (
            "shrinks but not to empty",
            may_replace_backends(Some(3), 1),
            true,
        ),
        ("empty to empty", may_replace_backends(Some(0), 0), true),
        (
            "every node gone at once",
            may_replace_backends(Some(3), 0),
            false,
        ),
    ]);
}

#[test]
fn a_resync_of_an_unchanged_load_balancer_records_no_event() {
    check(vec![
        (
            "change-driven, unchanged",
            records_ensured_event(false, false),
            true,
        ),
        (
            "change-driven, changed",
            records_ensured_event(false, true),
            true,
        ),
        (
            "resync, unchanged",
            records_ensured_event(true, false),
            false,
        ),
        ("resync, changed", records_ensured_event(true, true), true),
    ]);
}
