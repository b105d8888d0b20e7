//! The leader fence on mutating calls, end to end over a real socket: the provider handle the
//! controllers get stamps every mutating request with the *current* term's fence (as leader
//! election updates it), and the shim framework refuses a deposed leader's call.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use cloud_controller_manager::{Cloud, Fence};
use fake_provider::{CpiError, FakeCloud, proto};
use support::harness;
use tokio::sync::watch;

const LEASE: &str = "kube-system/cloud-controller-manager";
/// The Lease's UID; [`RECREATED`] after it was deleted and created again.
const UID: &str = "8d3f2c1a-0000-4000-8000-000000000001";
const RECREATED: &str = "8d3f2c1a-0000-4000-8000-000000000002";

fn fence(holder: &str, term: i64) -> Fence {
    fence_of(UID, holder, term)
}

fn fence_of(uid: &str, holder: &str, term: i64) -> Fence {
    Fence {
        lease: LEASE.into(),
        holder_identity: holder.into(),
        lease_transitions: term,
        lease_uid: uid.into(),
    }
}

/// One mutating call (AddSSHKeyToAllInstances: the fake provider does not implement it, so a
/// call that passes the fence fails with NOT_IMPLEMENTED, one that does not with STALE_LEADER).
async fn mutate(cloud: &Cloud) -> Result<(), CpiError> {
    let request = cloud.fenced(proto::AddSshKeyRequest {
        user: "core".into(),
        key_data: b"ssh-ed25519 AAAA".to_vec(),
        fence: None,
    });
    let result = cloud
        .call(
            "Instances/AddSSHKeyToAllInstances",
            cloud.instances().add_ssh_key_to_all_instances(request),
        )
        .await;
    match result {
        Ok(_) | Err(CpiError::NotImplemented(_)) => Ok(()),
        Err(err) => Err(err),
    }
}

#[tokio::test]
async fn mutating_calls_carry_the_current_term_and_a_deposed_leader_is_refused() {
    let h = harness(FakeCloud::default()).await;
    let (first_term, first_fence) = watch::channel(None);
    let first = h.cloud.clone().with_fence(first_fence);
    let (_, second_fence) = watch::channel(Some(fence("replica-b", 2)));
    let second = h.cloud.clone().with_fence(second_fence);

    // Leader election hands replica A term 1: its calls carry it and pass.
    first_term.send_replace(Some(fence("replica-a", 1)));
    assert_eq!(first.fence(), Some(fence("replica-a", 1)));
    mutate(&first).await.expect("term 1 accepted");

    // Replica B takes over (term 2) and speaks: A's late write is refused.
    mutate(&second).await.expect("term 2 accepted");
    match mutate(&first).await {
        Err(CpiError::StaleLeader(message)) => assert!(!message.is_empty()),
        other => panic!("a deposed leader's call must be refused as stale, got {other:?}"),
    }

    // When A wins the lease again (term 3), the same handle carries the new term at once.
    first_term.send_replace(Some(fence("replica-a", 3)));
    mutate(&first).await.expect("term 3 accepted");
    match mutate(&second).await {
        Err(CpiError::StaleLeader(_)) => {}
        other => panic!("B is deposed now, got {other:?}"),
    }
}

#[tokio::test]
async fn a_forged_term_cannot_lock_out_the_leader_and_a_recreated_lease_is_accepted() {
    let h = harness(FakeCloud::default()).await;
    let (term, leader_fence) = watch::channel(Some(fence("replica-a", 4)));
    let leader = h.cloud.clone().with_fence(leader_fence);
    mutate(&leader).await.expect("term 4 accepted");

    // Another client claims the lease at i64::MAX (under its UID or a made-up one), or names
    // another lease: refused, and the leader's next call still passes.
    let mut other_lease = fence("rogue", 5);
    other_lease.lease = "kube-system/rogue".into();
    for forged in [
        fence("rogue", i64::MAX),
        fence_of("made-up", "rogue", i64::MAX),
        other_lease,
    ] {
        let (_, forged_fence) = watch::channel(Some(forged.clone()));
        match mutate(&h.cloud.clone().with_fence(forged_fence)).await {
            Err(CpiError::InvalidObject { .. }) => {}
            other => panic!("{forged:?} must be refused as invalid, got {other:?}"),
        }
        mutate(&leader).await.expect("the leader is not locked out");
    }

    // The Lease is deleted and created again: new UID, transitions back at 0.
    term.send_replace(Some(fence_of(RECREATED, "replica-b", 0)));
    mutate(&leader)
        .await
        .expect("the recreated Lease's leader is accepted");
}
