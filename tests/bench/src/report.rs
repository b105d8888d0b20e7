//! The result of `bench node-init`, printed as text or JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

/// Target: every Node initialised within this many seconds.
pub const TARGET_INIT_SECONDS: f64 = 5.0;
/// Target: controller-manager plus shim CPU seconds.
pub const TARGET_CPU_SECONDS: f64 = 1.2;
/// Target: controller-manager peak RSS in MiB.
pub const TARGET_RSS_MIB: f64 = 32.0;

/// CPU seconds the control plane spent in one phase, and the phase's wall time.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PhaseCpu {
    /// Wall time of the phase.
    pub wall_seconds: f64,
    /// kube-apiserver CPU seconds.
    pub apiserver_cpu_seconds: f64,
    /// etcd CPU seconds.
    pub etcd_cpu_seconds: f64,
    /// The bench process's own CPU seconds (its client and watch).
    pub bench_cpu_seconds: f64,
}

impl PhaseCpu {
    /// `apiserver + etcd` CPU as a share of all cores over the phase.
    pub fn control_plane_share(&self, cores: usize) -> f64 {
        let capacity = self.wall_seconds * cores.max(1) as f64;
        if capacity > 0.0 {
            (self.apiserver_cpu_seconds + self.etcd_cpu_seconds) / capacity
        } else {
            0.0
        }
    }
}

/// Everything `bench node-init` measured.
#[derive(Debug, Clone, Serialize)]
pub struct NodeInitReport {
    /// Number of Nodes.
    pub nodes: usize,
    /// `--concurrent-node-syncs` and baseline concurrency.
    pub workers: u16,
    /// How the controller-manager reached the shim.
    pub shim_transport: String,
    /// kube-apiserver version.
    pub apiserver_version: String,
    /// Whether etcd's data directory is on tmpfs.
    pub etcd_on_tmpfs: bool,
    /// Cargo profile of the measured binaries (`release` expected).
    pub build_profile: String,
    /// CPU cores of the machine.
    pub cores: usize,

    /// Wall time of registering the tainted Nodes.
    pub create_seconds: f64,
    /// From the controller-manager's spawn to the first Node initialised.
    pub first_node_seconds: f64,
    /// Controller-manager CPU seconds when the first Node was initialised (start-up plus the
    /// initial list).
    pub ccm_cpu_at_first_node_seconds: Option<f64>,
    /// Controller-manager peak RSS in MiB when the first Node was initialised.
    pub ccm_peak_rss_at_first_node_mib: Option<f64>,
    /// From the controller-manager's spawn to every Node initialised.
    pub all_nodes_seconds: f64,
    /// Whether `all_nodes_seconds` met [`TARGET_INIT_SECONDS`].
    pub init_target_met: bool,
    /// Wall time of the same writes issued by a lean client ("API server alone").
    pub baseline_seconds: f64,
    /// `all_nodes_seconds / baseline_seconds`.
    pub ratio: f64,

    /// Controller-manager CPU seconds (user + system), start-up included.
    pub ccm_cpu_seconds: f64,
    /// Shim CPU seconds, start-up included.
    pub shim_cpu_seconds: f64,
    /// Shim CPU seconds before the controller-manager started (start-up, inventory load).
    pub shim_startup_cpu_seconds: f64,
    /// Whether their sum met [`TARGET_CPU_SECONDS`].
    pub cpu_target_met: bool,
    /// Controller-manager peak RSS (VmHWM) in MiB.
    pub ccm_peak_rss_mib: f64,
    /// Shim peak RSS (VmHWM) in MiB.
    pub shim_peak_rss_mib: f64,
    /// Whether `ccm_peak_rss_mib` met [`TARGET_RSS_MIB`].
    pub rss_target_met: bool,

    /// All API requests of the controller-manager (`rest_client_requests_total`); `None`
    /// when the binary does not export the metric.
    pub api_requests: Option<f64>,
    /// API requests by HTTP method.
    pub api_requests_by_method: BTreeMap<String, f64>,
    /// API requests by response code.
    pub api_requests_by_code: BTreeMap<String, f64>,
    /// Calls to the shim (`cloudprovider_requests_total`); `None` when not exported.
    pub cpi_calls: Option<f64>,
    /// Calls to the shim by method.
    pub cpi_calls_by_method: BTreeMap<String, f64>,
    /// What the controller-manager's Node watch delivered.
    pub node_watch: WatchSeen,

    /// Control-plane CPU while the Nodes were registered.
    pub create_phase: PhaseCpu,
    /// Control-plane CPU from the controller-manager's spawn to the last Node initialised.
    pub ccm_phase: PhaseCpu,
    /// Control-plane CPU during the baseline writes.
    pub baseline_phase: PhaseCpu,
}

/// What the controller-manager's watch of one resource delivered until the counts were read
/// (`ccm_watch_events_total`, `ccm_watch_errors_total`).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct WatchSeen {
    /// Objects listed, over every (re)list.
    pub listed: f64,
    /// (Re)lists started.
    pub lists: f64,
    /// Changes delivered while watching (applied and deleted objects).
    pub changes: f64,
    /// Failed watch or list requests.
    pub errors: f64,
}

impl WatchSeen {
    /// The counts of the watch of `resource` (e.g. `services`) in one scrape.
    pub fn of(samples: &[crate::metrics::Sample], resource: &str) -> Self {
        let mut seen = Self::default();
        let ours = samples
            .iter()
            .filter(|s| s.labels.get("resource").is_some_and(|r| r == resource));
        for sample in ours {
            let event = sample.labels.get("event").map(String::as_str);
            let count = match (sample.name.as_str(), event) {
                ("ccm_watch_events_total", Some("init_apply")) => &mut seen.listed,
                ("ccm_watch_events_total", Some("init")) => &mut seen.lists,
                ("ccm_watch_events_total", Some("apply" | "delete")) => &mut seen.changes,
                ("ccm_watch_errors_total", _) => &mut seen.errors,
                _ => continue,
            };
            *count += sample.value;
        }
        seen
    }

    /// Appends one line saying whether the watch of `what` (e.g. "Service") brought back the
    /// controller-manager's own `writes` to it: a run whose watch fell behind measured less
    /// work than a working watch causes.
    pub fn write_line(&self, out: &mut String, what: &str, writes: usize) {
        let _ = writeln!(
            out,
            "  controller-manager's {what} watch: {:.0} listed in {:.0} list(s), {:.0} changes seen for its {writes} writes, {:.0} errors {}",
            self.listed,
            self.lists,
            self.changes,
            self.errors,
            if self.changes >= writes as f64 {
                "(kept up)"
            } else {
                "(FELL BEHIND: this run measured less work than a working watch causes)"
            }
        );
    }
}

/// Appends the control plane's CPU per phase (as a share of `cores`) to a text report.
pub fn write_phases(out: &mut String, cores: usize, phases: &[(&str, &PhaseCpu)]) {
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "  control plane CPU (kube-apiserver + etcd, share of {cores} cores; bench client):"
    );
    for (label, phase) in phases {
        let _ = writeln!(
            out,
            "    {label:<17} {:6.2} s wall: apiserver {:5.2} s + etcd {:5.2} s = {:3.0}% busy; bench {:4.2} s",
            phase.wall_seconds,
            phase.apiserver_cpu_seconds,
            phase.etcd_cpu_seconds,
            phase.control_plane_share(cores) * 100.0,
            phase.bench_cpu_seconds
        );
    }
}

/// `[ok]` or `[MISSED]`.
pub fn verdict(ok: bool) -> &'static str {
    if ok { "[ok]" } else { "[MISSED]" }
}

/// The processes' usage in a text report.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// Controller-manager CPU seconds.
    pub ccm_cpu: f64,
    /// Shim CPU seconds.
    pub shim_cpu: f64,
    /// Target for both together.
    pub cpu_target: f64,
    /// Controller-manager peak RSS in MiB.
    pub ccm_rss: f64,
    /// Shim peak RSS in MiB.
    pub shim_rss: f64,
    /// Target for the controller-manager's.
    pub rss_target: f64,
}

/// Appends the CPU and peak-RSS lines, with their verdicts, to a text report.
pub fn write_usage(out: &mut String, u: Usage) {
    let cpu = u.ccm_cpu + u.shim_cpu;
    let _ = writeln!(
        out,
        "  CPU: controller-manager {:.2} s + shim {:.2} s = {cpu:.2} s   target <= {} s   {}",
        u.ccm_cpu,
        u.shim_cpu,
        u.cpu_target,
        verdict(cpu <= u.cpu_target)
    );
    let _ = writeln!(
        out,
        "  peak RSS: controller-manager {:.1} MiB (target <= {} MiB) {}, shim {:.1} MiB",
        u.ccm_rss,
        u.rss_target,
        verdict(u.ccm_rss <= u.rss_target),
        u.shim_rss
    );
}

/// Appends the "API server alone" line: its time for the same writes and the ratio of
/// `measured` to it.
pub fn write_baseline(out: &mut String, measured: f64, baseline: f64) {
    let _ = writeln!(
        out,
        "  API server alone, same writes             {baseline:6.2} s   ratio {:.2}",
        measured / baseline.max(f64::EPSILON)
    );
}

/// Latency quantiles of a set of samples, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Quantiles {
    /// Samples.
    pub samples: usize,
    /// Median.
    pub median_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Slowest.
    pub max_ms: f64,
}

impl Quantiles {
    /// The quantiles (nearest rank) of `samples`.
    pub fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        let ms = |q: f64| {
            crate::admission::percentile(&samples, q).map_or(0.0, |d| d.as_secs_f64() * 1e3)
        };
        Self {
            samples: samples.len(),
            median_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
            max_ms: ms(1.0),
        }
    }
}

/// Appends one latency line: `label`, the quantiles, the target on the median when there is
/// one, and the median's ratio to `floor_ms` when given.
pub fn write_quantiles(
    out: &mut String,
    label: &str,
    q: &Quantiles,
    target_ms: Option<f64>,
    floor_ms: Option<f64>,
) {
    let target = target_ms.map_or(String::new(), |t| {
        format!("   target median <= {t} ms {}", verdict(q.median_ms <= t))
    });
    let ratio = floor_ms.map_or(String::new(), |f| {
        format!(
            "   {:.1}x the spawn floor",
            q.median_ms / f.max(f64::EPSILON)
        )
    });
    let _ = writeln!(
        out,
        "  {label:<40} median {:6.2} ms  p90 {:6.2}  p99 {:6.2}  max {:6.2} ms ({} runs){target}{ratio}",
        q.median_ms, q.p90_ms, q.p99_ms, q.max_ms, q.samples
    );
}

/// Appends `label`: the total of `by_method` per `unit`, then each method's share.
pub fn write_per(out: &mut String, label: &str, by_method: &BTreeMap<String, f64>, units: usize) {
    let per = |total: f64| total / units.max(1) as f64;
    let list = by_method
        .iter()
        .map(|(k, v)| format!("{k} {:.2}", per(*v)))
        .collect::<Vec<_>>()
        .join(", ");
    let _ = writeln!(
        out,
        "  {label}: {:.2} ({list})",
        per(by_method.values().sum())
    );
}

fn per_node(total: f64, nodes: usize) -> f64 {
    total / nodes.max(1) as f64
}

impl NodeInitReport {
    /// API requests per Node.
    pub fn api_requests_per_node(&self) -> Option<f64> {
        self.api_requests.map(|total| per_node(total, self.nodes))
    }

    /// The human-readable report.
    pub fn render_text(&self) -> String {
        let n = self.nodes;
        let mut out = String::new();
        let tmpfs = if self.etcd_on_tmpfs {
            " (etcd on tmpfs)"
        } else {
            ""
        };
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "node-init: {n} nodes, {} workers, local shim over a {}, kube-apiserver {}{tmpfs}, {} build, {} cores",
            self.workers,
            self.shim_transport,
            self.apiserver_version,
            self.build_profile,
            self.cores
        );
        let create = format!("create {n} tainted nodes");
        let _ = writeln!(out, "  {create:<40}  {:6.2} s", self.create_seconds);
        let _ = writeln!(
            out,
            "  initialise all nodes (CCM)                {:6.2} s   target <= {TARGET_INIT_SECONDS} s      {}   (first node after {:.2} s, {:.0} nodes/s)",
            self.all_nodes_seconds,
            verdict(self.init_target_met),
            self.first_node_seconds,
            per_node(n as f64, 1) / self.all_nodes_seconds.max(f64::EPSILON),
        );
        let _ = writeln!(
            out,
            "  API server alone, same writes             {:6.2} s   ratio {:.1}",
            self.baseline_seconds, self.ratio
        );
        let cpu = self.ccm_cpu_seconds + self.shim_cpu_seconds;
        let _ = writeln!(
            out,
            "  CPU: controller-manager {:.2} s + shim {:.2} s = {:.2} s   target <= {TARGET_CPU_SECONDS} s   {}",
            self.ccm_cpu_seconds,
            self.shim_cpu_seconds,
            cpu,
            verdict(self.cpu_target_met)
        );
        if let (Some(cpu), Some(rss)) = (
            self.ccm_cpu_at_first_node_seconds,
            self.ccm_peak_rss_at_first_node_mib,
        ) {
            let _ = writeln!(
                out,
                "    start-up: controller-manager {cpu:.2} s CPU and {rss:.1} MiB peak RSS when the first node was done; shim {:.2} s CPU before the controller-manager started",
                self.shim_startup_cpu_seconds
            );
        }
        let _ = writeln!(
            out,
            "  peak RSS: controller-manager {:.1} MiB (target <= {TARGET_RSS_MIB} MiB) {}, shim {:.1} MiB",
            self.ccm_peak_rss_mib,
            verdict(self.rss_target_met),
            self.shim_peak_rss_mib
        );
        let methods: Vec<String> = self
            .api_requests_by_method
            .iter()
            .map(|(m, c)| format!("{m} {:.2}", per_node(*c, n)))
            .collect();
        match (self.api_requests_per_node(), self.api_requests) {
            (Some(per), Some(total)) => {
                let _ = writeln!(
                    out,
                    "  API requests per node: {per:.2} ({})   total {total:.0}",
                    methods.join(", ")
                );
            }
            _ => {
                let _ = writeln!(
                    out,
                    "  API requests per node: n/a (no rest_client_requests_total in /metrics)"
                );
            }
        }
        let codes: Vec<String> = self
            .api_requests_by_code
            .iter()
            .map(|(c, v)| format!("{c}: {v:.0}"))
            .collect();
        let _ = writeln!(out, "  API responses: {}", codes.join(", "));
        let cpi: Vec<String> = self
            .cpi_calls_by_method
            .iter()
            .map(|(m, c)| format!("{m} {:.2}", per_node(*c, n)))
            .collect();
        match self.cpi_calls {
            Some(total) => {
                let _ = writeln!(
                    out,
                    "  CPI calls per node: {:.2} ({})",
                    per_node(total, n),
                    cpi.join(", ")
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "  CPI calls per node: n/a (no cloudprovider_requests_total in /metrics)"
                );
            }
        }
        // Each Node's PUT (taint, provider ID, labels) and status PATCH comes back as a change.
        self.node_watch.write_line(&mut out, "Node", 2 * n);
        write_phases(
            &mut out,
            self.cores,
            &[
                ("create", &self.create_phase),
                ("CCM run", &self.ccm_phase),
                ("API server alone", &self.baseline_phase),
            ],
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_counts_are_read_for_one_resource() {
        let samples = crate::metrics::parse(
            r#"ccm_watch_events_total{resource="services",event="init"} 1
ccm_watch_events_total{resource="services",event="init_apply"} 1001
ccm_watch_events_total{resource="services",event="init_done"} 1
ccm_watch_events_total{resource="services",event="apply"} 1990
ccm_watch_events_total{resource="services",event="delete"} 10
ccm_watch_events_total{resource="nodes",event="apply"} 7
ccm_watch_errors_total{resource="services"} 2
"#,
        );
        let seen = WatchSeen::of(&samples, "services");
        assert_eq!(
            (seen.listed, seen.lists, seen.changes, seen.errors),
            (1001.0, 1.0, 2000.0, 2.0)
        );
        let mut line = String::new();
        seen.write_line(&mut line, "Service", 2000);
        assert!(
            line.contains("2000 changes seen for its 2000 writes, 2 errors (kept up)"),
            "{line}"
        );
        assert_eq!(WatchSeen::of(&samples, "nodes").changes, 7.0);
    }

    #[test]
    fn text_report_names_targets_and_verdicts() {
        let report = NodeInitReport {
            nodes: 200,
            workers: 50,
            shim_transport: "Unix socket".into(),
            apiserver_version: "v1.20.2".into(),
            etcd_on_tmpfs: true,
            build_profile: "release".into(),
            cores: 2,
            create_seconds: 0.5,
            first_node_seconds: 0.1,
            ccm_cpu_at_first_node_seconds: Some(0.05),
            ccm_peak_rss_at_first_node_mib: Some(20.0),
            all_nodes_seconds: 0.8,
            init_target_met: true,
            baseline_seconds: 0.4,
            ratio: 2.0,
            ccm_cpu_seconds: 0.2,
            shim_cpu_seconds: 0.05,
            shim_startup_cpu_seconds: 0.01,
            cpu_target_met: true,
            ccm_peak_rss_mib: 40.0,
            shim_peak_rss_mib: 10.0,
            rss_target_met: false,
            api_requests: Some(602.0),
            api_requests_by_method: [("PUT".to_string(), 200.0), ("GET".to_string(), 2.0)]
                .into_iter()
                .collect(),
            api_requests_by_code: BTreeMap::new(),
            cpi_calls: Some(200.0),
            cpi_calls_by_method: BTreeMap::new(),
            node_watch: WatchSeen {
                listed: 200.0,
                lists: 1.0,
                changes: 399.0,
                errors: 0.0,
            },
            create_phase: PhaseCpu::default(),
            ccm_phase: PhaseCpu::default(),
            baseline_phase: PhaseCpu::default(),
        };
        let text = report.render_text();
        assert!(text.contains("initialise all nodes (CCM)"), "{text}");
        assert!(text.contains("ratio 2.0"), "{text}");
        assert!(
            text.contains("40.0 MiB (target <= 32 MiB) [MISSED]"),
            "{text}"
        );
        assert!(text.contains("API requests per node: 3.01"), "{text}");
        assert!(text.contains("PUT 1.00"), "{text}");
        assert!(
            text.contains("399 changes seen for its 400 writes, 0 errors (FELL BEHIND"),
            "{text}"
        );
    }
}
