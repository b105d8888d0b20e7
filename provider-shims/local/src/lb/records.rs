//! The load balancers by key, indexed by address. Allocation walks the index in address order
//! for a pool's lowest free address, and the pool gauges count distinct addresses: with the
//! index neither scans every load balancer per call (quadratic in a burst of creations).

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use super::alloc::{Hold, LbRecord, Occupants};
use super::pool::Pools;

/// What the pool gauges show (see [`Records::pool_usage`]).
#[derive(Debug, PartialEq, Eq)]
pub struct PoolUsage {
    /// Per pool, in configuration order: distinct addresses used by load balancers or live
    /// holds.
    pub used: Vec<i64>,
    /// Load balancers whose address is in no pool (after a pool edit).
    pub outside: i64,
}

/// Load balancers by key, with the keys at each address and how many name each backend list.
#[derive(Debug, Default)]
pub struct Records {
    by_key: HashMap<String, LbRecord>,
    /// Keys by address, in address order (so the lowest free address of a range is one walk);
    /// more than one only for Services sharing an address.
    by_ip: BTreeMap<IpAddr, Vec<String>>,
    /// Records naming each stored backend list: a list is stored with its first record and
    /// removed with its last.
    lists: HashMap<Arc<str>, usize>,
}

impl Records {
    /// The load balancer of `key`.
    pub fn get(&self, key: &str) -> Option<&LbRecord> {
        self.by_key.get(key)
    }

    /// Whether `key` has a load balancer.
    pub fn contains_key(&self, key: &str) -> bool {
        self.by_key.contains_key(key)
    }

    /// How many load balancers there are.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Every load balancer with its key, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &LbRecord)> {
        self.by_key.iter()
    }

    /// Whether a record names the backend list `id`.
    pub fn names_list(&self, id: &str) -> bool {
        self.lists.contains_key(id)
    }

    /// Every address in use, each once, with how many load balancers share it.
    pub fn by_address(&self) -> impl Iterator<Item = (IpAddr, usize)> + '_ {
        self.by_ip.iter().map(|(ip, keys)| (*ip, keys.len()))
    }

    /// The pool gauges' figures, at `now_ms`: the index's addresses are distinct already, so
    /// only the (few) live holds need a set.
    pub fn pool_usage<'a>(
        &self,
        pools: &Pools,
        holds: impl Iterator<Item = &'a Hold>,
        now_ms: u64,
    ) -> PoolUsage {
        // The first pool holding an address is its pool (as `Pools::pool_of`).
        let position = |ip: IpAddr| pools.iter().position(|p| p.contains(ip));
        let mut usage = PoolUsage {
            used: vec![0; pools.iter().count()],
            outside: 0,
        };
        for (ip, load_balancers) in self.by_address() {
            match position(ip) {
                Some(i) => usage.used[i] += 1,
                None => usage.outside += load_balancers as i64,
            }
        }
        let held: HashSet<IpAddr> = holds
            .filter(|h| h.expires_unix_ms > now_ms && !self.is_occupied(h.ip))
            .map(|h| h.ip)
            .collect();
        for i in held.into_iter().filter_map(position) {
            usage.used[i] += 1;
        }
        usage
    }

    /// Whether a load balancer is at `ip`.
    pub fn is_occupied(&self, ip: IpAddr) -> bool {
        self.by_ip.contains_key(&ip)
    }

    /// Sets the load balancer of `key`, returning the one it replaces.
    pub fn insert(&mut self, key: String, record: LbRecord) -> Option<LbRecord> {
        let ip = record.ip;
        *self
            .lists
            .entry(Arc::clone(&record.backends_id))
            .or_default() += 1;
        let previous = self.by_key.insert(key.clone(), record);
        if let Some(old) = &previous {
            self.release(&old.backends_id);
        }
        match &previous {
            Some(old) if old.ip == ip => {}
            Some(old) => {
                self.unindex(old.ip, &key);
                self.by_ip.entry(ip).or_default().push(key);
            }
            None => self.by_ip.entry(ip).or_default().push(key),
        }
        previous
    }

    /// Removes the load balancer of `key`.
    pub fn remove(&mut self, key: &str) -> Option<LbRecord> {
        let removed = self.by_key.remove(key)?;
        self.unindex(removed.ip, key);
        self.release(&removed.backends_id);
        Some(removed)
    }

    /// The load balancers other than `own`'s, as the allocator sees them.
    pub fn others<'a>(&'a self, own: &'a str) -> Others<'a> {
        Others { records: self, own }
    }

    fn release(&mut self, list: &str) {
        if let Some(count) = self.lists.get_mut(list) {
            *count -= 1;
            if *count == 0 {
                self.lists.remove(list);
            }
        }
    }

    fn unindex(&mut self, ip: IpAddr, key: &str) {
        if let Entry::Occupied(mut at) = self.by_ip.entry(ip) {
            at.get_mut().retain(|k| k != key);
            if at.get().is_empty() {
                at.remove();
            }
        }
    }
}

impl FromIterator<(String, LbRecord)> for Records {
    fn from_iter<I: IntoIterator<Item = (String, LbRecord)>>(iter: I) -> Self {
        let mut records = Self::default();
        for (key, record) in iter {
            records.insert(key, record);
        }
        records
    }
}

/// Every load balancer but one Service's own.
pub struct Others<'a> {
    records: &'a Records,
    own: &'a str,
}

impl Occupants for Others<'_> {
    fn at(&self, ip: IpAddr) -> Vec<&LbRecord> {
        self.records
            .by_ip
            .get(&ip)
            .into_iter()
            .flatten()
            .filter(|key| key.as_str() != self.own)
            .filter_map(|key| self.records.by_key.get(key))
            .collect()
    }

    fn is_free(&self, ip: IpAddr) -> bool {
        self.records
            .by_ip
            .get(&ip)
            .is_none_or(|keys| keys.iter().all(|key| key == self.own))
    }

    /// Walks the address index alongside the candidates: a step per taken address instead of
    /// a lookup per candidate. A candidate below the one before (a pool's next range) starts
    /// the walk again from there.
    fn first_free(
        &self,
        candidates: impl Iterator<Item = IpAddr>,
        held: &HashSet<IpAddr>,
    ) -> Option<IpAddr> {
        // Only the caller's own address can be free while indexed, so the walk compares keys
        // there alone; elsewhere a step reads nothing but the index (no key strings).
        let own_ip = self.records.by_key.get(self.own).map(|own| own.ip);
        let taken_from = |ip: IpAddr| {
            self.records
                .by_ip
                .range(ip..)
                .filter(move |(ip, keys)| {
                    Some(**ip) != own_ip || keys.iter().any(|key| key != self.own)
                })
                .map(|(ip, _)| *ip)
                .peekable()
        };
        let mut walk: Option<(IpAddr, std::iter::Peekable<_>)> = None;
        for ip in candidates {
            let taken = match &mut walk {
                Some((last, taken)) if *last < ip => {
                    *last = ip;
                    taken
                }
                _ => &mut walk.insert((ip, taken_from(ip))).1,
            };
            while taken.next_if(|t| *t < ip).is_some() {}
            if taken.peek() != Some(&ip) && !held.contains(&ip) {
                return Some(ip);
            }
        }
        None
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn record(name: &str, ip: &str) -> LbRecord {
        LbRecord {
            backends_id: Arc::from(format!("list-{name}")),
            ..LbRecord::example(name, ip)
        }
    }

    fn names_at(records: &Records, own: &str, ip: &str) -> Vec<String> {
        let mut names: Vec<String> = records
            .others(own)
            .at(ip.parse().unwrap())
            .iter()
            .map(|r| r.spec.name.clone())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn the_index_follows_inserts_moves_and_removals() {
        let mut records = Records::default();
        records.insert("c1/a".into(), record("a", "10.0.0.1"));
        records.insert("c1/b".into(), record("b", "10.0.0.1"));
        records.insert("c1/c".into(), record("c", "10.0.0.2"));
        assert_eq!(names_at(&records, "", "10.0.0.1"), vec!["a", "b"]);
        // A Service never occupies its own address.
        assert_eq!(names_at(&records, "c1/a", "10.0.0.1"), vec!["b"]);
        assert!(!records.others("c1/a").is_free("10.0.0.1".parse().unwrap()));
        assert!(records.others("c1/c").is_free("10.0.0.2".parse().unwrap()));
        assert!(records.others("").is_free("10.0.0.9".parse().unwrap()));

        // A move leaves the old address.
        records.insert("c1/b".into(), record("b", "10.0.0.3"));
        assert_eq!(names_at(&records, "", "10.0.0.1"), vec!["a"]);
        assert_eq!(names_at(&records, "", "10.0.0.3"), vec!["b"]);

        // A replacement at the same address is indexed once.
        records.insert("c1/a".into(), record("a", "10.0.0.1"));
        assert_eq!(names_at(&records, "", "10.0.0.1"), vec!["a"]);

        records.remove("c1/a");
        assert!(names_at(&records, "", "10.0.0.1").is_empty());
        let mut in_use: Vec<(IpAddr, usize)> = records.by_address().collect();
        in_use.sort();
        assert_eq!(
            in_use,
            vec![
                ("10.0.0.2".parse::<IpAddr>().unwrap(), 1),
                ("10.0.0.3".parse().unwrap(), 1)
            ]
        );
        assert!(records.is_occupied("10.0.0.2".parse().unwrap()));
        assert!(!records.is_occupied("10.0.0.1".parse().unwrap()));
        assert_eq!(records.len(), 2);
        assert!(records.remove("c1/a").is_none());
    }

    #[test]
    fn first_free_is_the_first_candidate_no_other_load_balancer_or_hold_has() {
        let ip = |last: u8| IpAddr::from([10, 0, 0, last]);
        let mut records = Records::default();
        records.insert("c1/a".into(), record("a", "10.0.0.1"));
        records.insert("c1/b".into(), record("b", "10.0.0.2"));
        records.insert("c1/own".into(), record("own", "10.0.0.3"));
        records.insert("c1/c".into(), record("c", "10.0.0.4"));
        let range = |from: u8, to: u8| (from..=to).map(ip);
        let none = HashSet::new();
        // A Service's own address is free to it.
        assert_eq!(
            records.others("c1/own").first_free(range(1, 8), &none),
            Some(ip(3))
        );
        assert_eq!(
            records.others("").first_free(range(1, 8), &none),
            Some(ip(5))
        );
        let held: HashSet<IpAddr> = [ip(5), ip(6)].into();
        assert_eq!(
            records.others("").first_free(range(1, 8), &held),
            Some(ip(7))
        );
        assert_eq!(records.others("").first_free(range(1, 4), &none), None);
        // A pool's ranges in configuration order, the later one lower.
        assert_eq!(
            records
                .others("")
                .first_free(range(4, 4).chain(range(1, 8)), &none),
            Some(ip(5))
        );
    }

    #[test]
    fn first_free_walk_agrees_with_a_lookup_per_candidate() {
        // Pseudo-random load balancers, holds and two ranges in either order, checked against
        // the trait's default (one `is_free` per candidate).
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = |below: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % below
        };
        for case in 0..300 {
            let mut records = Records::default();
            let ip = |last: u64| IpAddr::from([10, 0, 0, last as u8]);
            for n in 0..next(14) {
                let at = ip(next(16));
                records.insert(
                    format!("c1/s{n}"),
                    record(&format!("s{n}"), &at.to_string()),
                );
            }
            let held: HashSet<IpAddr> = (0..next(4)).map(|_| ip(next(16))).collect();
            let own = format!("c1/s{}", next(14));
            let (a, b) = (next(16), next(16));
            let (c, d) = (next(16), next(16));
            let candidates = || (a.min(b)..=a.max(b)).chain(c.min(d)..=c.max(d)).map(ip);
            let others = records.others(&own);
            let expected = candidates().find(|ip| !held.contains(ip) && others.is_free(*ip));
            assert_eq!(
                others.first_free(candidates(), &held),
                expected,
                "case {case}"
            );
        }
    }

    #[test]
    fn pool_usage_counts_each_address_once_and_live_holds_only() {
        use crate::lb::pool::PoolSpec;
        let pools = Pools::new(vec![
            PoolSpec {
                name: "a".into(),
                addresses: vec!["10.0.0.0/30".into()],
                auto_assign: true,
            },
            PoolSpec {
                name: "b".into(),
                addresses: vec!["10.0.1.0/30".into()],
                auto_assign: false,
            },
        ])
        .unwrap();
        let mut records = Records::default();
        // Two Services sharing 10.0.0.1, one on 10.0.1.1, two outside every pool.
        records.insert("c1/a".into(), record("a", "10.0.0.1"));
        records.insert("c1/b".into(), record("b", "10.0.0.1"));
        records.insert("c1/c".into(), record("c", "10.0.1.1"));
        records.insert("c1/d".into(), record("d", "192.0.2.1"));
        records.insert("c1/e".into(), record("e", "192.0.2.2"));
        let hold = |ip: &str, expires_unix_ms: u64| Hold {
            cluster: "c1".into(),
            namespace: "ns".into(),
            name: format!("held-{ip}"),
            uid: "old".into(),
            ip: ip.parse().unwrap(),
            expires_unix_ms,
        };
        let holds = [
            hold("10.0.0.2", 2_000), // live
            hold("10.0.0.2", 3_000), // the same address twice
            hold("10.0.0.1", 2_000), // on an address in use: counted once
            hold("10.0.1.2", 500),   // expired
        ];
        assert_eq!(
            records.pool_usage(&pools, holds.iter(), 1_000),
            PoolUsage {
                used: vec![2, 1],
                outside: 2,
            }
        );
    }

    #[test]
    fn a_backend_list_is_named_until_its_last_record_leaves_it() {
        let on = |name: &str, list: &str| LbRecord {
            backends_id: Arc::from(list),
            ..record(name, "10.0.0.1")
        };
        let mut records = Records::default();
        records.insert("c1/a".into(), on("a", "x"));
        records.insert("c1/b".into(), on("b", "x"));
        assert!(records.names_list("x"));
        records.insert("c1/a".into(), on("a", "y"));
        assert!(records.names_list("x") && records.names_list("y"));
        records.remove("c1/b");
        assert!(!records.names_list("x"));
        // Replacing a record with the same list keeps it named.
        records.insert("c1/a".into(), on("a", "y"));
        assert!(records.names_list("y"));
        records.remove("c1/a");
        assert!(!records.names_list("y"));
    }
}
