//! `local-cluster --real-node`: the stack as pods on a real single-node cluster on this machine
//! (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, containerd, a kubelet with
//! `--cloud-provider=external`, kube-proxy), deployed with `kubectl apply -k` of the `local`
//! overlay from images built here.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::api::{Api, PostParams};
use real_node::{
    Cluster, ClusterOptions, NodeMachine, StackSource, apply_local_overlay,
    build_and_import_images, busybox_image,
};
use serde_json::json;
use test_support::{Wait, http_get};

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
    let nodes: Api<Node> = Api::all(cluster.client()?);
    let name = cluster.node_name().to_owned();
    let provider_id = Wait::new(format!("Node {name} to be initialised"), timeout)
        .every(Duration::from_millis(500))
        .until(|| {
            let nodes = nodes.clone();
            let name = name.clone();
            async move {
                let node = nodes.get(&name).await.map_err(|e| e.to_string())?;
                let spec = node.spec.unwrap_or_default();
                let tainted =
                    spec.taints.unwrap_or_default().iter().any(|t| {
                        t.key == cloud_controller_manager::well_known::TAINT_UNINITIALIZED
                    });
                match spec.provider_id {
                    Some(id) if !tainted => Ok(id),
                    _ => Err("not yet".to_owned()),
                }
            }
        })
        .await
        .with_context(|| pods_summary(&cluster))?;
    println!(
        "  {name} initialised by the controller-manager pod after {:.1?}: providerID {provider_id}",
        started.elapsed()
    );

    if load_balancer {
        let page = demo_load_balancer(&cluster, timeout).await?;
        println!("  {page}");
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

/// A busybox web pod behind a LoadBalancer Service; the page fetched through the address.
async fn demo_load_balancer(cluster: &Cluster, timeout: Duration) -> Result<String> {
    let image = busybox_image(
        cluster.dir()?,
        "ccm.local/demo-web:1",
        "hello from a pod on the real node\n",
    )?;
    cluster.import_image(&image.path)?;
    let client = cluster.client()?;
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "demo-web", "labels": {"app": "demo-web"}},
        "spec": {"containers": [{"name": "web", "image": image.name, "imagePullPolicy": "Never",
                                 "args": ["httpd", "-f", "-p", "8080", "-h", "/www"]}]}
    }))?;
    Api::<Pod>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &pod)
        .await?;
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "demo-web"},
        "spec": {"type": "LoadBalancer", "selector": {"app": "demo-web"},
                 "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]}
    }))?;
    let services: Api<Service> = Api::namespaced(client, "default");
    services.create(&PostParams::default(), &service).await?;
    println!("created pod and LoadBalancer Service default/demo-web; waiting for an address ...");
    let ip = Wait::new("default/demo-web to get an address", timeout)
        .every(Duration::from_millis(500))
        .until(|| {
            let services = services.clone();
            async move {
                let s = services.get("demo-web").await.map_err(|e| e.to_string())?;
                s.status
                    .and_then(|s| s.load_balancer)
                    .and_then(|lb| lb.ingress)
                    .and_then(|i| i.into_iter().find_map(|i| i.ip))
                    .ok_or_else(|| "no address yet".to_owned())
            }
        })
        .await?;
    let page = Wait::new(format!("a page from http://{ip}/"), timeout)
        .every(Duration::from_millis(500))
        .until(|| {
            let addr = format!("{ip}:80");
            async move { http_get(&addr).await }
        })
        .await?;
    let Some(body) = page.split("\r\n\r\n").nth(1) else {
        bail!("http://{ip}/ answered without a body: {page}");
    };
    Ok(format!("curl http://{ip}/ → {}", body.trim()))
}

fn pods_summary(cluster: &Cluster) -> String {
    cluster
        .kubectl()
        .args(["get", "pods", "-A", "-o", "wide"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}
