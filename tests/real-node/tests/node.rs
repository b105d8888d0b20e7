//! The real node itself: it registers as a kubelet with `--cloud-provider=external` does, runs a
//! pod from a locally built image, and leaves the host as it found it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, PostParams};
use real_node::{Cluster, ClusterOptions, busybox_image};

const UNINITIALIZED: &str = "node.cloudprovider.kubernetes.io/uninitialized";

#[tokio::test]
async fn node_registers_uninitialised_runs_a_pod_and_is_undone() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let cluster = Cluster::start(ClusterOptions::default())
        .await
        .unwrap_or_else(|e| panic!("starting the real node: {e}"));
    eprintln!("real node up in {:?}", cluster.startup_duration());
    let client = cluster.client().unwrap();

    // The kubelet registers with the taint that waits for a cloud controller manager.
    let node = Api::<Node>::all(client.clone())
        .get(cluster.node_name())
        .await
        .unwrap();
    let taints = node.spec.and_then(|s| s.taints).unwrap_or_default();
    assert!(
        taints
            .iter()
            .any(|t| t.key == UNINITIALIZED && t.effect == "NoSchedule"),
        "Node {} should carry {UNINITIALIZED}:NoSchedule, has {taints:?}",
        cluster.node_name()
    );

    // A pod from a locally built image, imported into containerd, serves a page on its IP.
    let images = tempfile::tempdir().unwrap();
    let image = busybox_image(
        images.path(),
        "ccm.local/web:test",
        "hello from a real pod\n",
    )
    .unwrap();
    cluster.import_image(&image.path).unwrap();
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "tolerations": [{"key": UNINITIALIZED, "operator": "Exists"}],
            "containers": [{
                "name": "web", "image": image.name, "imagePullPolicy": "Never",
                "args": ["httpd", "-f", "-p", "8080", "-h", "/www"],
            }],
        }
    }))
    .unwrap();
    let pods = Api::<Pod>::namespaced(client.clone(), "default");
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let ip = test_support::wait_for(
        "pod web Running with an IP",
        Duration::from_secs(90),
        || {
            let pods = pods.clone();
            async move {
                let p = pods.get("web").await.map_err(|e| e.to_string())?;
                let status = p.status.unwrap_or_default();
                match (status.phase.as_deref(), status.pod_ip) {
                    (Some("Running"), Some(ip)) => Ok(ip),
                    (phase, _) => Err(format!(
                        "phase {phase:?}, conditions {:?}",
                        status.container_statuses
                    )),
                }
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\nkubelet:\n{}", cluster.log_tail("kubelet", 40)));
    let page = test_support::wait_for("the pod's page", Duration::from_secs(20), || {
        let url = format!("{ip}:8080");
        async move { test_support::http_get(&url).await }
    })
    .await
    .unwrap();
    assert!(page.contains("hello from a real pod"), "{page}");

    drop(cluster);
    // The host is as before: no bridge, no kube-proxy chains.
    assert!(
        !std::path::Path::new("/sys/class/net/ccmcni0").exists(),
        "the CNI bridge is left behind"
    );
    let rules = std::process::Command::new("iptables-save")
        .output()
        .unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(
        !rules.contains("KUBE-SERVICES"),
        "kube-proxy's chains are left behind:\n{rules}"
    );
}
