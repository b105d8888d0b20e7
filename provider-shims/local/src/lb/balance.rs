//! Backend choice and health transitions, decided without IO.
//!
//! Health: a backend goes down after `down_after` consecutive failed probes and up after
//! `up_after` consecutive successes; before its first verdict it is `Unknown`.
//!
//! Choice: the candidates are the healthy backends; when none is healthy, the not-yet-probed
//! ones; when none of those either, every backend (failing open beats refusing every client
//! when the probes, not the backends, are broken). Without affinity the candidates are taken
//! round-robin; with `ClientIP` affinity a client keeps its backend while that stays a
//! candidate and the affinity entry is fresh, else it gets the candidate with the highest
//! rendezvous hash of (client, backend), so the mapping survives restarts and changes only for
//! the clients of a backend that went away. The rest of the order is where a failed connect
//! goes next.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use tokio::time::Instant;

/// A backend's health as seen by the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Health {
    /// Not probed to a verdict yet.
    #[default]
    Unknown,
    /// Healthy.
    Up,
    /// Unhealthy.
    Down,
}

/// Probe thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// Consecutive failures that take a backend down.
    pub down_after: u32,
    /// Consecutive successes that bring it up.
    pub up_after: u32,
}

/// The probe history of one target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HealthState {
    /// Current verdict.
    pub health: Health,
    /// Consecutive failures so far.
    pub failures: u32,
    /// Consecutive successes so far.
    pub successes: u32,
}

impl HealthState {
    /// The state after one probe result.
    pub fn observe(self, ok: bool, t: Thresholds) -> Self {
        if ok {
            let successes = self.successes.saturating_add(1);
            let health = if successes >= t.up_after {
                Health::Up
            } else {
                self.health
            };
            Self {
                health,
                failures: 0,
                successes,
            }
        } else {
            let failures = self.failures.saturating_add(1);
            let health = if failures >= t.down_after {
                Health::Down
            } else {
                self.health
            };
            Self {
                health,
                failures,
                successes: 0,
            }
        }
    }
}

/// The health of a `Cluster`-policy backend, from its kube-proxy check and its node-port
/// fallback check (when one is registered).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterHealth {
    /// Use this verdict.
    Known(Health),
    /// kube-proxy refuses connections and no fallback check exists yet for this node port:
    /// register one (lazily, so nodes whose kube-proxy answers cost one check, not one per
    /// node port) and treat the backend as not yet probed meanwhile.
    RegisterFallback,
}

/// Decides a `Cluster`-policy backend's health: kube-proxy's verdict while its port accepts
/// connections, else the TCP-connect fallback's on the node port.
pub fn cluster_health(
    kube_proxy: Health,
    kube_proxy_refused: bool,
    fallback: Option<Health>,
) -> ClusterHealth {
    match (kube_proxy_refused, fallback) {
        (false, _) => ClusterHealth::Known(kube_proxy),
        (true, Some(fallback)) => ClusterHealth::Known(fallback),
        (true, None) => ClusterHealth::RegisterFallback,
    }
}

/// 64-bit FNV-1a with a final mix: stable across builds and platforms, unlike std's hasher.
fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64 finaliser: FNV's low bits alone spread poorly.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// How the first backend is picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// Round-robin: the `n`th connection.
    RoundRobin(usize),
    /// `ClientIP` affinity for this client, pinned to a backend address when it has a fresh
    /// entry.
    Affinity {
        /// The client.
        client: IpAddr,
        /// The backend its fresh affinity entry names.
        pinned: Option<IpAddr>,
    },
}

/// The order in which to try `backends` (given as `(address, health)`), as indices.
pub fn connect_order(backends: &[(IpAddr, Health)], pick: Pick) -> Vec<usize> {
    let with = |h: Health| -> Vec<usize> {
        (0..backends.len())
            .filter(|i| backends[*i].1 == h)
            .collect()
    };
    let mut candidates = with(Health::Up);
    if candidates.is_empty() {
        candidates = with(Health::Unknown);
    }
    if candidates.is_empty() {
        candidates = (0..backends.len()).collect();
    }
    let mut order = match pick {
        Pick::RoundRobin(n) => {
            if !candidates.is_empty() {
                let k = n % candidates.len();
                candidates.rotate_left(k);
            }
            candidates.clone()
        }
        Pick::Affinity { client, pinned } => {
            let client = ip_bytes(client);
            let mut ranked = candidates.clone();
            ranked.sort_by_key(|i| {
                std::cmp::Reverse(stable_hash(&[&client, &ip_bytes(backends[*i].0)]))
            });
            if let Some(pos) = pinned.and_then(|p| ranked.iter().position(|i| backends[*i].0 == p))
            {
                let first = ranked.remove(pos);
                ranked.insert(0, first);
            }
            ranked
        }
    };
    // A connect that failed on every candidate still tries the others (unknown first).
    for h in [Health::Unknown, Health::Down, Health::Up] {
        for i in with(h) {
            if !order.contains(&i) {
                order.push(i);
            }
        }
    }
    order
}

/// `ClientIP` affinity entries: client → (backend, last use).
#[derive(Debug, Default)]
pub struct AffinityTable {
    entries: HashMap<IpAddr, (IpAddr, Instant)>,
}

/// Entries above which a lookup first drops the expired ones.
const AFFINITY_PRUNE_AT: usize = 4096;

impl AffinityTable {
    /// The client's backend when its entry is younger than `timeout`.
    pub fn get(&self, client: IpAddr, timeout: Duration, now: Instant) -> Option<IpAddr> {
        self.entries
            .get(&client)
            .filter(|(_, at)| now.saturating_duration_since(*at) < timeout)
            .map(|(backend, _)| *backend)
    }

    /// Records that `client` was sent to `backend` at `now`.
    pub fn put(&mut self, client: IpAddr, backend: IpAddr, timeout: Duration, now: Instant) {
        if self.entries.len() >= AFFINITY_PRUNE_AT {
            self.entries
                .retain(|_, (_, at)| now.saturating_duration_since(*at) < timeout);
        }
        self.entries.insert(client, (backend, now));
    }

    /// Number of entries.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds {
        down_after: 2,
        up_after: 1,
    };

    #[test]
    fn health_transitions() {
        use Health::*;
        // (name, start, probe results, expected verdict)
        let cases: &[(&str, Health, &[bool], Health)] = &[
            ("first success brings it up", Unknown, &[true], Up),
            ("one failure is not enough", Up, &[false], Up),
            ("two failures take it down", Up, &[false, false], Down),
            (
                "a success in between resets the count",
                Up,
                &[false, true, false],
                Up,
            ),
            ("one success brings it back", Down, &[true], Up),
            (
                "unknown stays unknown after one failure",
                Unknown,
                &[false],
                Unknown,
            ),
            (
                "unknown goes down after two",
                Unknown,
                &[false, false],
                Down,
            ),
        ];
        for (name, start, results, want) in cases {
            let mut s = HealthState {
                health: *start,
                ..HealthState::default()
            };
            for ok in *results {
                s = s.observe(*ok, T);
            }
            assert_eq!(s.health, *want, "{name}");
        }
        let slow = Thresholds {
            down_after: 3,
            up_after: 2,
        };
        let s = HealthState::default().observe(true, slow);
        assert_eq!(s.health, Unknown, "up_after 2 needs two successes");
        assert_eq!(s.observe(true, slow).health, Up);
    }

    #[test]
    fn the_node_port_fallback_is_needed_only_while_kube_proxy_refuses() {
        use Health::*;
        let cases: &[(&str, Health, bool, Option<Health>, ClusterHealth)] = &[
            (
                "kube-proxy answers: its verdict, no fallback",
                Up,
                false,
                None,
                ClusterHealth::Known(Up),
            ),
            (
                "kube-proxy answers unhealthy: its verdict, a fallback is ignored",
                Down,
                false,
                Some(Up),
                ClusterHealth::Known(Down),
            ),
            (
                "kube-proxy refuses, no fallback yet: register one",
                Down,
                true,
                None,
                ClusterHealth::RegisterFallback,
            ),
            (
                "kube-proxy refuses: the fallback's verdict",
                Down,
                true,
                Some(Up),
                ClusterHealth::Known(Up),
            ),
        ];
        for (name, kube_proxy, refused, fallback, want) in cases {
            assert_eq!(
                cluster_health(*kube_proxy, *refused, *fallback),
                *want,
                "{name}"
            );
        }
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 1, 0, last])
    }

    #[test]
    fn connect_order_table() {
        use Health::*;
        let cases: &[(&str, &[Health], usize, &[usize])] = &[
            (
                "round robin over healthy, then the rest",
                &[Up, Down, Up],
                1,
                &[2, 0, 1],
            ),
            (
                "down backends get nothing first",
                &[Down, Up, Up],
                0,
                &[1, 2, 0],
            ),
            (
                "unknown used when none is up",
                &[Unknown, Down, Unknown],
                1,
                &[2, 0, 1],
            ),
            ("all down fails open", &[Down, Down], 1, &[1, 0]),
            ("no backends", &[], 3, &[]),
        ];
        for (name, health, n, want) in cases {
            let backends: Vec<_> = health
                .iter()
                .enumerate()
                .map(|(i, h)| (ip(i as u8 + 1), *h))
                .collect();
            assert_eq!(
                connect_order(&backends, Pick::RoundRobin(*n)),
                want.to_vec(),
                "{name}"
            );
        }
    }

    #[test]
    fn affinity_is_consistent_and_pinned() {
        use Health::*;
        let all: Vec<_> = (1..=5).map(|i| (ip(i), Up)).collect();
        let client: IpAddr = "127.0.0.9".parse().unwrap();
        let pick = Pick::Affinity {
            client,
            pinned: None,
        };
        let first = connect_order(&all, pick)[0];
        // Same answer every time, and after an unrelated backend goes away.
        assert_eq!(connect_order(&all, pick)[0], first);
        let mut fewer = all.clone();
        let other = (first + 1) % all.len();
        fewer[other].1 = Down;
        assert_eq!(connect_order(&fewer, pick)[0], first);
        // Its backend down: another one, the same for every call.
        let mut down = all.clone();
        down[first].1 = Down;
        let second = connect_order(&down, pick)[0];
        assert_ne!(second, first);
        assert_eq!(connect_order(&down, pick)[0], second);
        // A fresh pin wins over the hash while the backend is a candidate.
        let pinned = Pick::Affinity {
            client,
            pinned: Some(all[other].0),
        };
        assert_eq!(connect_order(&all, pinned)[0], other);
        // Different clients spread over the backends.
        let spread: std::collections::HashSet<usize> = (0..64u8)
            .map(|c| {
                connect_order(
                    &all,
                    Pick::Affinity {
                        client: IpAddr::from([10, 0, 0, c]),
                        pinned: None,
                    },
                )[0]
            })
            .collect();
        assert!(spread.len() >= 4, "{spread:?}");
    }

    #[test]
    fn affinity_entries_expire() {
        let mut t = AffinityTable::default();
        let now = Instant::now();
        let timeout = Duration::from_secs(10);
        t.put(ip(1), ip(2), timeout, now);
        assert_eq!(
            t.get(ip(1), timeout, now + Duration::from_secs(9)),
            Some(ip(2))
        );
        assert_eq!(t.get(ip(1), timeout, now + Duration::from_secs(10)), None);
        assert_eq!(t.len(), 1);
    }
}
