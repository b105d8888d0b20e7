//! Fixtures shared by the end-to-end suites.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cloud_controller_manager::well_known::TAINT_UNINITIALIZED;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, PostParams};
use test_control_plane::{ControlPlane, wait_until_nodes_listable};
use test_support::{
    Location, Process, WaitError, initialised, kubelet_registered_node, temp_dir, wait_for,
};

/// The user the suites run the controller-manager as: the ServiceAccount of
/// `deploy/base/rbac.yaml`, so that the controllers get exactly what that manifest grants.
pub const CCM_USER: &str = "system:serviceaccount:kube-system:cloud-controller-manager";
/// The groups the API server puts a `kube-system` ServiceAccount's token in.
pub const CCM_GROUPS: &[&str] = &[
    "system:serviceaccounts",
    "system:serviceaccounts:kube-system",
    "system:authenticated",
];

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
    let node = kubelet_registered_node(name, Some(&format!("{name}-kubelet")), TAINT_UNINITIALIZED);
    Api::<Node>::all(client.clone())
        .create(&PostParams::default(), &node)
        .await
        .unwrap()
}

/// Label map of a node.
pub fn labels(node: &Node) -> BTreeMap<String, String> {
    node.metadata.labels.clone().unwrap_or_default()
}

/// Path as an owned string argument.
pub fn arg(path: &Path) -> String {
    path.display().to_string()
}

/// Starts a private control plane with `deploy/base/rbac.yaml` applied and returns it, an
/// admin client of it and a temp dir.
pub async fn start_control_plane() -> (ControlPlane, kube::Client, tempfile::TempDir) {
    let cp = ControlPlane::start().await.expect("control plane");
    let client = cp.client().unwrap();
    apply_rbac(&cp).await;
    (cp, client, temp_dir("ccm-e2e-", Location::System).unwrap())
}

/// Applies `deploy/base/rbac.yaml` to `cp` with kubectl (as the admin), then waits until
/// the authorizer grants [`CCM_USER`] what it says: RBAC objects reach the authorizer through a
/// watch, so a controller-manager started right away could see a 403 that no deployment would.
pub async fn apply_rbac(cp: &ControlPlane) {
    let rbac = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/base/rbac.yaml");
    let output = tokio::process::Command::new("kubectl")
        .arg(format!("--kubeconfig={}", arg(cp.kubeconfig_path())))
        .args(["apply", "-f"])
        .arg(&rbac)
        .output()
        .await
        .expect("kubectl is needed by the end-to-end suites: install Debian's kubernetes-client package");
    assert!(
        output.status.success(),
        "kubectl apply -f {} failed:\n{}\n{}",
        rbac.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    wait_until_nodes_listable(
        cp.client_as(CCM_USER, CCM_GROUPS).unwrap(),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
}

/// Waits up to `timeout` until the node `name` is initialised ([`initialised`]).
pub async fn wait_initialised(
    nodes: &Api<Node>,
    name: &str,
    timeout: Duration,
) -> Result<(), WaitError> {
    wait_for(&format!("{name} to be initialised"), timeout, || {
        let nodes = nodes.clone();
        async move {
            initialised(
                &nodes.get(name).await.map_err(|e| e.to_string())?,
                TAINT_UNINITIALIZED,
            )
        }
    })
    .await
}

/// Waits up to `timeout` until the node `name` no longer exists.
pub async fn wait_deleted(
    nodes: &Api<Node>,
    name: &str,
    timeout: Duration,
) -> Result<(), WaitError> {
    wait_for(&format!("{name} to be deleted"), timeout, || {
        let nodes = nodes.clone();
        async move {
            match nodes.get_opt(name).await.map_err(|e| e.to_string())? {
                None => Ok(()),
                Some(_) => Err(format!("{name} still exists")),
            }
        }
    })
    .await
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
    spawn_binary("local-shim", "local-shim", &all, env, dir)
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

/// Spawns `cloud-controller-manager` as `label` (logs in `dir`) against `cp` as [`CCM_USER`]
/// (see [`apply_rbac`]); `args` (the provider endpoint and any other flags) follow
/// `--kubeconfig`.
pub fn spawn_ccm(
    cp: &ControlPlane,
    label: &str,
    args: &[String],
    env: &[(&str, String)],
    dir: &Path,
) -> Process {
    let kubeconfig = cp.write_kubeconfig_as(CCM_USER, CCM_GROUPS).unwrap();
    let mut all = vec![format!("--kubeconfig={}", arg(&kubeconfig))];
    all.extend_from_slice(args);
    spawn_binary("cloud-controller-manager", label, &all, env, dir)
}

/// Spawns the workspace binary `binary` as `label` with `args` and `env`, logging to
/// `<dir>/<label>.log`.
fn spawn_binary(
    binary: &str,
    label: &str,
    args: &[String],
    env: &[(&str, String)],
    dir: &Path,
) -> Process {
    Process::for_workspace_binary(binary, label, dir)
        .unwrap()
        .args(args)
        .envs(env.iter().cloned())
        .spawn()
        .unwrap()
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

/// Runs kubectl with `args` (and `stdin`), failing the test with its output if it fails.
pub fn kubectl(args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write as _;
    let mut child = std::process::Command::new("kubectl")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl is needed for this test: install Debian's kubernetes-client package");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "kubectl {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}
