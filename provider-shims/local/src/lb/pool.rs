//! Address pools: named sets of CIDRs and ranges (IPv4 or IPv6), validated as a whole so two
//! pools can never hand out the same address.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

/// Address family of an address, a range or a Service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// The family of `ip`.
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        })
    }
}

/// An address as a number, for range arithmetic.
fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// The address of `family` numbered `value` (truncated to the family's width).
fn from_u128(family: Family, value: u128) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::from(value as u32)),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(value)),
    }
}

/// A CIDR (`10.0.0.0/24`); host bits are cleared when parsed, as Go's `ParseCIDR` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Cidr {
    /// Network address.
    pub addr: IpAddr,
    /// Prefix length.
    pub prefix: u8,
}

impl Cidr {
    /// Parses `a.b.c.d/n` or `x::y/n`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (addr, prefix) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not a CIDR (missing /prefix)"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{text:?} is not a CIDR ({addr:?} is not an IP address)"))?;
        let max = Self::bits(Family::of(addr));
        // Decimal digits only, as Go's `ParseCIDR` (Rust would also take a sign: `/+8`).
        let prefix: u8 = Some(prefix)
            .filter(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|p| p.parse().ok())
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("{text:?} is not a CIDR (prefix must be 0..={max})"))?;
        let family = Family::of(addr);
        let addr = from_u128(family, to_u128(addr) & Self::mask(family, prefix));
        Ok(Self { addr, prefix })
    }

    fn bits(family: Family) -> u8 {
        match family {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }

    /// The network mask of `prefix` bits, within the family's width.
    fn mask(family: Family, prefix: u8) -> u128 {
        let bits = u32::from(Self::bits(family));
        let width_mask = if bits == 128 {
            u128::MAX
        } else {
            (1u128 << bits) - 1
        };
        let host_bits = bits - u32::from(prefix);
        let host = if host_bits == 128 {
            u128::MAX
        } else {
            (1u128 << host_bits) - 1
        };
        width_mask & !host
    }

    /// Whether `ip` is inside; an address of the other family never is.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let family = Family::of(self.addr);
        Family::of(ip) == family
            && to_u128(ip) & Self::mask(family, self.prefix) == to_u128(self.addr)
    }

    /// First and last address.
    fn bounds(&self) -> (u128, u128) {
        let family = Family::of(self.addr);
        let start = to_u128(self.addr);
        let width = match family {
            Family::V4 => u128::from(u32::MAX),
            Family::V6 => u128::MAX,
        };
        (start, start | (width & !Self::mask(family, self.prefix)))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// An inclusive range of addresses of one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRange {
    family: Family,
    start: u128,
    end: u128,
}

impl IpRange {
    /// Parses a pool entry: a CIDR, `start-end` or a single address. An IPv4 CIDR of /30 or
    /// larger leaves out its network and broadcast addresses, which clients on a real network
    /// cannot use (so a /24 holds 254 addresses).
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.contains('/') {
            let cidr = Cidr::parse(text)?;
            let family = Family::of(cidr.addr);
            let (mut start, mut end) = cidr.bounds();
            if family == Family::V4 && cidr.prefix <= 30 {
                start += 1;
                end -= 1;
            }
            return Ok(Self { family, start, end });
        }
        if let Some((a, b)) = text.split_once('-') {
            let parse = |s: &str| -> Result<IpAddr, String> {
                s.trim()
                    .parse()
                    .map_err(|_| format!("{:?} is not an IP address", s.trim()))
            };
            let (a, b) = (parse(a)?, parse(b)?);
            if Family::of(a) != Family::of(b) {
                return Err(format!("range {text:?} mixes IPv4 and IPv6"));
            }
            let (start, end) = (to_u128(a), to_u128(b));
            if start > end {
                return Err(format!("range {text:?} starts after it ends"));
            }
            return Ok(Self {
                family: Family::of(a),
                start,
                end,
            });
        }
        let ip: IpAddr = text
            .parse()
            .map_err(|_| format!("{text:?} is not a CIDR, a range (start-end) or an IP address"))?;
        Ok(Self {
            family: Family::of(ip),
            start: to_u128(ip),
            end: to_u128(ip),
        })
    }

    /// Number of addresses.
    pub fn size(&self) -> u128 {
        (self.end - self.start).saturating_add(1)
    }

    /// Whether `ip` is inside.
    pub fn contains(&self, ip: IpAddr) -> bool {
        Family::of(ip) == self.family && (self.start..=self.end).contains(&to_u128(ip))
    }

    fn overlaps(&self, other: &Self) -> bool {
        self.family == other.family && self.start <= other.end && other.start <= self.end
    }

    /// The addresses in order (lazily: an IPv6 /64 is fine).
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        let family = self.family;
        (0..)
            .map_while(move |i: u128| self.start.checked_add(i).filter(|v| *v <= self.end))
            .map(move |v| from_u128(family, v))
    }
}

impl fmt::Display for IpRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}-{}",
            from_u128(self.family, self.start),
            from_u128(self.family, self.end)
        )
    }
}

/// One named pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    /// Name (the pool annotation's value).
    pub name: String,
    /// Ranges in configuration order; addresses are handed out from the first one on.
    pub ranges: Vec<IpRange>,
    /// Whether Services that name no pool may get addresses from it.
    pub auto_assign: bool,
}

impl Pool {
    /// Whether `ip` belongs to this pool.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.ranges.iter().any(|r| r.contains(ip))
    }

    /// Number of addresses of `family` (all families when `None`).
    pub fn size(&self, family: Option<Family>) -> u128 {
        self.ranges
            .iter()
            .filter(|r| family.is_none_or(|f| r.family == f))
            .fold(0u128, |sum, r| sum.saturating_add(r.size()))
    }

    /// The addresses of `family`, in order.
    pub fn addresses(&self, family: Family) -> impl Iterator<Item = IpAddr> + '_ {
        self.ranges
            .iter()
            .filter(move |r| r.family == family)
            .flat_map(IpRange::addresses)
    }
}

/// Why a pool configuration is invalid; names the pool and the entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// A pool without a name.
    #[error("pools[{index}]: name must not be empty")]
    EmptyName {
        /// Position in the list.
        index: usize,
    },
    /// Two pools with one name.
    #[error("pools[{index}]: name {name:?} is used by an earlier pool")]
    DuplicateName {
        /// Position in the list.
        index: usize,
        /// The name.
        name: String,
    },
    /// A pool without addresses.
    #[error("pool {name}: addresses must not be empty")]
    NoAddresses {
        /// The pool.
        name: String,
    },
    /// An entry that is no CIDR, range or address (or a range whose start is after its end).
    #[error("pool {name}: addresses[{index}]: {message}")]
    BadEntry {
        /// The pool.
        name: String,
        /// Position of the entry.
        index: usize,
        /// What is wrong.
        message: String,
    },
    /// Two entries (of one pool or of two pools) share addresses.
    #[error("pool {name}: addresses[{index}] ({range}) overlaps pool {other}'s {other_range}")]
    Overlap {
        /// The pool.
        name: String,
        /// Position of the entry.
        index: usize,
        /// The entry.
        range: String,
        /// The pool it overlaps.
        other: String,
        /// The overlapped entry.
        other_range: String,
    },
}

/// The validated pools: unique names, no address in two entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pools {
    pools: Vec<Pool>,
}

/// A pool as written: a name, its entries and whether it is used by default.
#[derive(Debug, Clone)]
pub struct PoolSpec {
    /// Name.
    pub name: String,
    /// CIDRs, ranges and addresses.
    pub addresses: Vec<String>,
    /// Whether Services naming no pool use it.
    pub auto_assign: bool,
}

impl Pools {
    /// Validates `specs` as a whole.
    pub fn new(specs: Vec<PoolSpec>) -> Result<Self, PoolError> {
        let mut pools: Vec<Pool> = Vec::with_capacity(specs.len());
        for (index, spec) in specs.into_iter().enumerate() {
            if spec.name.is_empty() {
                return Err(PoolError::EmptyName { index });
            }
            if pools.iter().any(|p| p.name == spec.name) {
                return Err(PoolError::DuplicateName {
                    index,
                    name: spec.name,
                });
            }
            if spec.addresses.is_empty() {
                return Err(PoolError::NoAddresses { name: spec.name });
            }
            let mut pool = Pool {
                name: spec.name,
                ranges: Vec::with_capacity(spec.addresses.len()),
                auto_assign: spec.auto_assign,
            };
            for (i, text) in spec.addresses.iter().enumerate() {
                let range = IpRange::parse(text).map_err(|message| PoolError::BadEntry {
                    name: pool.name.clone(),
                    index: i,
                    message,
                })?;
                let earlier = pools.iter().chain(std::iter::once(&pool));
                for other in earlier {
                    if let Some(hit) = other.ranges.iter().find(|r| r.overlaps(&range)) {
                        return Err(PoolError::Overlap {
                            name: pool.name.clone(),
                            index: i,
                            range: range.to_string(),
                            other: other.name.clone(),
                            other_range: hit.to_string(),
                        });
                    }
                }
                pool.ranges.push(range);
            }
            pools.push(pool);
        }
        Ok(Self { pools })
    }

    /// The pool called `name`.
    pub fn get(&self, name: &str) -> Option<&Pool> {
        self.pools.iter().find(|p| p.name == name)
    }

    /// The pool holding `ip`.
    pub fn pool_of(&self, ip: IpAddr) -> Option<&Pool> {
        self.pools.iter().find(|p| p.contains(ip))
    }

    /// Every pool, in configuration order.
    pub fn iter(&self) -> impl Iterator<Item = &Pool> {
        self.pools.iter()
    }

    /// Pool names, for messages.
    pub fn names(&self) -> String {
        let names: Vec<&str> = self.pools.iter().map(|p| p.name.as_str()).collect();
        names.join(", ")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn spec(name: &str, addresses: &[&str]) -> PoolSpec {
        PoolSpec {
            name: name.into(),
            addresses: addresses.iter().map(|s| s.to_string()).collect(),
            auto_assign: true,
        }
    }

    #[test]
    fn entry_sizes() {
        let cases: &[(&str, u128)] = &[
            ("v4 /24 leaves out network and broadcast", 254),
            ("v4 /31 keeps both", 2),
            ("v4 /32 is one address", 1),
            ("v6 /120 keeps every address", 256),
            ("range is inclusive", 11),
            ("single address", 1),
        ];
        let entries = [
            "127.0.100.0/24",
            "10.0.0.0/31",
            "10.0.0.9/32",
            "fd00::/120",
            "10.1.0.10-10.1.0.20",
            "10.2.0.1",
        ];
        for ((name, size), entry) in cases.iter().zip(entries) {
            assert_eq!(IpRange::parse(entry).unwrap().size(), *size, "{name}");
        }
        let v6 = IpRange::parse("fd00::/64").unwrap();
        assert_eq!(v6.size(), 1u128 << 64);
        assert_eq!(
            v6.addresses().nth(3),
            Some("fd00::3".parse::<IpAddr>().unwrap())
        );
        let v4 = IpRange::parse("127.0.100.0/24").unwrap();
        assert_eq!(v4.addresses().next(), Some("127.0.100.1".parse().unwrap()));
        assert_eq!(
            v4.addresses().last(),
            Some("127.0.100.254".parse().unwrap())
        );
    }

    #[test]
    fn bad_entries_are_named() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "bad CIDR address",
                "10.0.0.x/24",
                "addresses[0]: \"10.0.0.x/24\" is not a CIDR",
            ),
            ("prefix too long", "10.0.0.0/33", "prefix must be 0..=32"),
            (
                "start after end",
                "10.0.0.9-10.0.0.1",
                "starts after it ends",
            ),
            ("mixed families", "10.0.0.1-fd00::1", "mixes IPv4 and IPv6"),
            ("garbage", "pool", "is not a CIDR, a range"),
        ];
        for (name, entry, want) in cases {
            let err = Pools::new(vec![spec("p", &[entry])])
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{name}: {err}");
            assert!(err.starts_with("pool p: "), "{name}: {err}");
        }
    }

    #[test]
    fn overlapping_pools_are_refused() {
        let err = Pools::new(vec![
            spec("a", &["10.0.0.0/24"]),
            spec("b", &["10.0.1.0/24", "10.0.0.200-10.0.1.5"]),
        ])
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "pool b: addresses[1] (10.0.0.200-10.0.1.5) overlaps pool a's 10.0.0.1-10.0.0.254"
        );
        // Within one pool too.
        let err = Pools::new(vec![spec("a", &["fd00::/120", "fd00::5"])]).unwrap_err();
        assert!(matches!(err, PoolError::Overlap { .. }), "{err}");
        // Different families never overlap.
        Pools::new(vec![
            spec("a", &["10.0.0.0/24"]),
            spec("b", &["fd00::/120"]),
        ])
        .unwrap();
    }

    #[test]
    fn names_must_be_unique_and_present() {
        assert!(matches!(
            Pools::new(vec![spec("a", &["10.0.0.1"]), spec("a", &["10.0.0.2"])]),
            Err(PoolError::DuplicateName { index: 1, .. })
        ));
        assert!(matches!(
            Pools::new(vec![spec("", &["10.0.0.1"])]),
            Err(PoolError::EmptyName { index: 0 })
        ));
        assert!(matches!(
            Pools::new(vec![spec("a", &[])]),
            Err(PoolError::NoAddresses { .. })
        ));
    }

    #[test]
    fn cidr_contains_and_masks_host_bits() {
        let cidr = Cidr::parse("10.1.2.3/16").unwrap();
        assert_eq!(cidr.to_string(), "10.1.0.0/16");
        assert!(cidr.contains("10.1.255.1".parse().unwrap()));
        assert!(!cidr.contains("10.2.0.1".parse().unwrap()));
        assert!(!cidr.contains("::1".parse().unwrap()));
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains("1.2.3.4".parse().unwrap())
        );
        assert!(
            Cidr::parse("::/0")
                .unwrap()
                .contains("fd00::1".parse().unwrap())
        );
        assert!(
            Cidr::parse("fd00::/8")
                .unwrap()
                .contains("fdff::1".parse().unwrap())
        );
    }
}
