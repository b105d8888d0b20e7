//! The `LoadBalancer` service of the local shim: decides (pure modules), persists (before
//! anything is reported), then acts (listeners, health checks).
//!
//! Persisting is a group commit (see `commit`): a changing call decides and applies its change
//! to the in-memory state under the state lock, queues the write there and releases the lock;
//! one writer task commits everything queued in one redb transaction and then answers each
//! call, which only then activates its listeners. Calls for one load balancer run one after
//! the other (`KeyLocks`), calls for different ones overlap, and the fsync is no longer inside
//! any lock.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock, PoisonError, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{Notify, OwnedMutexGuard, oneshot};

use cpi_proto::CpiError;
use cpi_proto::v1::{
    EnsureLoadBalancerDeletedResponse, EnsureLoadBalancerResponse, GetLoadBalancerNameResponse,
    GetLoadBalancerResponse, LoadBalancerIngress, LoadBalancerStatus, Node, Ownership, PortStatus,
    Service, UpdateLoadBalancerResponse,
};
use prometheus_client::registry::Registry;

use super::alloc::{AllocError, AllocInput, Decision, Hold, LbRecord, decide, hold_key, lb_key};
use super::commit::{CommitError, Queue, settle};
use super::config::{LbConfigError, LbFlags};
use super::health::HealthChecks;
use super::intern::{Interner, LastDerived, reuse_plan};
use super::metrics::{LbMetrics, PoolLabel, ReasonLabel};
use super::pool::{Family, Pools};
use super::proxy::{
    BackendRt, Backends, Listener, ProxyConfig, Runtime, Snapshot, bind_tcp, bind_udp,
    listener_name, spawn_tcp, spawn_udp,
};
use super::records::Records;
use super::spec::{Backend, HealthPolicy, Protocol, backends, parse_service};
use super::stored;
use crate::store::{LbWrite, Store, StoreError};

/// `ports[].error` of an SCTP port: the proxy serves TCP and UDP only.
pub const PORT_ERROR_SCTP: &str = "lb.local-shim/SCTPNotSupported";
/// `ports[].error` of a port without a node port (nothing to forward to).
pub const PORT_ERROR_NO_NODE_PORT: &str = "lb.local-shim/NoNodePort";
/// `ports[].error` of a port whose listener could not bind (the log says why).
pub const PORT_ERROR_BIND: &str = "lb.local-shim/BindFailed";
/// `ingress[].ipMode`: traffic goes through this proxy.
pub const IP_MODE_PROXY: &str = "Proxy";

/// Why the load balancer could not start.
#[derive(Debug, thiserror::Error)]
pub enum LbError {
    /// `--lb-config` is unusable.
    #[error(transparent)]
    Config(#[from] LbConfigError),
    /// The state database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The stored load balancers could not be converted to the current schema.
    #[error("converting the state database's load balancers to schema 3: {0}")]
    Migrate(serde_json::Error),
    /// A stored row cannot be read; refusing to start rather than hand its address out again.
    #[error(
        "state database {table} row {key:?} is unreadable ({error}); refusing to start, as \
         its address could be handed to another Service"
    )]
    Corrupt {
        /// Table name.
        table: &'static str,
        /// Row key.
        key: String,
        /// Decoding error.
        error: String,
    },
}

/// A load balancer being served: its listeners and what its ports report.
struct Live {
    ip: IpAddr,
    runtime: Arc<Runtime>,
    listeners: HashMap<(Protocol, u16), Listener>,
    ports: Vec<PortStatus>,
}

/// Who waits for a queued write to become durable.
type Waiter = oneshot::Sender<Result<(), CommitError>>;

/// The load balancers as decided: what is durable plus the writes queued in `pending`, applied
/// in order. `live` only ever reflects durable records.
#[derive(Default)]
struct State {
    records: Records,
    holds: HashMap<String, Hold>,
    live: HashMap<String, Live>,
    /// Writes applied above but not yet committed, in decision order.
    pending: Queue<Waiter>,
    /// Why the state could not be reloaded after a failed commit; changes are refused (with a
    /// retryable error) until a reload succeeds.
    stale: Option<String>,
}

/// One async lock per load balancer being changed: a call applies, persists and activates its
/// decision before the next call for the same load balancer decides, so activations never run
/// in the wrong order. Entries exist only while someone holds or waits for them.
#[derive(Default)]
struct KeyLocks {
    held: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Holds one key of [`KeyLocks`]; dropping it lets the next call for that key go.
struct KeyGuard<'a> {
    locks: &'a KeyLocks,
    key: String,
    guard: Option<OwnedMutexGuard<()>>,
}

impl KeyLocks {
    async fn lock(&self, key: &str) -> KeyGuard<'_> {
        let lock = {
            // Only plain map updates happen under this lock; a panic cannot leave it half-done.
            let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(held.entry(key.to_string()).or_default())
        };
        KeyGuard {
            locks: self,
            key: key.to_string(),
            guard: Some(lock.lock_owned().await),
        }
    }
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut held = self
            .locks
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Clones are only made under this map lock, so a count of 1 (the map's) means nobody
        // holds or waits for the key.
        if held
            .get(&self.key)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            held.remove(&self.key);
        }
    }
}

/// A shared backend list and the digest it is stored under.
type SharedList = (Arc<[Backend]>, Arc<str>);

/// Shared backend lists (each with the digest it is stored under) and the health-check sets
/// built for them.
#[derive(Default)]
struct Shared {
    lists: Interner<Backend, Arc<str>>,
    /// The list (and digest) last built from a node set, per family.
    by_node_set: LastDerived<Node, Family, SharedList>,
    /// By (policy, address of the interned list); an entry is valid while its set lives and
    /// was built from that very list.
    sets: HashMap<(HealthPolicy, usize), Weak<Backends>>,
    /// Size at which dead `sets` entries are pruned next.
    sets_prune_at: usize,
}

impl Shared {
    /// Stored records with their lists shared, each under the digest it is stored by.
    fn intern_records(&mut self, records: Vec<(String, LbRecord)>) -> Records {
        records
            .into_iter()
            .map(|(key, mut record)| {
                let id = Arc::clone(&record.backends_id);
                let Ok((list, id)) = self
                    .lists
                    .intern(record.backends, |_| Ok::<_, Infallible>(id));
                record.backends = list;
                record.backends_id = id;
                (key, record)
            })
            .collect()
    }
}

struct Manager {
    store: Store,
    shared: std::sync::Mutex<Shared>,
    pools: Pools,
    hold_for: Duration,
    kube_proxy_port: u16,
    proxy: ProxyConfig,
    health: HealthChecks,
    metrics: LbMetrics,
    state: tokio::sync::Mutex<State>,
    key_locks: KeyLocks,
    /// Wakes the writer when a write is queued.
    wake: Arc<Notify>,
    /// The writer task, started with the first queued write (inside the runtime).
    writer: OnceLock<tokio::task::AbortHandle>,
}

impl Drop for Manager {
    fn drop(&mut self) {
        if let Some(writer) = self.writer.get() {
            writer.abort();
        }
    }
}

/// The local shim's load balancers; cheap to clone.
#[derive(Clone)]
pub struct LocalLoadBalancer {
    inner: Arc<Manager>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl LocalLoadBalancer {
    /// The configured pools (validation checks Services against the ones allocation uses).
    pub(crate) fn pools(&self) -> &Pools {
        &self.inner.pools
    }
}

/// Name of a Service's load balancer: cluster name and Service UID, never namespace/name.
pub fn load_balancer_name(cluster: &str, uid: &str) -> String {
    format!("local-lb-{cluster}-{uid}")
}

fn ownership(cluster: &str, uid: &str) -> Ownership {
    Ownership {
        owned: true,
        cluster_id: Some(cluster.to_string()),
        object_uid: Some(uid.to_string()),
    }
}

fn status_of(live: &Live) -> LoadBalancerStatus {
    LoadBalancerStatus {
        ingress: vec![LoadBalancerIngress {
            ip: live.ip.to_string(),
            hostname: String::new(),
            ip_mode: Some(IP_MODE_PROXY.to_string()),
            ports: live.ports.clone(),
        }],
    }
}

fn decode<T: serde::de::DeserializeOwned>(
    table: &'static str,
    key: &str,
    value: &[u8],
) -> Result<T, LbError> {
    serde_json::from_slice(value).map_err(|error| LbError::Corrupt {
        table,
        key: key.to_string(),
        error: error.to_string(),
    })
}

fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, CpiError> {
    serde_json::to_vec(value).map_err(encoding_failed)
}

fn encode_record(record: &LbRecord) -> Result<Vec<u8>, CpiError> {
    stored::encode_record(record).map_err(encoding_failed)
}

/// Waits until the queued write behind `durable` is committed; every failure is retryable
/// (`CLOUD_ERROR`), as nothing of the call was kept.
async fn durable(durable: oneshot::Receiver<Result<(), CommitError>>) -> Result<(), CpiError> {
    let err = match durable.await {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(err)) => err,
        Err(_) => CommitError::WriterGone,
    };
    Err(CpiError::Cloud(err.to_string()))
}

impl From<stored::RowError> for LbError {
    fn from(e: stored::RowError) -> Self {
        Self::Corrupt {
            table: e.table,
            key: e.key,
            error: e.error,
        }
    }
}

/// Load balancers (with what a schema migration needs) and holds by key, as stored.
type Durable = (stored::Decoded, HashMap<String, Hold>);

/// Decodes the stored rows of the load-balancer tables.
fn decode_rows(rows: &crate::store::LbRows) -> Result<Durable, LbError> {
    let records = stored::decode(&rows.records, &rows.backends)?;
    let mut holds = HashMap::with_capacity(rows.holds.len());
    for (key, value) in &rows.holds {
        holds.insert(key.clone(), decode("lb_holds_v1", key, value)?);
    }
    Ok((records, holds))
}

/// Queues `write` (under the state lock, so the queue is in decision order) and wakes the
/// writer, starting it with the first write.
fn enqueue(
    this: &Arc<Manager>,
    state: &mut State,
    write: LbWrite,
) -> oneshot::Receiver<Result<(), CommitError>> {
    let (waiter, durable) = oneshot::channel();
    state.pending.push(write, waiter);
    this.writer.get_or_init(|| {
        tokio::spawn(write_loop(Arc::downgrade(this), Arc::clone(&this.wake))).abort_handle()
    });
    this.wake.notify_one();
    durable
}

/// The single writer: commits whatever is queued whenever woken, until the load balancers are
/// dropped.
async fn write_loop(manager: Weak<Manager>, wake: Arc<Notify>) {
    loop {
        wake.notified().await;
        let Some(manager) = manager.upgrade() else {
            return;
        };
        manager.commit_pending().await;
    }
}

/// The cluster name and Service UID that own a Service's load balancer.
fn identity(cluster: &str, service: &Service) -> Result<(String, String), CpiError> {
    let invalid = |field: &str| CpiError::InvalidObject {
        field: field.to_string(),
        message: "must not be empty: load balancers are owned by cluster name and Service UID"
            .into(),
    };
    if cluster.is_empty() {
        return Err(invalid("cluster_name"));
    }
    let uid = service
        .metadata
        .as_ref()
        .map(|m| m.uid.clone())
        .unwrap_or_default();
    if uid.is_empty() {
        return Err(invalid("service.metadata.uid"));
    }
    Ok((cluster.to_string(), uid))
}

impl LocalLoadBalancer {
    /// Reads the pools and every stored load balancer and hold (blocking). Nothing is served
    /// until [`LocalLoadBalancer::restore`].
    pub fn new(store: Store, flags: &LbFlags) -> Result<Self, LbError> {
        let pools = flags.pools()?;
        let rows = store.load_lb_rows()?;
        let (decoded, holds) = decode_rows(&rows)?;
        let migration = stored::migration(&decoded).map_err(LbError::Migrate)?;
        if !migration.is_empty() {
            store.write_lb(&migration)?;
            tracing::info!(
                records = migration.put_records.len(),
                backend_lists = migration.put_backends.len(),
                removed_lists = migration.delete_backends.len(),
                "stored the load balancers' backend lists apart (schema 3)"
            );
        }
        let mut shared = Shared::default();
        let records = shared.intern_records(decoded.records);
        let state = State {
            records,
            holds,
            ..State::default()
        };
        let metrics = LbMetrics::default();
        for (_, record) in state.records.iter() {
            if pools.pool_of(record.ip).is_none() {
                tracing::warn!(
                    service = %record.spec.service_name(),
                    cluster = %record.spec.cluster,
                    ip = %record.ip,
                    pools = %pools.names(),
                    "allocation is in no configured pool any more; it is kept (pool edits never \
                     move an address) and not handed out again until the Service is deleted"
                );
            }
        }
        let mut manager = Manager {
            store,
            shared: std::sync::Mutex::new(shared),
            health: HealthChecks::new(flags.health(), metrics.clone()),
            hold_for: flags.address_hold,
            kube_proxy_port: flags.kube_proxy_health_port,
            proxy: flags.proxy(),
            pools,
            metrics,
            state: tokio::sync::Mutex::new(State::default()),
            key_locks: KeyLocks::default(),
            wake: Arc::new(Notify::new()),
            writer: OnceLock::new(),
        };
        manager.refresh_metrics(&state);
        manager.state = tokio::sync::Mutex::new(state);
        Ok(Self {
            inner: Arc::new(manager),
        })
    }

    /// Serves every stored load balancer again (same addresses, same listeners), before the
    /// shim takes any call.
    pub async fn restore(&self) {
        let m = &self.inner;
        let mut state = m.state.lock().await;
        let records: Vec<(String, LbRecord)> = state
            .records
            .iter()
            .map(|(k, r)| (k.clone(), r.clone()))
            .collect();
        for (key, record) in &records {
            let live = m.activate(None, record);
            state.live.insert(key.clone(), live);
        }
        if !records.is_empty() {
            tracing::info!(
                load_balancers = records.len(),
                holds = state.holds.len(),
                "re-adopted the stored load balancers"
            );
        }
    }

    /// Registers the load-balancer metrics.
    pub fn register_metrics(&self, registry: &mut Registry) {
        self.inner.metrics.register(registry);
    }
}

impl Manager {
    /// Commits everything queued, batch after batch, answering each batch's callers once it is
    /// durable. A failed commit fails its batch and everything queued behind it (their
    /// decisions may rest on it) and reloads the state from the database.
    async fn commit_pending(&self) {
        loop {
            let batch = {
                let mut state = self.state.lock().await;
                if state.pending.is_empty() {
                    return;
                }
                // Once per batch, not per call: the gauges cost a pass over every load
                // balancer. Every change is queued, so every change is counted before its
                // caller is answered.
                self.refresh_metrics(&state);
                state.pending.take()
            };
            let store = self.store.clone();
            let writes = batch.writes;
            // redb commits block (fsync); keep them off the runtime's workers.
            let outcome =
                match tokio::task::spawn_blocking(move || store.write_lb_batch(&writes)).await {
                    Ok(result) => result.map_err(|e| e.to_string()),
                    Err(join) => Err(format!("the commit task failed: {join}")),
                };
            let behind = match &outcome {
                Ok(()) => Vec::new(),
                Err(error) => {
                    let mut state = self.state.lock().await;
                    let behind = state.pending.take().waiters;
                    tracing::error!(
                        %error,
                        calls = batch.waiters.len() + behind.len(),
                        "persisting load balancers failed; failing the calls and reloading the \
                         state from the database"
                    );
                    self.reload(&mut state);
                    behind
                }
            };
            let (answers, _) = settle(batch.waiters, behind, &outcome);
            for (waiter, answer) in answers {
                // A caller that went away needs no answer; its write stands or fell with the
                // batch regardless.
                let _ = waiter.send(answer);
            }
        }
    }

    /// Replaces the in-memory records and holds with the durable ones (after a failed commit
    /// dropped the queued writes), and brings the listeners back in line with them.
    fn reload(&self, state: &mut State) {
        // A blocking read, but only on this failure path, where callers wait anyway.
        let loaded = self
            .store
            .load_lb_rows()
            .map_err(LbError::from)
            .and_then(|rows| decode_rows(&rows));
        match loaded {
            Ok((decoded, holds)) => {
                state.records = self.shared().intern_records(decoded.records);
                state.holds = holds;
                state.stale = None;
                // Listeners dropped at decision time (a delete or move that failed) come back;
                // none can belong to a record that is not durable.
                state.live.retain(|key, _| state.records.contains_key(key));
                let records: Vec<(String, LbRecord)> = state
                    .records
                    .iter()
                    .filter(|(k, r)| state.live.get(*k).is_none_or(|l| l.ip != r.ip))
                    .map(|(k, r)| (k.clone(), r.clone()))
                    .collect();
                for (key, record) in records {
                    let live = self.activate(state.live.remove(&key), &record);
                    state.live.insert(key, live);
                }
                self.refresh_metrics(state);
            }
            Err(err) => {
                tracing::error!(
                    error = %err,
                    "cannot reload the load balancers from the state database; refusing \
                     changes until it can"
                );
                state.stale = Some(err.to_string());
            }
        }
    }

    /// Refuses changes while the state is stale, retrying the reload first.
    fn usable(&self, state: &mut State) -> Result<(), CpiError> {
        if state.stale.is_some() {
            self.reload(state);
        }
        match &state.stale {
            Some(why) => Err(CpiError::Cloud(CommitError::Stale(why.clone()).to_string())),
            None => Ok(()),
        }
    }

    fn shared(&self) -> std::sync::MutexGuard<'_, Shared> {
        // Only plain map updates happen under this lock; a panic cannot leave it half-done.
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The shared copy of `list` and the digest naming it in the state database (computed
    /// once per distinct list).
    fn intern(&self, list: Vec<Backend>) -> Result<SharedList, CpiError> {
        self.shared()
            .lists
            .intern(list, |l| stored::list_id(l).map_err(encoding_failed))
    }

    /// The shared backends of `nodes` for `family`, with their digest. The manager names one
    /// node set (the same `Arc`) in every call until its nodes change, so the nodes are read,
    /// sorted and interned once per set and family rather than once per load balancer.
    fn backends_of(&self, nodes: &Arc<[Node]>, family: Family) -> Result<SharedList, CpiError> {
        let last = self.shared().by_node_set.get(nodes, &family).cloned();
        if let Some(found) = last {
            return Ok(found);
        }
        let found = self.intern(backends(nodes, family))?;
        self.shared()
            .by_node_set
            .put(Arc::clone(nodes), family, found.clone());
        Ok(found)
    }
}

/// The backend-list row to store when the record of a key goes from `old` to `new`, decided on
/// the records as they are *before* the change (so a failed encoding leaves them untouched):
/// a list is stored with the first record naming it.
fn list_to_store(
    records: &Records,
    old: Option<&LbRecord>,
    new: &LbRecord,
) -> Result<Option<(String, Vec<u8>)>, CpiError> {
    if old.is_some_and(|o| o.backends_id == new.backends_id) || records.names_list(&new.backends_id)
    {
        return Ok(None);
    }
    let value = stored::encode_list(&new.backends).map_err(encoding_failed)?;
    Ok(Some((new.backends_id.to_string(), value)))
}

/// The backend list to remove once `old` was replaced by `new` (or removed), decided on the
/// records as they are *after* the change: a list goes with the last record naming it.
fn list_to_remove(records: &Records, old: &LbRecord, new: Option<&LbRecord>) -> Option<String> {
    (new.is_none_or(|n| n.backends_id != old.backends_id) && !records.names_list(&old.backends_id))
        .then(|| old.backends_id.to_string())
}

fn encoding_failed(e: serde_json::Error) -> CpiError {
    CpiError::Cloud(format!("encoding a record: {e}"))
}

impl Manager {
    /// The backends of `record` with their health checks: the set already built for the same
    /// node list and policy, else a new one taking over `previous`'s entries for the nodes it
    /// keeps (registering checks only for the nodes that changed).
    fn backend_set(&self, record: &LbRecord, previous: Option<&Arc<Backends>>) -> Arc<Backends> {
        let policy = record.spec.health;
        let key = (policy, record.backends.as_ptr() as usize);
        let mut shared = self.shared();
        if let Some(set) = shared
            .sets
            .get(&key)
            .and_then(Weak::upgrade)
            .filter(|set| Arc::ptr_eq(&set.source, &record.backends))
        {
            return set;
        }
        let old: &[Arc<BackendRt>] = previous
            .filter(|p| p.policy == policy)
            .map_or(&[], |p| p.list.as_slice());
        let old_ips: Vec<IpAddr> = old.iter().map(|b| b.ip).collect();
        let new_ips: Vec<IpAddr> = record.backends.iter().map(|b| b.ip).collect();
        let list = reuse_plan(&old_ips, &new_ips)
            .into_iter()
            .zip(&new_ips)
            .map(|(reuse, ip)| match reuse {
                Some(i) => Arc::clone(&old[i]),
                None => Arc::new(BackendRt::new(
                    *ip,
                    policy,
                    self.kube_proxy_port,
                    &self.health,
                )),
            })
            .collect();
        let set = Arc::new(Backends {
            source: Arc::clone(&record.backends),
            policy,
            list,
        });
        if shared.sets.len() >= shared.sets_prune_at {
            shared.sets.retain(|_, set| set.strong_count() > 0);
            shared.sets_prune_at = (shared.sets.len() * 2).max(64);
        }
        shared.sets.insert(key, Arc::downgrade(&set));
        set
    }

    /// Health checks and rules of `record`, as a proxy snapshot.
    fn snapshot(&self, record: &LbRecord, previous: Option<&Arc<Backends>>) -> Snapshot {
        let spec = &record.spec;
        let node_ports: HashMap<(Protocol, u16), u16> = spec
            .ports
            .iter()
            .filter(|p| p.protocol != Protocol::Sctp)
            .filter_map(|p| p.node_port.map(|np| ((p.protocol, p.port), np)))
            .collect();
        Snapshot {
            source_ranges: spec.source_ranges.clone(),
            affinity: spec
                .affinity_timeout
                .map(|s| Duration::from_secs(u64::from(s))),
            node_ports,
            backends: self.backend_set(record, previous),
        }
    }

    /// Brings `record`'s listeners to what it says, reusing `live`'s (established connections
    /// continue) when the address is the same.
    fn activate(&self, live: Option<Live>, record: &LbRecord) -> Live {
        let previous = live
            .as_ref()
            .map(|l| Arc::clone(&l.runtime.snapshot().backends));
        let snapshot = self.snapshot(record, previous.as_ref());
        let (runtime, mut listeners) = match live {
            Some(live) if live.ip == record.ip => {
                live.runtime.replace(snapshot);
                (live.runtime, live.listeners)
            }
            // A moved address (or a first start): the old listeners close with `live`.
            _ => (
                Runtime::new(snapshot, self.proxy, self.metrics.clone()),
                HashMap::new(),
            ),
        };
        listeners.retain(|(protocol, port), _| {
            record
                .spec
                .ports
                .iter()
                .any(|p| p.protocol == *protocol && p.port == *port && p.node_port.is_some())
        });
        let service = record.spec.service_name();
        let mut ports = Vec::with_capacity(record.spec.ports.len());
        for port in &record.spec.ports {
            let error = match (port.protocol, port.node_port) {
                (Protocol::Sctp, _) => Some(PORT_ERROR_SCTP),
                (_, None) => Some(PORT_ERROR_NO_NODE_PORT),
                (protocol, Some(_)) if listeners.contains_key(&(protocol, port.port)) => None,
                (protocol, Some(_)) => {
                    let addr = SocketAddr::new(record.ip, port.port);
                    let name = listener_name(addr, protocol);
                    let runtime = Arc::clone(&runtime);
                    let bound = match protocol {
                        Protocol::Tcp => {
                            bind_tcp(addr).map(|l| spawn_tcp(l, runtime, port.port, name.clone()))
                        }
                        _ => bind_udp(addr).map(|s| spawn_udp(s, runtime, port.port, name.clone())),
                    };
                    match bound {
                        Ok(listener) => {
                            tracing::debug!(%service, listener = %name, "listening");
                            listeners.insert((protocol, port.port), listener);
                            None
                        }
                        Err(error) => {
                            tracing::warn!(
                                %service,
                                listener = %name,
                                %error,
                                "cannot listen; the port's status says {PORT_ERROR_BIND}"
                            );
                            Some(PORT_ERROR_BIND)
                        }
                    }
                }
            };
            ports.push(PortStatus {
                port: i32::from(port.port),
                protocol: port.protocol.as_str().to_string(),
                error: error.map(str::to_string),
            });
        }
        Live {
            ip: record.ip,
            runtime,
            listeners,
            ports,
        }
    }

    /// Pool and load-balancer gauges, recomputed after a change.
    fn refresh_metrics(&self, state: &State) {
        let usage = state
            .records
            .pool_usage(&self.pools, state.holds.values(), unix_ms());
        for (pool, in_use) in self.pools.iter().zip(usage.used) {
            let label = PoolLabel {
                pool: pool.name.clone(),
            };
            let size = i64::try_from(pool.size(None)).unwrap_or(i64::MAX);
            self.metrics.pool_size.get_or_create(&label).set(size);
            self.metrics.pool_used.get_or_create(&label).set(in_use);
            self.metrics
                .pool_free
                .get_or_create(&label)
                .set(size.saturating_sub(in_use));
        }
        self.metrics.outside_pools.set(usage.outside);
        self.metrics.load_balancers.set(state.records.len() as i64);
    }

    /// The precise error for an allocation failure, counted by reason.
    fn allocation_error(&self, err: AllocError, service: &Service) -> CpiError {
        let invalid = |err: &AllocError| CpiError::InvalidObject {
            field: err.field(service).unwrap_or_default(),
            message: err.to_string(),
        };
        let (reason, cpi) = match &err {
            AllocError::NotInAnyPool { .. } | AllocError::NotInRequestedPool { .. } => {
                ("not_in_pool", invalid(&err))
            }
            AllocError::UnknownPool { .. } => ("unknown_pool", invalid(&err)),
            AllocError::NoPoolForFamily { .. } => {
                ("no_pool_for_family", CpiError::Cloud(err.to_string()))
            }
            AllocError::Exhausted { .. } => ("exhausted", CpiError::Cloud(err.to_string())),
            AllocError::UsedBy { .. } => ("in_use", CpiError::NotOwned(err.to_string())),
            AllocError::Held { .. } => ("held", CpiError::NotOwned(err.to_string())),
            AllocError::PortInUse { .. } => ("port_in_use", CpiError::NotOwned(err.to_string())),
            AllocError::ReplacementRequired { .. } => (
                "replacement_required",
                CpiError::ReplacementRequired(err.to_string()),
            ),
        };
        self.metrics
            .allocation_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
        cpi
    }
}

#[tonic::async_trait]
impl shim_framework::LoadBalancer for LocalLoadBalancer {
    async fn get_load_balancer(
        &self,
        cluster_name: String,
        service: Service,
    ) -> Result<GetLoadBalancerResponse, CpiError> {
        let (cluster, uid) = identity(&cluster_name, &service)?;
        let key = lb_key(&cluster, &uid);
        let state = self.inner.state.lock().await;
        // Only a load balancer created for this cluster and this Service UID exists for it.
        Ok(match state.live.get(&key) {
            Some(live) => GetLoadBalancerResponse {
                exists: true,
                status: Some(status_of(live)),
                ownership: Some(ownership(&cluster, &uid)),
            },
            None => GetLoadBalancerResponse::default(),
        })
    }

    async fn get_load_balancer_name(
        &self,
        cluster_name: String,
        service: Service,
    ) -> Result<GetLoadBalancerNameResponse, CpiError> {
        let (cluster, uid) = identity(&cluster_name, &service)?;
        Ok(GetLoadBalancerNameResponse {
            name: load_balancer_name(&cluster, &uid),
        })
    }

    async fn ensure_load_balancer(
        &self,
        cluster_name: String,
        service: Service,
        nodes: Arc<[Node]>,
        allow_replacement: bool,
    ) -> Result<EnsureLoadBalancerResponse, CpiError> {
        let m = &self.inner;
        let spec = parse_service(&cluster_name, &service)?;
        let (backends, backends_id) = m.backends_of(&nodes, spec.family)?;
        let key = lb_key(&spec.cluster, &spec.uid);
        let _serial = m.key_locks.lock(&key).await;
        let now_ms = unix_ms();
        let (record, queued) = {
            let mut state = m.state.lock().await;
            m.usable(&mut state)?;
            let current = state.records.get(&key);
            let decision = {
                let holds: Vec<&Hold> = state.holds.values().collect();
                decide(&AllocInput {
                    pools: &m.pools,
                    others: &state.records.others(&key),
                    holds: &holds,
                    spec: &spec,
                    current: current.map(|r| r.ip),
                    allow_replacement,
                    now_ms,
                })
                .map_err(|err| m.allocation_error(err, &service))?
            };
            let (ip, pool) = match decision {
                Decision::Keep(ip) => (ip, current.and_then(|r| r.pool.clone())),
                Decision::Assign { ip, pool } => (ip, pool),
            };
            let record = LbRecord {
                spec,
                ip,
                pool,
                backends,
                backends_id,
            };
            let mut write = LbWrite::default();
            let own_hold = hold_key(
                &record.spec.cluster,
                &record.spec.namespace,
                &record.spec.name,
            );
            for (k, hold) in &state.holds {
                if *k == own_hold || hold.expires_unix_ms <= now_ms {
                    write.delete_holds.push(k.clone());
                }
            }
            let moved = current.is_some_and(|r| r.ip != ip);
            let created = current.is_none();
            let changed = current != Some(&record);
            if changed {
                write
                    .put_records
                    .push((key.clone(), encode_record(&record)?));
                write
                    .put_backends
                    .extend(list_to_store(&state.records, current, &record)?);
            }
            let queued = if write.is_empty() {
                None
            } else {
                // Applied now, so later decisions see it; a failed commit reloads the state.
                for k in &write.delete_holds {
                    state.holds.remove(k);
                }
                if moved {
                    // The old address may go to another Service as soon as this is durable;
                    // its listeners close now rather than race that Service's bind.
                    state.live.remove(&key);
                }
                if changed && let Some(old) = state.records.insert(key.clone(), record.clone()) {
                    write.delete_backends.extend(list_to_remove(
                        &state.records,
                        &old,
                        Some(&record),
                    ));
                }
                Some((enqueue(m, &mut state, write), created, moved))
            };
            (record, queued)
        };
        // Persisted before anything is served or reported.
        if let Some((queued, created, moved)) = queued {
            durable(queued).await?;
            if created || moved {
                tracing::info!(
                    service = %record.spec.service_name(),
                    cluster = %record.spec.cluster,
                    uid = %record.spec.uid,
                    ip = %record.ip,
                    pool = record.pool.as_deref().unwrap_or("-"),
                    moved,
                    "load balancer address allocated"
                );
            }
        }
        let mut state = m.state.lock().await;
        let live = state.live.remove(&key);
        let live = m.activate(live, &record);
        let status = status_of(&live);
        state.live.insert(key, live);
        Ok(EnsureLoadBalancerResponse {
            status: Some(status),
            ownership: Some(ownership(&record.spec.cluster, &record.spec.uid)),
        })
    }

    async fn update_load_balancer(
        &self,
        cluster_name: String,
        service: Service,
        nodes: Arc<[Node]>,
    ) -> Result<UpdateLoadBalancerResponse, CpiError> {
        let m = &self.inner;
        let (cluster, uid) = identity(&cluster_name, &service)?;
        let key = lb_key(&cluster, &uid);
        let _serial = m.key_locks.lock(&key).await;
        let (record, queued) = {
            let mut state = m.state.lock().await;
            m.usable(&mut state)?;
            let Some(current) = state.records.get(&key) else {
                return Err(CpiError::Cloud(format!(
                    "load balancer {} does not exist; EnsureLoadBalancer creates it",
                    load_balancer_name(&cluster, &uid)
                )));
            };
            let (backends, backends_id) = m.backends_of(&nodes, current.spec.family)?;
            if backends == current.backends {
                return Ok(UpdateLoadBalancerResponse {});
            }
            let record = LbRecord {
                backends_id,
                backends,
                ..current.clone()
            };
            let mut write = LbWrite {
                put_records: vec![(key.clone(), encode_record(&record)?)],
                put_backends: list_to_store(&state.records, Some(current), &record)?
                    .into_iter()
                    .collect(),
                ..LbWrite::default()
            };
            if let Some(old) = state.records.insert(key.clone(), record.clone()) {
                write
                    .delete_backends
                    .extend(list_to_remove(&state.records, &old, Some(&record)));
            }
            (record, enqueue(m, &mut state, write))
        };
        durable(queued).await?;
        let mut state = m.state.lock().await;
        let live = state.live.remove(&key);
        let live = m.activate(live, &record);
        state.live.insert(key, live);
        Ok(UpdateLoadBalancerResponse {})
    }

    async fn ensure_load_balancer_deleted(
        &self,
        cluster_name: String,
        service: Service,
    ) -> Result<EnsureLoadBalancerDeletedResponse, CpiError> {
        let m = &self.inner;
        let (cluster, uid) = identity(&cluster_name, &service)?;
        let key = lb_key(&cluster, &uid);
        let _serial = m.key_locks.lock(&key).await;
        let (record, queued) = {
            let mut state = m.state.lock().await;
            m.usable(&mut state)?;
            let Some(record) = state.records.get(&key).cloned() else {
                return Ok(EnsureLoadBalancerDeletedResponse {});
            };
            let mut write = LbWrite {
                delete_records: vec![key.clone()],
                ..LbWrite::default()
            };
            let hold = (!m.hold_for.is_zero()).then(|| Hold {
                cluster: record.spec.cluster.clone(),
                namespace: record.spec.namespace.clone(),
                name: record.spec.name.clone(),
                uid: record.spec.uid.clone(),
                ip: record.ip,
                expires_unix_ms: unix_ms().saturating_add(m.hold_for.as_millis() as u64),
            });
            let hold_at = hold_key(
                &record.spec.cluster,
                &record.spec.namespace,
                &record.spec.name,
            );
            if let Some(hold) = &hold {
                write.put_holds.push((hold_at.clone(), encode(hold)?));
            }
            state.records.remove(&key);
            write
                .delete_backends
                .extend(list_to_remove(&state.records, &record, None));
            // Dropping the listeners closes them and their connections; now, not after the
            // commit, as the address may go to another Service as soon as it is durable (a
            // failed commit brings them back).
            state.live.remove(&key);
            if let Some(hold) = hold {
                state.holds.insert(hold_at, hold);
            }
            (record, enqueue(m, &mut state, write))
        };
        durable(queued).await?;
        tracing::info!(
            service = %record.spec.service_name(),
            cluster = %record.spec.cluster,
            ip = %record.ip,
            held_for = ?m.hold_for,
            "load balancer deleted; its address is held for the same namespace/name"
        );
        Ok(EnsureLoadBalancerDeletedResponse {})
    }
}
