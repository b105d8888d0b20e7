//! Where the node's programs are: the Kubernetes components built by `provision.sh --node` and
//! the container runtime, CNI plugins and tools installed from Debian.

use std::path::{Path, PathBuf};

use crate::Error;

/// The sandbox ("pause") image built from the Kubernetes source tree, as `provision.sh` names it.
pub const PAUSE_IMAGE: &str = "ccm.local/pause:v1.20.2";

/// Paths of every program the real node runs or uses.
#[derive(Debug, Clone)]
pub struct NodeBinaries {
    /// kubelet.
    pub kubelet: PathBuf,
    /// kube-controller-manager.
    pub kube_controller_manager: PathBuf,
    /// kube-scheduler.
    pub kube_scheduler: PathBuf,
    /// kube-proxy.
    pub kube_proxy: PathBuf,
    /// The sandbox image as an OCI archive ([`PAUSE_IMAGE`]).
    pub pause_archive: PathBuf,
    /// containerd.
    pub containerd: PathBuf,
    /// containerd's command-line client.
    pub ctr: PathBuf,
    /// The directory holding the CNI plugins (bridge, host-local, portmap, loopback).
    pub cni_bin_dir: PathBuf,
    /// The distribution registry.
    pub registry: PathBuf,
}

impl NodeBinaries {
    /// Finds them: the Kubernetes components in `$KUBEBUILDER_ASSETS` (or the default cache
    /// of `provision.sh`), the rest where Debian installs them. Fails naming the first missing one.
    pub fn discover() -> Result<NodeBinaries, Error> {
        let assets = test_control_plane::BinaryPaths::discover()?
            .kube_apiserver
            .parent()
            .map(Path::to_path_buf)
            .ok_or_else(|| Error::Machine("kube-apiserver path has no directory".to_owned()))?;
        let found = |what: &'static str, path: PathBuf| -> Result<PathBuf, Error> {
            if path.exists() {
                Ok(path)
            } else {
                Err(Error::Missing { what, path })
            }
        };
        Ok(NodeBinaries {
            kubelet: found("kubelet", assets.join("kubelet"))?,
            kube_controller_manager: found(
                "kube-controller-manager",
                assets.join("kube-controller-manager"),
            )?,
            kube_scheduler: found("kube-scheduler", assets.join("kube-scheduler"))?,
            kube_proxy: found("kube-proxy", assets.join("kube-proxy"))?,
            pause_archive: found("the pause image archive", assets.join("pause.oci.tar"))?,
            containerd: found("containerd", PathBuf::from("/usr/bin/containerd"))?,
            ctr: found("ctr (containerd)", PathBuf::from("/usr/bin/ctr"))?,
            cni_bin_dir: found(
                "the CNI bridge plugin",
                PathBuf::from("/usr/lib/cni/bridge"),
            )?
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/usr/lib/cni")),
            registry: found(
                "the distribution registry (docker-registry)",
                PathBuf::from("/usr/bin/docker-registry"),
            )?,
        })
    }
}
