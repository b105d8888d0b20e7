//! Address allocation, decided without IO: given the pools, the addresses in use, the holds of
//! deleted Services, a request and the time, which address (if any) the Service gets.
//!
//! Rules, in order: an existing allocation is kept (a pool edit never moves it); it moves only
//! when the Service explicitly asks for another address or pool and replacement is allowed. A
//! requested address must lie in a pool and be free (or shared under the same sharing key on
//! other ports). A Service with a live hold (deleted and recreated within the grace period, same
//! namespace/name) gets its address back. Otherwise the lowest free address of the requested
//! pool, or of the auto-assign pools in order.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use cpi_proto::v1::Service;

use super::pool::{Family, Pool, Pools};
use super::spec::{Backend, IP_ANNOTATION, LbSpec, POOL_ANNOTATION, PortSpec, Protocol};

/// A load balancer as persisted (see `stored`): its spec, address and backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LbRecord {
    /// What the Service asked for when last ensured.
    pub spec: LbSpec,
    /// The allocated address.
    pub ip: IpAddr,
    /// Pool the address came from (`None`: outside every pool, e.g. after a pool edit).
    pub pool: Option<String>,
    /// Backends as of the last Ensure or Update; identical lists are one shared allocation
    /// (see `intern`).
    pub backends: Arc<[Backend]>,
    /// The digest naming `backends` in the state database (`stored::list_id`).
    pub backends_id: Arc<str>,
}

#[cfg(test)]
impl LbSpec {
    /// Tests: `ns/<name>` (UID `uid-<name>`) of cluster `c1`, IPv4, port 80/TCP to node port
    /// 30080, no requests.
    pub(crate) fn example(name: &str) -> Self {
        LbSpec {
            cluster: "c1".into(),
            uid: format!("uid-{name}"),
            namespace: "ns".into(),
            name: name.into(),
            family: Family::V4,
            requested_ip: None,
            pool: None,
            sharing_key: None,
            ports: vec![PortSpec {
                protocol: Protocol::Tcp,
                port: 80,
                node_port: Some(30080),
            }],
            source_ranges: vec![],
            affinity_timeout: None,
            health: super::spec::HealthPolicy::Cluster,
        }
    }
}

#[cfg(test)]
impl LbRecord {
    /// Tests: [`LbSpec::example`] at `ip` of pool `default`, no backends.
    pub(crate) fn example(name: &str, ip: &str) -> Self {
        LbRecord {
            spec: LbSpec::example(name),
            ip: ip.parse().expect("an example address"),
            pool: Some("default".into()),
            backends: Arc::from([]),
            backends_id: Arc::from(""),
        }
    }
}

/// The address of a deleted Service, kept for its namespace/name until `expires_unix_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    /// Cluster of the deleted Service.
    pub cluster: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID of the deleted Service (for the log).
    pub uid: String,
    /// The held address.
    pub ip: IpAddr,
    /// When the hold ends (Unix milliseconds).
    pub expires_unix_ms: u64,
}

impl Hold {
    fn live(&self, now_ms: u64) -> bool {
        self.expires_unix_ms > now_ms
    }

    fn is_for(&self, spec: &LbSpec) -> bool {
        self.cluster == spec.cluster && self.namespace == spec.namespace && self.name == spec.name
    }
}

/// Database key of a load balancer: cluster name and Service UID (never namespace/name).
pub fn lb_key(cluster: &str, uid: &str) -> String {
    format!("{cluster}/{uid}")
}

/// Database key of a hold: cluster name and the Service's namespace/name.
pub fn hold_key(cluster: &str, namespace: &str, name: &str) -> String {
    format!("{cluster}/{namespace}/{name}")
}

/// What the allocator decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Keep the current address.
    Keep(IpAddr),
    /// Take this address (a new allocation or a move).
    Assign {
        /// The address.
        ip: IpAddr,
        /// Its pool.
        pool: Option<String>,
    },
}

#[cfg(test)]
impl Decision {
    /// The address decided on.
    pub fn ip(&self) -> IpAddr {
        match self {
            Self::Keep(ip) | Self::Assign { ip, .. } => *ip,
        }
    }
}

/// Why no address could be given; the provider turns each into a precise `CpiError`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// The requested address is in no pool.
    #[error("loadBalancerIP {ip} is in no pool (pools: {pools})")]
    NotInAnyPool {
        /// The address.
        ip: IpAddr,
        /// Configured pool names.
        pools: String,
    },
    /// The requested address is not in the requested pool.
    #[error("loadBalancerIP {ip} is in pool {actual}, not in the requested pool {requested}")]
    NotInRequestedPool {
        /// The address.
        ip: IpAddr,
        /// Its pool.
        actual: String,
        /// The pool asked for.
        requested: String,
    },
    /// The requested pool does not exist.
    #[error("no pool named {name:?} (pools: {pools})")]
    UnknownPool {
        /// Name asked for.
        name: String,
        /// Configured pool names.
        pools: String,
    },
    /// No candidate pool has addresses of the family.
    #[error("no {which} has {family} addresses")]
    NoPoolForFamily {
        /// `pool <name>` or `auto-assign pool`.
        which: String,
        /// The family.
        family: Family,
    },
    /// The address belongs to another load balancer.
    #[error("{ip} is used by {owner}")]
    UsedBy {
        /// The address.
        ip: IpAddr,
        /// `namespace/name`, with the cluster when it is another one.
        owner: String,
    },
    /// The address is held for a deleted Service.
    #[error("{ip} is held for deleted Service {owner} for {remaining_s} s more")]
    Held {
        /// The address.
        ip: IpAddr,
        /// `namespace/name` of the deleted Service.
        owner: String,
        /// Seconds until the hold ends.
        remaining_s: u64,
    },
    /// A port of a shared address is already served for another Service.
    #[error("{port}/{} on {ip} is used by {owner}", .protocol.as_str())]
    PortInUse {
        /// The port.
        port: u16,
        /// Its protocol.
        protocol: Protocol,
        /// The shared address.
        ip: IpAddr,
        /// `namespace/name` of the other Service.
        owner: String,
    },
    /// Every candidate pool is full.
    #[error("no free {family} address: {}", .pools.iter().map(|(n, size)| format!("pool {n} has 0 of {size} free")).collect::<Vec<_>>().join(", "))]
    Exhausted {
        /// The family.
        family: Family,
        /// `(pool, size)` of each candidate pool.
        pools: Vec<(String, u128)>,
    },
    /// Moving the address needs replacement, which the caller did not allow.
    #[error(
        "the Service asks for {wanted}, but its load balancer has {current}; moving it needs allow_replacement"
    )]
    ReplacementRequired {
        /// The allocated address.
        current: IpAddr,
        /// What the Service now asks for.
        wanted: String,
    },
}

impl AllocError {
    /// The field of `service` (rooted at the request's `service`) a configuration-only refusal
    /// is about; `None` for refusals caused by other load balancers, holds or capacity.
    pub fn field(&self, service: &Service) -> Option<String> {
        let annotated = |key: &str| {
            service
                .metadata
                .as_ref()
                .and_then(|m| m.annotations.get(key))
                .is_some_and(|v| !v.trim().is_empty())
        };
        let pool_field = || format!("service.metadata.annotations[{POOL_ANNOTATION}]");
        match self {
            Self::NotInAnyPool { .. } | Self::NotInRequestedPool { .. } => Some(
                if service
                    .load_balancer_ip
                    .as_deref()
                    .is_some_and(|v| !v.trim().is_empty())
                {
                    "service.spec.loadBalancerIP".to_string()
                } else {
                    format!("service.metadata.annotations[{IP_ANNOTATION}]")
                },
            ),
            Self::UnknownPool { .. } => Some(pool_field()),
            Self::NoPoolForFamily { .. } if annotated(POOL_ANNOTATION) => Some(pool_field()),
            Self::NoPoolForFamily { .. } => Some("service.spec.ipFamilies".to_string()),
            Self::UsedBy { .. }
            | Self::Held { .. }
            | Self::PortInUse { .. }
            | Self::Exhausted { .. }
            | Self::ReplacementRequired { .. } => None,
        }
    }
}

/// Who holds an address: the allocator asks for the first free one of a pool's addresses, so
/// the provider answers from an index rather than a scan of every load balancer (quadratic in
/// a burst).
pub trait Occupants {
    /// The other load balancers (all clusters, never the caller's own) at `ip`.
    fn at(&self, ip: IpAddr) -> Vec<&LbRecord>;

    /// Whether no other load balancer is at `ip`.
    fn is_free(&self, ip: IpAddr) -> bool {
        self.at(ip).is_empty()
    }

    /// The first of `candidates` that is free and not in `held`: the lowest free address of a
    /// pool, when the candidates are its addresses in order.
    fn first_free(
        &self,
        mut candidates: impl Iterator<Item = IpAddr>,
        held: &HashSet<IpAddr>,
    ) -> Option<IpAddr> {
        candidates.find(|ip| !held.contains(ip) && self.is_free(*ip))
    }
}

impl Occupants for [&LbRecord] {
    fn at(&self, ip: IpAddr) -> Vec<&LbRecord> {
        self.iter().copied().filter(|r| r.ip == ip).collect()
    }
}

/// Everything the allocator looks at.
pub struct AllocInput<'a, O: Occupants + ?Sized> {
    /// Configured pools.
    pub pools: &'a Pools,
    /// Every other load balancer (all clusters), never this Service's own.
    pub others: &'a O,
    /// Every hold.
    pub holds: &'a [&'a Hold],
    /// The request.
    pub spec: &'a LbSpec,
    /// This Service's current address, if it has a load balancer.
    pub current: Option<IpAddr>,
    /// Whether the address may move.
    pub allow_replacement: bool,
    /// Wall-clock time, Unix milliseconds.
    pub now_ms: u64,
}

/// What the Service asks for that its current address `current` does not satisfy (the
/// requested address, the named pool, the family), if anything: moving there replaces the load
/// balancer.
pub fn replacement_wanted(pools: &Pools, spec: &LbSpec, current: IpAddr) -> Option<String> {
    match (spec.requested_ip, spec.pool.as_deref()) {
        (Some(ip), _) if ip != current => Some(ip.to_string()),
        (None, Some(name)) => pools
            .get(name)
            .filter(|p| !p.contains(current))
            .map(|p| format!("pool {}", p.name)),
        _ if Family::of(current) != spec.family => Some(format!("an {} address", spec.family)),
        _ => None,
    }
}

/// The pool a requested address comes from: the pool holding it, which must be the named pool
/// when the Service names one.
fn requested_pool<'a>(pools: &'a Pools, spec: &LbSpec, ip: IpAddr) -> Result<&'a Pool, AllocError> {
    let pool = pools.pool_of(ip).ok_or_else(|| AllocError::NotInAnyPool {
        ip,
        pools: pools.names(),
    })?;
    if let Some(requested) = spec.pool.as_deref()
        && requested != pool.name
    {
        if pools.get(requested).is_none() {
            return Err(unknown_pool(pools, requested));
        }
        return Err(AllocError::NotInRequestedPool {
            ip,
            actual: pool.name.clone(),
            requested: requested.to_string(),
        });
    }
    Ok(pool)
}

/// The pools an address may be picked from when none is requested: the named pool, else every
/// auto-assign pool; only those with addresses of the Service's family.
fn candidate_pools<'a>(pools: &'a Pools, spec: &LbSpec) -> Result<Vec<&'a Pool>, AllocError> {
    let candidates: Vec<_> = match spec.pool.as_deref() {
        Some(name) => vec![pools.get(name).ok_or_else(|| unknown_pool(pools, name))?],
        None => pools.iter().filter(|p| p.auto_assign).collect(),
    };
    let candidates: Vec<_> = candidates
        .into_iter()
        .filter(|p| p.size(Some(spec.family)) > 0)
        .collect();
    if candidates.is_empty() {
        return Err(AllocError::NoPoolForFamily {
            which: spec
                .pool
                .as_ref()
                .map_or_else(|| "auto-assign pool".to_string(), |n| format!("pool {n}")),
            family: spec.family,
        });
    }
    Ok(candidates)
}

/// The allocation rules that depend on the configuration alone, never on other load balancers:
/// the named pool exists, a requested address lies in a pool (the named one, if any), and a
/// candidate pool has addresses of the Service's family. Every broken rule, each once, as
/// [`decide`] would report it. `address_read: false` (the address or family was unreadable)
/// checks the pool name only.
pub fn check_pools(pools: &Pools, spec: &LbSpec, address_read: bool) -> Vec<AllocError> {
    let mut broken = Vec::new();
    if let Some(name) = spec.pool.as_deref()
        && pools.get(name).is_none()
    {
        broken.push(unknown_pool(pools, name));
    }
    if address_read {
        let rule = match spec.requested_ip {
            Some(ip) => requested_pool(pools, spec, ip).map(|_| ()),
            None => candidate_pools(pools, spec).map(|_| ()),
        };
        if let Err(err) = rule
            && !broken.contains(&err)
        {
            broken.push(err);
        }
    }
    broken
}

/// Decides the Service's address.
pub fn decide(input: &AllocInput<'_, impl Occupants + ?Sized>) -> Result<Decision, AllocError> {
    let spec = input.spec;
    if let Some(current) = input.current {
        match replacement_wanted(input.pools, spec, current) {
            None => {
                check_sharing(current, input)?;
                return Ok(Decision::Keep(current));
            }
            Some(wanted) if !input.allow_replacement => {
                return Err(AllocError::ReplacementRequired { current, wanted });
            }
            Some(_) => {}
        }
    }

    if let Some(ip) = spec.requested_ip {
        let pool = requested_pool(input.pools, spec, ip)?;
        check_held(ip, input)?;
        check_sharing(ip, input)?;
        return Ok(Decision::Assign {
            ip,
            pool: Some(pool.name.clone()),
        });
    }

    // Delete-and-recreate within the grace period: the same namespace/name gets its address.
    if let Some(hold) = input
        .holds
        .iter()
        .find(|h| h.is_for(spec) && h.live(input.now_ms) && Family::of(h.ip) == spec.family)
    {
        let pool = input.pools.pool_of(hold.ip);
        let pool_ok = spec
            .pool
            .as_deref()
            .is_none_or(|name| pool.is_some_and(|p| p.name == name));
        if pool_ok && check_sharing(hold.ip, input).is_ok() {
            return Ok(Decision::Assign {
                ip: hold.ip,
                pool: pool.map(|p| p.name.clone()),
            });
        }
    }

    let candidates = candidate_pools(input.pools, spec)?;
    let held: HashSet<IpAddr> = input
        .holds
        .iter()
        .filter(|h| h.live(input.now_ms))
        .map(|h| h.ip)
        .collect();
    for pool in &candidates {
        if let Some(ip) = input.others.first_free(pool.addresses(spec.family), &held) {
            return Ok(Decision::Assign {
                ip,
                pool: Some(pool.name.clone()),
            });
        }
    }
    Err(AllocError::Exhausted {
        family: spec.family,
        pools: candidates
            .iter()
            .map(|p| (p.name.clone(), p.size(Some(spec.family))))
            .collect(),
    })
}

fn unknown_pool(pools: &Pools, name: &str) -> AllocError {
    AllocError::UnknownPool {
        name: name.to_string(),
        pools: pools.names(),
    }
}

/// Refuses an address held for another deleted Service.
fn check_held(
    ip: IpAddr,
    input: &AllocInput<'_, impl Occupants + ?Sized>,
) -> Result<(), AllocError> {
    match input
        .holds
        .iter()
        .find(|h| h.ip == ip && h.live(input.now_ms) && !h.is_for(input.spec))
    {
        Some(hold) => Err(AllocError::Held {
            ip,
            owner: format!("{}/{}", hold.namespace, hold.name),
            remaining_s: (hold.expires_unix_ms - input.now_ms).div_ceil(1000),
        }),
        None => Ok(()),
    }
}

/// Refuses an address used by another load balancer, unless both carry the same sharing key
/// (same cluster) and no port/protocol is served twice.
fn check_sharing(
    ip: IpAddr,
    input: &AllocInput<'_, impl Occupants + ?Sized>,
) -> Result<(), AllocError> {
    let spec = input.spec;
    for other in input.others.at(ip) {
        let owner = if other.spec.cluster == spec.cluster {
            other.spec.service_name()
        } else {
            format!(
                "{} of cluster {}",
                other.spec.service_name(),
                other.spec.cluster
            )
        };
        let shared = other.spec.cluster == spec.cluster
            && spec.sharing_key.is_some()
            && other.spec.sharing_key == spec.sharing_key;
        if !shared {
            return Err(AllocError::UsedBy { ip, owner });
        }
        if let Some(port) = spec.ports.iter().find(|p| clashes(p, &other.spec.ports)) {
            return Err(AllocError::PortInUse {
                port: port.port,
                protocol: port.protocol,
                ip,
                owner,
            });
        }
    }
    Ok(())
}

fn clashes(port: &PortSpec, others: &[PortSpec]) -> bool {
    others
        .iter()
        .any(|o| o.port == port.port && o.protocol == port.protocol)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::lb::pool::PoolSpec;

    const NOW: u64 = 1_000_000;

    fn pools() -> Pools {
        Pools::new(vec![
            PoolSpec {
                name: "default".into(),
                addresses: vec!["127.0.100.1-127.0.100.3".into()],
                auto_assign: true,
            },
            PoolSpec {
                name: "blue".into(),
                addresses: vec!["127.0.101.0/30".into(), "fd00::1-fd00::2".into()],
                auto_assign: false,
            },
        ])
        .unwrap()
    }

    fn spec(name: &str) -> LbSpec {
        LbSpec::example(name)
    }

    fn record(name: &str, ip: &str) -> LbRecord {
        LbRecord::example(name, ip)
    }

    fn hold(name: &str, ip: &str, expires: u64) -> Hold {
        Hold {
            cluster: "c1".into(),
            namespace: "ns".into(),
            name: name.into(),
            uid: format!("old-{name}"),
            ip: ip.parse().unwrap(),
            expires_unix_ms: expires,
        }
    }

    struct Case {
        name: &'static str,
        spec: LbSpec,
        others: Vec<LbRecord>,
        holds: Vec<Hold>,
        current: Option<&'static str>,
        allow_replacement: bool,
        want: Result<&'static str, &'static str>,
    }

    fn case(name: &'static str, spec: LbSpec) -> Case {
        Case {
            name,
            spec,
            others: vec![],
            holds: vec![],
            current: None,
            allow_replacement: false,
            want: Ok(""),
        }
    }

    fn run(c: &Case) -> Result<Decision, AllocError> {
        let pools = pools();
        let others: Vec<&LbRecord> = c.others.iter().collect();
        let holds: Vec<&Hold> = c.holds.iter().collect();
        decide(&AllocInput {
            pools: &pools,
            others: others.as_slice(),
            holds: &holds,
            spec: &c.spec,
            current: c.current.map(|ip| ip.parse().unwrap()),
            allow_replacement: c.allow_replacement,
            now_ms: NOW,
        })
    }

    #[test]
    fn allocation_table() {
        let requested = |ip: &str| {
            let mut s = spec("web");
            s.requested_ip = Some(ip.parse().unwrap());
            s
        };
        let in_pool = |pool: &str| {
            let mut s = spec("web");
            s.pool = Some(pool.into());
            s
        };
        let shared = |name: &str, port: u16, protocol: Protocol| {
            let mut s = spec(name);
            s.sharing_key = Some("dns".into());
            s.requested_ip = Some("127.0.100.1".parse().unwrap());
            s.ports[0].port = port;
            s.ports[0].protocol = protocol;
            s
        };
        let cases = vec![
            Case {
                want: Ok("127.0.100.1"),
                ..case("first address of the default pool", spec("web"))
            },
            Case {
                others: vec![record("a", "127.0.100.1")],
                holds: vec![hold("gone", "127.0.100.2", NOW + 1)],
                want: Ok("127.0.100.3"),
                ..case("skips used and held addresses", spec("web"))
            },
            Case {
                holds: vec![hold("gone", "127.0.100.1", NOW)],
                want: Ok("127.0.100.1"),
                ..case("an expired hold frees its address", spec("web"))
            },
            Case {
                others: vec![
                    record("a", "127.0.100.1"),
                    record("b", "127.0.100.2"),
                    record("c", "127.0.100.3"),
                ],
                want: Err("no free IPv4 address: pool default has 0 of 3 free"),
                ..case("exhausted", spec("web"))
            },
            Case {
                want: Ok("127.0.100.2"),
                ..case("requested address when free", requested("127.0.100.2"))
            },
            Case {
                others: vec![record("other", "127.0.100.2")],
                want: Err("127.0.100.2 is used by ns/other"),
                ..case("requested address taken", requested("127.0.100.2"))
            },
            Case {
                want: Err("loadBalancerIP 10.9.9.9 is in no pool (pools: default, blue)"),
                ..case("requested address outside pools", requested("10.9.9.9"))
            },
            Case {
                holds: vec![hold("gone", "127.0.100.2", NOW + 5_500)],
                want: Err("127.0.100.2 is held for deleted Service ns/gone for 6 s more"),
                ..case(
                    "requested address held for another",
                    requested("127.0.100.2"),
                )
            },
            Case {
                want: Ok("127.0.101.1"),
                ..case("pool annotation", in_pool("blue"))
            },
            Case {
                want: Err("no pool named \"red\" (pools: default, blue)"),
                ..case("unknown pool", in_pool("red"))
            },
            Case {
                holds: vec![hold("web", "127.0.100.3", NOW + 1)],
                want: Ok("127.0.100.3"),
                ..case("recreated Service gets its held address", spec("web"))
            },
            Case {
                current: Some("10.200.0.1"),
                want: Ok("10.200.0.1"),
                ..case("an allocation outside every pool is kept", spec("web"))
            },
            Case {
                current: Some("127.0.100.1"),
                want: Err(
                    "the Service asks for 127.0.100.2, but its load balancer has 127.0.100.1; moving it needs allow_replacement",
                ),
                ..case("moving needs replacement", requested("127.0.100.2"))
            },
            Case {
                current: Some("127.0.100.1"),
                allow_replacement: true,
                want: Ok("127.0.100.2"),
                ..case("moving with replacement allowed", requested("127.0.100.2"))
            },
            Case {
                others: vec![LbRecord {
                    spec: shared("dns-tcp", 53, Protocol::Tcp),
                    ..record("dns-tcp", "127.0.100.1")
                }],
                want: Ok("127.0.100.1"),
                ..case(
                    "same sharing key, other protocol",
                    shared("dns-udp", 53, Protocol::Udp),
                )
            },
            Case {
                others: vec![LbRecord {
                    spec: shared("dns-a", 53, Protocol::Udp),
                    ..record("dns-a", "127.0.100.1")
                }],
                want: Err("53/UDP on 127.0.100.1 is used by ns/dns-a"),
                ..case(
                    "same sharing key, same port",
                    shared("dns-b", 53, Protocol::Udp),
                )
            },
            Case {
                others: vec![LbRecord {
                    spec: LbSpec {
                        cluster: "c2".into(),
                        ..spec("web")
                    },
                    ..record("web", "127.0.100.1")
                }],
                want: Err("127.0.100.1 is used by ns/web of cluster c2"),
                ..case(
                    "another cluster's address is never taken",
                    requested("127.0.100.1"),
                )
            },
            Case {
                want: Err("no pool default has IPv6 addresses"),
                ..case("family without addresses", {
                    let mut s = in_pool("blue");
                    s.family = Family::V6;
                    s.pool = Some("default".into());
                    s
                })
            },
        ];
        for c in cases {
            let got = run(&c)
                .map(|d| d.ip().to_string())
                .map_err(|e| e.to_string());
            match (&got, &c.want) {
                (Ok(ip), Ok(want)) => assert_eq!(ip, want, "{}", c.name),
                (Err(err), Err(want)) => assert_eq!(err, want, "{}", c.name),
                _ => panic!("{}: got {got:?}, want {:?}", c.name, c.want),
            }
        }
    }
}
