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

fn fence(holder: &str, term: i64) -> Fence {
    Fence {
        lease: LEASE.into(),
        holder_identity: holder.into(),
        lease_transitions: term,
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
