//! The configuration files of the node's daemons, as pure functions of their inputs.

use std::net::IpAddr;
use std::path::Path;

use crate::host::BRIDGE;

/// The pod network of the node (the bridge plugin's host-local range) and kube-proxy's
/// `--cluster-cidr`.
pub const POD_CIDR: &str = "10.88.0.0/16";

/// containerd's configuration (version 2): every path under `dir`, the CRI plugin with the
/// cgroupfs driver, the bridge CNI, the locally built sandbox image and per-registry host
/// configuration read from `dir/certs.d` at every pull.
pub(crate) fn containerd_toml(dir: &Path, cni_bin_dir: &Path, sandbox_image: &str) -> String {
    let d = dir.display();
    let cni = cni_bin_dir.display();
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"

[grpc]
  address = "{d}/containerd.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  # Without CAP_SYS_RESOURCE runc cannot lower a container's oom_score_adj below the
  # runtime's, and every sandbox fails with an opaque runc error.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni}"
    conf_dir = "{d}/net.d"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{d}/certs.d"
"#
    )
}

/// The CNI network: a bridge with host-local addresses from [`POD_CIDR`], masquerading, and
/// port mappings; IPAM state under `ipam_dir`.
pub(crate) fn cni_conflist(ipam_dir: &Path) -> String {
    serde_json::json!({
        "cniVersion": "0.4.0",
        "name": "ccm-real-node",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": true,
                "ipMasq": true,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_CIDR}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": ipam_dir,
                }
            },
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    })
    .to_string()
}

/// The kubelet's configuration file: cgroupfs, no swap check, anonymous access to its API
/// (the API server's `kubectl logs` and `exec` reach it without client certificates), eviction
/// thresholds that a nearly full build machine does not trip, and the credential-provider
/// feature gate of 1.20.
pub(crate) fn kubelet_config(node_ip: IpAddr, credential_providers: bool) -> String {
    let gates = if credential_providers {
        "featureGates:\n  KubeletCredentialProviders: true\n"
    } else {
        ""
    };
    format!(
        "apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {node_ip}
port: 10250
readOnlyPort: 0
healthzPort: 0
cgroupDriver: cgroupfs
failSwapOn: false
authentication:
  anonymous:
    enabled: true
  webhook:
    enabled: false
authorization:
  mode: AlwaysAllow
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
serializeImagePulls: false
evictionHard:
  memory.available: 100Mi
  nodefs.available: 1%
  nodefs.inodesFree: 1%
  imagefs.available: 1%
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
{gates}"
    )
}

/// A distribution registry on `127.0.0.1:port` storing under `dir`, with htpasswd basic auth
/// when `htpasswd` is given (plain HTTP: loopback only).
pub(crate) fn registry_yaml(dir: &Path, port: u16, htpasswd: Option<&Path>) -> String {
    let auth = htpasswd
        .map(|path| {
            format!(
                "auth:\n  htpasswd:\n    realm: ccm-real-node\n    path: {}\n",
                path.display()
            )
        })
        .unwrap_or_default();
    format!(
        "version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: {}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
{auth}",
        dir.display()
    )
}

/// containerd's host configuration for a plain-HTTP registry at `host_port`.
pub(crate) fn hosts_toml(host_port: &str) -> String {
    format!(
        "server = \"http://{host_port}\"\n\n[host.\"http://{host_port}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  skip_verify = true\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_conflist_names_the_bridge_and_range() {
        let v: serde_json::Value =
            serde_json::from_str(&cni_conflist(Path::new("/x/ipam"))).unwrap_or_default();
        assert_eq!(v["plugins"][0]["bridge"], BRIDGE);
        assert_eq!(v["plugins"][0]["ipam"]["ranges"][0][0]["subnet"], POD_CIDR);
        assert_eq!(v["plugins"][0]["ipam"]["dataDir"], "/x/ipam");
    }

    #[test]
    fn kubelet_config_has_the_gate_only_when_asked() {
        let ip: IpAddr = [192, 0, 2, 2].into();
        assert!(kubelet_config(ip, true).contains("KubeletCredentialProviders: true"));
        assert!(!kubelet_config(ip, false).contains("featureGates"));
    }

    #[test]
    fn registry_auth_is_optional() {
        assert!(registry_yaml(Path::new("/r"), 5000, None).contains("addr: 127.0.0.1:5000"));
        assert!(!registry_yaml(Path::new("/r"), 5000, None).contains("htpasswd"));
        assert!(registry_yaml(Path::new("/r"), 5000, Some(Path::new("/h"))).contains("path: /h"));
    }
}
