//! The `lb` run: LoadBalancer Services on initialised Nodes, served by the service-lb controller
//! and the `local` shim's load balancers; then one Node added.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Event, EventSource, Node, ObjectReference, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};
use test_support::{
    KUBE_PROXY_HEALTH_PORT, Location, last_lines, load_balancer_service, serve_http, temp_dir,
};

use crate::LbArgs;
use crate::metrics;
use crate::nodes::{PlainNode, plain_inventory};
use crate::procfs;
use crate::report::{
    PhaseCpu, Usage, WatchSeen, verdict, write_baseline, write_per, write_phases, write_usage,
};
use crate::run::{
    Machine, ServingFiles, create_all, exited, keep_logs, progress, settled_metrics, spawn_ccm,
    spawn_shim, start_control_plane, wait_for_socket,
};

/// Target: every Service has an ingress address within this many seconds (or 1.1× the API
/// server alone, if that is longer).
pub const TARGET_SERVICES_SECONDS: f64 = 2.0;
/// Target: controller-manager plus shim CPU seconds for the Services.
pub const TARGET_CPU_SECONDS: f64 = 0.6;
/// Target: controller-manager peak RSS in MiB.
pub const TARGET_RSS_MIB: f64 = 32.0;
/// Target: a new Node reaches every load balancer within this many seconds.
pub const TARGET_NODE_SECONDS: f64 = 2.0;

/// The finalizer the service-lb controller adds before creating a load balancer.
const CLEANUP_FINALIZER: &str = "service.kubernetes.io/load-balancer-cleanup";
/// The pool the bench gives the shim: room for every Service of a run (a /16 inside 127/8).
const POOL_CIDR: &str = "127.77.0.0/16";

/// Everything `bench lb` measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LbReport {
    /// LoadBalancer Services.
    pub services: usize,
    /// Nodes (before the one added).
    pub nodes: usize,
    /// `--concurrent-service-syncs`, and the baseline's concurrency.
    pub workers: u16,
    /// kube-apiserver version.
    pub apiserver_version: String,
    /// Cargo profile of the measured binaries.
    pub build_profile: String,
    /// CPU cores of the machine.
    pub cores: usize,
    /// From the controller-manager's spawn to its first status write (100 ms resolution).
    pub first_service_seconds: f64,
    /// From the controller-manager's spawn to every Service with an address (100 ms resolution).
    pub all_services_seconds: f64,
    /// The same writes from a lean client.
    pub baseline_seconds: f64,
    /// Controller-manager CPU seconds until every Service had an address (start-up included).
    pub ccm_cpu_seconds: f64,
    /// Shim CPU seconds over the same span, its start-up excluded.
    pub shim_cpu_seconds: f64,
    /// Controller-manager peak RSS in MiB.
    pub ccm_peak_rss_mib: f64,
    /// Shim peak RSS in MiB.
    pub shim_peak_rss_mib: f64,
    /// API requests by method, until every Service had an address and its Events were sent.
    pub api_requests_by_method: BTreeMap<String, f64>,
    /// CPI calls by method over the same span.
    pub cpi_calls_by_method: BTreeMap<String, f64>,
    /// What the controller-manager's Service watch delivered over the same span: whether it
    /// saw its own writes.
    pub service_watch: WatchSeen,
    /// From the new Node's creation to one UpdateLoadBalancer per Service.
    pub node_added_seconds: Option<f64>,
    /// UpdateLoadBalancer calls made for the new Node (after settling).
    pub node_added_updates: f64,
    /// Control-plane CPU while the controller-manager served the Services.
    pub ccm_phase: PhaseCpu,
    /// Control-plane CPU during the baseline writes.
    pub baseline_phase: PhaseCpu,
}

/// One bench Node: loopback InternalIP so the shim's health checks reach the bench's stand-in
/// for kube-proxy's `/healthz`.
fn lb_node(index: usize) -> PlainNode {
    let v = index + 1;
    PlainNode::new(
        format!("bench-lb-node-{index}"),
        format!("127.78.{}.{}", (v >> 8) & 255, v & 255),
        "lb",
    )
}

fn service(namespace: &str, index: usize) -> Service {
    load_balancer_service(namespace, &format!("lb-{index}"), &[("TCP", 80)])
}

/// Serves `200 ok` on `ip:10256` for every node, as kube-proxy's `/healthz` does.
async fn start_health_responders(
    nodes: &[PlainNode],
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut tasks = Vec::with_capacity(nodes.len());
    for node in nodes {
        let ip: std::net::IpAddr = node.ip.parse()?;
        tasks.push(
            serve_http(ip, KUBE_PROXY_HEALTH_PORT, "ok".into(), || true)
                .await
                .with_context(|| format!("binding {ip}:{KUBE_PROXY_HEALTH_PORT}"))?,
        );
    }
    Ok(tasks)
}

/// Runs `bench lb`.
pub async fn lb(args: &LbArgs) -> anyhow::Result<LbReport> {
    anyhow::ensure!(args.services > 0, "--services must be positive");
    anyhow::ensure!(
        args.nodes > 0 && args.nodes < 60_000,
        "--nodes must be in 1..60000"
    );
    anyhow::ensure!(args.workers > 0, "--workers must be positive");
    let Machine {
        profile,
        ticks,
        cores,
    } = Machine::check()?;
    let (n_services, n_nodes) = (args.services, args.nodes);
    let workers = usize::from(args.workers);

    let work = temp_dir("ccm-bench-lb-", Location::System).context("creating a work directory")?;
    let dir = work.path();
    let (cp, client, cp_pids) = start_control_plane(&args.run).await?;

    // 1. Nodes (one more for the second phase), their health responders, the Services.
    let all_nodes: Vec<PlainNode> = (0..=n_nodes).map(lb_node).collect();
    let _health = start_health_responders(&all_nodes).await?;
    let node_api: Api<Node> = Api::all(client.clone());
    progress(format_args!("creating {n_nodes} initialised nodes"));
    create_all(
        &node_api,
        all_nodes[..n_nodes]
            .iter()
            .map(PlainNode::initialised)
            .collect(),
        args.run.create_concurrency,
    )
    .await?;
    let svc_api: Api<Service> = Api::namespaced(client.clone(), "default");
    progress(format_args!("creating {n_services} LoadBalancer services"));
    create_all(
        &svc_api,
        (0..n_services).map(|i| service("default", i)).collect(),
        args.run.create_concurrency,
    )
    .await?;

    // 2. Shim with a pool big enough for every Service, then the controller-manager.
    let inventory_path = dir.join("inventory.yaml");
    std::fs::write(&inventory_path, plain_inventory(&all_nodes))
        .with_context(|| format!("writing {}", inventory_path.display()))?;
    let lb_config_path = dir.join("lb-config.yaml");
    std::fs::write(&lb_config_path, lb_config(POOL_CIDR))
        .with_context(|| format!("writing {}", lb_config_path.display()))?;
    let socket = dir.join("shim.sock");
    let shim = spawn_shim(
        &args.run,
        dir,
        &inventory_path,
        &socket,
        &[format!("--lb-config={}", lb_config_path.display())],
    )?;
    wait_for_socket(&socket, &shim).await?;

    let (serving, scraper) = ServingFiles::create(dir, &cp)?;

    progress(format_args!(
        "starting the controller-manager ({workers} service workers)"
    ));
    let shim_startup_cpu = procfs::cpu_seconds(&shim.pid().to_string(), ticks)?;
    let before = cp_pids.sample(ticks)?;
    let t0 = Instant::now();
    // Leader election on, as deployed: every mutating call carries the fence and the shim
    // checks it.
    let ccm = spawn_ccm(
        &args.run,
        &cp,
        &socket,
        &serving,
        &[
            "--cluster-name=bench".into(),
            "--controllers=service-lb-controller".into(),
            format!("--concurrent-service-syncs={workers}"),
        ],
        dir,
    )?;

    // Completion is read off the controller-manager's own request counter, then checked with
    // one LIST: a watch of the bench's own would be one more watcher of the burst it measures,
    // and this kube-apiserver's watch cache has been seen to stop feeding watchers in it (see
    // `start_control_plane`).
    let deadline = t0 + Duration::from_secs(args.run.timeout_secs);
    let mut first_status: Option<Instant> = None;
    let all = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let failure = if let Some(why) = exited(&ccm, &shim) {
            Some(why)
        } else if Instant::now() >= deadline {
            Some(format!(
                "timed out after {} s with {}/{n_services} services served; controller-manager log tail:\n{}\nshim log tail:\n{}",
                args.run.timeout_secs,
                served(&svc_api).await.unwrap_or(0),
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
        let now = Instant::now();
        let patches = patch_requests(&samples);
        if patches >= 2.0 && first_status.is_none() {
            first_status = Some(now);
        }
        // A finalizer PATCH and a status PATCH per Service.
        if patches >= 2.0 * n_services as f64 && served(&svc_api).await? >= n_services {
            break now;
        }
    };
    let all_served = all.duration_since(t0);
    let ccm_phase = cp_pids.sample(ticks)?.since(&before, all_served);
    progress(format_args!(
        "all {n_services} services have an address after {:.2} s",
        all_served.as_secs_f64()
    ));
    let samples = settled_metrics(&scraper).await?;
    let ccm_usage = procfs::usage(&ccm.pid().to_string(), ticks)?;
    let shim_usage = procfs::usage(&shim.pid().to_string(), ticks)?;

    // 3. One Node more: every load balancer gets it, with one UpdateLoadBalancer per Service.
    let updates_before = update_calls(&samples);
    progress(format_args!("adding one node"));
    let t1 = Instant::now();
    node_api
        .create(&PostParams::default(), &all_nodes[n_nodes].initialised())
        .await
        .context("creating the added node")?;
    let mut node_added = None;
    let node_deadline = t1 + Duration::from_secs(args.run.timeout_secs);
    while Instant::now() < node_deadline {
        let now = scraper.samples().await?;
        if update_calls(&now) - updates_before >= n_services as f64 {
            node_added = Some(t1.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Late or duplicate calls would show up within the settling time.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let node_added_updates = update_calls(&scraper.samples().await?) - updates_before;
    ccm.terminate(Duration::from_secs(5));
    shim.terminate(Duration::from_secs(5));
    keep_logs(args.run.keep_logs.as_deref(), dir, &cp);

    // 4. Baseline: the controller's writes per Service from a lean client, on fresh Services.
    let base_api: Api<Service> = Api::namespaced(client.clone(), "kube-public");
    progress(format_args!(
        "baseline: creating {n_services} more services (not timed)"
    ));
    let created = create_all(
        &base_api,
        (0..n_services).map(|i| service("kube-public", i)).collect(),
        args.run.create_concurrency,
    )
    .await?;
    progress(format_args!(
        "baseline: PATCH finalizer + PATCH status + 2 POST event per service, {workers} in flight"
    ));
    let before = cp_pids.sample(ticks)?;
    let baseline = serve_like_the_controller(&client, &created, workers).await?;
    let baseline_phase = cp_pids.sample(ticks)?.since(&before, baseline);

    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    Ok(LbReport {
        services: n_services,
        nodes: n_nodes,
        workers: args.workers,
        apiserver_version: cp.server_version().git_version.clone(),
        build_profile: profile,
        cores,
        first_service_seconds: first_status.unwrap_or(all).duration_since(t0).as_secs_f64(),
        all_services_seconds: all_served.as_secs_f64(),
        baseline_seconds: baseline.as_secs_f64(),
        ccm_cpu_seconds: ccm_usage.cpu_seconds,
        shim_cpu_seconds: shim_usage.cpu_seconds - shim_startup_cpu,
        ccm_peak_rss_mib: mib(ccm_usage.peak_rss_bytes),
        shim_peak_rss_mib: mib(shim_usage.peak_rss_bytes),
        api_requests_by_method: metrics::sum_by(&samples, "rest_client_requests_total", "method"),
        cpi_calls_by_method: metrics::sum_by(&samples, "cloudprovider_requests_total", "method"),
        service_watch: WatchSeen::of(&samples, "services"),
        node_added_seconds: node_added,
        node_added_updates,
        ccm_phase,
        baseline_phase,
    })
}

fn update_calls(samples: &[metrics::Sample]) -> f64 {
    metrics::sum_by(samples, "cloudprovider_requests_total", "method")
        .iter()
        .filter(|(method, _)| method.ends_with("UpdateLoadBalancer"))
        .map(|(_, count)| count)
        .sum()
}

/// How many Services of `api` have an ingress address (one LIST).
async fn served(api: &Api<Service>) -> anyhow::Result<usize> {
    let list = api
        .list(&Default::default())
        .await
        .context("listing services")?;
    Ok(list
        .items
        .iter()
        .filter(|svc| {
            svc.status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref())
                .is_some_and(|ingress| !ingress.is_empty())
        })
        .count())
}

fn patch_requests(samples: &[metrics::Sample]) -> f64 {
    metrics::sum_by(samples, "rest_client_requests_total", "method")
        .get("PATCH")
        .copied()
        .unwrap_or(0.0)
}

fn lb_event(svc: &Service, reason: &str, message: &str) -> Event {
    let now = Timestamp::now();
    let reference: ObjectReference = svc.object_ref(&());
    Event {
        metadata: ObjectMeta {
            name: Some(format!("{}.{:x}", svc.name_any(), now.as_nanosecond())),
            namespace: svc.namespace(),
            ..ObjectMeta::default()
        },
        involved_object: reference,
        reason: Some(reason.into()),
        message: Some(message.into()),
        type_: Some("Normal".into()),
        source: Some(EventSource {
            component: Some("service-controller".into()),
            host: None,
        }),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        count: Some(1),
        reporting_component: Some("service-controller".into()),
        reporting_instance: Some("bench".into()),
        ..Event::default()
    }
}

/// The "API server alone" baseline: per Service, with `workers` in flight, the writes the
/// service-lb controller issues: a merge `PATCH` adding the cleanup finalizer, a merge `PATCH`
/// of `services/status` with one ingress IP, and the `EnsuringLoadBalancer` and
/// `EnsuredLoadBalancer` Events.
async fn serve_like_the_controller(
    client: &kube::Client,
    services: &[Service],
    workers: usize,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    futures::stream::iter(services.iter().enumerate())
        .map(|(i, svc)| {
            let ns = svc.namespace().unwrap_or_default();
            let api: Api<Service> = Api::namespaced(client.clone(), &ns);
            let events: Api<Event> = Api::namespaced(client.clone(), &ns);
            async move {
                let name = svc.name_any();
                events
                    .create(
                        &PostParams::default(),
                        &lb_event(svc, "EnsuringLoadBalancer", "Ensuring load balancer"),
                    )
                    .await
                    .with_context(|| format!("POST event of service {name}"))?;
                let finalizer =
                    serde_json::json!({"metadata": {"finalizers": [CLEANUP_FINALIZER]}});
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&finalizer))
                    .await
                    .with_context(|| format!("PATCH service {name}"))?;
                let ip = format!("127.79.{}.{}", (i >> 8) & 255, i & 255);
                let status =
                    serde_json::json!({"status": {"loadBalancer": {"ingress": [{"ip": ip}]}}});
                api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                    .await
                    .with_context(|| format!("PATCH service {name} status"))?;
                events
                    .create(
                        &PostParams::default(),
                        &lb_event(svc, "EnsuredLoadBalancer", "Ensured load balancer"),
                    )
                    .await
                    .with_context(|| format!("POST event of service {name}"))?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(workers.max(1))
        .try_collect::<Vec<()>>()
        .await?;
    Ok(started.elapsed())
}

/// Renders the report as text.
pub fn render_text(r: &LbReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "lb: {} LoadBalancer services on {} nodes, {} service workers, local shim over a Unix socket, kube-apiserver {}, {} build, {} cores",
        r.services, r.nodes, r.workers, r.apiserver_version, r.build_profile, r.cores
    );
    let time_target = TARGET_SERVICES_SECONDS.max(1.1 * r.baseline_seconds);
    let _ = writeln!(
        out,
        "  every service has an address              {:6.2} s   target <= {time_target:.2} s  {}   (first after {:.2} s)",
        r.all_services_seconds,
        verdict(r.all_services_seconds <= time_target),
        r.first_service_seconds
    );
    write_baseline(&mut out, r.all_services_seconds, r.baseline_seconds);
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
        "API requests per service",
        &r.api_requests_by_method,
        r.services,
    );
    write_per(
        &mut out,
        "CPI calls per service",
        &r.cpi_calls_by_method,
        r.services,
    );
    // Each Service's finalizer and status PATCH comes back as one watch event.
    r.service_watch
        .write_line(&mut out, "Service", 2 * r.services);
    match r.node_added_seconds {
        Some(s) => {
            let _ = writeln!(
                out,
                "  one node added: every LB updated after {s:.2} s   target <= {TARGET_NODE_SECONDS} s   {}; UpdateLoadBalancer calls {:.0} for {} services {}",
                verdict(s <= TARGET_NODE_SECONDS),
                r.node_added_updates,
                r.services,
                verdict(r.node_added_updates == r.services as f64)
            );
        }
        None => {
            let _ = writeln!(
                out,
                "  one node added: NOT every LB updated within the timeout ({:.0} UpdateLoadBalancer calls for {} services) [MISSED]",
                r.node_added_updates, r.services
            );
        }
    }
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

/// The shim's `--lb-config`: one pool, `cidr`.
fn lb_config(cidr: &str) -> String {
    format!("pools:\n  - name: bench\n    addresses: [\"{cidr}\"]\n")
}
