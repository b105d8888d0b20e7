//! The whole stack as pods on a real node: `kubectl apply -k` of the `local` overlay (with the
//! images built here and imported into the node's containerd) on the single-node cluster of
//! `real-node`, whose kubelet runs with `--cloud-provider=external`. Checks, in order: the
//! controller-manager pod initialises the kubelet's Node through the shim pod; a LoadBalancer
//! Service in front of a real pod gets an address from the shim and a client on the host reaches
//! the pod through it (shim → node port → kube-proxy → pod); the webhook pod labels a
//! PersistentVolume and refuses a bad load-balancer annotation; the pods run as their own
//! service accounts, which cannot act outside their RBAC; and when the leading controller-manager
//! pod is killed the other replica takes over.
//!
//! One cluster and one deployment serve every step (starting them takes most of the time); the
//! steps run in order, and a failing step is reported with the others' results rather than
//! hiding them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use cloud_controller_manager::well_known::TAINT_UNINITIALIZED;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolume, Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use real_node::{
    Cluster, ClusterOptions, NodeMachine, StackSource, apply_local_overlay,
    build_and_import_images, load_balancer_address, wait_node_initialised,
    web_behind_load_balancer,
};
use serde_json::json;
use test_support::{load_balancer_service, wait_for};

const NAMESPACE: &str = "kube-system";
const MACHINE: &str = "m-real";
const ZONE: &str = "zone-real";
/// The CSI driver the local overlay's shim labels volumes of (its `--csi-driver-name`).
const CSI_DRIVER: &str = "local.csi.ccm.example";
/// How long the stack may take to come up (images imported, certificates made, pods started).
const STACK_UP: Duration = Duration::from_secs(180);
const WAIT: Duration = Duration::from_secs(90);

#[tokio::test]
async fn stack_runs_as_pods_on_a_real_node() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cluster = Cluster::start(ClusterOptions::default())
        .await
        .unwrap_or_else(|e| panic!("starting the real node: {e}"));
    let work = tempfile::tempdir().unwrap();
    let source = StackSource::discover().unwrap();
    build_and_import_images(&cluster, &source).unwrap_or_else(|e| {
        panic!(
            "building the images (from `cargo build -p cloud-controller-manager -p local-shim \
             -p cloud-provider-webhook -p ccm-certgen`): {e}"
        )
    });
    let machine = NodeMachine {
        instance_id: MACHINE.to_owned(),
        zone: ZONE.to_owned(),
        region: "region-real".to_owned(),
    };
    apply_local_overlay(&cluster, &source, &machine, work.path())
        .unwrap_or_else(|e| panic!("kubectl apply -k of the local overlay: {e}"));

    let mut results: Vec<(&str, Result<(), String>)> = Vec::new();
    let initialised = node_is_initialised_by_the_controller_manager_pod(&cluster).await;
    let up = initialised.is_ok();
    results.push((
        "node initialised by the controller-manager pod",
        initialised,
    ));
    if up {
        results.push((
            "load balancer reaches a pod through the shim, node port and kube-proxy",
            load_balancer_reaches_a_pod(&cluster, work.path()).await,
        ));
        results.push((
            "webhook pod labels a PersistentVolume and refuses a bad annotation",
            webhook_pod_admits(&cluster).await,
        ));
        results.push((
            "the credential-provider DaemonSet installs the plugin on the node",
            credential_provider_installed().await,
        ));
        results.push((
            "pods run as their own service accounts, refused outside their RBAC",
            service_accounts_are_least_privilege(&cluster).await,
        ));
        results.push((
            "killing the leading controller-manager pod: the other replica takes over",
            other_replica_takes_over(&cluster).await,
        ));
    }
    let failed: Vec<String> = results
        .iter()
        .filter_map(|(step, r)| r.as_ref().err().map(|e| format!("- {step}: {e}")))
        .collect();
    for (step, r) in &results {
        eprintln!("{} {step}", if r.is_ok() { "ok  " } else { "FAIL" });
    }
    if !failed.is_empty() {
        panic!(
            "{} of {} steps failed:\n{}\n--- pods ---\n{}\n--- kubelet ---\n{}",
            failed.len(),
            results.len(),
            failed.join("\n"),
            kubectl(&cluster, &["get", "pods", "-A", "-o", "wide"]).unwrap_or_else(|e| e),
            cluster.log_tail("kubelet", 30)
        );
    }
}

async fn node_is_initialised_by_the_controller_manager_pod(
    cluster: &Cluster,
) -> Result<(), String> {
    let node = wait_node_initialised(cluster, TAINT_UNINITIALIZED, STACK_UP)
        .await
        .map_err(|e| format!("{e}\n{}", stack_pods(cluster)))?;
    let provider_id = node.spec.and_then(|s| s.provider_id).unwrap_or_default();
    expect(
        provider_id == format!("local://{MACHINE}"),
        format!("providerID {provider_id}"),
    )?;
    let labels = node.metadata.labels.unwrap_or_default();
    expect(
        labels
            .get("topology.kubernetes.io/zone")
            .map(String::as_str)
            == Some(ZONE),
        format!("zone label: {labels:?}"),
    )?;
    Ok(())
}

async fn load_balancer_reaches_a_pod(cluster: &Cluster, work: &Path) -> Result<(), String> {
    let web = web_behind_load_balancer(cluster, work, "web", "hello through the shim\n", WAIT)
        .await
        .map_err(|e| format!("{e}\n{}", stack_pods(cluster)))?;
    expect(
        web.response.starts_with("HTTP/1."),
        format!("response: {}", web.response),
    )
}

async fn webhook_pod_admits(cluster: &Cluster) -> Result<(), String> {
    let client = cluster.client().map_err(|e| e.to_string())?;
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let pv: PersistentVolume = serde_json::from_value(json!({
        "metadata": {"name": "stack-pv"},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                 "csi": {"driver": CSI_DRIVER, "volumeHandle": "stack-pv",
                         "volumeAttributes": {"local-shim/machine": cluster.node_name()}}}
    }))
    .map_err(|e| e.to_string())?;
    // The API server may start calling a new webhook configuration a little later.
    let labels: BTreeMap<String, String> =
        wait_for("the webhook pod to label PV stack-pv", WAIT, || {
            let pvs = pvs.clone();
            let pv = pv.clone();
            async move {
                let _ = pvs.delete("stack-pv", &DeleteParams::default()).await;
                let created = pvs
                    .create(&PostParams::default(), &pv)
                    .await
                    .map_err(|e| e.to_string())?;
                let labels = created.metadata.labels.unwrap_or_default();
                if labels.contains_key("topology.kubernetes.io/zone") {
                    Ok(labels)
                } else {
                    Err(format!("stored without a zone: {labels:?}"))
                }
            }
        })
        .await
        .map_err(|e| format!("{e}\n{}", stack_pods(cluster)))?;
    expect(
        labels["topology.kubernetes.io/zone"] == ZONE,
        format!("labels {labels:?}"),
    )?;

    let services: Api<Service> = Api::namespaced(client, "default");
    let bad: Service = serde_json::from_value(json!({
        "metadata": {"name": "bad-pool", "annotations": {"lb.local-shim/address-pool": "no-such-pool"}},
        "spec": {"type": "LoadBalancer", "ports": [{"port": 80, "protocol": "TCP"}]}
    }))
    .map_err(|e| e.to_string())?;
    match services.create(&PostParams::default(), &bad).await {
        Err(kube::Error::Api(status)) if status.message.contains("no-such-pool") => Ok(()),
        Err(e) => Err(format!("refused, but not naming the pool: {e}")),
        Ok(_) => Err("a Service naming a pool that does not exist was admitted".to_owned()),
    }
}

/// The kubelet's plugin directory the DaemonSet installs into (a hostPath).
const PLUGIN_DIR: &str = "/usr/libexec/kubernetes/kubelet-plugins/credential-provider/exec";

async fn credential_provider_installed() -> Result<(), String> {
    // Every upstream plugin name, so existing kubelet configs find it.
    let names = [
        "ecr-credential-provider",
        "auth-provider-gcp",
        "acr-credential-provider",
        "local-credential-provider",
    ];
    wait_for(
        format!("the plugin installed in {PLUGIN_DIR}"),
        WAIT,
        || async {
            let missing: Vec<_> = names
                .iter()
                .filter(|n| !Path::new(PLUGIN_DIR).join(n).exists())
                .collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("missing {missing:?}"))
            }
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    let out = std::process::Command::new(Path::new(PLUGIN_DIR).join("ecr-credential-provider"))
        .arg("--version")
        .output()
        .map_err(|e| format!("running the installed plugin: {e}"))?;
    expect(
        out.status.success(),
        format!(
            "installed plugin --version: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

async fn service_accounts_are_least_privilege(cluster: &Cluster) -> Result<(), String> {
    let client = cluster.client().map_err(|e| e.to_string())?;
    let pods: Api<Pod> = Api::namespaced(client, NAMESPACE);
    for (app, account) in [
        ("cloud-controller-manager", "cloud-controller-manager"),
        ("local-shim", "local-shim"),
        ("cloud-provider-webhook", "cloud-provider-webhook"),
    ] {
        let list = pods
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        let running: Vec<_> = list
            .items
            .iter()
            .filter(|p| {
                p.metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| n.starts_with(app))
            })
            .collect();
        expect(!running.is_empty(), format!("no {app} pod"))?;
        for p in running {
            let sa = p.spec.as_ref().and_then(|s| s.service_account_name.clone());
            expect(
                sa.as_deref() == Some(account),
                format!("{app} pod runs as {sa:?}"),
            )?;
        }
    }
    // What the controller-manager's account may not do (it may delete Nodes: the
    // cloud-node-lifecycle controller deletes those whose machine is gone).
    for (verb, what) in [
        ("get", "secrets"),
        ("create", "pods"),
        ("delete", "services"),
        ("update", "deployments"),
    ] {
        let out = kubectl(
            cluster,
            &[
                "auth",
                "can-i",
                verb,
                what,
                "-n",
                NAMESPACE,
                "--as",
                "system:serviceaccount:kube-system:cloud-controller-manager",
            ],
        );
        expect(
            out.is_err(),
            format!("the controller-manager's account may {verb} {what}"),
        )?;
    }
    Ok(())
}

async fn other_replica_takes_over(cluster: &Cluster) -> Result<(), String> {
    let client = cluster.client().map_err(|e| e.to_string())?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
    let pods: Api<Pod> = Api::namespaced(client, NAMESPACE);
    let holder = |lease: Lease| {
        lease
            .spec
            .and_then(|s| s.holder_identity)
            .unwrap_or_default()
    };
    let replicas = wait_for("two controller-manager replicas running", WAIT, || {
        let pods = pods.clone();
        async move {
            let names = running_pods(&pods, "cloud-controller-manager").await?;
            if names.len() == 2 {
                Ok(names)
            } else {
                Err(format!("running: {names:?}"))
            }
        }
    })
    .await
    .map_err(|e| e.to_string())?;
    let leader = holder(
        leases
            .get("cloud-controller-manager")
            .await
            .map_err(|e| e.to_string())?,
    );
    let leading_pod = replicas
        .iter()
        .find(|p| leader.starts_with(p.as_str()))
        .ok_or_else(|| format!("lease holder {leader:?} is none of the replicas {replicas:?}"))?
        .clone();
    pods.delete(
        &leading_pod,
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        },
    )
    .await
    .map_err(|e| format!("deleting {leading_pod}: {e}"))?;
    // Killed without a grace period, the leader cannot release the Lease: another replica takes
    // it once it has expired (15 s). That may be the standing replica or the one the
    // Deployment starts in the killed one's place; either must be a running pod.
    let new_leader = wait_for(
        format!("the lease to move from {leading_pod} to another running replica"),
        WAIT,
        || {
            let leases = leases.clone();
            let pods = pods.clone();
            let killed = leading_pod.clone();
            async move {
                let h = holder(
                    leases
                        .get("cloud-controller-manager")
                        .await
                        .map_err(|e| e.to_string())?,
                );
                let running = running_pods(&pods, "cloud-controller-manager").await?;
                if !h.starts_with(&killed) && running.iter().any(|p| h.starts_with(p.as_str())) {
                    Ok(h)
                } else {
                    Err(format!("holder {h:?}, running {running:?}"))
                }
            }
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    // The new leader does the work: a new LoadBalancer Service gets an address.
    let services: Api<Service> =
        Api::namespaced(cluster.client().map_err(|e| e.to_string())?, "default");
    services
        .create(
            &PostParams::default(),
            &load_balancer_service("default", "after-failover", &[("TCP", 80)]),
        )
        .await
        .map_err(|e| e.to_string())?;
    load_balancer_address(&services, "after-failover", WAIT)
        .await
        .map(drop)
        .map_err(|e| format!("{new_leader} did not serve after-failover: {e}"))
}

async fn running_pods(pods: &Api<Pod>, prefix: &str) -> Result<Vec<String>, String> {
    let list = pods
        .list(&ListParams::default())
        .await
        .map_err(|e| e.to_string())?;
    Ok(list
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .filter_map(|p| p.metadata.name)
        .filter(|n| n.starts_with(prefix))
        .collect())
}

fn expect(ok: bool, what: String) -> Result<(), String> {
    if ok { Ok(()) } else { Err(what) }
}

fn kubectl(cluster: &Cluster, args: &[&str]) -> Result<String, String> {
    let out = cluster
        .kubectl()
        .args(args)
        .output()
        .map_err(|e| format!("running kubectl: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// The stack's pods and their recent logs, for failure messages.
fn stack_pods(cluster: &Cluster) -> String {
    let mut out =
        kubectl(cluster, &["get", "pods", "-n", NAMESPACE, "-o", "wide"]).unwrap_or_else(|e| e);
    for app in [
        "cloud-controller-manager",
        "local-shim",
        "cloud-provider-webhook",
        "ccm-certgen",
    ] {
        let logs = kubectl(
            cluster,
            &[
                "logs",
                "-n",
                NAMESPACE,
                "--tail=15",
                "--all-containers",
                "-l",
                &format!("app.kubernetes.io/name={app}"),
            ],
        )
        .unwrap_or_else(|e| e);
        out.push_str(&format!("\n--- {app} ---\n{logs}"));
    }
    out
}
