//! End to end: the `local` shim's inventory drives the cloud-node-lifecycle controller. A machine
//! marked shutdown gets the shutdown taint; a terminated or removed machine's NotReady Node is
//! deleted; a Ready Node is left alone even when its machine is gone (upstream semantics).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use cloud_controller_manager::well_known::TAINT_SHUTDOWN;
use common::*;
use e2e_tests::write_inventory;
use k8s_openapi::api::core::v1::{Event, Node, NodeCondition, NodeStatus};
use kube::api::{Api, ListParams, PostParams};
use test_support::wait_for;

fn has_taint(node: &Node, key: &str) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == key))
}

async fn set_ready(nodes: &Api<Node>, name: &str, status: &str) {
    let mut node = nodes.get_status(name).await.unwrap();
    let mut node_status = node.status.take().unwrap_or_default();
    node_status.conditions = Some(vec![NodeCondition {
        type_: "Ready".into(),
        status: status.into(),
        reason: Some("KubeletReady".into()),
        ..Default::default()
    }]);
    node.status = Some(NodeStatus { ..node_status });
    nodes
        .replace_status(name, &PostParams::default(), &node)
        .await
        .unwrap();
}

#[tokio::test]
async fn inventory_changes_drive_shutdown_taints_and_deletions() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (cp, client, dir) = start_control_plane().await;
    let d = dir.path();
    let inventory = write_inventory(d, INVENTORY).unwrap();
    let (_shim, socket) = spawn_local_shim_unix(
        d,
        &inventory,
        &["--inventory-reload-interval=200ms".into()],
        &[],
    );
    let _ccm = spawn_ccm_unix(
        &cp,
        &socket,
        "ccm",
        &[
            "--leader-elect=false".into(),
            "--node-monitor-period=1s".into(),
            // Nodes here are seconds old; keep the confirmation rule (default 2) but not the
            // grace period, and let both deletions through the budget.
            "--node-deletion-grace-period=0s".into(),
            "--node-deletion-budget-percent=100".into(),
        ],
        &[(
            "RUST_LOG",
            "info,cloud_controller_manager=debug".to_string(),
        )],
        d,
    );
    let nodes: Api<Node> = Api::all(client.clone());
    for name in ["node-a", "node-b", "node-c"] {
        create_tainted_node(&client, name).await;
    }
    for name in ["node-a", "node-b", "node-c"] {
        wait_initialised(&nodes, name, Duration::from_secs(30))
            .await
            .unwrap();
    }
    // node-a is Ready; node-b and node-c are NotReady (False / no condition at all).
    set_ready(&nodes, "node-a", "True").await;
    set_ready(&nodes, "node-b", "False").await;

    // node-c's machine is shut down: it gets the shutdown taint and is kept.
    let probe = nodes.clone();
    wait_for("node-c shutdown taint", Duration::from_secs(20), || {
        let nodes = probe.clone();
        async move {
            let node = nodes.get("node-c").await.map_err(|e| e.to_string())?;
            if has_taint(&node, TAINT_SHUTDOWN) {
                Ok(())
            } else {
                Err("no shutdown taint yet".into())
            }
        }
    })
    .await
    .unwrap();
    assert!(!has_taint(
        &nodes.get("node-b").await.unwrap(),
        TAINT_SHUTDOWN
    ));

    // node-b's machine is terminated and node-a's removed from the inventory.
    let edited = INVENTORY
        .replace(
            "    instanceType: local.large\n    zone: zone-b\n",
            "    instanceType: local.large\n    zone: zone-b\n    state: terminated\n",
        )
        .replace(
            "  - name: node-a\n    instanceID: m-a\n    instanceType: local.small\n    zone: zone-a\n    addresses:\n      - {type: InternalIP, address: 10.10.0.1}\n      - {type: Hostname, address: node-a.local}\n",
            "",
        );
    assert_ne!(edited, INVENTORY);
    assert!(edited.contains("state: terminated"), "{edited}");
    assert!(!edited.contains("node-a"), "{edited}");
    std::fs::write(&inventory, edited).unwrap();

    wait_deleted(&nodes, "node-b", Duration::from_secs(20))
        .await
        .unwrap();
    // node-a is Ready: never deleted, whatever the provider says. Give it a few periods.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(nodes.get_opt("node-a").await.unwrap().is_some());
    // Once node-a goes NotReady its missing machine gets it deleted.
    set_ready(&nodes, "node-a", "Unknown").await;
    wait_deleted(&nodes, "node-a", Duration::from_secs(20))
        .await
        .unwrap();

    // Events are written off the reconcile path: the second may land just after its deletion.
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let list = test_support::wait_for("two DeletingNode events", Duration::from_secs(10), || {
        let events = events.clone();
        async move {
            let list = events
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?;
            let count = list
                .items
                .iter()
                .filter(|e| e.reason.as_deref() == Some("DeletingNode"))
                .count();
            if count >= 2 {
                Ok(list)
            } else {
                Err(format!("{count} so far"))
            }
        }
    })
    .await
    .unwrap();
    let deleting: Vec<_> = list
        .items
        .iter()
        .filter(|e| e.reason.as_deref() == Some("DeletingNode"))
        .collect();
    assert_eq!(deleting.len(), 2, "{deleting:?}");
    for e in deleting {
        assert_eq!(e.involved_object.api_version.as_deref(), Some("v1"));
        assert_eq!(
            e.source.as_ref().and_then(|s| s.component.as_deref()),
            Some("cloud-node-lifecycle-controller")
        );
        assert!(
            e.message
                .as_deref()
                .unwrap_or_default()
                .contains("because it does not exist in the cloud provider")
        );
    }
    // node-c (shut down but existing) is still there.
    assert!(nodes.get_opt("node-c").await.unwrap().is_some());
}
