//! The manifests in `deploy/kubernetes/` are accepted by a real API server (server-side dry run,
//! so admission and validation run but nothing is stored), and the webhook's container
//! arguments are accepted by the webhook's own flag parser and agree with its configurations.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use clap::Parser as _;
use cloud_provider_webhook::{Options, Webhook, enabled_webhooks};
use serde_json::Value;
use test_control_plane::ControlPlane;

#[tokio::test]
async fn deploy_manifests_pass_server_side_validation() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cp = ControlPlane::start().await.expect("control plane");
    let manifests = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kubernetes");
    let output = Command::new("kubectl")
        .arg(format!("--kubeconfig={}", cp.kubeconfig_path().display()))
        .args(["apply", "--dry-run=server", "-f"])
        .arg(&manifests)
        .output()
        .expect("kubectl is needed for this test: install Debian's kubernetes-client package");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "kubectl apply --dry-run=server failed:\n{stdout}\n{stderr}"
    );
    for object in [
        "serviceaccount/cloud-controller-manager",
        "clusterrole.rbac.authorization.k8s.io/system:cloud-controller-manager",
        "deployment.apps/cloud-controller-manager",
        "configmap/local-provider-inventory",
        "service/cloud-provider-webhook",
        "deployment.apps/cloud-provider-webhook",
        "mutatingwebhookconfiguration.admissionregistration.k8s.io/cloud-provider-webhook",
        "validatingwebhookconfiguration.admissionregistration.k8s.io/cloud-provider-webhook",
    ] {
        assert!(stdout.contains(object), "{object} missing from:\n{stdout}");
    }

    // The objects as the API server would store them (defaults filled in).
    let output = Command::new("kubectl")
        .arg(format!("--kubeconfig={}", cp.kubeconfig_path().display()))
        .args(["apply", "--dry-run=server", "-o", "json", "-f"])
        .arg(manifests.join("webhook.yaml"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let list: Value = serde_json::from_slice(&output.stdout).unwrap();
    check_webhook_manifest(list["items"].as_array().unwrap());
}

fn object<'a>(items: &'a [Value], kind: &str) -> &'a Value {
    items
        .iter()
        .find(|o| o["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in webhook.yaml"))
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
