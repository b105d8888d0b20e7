//! The rules and the ledger, with upstream `range_allocator_test.go` cases named after theirs.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, NodeSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::*;

fn net(text: &str) -> IpNet {
    text.parse().expect("CIDR")
}

fn nets(texts: &[&str]) -> Vec<IpNet> {
    texts.iter().map(|t| net(t)).collect()
}

fn node(name: &str, cidrs: &[&str]) -> Arc<CachedNode> {
    Arc::new(CachedNode::from(Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            uid: Some(format!("uid-{name}")),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec {
            pod_cidr: cidrs.first().map(|c| (*c).to_string()),
            pod_cidrs: (!cidrs.is_empty())
                .then(|| cidrs.iter().map(|c| (*c).to_string()).collect()),
            ..NodeSpec::default()
        }),
        status: None,
    }))
}

fn settings(pools: &[(&str, u8)], service: &[&str]) -> IpamSettings {
    IpamSettings {
        pools: pools.iter().map(|(c, m)| (net(c), *m)).collect(),
        service_ranges: nets(service),
        settle: Duration::ZERO,
    }
}

fn ledger(pools: &[(&str, u8)], service: &[&str]) -> Ledger {
    Ledger::new(&settings(pools, service), &IpamMetrics::default()).expect("ledger")
}

/// The CIDRs of every patch in `steps`.
fn patched(steps: &[Step]) -> Vec<(String, Vec<IpNet>)> {
    steps
        .iter()
        .filter_map(|s| match s {
            Step::Patch { node, cidrs, .. } => Some((node.clone(), cidrs.clone())),
            Step::Full { .. } => None,
        })
        .collect()
}

/// One allocation round for `nodes` (observe, then next steps).
fn round(ledger: &mut Ledger, nodes: &[Arc<CachedNode>], now: Instant) -> Vec<Step> {
    ledger.observe(nodes);
    ledger.next_steps(nodes, now, usize::MAX)
}

#[test]
fn decide_actions() {
    let sets = ledger(&[("10.0.0.0/16", 24)], &[]);
    assert_eq!(decide(&node("a", &[]), sets.sets()), Action::Allocate);
    assert_eq!(
        decide(&node("a", &["10.0.3.0/24"]), sets.sets()),
        Action::Occupy(nets(&["10.0.3.0/24"]))
    );
    // Someone else's range, or garbage: not ours to track, and never re-assigned.
    assert_eq!(
        decide(&node("a", &["192.168.0.0/24"]), sets.sets()),
        Action::None
    );
    assert_eq!(decide(&node("a", &["bogus"]), sets.sets()), Action::None);
    let mut sets = sets;
    sets.observe(&[node("a", &["10.0.3.0/24"])]);
    assert_eq!(
        decide(&node("a", &["10.0.3.0/24"]), sets.sets()),
        Action::None
    );
}

#[test]
fn correctly_filter_out_service_cidr() {
    let mut l = ledger(&[("127.123.234.0/24", 30)], &["127.123.234.0/26"]);
    let steps = round(&mut l, &[node("node0", &[])], Instant::now());
    assert_eq!(
        patched(&steps),
        vec![("node0".into(), nets(&["127.123.234.64/30"]))]
    );
}

#[test]
fn correctly_ignore_already_allocated_cidrs() {
    let mut l = ledger(&[("127.123.234.0/24", 30)], &["127.123.234.0/26"]);
    let mut nodes = vec![node("node0", &[])];
    for (i, cidr) in [
        "127.123.234.64/30",
        "127.123.234.68/30",
        "127.123.234.72/30",
        "127.123.234.80/30",
    ]
    .iter()
    .enumerate()
    {
        nodes.push(node(&format!("other{i}"), &[cidr]));
    }
    let steps = round(&mut l, &nodes, Instant::now());
    assert_eq!(
        patched(&steps),
        vec![("node0".into(), nets(&["127.123.234.76/30"]))]
    );
}

#[test]
fn dualstack_cidrs_v4_v6() {
    let mut l = ledger(
        &[("127.123.234.0/8", 24), ("ace:cab:deca::/84", 98)],
        &["127.123.234.0/26"],
    );
    let steps = round(&mut l, &[node("node0", &[])], Instant::now());
    assert_eq!(
        patched(&steps),
        vec![("node0".into(), nets(&["127.0.0.0/24", "ace:cab:deca::/98"]))]
    );
}

#[test]
fn dualstack_cidrs_v6_v4() {
    let mut l = ledger(&[("ace:cab:deca::/84", 98), ("127.123.234.0/8", 24)], &[]);
    let steps = round(&mut l, &[node("node0", &[])], Instant::now());
    assert_eq!(
        patched(&steps),
        vec![("node0".into(), nets(&["ace:cab:deca::/98", "127.0.0.0/24"]))]
    );
}

#[test]
fn no_double_counting() {
    let mut l = ledger(&[("10.10.0.0/22", 24)], &[]);
    let existing = [
        node("node0", &["10.10.0.0/24"]),
        node("node1", &["10.10.1.0/24"]),
        node("node2", &["10.10.2.0/24"]),
    ];
    l.observe(&existing);
    l.observe(&existing);
    assert_eq!(l.sets()[0].allocated(), 3);
    let mut nodes = existing.to_vec();
    nodes.push(node("node3", &[]));
    let steps = round(&mut l, &nodes, Instant::now());
    assert_eq!(
        patched(&steps),
        vec![("node3".into(), nets(&["10.10.3.0/24"]))]
    );
    nodes.push(node("node4", &[]));
    let steps = round(&mut l, &nodes, Instant::now());
    assert!(
        matches!(steps.as_slice(), [Step::Full { node, .. }] if node == "node4"),
        "{steps:?}"
    );
}

#[test]
fn full_dual_stack_range_takes_nothing_from_the_other_family() {
    let mut l = ledger(&[("10.0.0.0/24", 25), ("fd00::/120", 120)], &[]);
    let now = Instant::now();
    let first = round(&mut l, &[node("a", &[])], now);
    assert_eq!(patched(&first).len(), 1);
    let steps = round(&mut l, &[node("a", &[]), node("b", &[])], now);
    assert!(matches!(steps.as_slice(), [Step::Full { .. }]), "{steps:?}");
    // The IPv4 block taken for b was given back.
    assert_eq!(l.sets()[0].allocated(), 1);
}

#[test]
fn a_deleted_nodes_cidr_is_freed_once_the_delete_is_seen() {
    let mut l = ledger(&[("10.0.0.0/23", 24)], &[]);
    let now = Instant::now();
    let a = node("a", &["10.0.0.0/24"]);
    let b = node("b", &["10.0.1.0/24"]);
    l.observe(&[a.clone(), b.clone()]);
    let steps = round(&mut l, &[a.clone(), b, node("c", &[])], now);
    assert!(matches!(steps.as_slice(), [Step::Full { .. }]));
    // b is deleted: c (retried at once, room being back) gets its CIDR.
    let steps = round(&mut l, &[a, node("c", &[])], now);
    assert_eq!(patched(&steps), vec![("c".into(), nets(&["10.0.1.0/24"]))]);
}

#[test]
fn a_node_with_pod_cidrs_is_respected_and_its_cidr_never_handed_out() {
    let mut l = ledger(&[("10.0.0.0/16", 24)], &[]);
    let foreign = node("foreign", &["10.0.0.0/24"]);
    let steps = round(&mut l, &[foreign.clone(), node("a", &[])], Instant::now());
    assert_eq!(patched(&steps), vec![("a".into(), nets(&["10.0.1.0/24"]))]);
}

#[test]
fn pod_cidrs_landing_during_a_patch_are_taken_into_account() {
    let mut l = ledger(&[("10.0.0.0/16", 24)], &[]);
    let now = Instant::now();
    let steps = round(&mut l, &[node("a", &[])], now);
    assert_eq!(patched(&steps), vec![("a".into(), nets(&["10.0.0.0/24"]))]);
    // The patch is under way: a is not allocated again.
    assert!(round(&mut l, &[node("a", &[])], now).is_empty());
    l.finished("a", Outcome::Patched, now);
    assert!(round(&mut l, &[node("a", &[])], now).is_empty());
    // The cache shows it: nothing pending, the CIDR stays used.
    let observed = l.observe(&[node("a", &["10.0.0.0/24"])]);
    assert_eq!(observed.foreign_changes, 0);
    assert_eq!(l.sets()[0].allocated(), 1);
    // Another writer's podCIDRs are reported as such.
    let observed = l.observe(&[node("a", &["10.0.0.0/24"]), node("x", &["10.0.9.0/24"])]);
    assert_eq!(observed.foreign_changes, 1);
}

#[test]
fn a_refused_patch_frees_the_cidrs_and_backs_off() {
    let mut l = ledger(&[("10.0.0.0/16", 24)], &[]);
    let now = Instant::now();
    let nodes = [node("a", &[])];
    round(&mut l, &nodes, now);
    l.finished("a", Outcome::NotApplied, now);
    assert_eq!(l.sets()[0].allocated(), 0);
    assert!(round(&mut l, &nodes, now).is_empty(), "backing off");
    assert_eq!(l.next_retry(now), Some(now + BACKOFF_BASE));
    let later = now + BACKOFF_BASE;
    let steps = round(&mut l, &nodes, later);
    // Round-robin: the next block, not the one just freed.
    assert_eq!(patched(&steps), vec![("a".into(), nets(&["10.0.1.0/24"]))]);
    l.finished("a", Outcome::NotApplied, later);
    assert_eq!(l.next_retry(later), Some(later + BACKOFF_BASE * 2));
}

#[test]
fn a_patch_without_answer_keeps_the_cidrs_and_retries_them() {
    let mut l = ledger(&[("10.0.0.0/16", 24)], &[]);
    let now = Instant::now();
    let nodes = [node("a", &[]), node("b", &[])];
    let steps = round(&mut l, &nodes[..1], now);
    assert_eq!(patched(&steps), vec![("a".into(), nets(&["10.0.0.0/24"]))]);
    l.finished("a", Outcome::Unknown, now);
    // Still reserved for a: b gets another one.
    let steps = round(&mut l, &nodes, now);
    assert_eq!(patched(&steps), vec![("b".into(), nets(&["10.0.1.0/24"]))]);
    let steps = round(&mut l, &nodes, now + BACKOFF_BASE);
    assert_eq!(patched(&steps), vec![("a".into(), nets(&["10.0.0.0/24"]))]);
}

#[test]
fn pod_cidrs_set_by_someone_else_win_over_ours() {
    let mut l = ledger(&[("10.0.0.0/16", 24)], &[]);
    let now = Instant::now();
    round(&mut l, &[node("a", &[])], now);
    l.finished("a", Outcome::Taken(nets(&["10.0.7.0/24"])), now);
    assert!(l.sets()[0].is_occupied(&net("10.0.7.0/24")).unwrap());
    assert!(!l.sets()[0].is_occupied(&net("10.0.0.0/24")).unwrap());
    assert!(round(&mut l, &[node("a", &["10.0.7.0/24"])], now).is_empty());
}

#[test]
fn a_node_gone_during_its_patch_frees_the_cidrs() {
    let mut l = ledger(&[("10.0.0.0/16", 24)], &[]);
    let now = Instant::now();
    round(&mut l, &[node("a", &[])], now);
    l.observe(&[]);
    assert_eq!(l.sets()[0].allocated(), 0);
    l.finished("a", Outcome::Gone, now);
    assert_eq!(l.next_retry(now), None);
}

#[test]
fn a_cidr_on_two_nodes_stays_used_while_one_holds_it() {
    let mut l = ledger(&[("10.0.0.0/16", 24)], &[]);
    let a = node("a", &["10.0.0.0/24"]);
    let b = node("b", &["10.0.0.0/24"]);
    l.observe(&[a.clone(), b]);
    l.observe(&[a]);
    assert!(l.sets()[0].is_occupied(&net("10.0.0.0/24")).unwrap());
}

#[test]
fn a_freed_cidr_inside_a_service_range_stays_used() {
    let mut l = ledger(&[("10.0.0.0/16", 24)], &["10.0.0.0/24"]);
    l.observe(&[node("a", &["10.0.0.0/24"])]);
    l.observe(&[]);
    assert!(l.sets()[0].is_occupied(&net("10.0.0.0/24")).unwrap());
}

#[test]
fn the_step_limit_is_honoured() {
    let mut l = ledger(&[("10.0.0.0/16", 24)], &[]);
    let nodes: Vec<_> = (0..5).map(|i| node(&format!("n{i}"), &[])).collect();
    l.observe(&nodes);
    assert_eq!(l.next_steps(&nodes, Instant::now(), 2).len(), 2);
    assert_eq!(l.next_steps(&nodes, Instant::now(), 10).len(), 3);
}

#[test]
fn a_new_allocator_settles_only_after_an_unreleased_or_unknown_predecessor() {
    assert!(!must_settle(Some(&Predecessor::None)));
    assert!(must_settle(Some(&Predecessor::Unreleased(
        "replica-a".into()
    ))));
    assert!(must_settle(None), "unknown: a predecessor is assumed");
}

#[test]
fn a_cidr_freed_by_a_failed_patch_stays_marked_while_another_node_shows_it() {
    // Another writer put the block we were patching onto a second node; our patch is then
    // refused. Freeing ours must not free the second node's.
    let mut ledger = ledger(&[("10.0.0.0/24", 26)], &[]);
    let a = node("a", &[]);
    let now = Instant::now();
    let steps = round(&mut ledger, std::slice::from_ref(&a), now);
    let [(_, cidrs)] = patched(&steps).try_into().expect("one patch");
    let cidr = cidrs[0].to_string();
    let b = node("b", &[&cidr]);
    round(&mut ledger, &[a.clone(), b.clone()], now);
    ledger.finished("a", Outcome::NotApplied, now);
    let later = now + BACKOFF_MAX;
    let steps = round(&mut ledger, &[a, b], later);
    let again = patched(&steps);
    assert_eq!(again.len(), 1);
    assert_ne!(again[0].1, cidrs, "b's block handed out again");
}

#[test]
fn node_names_hash_apart() {
    use std::hash::BuildHasher;
    let hasher = BuildHasherDefault::<NameHasher>::default();
    let names: Vec<String> = (0..20_000)
        .map(|i| format!("bench-rt-node-{i}"))
        .chain((0..=255).map(|i| format!("ip-10-0-{i}-17.ec2.internal")))
        .collect();
    let hashes: std::collections::HashSet<u64> =
        names.iter().map(|name| hasher.hash_one(name)).collect();
    assert_eq!(hashes.len(), names.len(), "two node names hash alike");
    assert_ne!(hasher.hash_one("node-a"), hasher.hash_one("node-a\0"));
}
