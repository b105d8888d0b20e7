//! Deploying this repository's stack as pods onto the real node: the images built by
//! `deploy/images/build.sh` from the workspace's binaries and imported into the node's
//! containerd, and `kubectl apply -k` of an overlay of `deploy/overlays/local` whose inventory
//! names the node.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;

use crate::Error;
use crate::cluster::Cluster;
use crate::host::run;

/// The stack's namespace (the overlays' `kube-system`).
pub const STACK_NAMESPACE: &str = "kube-system";
/// The binaries packed into the stack's images.
const IMAGES: &str =
    "cloud-controller-manager,local-shim,cloud-provider-webhook,ccm-certgen,credential-provider";

/// Where the stack's pieces come from.
#[derive(Debug, Clone)]
pub struct StackSource {
    /// The repository's root (`deploy/` is under it).
    pub repo: PathBuf,
    /// The cargo target directory holding the binaries.
    pub target_dir: PathBuf,
    /// The cargo profile directory name (`debug`, `release`).
    pub profile: String,
}

impl StackSource {
    /// The repository holding this crate, and the target directory and profile of a workspace
    /// binary found as `test_support::workspace_binary` finds them.
    pub fn discover() -> Result<StackSource, Error> {
        let ccm = test_support::workspace_binary("cloud-controller-manager")?;
        let profile_dir = ccm
            .parent()
            .ok_or_else(|| Error::Machine(format!("{} has no directory", ccm.display())))?;
        let profile = profile_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let target_dir = profile_dir
            .parent()
            .ok_or_else(|| Error::Machine(format!("{} has no parent", profile_dir.display())))?
            .to_path_buf();
        Ok(StackSource {
            repo: Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."),
            target_dir,
            profile,
        })
    }
}

/// The machine the local shim's inventory describes as the real node.
#[derive(Debug, Clone)]
pub struct NodeMachine {
    /// Instance ID (the provider ID becomes `local://<id>`).
    pub instance_id: String,
    /// Zone.
    pub zone: String,
    /// Region.
    pub region: String,
}

/// Builds the stack's images from `source` and imports them into the node's containerd.
pub fn build_and_import_images(cluster: &Cluster, source: &StackSource) -> Result<(), Error> {
    let mut c = Command::new("bash");
    c.arg(source.repo.join("deploy/images/build.sh"))
        .args(["--profile", &source.profile])
        .arg("--target-dir")
        .arg(&source.target_dir)
        .args(["--only", IMAGES])
        .arg("--containerd-address")
        .arg(cluster.containerd_dir().join("containerd.sock"));
    run(c).map(drop)
}

/// Writes, under `work`, an overlay of `deploy/overlays/local` whose inventory holds the node as
/// `machine`, and applies it with `kubectl apply -k`.
pub fn apply_local_overlay(
    cluster: &Cluster,
    source: &StackSource,
    machine: &NodeMachine,
    work: &Path,
) -> Result<(), Error> {
    let overlay = work.join("overlay");
    std::fs::create_dir_all(&overlay)
        .map_err(Error::io(format!("creating {}", overlay.display())))?;
    // kustomize v2 resolves a base relative to the kustomization: reach it through a link.
    let link = overlay.join("local");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(source.repo.join("deploy/overlays/local"), &link)
        .map_err(Error::io(format!("linking {}", link.display())))?;
    let write = |name: &str, contents: String| {
        let path = overlay.join(name);
        std::fs::write(&path, contents).map_err(Error::io(format!("writing {}", path.display())))
    };
    write(
        "kustomization.yaml",
        "bases:\n  - local\npatchesStrategicMerge:\n  - inventory.yaml\n".to_owned(),
    )?;
    let inventory = format!(
        "region: {region}\nmachines:\n  - name: {node}\n    instanceID: {id}\n    instanceType: real-node\n    zone: {zone}\n    addresses:\n      - {{type: InternalIP, address: {ip}}}\n      - {{type: Hostname, address: {node}}}\n",
        region = machine.region,
        node = cluster.node_name(),
        id = machine.instance_id,
        zone = machine.zone,
        ip = cluster.node_ip()
    );
    let configmap = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "local-provider-inventory", "namespace": STACK_NAMESPACE},
        "data": {"inventory.yaml": inventory},
    });
    write("inventory.yaml", configmap.to_string())?;
    let mut c = cluster.kubectl();
    c.args(["apply", "-k"]).arg(&overlay);
    run(c).map(drop)
}
