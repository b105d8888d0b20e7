//! The pure cases of upstream `controllers/route/route_controller_test.go`, one test per case
//! (`TestReconcile`, `TestUpdateNetworkingCondition`, `TestUpdateNetworkingConditionWithCalico
//! Scenario`, `TestHandleNodeUpdate`), plus our guarantees: foreign routes, unowned nodes,
//! capacity, the per-route backoff and a CNI's condition.
//!
//! A reconcile case applies the plan to the listed routes as the fake cloud would (deletions,
//! then creations; a creation of an existing (node, CIDR) fails, as upstream's fake) and
//! compares the final route set by (node, CIDR, addresses).
#![allow(non_snake_case)]

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use cpi_proto::v1::{self as pb, NodeAddressType};
use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeCondition, NodeSpec, NodeStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;

use super::*;

const V4: &str = "10.120.0.0/16";
const DUAL: &str = "10.120.0.0/16,ace:cab:deca::/8";

fn node(name: &str, cidrs: &[&str], ips: &[&str]) -> CachedNode {
    node_with(name, cidrs, ips, None)
}

fn node_with(name: &str, cidrs: &[&str], ips: &[&str], provider_id: Option<&str>) -> CachedNode {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            uid: Some(format!("uid-{name}")),
            resource_version: Some("1".into()),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec {
            pod_cidrs: (!cidrs.is_empty()).then(|| cidrs.iter().map(|c| c.to_string()).collect()),
            provider_id: provider_id.map(str::to_string),
            ..NodeSpec::default()
        }),
        status: Some(NodeStatus {
            addresses: Some(
                ips.iter()
                    .map(|ip| NodeAddress {
                        type_: "InternalIP".into(),
                        address: ip.to_string(),
                    })
                    .collect(),
            ),
            ..NodeStatus::default()
        }),
    }
    .into()
}

fn addrs(ips: &[&str]) -> Vec<pb::NodeAddress> {
    ips.iter()
        .map(|ip| pb::NodeAddress {
            r#type: NodeAddressType::InternalIp as i32,
            address: ip.to_string(),
        })
        .collect()
}

/// A listed route without node addresses (EnableNodeAddresses off).
fn route(node: &str, cidr: &str) -> pb::Route {
    pb::Route {
        name: format!("{node}-{cidr}"),
        target_node: node.into(),
        destination_cidr: cidr.into(),
        ..pb::Route::default()
    }
}

/// A listed route with EnableNodeAddresses and these addresses.
fn route_addrs(node: &str, cidr: &str, ips: &[&str]) -> pb::Route {
    pb::Route {
        enable_node_addresses: true,
        target_node_addresses: addrs(ips),
        ..route(node, cidr)
    }
}

fn blackhole(cidr: &str) -> pb::Route {
    pb::Route {
        blackhole: true,
        ..route("", cidr)
    }
}

fn foreign(r: pb::Route) -> pb::Route {
    pb::Route {
        ownership: Some(pb::Ownership {
            owned: false,
            cluster_id: Some("other-cluster".into()),
            object_uid: None,
        }),
        ..r
    }
}

type Final = BTreeSet<(String, String, Vec<String>)>;

fn as_final(routes: &[pb::Route]) -> Final {
    routes
        .iter()
        .map(|r| {
            let mut ips: Vec<String> = r
                .target_node_addresses
                .iter()
                .map(|a| a.address.clone())
                .collect();
            ips.sort();
            (r.target_node.clone(), r.destination_cidr.clone(), ips)
        })
        .collect()
}

fn plan_for(nodes: &[CachedNode], routes: &[pb::Route], cidrs: &str) -> Plan {
    plan_with(
        nodes,
        routes,
        cidrs,
        None,
        &Backoff::default(),
        Instant::now(),
    )
}

fn plan_with(
    nodes: &[CachedNode],
    routes: &[pb::Route],
    cidrs: &str,
    capacity: Option<u32>,
    backoff: &Backoff,
    now: Instant,
) -> Plan {
    let cidrs: ClusterCidrs = cidrs.parse().unwrap();
    reconcile(
        nodes,
        |n| n.provider_id().is_none_or(|id| id.starts_with("fake://")),
        routes,
        &Inputs {
            cidrs: &cidrs,
            capacity,
            backoff,
            now,
        },
    )
}

/// Applies `plan` as the fake cloud would; returns the routes afterwards and how many
/// creations failed.
fn apply(plan: &Plan, routes: &[pb::Route]) -> (Vec<pb::Route>, usize) {
    let mut table: Vec<pb::Route> = routes
        .iter()
        .filter(|r| !plan.deletions.contains(r))
        .cloned()
        .collect();
    let mut failed = 0;
    for creation in &plan.creations {
        let duplicate = table.iter().any(|r| {
            r.target_node == creation.route.target_node
                && r.destination_cidr == creation.route.destination_cidr
        });
        if duplicate {
            failed += 1;
        } else {
            table.push(creation.route.clone());
        }
    }
    (table, failed)
}

fn expect_final(nodes: &[CachedNode], routes: &[pb::Route], cidrs: &str, want: &[pb::Route]) {
    let plan = plan_for(nodes, routes, cidrs);
    let (table, failed) = apply(&plan, routes);
    assert_eq!(failed, 0, "no creation collides: {plan:?}");
    assert_eq!(as_final(&table), as_final(want), "plan: {plan:?}");
}

fn two_dual_nodes() -> Vec<CachedNode> {
    vec![
        node(
            "node-1",
            &["10.120.0.0/24", "ace:cab:deca::/64"],
            &["10.1.1.1", "ace::1"],
        ),
        node(
            "node-2",
            &["10.120.1.0/24", "ace:cab:deca:1::/64"],
            &["10.1.1.2", "ace::2"],
        ),
    ]
}

fn dual_routes_with_addresses() -> Vec<pb::Route> {
    vec![
        route_addrs("node-1", "10.120.0.0/24", &["10.1.1.1", "ace::1"]),
        route_addrs("node-1", "ace:cab:deca::/64", &["10.1.1.1", "ace::1"]),
        route_addrs("node-2", "10.120.1.0/24", &["10.1.1.2", "ace::2"]),
        route_addrs("node-2", "ace:cab:deca:1::/64", &["10.1.1.2", "ace::2"]),
    ]
}

/// The two dual-stack nodes end with one route per pod CIDR, carrying their addresses.
fn expect_dual_final(routes: &[pb::Route]) {
    expect_final(
        &two_dual_nodes(),
        routes,
        DUAL,
        &dual_routes_with_addresses(),
    );
}

fn two_nodes() -> Vec<CachedNode> {
    vec![
        node("node-1", &["10.120.0.0/24"], &["10.1.1.1"]),
        node("node-2", &["10.120.1.0/24"], &["10.1.1.2"]),
    ]
}

fn two_routes() -> Vec<pb::Route> {
    vec![
        route_addrs("node-1", "10.120.0.0/24", &["10.1.1.1"]),
        route_addrs("node-2", "10.120.1.0/24", &["10.1.1.2"]),
    ]
}

// ---- TestReconcile ------------------------------------------------------------------------

#[test]
fn reconcile__routes_have_no_target_node_addresses_at_the_beginning() {
    let routes = vec![
        route_addrs("node-1", "10.120.0.0/24", &[]),
        route_addrs("node-1", "ace:cab:deca::/64", &[]),
        route_addrs("node-2", "10.120.1.0/24", &[]),
        route_addrs("node-2", "ace:cab:deca:1::/64", &[]),
    ];
    let plan = plan_for(&two_dual_nodes(), &routes, DUAL);
    assert_eq!(plan.deletions.len(), 4);
    assert_eq!(plan.creations.len(), 4);
    assert!(
        plan.deletions_first,
        "recreated routes wait for the deletions"
    );
    expect_dual_final(&routes);
}

#[test]
fn reconcile__routes_target_node_addresses_changed() {
    let routes = vec![
        route_addrs("node-1", "10.120.0.0/24", &["10.9.9.1"]),
        route_addrs("node-2", "10.120.1.0/24", &["10.9.9.2"]),
    ];
    expect_final(&two_nodes(), &routes, V4, &two_routes());
}

#[test]
fn reconcile__multicidr_2_nodes_and_no_routes() {
    let plan = plan_for(&two_dual_nodes(), &[], DUAL);
    assert_eq!(plan.creations.len(), 4);
    assert!(plan.deletions.is_empty());
    expect_dual_final(&[]);
}

#[test]
fn reconcile__multicidr_2_nodes_and_all_routes_created() {
    let routes = dual_routes_with_addresses();
    let plan = plan_for(&two_dual_nodes(), &routes, DUAL);
    assert!(plan.creations.is_empty() && plan.deletions.is_empty());
    assert_eq!(plan.routes_created("node-1"), Some(true));
    assert_eq!(plan.routes_created("node-2"), Some(true));
}

#[test]
fn reconcile__multicidr_2_nodes_and_few_wrong_routes() {
    let routes = vec![
        route_addrs("node-1", "10.120.1.0/24", &["10.1.1.1", "ace::1"]),
        route_addrs("node-1", "ace:cab:deca::/64", &["10.1.1.1", "ace::1"]),
        route_addrs("node-2", "10.120.0.0/24", &["10.1.1.2", "ace::2"]),
        route_addrs("node-2", "ace:cab:deca:1::/64", &["10.1.1.2", "ace::2"]),
    ];
    let plan = plan_for(&two_dual_nodes(), &routes, DUAL);
    assert_eq!(plan.deletions.len(), 2);
    assert!(
        plan.deletions_first,
        "a CIDR changes target: never two routes for it"
    );
    expect_dual_final(&routes);
}

#[test]
fn reconcile__multicidr_2_nodes_and_some_routes_created() {
    let all = dual_routes_with_addresses();
    let routes = vec![all[0].clone(), all[2].clone()];
    let plan = plan_for(&two_dual_nodes(), &routes, DUAL);
    assert_eq!(plan.creations.len(), 2);
    assert!(plan.deletions.is_empty());
    expect_final(&two_dual_nodes(), &routes, DUAL, &all);
}

#[test]
fn reconcile__multicidr_2_nodes_and_too_many_routes() {
    let mut routes = dual_routes_with_addresses();
    routes.push(route_addrs("node-x", "10.120.2.0/24", &["10.1.1.3"]));
    routes.push(route_addrs("node-y", "ace:cab:deca:2::/64", &["ace::3"]));
    expect_dual_final(&routes);
}

#[test]
fn reconcile__single_cidr_2_nodes_and_routes_created() {
    let plan = plan_for(&two_nodes(), &two_routes(), V4);
    assert!(plan.creations.is_empty() && plan.deletions.is_empty());
    assert_eq!(plan.routes_created("node-1"), Some(true));
}

#[test]
fn reconcile__single_cidr_node_ips_changed_so_routes_should_be_updated() {
    let nodes = vec![
        node("node-1", &["10.120.0.0/24"], &["10.1.1.11"]),
        node("node-2", &["10.120.1.0/24"], &["10.1.1.12"]),
    ];
    let want = vec![
        route_addrs("node-1", "10.120.0.0/24", &["10.1.1.11"]),
        route_addrs("node-2", "10.120.1.0/24", &["10.1.1.12"]),
    ];
    expect_final(&nodes, &two_routes(), V4, &want);
}

#[test]
fn reconcile__single_cidr_2_nodes_and_one_route_created() {
    let routes = vec![two_routes()[0].clone()];
    let plan = plan_for(&two_nodes(), &routes, V4);
    assert_eq!(plan.creations.len(), 1);
    expect_final(&two_nodes(), &routes, V4, &two_routes());
}

#[test]
fn reconcile__single_cidr_2_nodes_and_no_routes() {
    expect_final(&two_nodes(), &[], V4, &two_routes());
}

#[test]
fn reconcile__single_cidr_2_nodes_and_too_many_routes() {
    let mut routes = two_routes();
    routes.push(route("node-3", "10.120.2.0/24"));
    routes.push(route("node-4", "10.120.3.0/24"));
    expect_final(&two_nodes(), &routes, V4, &two_routes());
}

#[test]
fn reconcile__single_cidr_2_nodes_and_2_routes_with_1_incorrect() {
    let routes = vec![two_routes()[0].clone(), route("node-3", "10.120.1.0/24")];
    let plan = plan_for(&two_nodes(), &routes, V4);
    assert!(
        plan.deletions_first,
        "10.120.1.0/24 moves from node-3 to node-2"
    );
    expect_final(&two_nodes(), &routes, V4, &two_routes());
}

#[test]
fn reconcile__single_cidr_2_nodes_and_one_node_without_cidr_assigned() {
    let nodes = vec![
        node("node-1", &["10.120.0.0/24"], &["10.1.1.1"]),
        node("node-2", &[], &["10.1.1.2"]),
    ];
    let plan = plan_for(&nodes, &[], V4);
    assert_eq!(
        plan.routes_created("node-2"),
        None,
        "no entry, no condition"
    );
    expect_final(&nodes, &[], V4, &[two_routes()[0].clone()]);
}

#[test]
fn reconcile__single_cidr_2_nodes_and_an_extra_blackhole_route_in_our_range() {
    let mut routes = two_routes();
    routes.push(blackhole("10.120.2.0/24"));
    let plan = plan_for(&two_nodes(), &routes, V4);
    assert_eq!(plan.deletions, vec![blackhole("10.120.2.0/24")]);
    expect_final(&two_nodes(), &routes, V4, &two_routes());
}

#[test]
fn reconcile__single_cidr_2_nodes_and_an_extra_blackhole_route_not_in_our_range() {
    let mut routes = two_routes();
    routes.push(blackhole("10.1.2.0/24"));
    let plan = plan_for(&two_nodes(), &routes, V4);
    assert!(plan.deletions.is_empty());
    expect_final(&two_nodes(), &routes, V4, &routes);
}

#[test]
fn reconcile__duplicate_pod_cidr() {
    let nodes = vec![node(
        "node-1",
        &["10.120.0.0/24", "10.120.0.0/24"],
        &["10.1.1.1"],
    )];
    let plan = plan_for(&nodes, &[], V4);
    assert_eq!(plan.creations.len(), 1, "one route per distinct CIDR");
    expect_final(&nodes, &[], V4, &[two_routes()[0].clone()]);
}

// ---- our guarantees ---------------------------------------------------------------------------

#[test]
fn foreign_route_in_range_is_never_deleted() {
    let mut routes = two_routes();
    let other = foreign(route("node-9", "10.120.9.0/24"));
    routes.push(other.clone());
    routes.push(foreign(blackhole("10.120.8.0/24")));
    let plan = plan_for(&two_nodes(), &routes, V4);
    assert!(plan.deletions.is_empty(), "{plan:?}");
    assert_eq!(plan.foreign.len(), 2);
    assert!(plan.foreign.contains(&other));
}

#[test]
fn foreign_route_to_a_node_with_stale_addresses_is_kept_not_duplicated() {
    let routes = vec![
        foreign(route_addrs("node-1", "10.120.0.0/24", &["10.9.9.9"])),
        two_routes()[1].clone(),
    ];
    let plan = plan_for(&two_nodes(), &routes, V4);
    assert!(
        plan.deletions.is_empty() && plan.creations.is_empty(),
        "{plan:?}"
    );
}

#[test]
fn nodes_outside_the_providers_ownership_get_no_route_and_keep_theirs() {
    let nodes = vec![
        node_with(
            "node-1",
            &["10.120.0.0/24"],
            &["10.1.1.1"],
            Some("fake://1"),
        ),
        node_with(
            "robot",
            &["10.120.5.0/24"],
            &["10.1.1.5"],
            Some("hrobot://5"),
        ),
    ];
    let routes = vec![route("robot", "10.120.5.0/24")];
    let plan = plan_for(&nodes, &routes, V4);
    assert!(plan.deletions.is_empty(), "{plan:?}");
    assert_eq!(plan.creations.len(), 1);
    assert_eq!(
        plan.creations[0].key,
        RouteKey::new("node-1", "10.120.0.0/24")
    );
    assert_eq!(
        plan.routes_created("robot"),
        None,
        "its condition is not ours"
    );
}

#[test]
fn routes_with_an_invalid_destination_are_reported_not_deleted() {
    let mut routes = two_routes();
    routes.push(route("node-3", "not-a-cidr"));
    let plan = plan_for(&two_nodes(), &routes, V4);
    assert!(plan.deletions.is_empty());
    assert_eq!(plan.invalid.len(), 1);
}

#[test]
fn capacity_shortfall_leaves_the_routes_that_do_not_fit() {
    let nodes: Vec<CachedNode> = (0..5)
        .map(|i| node(&format!("node-{i}"), &[&format!("10.120.{i}.0/24")], &[]))
        .collect();
    // One stale route is deleted first, which frees its slot.
    let routes = vec![route("gone", "10.120.99.0/24")];
    let plan = plan_with(
        &nodes,
        &routes,
        V4,
        Some(3),
        &Backoff::default(),
        Instant::now(),
    );
    assert_eq!(plan.deletions.len(), 1);
    assert!(
        plan.deletions_first,
        "freed slots must be free before they are used"
    );
    assert_eq!(plan.creations.len(), 3);
    assert_eq!(
        plan.over_capacity,
        vec![
            RouteKey::new("node-3", "10.120.3.0/24"),
            RouteKey::new("node-4", "10.120.4.0/24")
        ]
    );
    assert_eq!(plan.routes_created("node-4"), Some(false));
}

#[test]
fn capacity_is_counted_against_the_routes_that_stay() {
    let plan = plan_with(
        &two_nodes(),
        &[two_routes()[0].clone()],
        V4,
        Some(1),
        &Backoff::default(),
        Instant::now(),
    );
    assert!(plan.creations.is_empty());
    assert_eq!(
        plan.over_capacity,
        vec![RouteKey::new("node-2", "10.120.1.0/24")]
    );
}

#[test]
fn backoff_schedule_doubles_from_5s_to_5min() {
    let delays: Vec<u64> = (1..=9).map(|n| backoff_delay(n).as_secs()).collect();
    assert_eq!(delays, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
    assert_eq!(backoff_delay(u32::MAX), MAX_BACKOFF);
}

#[test]
fn a_failing_route_waits_for_its_backoff_and_others_do_not() {
    let t0 = Instant::now();
    let failing = RouteKey::new("node-1", "10.120.0.0/24");
    let mut backoff = Backoff::default();
    assert_eq!(backoff.failed(&failing, t0), Duration::from_secs(5));
    let plan = plan_with(
        &two_nodes(),
        &[],
        V4,
        None,
        &backoff,
        t0 + Duration::from_secs(4),
    );
    assert_eq!(plan.backing_off, vec![failing.clone()]);
    assert_eq!(plan.creations.len(), 1, "node-2's route is not held up");
    assert_eq!(plan.creations[0].key.node, "node-2");
    let plan = plan_with(
        &two_nodes(),
        &[],
        V4,
        None,
        &backoff,
        t0 + Duration::from_secs(5),
    );
    assert_eq!(plan.creations.len(), 2, "retried once its time has come");
    assert_eq!(backoff.failed(&failing, t0), Duration::from_secs(10));
    assert_eq!(backoff.failures(&failing), 2);
    backoff.succeeded(&failing);
    assert!(!backoff.blocked(&failing, t0));
}

#[test]
fn many_permanently_failing_nodes_do_not_starve_a_new_one() {
    let t0 = Instant::now();
    let mut nodes: Vec<CachedNode> = (0..100)
        .map(|i| {
            node(
                &format!("ghost-{i:03}"),
                &[&format!("10.120.{i}.0/24")],
                &[],
            )
        })
        .collect();
    let mut backoff = Backoff::default();
    for n in &nodes {
        let cidr = &n.spec().pod_cidrs.as_ref().unwrap()[0];
        for _ in 0..10 {
            backoff.failed(&RouteKey::new(&n.name_any(), cidr), t0);
        }
    }
    nodes.push(node("new", &["10.120.200.0/24"], &[]));
    let plan = plan_with(&nodes, &[], V4, None, &backoff, t0 + Duration::from_secs(1));
    assert_eq!(plan.creations.len(), 1);
    assert_eq!(plan.creations[0].key.node, "new");
    assert_eq!(plan.backing_off.len(), 100);
}

#[test]
fn backoff_of_routes_no_longer_wanted_is_forgotten() {
    let mut backoff = Backoff::default();
    backoff.failed(&RouteKey::new("gone", "10.120.9.0/24"), Instant::now());
    backoff.failed(&RouteKey::new("node-1", "10.120.0.0/24"), Instant::now());
    backoff.retain_wanted(&plan_for(&two_nodes(), &[], V4));
    assert_eq!(backoff.len(), 1);
}

#[test]
fn node_with_routes_but_no_pod_cidr_is_network_unavailable() {
    let nodes = vec![node("node-1", &[], &["10.1.1.1"])];
    let plan = plan_for(&nodes, &[route("node-1", "10.120.0.0/24")], V4);
    assert_eq!(plan.routes_created("node-1"), Some(false));
    assert_eq!(plan.deletions.len(), 1);
}

#[test]
fn created_routes_are_marked_kept() {
    let mut plan = plan_for(&two_nodes(), &[], V4);
    assert_eq!(plan.routes_created("node-1"), Some(false));
    plan.created(&RouteKey::new("node-1", "10.120.0.0/24"));
    assert_eq!(plan.routes_created("node-1"), Some(true));
}

// ---- TestUpdateNetworkingCondition ------------------------------------------------------------

fn condition(status: &str, reason: &str) -> NodeCondition {
    NodeCondition {
        type_: CONDITION_NETWORK_UNAVAILABLE.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some("set by someone".into()),
        last_transition_time: Some(Time("2020-01-01T00:00:00Z".parse().unwrap())),
        last_heartbeat_time: None,
    }
}

fn now() -> Time {
    Time(Timestamp::now())
}

/// The condition a patch writes: (status, reason, message, lastTransitionTime).
fn written(decision: &ConditionDecision) -> (String, String, String, String) {
    let ConditionDecision::Patch(patch) = decision else {
        panic!("expected a patch, got {decision:?}");
    };
    let c = &patch["status"]["conditions"][0];
    assert_eq!(c["type"], CONDITION_NETWORK_UNAVAILABLE);
    let s = |k: &str| c[k].as_str().unwrap().to_string();
    (
        s("status"),
        s("reason"),
        s("message"),
        s("lastTransitionTime"),
    )
}

/// Asserts that the decision for a node with `existing` (status, reason) is a patch writing
/// `want`; returns the written lastTransitionTime.
fn assert_writes(existing: Option<(&str, &str)>, created: bool, want: (&str, &str)) -> String {
    let existing = existing.map(|(status, reason)| condition(status, reason));
    let (status, reason, _, transition) =
        written(&network_condition(existing.as_ref(), created, &now()));
    assert_eq!((status.as_str(), reason.as_str()), want);
    transition
}

#[test]
fn update_networking_condition__no_existing_condition_routes_created_should_update() {
    let (status, reason, message, _) = written(&network_condition(None, true, &now()));
    assert_eq!(
        (status.as_str(), reason.as_str(), message.as_str()),
        ("False", "RouteCreated", "RouteController created a route")
    );
}

#[test]
fn update_networking_condition__no_existing_condition_routes_not_created_should_update() {
    let (status, reason, message, _) = written(&network_condition(None, false, &now()));
    assert_eq!(
        (status.as_str(), reason.as_str(), message.as_str()),
        (
            "True",
            "NoRouteCreated",
            "RouteController failed to create a route"
        )
    );
}

#[test]
fn update_networking_condition__existing_condition_with_same_status_and_reason_should_not_update() {
    let existing = condition("False", "RouteCreated");
    assert_eq!(
        network_condition(Some(&existing), true, &now()),
        ConditionDecision::Unchanged
    );
}

#[test]
fn update_networking_condition__existing_condition_with_same_status_but_different_reason_should_update()
 {
    assert_writes(
        Some(("False", "CalicoIsUp")),
        true,
        ("False", "RouteCreated"),
    );
}

#[test]
fn update_networking_condition__existing_condition_with_status_false_but_different_reason_should_update_when_routes_created()
 {
    assert_writes(
        Some(("False", "ExternalCNI")),
        true,
        ("False", "RouteCreated"),
    );
}

#[test]
fn update_networking_condition__existing_condition_with_status_true_and_different_reason_should_update_when_routes_not_created()
 {
    let transition = assert_writes(
        Some(("True", "SomethingElse")),
        false,
        ("True", "NoRouteCreated"),
    );
    assert_eq!(
        transition, "2020-01-01T00:00:00Z",
        "the status did not change"
    );
}

#[test]
fn update_networking_condition__existing_condition_with_status_false_transitioning_to_routes_not_created_should_update()
 {
    // Our own False: a route has gone missing since.
    let transition = assert_writes(
        Some(("False", "RouteCreated")),
        false,
        ("True", "NoRouteCreated"),
    );
    assert_ne!(transition, "2020-01-01T00:00:00Z", "the status changed now");
}

#[test]
fn update_networking_condition__existing_condition_with_status_true_and_no_route_created_reason_should_not_update()
 {
    let existing = condition("True", "NoRouteCreated");
    assert_eq!(
        network_condition(Some(&existing), false, &now()),
        ConditionDecision::Unchanged
    );
}

#[test]
fn update_networking_condition_with_calico_scenario() {
    let existing = condition("False", "CalicoIsUp");
    let (status, reason, message, transition) =
        written(&network_condition(Some(&existing), true, &now()));
    assert_eq!(status, "False");
    assert_eq!(reason, "RouteCreated");
    assert_eq!(message, "RouteController created a route");
    assert_eq!(transition, "2020-01-01T00:00:00Z", "still False since then");
}

#[test]
fn a_cnis_false_is_never_turned_true() {
    for reason in ["CalicoIsUp", "CiliumIsUp", ""] {
        let existing = condition("False", reason);
        assert_eq!(
            network_condition(Some(&existing), false, &now()),
            ConditionDecision::LeftToOtherWriter {
                reason: reason.into()
            }
        );
    }
}

// ---- TestHandleNodeUpdate ---------------------------------------------------------------------

fn watched(cidrs: &[&str], ips: &[&str], version: &str) -> Watched {
    Watched {
        pod_cidrs: cidrs.iter().map(|c| c.to_string()).collect(),
        addresses: ips
            .iter()
            .map(|ip| ("InternalIP".to_string(), ip.to_string()))
            .collect(),
        resource_version: Some(version.into()),
    }
}

#[test]
fn handle_node_update__internal_ip_updated() {
    let old = watched(&["10.120.0.0/24"], &["10.1.1.1"], "1");
    let new = watched(&["10.120.0.0/24"], &["10.1.1.9"], "2");
    assert!(update_triggers(&old, &new));
}

#[test]
fn handle_node_update__pod_cidr_updated() {
    let old = watched(&["10.120.0.0/24"], &["10.1.1.1"], "1");
    let new = watched(&["10.120.7.0/24"], &["10.1.1.1"], "2");
    assert!(update_triggers(&old, &new));
}

#[test]
fn handle_node_update__node_object_not_updated() {
    // Same version: an informer resync, which upstream turns into a periodic cleanup.
    let old = watched(&["10.120.0.0/24"], &["10.1.1.1"], "1");
    assert!(update_triggers(&old, &old.clone()));
}

#[test]
fn handle_node_update__unrelated_node_update() {
    let old = watched(&["10.120.0.0/24"], &["10.1.1.1"], "1");
    let new = watched(&["10.120.0.0/24"], &["10.1.1.1"], "2");
    assert!(!update_triggers(&old, &new));
}

#[test]
fn node_cache_changes_that_trigger_a_reconcile() {
    let one = watched(&["10.120.0.0/24"], &["10.1.1.1"], "1");
    let seen: HashMap<String, Watched> = [("a".to_string(), one.clone())].into();
    let same = seen.clone();
    assert!(!nodes_changed(&seen, &same), "nothing changed");
    let heartbeat: HashMap<String, Watched> = [(
        "a".to_string(),
        watched(&["10.120.0.0/24"], &["10.1.1.1"], "2"),
    )]
    .into();
    assert!(!nodes_changed(&seen, &heartbeat), "a status heartbeat");
    let added: HashMap<String, Watched> = [
        ("a".to_string(), one.clone()),
        ("b".to_string(), one.clone()),
    ]
    .into();
    assert!(nodes_changed(&seen, &added), "node added");
    assert!(nodes_changed(&added, &seen), "node deleted");
    let renamed: HashMap<String, Watched> = [("b".to_string(), one)].into();
    assert!(nodes_changed(&seen, &renamed), "one deleted, one added");
    let moved: HashMap<String, Watched> = [(
        "a".to_string(),
        watched(&["10.120.5.0/24"], &["10.1.1.1"], "2"),
    )]
    .into();
    assert!(nodes_changed(&seen, &moved), "pod CIDR changed");
}
