//! The lifecycle rules case by case, named after upstream's `Test_NodesDeleted` and
//! `Test_NodesShutdown` cases where one applies, with `now` passed in.
#![allow(clippy::unwrap_used)]

use super::*;
use k8s_openapi::api::core::v1::{Node, NodeCondition, NodeSpec, NodeStatus, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

fn node(ready: Option<&str>, taints: &[&str], created: Option<Timestamp>) -> CachedNode {
    let mut node = Node::default();
    node.metadata.name = Some("node0".into());
    node.metadata.uid = Some("uid-0".into());
    node.metadata.creation_timestamp = created.map(Time);
    node.spec = Some(NodeSpec {
        taints: Some(
            taints
                .iter()
                .map(|key| Taint {
                    key: (*key).into(),
                    effect: "NoSchedule".into(),
                    ..Taint::default()
                })
                .collect(),
        ),
        ..NodeSpec::default()
    });
    node.status = Some(NodeStatus {
        conditions: ready.map(|status| {
            vec![NodeCondition {
                type_: "Ready".into(),
                status: status.into(),
                ..NodeCondition::default()
            }]
        }),
        ..NodeStatus::default()
    });
    CachedNode::from(node)
}

fn wall() -> Timestamp {
    "2026-01-01T12:00:00Z".parse().unwrap()
}

fn created_ago(secs: i64) -> Option<Timestamp> {
    Some(wall() - k8s_openapi::jiff::SignedDuration::from_secs(secs))
}

fn careful() -> DeletionPolicy {
    DeletionPolicy {
        grace_period: Duration::from_secs(60),
        confirmations: 2,
        budget: Some(DeletionBudget {
            fraction: 0.1,
            window: Duration::from_secs(600),
        }),
    }
}

#[test]
fn nodes_deleted_node_is_not_ready_and_does_not_exist() {
    let n = node(Some("False"), &[], created_ago(3600));
    assert_eq!(first_look(&n, true), FirstLook::AskExistence);
    let mut state = DeletionState::default();
    let policy = DeletionPolicy::upstream();
    assert_eq!(state.admit(&n, &policy, 1, Instant::now(), wall()), Ok(()));
}

#[test]
fn nodes_deleted_node_ready_condition_is_unknown_node_does_not_exist() {
    let n = node(Some("Unknown"), &[], created_ago(3600));
    assert_eq!(first_look(&n, true), FirstLook::AskExistence);
}

#[test]
fn nodes_deleted_node_without_ready_condition_is_checked() {
    assert_eq!(
        first_look(&node(None, &[], None), true),
        FirstLook::AskExistence
    );
}

#[test]
fn nodes_deleted_node_is_ready_but_provider_said_it_is_deleted() {
    // A Ready node is never checked against the provider, so never deleted.
    assert_eq!(
        first_look(&node(Some("True"), &[], None), true),
        FirstLook::Skip
    );
}

#[test]
fn another_providers_node_is_left_alone() {
    assert_eq!(
        first_look(&node(Some("False"), &[], None), false),
        FirstLook::Skip
    );
}

#[test]
fn nodes_shutdown_node_is_ready_again_loses_the_shutdown_taint() {
    let n = node(Some("True"), &[TAINT_SHUTDOWN], None);
    assert_eq!(first_look(&n, true), FirstLook::RemoveShutdownTaint);
}

#[test]
fn nodes_shutdown_node_is_shutdown() {
    let n = node(Some("Unknown"), &[], None);
    assert_eq!(shutdown_taint(&n, true), Some(TaintChange::Add));
}

#[test]
fn nodes_shutdown_node_is_shutdown_and_already_tainted() {
    let n = node(Some("Unknown"), &[TAINT_SHUTDOWN], None);
    assert_eq!(shutdown_taint(&n, true), None);
}

#[test]
fn nodes_shutdown_node_is_not_shutdown() {
    let n = node(Some("Unknown"), &[], None);
    assert_eq!(shutdown_taint(&n, false), None);
}

#[test]
fn running_instance_loses_the_shutdown_taint_before_ready() {
    let n = node(Some("False"), &[TAINT_SHUTDOWN], None);
    assert_eq!(shutdown_taint(&n, false), Some(TaintChange::Remove));
}

#[test]
fn young_node_is_held_for_the_grace_period() {
    let mut state = DeletionState::default();
    let n = node(Some("False"), &[], created_ago(30));
    let got = state.admit(&n, &careful(), 10, Instant::now(), wall());
    assert_eq!(got, Err(Hold::GracePeriod));
}

#[test]
fn node_without_creation_time_counts_as_young() {
    let mut state = DeletionState::default();
    let n = node(Some("False"), &[], None);
    let got = state.admit(&n, &careful(), 10, Instant::now(), wall());
    assert_eq!(got, Err(Hold::GracePeriod));
}

#[test]
fn node_created_in_the_future_counts_as_young() {
    // Clock skew: the API server's clock is ahead of ours.
    let mut state = DeletionState::default();
    let n = node(Some("False"), &[], created_ago(-3600));
    let got = state.admit(&n, &careful(), 10, Instant::now(), wall());
    assert_eq!(got, Err(Hold::GracePeriod));
}

#[test]
fn deletion_waits_for_consecutive_confirmations() {
    let mut state = DeletionState::default();
    let n = node(Some("False"), &[], created_ago(3600));
    let now = Instant::now();
    assert_eq!(
        state.admit(&n, &careful(), 10, now, wall()),
        Err(Hold::Confirming)
    );
    assert_eq!(state.admit(&n, &careful(), 10, now, wall()), Ok(()));
}

#[test]
fn an_answer_other_than_not_found_restarts_the_confirmations() {
    let mut state = DeletionState::default();
    let n = node(Some("False"), &[], created_ago(3600));
    let now = Instant::now();
    assert_eq!(
        state.admit(&n, &careful(), 10, now, wall()),
        Err(Hold::Confirming)
    );
    state.not_gone("uid-0");
    assert_eq!(
        state.admit(&n, &careful(), 10, now, wall()),
        Err(Hold::Confirming)
    );
}

#[test]
fn deleted_nodes_are_forgotten() {
    let mut state = DeletionState::default();
    let n = node(Some("False"), &[], created_ago(3600));
    let now = Instant::now();
    let _ = state.admit(&n, &careful(), 10, now, wall());
    state.retain_nodes(&HashSet::new());
    assert_eq!(
        state.admit(&n, &careful(), 10, now, wall()),
        Err(Hold::Confirming)
    );
}

#[test]
fn budget_pauses_deletions_and_says_so() {
    let mut policy = careful();
    policy.confirmations = 1;
    let mut state = DeletionState::default();
    let now = Instant::now();
    let n = node(Some("False"), &[], created_ago(3600));
    // 10% of 10 nodes: one deletion per window.
    assert_eq!(state.admit(&n, &policy, 10, now, wall()), Ok(()));
    assert!(!state.budget_exhausted());
    assert_eq!(state.admit(&n, &policy, 10, now, wall()), Err(Hold::Budget));
    assert!(state.budget_exhausted());
    assert!(state.pause_started(), "reported once");
    assert_eq!(state.admit(&n, &policy, 10, now, wall()), Err(Hold::Budget));
    assert!(!state.pause_started(), "not again while paused");
    let later = now + Duration::from_secs(601);
    assert_eq!(state.admit(&n, &policy, 10, later, wall()), Ok(()));
    assert!(!state.budget_exhausted());
}

#[test]
fn budget_allows_a_fraction_per_window_and_at_least_one() {
    let budget = DeletionBudget {
        fraction: 0.1,
        window: Duration::from_secs(600),
    };
    let start = Instant::now();
    let mut recent = VecDeque::new();
    // 10% of 30 nodes = 3 deletions per window.
    for _ in 0..3 {
        assert!(budget_allows(&mut recent, start, 30, &budget));
    }
    assert!(!budget_allows(&mut recent, start, 30, &budget));
    // Once the window has passed, deletions resume.
    let later = start + Duration::from_secs(601);
    assert!(budget_allows(&mut recent, later, 30, &budget));
    // A small cluster still gets one deletion per window, never zero.
    let mut small = VecDeque::new();
    assert!(budget_allows(&mut small, start, 3, &budget));
    assert!(!budget_allows(&mut small, start, 3, &budget));
}

#[test]
fn an_inconclusive_answer_is_news_once_per_reason() {
    let mut state = DeletionState::default();
    assert!(state.inconclusive("uid-0", "UNAVAILABLE"));
    assert!(
        !state.inconclusive("uid-0", "UNAVAILABLE"),
        "not again every pass"
    );
    assert!(
        state.inconclusive("uid-0", "UNKNOWN"),
        "a new reason is news"
    );
    state.conclusive("uid-0");
    assert!(
        state.inconclusive("uid-0", "UNKNOWN"),
        "news again after an answer"
    );
    state.retain_nodes(&HashSet::new());
    assert!(
        state.inconclusive("uid-0", "UNKNOWN"),
        "a forgotten node starts afresh"
    );
}

#[test]
fn hold_reasons_are_the_metric_labels() {
    assert_eq!(Hold::GracePeriod.reason(), "grace_period");
    assert_eq!(Hold::Confirming.reason(), "confirming");
    assert_eq!(Hold::Budget.reason(), "budget");
}
