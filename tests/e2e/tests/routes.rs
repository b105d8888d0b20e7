//! End to end: pod networking on the `local` provider. Nodes registered by "kubelets" are
//! initialised by the cloud-node controller, get pod CIDRs from the node-ipam controller, and
//! routes from the route controller, which the `local` shim programs into a routing table of a
//! network namespace made for the test; the test reads the table with `ip`, as an operator would.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use e2e_tests::write_inventory;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams};
use test_support::{Netns, wait_for};

const WAIT: Duration = Duration::from_secs(60);
const TABLE: &str = "100";
const CLUSTER_CIDR: &str = "10.210.0.0/16";

/// Three machines whose InternalIPs are on the namespace's link (10.201.0.0/24).
fn inventory() -> String {
    let mut out = String::from("region: rt-region\nmachines:\n");
    for i in 1..=3 {
        out.push_str(&format!(
            "  - name: rt-node-{i}\n    instanceID: m-rt-{i}\n    instanceType: local.small\n    zone: zone-a\n    addresses:\n      - {{type: InternalIP, address: 10.201.0.1{i}}}\n"
        ));
    }
    out
}

/// The node's first pod CIDR, once the node-ipam controller has set it.
async fn pod_cidr(nodes: &Api<Node>, name: &str) -> String {
    wait_for(&format!("{name} to get a pod CIDR"), WAIT, || async {
        let node = nodes.get(name).await.map_err(|e| e.to_string())?;
        node.spec
            .and_then(|s| s.pod_cidrs)
            .and_then(|c| c.into_iter().next())
            .ok_or_else(|| "no podCIDRs yet".to_string())
    })
    .await
    .unwrap()
}

/// The routing table's line for `cidr`, if any.
fn route_line(netns: &Netns, cidr: &str) -> Option<String> {
    netns
        .routes(TABLE)
        .unwrap()
        .into_iter()
        .find(|line| line.split_whitespace().next() == Some(cidr))
}

async fn network_available(nodes: &Api<Node>, name: &str) {
    wait_for(
        &format!("{name} to have NetworkUnavailable=False"),
        WAIT,
        || async {
            let node = nodes.get(name).await.map_err(|e| e.to_string())?;
            let condition = node
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .into_iter()
                .find(|c| c.type_ == "NetworkUnavailable")
                .ok_or_else(|| "no NetworkUnavailable condition yet".to_string())?;
            if condition.status == "False" && condition.reason.as_deref() == Some("RouteCreated") {
                Ok(())
            } else {
                Err(format!("{condition:?}"))
            }
        },
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn every_node_gets_a_pod_cidr_and_a_kernel_route_and_a_deleted_node_loses_its_route() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let netns = Netns::create().expect(
        "this suite needs root and iproute2's `ip` to make a network namespace (run as root)",
    );
    netns.add_link("ccm0", &["10.201.0.1/24"]).unwrap();
    // Someone else's route inside the cluster CIDR: reported by the shim, never deleted.
    netns
        .ip(&[
            "route",
            "add",
            "10.210.250.0/24",
            "via",
            "10.201.0.99",
            "table",
            TABLE,
            "proto",
            "static",
        ])
        .unwrap();
    let (cp, client, dir) = start_control_plane().await;
    let d = dir.path();
    let inventory = write_inventory(d, &inventory()).unwrap();
    let (_shim, socket) = spawn_local_shim_unix(
        d,
        &inventory,
        &[
            format!("--route-netns={}", netns.name()),
            format!("--route-table={TABLE}"),
        ],
        &[],
    );
    let _ccm = spawn_ccm_unix(
        &cp,
        &socket,
        "cloud-controller-manager",
        &[
            "--cloud-provider=local".into(),
            "--cluster-name=e2e".into(),
            "--allocate-node-cidrs=true".into(),
            format!("--cluster-cidr={CLUSTER_CIDR}"),
            "--route-reconciliation-period=1s".into(),
        ],
        &[],
        d,
    );

    let nodes: Api<Node> = Api::all(client.clone());
    let mut cidrs = Vec::new();
    for i in 1..=3 {
        let name = format!("rt-node-{i}");
        create_tainted_node(&client, &name).await;
        wait_initialised(&nodes, &name, WAIT).await.unwrap();
        cidrs.push(pod_cidr(&nodes, &name).await);
    }
    let mut distinct = cidrs.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "pod CIDRs handed out twice: {cidrs:?}");

    for (i, cidr) in cidrs.iter().enumerate() {
        let name = format!("rt-node-{}", i + 1);
        let gateway = format!("10.201.0.1{}", i + 1);
        wait_for(
            &format!("a route for {cidr} via {gateway}"),
            WAIT,
            || async {
                match route_line(&netns, cidr) {
                    Some(line) if line.contains(&format!("via {gateway} ")) => Ok(()),
                    other => Err(format!("table {TABLE} has {other:?}")),
                }
            },
        )
        .await
        .unwrap();
        network_available(&nodes, &name).await;
    }

    // A deleted node's route goes; the others and the foreign one stay.
    nodes
        .delete("rt-node-2", &DeleteParams::default())
        .await
        .unwrap();
    wait_for(
        &format!("the route for {} to go", cidrs[1]),
        WAIT,
        || async {
            match route_line(&netns, &cidrs[1]) {
                None => Ok(()),
                Some(line) => Err(format!("still there: {line}")),
            }
        },
    )
    .await
    .unwrap();
    // Several reconcile periods pass while the foreign route is in the cluster CIDR.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let table = netns.routes(TABLE).unwrap();
    for cidr in [&cidrs[0], &cidrs[2]] {
        assert!(route_line(&netns, cidr).is_some(), "{cidr} gone: {table:?}");
    }
    assert!(
        route_line(&netns, "10.210.250.0/24").is_some(),
        "a route the shim did not make was deleted: {table:?}"
    );
}
