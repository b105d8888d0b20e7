//! A real single-node Kubernetes cluster for tests, on this machine: etcd, kube-apiserver,
//! kube-controller-manager and kube-scheduler, containerd with the bridge CNI, a kubelet with
//! `--cloud-provider=external` and kube-proxy, all child processes of the test, with the host
//! state they change (iptables, sysctls, fixed directories, cgroups, mounts, network
//! namespaces, the bridge) put back when the [`Cluster`] is dropped, or at the next start when
//! the test process died first.
//!
//! The binaries come from `bash tests/control-plane/provision.sh --node`; the machine must be
//! root with cgroups and overlayfs, which is what CI has (see the README beside this crate).

mod binaries;
mod cluster;
mod config;
mod error;
mod host;
mod images;
mod registry;
mod stack;

pub use binaries::{NodeBinaries, PAUSE_IMAGE};
pub use cluster::{Cluster, ClusterOptions, CredentialProviders, ENV_NODE_IP};
pub use config::POD_CIDR;
pub use error::Error;
pub use images::{ImageArchive, busybox_image};
pub use registry::Registry;
pub use stack::{
    LoadBalancedWeb, NodeMachine, STACK_NAMESPACE, StackSource, apply_local_overlay,
    build_and_import_images, load_balancer_address, wait_node_initialised,
    web_behind_load_balancer,
};
