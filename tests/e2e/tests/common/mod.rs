//! Fixtures shared by the end-to-end suites.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use e2e_tests::{Process, kubelet_registered_node};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, PostParams};
use test_control_plane::ControlPlane;

/// The inventory used by the suites: two running machines and one shut down.
pub const INVENTORY: &str = r#"
region: local-region
machines:
  - name: node-a
    instanceID: m-a
    instanceType: local.small
    zone: zone-a
    addresses:
      - {type: InternalIP, address: 10.10.0.1}
      - {type: Hostname, address: node-a.local}
  - name: node-b
    instanceID: m-b
    instanceType: local.large
    zone: zone-b
    addresses:
      - {type: InternalIP, address: 10.10.0.2}
  - name: node-c
    instanceID: m-c
    instanceType: local.small
    zone: zone-a
    state: shutdown
    addresses:
      - {type: InternalIP, address: 10.10.0.3}
"#;

/// Creates a Node the way a kubelet with `--cloud-provider=external` registers it.
pub async fn create_tainted_node(client: &kube::Client, name: &str) -> Node {
    let node = kubelet_registered_node(name, Some(&format!("{name}-kubelet")));
    Api::<Node>::all(client.clone())
        .create(&PostParams::default(), &node)
        .await
        .unwrap()
}

/// Describes why a node is not initialised yet, or returns it.
pub fn initialised(node: &Node) -> Result<(), String> {
    let spec = node.spec.clone().unwrap_or_default();
    if spec
        .taints
        .unwrap_or_default()
        .iter()
        .any(|t| t.key == "node.cloudprovider.kubernetes.io/uninitialized")
    {
        return Err("still tainted".into());
    }
    if spec.provider_id.unwrap_or_default().is_empty() {
        return Err("no providerID".into());
    }
    let has_internal = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .is_some_and(|a| a.iter().any(|a| a.type_ == "InternalIP"));
    if !has_internal {
        return Err(format!("no InternalIP yet: {:?}", node.status));
    }
    Ok(())
}

/// Label map of a node.
pub fn labels(node: &Node) -> BTreeMap<String, String> {
    node.metadata.labels.clone().unwrap_or_default()
}

/// Creates a temp dir for one test.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ccm-e2e-")
        .tempdir()
        .unwrap()
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Path as an owned string argument.
pub fn arg(path: &Path) -> String {
    path.display().to_string()
}

/// Starts a private control plane and returns it, an admin client of it and a temp dir.
pub async fn start_control_plane() -> (ControlPlane, kube::Client, tempfile::TempDir) {
    let cp = ControlPlane::start().await.expect("control plane");
    let client = cp.client().unwrap();
    (cp, client, tempdir())
}

/// Spawns `local-shim` (logs in `dir`) serving `inventory` with its state in `dir/state`;
/// `args` (where it listens, and any extra flags) come before its metrics address.
pub fn spawn_local_shim(
    dir: &Path,
    inventory: &Path,
    args: &[String],
    env: &[(&str, String)],
) -> Process {
    let mut all = vec![
        format!("--inventory={}", arg(inventory)),
        format!("--state-dir={}", arg(&dir.join("state"))),
    ];
    all.extend_from_slice(args);
    all.push("--metrics-bind-address=127.0.0.1:0".into());
    Process::spawn("local-shim", "local-shim", &all, env, dir).unwrap()
}

/// [`spawn_local_shim`] listening on the Unix socket `dir/shim.sock`, with `extra_args` after
/// it; returns the process and the socket path.
pub fn spawn_local_shim_unix(
    dir: &Path,
    inventory: &Path,
    extra_args: &[String],
    env: &[(&str, String)],
) -> (Process, PathBuf) {
    let socket = dir.join("shim.sock");
    let mut args = vec![format!("--unix-socket={}", arg(&socket))];
    args.extend_from_slice(extra_args);
    (spawn_local_shim(dir, inventory, &args, env), socket)
}

/// Spawns `cloud-controller-manager` as `label` (logs in `dir`) against `cp`'s kubeconfig;
/// `args` (the provider endpoint and any other flags) follow `--kubeconfig`.
pub fn spawn_ccm(
    cp: &ControlPlane,
    label: &str,
    args: &[String],
    env: &[(&str, String)],
    dir: &Path,
) -> Process {
    let mut all = vec![format!("--kubeconfig={}", arg(cp.kubeconfig_path()))];
    all.extend_from_slice(args);
    Process::spawn("cloud-controller-manager", label, &all, env, dir).unwrap()
}

/// [`spawn_ccm`] with the provider at the Unix socket `socket` and the secure port off, then
/// `extra_args`.
pub fn spawn_ccm_unix(
    cp: &ControlPlane,
    socket: &Path,
    label: &str,
    extra_args: &[String],
    env: &[(&str, String)],
    dir: &Path,
) -> Process {
    let mut args = vec![
        format!("--provider-endpoint=unix://{}", arg(socket)),
        "--secure-port=0".into(),
    ];
    args.extend_from_slice(extra_args);
    spawn_ccm(cp, label, &args, env, dir)
}
