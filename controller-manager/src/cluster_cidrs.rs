//! `--cluster-cidr`: the pod network's CIDR ranges, at most one per IP family, as the route and
//! node-ipam controllers read them (upstream parses it with `ParseCIDRs` and checks dual-stack).

use std::fmt;
use std::str::FromStr;

use ipnet::IpNet;

/// A `--cluster-cidr` value that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterCidrError {
    /// One comma-separated entry is not a CIDR.
    #[error("{value:?} is not a CIDR (expected e.g. 10.244.0.0/16 or fd00:10:244::/56)")]
    Invalid {
        /// The entry as given.
        value: String,
    },
    /// More than one CIDR per family (dual-stack takes exactly one IPv4 and one IPv6).
    #[error("{count} CIDRs given; at most two, one IPv4 and one IPv6 (dual-stack)")]
    TooMany {
        /// How many were given.
        count: usize,
    },
    /// Two CIDRs of the same family.
    #[error("two CIDRs must be dual-stack (one IPv4 and one IPv6), got {first} and {second}")]
    NotDualStack {
        /// The first CIDR.
        first: IpNet,
        /// The second CIDR.
        second: IpNet,
    },
}

/// The parsed `--cluster-cidr`: zero, one, or two CIDRs of different families, each
/// truncated to its network address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterCidrs(Vec<IpNet>);

impl ClusterCidrs {
    /// The CIDRs, in the order given.
    pub fn iter(&self) -> impl Iterator<Item = &IpNet> {
        self.0.iter()
    }

    /// Whether none was given (the upstream default).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many were given (0, 1 or 2).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether one CIDR of each family was given.
    pub fn is_dual_stack(&self) -> bool {
        self.0.len() == 2
    }

    /// The CIDR of the IPv4 (`true`) or IPv6 family, if one was given.
    pub fn of_family(&self, ipv4: bool) -> Option<&IpNet> {
        self.0
            .iter()
            .find(|net| matches!(net, IpNet::V4(_)) == ipv4)
    }

    /// Whether a route to `destination` is the route controller's to manage: its first or
    /// last address lies inside one of the cluster CIDRs (upstream `isResponsibleForRoute`).
    pub fn is_responsible_for(&self, destination: &IpNet) -> bool {
        let first = destination.network();
        let last = destination.broadcast();
        self.0
            .iter()
            .any(|net| net.contains(&first) || net.contains(&last))
    }
}

impl FromStr for ClusterCidrs {
    type Err = ClusterCidrError;

    /// Parses the comma-separated flag value; the empty string gives no CIDRs.
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let value = value.trim();
        if value.is_empty() {
            return Ok(Self::default());
        }
        let nets = value
            .split(',')
            .map(|entry| {
                let entry = entry.trim();
                IpNet::from_str(entry).map(|net| net.trunc()).map_err(|_| {
                    ClusterCidrError::Invalid {
                        value: entry.to_string(),
                    }
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        match nets.as_slice() {
            [] | [_] => {}
            [first, second] => {
                if matches!(first, IpNet::V4(_)) == matches!(second, IpNet::V4(_)) {
                    return Err(ClusterCidrError::NotDualStack {
                        first: *first,
                        second: *second,
                    });
                }
            }
            more => return Err(ClusterCidrError::TooMany { count: more.len() }),
        }
        Ok(Self(nets))
    }
}

impl fmt::Display for ClusterCidrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, net) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{net}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidrs(value: &str) -> ClusterCidrs {
        value.parse().unwrap()
    }

    fn net(value: &str) -> IpNet {
        value.parse().unwrap()
    }

    #[test]
    fn empty_value_is_no_cidrs() {
        assert!(cidrs("").is_empty());
        assert!(cidrs("  ").is_empty());
    }

    #[test]
    fn one_or_two_of_different_families_parse_and_truncate() {
        let one = cidrs("10.244.1.7/16");
        assert_eq!(one.to_string(), "10.244.0.0/16");
        let two = cidrs("10.244.0.0/16, fd00::/56");
        assert!(two.is_dual_stack());
        assert_eq!(two.of_family(false), Some(&net("fd00::/56")));
        assert_eq!(two.of_family(true), Some(&net("10.244.0.0/16")));
    }

    #[test]
    fn bad_values_name_the_problem() {
        assert_eq!(
            "10.0.0.0/8,bogus".parse::<ClusterCidrs>(),
            Err(ClusterCidrError::Invalid {
                value: "bogus".into()
            })
        );
        assert!(matches!(
            "10.0.0.0/8,10.1.0.0/16".parse::<ClusterCidrs>(),
            Err(ClusterCidrError::NotDualStack { .. })
        ));
        assert_eq!(
            "10.0.0.0/8,fd00::/48,fd01::/48".parse::<ClusterCidrs>(),
            Err(ClusterCidrError::TooMany { count: 3 })
        );
        assert!(matches!(
            "10.0.0.0/33".parse::<ClusterCidrs>(),
            Err(ClusterCidrError::Invalid { .. })
        ));
    }

    // Upstream TestIsResponsibleForRoute.
    #[test]
    fn is_responsible_for_route() {
        let cases = [
            ("10.244.0.0/16", "10.244.0.0/24", true),
            ("10.244.0.0/16", "10.244.10.0/24", true),
            ("10.244.0.0/16", "10.244.255.0/24", true),
            ("10.244.0.0/14", "10.244.0.0/24", true),
            ("10.244.0.0/14", "10.247.255.0/24", true),
            ("a00:100::/10", "a00:100::/24", true),
            ("10.244.0.0/16", "10.224.0.0/24", false),
            ("10.244.0.0/16", "10.0.10.0/24", false),
            ("10.244.0.0/16", "10.255.255.0/24", false),
            ("10.244.0.0/14", "10.248.0.0/24", false),
            ("10.244.0.0/14", "10.243.255.0/24", false),
            ("a00:100::/10", "b00:100::/24", false),
        ];
        for (cluster, route, want) in cases {
            assert_eq!(
                cidrs(cluster).is_responsible_for(&net(route)),
                want,
                "cluster {cluster} route {route}"
            );
        }
    }
}
