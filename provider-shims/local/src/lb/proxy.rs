//! The data path: one tokio task per listener (address, protocol, port); a task per TCP
//! connection and per UDP flow. Backends and rules live in a snapshot that Update and Ensure
//! replace atomically, so established connections and flows keep going across node changes.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio::time::Instant;

use super::balance::{AffinityTable, ClusterHealth, Health, Pick, cluster_health, connect_order};
use super::health::{HealthChecks, Lease, Target};
use super::metrics::{BytesLabel, LbMetrics, ListenerLabel, RejectLabel};
use super::pool::Cidr;
use super::spec::{Backend, HealthPolicy, Protocol, source_allowed};

/// Proxy timeouts.
#[derive(Debug, Clone, Copy)]
pub struct ProxyConfig {
    /// How long a connect to one backend may take before the next is tried.
    pub connect_timeout: Duration,
    /// A UDP flow without traffic in either direction for this long is forgotten.
    pub udp_idle_timeout: Duration,
}

/// How a backend's health is read.
#[derive(Debug)]
pub enum BackendHealth {
    /// `externalTrafficPolicy: Local`: the Service's health-check node port.
    Local(Lease),
    /// `Cluster`: kube-proxy, else (while it refuses) a TCP connect to the node port.
    Cluster {
        /// kube-proxy's health port: one check per node, whatever the number of Services.
        kube_proxy: Lease,
        /// Node-port fallback checks, registered on first use while kube-proxy refuses.
        fallback: Mutex<HashMap<u16, Lease>>,
    },
}

/// One backend (a node address) and its health checks, shared by every load balancer whose
/// node list includes it.
#[derive(Debug)]
pub struct BackendRt {
    /// The node's address.
    pub ip: IpAddr,
    /// Its health checks.
    pub health: BackendHealth,
    /// Where fallback checks are registered.
    pub checks: HealthChecks,
}

impl BackendRt {
    /// A backend at `ip` checked as `policy` asks (kube-proxy on `kube_proxy_port` for
    /// `Cluster`).
    pub fn new(
        ip: IpAddr,
        policy: HealthPolicy,
        kube_proxy_port: u16,
        checks: &HealthChecks,
    ) -> Self {
        let health = match policy {
            HealthPolicy::Local { port } => {
                BackendHealth::Local(checks.acquire(ip, Target::Healthz(port)))
            }
            HealthPolicy::Cluster => BackendHealth::Cluster {
                kube_proxy: checks.acquire(ip, Target::KubeProxy(kube_proxy_port)),
                fallback: Mutex::default(),
            },
        };
        Self {
            ip,
            health,
            checks: checks.clone(),
        }
    }

    /// The backend's health for traffic to `node_port`.
    fn health(&self, node_port: u16) -> Health {
        match &self.health {
            BackendHealth::Local(lease) => lease.cell().health(),
            BackendHealth::Cluster {
                kube_proxy,
                fallback,
            } => {
                let cell = kube_proxy.cell();
                let refused = cell.refused();
                // The fallback map is only looked at while kube-proxy refuses.
                let known = refused
                    .then(|| leases(fallback).get(&node_port).map(|l| l.cell().health()))
                    .flatten();
                match cluster_health(cell.health(), refused, known) {
                    ClusterHealth::Known(health) => health,
                    ClusterHealth::RegisterFallback => {
                        leases(fallback).entry(node_port).or_insert_with(|| {
                            self.checks.acquire(self.ip, Target::NodePort(node_port))
                        });
                        Health::Unknown
                    }
                }
            }
        }
    }
}

fn leases(map: &Mutex<HashMap<u16, Lease>>) -> MutexGuard<'_, HashMap<u16, Lease>> {
    // Only plain map updates happen under this lock.
    map.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The backends of a load balancer with their health checks, built once per distinct
/// (node list, health policy) and shared by every load balancer that has both.
#[derive(Debug)]
pub struct Backends {
    /// The (interned) node list this was built from.
    pub source: Arc<[Backend]>,
    /// The health policy it was built for.
    pub policy: HealthPolicy,
    /// One entry per node, in `source` order.
    pub list: Vec<Arc<BackendRt>>,
}

/// What a load balancer's listeners serve right now.
#[derive(Debug)]
pub struct Snapshot {
    /// Allowed clients; empty allows all.
    pub source_ranges: Vec<Cidr>,
    /// `ClientIP` affinity timeout.
    pub affinity: Option<Duration>,
    /// Node port of each served (protocol, port).
    pub node_ports: HashMap<(Protocol, u16), u16>,
    /// Backends.
    pub backends: Arc<Backends>,
}

/// The shared state of one load balancer's listeners.
pub struct Runtime {
    snapshot: RwLock<Arc<Snapshot>>,
    affinity: Mutex<AffinityTable>,
    round_robin: AtomicUsize,
    config: ProxyConfig,
    metrics: LbMetrics,
    epoch: Instant,
}

impl Runtime {
    /// A runtime serving `snapshot`.
    pub fn new(snapshot: Snapshot, config: ProxyConfig, metrics: LbMetrics) -> Arc<Self> {
        Arc::new(Self {
            snapshot: RwLock::new(Arc::new(snapshot)),
            affinity: Mutex::new(AffinityTable::default()),
            round_robin: AtomicUsize::new(0),
            config,
            metrics,
            epoch: Instant::now(),
        })
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        // Writers only swap an Arc; a panic cannot leave it half-written.
        Arc::clone(&self.snapshot.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Replaces the snapshot; connections already established keep their backend.
    pub fn replace(&self, snapshot: Snapshot) {
        *self
            .snapshot
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(snapshot);
    }

    fn affinity(&self) -> MutexGuard<'_, AffinityTable> {
        // Only plain map updates happen under this lock.
        self.affinity.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Backend addresses in the order to try for `client`.
    fn order(&self, snap: &Snapshot, client: IpAddr, node_port: u16) -> Vec<IpAddr> {
        let backends: Vec<(IpAddr, Health)> = snap
            .backends
            .list
            .iter()
            .map(|b| (b.ip, b.health(node_port)))
            .collect();
        let pick = match snap.affinity {
            Some(timeout) => Pick::Affinity {
                client,
                pinned: self.affinity().get(client, timeout, Instant::now()),
            },
            None => Pick::RoundRobin(self.round_robin.fetch_add(1, Ordering::Relaxed)),
        };
        connect_order(&backends, pick)
            .into_iter()
            .map(|i| backends[i].0)
            .collect()
    }

    fn remember(&self, snap: &Snapshot, client: IpAddr, backend: IpAddr) {
        if let Some(timeout) = snap.affinity {
            self.affinity()
                .put(client, backend, timeout, Instant::now());
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

/// A running listener; dropping it stops the listener and its connections and flows.
pub struct Listener {
    stop: watch::Sender<bool>,
    task: tokio::task::AbortHandle,
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.task.abort();
    }
}

/// The `listener` label of `addr` and `protocol`.
pub fn listener_name(addr: SocketAddr, protocol: Protocol) -> String {
    format!("{addr}/{}", protocol.as_str())
}

/// Binds a TCP listener on `addr` (address reuse on, so a restarted shim rebinds at once).
pub fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Binds a UDP socket on `addr`.
pub fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

/// Serves TCP on `listener` for service port `port`.
pub fn spawn_tcp(
    listener: TcpListener,
    runtime: Arc<Runtime>,
    port: u16,
    name: String,
) -> Listener {
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    tracing::warn!(listener = %name, error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            tokio::spawn(serve_tcp(
                stream,
                peer,
                Arc::clone(&runtime),
                port,
                name.clone(),
                stopped.clone(),
            ));
        }
    })
    .abort_handle();
    Listener { stop, task }
}

async fn serve_tcp(
    mut client: TcpStream,
    peer: SocketAddr,
    runtime: Arc<Runtime>,
    port: u16,
    name: String,
    mut stopped: watch::Receiver<bool>,
) {
    let snap = runtime.snapshot();
    let metrics = &runtime.metrics;
    if !source_allowed(&snap.source_ranges, peer.ip()) {
        metrics
            .rejected
            .get_or_create(&RejectLabel {
                listener: name,
                reason: "source_range",
            })
            .inc();
        return;
    }
    let Some(&node_port) = snap.node_ports.get(&(Protocol::Tcp, port)) else {
        return;
    };
    let mut upstream = None;
    for backend in runtime.order(&snap, peer.ip(), node_port) {
        let target = SocketAddr::new(backend, node_port);
        match tokio::time::timeout(runtime.config.connect_timeout, TcpStream::connect(target)).await
        {
            Ok(Ok(stream)) => {
                upstream = Some((stream, backend));
                break;
            }
            Ok(Err(err)) => {
                tracing::debug!(listener = %name, %target, error = %err, "backend connect failed; trying the next");
            }
            Err(_) => {
                tracing::debug!(listener = %name, %target, "backend connect timed out; trying the next");
            }
        }
    }
    let Some((mut upstream, backend)) = upstream else {
        metrics
            .rejected
            .get_or_create(&RejectLabel {
                listener: name,
                reason: "no_backend",
            })
            .inc();
        return;
    };
    runtime.remember(&snap, peer.ip(), backend);
    drop(snap);
    let label = ListenerLabel { listener: name };
    metrics.connections.get_or_create(&label).inc();
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
            if let Ok((rx, tx)) = copied {
                count_bytes(metrics, &label.listener, rx, tx);
            }
        }
        () = until_stopped(&mut stopped) => {}
    }
}

/// Resolves once the listener is stopped (or gone).
async fn until_stopped(stopped: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not Send; drop it before anything else is awaited.
    let _ = stopped.wait_for(|stop| *stop).await.map(drop);
}

fn count_bytes(metrics: &LbMetrics, listener: &str, rx: u64, tx: u64) {
    for (direction, n) in [("rx", rx), ("tx", tx)] {
        metrics
            .bytes
            .get_or_create(&BytesLabel {
                listener: listener.to_string(),
                direction,
            })
            .inc_by(n);
    }
}

struct Flow {
    upstream: Arc<UdpSocket>,
    last_ms: AtomicU64,
}

type Flows = Arc<Mutex<HashMap<SocketAddr, Arc<Flow>>>>;

fn flows(table: &Flows) -> MutexGuard<'_, HashMap<SocketAddr, Arc<Flow>>> {
    // Only plain map updates happen under this lock.
    table.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Serves UDP on `socket` for service port `port`: a flow per client address, to one backend,
/// forgotten after the idle timeout.
pub fn spawn_udp(socket: UdpSocket, runtime: Arc<Runtime>, port: u16, name: String) -> Listener {
    let (stop, stopped) = watch::channel(false);
    let socket = Arc::new(socket);
    let task = tokio::spawn(async move {
        let table: Flows = Arc::default();
        let mut buf = vec![0u8; 65_536];
        let label = ListenerLabel {
            listener: name.clone(),
        };
        loop {
            let (n, peer) = match socket.recv_from(&mut buf).await {
                Ok(received) => received,
                Err(err) => {
                    tracing::debug!(listener = %name, error = %err, "UDP receive failed");
                    continue;
                }
            };
            let existing = flows(&table).get(&peer).cloned();
            let flow = match existing {
                Some(flow) => flow,
                None => {
                    let Some(flow) = open_flow(
                        &socket,
                        &runtime,
                        &table,
                        peer,
                        port,
                        &name,
                        stopped.clone(),
                    )
                    .await
                    else {
                        continue;
                    };
                    runtime.metrics.udp_flows.get_or_create(&label).inc();
                    flow
                }
            };
            flow.last_ms.store(runtime.now_ms(), Ordering::Relaxed);
            if flow.upstream.send(&buf[..n]).await.is_ok() {
                count_bytes(&runtime.metrics, &name, n as u64, 0);
            }
        }
    })
    .abort_handle();
    Listener { stop, task }
}

async fn open_flow(
    socket: &Arc<UdpSocket>,
    runtime: &Arc<Runtime>,
    table: &Flows,
    peer: SocketAddr,
    port: u16,
    name: &str,
    mut stopped: watch::Receiver<bool>,
) -> Option<Arc<Flow>> {
    let snap = runtime.snapshot();
    let reject = |reason| {
        runtime
            .metrics
            .rejected
            .get_or_create(&RejectLabel {
                listener: name.to_string(),
                reason,
            })
            .inc();
    };
    if !source_allowed(&snap.source_ranges, peer.ip()) {
        reject("source_range");
        return None;
    }
    let node_port = *snap.node_ports.get(&(Protocol::Udp, port))?;
    let Some(backend) = runtime.order(&snap, peer.ip(), node_port).first().copied() else {
        reject("no_backend");
        return None;
    };
    let local: SocketAddr = match backend {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let upstream = match UdpSocket::bind(local).await {
        Ok(s) => s,
        Err(err) => {
            tracing::warn!(listener = %name, error = %err, "cannot open a UDP flow socket");
            return None;
        }
    };
    if let Err(err) = upstream.connect((backend, node_port)).await {
        tracing::debug!(listener = %name, %backend, error = %err, "UDP backend unreachable");
        reject("no_backend");
        return None;
    }
    runtime.remember(&snap, peer.ip(), backend);
    let flow = Arc::new(Flow {
        upstream: Arc::new(upstream),
        last_ms: AtomicU64::new(runtime.now_ms()),
    });
    flows(table).insert(peer, Arc::clone(&flow));
    let (socket, runtime, table, name) = (
        Arc::clone(socket),
        Arc::clone(runtime),
        Arc::clone(table),
        name.to_string(),
    );
    let reply = Arc::clone(&flow);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        let idle = runtime.config.udp_idle_timeout;
        loop {
            let last = reply.last_ms.load(Ordering::Relaxed);
            let deadline = runtime.epoch + Duration::from_millis(last) + idle;
            tokio::select! {
                received = reply.upstream.recv(&mut buf) => match received {
                    Ok(n) => {
                        reply.last_ms.store(runtime.now_ms(), Ordering::Relaxed);
                        if socket.send_to(&buf[..n], peer).await.is_ok() {
                            count_bytes(&runtime.metrics, &name, 0, n as u64);
                        }
                    }
                    // ICMP port unreachable from the backend: forget the flow, so the
                    // client's next datagram picks a backend again.
                    Err(_) => break,
                },
                () = tokio::time::sleep_until(deadline) => {
                    let last = reply.last_ms.load(Ordering::Relaxed);
                    if runtime.now_ms().saturating_sub(last) >= idle.as_millis() as u64 {
                        break;
                    }
                }
                () = until_stopped(&mut stopped) => break,
            }
        }
        flows(&table).remove(&peer);
        runtime
            .metrics
            .udp_flows
            .get_or_create(&ListenerLabel { listener: name })
            .dec();
    });
    Some(flow)
}
