//! The `node-init` run: control plane, tainted Nodes, shim, controller-manager, measurements,
//! then the "API server alone" baseline.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use cloud_controller_manager::well_known::TAINT_UNINITIALIZED;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use test_control_plane::{ControlPlane, Options};
use test_support::{Location, Process, Wait, last_lines, temp_dir};

use crate::metrics::{self, Scraper};
use crate::nodes::{self, SET_LABEL};
use crate::procfs;
use crate::report::{self, NodeInitReport, PhaseCpu};
use crate::{NodeInitArgs, RunArgs};

pub(crate) const CCM_BINARY: &str = "cloud-controller-manager";
pub(crate) const SHIM_BINARY: &str = "local-shim";
pub(crate) const BUILD_HINT: &str =
    "cargo build --release -p cloud-controller-manager -p local-shim -p bench";

/// What every run reports about where it ran.
pub(crate) struct Machine {
    /// Cargo profile of the measured binaries.
    pub(crate) profile: String,
    /// Clock ticks per second (CPU times in `/proc`).
    pub(crate) ticks: f64,
    /// CPU cores.
    pub(crate) cores: usize,
}

impl Machine {
    /// Checks the binaries are built (warning when they are not release builds) and reads the
    /// machine's facts.
    pub(crate) fn check() -> anyhow::Result<Self> {
        let profile = check_binaries()?;
        if profile != "release" {
            eprintln!(
                "bench: warning: measuring {profile} binaries; targets apply to release builds ({BUILD_HINT})"
            );
        }
        Ok(Self {
            profile,
            ticks: procfs::clock_ticks_per_second()?,
            cores: std::thread::available_parallelism().map_or(1, usize::from),
        })
    }
}

/// Runs `bench node-init`.
pub async fn node_init(args: &NodeInitArgs) -> anyhow::Result<NodeInitReport> {
    anyhow::ensure!(args.nodes > 0, "--nodes must be positive");
    anyhow::ensure!(args.workers > 0, "--workers must be positive");
    let Machine {
        profile,
        ticks,
        cores,
    } = Machine::check()?;
    let n = args.nodes;
    let workers = usize::from(args.workers);

    let work = temp_dir("ccm-bench-", Location::System).context("creating a work directory")?;
    let dir = work.path();

    let (cp, client, cp_pids) = start_control_plane(&args.run).await?;

    // 1. Inventory and tainted Nodes.
    let machines: Vec<nodes::Machine> = (0..n)
        .map(|i| nodes::Machine::new("bench-node", i))
        .collect();
    let inventory = dir.join("inventory.yaml");
    std::fs::write(&inventory, nodes::inventory_yaml(&machines))
        .with_context(|| format!("writing {}", inventory.display()))?;
    progress(format_args!(
        "creating {n} tainted nodes ({} in flight)",
        args.run.create_concurrency
    ));
    let before = cp_pids.sample(ticks)?;
    let (_, create_time) =
        nodes::create_tainted(&client, &machines, "ccm", args.run.create_concurrency).await?;
    let create_phase = cp_pids.sample(ticks)?.since(&before, create_time);

    // 2. Shim, then controller-manager.
    let socket = dir.join("shim.sock");
    let shim = Process::for_workspace_binary(SHIM_BINARY, "local-shim", dir)?
        .args([
            format!("--inventory={}", inventory.display()),
            format!("--state-dir={}", dir.join("shim-state").display()),
            format!("--unix-socket={}", socket.display()),
            "--metrics-bind-address=127.0.0.1:0".into(),
        ])
        .envs([("RUST_LOG", args.run.log_level.as_str()), ("NO_COLOR", "1")])
        .spawn()?;
    wait_for_socket(&socket, &shim).await?;

    let (serving, scraper) = ServingFiles::create(dir, &cp)?;

    let initialised = Arc::new(AtomicUsize::new(0));
    let ccm_pid = Arc::new(AtomicU32::new(0));
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let mut watch = tokio::spawn(watch_until_initialised(
        Api::all(client.clone()),
        n,
        initialised.clone(),
        ready_tx,
        ccm_pid.clone(),
        ticks,
    ));
    tokio::time::timeout(Duration::from_secs(30), ready_rx)
        .await
        .context("the bench's node watch did not list the nodes within 30 s")?
        .context("the bench's node watch stopped before listing the nodes")?;

    progress(format_args!(
        "starting the controller-manager ({workers} node workers)"
    ));
    let shim_startup_cpu = procfs::cpu_seconds(&shim.pid().to_string(), ticks)?;
    let before = cp_pids.sample(ticks)?;
    let t0 = Instant::now();
    let ccm = spawn_ccm(
        &args.run,
        &cp,
        &socket,
        &serving,
        &[
            "--leader-elect=false".into(),
            "--controllers=cloud-node".into(),
            format!("--concurrent-node-syncs={workers}"),
        ],
        dir,
    )?;
    ccm_pid.store(ccm.pid(), Ordering::Relaxed);

    // 3. Wait until every Node is initialised.
    let deadline = t0 + Duration::from_secs(args.run.timeout_secs);
    let watched = loop {
        tokio::select! {
            joined = &mut watch => {
                break joined.context("the node watch panicked")??;
            }
            () = tokio::time::sleep(Duration::from_millis(200)) => {
                if let Some(why) = exited(&ccm, &shim) {
                    keep_logs(args.run.keep_logs.as_deref(), dir, &cp);
                    anyhow::bail!(
                        "after {:.1} s with {}/{n} nodes initialised, {why}",
                        t0.elapsed().as_secs_f64(),
                        initialised.load(Ordering::Relaxed),
                    );
                }
                if Instant::now() >= deadline {
                    watch.abort();
                    keep_logs(args.run.keep_logs.as_deref(), dir, &cp);
                    anyhow::bail!(
                        "timed out after {} s with {}/{n} nodes initialised; controller-manager log tail:\n{}",
                        args.run.timeout_secs,
                        initialised.load(Ordering::Relaxed),
                        last_lines(&ccm.logs(), 40)
                    );
                }
            }
        }
    };
    let all_nodes = watched.all.duration_since(t0);
    let ccm_phase = cp_pids.sample(ticks)?.since(&before, all_nodes);
    progress(format_args!(
        "all {n} nodes initialised after {:.2} s",
        all_nodes.as_secs_f64()
    ));

    // Let the last Events be posted, then measure before stopping anything.
    let samples = settled_metrics(&scraper).await?;
    let ccm_usage = procfs::usage(&ccm.pid().to_string(), ticks)?;
    let shim_usage = procfs::usage(&shim.pid().to_string(), ticks)?;
    ccm.terminate(Duration::from_secs(5));
    shim.terminate(Duration::from_secs(5));
    keep_logs(args.run.keep_logs.as_deref(), dir, &cp);

    // 4. The same writes from a lean client, on a fresh set of Nodes.
    let base_machines: Vec<nodes::Machine> = (0..n)
        .map(|i| nodes::Machine::new("bench-base", i))
        .collect();
    progress(format_args!(
        "baseline: creating {n} more tainted nodes (not timed)"
    ));
    let (created, _) = nodes::create_tainted(
        &client,
        &base_machines,
        "baseline",
        args.run.create_concurrency,
    )
    .await?;
    progress(format_args!(
        "baseline: PUT + PATCH status + POST event per node, {workers} in flight"
    ));
    let before = cp_pids.sample(ticks)?;
    let baseline =
        nodes::initialise_like_the_controller(&client, &base_machines, &created, workers).await?;
    let baseline_phase = cp_pids.sample(ticks)?.since(&before, baseline);

    // 5. The report.
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    let requests = "rest_client_requests_total";
    let cpi = "cloudprovider_requests_total";
    let cpu_total = ccm_usage.cpu_seconds + shim_usage.cpu_seconds;
    Ok(NodeInitReport {
        nodes: n,
        workers: args.workers,
        shim_transport: "Unix socket".into(),
        apiserver_version: cp.server_version().git_version.clone(),
        etcd_on_tmpfs: cp.state_dir().starts_with("/dev/shm"),
        build_profile: profile,
        cores,
        create_seconds: create_time.as_secs_f64(),
        first_node_seconds: watched.first.duration_since(t0).as_secs_f64(),
        ccm_cpu_at_first_node_seconds: watched.ccm_at_first.map(|u| u.cpu_seconds),
        ccm_peak_rss_at_first_node_mib: watched.ccm_at_first.map(|u| mib(u.peak_rss_bytes)),
        all_nodes_seconds: all_nodes.as_secs_f64(),
        init_target_met: all_nodes.as_secs_f64() <= report::TARGET_INIT_SECONDS,
        baseline_seconds: baseline.as_secs_f64(),
        ratio: all_nodes.as_secs_f64() / baseline.as_secs_f64().max(f64::EPSILON),
        ccm_cpu_seconds: ccm_usage.cpu_seconds,
        shim_cpu_seconds: shim_usage.cpu_seconds,
        shim_startup_cpu_seconds: shim_startup_cpu,
        cpu_target_met: cpu_total <= report::TARGET_CPU_SECONDS,
        ccm_peak_rss_mib: mib(ccm_usage.peak_rss_bytes),
        shim_peak_rss_mib: mib(shim_usage.peak_rss_bytes),
        rss_target_met: mib(ccm_usage.peak_rss_bytes) <= report::TARGET_RSS_MIB,
        api_requests: metrics::total(&samples, requests),
        api_requests_by_method: metrics::sum_by(&samples, requests, "method"),
        api_requests_by_code: metrics::sum_by(&samples, requests, "code"),
        cpi_calls: metrics::total(&samples, cpi),
        cpi_calls_by_method: metrics::sum_by(&samples, cpi, "method"),
        node_watch: report::WatchSeen::of(&samples, "nodes"),
        create_phase,
        ccm_phase,
        baseline_phase,
    })
}

/// The controller-manager's secure port and its serving certificate.
pub(crate) struct ServingFiles {
    /// `--secure-port`.
    port: u16,
    /// `--tls-cert-file`.
    cert: PathBuf,
    /// `--tls-private-key-file`.
    key: PathBuf,
}

impl ServingFiles {
    /// A serving certificate from a fresh CA in `dir` and a free port, and a scraper of the
    /// metrics the controller-manager will serve there (as `cp`'s admin).
    pub(crate) fn create(dir: &Path, cp: &ControlPlane) -> anyhow::Result<(Self, Scraper)> {
        let ca = test_pki::Ca::new("bench-ca")?;
        let serving = ca.issue(&["127.0.0.1"])?;
        let cert = dir.join("ccm-serving.pem");
        let key = dir.join("ccm-serving-key.pem");
        test_pki::write_atomic(&cert, serving.chain_pem.as_bytes(), false)?;
        test_pki::write_atomic(&key, serving.key_pem.as_bytes(), true)?;
        let port = test_support::free_port().context("finding a free loopback port")?;
        let scraper = Scraper::new(ca.cert_der(), port, cp.admin_token()?)?;
        Ok((Self { port, cert, key }, scraper))
    }
}

/// Spawns the controller-manager against `cp` and the shim at `socket`, with the run's client
/// limits and log level, serving metrics on `serving`, then `extra` flags; logs go to `dir`.
pub(crate) fn spawn_ccm(
    run: &RunArgs,
    cp: &ControlPlane,
    socket: &Path,
    serving: &ServingFiles,
    extra: &[String],
    dir: &Path,
) -> anyhow::Result<Process> {
    let mut args = vec![
        format!("--kubeconfig={}", cp.kubeconfig_path().display()),
        format!("--provider-endpoint=unix://{}", socket.display()),
        "--cloud-provider=local".into(),
        format!("--kube-api-qps={}", run.kube_api_qps),
        format!("--kube-api-burst={}", run.kube_api_burst),
        format!("--secure-port={}", serving.port),
        "--bind-address=127.0.0.1".into(),
        format!("--tls-cert-file={}", serving.cert.display()),
        format!("--tls-private-key-file={}", serving.key.display()),
    ];
    args.extend_from_slice(extra);
    Ok(
        Process::for_workspace_binary(CCM_BINARY, "cloud-controller-manager", dir)?
            .args(args)
            .envs([("RUST_LOG", run.log_level.as_str()), ("NO_COLOR", "1")])
            .spawn()?,
    )
}

/// Spawns the `local` shim serving `inventory` on the Unix socket `socket`, its state in
/// `dir/shim-state`, then `extra` flags; logs go to `dir`.
pub(crate) fn spawn_shim(
    run: &RunArgs,
    dir: &Path,
    inventory: &Path,
    socket: &Path,
    extra: &[String],
) -> anyhow::Result<Process> {
    let mut args = vec![
        format!("--inventory={}", inventory.display()),
        format!("--state-dir={}", dir.join("shim-state").display()),
        format!("--unix-socket={}", socket.display()),
        "--metrics-bind-address=127.0.0.1:0".into(),
    ];
    args.extend_from_slice(extra);
    Ok(
        Process::for_workspace_binary(SHIM_BINARY, "local-shim", dir)?
            .args(args)
            .envs([("RUST_LOG", run.log_level.as_str()), ("NO_COLOR", "1")])
            .spawn()?,
    )
}

/// Why a run cannot go on, if the controller-manager or the shim has exited (with its log
/// tail).
pub(crate) fn exited(ccm: &Process, shim: &Process) -> Option<String> {
    if let Some(status) = ccm.exit_status() {
        return Some(format!(
            "the controller-manager exited ({status}); log tail:\n{}",
            last_lines(&ccm.logs(), 40)
        ));
    }
    shim.exit_status().map(|status| {
        format!(
            "the shim exited ({status}); log tail:\n{}",
            last_lines(&shim.logs(), 40)
        )
    })
}

/// Creates `objects` with `concurrency` requests in flight; returns them as created.
pub(crate) async fn create_all<K>(
    api: &Api<K>,
    objects: Vec<K>,
    concurrency: usize,
) -> anyhow::Result<Vec<K>>
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    futures::stream::iter(objects)
        .map(|object| {
            let api = api.clone();
            async move {
                let name = object.meta().name.clone().unwrap_or_default();
                api.create(&kube::api::PostParams::default(), &object)
                    .await
                    .with_context(|| format!("creating {name}"))
            }
        })
        .buffered(concurrency.max(1))
        .try_collect()
        .await
}

/// Starts etcd and kube-apiserver with room for the bench's bursts of requests; returns them,
/// an admin client and their PIDs.
pub(crate) async fn start_control_plane(
    args: &RunArgs,
) -> anyhow::Result<(ControlPlane, kube::Client, ControlPlanePids)> {
    progress(format_args!("starting etcd + kube-apiserver"));
    // With its watch cache, this kube-apiserver (v1.20.2 on etcd 3.4.23) stops sending Service
    // events in the middle of `bench lb`'s burst, to every watcher or to the manager's alone,
    // and never resumes: the manager's cache then misses most of its own writes and the run
    // measures less work than a working watch causes. Served from etcd, every watch receives
    // every event (see tests/bench/README.md).
    let watch_cache = format!("--watch-cache={}", args.apiserver_watch_cache);
    let cp = ControlPlane::start_with(Options {
        extra_apiserver_args: vec![
            "--max-requests-inflight=2000".into(),
            "--max-mutating-requests-inflight=1000".into(),
            watch_cache,
        ],
        ..Options::default()
    })
    .await
    .context("starting the test control plane")?;
    let client = cp.client()?;
    let pids = ControlPlanePids {
        apiserver: cp.apiserver_pid().to_string(),
        etcd: cp.etcd_pid().to_string(),
    };
    Ok((cp, client, pids))
}

pub(crate) fn progress(message: std::fmt::Arguments<'_>) {
    eprintln!("bench: {message}");
}

/// Checks that the measured binaries exist next to this one; returns the Cargo profile.
pub(crate) fn check_binaries() -> anyhow::Result<String> {
    for name in [CCM_BINARY, SHIM_BINARY] {
        match test_support::workspace_binary(name) {
            Ok(_) => {}
            Err(test_support::Error::MissingBinary { .. }) => {
                let here = std::env::current_exe()
                    .ok()
                    .and_then(|exe| exe.parent().map(|d| d.display().to_string()))
                    .unwrap_or_default();
                anyhow::bail!(
                    "{name} is not built next to this bench executable (in {here}); build it with `{BUILD_HINT}`"
                )
            }
            Err(e) => return Err(e.into()),
        }
    }
    build_profile()
}

/// The Cargo profile this bench (and the binaries next to it) was built with.
pub(crate) fn build_profile() -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("locating the bench executable")?;
    let mut dir = exe.parent();
    if dir.and_then(Path::file_name).is_some_and(|d| d == "deps") {
        dir = dir.and_then(Path::parent);
    }
    Ok(dir
        .and_then(Path::file_name)
        .map(|d| d.to_string_lossy().into_owned())
        .unwrap_or_else(|| "unknown".into()))
}

/// Waits until the shim accepts connections on its Unix socket.
pub(crate) async fn wait_for_socket(socket: &Path, shim: &Process) -> anyhow::Result<()> {
    let listening = Wait::new("the shim to listen", Duration::from_secs(30))
        .every(Duration::from_millis(10))
        .until(|| async {
            match tokio::net::UnixStream::connect(socket).await {
                Ok(_) => Ok(Ok(())),
                Err(e) => match shim.exit_status() {
                    Some(status) => Ok(Err(status)),
                    None => Err(format!("connecting to {}: {e}", socket.display())),
                },
            }
        })
        .await;
    match listening {
        Ok(Ok(())) => Ok(()),
        Ok(Err(status)) => anyhow::bail!(
            "the shim exited ({status}) before serving; log tail:\n{}",
            last_lines(&shim.logs(), 40)
        ),
        Err(_) => anyhow::bail!(
            "the shim did not listen on {} within 30 s; log tail:\n{}",
            socket.display(),
            last_lines(&shim.logs(), 40)
        ),
    }
}

/// What the node watch saw.
struct Watched {
    /// When the first Node was seen initialised.
    first: Instant,
    /// When the last one was.
    all: Instant,
    /// The controller-manager's usage when the first Node was seen initialised.
    ccm_at_first: Option<procfs::Usage>,
}

/// Watches the `ccm` set of Nodes until `total` are initialised; signals `ready` once the
/// initial list is done and keeps `count` up to date. When the first Node is initialised it
/// also reads the usage of the process `ccm_pid` (start-up plus initial list).
async fn watch_until_initialised(
    api: Api<Node>,
    total: usize,
    count: Arc<AtomicUsize>,
    ready: tokio::sync::oneshot::Sender<()>,
    ccm_pid: Arc<AtomicU32>,
    ticks: f64,
) -> anyhow::Result<Watched> {
    let config = watcher::Config::default().labels(&format!("{SET_LABEL}=ccm"));
    let mut stream = watcher(api, config).default_backoff().boxed();
    let mut ready = Some(ready);
    let mut done: HashSet<String> = HashSet::with_capacity(total);
    let mut first: Option<Instant> = None;
    let mut ccm_at_first = None;
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                eprintln!("bench: node watch error (retrying): {e}");
                continue;
            }
        };
        match event {
            watcher::Event::Apply(node) | watcher::Event::InitApply(node) => {
                if test_support::initialised(&node, TAINT_UNINITIALIZED).is_ok() {
                    if done.insert(node.name_any()) && first.is_none() {
                        first = Some(Instant::now());
                        let pid = ccm_pid.load(Ordering::Relaxed);
                        ccm_at_first = procfs::usage(&pid.to_string(), ticks).ok();
                    }
                } else {
                    done.remove(&node.name_any());
                }
            }
            watcher::Event::Delete(node) => {
                done.remove(&node.name_any());
            }
            watcher::Event::InitDone => {
                if let Some(tx) = ready.take() {
                    let _ = tx.send(());
                }
            }
            watcher::Event::Init => {}
        }
        count.store(done.len(), Ordering::Relaxed);
        if ready.is_none() && done.len() >= total {
            let now = Instant::now();
            return Ok(Watched {
                first: first.unwrap_or(now),
                all: now,
                ccm_at_first,
            });
        }
    }
    anyhow::bail!("the node watch ended")
}

/// Scrapes the controller-manager's metrics until its API request count stops changing (the
/// last Events are posted after the Nodes are initialised), for at most 5 s.
pub(crate) async fn settled_metrics(scraper: &Scraper) -> anyhow::Result<Vec<metrics::Sample>> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = scraper.samples().await?;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = scraper.samples().await?;
        let name = "rest_client_requests_total";
        if metrics::sum(&now, name) == metrics::sum(&last, name) || Instant::now() >= deadline {
            return Ok(now);
        }
        last = now;
    }
}

/// PIDs of kube-apiserver and etcd.
pub(crate) struct ControlPlanePids {
    pub(crate) apiserver: String,
    pub(crate) etcd: String,
}

/// CPU seconds of the control plane and of this process at one moment.
pub(crate) struct CpuSample {
    apiserver: f64,
    etcd: f64,
    bench: f64,
}

impl ControlPlanePids {
    pub(crate) fn sample(&self, ticks: f64) -> anyhow::Result<CpuSample> {
        Ok(CpuSample {
            apiserver: procfs::cpu_seconds(&self.apiserver, ticks)?,
            etcd: procfs::cpu_seconds(&self.etcd, ticks)?,
            bench: procfs::cpu_seconds("self", ticks)?,
        })
    }
}

impl CpuSample {
    pub(crate) fn since(&self, before: &CpuSample, wall: Duration) -> PhaseCpu {
        PhaseCpu {
            wall_seconds: wall.as_secs_f64(),
            apiserver_cpu_seconds: round_ms(self.apiserver - before.apiserver),
            etcd_cpu_seconds: round_ms(self.etcd - before.etcd),
            bench_cpu_seconds: round_ms(self.bench - before.bench),
        }
    }
}

/// `seconds` rounded to milliseconds (CPU times are whole clock ticks; this drops the float
/// noise of their differences).
fn round_ms(seconds: f64) -> f64 {
    (seconds * 1000.0).round() / 1000.0
}

/// Copies the process logs and the kube-apiserver log to `--keep-logs`, if given.
pub(crate) fn keep_logs(keep: Option<&Path>, dir: &Path, cp: &ControlPlane) {
    let Some(target) = keep else {
        return;
    };
    if let Err(e) = std::fs::create_dir_all(target) {
        eprintln!("bench: --keep-logs {}: {e}", target.display());
        return;
    }
    let files: [(PathBuf, &str); 3] = [
        (
            dir.join("cloud-controller-manager.log"),
            "cloud-controller-manager.log",
        ),
        (dir.join("local-shim.log"), "local-shim.log"),
        (cp.apiserver_log().to_path_buf(), "kube-apiserver.log"),
    ];
    for (from, name) in files {
        if let Err(e) = std::fs::copy(&from, target.join(name)) {
            eprintln!("bench: copying {}: {e}", from.display());
        }
    }
}
