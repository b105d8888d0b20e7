//! The manifests in `deploy/kubernetes/` are accepted by a real API server (server-side dry run,
//! so admission and validation run but nothing is stored).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

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
    ] {
        assert!(stdout.contains(object), "{object} missing from:\n{stdout}");
    }
}
