//! End to end: admission through the real binaries. The `local-shim` (declaring its CSI driver
//! with `--csi-driver-name`) behind the `cloud-provider-webhook`, both webhooks registered with
//! a real kube-apiserver (caBundle from the test CA): the API server stores a local CSI volume
//! with the zone and region of its machine and the node affinity they imply, refuses a
//! LoadBalancer Service naming a pool that does not exist with a message naming the field, and
//! stores a good one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{INVENTORY, arg, spawn_local_shim_unix};
use e2e_tests::write_inventory;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::{PersistentVolume, Service};
use kube::api::{Api, PostParams};
use serde_json::json;
use test_control_plane::{ControlPlane, unique_name};
use test_pki::{Ca, Pki};
use test_support::{
    Location, Process, WEBHOOK_TEST_LABEL, WebhookRegistration, free_port, https_get, temp_dir,
    tls_connector, wait_for, wait_refused,
};

/// The CSI driver the shim declares as its own.
const DRIVER: &str = "local.csi.e2e.example";
/// The volume attribute naming the volume's machine (`local_shim::MACHINE_ATTRIBUTE`).
const MACHINE_ATTRIBUTE: &str = "local-shim/machine";
/// The address-pool annotation of the local shim.
const POOL: &str = "lb.local-shim/address-pool";
const LB_CONFIG: &str = "pools:\n  - name: blue\n    addresses: [127.0.101.0/24]\n";
const ZONE: &str = "topology.kubernetes.io/zone";
const REGION: &str = "topology.kubernetes.io/region";
/// How long the API server may take to start calling a new webhook configuration, and the
/// binaries to come up.
const WAIT: Duration = Duration::from_secs(60);

fn csi_pv(name: &str, test: &str, driver: &str, machine: &str) -> PersistentVolume {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {WEBHOOK_TEST_LABEL: test}},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                 "csi": {"driver": driver, "volumeHandle": format!("{name}-handle"),
                         "volumeAttributes": {MACHINE_ATTRIBUTE: machine}}}
    }))
    .unwrap()
}

fn lb_service(name: &str, test: &str, pool: &str) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {WEBHOOK_TEST_LABEL: test},
                     "annotations": {POOL: pool}},
        "spec": {"type": "LoadBalancer", "ports": [{"port": 80, "protocol": "TCP"}]}
    }))
    .unwrap()
}

/// The webhook binary serving on `127.0.0.1:<port>` with `ca`'s certificate, in front of the
/// shim at `socket`.
fn spawn_webhook(
    dir: &std::path::Path,
    ca: &Ca,
    pki: &Pki,
    socket: &std::path::Path,
) -> (Process, u16) {
    let serving = pki
        .write_tls_files(
            "serving",
            &ca.issue(&["localhost", "127.0.0.1"]).unwrap(),
            ca.cert_pem(),
        )
        .unwrap();
    let port = free_port().unwrap();
    let process = Process::for_workspace_binary("cloud-provider-webhook", "webhook", dir)
        .unwrap()
        .args([
            "--webhooks=*".to_string(),
            "--webhook-bind-address=127.0.0.1".into(),
            format!("--webhook-secure-port={port}"),
            format!("--webhook-tls-cert-file={}", arg(&serving.cert)),
            format!("--webhook-tls-private-key-file={}", arg(&serving.key)),
            format!("--provider-endpoint=unix://{}", arg(socket)),
        ])
        .spawn()
        .unwrap();
    (process, port)
}

#[tokio::test]
async fn api_server_admits_through_the_webhook_and_the_local_shim() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cp = ControlPlane::start().await.unwrap_or_else(|e| {
        panic!("a kube-apiserver is needed: run `bash tests/control-plane/provision.sh` (or set KUBEBUILDER_ASSETS): {e}")
    });
    let client = cp.client().unwrap();
    let dir = temp_dir("ccm-e2e-admission-", Location::System).unwrap();
    let inventory = write_inventory(dir.path(), INVENTORY).unwrap();
    let lb_config = dir.path().join("lb.yaml");
    std::fs::write(&lb_config, LB_CONFIG).unwrap();
    let (shim, socket) = spawn_local_shim_unix(
        dir.path(),
        &inventory,
        &[
            format!("--csi-driver-name={DRIVER}"),
            format!("--lb-config={}", arg(&lb_config)),
            "--routes=state-only".into(),
        ],
        &[],
    );
    let ca = Ca::new("admission-e2e").unwrap();
    let pki = Pki::new().unwrap();
    let (webhook, port) = spawn_webhook(dir.path(), &ca, &pki, &socket);

    // Ready: the webhook serves and its shim answers.
    let connector = tls_connector(ca.cert_der()).unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_for("the webhook to be ready (its shim answering)", WAIT, || {
        let connector = connector.clone();
        async move {
            match https_get(&connector, addr, "/readyz", None).await {
                Ok((200, _)) => Ok(()),
                Ok((code, body)) => Err(format!("/readyz {code}: {body}")),
                Err(err) => Err(err.to_string()),
            }
        }
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}\nshim log:\n{}\nwebhook log:\n{}",
            shim.log_tail(30),
            webhook.log_tail(30)
        )
    });

    let test = unique_name("adm");
    let registration = WebhookRegistration::new(&test, port, ca.cert_pem());
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .create(&PostParams::default(), &registration.mutating)
        .await
        .unwrap();
    Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .create(&PostParams::default(), &registration.validating)
        .await
        .unwrap();

    // A volume of the shim's driver on node-a (zone-a of local-region) gets its topology.
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let mut attempt = 0;
    let stored = wait_for("the API server to call pv-labeler", WAIT, || {
        attempt += 1;
        let (pvs, name, test) = (pvs.clone(), format!("{test}-local-{attempt}"), test.clone());
        async move {
            let created = pvs
                .create(
                    &PostParams::default(),
                    &csi_pv(&name, &test, DRIVER, "node-a"),
                )
                .await
                .map_err(|e| e.to_string())?;
            let labels = created.metadata.labels.clone().unwrap_or_default();
            if labels.contains_key(ZONE) {
                Ok(created)
            } else {
                Err(format!("{name} stored without a zone: {labels:?}"))
            }
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nwebhook log:\n{}", webhook.log_tail(30)));
    let labels = stored.metadata.labels.clone().unwrap();
    assert_eq!(labels[ZONE], "zone-a");
    assert_eq!(labels[REGION], "local-region");
    assert_eq!(
        serde_json::to_value(stored.spec.unwrap().node_affinity).unwrap(),
        json!({"required": {"nodeSelectorTerms": [{"matchExpressions": [
            {"key": REGION, "operator": "In", "values": ["local-region"]},
            {"key": ZONE, "operator": "In", "values": ["zone-a"]},
        ]}]}})
    );
    // Another driver's volume is not the shim's: stored as sent.
    let foreign = pvs
        .create(
            &PostParams::default(),
            &csi_pv(&format!("{test}-nfs"), &test, "nfs.csi.example", "node-a"),
        )
        .await
        .unwrap();
    assert!(!foreign.metadata.labels.unwrap().contains_key(ZONE));
    assert!(foreign.spec.unwrap().node_affinity.is_none());

    // A Service naming a pool that does not exist is refused, naming the field.
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let err = wait_refused(
        "the API server to call service-lb-validator",
        WAIT,
        |attempt| {
            let name = format!("{test}-bad-{attempt}");
            let svc = lb_service(&name, &test, "red");
            let services = services.clone();
            async move {
                services.create(&PostParams::default(), &svc).await?;
                Ok::<_, kube::Error>(name)
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\nwebhook log:\n{}", webhook.log_tail(30)));
    assert!(
        err.contains("service-lb-validator.test.example.com")
            && err.contains(&format!("metadata.annotations[{POOL}]"))
            && err.contains("no pool named \"red\""),
        "{err}"
    );
    // A Service naming an existing pool is stored.
    let good = format!("{test}-good");
    services
        .create(&PostParams::default(), &lb_service(&good, &test, "blue"))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{good} refused: {e}\nwebhook log:\n{}",
                webhook.log_tail(30)
            )
        });
    assert!(shim.exit_status().is_none(), "{}", shim.log_tail(30));
}
