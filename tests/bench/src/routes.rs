//! The `routes` run: Nodes without pod CIDRs; the node-ipam controller allocates them, the route
//! controller asks the `local` shim for a route per Node, and the shim programs them into a
//! routing table of a network namespace made for the run.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use test_support::{Location, Netns, last_lines, temp_dir};

use crate::RoutesArgs;
use crate::metrics;
use crate::nodes::{PlainNode, plain_inventory};
use crate::procfs;
use crate::report::{
    PhaseCpu, Usage, verdict, write_baseline, write_per, write_phases, write_usage,
};
use crate::run::{
    Machine, ServingFiles, create_all, exited, keep_logs, progress, settled_metrics, spawn_ccm,
    spawn_shim, start_control_plane, wait_for_socket,
};

/// Target: every Node has its route and `NetworkUnavailable=False` within this many seconds.
pub const TARGET_SECONDS: f64 = 4.0;
/// Target: controller-manager plus shim CPU seconds.
pub const TARGET_CPU_SECONDS: f64 = 1.2;
/// Target: controller-manager peak RSS in MiB.
pub const TARGET_RSS_MIB: f64 = 32.0;

/// The routing table the shim programs.
const TABLE: &str = "100";
/// The next hops' subnet: one interface in the namespace carries it.
const NODE_NET: &str = "10.200.0.1/16";
/// `--cluster-cidr`: 4096 /24 pod CIDRs.
const CLUSTER_CIDR: &str = "10.128.0.0/12";

/// Everything `bench routes` measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RoutesReport {
    /// Nodes.
    pub nodes: usize,
    /// Whether the route controller ran in the watch-based mode (else periodic only).
    pub watch_based: bool,
    /// `--route-reconciliation-period`.
    pub period: String,
    /// `--kube-api-qps` of the controller-manager.
    pub kube_api_qps: f32,
    /// kube-apiserver version.
    pub apiserver_version: String,
    /// Cargo profile of the measured binaries.
    pub build_profile: String,
    /// CPU cores of the machine.
    pub cores: usize,
    /// From the controller-manager's spawn to every Node with its route and condition.
    pub all_seconds: f64,
    /// The same API writes from a lean client.
    pub baseline_seconds: f64,
    /// Controller-manager CPU seconds until then (start-up included).
    pub ccm_cpu_seconds: f64,
    /// Shim CPU seconds over the same span, its start-up excluded.
    pub shim_cpu_seconds: f64,
    /// Controller-manager peak RSS in MiB.
    pub ccm_peak_rss_mib: f64,
    /// Shim peak RSS in MiB.
    pub shim_peak_rss_mib: f64,
    /// Routes in the namespace's table at the end.
    pub kernel_routes: usize,
    /// API requests by method over the run.
    pub api_requests_by_method: BTreeMap<String, f64>,
    /// CPI calls by method over the run.
    pub cpi_calls_by_method: BTreeMap<String, f64>,
    /// Control-plane CPU while the controller-manager worked.
    pub ccm_phase: PhaseCpu,
    /// Control-plane CPU during the baseline writes.
    pub baseline_phase: PhaseCpu,
}

fn node(index: usize) -> PlainNode {
    let v = index + 2;
    PlainNode::new(
        format!("bench-rt-node-{index}"),
        format!("10.200.{}.{}", (v >> 8) & 255, v & 255),
        "routes",
    )
}

/// Runs `bench routes`.
pub async fn routes(args: &RoutesArgs) -> anyhow::Result<RoutesReport> {
    anyhow::ensure!(
        args.nodes > 0 && args.nodes <= 4000,
        "--nodes must be in 1..=4000 (the cluster CIDR {CLUSTER_CIDR} holds 4096 /24s)"
    );
    anyhow::ensure!(args.workers > 0, "--workers must be positive");
    let Machine {
        profile,
        ticks,
        cores,
    } = Machine::check()?;
    let n = args.nodes;
    let period = humantime::format_duration(args.period).to_string();

    let work =
        temp_dir("ccm-bench-routes-", Location::System).context("creating a work directory")?;
    let dir = work.path();
    let netns = Netns::create().context(
        "creating a network namespace (the routes bench needs root and iproute2's `ip`)",
    )?;
    netns
        .add_link("ccm0", &[NODE_NET])
        .context("giving the namespace the nodes' subnet")?;
    let (cp, client, cp_pids) = start_control_plane(&args.run).await?;

    // 1. Nodes without pod CIDRs.
    let all: Vec<PlainNode> = (0..n).map(node).collect();
    let node_api: Api<Node> = Api::all(client.clone());
    progress(format_args!("creating {n} nodes without pod CIDRs"));
    create_all(
        &node_api,
        all.iter().map(PlainNode::initialised).collect(),
        args.run.create_concurrency,
    )
    .await?;

    // 2. The shim programming routes into the namespace, then the controller-manager.
    let inventory = dir.join("inventory.yaml");
    std::fs::write(&inventory, plain_inventory(&all))
        .with_context(|| format!("writing {}", inventory.display()))?;
    let socket = dir.join("shim.sock");
    let shim = spawn_shim(
        &args.run,
        dir,
        &inventory,
        &socket,
        &[
            format!("--route-netns={}", netns.name()),
            format!("--route-table={TABLE}"),
        ],
    )?;
    wait_for_socket(&socket, &shim).await?;
    let (serving, scraper) = ServingFiles::create(dir, &cp)?;

    let mut extra = vec![
        "--cluster-name=bench".to_string(),
        "--controllers=node-ipam-controller,node-route-controller".into(),
        "--allocate-node-cidrs=true".into(),
        format!("--cluster-cidr={CLUSTER_CIDR}"),
        format!("--route-reconciliation-period={period}"),
    ];
    if args.watch_based {
        extra.push(
            "--feature-gates=CloudControllerManagerWatchBasedRoutesReconciliation=true".into(),
        );
    }
    progress(format_args!(
        "starting the controller-manager ({} mode, period {period})",
        if args.watch_based {
            "watch-based"
        } else {
            "periodic"
        }
    ));
    let shim_startup_cpu = procfs::cpu_seconds(&shim.pid().to_string(), ticks)?;
    let before = cp_pids.sample(ticks)?;
    let t0 = Instant::now();
    let ccm = spawn_ccm(&args.run, &cp, &socket, &serving, &extra, dir)?;

    // Completion: the manager's PATCH counter says both writes per Node were made (cheap to
    // poll), then one LIST and one table dump confirm it.
    let deadline = t0 + Duration::from_secs(args.run.timeout_secs);
    let (done, kernel_routes) = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let failure = if let Some(why) = exited(&ccm, &shim) {
            Some(why)
        } else if Instant::now() >= deadline {
            Some(format!(
                "timed out after {} s: {} nodes ready, {} routes in table {TABLE}; controller-manager log tail:\n{}\nshim log tail:\n{}",
                args.run.timeout_secs,
                networked(&node_api).await.unwrap_or(0),
                routes_in(&netns).unwrap_or(0),
                last_lines(&ccm.logs(), 30),
                last_lines(&shim.logs(), 30)
            ))
        } else {
            None
        };
        if let Some(failure) = failure {
            keep_logs(args.run.keep_logs.as_deref(), dir, &cp);
            anyhow::bail!("{failure}");
        }
        let Ok(samples) = scraper.samples().await else {
            continue;
        };
        let patches = metrics::sum_by(&samples, "rest_client_requests_total", "method")
            .get("PATCH")
            .copied()
            .unwrap_or(0.0);
        // The pod CIDR PATCH and the NetworkUnavailable PATCH per Node.
        if patches < 2.0 * n as f64 {
            continue;
        }
        let now = Instant::now();
        let routes = routes_in(&netns)?;
        if routes >= n && networked(&node_api).await? >= n {
            break (now, routes);
        }
    };
    let all_seconds = done.duration_since(t0);
    let ccm_phase = cp_pids.sample(ticks)?.since(&before, all_seconds);
    progress(format_args!(
        "every node has its route after {:.2} s",
        all_seconds.as_secs_f64()
    ));
    let ccm_usage = procfs::usage(&ccm.pid().to_string(), ticks)?;
    let shim_usage = procfs::usage(&shim.pid().to_string(), ticks)?;
    let samples = settled_metrics(&scraper).await?;
    ccm.terminate(Duration::from_secs(5));
    shim.terminate(Duration::from_secs(5));
    keep_logs(args.run.keep_logs.as_deref(), dir, &cp);

    // 3. Baseline: the same two writes per Node from a lean client, on fresh Nodes.
    let fresh: Vec<PlainNode> = (n..2 * n).map(node).collect();
    progress(format_args!(
        "baseline: creating {n} more nodes (not timed)"
    ));
    create_all(
        &node_api,
        fresh.iter().map(PlainNode::initialised).collect(),
        args.run.create_concurrency,
    )
    .await?;
    progress(format_args!(
        "baseline: PATCH podCIDRs + PATCH NetworkUnavailable per node, {} in flight",
        args.workers
    ));
    let before = cp_pids.sample(ticks)?;
    let baseline = write_like_the_controllers(&node_api, &fresh, usize::from(args.workers)).await?;
    let baseline_phase = cp_pids.sample(ticks)?.since(&before, baseline);

    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    Ok(RoutesReport {
        nodes: n,
        watch_based: args.watch_based,
        period,
        kube_api_qps: args.run.kube_api_qps,
        apiserver_version: cp.server_version().git_version.clone(),
        build_profile: profile,
        cores,
        all_seconds: all_seconds.as_secs_f64(),
        baseline_seconds: baseline.as_secs_f64(),
        ccm_cpu_seconds: ccm_usage.cpu_seconds,
        shim_cpu_seconds: shim_usage.cpu_seconds - shim_startup_cpu,
        ccm_peak_rss_mib: mib(ccm_usage.peak_rss_bytes),
        shim_peak_rss_mib: mib(shim_usage.peak_rss_bytes),
        kernel_routes,
        api_requests_by_method: metrics::sum_by(&samples, "rest_client_requests_total", "method"),
        cpi_calls_by_method: metrics::sum_by(&samples, "cloudprovider_requests_total", "method"),
        ccm_phase,
        baseline_phase,
    })
}

/// Routes with a next hop in the namespace's table.
fn routes_in(netns: &Netns) -> anyhow::Result<usize> {
    Ok(netns
        .routes(TABLE)
        .context("reading the routing table")?
        .iter()
        .filter(|line| line.contains(" via "))
        .count())
}

/// How many Nodes have pod CIDRs and `NetworkUnavailable=False` (one LIST).
async fn networked(api: &Api<Node>) -> anyhow::Result<usize> {
    let list = api
        .list(&Default::default())
        .await
        .context("listing nodes")?;
    Ok(list
        .items
        .iter()
        .filter(|node| {
            let has_cidrs = node
                .spec
                .as_ref()
                .and_then(|s| s.pod_cidrs.as_ref())
                .is_some_and(|c| !c.is_empty());
            let available = node
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|conditions| {
                    conditions
                        .iter()
                        .any(|c| c.type_ == "NetworkUnavailable" && c.status == "False")
                });
            has_cidrs && available
        })
        .count())
}

/// The "API server alone" baseline: per Node, with `workers` in flight, the node-ipam
/// controller's pod-CIDR PATCH and the route controller's `nodes/status` PATCH.
async fn write_like_the_controllers(
    api: &Api<Node>,
    nodes: &[PlainNode],
    workers: usize,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    futures::stream::iter(nodes.iter().enumerate())
        .map(|(i, node)| async move {
            let cidr = format!("10.{}.{}.0/24", 144 + (i >> 8), i & 255);
            let spec = serde_json::json!({"spec": {"podCIDR": cidr, "podCIDRs": [cidr]}});
            api.patch(
                &node.name,
                &PatchParams::default(),
                &Patch::Strategic(&spec),
            )
            .await
            .with_context(|| format!("PATCH node {}", node.name))?;
            let now = k8s_openapi::jiff::Timestamp::now().to_string();
            let status = serde_json::json!({"status": {"conditions": [{
                "type": "NetworkUnavailable",
                "status": "False",
                "reason": "RouteCreated",
                "message": "RouteController created a route",
                "lastTransitionTime": now,
                "lastHeartbeatTime": now,
            }]}});
            api.patch_status(
                &node.name,
                &PatchParams::default(),
                &Patch::Strategic(&status),
            )
            .await
            .with_context(|| format!("PATCH node {} status", node.name))?;
            anyhow::Ok(())
        })
        .buffer_unordered(workers.max(1))
        .try_collect::<Vec<()>>()
        .await?;
    Ok(started.elapsed())
}

/// Renders the report as text.
pub fn render_text(r: &RoutesReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "routes: {} nodes, {} route reconciliation (period {}), kube-api-qps {}, local shim over a Unix socket programming a netns table, kube-apiserver {}, {} build, {} cores",
        r.nodes,
        if r.watch_based {
            "watch-based"
        } else {
            "periodic"
        },
        r.period,
        r.kube_api_qps,
        r.apiserver_version,
        r.build_profile,
        r.cores
    );
    let _ = writeln!(
        out,
        "  every node has its route and NetworkUnavailable=False {:6.2} s   target <= {TARGET_SECONDS} s  {}",
        r.all_seconds,
        verdict(r.all_seconds <= TARGET_SECONDS)
    );
    write_baseline(&mut out, r.all_seconds, r.baseline_seconds);
    write_usage(
        &mut out,
        Usage {
            ccm_cpu: r.ccm_cpu_seconds,
            shim_cpu: r.shim_cpu_seconds,
            cpu_target: TARGET_CPU_SECONDS,
            ccm_rss: r.ccm_peak_rss_mib,
            shim_rss: r.shim_peak_rss_mib,
            rss_target: TARGET_RSS_MIB,
        },
    );
    write_per(
        &mut out,
        "API requests per node",
        &r.api_requests_by_method,
        r.nodes,
    );
    write_per(
        &mut out,
        "CPI calls per node",
        &r.cpi_calls_by_method,
        r.nodes,
    );
    write_phases(
        &mut out,
        r.cores,
        &[
            ("CCM run", &r.ccm_phase),
            ("API server alone", &r.baseline_phase),
        ],
    );
    out
}
