//! End to end: the `local` shim binary and the controller-manager binary as processes, talking
//! mutual TLS over a real socket, initialise nodes registered in a real kube-apiserver.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use e2e_tests::write_inventory;
use k8s_openapi::api::core::v1::Event;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};
use test_support::{ShimMtls, free_port, wait_for};

#[tokio::test]
async fn local_shim_and_ccm_initialise_nodes_over_mtls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (cp, client, dir) = start_control_plane().await;
    let d = dir.path();

    let mtls = ShimMtls::write(d, "cpi-test-ca").unwrap();
    let inventory = write_inventory(d, INVENTORY).unwrap();
    let port = free_port().unwrap();

    let _shim = spawn_local_shim(d, &inventory, &mtls.shim_args(port), &[]);
    let mut ccm_args = mtls.ccm_args(port);
    ccm_args.extend([
        format!("--secure-port={}", free_port().unwrap()),
        "--bind-address=127.0.0.1".into(),
        "--cloud-provider=local".into(),
    ]);
    let _ccm = spawn_ccm(&cp, "ccm", &ccm_args, &[], d);

    create_tainted_node(&client, "node-a").await;
    create_tainted_node(&client, "node-b").await;

    let nodes: Api<Node> = Api::all(client.clone());
    for name in ["node-a", "node-b"] {
        wait_initialised(&nodes, name, Duration::from_secs(60))
            .await
            .unwrap();
    }

    let a = nodes.get("node-a").await.unwrap();
    assert_eq!(
        a.spec.as_ref().unwrap().provider_id.as_deref(),
        Some("local://m-a")
    );
    let l = labels(&a);
    assert_eq!(l["topology.kubernetes.io/zone"], "zone-a");
    assert_eq!(l["failure-domain.beta.kubernetes.io/zone"], "zone-a");
    assert_eq!(l["topology.kubernetes.io/region"], "local-region");
    assert_eq!(l["node.kubernetes.io/instance-type"], "local.small");
    assert_eq!(l["beta.kubernetes.io/instance-type"], "local.small");
    let addresses = a.status.unwrap().addresses.unwrap();
    assert!(
        addresses
            .iter()
            .any(|x| x.type_ == "InternalIP" && x.address == "10.10.0.1"),
        "{addresses:?}"
    );
    // The provider returned a Hostname, so the kubelet's one is replaced.
    assert!(
        addresses
            .iter()
            .all(|x| x.type_ != "Hostname" || x.address == "node-a.local"),
        "{addresses:?}"
    );

    let b = nodes.get("node-b").await.unwrap();
    let b_addresses = b.status.unwrap().addresses.unwrap();
    // The provider gave no Hostname for node-b: the kubelet's is kept, last.
    assert_eq!(
        b_addresses
            .last()
            .map(|x| (x.type_.as_str(), x.address.as_str())),
        Some(("Hostname", "node-b-kubelet")),
        "{b_addresses:?}"
    );

    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    wait_for(
        "the Synced event of node-a",
        Duration::from_secs(20),
        || {
            let events = events.clone();
            async move {
                let list = events
                    .list(&ListParams::default())
                    .await
                    .map_err(|e| e.to_string())?;
                list.items
                    .iter()
                    .find(|e| {
                        e.reason.as_deref() == Some("Synced")
                            && e.involved_object.name.as_deref() == Some("node-a")
                            && e.involved_object.api_version.as_deref() == Some("v1")
                            && e.source.as_ref().and_then(|s| s.component.as_deref())
                                == Some("cloud-node-controller")
                    })
                    .map(|_| ())
                    .ok_or_else(|| format!("{} events, none Synced for node-a", list.items.len()))
            }
        },
    )
    .await
    .unwrap();
}
