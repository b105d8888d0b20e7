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

/// A web pod answering `page`, behind a LoadBalancer Service, as [`web_behind_load_balancer`]
/// left it.
#[derive(Debug, Clone)]
pub struct LoadBalancedWeb {
    /// The address the Service got (`status.loadBalancer.ingress[].ip`).
    pub address: String,
    /// The whole HTTP response fetched through `address:80`, which contains `page`.
    pub response: String,
}

/// Creates, in `default`, a busybox web pod `name` (image built into `dir`, imported, never
/// pulled) answering `page` on 8080, and a LoadBalancer Service `name` (port 80 → 8080, see
/// `test_support::load_balancer_service`); waits for its address and for a page through it
/// (load balancer → node port → kube-proxy → pod). The pod does not tolerate the
/// uninitialized taint: the node must have been initialised.
pub async fn web_behind_load_balancer(
    cluster: &Cluster,
    dir: &Path,
    name: &str,
    page: &str,
    timeout: std::time::Duration,
) -> Result<LoadBalancedWeb, Error> {
    use k8s_openapi::api::core::v1::{Pod, Service};
    use kube::api::{Api, PostParams};

    let image = crate::busybox_image(dir, &format!("ccm.local/{name}:1"), page)?;
    cluster.import_image(&image.path)?;
    let client = cluster.client()?;
    let kube = |context: String| move |source| Error::Kube { context, source };
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"containers": [{
            "name": "web", "image": image.name, "imagePullPolicy": "Never",
            "args": ["httpd", "-f", "-p", "8080", "-h", "/www"],
            "ports": [{"containerPort": 8080}],
            "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
        }]}
    }))
    .map_err(|e| Error::Json(format!("pod {name}: {e}")))?;
    Api::<Pod>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &pod)
        .await
        .map_err(kube(format!("creating pod default/{name}")))?;
    let services: Api<Service> = Api::namespaced(client, "default");
    services
        .create(
            &PostParams::default(),
            &test_support::load_balancer_service("default", name, &[("TCP", 80)]),
        )
        .await
        .map_err(kube(format!("creating service default/{name}")))?;
    let address = load_balancer_address(&services, name, timeout).await?;
    let response = test_support::Wait::new(format!("a page through {address}:80"), timeout)
        .every(std::time::Duration::from_millis(250))
        .until(|| {
            let addr = format!("{address}:80");
            let page = page.to_owned();
            async move {
                let response = test_support::http_get(&addr).await?;
                if response.contains(page.trim()) {
                    Ok(response)
                } else {
                    Err(response)
                }
            }
        })
        .await?;
    Ok(LoadBalancedWeb { address, response })
}

/// Waits until LoadBalancer Service `name` has an ingress address, and returns it.
pub async fn load_balancer_address(
    services: &kube::Api<k8s_openapi::api::core::v1::Service>,
    name: &str,
    timeout: std::time::Duration,
) -> Result<String, Error> {
    test_support::Wait::new(
        format!("Service {name} to get a load-balancer address"),
        timeout,
    )
    .every(std::time::Duration::from_millis(250))
    .until(|| async move {
        let s = services.get(name).await.map_err(|e| e.to_string())?;
        s.status
            .and_then(|s| s.load_balancer)
            .and_then(|lb| lb.ingress)
            .and_then(|i| i.into_iter().find_map(|i| i.ip))
            .ok_or_else(|| "no ingress address yet".to_owned())
    })
    .await
    .map_err(Error::from)
}

/// Waits until the cloud-node controller has initialised the node (see
/// `test_support::initialised`; the taint's key is the product's, passed in) and returns it.
pub async fn wait_node_initialised(
    cluster: &Cluster,
    uninitialized_taint: &str,
    timeout: std::time::Duration,
) -> Result<k8s_openapi::api::core::v1::Node, Error> {
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(cluster.client()?);
    let name = cluster.node_name();
    test_support::Wait::new(format!("Node {name} to be initialised"), timeout)
        .every(std::time::Duration::from_millis(250))
        .until(|| {
            let nodes = nodes.clone();
            async move {
                let node = nodes.get(name).await.map_err(|e| e.to_string())?;
                test_support::initialised(&node, uninitialized_taint).map(|()| node)
            }
        })
        .await
        .map_err(Error::from)
}
