//! Active health checks, shared: one task per node address, probing each (node, port) target
//! once per interval however many load balancers use it, and only while one does. A target
//! registered since the last round is probed at once (only it: a burst of registrations does
//! not re-probe the others).
//!
//! Targets: `/healthz` on a Service's `healthCheckNodePort` (`externalTrafficPolicy: Local`),
//! kube-proxy's `/healthz` (`Cluster`: one per node), and a TCP connect to a node port,
//! registered by the proxy only once the node's kube-proxy port refuses connections and probed
//! only while it does (the fallback for `Cluster`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::balance::{Health, HealthState, Thresholds};
use prometheus_client::metrics::gauge::Gauge;

use super::metrics::{KindLabel, LbMetrics, TargetLabel};

/// Probe timing and thresholds.
#[derive(Debug, Clone, Copy)]
pub struct HealthConfig {
    /// Time between probes of a target.
    pub interval: Duration,
    /// Time a probe may take.
    pub timeout: Duration,
    /// Failures down, successes up.
    pub thresholds: Thresholds,
}

/// What is probed on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// HTTP `/healthz` on this port (the Service's health-check node port); 200 is healthy.
    Healthz(u16),
    /// kube-proxy's HTTP `/healthz` on this port.
    KubeProxy(u16),
    /// TCP connect to this node port, while kube-proxy refuses.
    NodePort(u16),
}

impl Target {
    fn label(self) -> String {
        match self {
            Self::Healthz(p) => format!("healthz:{p}"),
            Self::KubeProxy(p) => format!("kube-proxy:{p}"),
            Self::NodePort(p) => format!("node-port:{p}"),
        }
    }
}

/// A target's current verdict, read lock-free by the proxy.
#[derive(Debug, Default)]
pub struct Cell {
    health: AtomicU8,
    refused: AtomicBool,
}

impl Cell {
    /// The verdict.
    pub fn health(&self) -> Health {
        match self.health.load(Ordering::Relaxed) {
            1 => Health::Up,
            2 => Health::Down,
            _ => Health::Unknown,
        }
    }

    /// Whether the last probe's connection was refused (nothing listens).
    pub fn refused(&self) -> bool {
        self.refused.load(Ordering::Relaxed)
    }

    fn set(&self, health: Health, refused: bool) {
        let v = match health {
            Health::Unknown => 0,
            Health::Up => 1,
            Health::Down => 2,
        };
        self.health.store(v, Ordering::Relaxed);
        self.refused.store(refused, Ordering::Relaxed);
    }
}

struct Slot {
    refs: usize,
    cell: Arc<Cell>,
    state: HealthState,
    /// Probed at least once (a fresh slot is probed before the next full round).
    probed: bool,
    /// Its `local_shim_lb_backend_health` series, resolved once.
    gauge: Gauge,
}

struct NodeShared {
    ip: IpAddr,
    targets: Mutex<HashMap<Target, Slot>>,
    wake: Notify,
}

impl NodeShared {
    fn targets(&self) -> MutexGuard<'_, HashMap<Target, Slot>> {
        // Only plain map updates happen under this lock; a panic cannot leave it half-done.
        self.targets.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct NodeEntry {
    shared: Arc<NodeShared>,
    task: tokio::task::AbortHandle,
}

struct Registry {
    config: HealthConfig,
    metrics: LbMetrics,
    nodes: Mutex<HashMap<IpAddr, NodeEntry>>,
}

impl Registry {
    fn nodes(&self) -> MutexGuard<'_, HashMap<IpAddr, NodeEntry>> {
        // Only plain map updates happen under this lock.
        self.nodes.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The shared health checks.
#[derive(Clone)]
pub struct HealthChecks {
    inner: Arc<Registry>,
}

/// A use of one target; the target is probed while any lease on it lives.
pub struct Lease {
    registry: Arc<Registry>,
    ip: IpAddr,
    target: Target,
    cell: Arc<Cell>,
}

impl Lease {
    /// The target's verdict.
    pub fn cell(&self) -> &Cell {
        &self.cell
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lease({} {:?})", self.ip, self.target)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut nodes = self.registry.nodes();
        let Some(entry) = nodes.get(&self.ip) else {
            return;
        };
        let empty = {
            let mut targets = entry.shared.targets();
            if let Some(slot) = targets.get_mut(&self.target) {
                slot.refs -= 1;
                if slot.refs == 0 {
                    targets.remove(&self.target);
                    let _ = self.registry.metrics.backend_health.remove(&TargetLabel {
                        node: self.ip.to_string(),
                        target: self.target.label(),
                    });
                }
            }
            targets.is_empty()
        };
        if empty && let Some(entry) = nodes.remove(&self.ip) {
            entry.task.abort();
        }
    }
}

impl std::fmt::Debug for HealthChecks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthChecks")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl HealthChecks {
    /// Health checks with these settings, reporting to `metrics`.
    pub fn new(config: HealthConfig, metrics: LbMetrics) -> Self {
        Self {
            inner: Arc::new(Registry {
                config,
                metrics,
                nodes: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Starts (or joins) probing `target` on `ip`. Must run inside the tokio runtime.
    pub fn acquire(&self, ip: IpAddr, target: Target) -> Lease {
        let mut nodes = self.inner.nodes();
        let entry = nodes.entry(ip).or_insert_with(|| {
            let shared = Arc::new(NodeShared {
                ip,
                targets: Mutex::new(HashMap::new()),
                wake: Notify::new(),
            });
            let task = tokio::spawn(probe_node(
                Arc::clone(&shared),
                self.inner.config,
                self.inner.metrics.clone(),
            ))
            .abort_handle();
            NodeEntry { shared, task }
        });
        let mut targets = entry.shared.targets();
        let fresh = !targets.contains_key(&target);
        let slot = targets.entry(target).or_insert_with(|| {
            let label = TargetLabel {
                node: ip.to_string(),
                target: target.label(),
            };
            let gauge = self
                .inner
                .metrics
                .backend_health
                .get_or_create(&label)
                .clone();
            gauge.set(-1);
            Slot {
                refs: 0,
                cell: Arc::new(Cell::default()),
                state: HealthState::default(),
                probed: false,
                gauge,
            }
        });
        slot.refs += 1;
        let cell = Arc::clone(&slot.cell);
        drop(targets);
        if fresh {
            // A new target gets its first verdict now rather than an interval from now.
            entry.shared.wake.notify_one();
        }
        Lease {
            registry: Arc::clone(&self.inner),
            ip,
            target,
            cell,
        }
    }
}

/// The result of one probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    Failed,
    Refused,
}

/// Probes one node's targets every interval (and targets registered since, at once), until
/// aborted.
async fn probe_node(node: Arc<NodeShared>, config: HealthConfig, metrics: LbMetrics) {
    let mut next_round = Instant::now();
    loop {
        let full = Instant::now() >= next_round;
        if full {
            next_round = Instant::now() + config.interval;
        }
        // Due: everything on a full round, else only what was never probed.
        let (due, kube_proxy_refused_before): (Vec<Target>, bool) = {
            let slots = node.targets();
            let due = slots
                .iter()
                .filter(|(_, slot)| full || !slot.probed)
                .map(|(t, _)| *t)
                .collect();
            let refused = slots
                .iter()
                .any(|(t, slot)| matches!(t, Target::KubeProxy(_)) && slot.cell.refused());
            (due, refused)
        };
        let primary: Vec<Target> = due
            .iter()
            .copied()
            .filter(|t| !matches!(t, Target::NodePort(_)))
            .collect();
        let mut results =
            futures::future::join_all(primary.iter().map(|t| probe(node.ip, *t, config, &metrics)))
                .await;
        let probed_kube_proxy = primary.iter().any(|t| matches!(t, Target::KubeProxy(_)));
        let kube_proxy_refused = if probed_kube_proxy {
            primary
                .iter()
                .zip(&results)
                .any(|(t, r)| matches!(t, Target::KubeProxy(_)) && *r == Outcome::Refused)
        } else {
            kube_proxy_refused_before
        };
        let mut probed = primary;
        if kube_proxy_refused {
            let fallback: Vec<Target> = due
                .iter()
                .copied()
                .filter(|t| matches!(t, Target::NodePort(_)))
                .collect();
            results.extend(
                futures::future::join_all(
                    fallback
                        .iter()
                        .map(|t| probe(node.ip, *t, config, &metrics)),
                )
                .await,
            );
            probed.extend(fallback);
        }
        {
            let mut slots = node.targets();
            for (target, outcome) in probed.iter().zip(results) {
                let Some(slot) = slots.get_mut(target) else {
                    continue;
                };
                let before = slot.state.health;
                slot.probed = true;
                slot.state = slot
                    .state
                    .observe(outcome == Outcome::Ok, config.thresholds);
                slot.cell
                    .set(slot.state.health, outcome == Outcome::Refused);
                if before != slot.state.health {
                    tracing::info!(node = %node.ip, target = %target.label(), health = ?slot.state.health, "backend health changed");
                }
                slot.gauge.set(match slot.state.health {
                    Health::Up => 1,
                    Health::Down => 0,
                    Health::Unknown => -1,
                });
            }
        }
        tokio::select! {
            () = tokio::time::sleep_until(next_round) => {}
            () = node.wake.notified() => {}
        }
    }
}

async fn probe(ip: IpAddr, target: Target, config: HealthConfig, metrics: &LbMetrics) -> Outcome {
    let started = Instant::now();
    let (kind, outcome) = match target {
        Target::Healthz(port) | Target::KubeProxy(port) => (
            "http",
            http_healthz(SocketAddr::new(ip, port), config.timeout).await,
        ),
        Target::NodePort(port) => (
            "tcp",
            tcp_connect(SocketAddr::new(ip, port), config.timeout).await,
        ),
    };
    metrics
        .probe_duration
        .get_or_create(&KindLabel { kind })
        .observe(started.elapsed().as_secs_f64());
    outcome
}

fn connect_outcome(err: &std::io::Error) -> Outcome {
    if err.kind() == std::io::ErrorKind::ConnectionRefused {
        Outcome::Refused
    } else {
        Outcome::Failed
    }
}

async fn tcp_connect(addr: SocketAddr, timeout: Duration) -> Outcome {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Outcome::Ok,
        Ok(Err(err)) => connect_outcome(&err),
        Err(_) => Outcome::Failed,
    }
}

/// `GET /healthz`; healthy on status 200. A hand-written HTTP/1.0 request: one line to send
/// and one to read does not need an HTTP client.
async fn http_healthz(addr: SocketAddr, timeout: Duration) -> Outcome {
    let exchange = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| connect_outcome(&e))?;
        let request = format!(
            "GET /healthz HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: local-shim\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|_| Outcome::Failed)?;
        let mut head = [0u8; 64];
        let mut len = 0;
        while len < head.len() {
            let n = stream
                .read(&mut head[len..])
                .await
                .map_err(|_| Outcome::Failed)?;
            if n == 0 {
                break;
            }
            len += n;
            if head[..len].contains(&b'\n') {
                break;
            }
        }
        Ok::<bool, Outcome>(status_is_200(&head[..len]))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(true)) => Outcome::Ok,
        Ok(Ok(false)) => Outcome::Failed,
        Ok(Err(outcome)) => outcome,
        Err(_) => Outcome::Failed,
    }
}

/// Whether an HTTP status line says 200.
fn status_is_200(head: &[u8]) -> bool {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.split(|b| *b == b' ');
    matches!(
        (parts.next(), parts.next()),
        (Some(version), Some(b"200")) if version.starts_with(b"HTTP/1.")
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        let cases: &[(&str, &[u8], bool)] = &[
            ("200", b"HTTP/1.1 200 OK\r\n", true),
            ("200 no reason", b"HTTP/1.0 200\r\n", true),
            ("503", b"HTTP/1.1 503 Service Unavailable\r\n", false),
            ("2000", b"HTTP/1.1 2000 OK\r\n", false),
            ("garbage", b"SSH-2.0-OpenSSH\r\n", false),
            ("empty", b"", false),
        ];
        for (name, head, want) in cases {
            assert_eq!(status_is_200(head), *want, "{name}");
        }
    }
}
