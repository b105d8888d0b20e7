//! Two controller-manager replicas against one real kube-apiserver: only the leader runs
//! controllers; when it is killed the standby takes over within the lease duration.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use e2e_tests::write_inventory;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use test_control_plane::ControlPlane;
use test_support::{Process, wait_for};

const LEASE: Duration = Duration::from_secs(6);
const RETRY: Duration = Duration::from_secs(1);

fn replica(
    cp: &ControlPlane,
    socket: &std::path::Path,
    label: &str,
    dir: &std::path::Path,
) -> Process {
    spawn_ccm_unix(
        cp,
        socket,
        label,
        &[
            "--leader-elect-lease-duration=6s".into(),
            "--leader-elect-renew-deadline=4s".into(),
            "--leader-elect-retry-period=1s".into(),
            "--leader-elect-resource-name=ccm-e2e".into(),
            "--controllers=cloud-node".into(),
        ],
        &[],
        dir,
    )
}

fn leads(p: &Process) -> bool {
    p.logs().contains("became leader")
}

fn runs_controllers(p: &Process) -> bool {
    p.logs().contains("started controller")
}

#[tokio::test]
async fn only_the_leader_runs_controllers_and_the_standby_takes_over() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (cp, client, dir) = start_control_plane().await;
    let d = dir.path();
    let inventory = write_inventory(d, INVENTORY).unwrap();
    // The shim fences on the lease the replicas elect on.
    let fence_lease = "--fence-lease=kube-system/ccm-e2e".to_string();
    let (_shim, socket) = spawn_local_shim_unix(d, &inventory, &[fence_lease], &[]);

    let mut first = replica(&cp, &socket, "ccm-1", d);
    let mut second = replica(&cp, &socket, "ccm-2", d);

    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-system");
    wait_for("a leader", Duration::from_secs(60), || {
        let (a, b) = (leads(&first), leads(&second));
        async move {
            if a || b {
                Ok(())
            } else {
                Err("no replica logged 'became leader'".into())
            }
        }
    })
    .await
    .unwrap();
    // Give the standby a few retry periods to (wrongly) start anything.
    tokio::time::sleep(RETRY * 3).await;
    assert!(
        leads(&first) ^ leads(&second),
        "exactly one leader expected"
    );
    let (leader, standby) = if leads(&first) {
        (&mut first, &mut second)
    } else {
        (&mut second, &mut first)
    };
    assert!(runs_controllers(leader), "{}", leader.logs());
    assert!(
        !runs_controllers(standby),
        "standby started controllers:\n{}",
        standby.logs()
    );
    let lease = leases.get("ccm-e2e").await.unwrap();
    let holder = lease.spec.unwrap().holder_identity.unwrap();

    // The leader initialises a node.
    create_tainted_node(&client, "node-a").await;
    let nodes: Api<Node> = Api::all(client.clone());
    wait_initialised(&nodes, "node-a", Duration::from_secs(30))
        .await
        .expect("node-a initialised by the first leader");

    // Kill the leader hard: no release, the standby must wait the lease out.
    leader.kill();
    let killed = Instant::now();
    let standby_ref = &*standby;
    wait_for("the standby to take over", LEASE + RETRY * 4, || {
        let took_over = leads(standby_ref);
        async move {
            if took_over {
                Ok(())
            } else {
                Err("standby not leading yet".into())
            }
        }
    })
    .await
    .unwrap();
    let takeover = killed.elapsed();
    let lease = leases.get("ccm-e2e").await.unwrap();
    let spec = lease.spec.unwrap();
    assert_ne!(spec.holder_identity.unwrap(), holder);
    assert!(spec.lease_transitions.unwrap_or(0) >= 1);

    // The new leader runs the controllers.
    create_tainted_node(&client, "node-b").await;
    wait_initialised(&nodes, "node-b", Duration::from_secs(30))
        .await
        .expect("node-b initialised by the new leader");
    eprintln!("takeover after SIGKILL took {takeover:?}");
}
