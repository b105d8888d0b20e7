//! The Kustomize overlays in `deploy/overlays/` are accepted by a real API server (server-side
//! dry run, so admission and validation run but nothing is stored): `local` whole (it targets
//! the 1.20 test cluster), `cert-manager` without its policy/v1 PodDisruptionBudgets (1.20 has
//! only policy/v1beta1; parts/pdb-policy-v1 must equal parts/pdb-policy-v1beta1 but for the
//! version, checked here) and with stand-in CRDs for cert-manager's Certificate and Issuer (the
//! test cluster has no cert-manager). The webhook's container arguments are accepted by the
//! webhook's own flag parser and agree with its configurations, and the local overlay's
//! inventory can be replaced as its kustomization.yaml says.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser as _;
use cloud_provider_webhook::{Options, Webhook, enabled_webhooks};
use common::kubectl;
use serde_json::Value;
use test_control_plane::ControlPlane;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

/// `kubectl kustomize` of `dir`, as YAML documents.
fn kustomize(dir: &Path) -> Vec<String> {
    kubectl(&["kustomize", &dir.display().to_string()], None)
        .split("\n---\n")
        .map(str::to_owned)
        .collect()
}

fn kubeconfig_arg(cp: &ControlPlane) -> String {
    format!("--kubeconfig={}", cp.kubeconfig_path().display())
}

#[tokio::test]
async fn local_overlay_passes_server_side_validation() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cp = ControlPlane::start().await.expect("control plane");
    let overlay = deploy_dir().join("overlays/local");
    let stdout = kubectl(
        &[
            &kubeconfig_arg(&cp),
            "apply",
            "--dry-run=server",
            "-k",
            &overlay.display().to_string(),
        ],
        None,
    );
    for object in [
        "serviceaccount/cloud-controller-manager",
        "serviceaccount/local-shim",
        "serviceaccount/cloud-provider-webhook",
        "serviceaccount/ccm-certgen",
        "clusterrole.rbac.authorization.k8s.io/system:cloud-controller-manager",
        "role.rbac.authorization.k8s.io/system:cloud-controller-manager:leader-election",
        "role.rbac.authorization.k8s.io/ccm-certgen",
        "clusterrole.rbac.authorization.k8s.io/ccm-certgen",
        "deployment.apps/cloud-controller-manager",
        "deployment.apps/local-shim",
        "service/local-shim",
        "configmap/local-provider-inventory",
        "poddisruptionbudget.policy/cloud-controller-manager",
        "poddisruptionbudget.policy/cloud-provider-webhook",
        "job.batch/ccm-certgen",
        "service/cloud-provider-webhook",
        "deployment.apps/cloud-provider-webhook",
        "mutatingwebhookconfiguration.admissionregistration.k8s.io/cloud-provider-webhook",
        "validatingwebhookconfiguration.admissionregistration.k8s.io/cloud-provider-webhook",
    ] {
        assert!(stdout.contains(object), "{object} missing from:\n{stdout}");
    }

    // The objects as the API server would store them (defaults filled in).
    let stored = kubectl(
        &[
            &kubeconfig_arg(&cp),
            "apply",
            "--dry-run=server",
            "-o",
            "json",
            "-k",
            &overlay.display().to_string(),
        ],
        None,
    );
    let list: Value = serde_json::from_str(&stored).unwrap();
    let items = list["items"].as_array().unwrap();
    check_webhook_manifest(items);
    check_local_overlay(items);
}

/// What the local overlay promises the real-node tests.
fn check_local_overlay(items: &[Value]) {
    for item in items
        .iter()
        .filter(|o| o["kind"] == "Deployment" || o["kind"] == "Job")
    {
        let pod = &item["spec"]["template"]["spec"];
        let name = &item["metadata"]["name"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
        assert_eq!(
            pod["priorityClassName"], "system-cluster-critical",
            "{name}"
        );
        for container in pod["containers"].as_array().unwrap() {
            let image = container["image"].as_str().unwrap();
            assert!(
                image.starts_with("ccm/") && image.ends_with(":dev"),
                "{name}: image {image}"
            );
            assert_eq!(container["imagePullPolicy"], "IfNotPresent", "{name}");
        }
    }
    let deployment = |name: &str| {
        items
            .iter()
            .find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no Deployment {name}"))
    };
    let ccm = deployment("cloud-controller-manager");
    assert_eq!(ccm["spec"]["replicas"], 2);
    let args = ccm["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    for flag in [
        "--cluster-name=local-cluster",
        "--allocate-node-cidrs=false",
    ] {
        assert!(args.contains(flag), "{flag} not in {args}");
    }
    let tolerations = ccm["spec"]["template"]["spec"]["tolerations"].to_string();
    for taint in [
        "node.cloudprovider.kubernetes.io/uninitialized",
        "node.kubernetes.io/not-ready",
    ] {
        assert!(tolerations.contains(taint), "{taint} not in {tolerations}");
    }
    let shim = &deployment("local-shim")["spec"]["template"]["spec"];
    assert_eq!(shim["hostNetwork"], true);
    assert!(
        shim["containers"][0]["args"]
            .to_string()
            .contains("--routes=state-only")
    );
    let state = shim["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "state")
        .unwrap();
    assert!(
        state.get("emptyDir").is_some() && state.get("persistentVolumeClaim").is_none(),
        "{state}"
    );
}

#[tokio::test]
async fn cert_manager_overlay_passes_server_side_validation_but_for_policy_v1() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cp = ControlPlane::start().await.expect("control plane");
    let kubeconfig = kubeconfig_arg(&cp);
    // Stand-ins for cert-manager's CRDs: the group, versions and kinds, any content.
    let mut crds = String::new();
    for (kind, plural) in [("Certificate", "certificates"), ("Issuer", "issuers")] {
        crds.push_str(&format!(
            "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: {plural}.cert-manager.io\nspec:\n  group: cert-manager.io\n  scope: Namespaced\n  names: {{kind: {kind}, plural: {plural}, singular: {}}}\n  versions:\n    - name: v1\n      served: true\n      storage: true\n      schema:\n        openAPIV3Schema: {{type: object, x-kubernetes-preserve-unknown-fields: true}}\n---\n",
            kind.to_lowercase()
        ));
    }
    kubectl(&[&kubeconfig, "apply", "-f", "-"], Some(&crds));
    kubectl(
        &[
            &kubeconfig,
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/certificates.cert-manager.io",
            "crd/issuers.cert-manager.io",
        ],
        None,
    );
    let documents = kustomize(&deploy_dir().join("overlays/cert-manager"));
    let (pdbs, rest): (Vec<_>, Vec<_>) = documents
        .into_iter()
        .partition(|d| d.contains("kind: PodDisruptionBudget"));
    assert_eq!(pdbs.len(), 2, "{pdbs:?}");
    assert!(
        pdbs.iter().all(|d| d.contains("apiVersion: policy/v1\n")),
        "{pdbs:?}"
    );
    let stdout = kubectl(
        &[&kubeconfig, "apply", "--dry-run=server", "-f", "-"],
        Some(&rest.join("\n---\n")),
    );
    for object in [
        "certificate.cert-manager.io/ccm-ca",
        "issuer.cert-manager.io/ccm-selfsigned",
        "issuer.cert-manager.io/ccm-ca",
        "certificate.cert-manager.io/local-shim-tls",
        "certificate.cert-manager.io/cloud-controller-manager-cpi-tls",
        "certificate.cert-manager.io/cloud-provider-webhook-tls",
        "certificate.cert-manager.io/cloud-provider-webhook-cpi-tls",
        "persistentvolumeclaim/local-shim-state",
        "deployment.apps/cloud-controller-manager",
        "mutatingwebhookconfiguration.admissionregistration.k8s.io/cloud-provider-webhook",
    ] {
        assert!(stdout.contains(object), "{object} missing from:\n{stdout}");
    }
    assert!(
        !stdout.contains("job.batch/ccm-certgen"),
        "cert-manager overlay runs ccm-certgen:\n{stdout}"
    );

    // The policy/v1 PodDisruptionBudgets are the policy/v1beta1 ones the local overlay's
    // dry run accepted, but for the version.
    let read = |v: &str| {
        std::fs::read_to_string(deploy_dir().join(format!("parts/pdb-policy-{v}/pdb.yaml")))
            .unwrap()
    };
    let strip = |text: String| -> Vec<String> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with("apiVersion:"))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(strip(read("v1")), strip(read("v1beta1")));
}

/// The local overlay's inventory is replaced by an overlay of it patching the ConfigMap
/// `local-provider-inventory` (as the overlay's kustomization.yaml says).
#[test]
fn local_overlay_inventory_can_be_replaced() {
    let dir = tempfile::tempdir_in(deploy_dir()).unwrap();
    // Kustomize v2.0.3 (kubectl 1.20) takes bases by relative path.
    let base = "../overlays/local";
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        format!("bases: [{base}]\npatchesStrategicMerge: [inventory.yaml]\n"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("inventory.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: local-provider-inventory\n  namespace: kube-system\ndata:\n  inventory.yaml: |\n    region: replaced\n    machines: []\n",
    )
    .unwrap();
    let documents = kustomize(dir.path());
    let inventory = documents
        .iter()
        .find(|d| d.contains("name: local-provider-inventory") && d.contains("kind: ConfigMap"))
        .unwrap();
    assert!(inventory.contains("region: replaced"), "{inventory}");
    assert!(!inventory.contains("node-a"), "{inventory}");
}

fn object<'a>(items: &'a [Value], kind: &str) -> &'a Value {
    items
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == "cloud-provider-webhook")
        .unwrap_or_else(|| panic!("no {kind} cloud-provider-webhook in the overlay"))
}

/// The webhook Deployment's arguments parse and validate as the binary's flags, and each
/// webhook configuration points at a served path with the webhook's failure policy and a
/// timeout above its deadline.
fn check_webhook_manifest(items: &[Value]) {
    let deployment = object(items, "Deployment");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{pod}");
    let container = &pod["containers"][0];
    // Kubernetes expands $(VAR) from the Service variables; do the same.
    let args: Vec<String> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            a.as_str()
                .unwrap()
                .replace("$(LOCAL_SHIM_SERVICE_HOST)", "10.96.0.20")
                .replace("$(LOCAL_SHIM_SERVICE_PORT)", "10270")
        })
        .collect();
    let options = Options::try_parse_from(
        std::iter::once("cloud-provider-webhook".into()).chain(args.clone()),
    )
    .unwrap_or_else(|e| panic!("the webhook refuses its manifest's args {args:?}: {e}"));
    options
        .validate()
        .unwrap_or_else(|e| panic!("the webhook refuses its manifest's args {args:?}: {e}"));
    let port = i64::from(options.webhook_secure_port);
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}: {get}");
        assert_eq!(get["port"], port, "{probe}: {get}");
        assert_eq!(get["scheme"], "HTTPS", "{probe}: {get}");
    }
    let service = object(items, "Service");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], port, "{service}");
    let enabled = enabled_webhooks(&options.webhooks).unwrap();
    for (kind, webhook) in [
        ("MutatingWebhookConfiguration", Webhook::PvLabeler),
        (
            "ValidatingWebhookConfiguration",
            Webhook::ServiceLbValidator,
        ),
    ] {
        assert!(
            enabled.contains(&webhook),
            "{} not enabled by {args:?}",
            webhook.name()
        );
        let configured = &object(items, kind)["webhooks"][0];
        let client = &configured["clientConfig"]["service"];
        assert_eq!(client["path"], webhook.path(), "{kind}: {client}");
        assert_eq!(
            client["name"], service["metadata"]["name"],
            "{kind}: {client}"
        );
        assert_eq!(
            client["port"], service["spec"]["ports"][0]["port"],
            "{kind}"
        );
        assert_eq!(
            configured["failurePolicy"],
            options.failure_policy(webhook).name(),
            "{kind}: the configuration's and the webhook's failure policies differ"
        );
        assert_eq!(configured["sideEffects"], "None", "{kind}");
        assert_eq!(
            configured["admissionReviewVersions"],
            serde_json::json!(["v1", "v1beta1"]),
            "{kind}"
        );
        let timeout = Duration::from_secs(configured["timeoutSeconds"].as_u64().unwrap());
        assert!(
            timeout > options.webhook_deadline,
            "{kind}: timeoutSeconds {timeout:?} must be above --webhook-deadline {:?}",
            options.webhook_deadline
        );
    }
}
