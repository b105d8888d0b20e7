//! `local-cluster --real-node`: the stack as pods on a real single-node cluster on this machine
//! (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, containerd, a kubelet with
//! `--cloud-provider=external`, kube-proxy), deployed with `kubectl apply -k` of the `local`
//! overlay from images built here.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use cloud_controller_manager::well_known::TAINT_UNINITIALIZED;
use real_node::{
    Cluster, ClusterOptions, NodeMachine, StackSource, apply_local_overlay,
    build_and_import_images, wait_node_initialised, web_behind_load_balancer,
};

/// Runs the real-node demo; `exit` stops after the page, `load_balancer` adds the demo Service.
pub async fn run(timeout: Duration, exit: bool, load_balancer: bool) -> Result<()> {
    println!(
        "starting the real node (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, containerd, kubelet, kube-proxy) ..."
    );
    let cluster = Cluster::start(ClusterOptions::default())
        .await
        .context("starting the real node")?;
    println!(
        "  Node {} ({}) registered in {:.1?}, tainted uninitialized; state and logs in {}",
        cluster.node_name(),
        cluster.node_ip(),
        cluster.startup_duration(),
        cluster.dir()?.display()
    );
    let source = StackSource::discover()?;
    println!(
        "building the images (deploy/images/build.sh) and importing them into the node's containerd ..."
    );
    build_and_import_images(&cluster, &source)?;
    println!("kubectl apply -k deploy/overlays/local (inventory: this machine as the node) ...");
    let machine = NodeMachine {
        instance_id: "m-real".to_owned(),
        zone: "zone-a".to_owned(),
        region: "local-1".to_owned(),
    };
    apply_local_overlay(&cluster, &source, &machine, cluster.dir()?)?;

    let started = Instant::now();
    let node = wait_node_initialised(&cluster, TAINT_UNINITIALIZED, timeout)
        .await
        .with_context(|| pods_summary(&cluster))?;
    println!(
        "  {} initialised by the controller-manager pod after {:.1?}: providerID {}",
        cluster.node_name(),
        started.elapsed(),
        node.spec.and_then(|s| s.provider_id).unwrap_or_default()
    );

    if load_balancer {
        println!(
            "creating pod and LoadBalancer Service default/demo-web; waiting for an address ..."
        );
        let web = web_behind_load_balancer(
            &cluster,
            cluster.dir()?,
            "demo-web",
            "hello from a pod on the real node\n",
            timeout,
        )
        .await?;
        let body = web.response.split("\r\n\r\n").nth(1).unwrap_or_default();
        println!("  curl http://{}/ → {}", web.address, body.trim());
    }
    println!(
        "look around: kubectl --kubeconfig {} get pods -A -o wide",
        cluster.kubeconfig().display()
    );
    if exit {
        return Ok(());
    }
    println!("running until Ctrl-C (everything is stopped and the host put back then) ...");
    tokio::signal::ctrl_c().await?;
    Ok(())
}

fn pods_summary(cluster: &Cluster) -> String {
    cluster
        .kubectl()
        .args(["get", "pods", "-A", "-o", "wide"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}
