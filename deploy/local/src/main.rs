//! `local-cluster`: the README's one-command demo. Starts a real etcd + kube-apiserver, the
//! `local` shim and the controller-manager (mutual TLS between them), registers every inventory
//! machine as a Node the way a kubelet with `--cloud-provider=external` does, and shows the
//! nodes being initialised.

mod demo;
mod real_node;

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use cloud_controller_manager::well_known::{
    LABEL_INSTANCE_TYPE, LABEL_REGION, LABEL_ZONE, TAINT_UNINITIALIZED,
};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, PostParams};
use local_shim::Inventory;

/// Pod CIDRs of the demo cluster: the node-ipam controller gives each machine a /24 of it.
const DEMO_CLUSTER_CIDR: &str = "10.244.0.0/16";
use test_control_plane::ControlPlane;
use test_support::{
    Process, ShimMtls, Wait, free_port, initialised, kubelet_registered_node, last_lines,
};

/// Flags of `local-cluster`.
#[derive(Parser, Debug)]
#[command(
    about = "Run etcd, kube-apiserver, the local shim and the controller-manager on this machine"
)]
struct Flags {
    /// The local shim's inventory file.
    #[arg(long, default_value = "provider-shims/local/examples/inventory.yaml")]
    inventory: PathBuf,
    /// Exit once every node is initialised and the demo load balancer answered, instead of
    /// running until Ctrl-C.
    #[arg(long)]
    exit_when_initialised: bool,
    /// Skip the demo LoadBalancer Service.
    #[arg(long)]
    no_load_balancer: bool,
    /// How long to wait for initialisation before giving up.
    #[arg(long, default_value = "120")]
    timeout_seconds: u64,
    /// Run a real single-node cluster instead (kubelet, containerd, kube-proxy, the Kubernetes
    /// control plane) with the stack deployed as pods from `deploy/overlays/local`; needs root
    /// and `bash tests/control-plane/provision.sh --node`.
    #[arg(long)]
    real_node: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    let flags = Flags::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    if flags.real_node {
        return real_node::run(
            Duration::from_secs(flags.timeout_seconds),
            flags.exit_when_initialised,
            !flags.no_load_balancer,
        )
        .await;
    }
    let inventory_text = std::fs::read_to_string(&flags.inventory)
        .with_context(|| format!("reading --inventory {}", flags.inventory.display()))?;
    let inventory = Inventory::parse(&flags.inventory, &inventory_text)
        .with_context(|| format!("parsing --inventory {}", flags.inventory.display()))?;
    let inventory_path = std::fs::canonicalize(&flags.inventory)?;

    println!("starting etcd + kube-apiserver ...");
    let cp = ControlPlane::start()
        .await
        .context("starting the control plane")?;
    println!(
        "  API server {} ({}), kubeconfig {}",
        cp.server_url(),
        cp.server_version().git_version,
        cp.kubeconfig_path().display()
    );
    let dir = cp.state_dir().join("local-cluster");
    std::fs::create_dir_all(&dir)?;
    let mtls = ShimMtls::write(&dir, "local-cluster-cpi-ca")?;
    let port = free_port()?;

    println!("starting the local shim on https://127.0.0.1:{port} (mutual TLS) ...");
    let mut shim_args = vec![
        format!("--inventory={}", inventory_path.display()),
        format!("--state-dir={}", dir.join("state").display()),
    ];
    shim_args.extend(mtls.shim_args(port));
    shim_args.push("--metrics-bind-address=127.0.0.1:0".into());
    // The demo must not change this machine's routing: routes go to the shim's database only.
    shim_args.push("--routes=state-only".into());
    let shim = Process::for_workspace_binary("local-shim", "local-shim", &dir)?
        .args(&shim_args)
        .spawn()?;
    println!("starting the cloud-controller-manager ...");
    let mut ccm_args = vec![format!("--kubeconfig={}", cp.kubeconfig_path().display())];
    ccm_args.extend(mtls.ccm_args(port));
    ccm_args.extend([
        "--bind-address=127.0.0.1".into(),
        "--cloud-provider=local".into(),
        "--cluster-name=local-cluster".into(),
        "--allocate-node-cidrs=true".into(),
        format!("--cluster-cidr={DEMO_CLUSTER_CIDR}"),
        // Routes follow node changes, at most once a second, instead of every 10 s.
        "--feature-gates=CloudControllerManagerWatchBasedRoutesReconciliation=true".into(),
        "--route-reconciliation-period=1s".into(),
    ]);
    let ccm = Process::for_workspace_binary(
        "cloud-controller-manager",
        "cloud-controller-manager",
        &dir,
    )?
    .args(&ccm_args)
    .spawn()?;
    println!("  logs: {}", dir.display());

    let client = cp.client()?;
    let nodes: Api<Node> = Api::all(client);
    println!(
        "registering {} tainted nodes (as kubelets with --cloud-provider=external do) ...",
        inventory.machines().len()
    );
    let started = Instant::now();
    for machine in inventory.machines() {
        let node = kubelet_registered_node(&machine.name, None, TAINT_UNINITIALIZED);
        nodes.create(&PostParams::default(), &node).await?;
    }

    let done = RefCell::new(BTreeSet::new());
    let deadline = Duration::from_secs(flags.timeout_seconds);
    let total = inventory.machines().len();
    // The probe prints each node once it is initialised; `Ok(Err(..))` ends the wait early.
    let outcome = Wait::new(
        "every node to be initialised",
        deadline.saturating_sub(started.elapsed()),
    )
    .every(Duration::from_millis(200))
    .until(|| async {
        if let Some(status) = ccm.exit_status() {
            return Ok(Err(anyhow::anyhow!(
                "the controller-manager exited ({status}):\n{}",
                ccm.logs()
            )));
        }
        if let Some(status) = shim.exit_status() {
            return Ok(Err(anyhow::anyhow!(
                "the local shim exited ({status}):\n{}",
                shim.logs()
            )));
        }
        let list = match nodes.list(&Default::default()).await {
            Ok(list) => list,
            Err(e) => return Ok(Err(e.into())),
        };
        let mut done = done.borrow_mut();
        for node in list.items {
            let name = node.metadata.name.clone().unwrap_or_default();
            if initialised(&node, TAINT_UNINITIALIZED).is_err() || done.contains(&name) {
                continue;
            }
            print_initialised(&node, &name, started);
            done.insert(name);
        }
        if done.len() < total {
            Err(format!("{}/{total} nodes initialised", done.len()))
        } else {
            Ok(Ok(()))
        }
    })
    .await;
    match outcome {
        Ok(result) => result?,
        Err(_) => bail!(
            "nodes not initialised after {deadline:?}; see the logs in {}\n--- controller-manager ---\n{}\n--- local-shim ---\n{}",
            dir.display(),
            ccm.logs(),
            shim.logs()
        ),
    }
    let done = done.into_inner();
    println!(
        "all {} nodes initialised in {:.2?}",
        done.len(),
        started.elapsed()
    );
    println!(
        "pod networking: CIDRs from the node-ipam controller, routes by the route controller ..."
    );
    if let Err(e) = demo::pod_networking(
        cp.client()?,
        total,
        Duration::from_secs(flags.timeout_seconds),
    )
    .await
    {
        bail!(
            "{e:#}\nsee the logs in {}\n--- controller-manager ---\n{}\n--- local-shim ---\n{}",
            dir.display(),
            last_lines(&ccm.logs(), 30),
            last_lines(&shim.logs(), 30)
        );
    }
    // The stand-ins for kube-proxy live as long as this process.
    let _backends = if flags.no_load_balancer {
        Vec::new()
    } else {
        let demo = demo::serve(
            cp.client()?,
            &inventory,
            Duration::from_secs(flags.timeout_seconds),
        )
        .await;
        match demo {
            Ok(demo) => demo,
            Err(e) => bail!(
                "{e:#}\nsee the logs in {}\n--- controller-manager ---\n{}\n--- local-shim ---\n{}",
                dir.display(),
                last_lines(&ccm.logs(), 30),
                last_lines(&shim.logs(), 30)
            ),
        }
    };
    if flags.exit_when_initialised {
        return Ok(());
    }
    println!(
        "\nrunning; look around with:\n  kubectl --kubeconfig {} get nodes,services -L {LABEL_ZONE},{LABEL_INSTANCE_TYPE} -o wide\n  kubectl --kubeconfig {} get nodes -o custom-columns=NAME:.metadata.name,POD-CIDRS:.spec.podCIDRs,NETWORK-UNAVAILABLE:.status.conditions[?(@.type==\"NetworkUnavailable\")].status\nedit {} (e.g. set a machine's state) and watch; Ctrl-C stops everything.",
        cp.kubeconfig_path().display(),
        cp.kubeconfig_path().display(),
        inventory_path.display()
    );
    tokio::signal::ctrl_c().await?;
    println!("stopping ...");
    Ok(())
}

/// Prints one line for the initialised `node` called `name`: when, provider ID, zone, region,
/// instance type and addresses.
fn print_initialised(node: &Node, name: &str, started: Instant) {
    let spec = node.spec.clone().unwrap_or_default();
    let addresses = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.clone())
        .unwrap_or_default();
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let label = |k: &str| labels.get(k).cloned().unwrap_or_else(|| "-".into());
    println!(
        "  [{:>6.2}s] {name:<10} initialised: providerID={} zone={} region={} type={} addresses={}",
        started.elapsed().as_secs_f64(),
        spec.provider_id.unwrap_or_default(),
        label(LABEL_ZONE),
        label(LABEL_REGION),
        label(LABEL_INSTANCE_TYPE),
        addresses
            .iter()
            .map(|a| format!("{}={}", a.type_, a.address))
            .collect::<Vec<_>>()
            .join(",")
    );
}
