//! The node-ipam flags and upstream's rules for them (KCM `NodeIPAMControllerOptions` and the
//! sample CCM's `setNodeCIDRMaskSizes`): which node mask applies to which cluster CIDR.

use std::time::Duration;

use ipnet::IpNet;

use super::cidr_set::CidrSet;
use super::metrics::SetMetrics;
use crate::cluster_cidrs::{ClusterCidrError, ClusterCidrs};
use crate::flags::FlagError;

/// The sample CCM's IPv4 node mask when none is given.
pub const DEFAULT_MASK_IPV4: u8 = 24;
/// The sample CCM's IPv6 node mask when none is given.
pub const DEFAULT_MASK_IPV6: u8 = 64;

/// How long podCIDRs written by someone else must stay unchanged before a newly started
/// allocator hands out its first CIDR (see [`IpamSettings::settle`]).
pub const DEFAULT_SETTLE: Duration = Duration::from_secs(2);

/// `--cidr-allocator-type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AllocatorType {
    /// Pod CIDRs cut from `--cluster-cidr` by this controller.
    #[value(name = "RangeAllocator")]
    Range,
    /// Pod CIDRs from the cloud (not in this build).
    #[value(name = "CloudAllocator")]
    Cloud,
}

/// Flags of the node-ipam controller (`--allocate-node-cidrs` and `--cluster-cidr` are shared
/// settings).
#[derive(Debug, Clone, clap::Args)]
#[group(id = "nodeipam-flags")]
#[command(next_help_heading = "node-ipam-controller")]
pub struct Flags {
    /// CIDR range(s) of Services, comma-separated, at most two (one per IP family); node pod
    /// CIDRs overlapping them are never handed out.
    #[arg(long, default_value = "", value_parser = parse_service_ranges)]
    pub service_cluster_ip_range: ClusterCidrs,
    /// Mask size of node pod CIDRs in a single-stack cluster (not with the per-family flags,
    /// nor with a dual-stack --cluster-cidr).
    #[arg(long)]
    pub node_cidr_mask_size: Option<u8>,
    /// Mask size of IPv4 node pod CIDRs [default: 24].
    #[arg(long)]
    pub node_cidr_mask_size_ipv4: Option<u8>,
    /// Mask size of IPv6 node pod CIDRs [default: 64].
    #[arg(long)]
    pub node_cidr_mask_size_ipv6: Option<u8>,
    /// Where node pod CIDRs come from; this build has only RangeAllocator.
    #[arg(long, value_enum, default_value = "RangeAllocator")]
    pub cidr_allocator_type: AllocatorType,
}

impl Default for Flags {
    /// The flags' defaults.
    fn default() -> Self {
        Self {
            service_cluster_ip_range: ClusterCidrs::default(),
            node_cidr_mask_size: None,
            node_cidr_mask_size_ipv4: None,
            node_cidr_mask_size_ipv6: None,
            cidr_allocator_type: AllocatorType::Range,
        }
    }
}

fn parse_service_ranges(value: &str) -> Result<ClusterCidrs, ClusterCidrError> {
    value.parse()
}

/// What the range allocator is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpamSettings {
    /// Each cluster CIDR with its node mask size, in `--cluster-cidr` order (a node's podCIDRs
    /// follow it; the first is its podCIDR).
    pub pools: Vec<(IpNet, u8)>,
    /// Service ranges: blocks overlapping them are never handed out.
    pub service_ranges: Vec<IpNet>,
    /// A newly started allocator hands out nothing until podCIDRs it did not write have stayed
    /// unchanged this long (bounded by [`MAX_SETTLE`]): writes of a predecessor still finishing
    /// land first and are taken into account.
    pub settle: Duration,
}

/// The longest a new allocator waits for others' podCIDR writes to stop.
pub const MAX_SETTLE: Duration = Duration::from_secs(30);

/// Checks what needs no `--cluster-cidr` (run at flag validation).
pub fn validate(flags: &Flags) -> Result<(), FlagError> {
    if flags.cidr_allocator_type == AllocatorType::Cloud {
        return Err(FlagError::new(
            "--cidr-allocator-type",
            "CloudAllocator is not available: this build only has the range allocator \
             (RangeAllocator), which cuts node pod CIDRs from --cluster-cidr",
        ));
    }
    if flags.node_cidr_mask_size.is_some()
        && (flags.node_cidr_mask_size_ipv4.is_some() || flags.node_cidr_mask_size_ipv6.is_some())
    {
        return Err(FlagError::new(
            "--node-cidr-mask-size",
            "not allowed together with --node-cidr-mask-size-ipv4 or --node-cidr-mask-size-ipv6; \
             for dual-stack clusters unset it and use the per-family flags",
        ));
    }
    for (flag, value, max) in [
        ("--node-cidr-mask-size", flags.node_cidr_mask_size, 128),
        (
            "--node-cidr-mask-size-ipv4",
            flags.node_cidr_mask_size_ipv4,
            32,
        ),
        (
            "--node-cidr-mask-size-ipv6",
            flags.node_cidr_mask_size_ipv6,
            128,
        ),
    ] {
        if let Some(mask) = value
            && !(1..=max).contains(&mask)
        {
            return Err(FlagError::new(
                flag,
                format!("{mask} is not a mask size between 1 and {max}"),
            ));
        }
    }
    Ok(())
}

/// The allocator settings for `cluster` (`--cluster-cidr`), with upstream's mask rules and the
/// CIDR sets' limits checked; the error names the flag to fix.
pub fn settings(flags: &Flags, cluster: &ClusterCidrs) -> Result<IpamSettings, FlagError> {
    validate(flags)?;
    if cluster.is_empty() {
        return Err(FlagError::new(
            "--cluster-cidr",
            "--allocate-node-cidrs=true needs the pod network's CIDR(s) to cut node CIDRs from \
             (e.g. --cluster-cidr=10.244.0.0/16)",
        ));
    }
    let (v4_flag, v6_flag) = if cluster.is_dual_stack() {
        if flags.node_cidr_mask_size.is_some() {
            return Err(FlagError::new(
                "--node-cidr-mask-size",
                "not allowed with a dual-stack cluster (--cluster-cidr has an IPv4 and an IPv6 \
                 CIDR); use --node-cidr-mask-size-ipv4 and --node-cidr-mask-size-ipv6",
            ));
        }
        (
            ("--node-cidr-mask-size-ipv4", flags.node_cidr_mask_size_ipv4),
            ("--node-cidr-mask-size-ipv6", flags.node_cidr_mask_size_ipv6),
        )
    } else if let Some(mask) = flags.node_cidr_mask_size {
        (
            ("--node-cidr-mask-size", Some(mask)),
            ("--node-cidr-mask-size", Some(mask)),
        )
    } else {
        let ipv6 = cluster.of_family(false).is_some();
        if ipv6 && flags.node_cidr_mask_size_ipv4.is_some() {
            return Err(FlagError::new(
                "--node-cidr-mask-size-ipv4",
                "not allowed for a single-stack IPv6 cluster",
            ));
        }
        if !ipv6 && flags.node_cidr_mask_size_ipv6.is_some() {
            return Err(FlagError::new(
                "--node-cidr-mask-size-ipv6",
                "not allowed for a single-stack IPv4 cluster",
            ));
        }
        (
            ("--node-cidr-mask-size-ipv4", flags.node_cidr_mask_size_ipv4),
            ("--node-cidr-mask-size-ipv6", flags.node_cidr_mask_size_ipv6),
        )
    };
    let mut pools = Vec::new();
    for net in cluster.iter() {
        let (flag, mask) = match net {
            IpNet::V4(_) => (v4_flag.0, v4_flag.1.unwrap_or(DEFAULT_MASK_IPV4)),
            IpNet::V6(_) => (v6_flag.0, v6_flag.1.unwrap_or(DEFAULT_MASK_IPV6)),
        };
        // The set's own checks: the mask fits the cluster CIDR.
        CidrSet::new(*net, mask, SetMetrics::default())
            .map_err(|err| FlagError::new(flag, format!("{err} (--cluster-cidr={cluster})")))?;
        pools.push((*net, mask));
    }
    Ok(IpamSettings {
        pools,
        service_ranges: flags.service_cluster_ip_range.iter().copied().collect(),
        settle: DEFAULT_SETTLE,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(mask: Option<u8>, v4: Option<u8>, v6: Option<u8>) -> Flags {
        Flags {
            node_cidr_mask_size: mask,
            node_cidr_mask_size_ipv4: v4,
            node_cidr_mask_size_ipv6: v6,
            ..Flags::default()
        }
    }

    fn masks(flags: &Flags, cluster: &str) -> Result<Vec<u8>, FlagError> {
        let cluster: ClusterCidrs = cluster.parse().expect("cluster CIDRs");
        settings(flags, &cluster).map(|s| s.pools.iter().map(|(_, mask)| *mask).collect())
    }

    /// Name, flags, --cluster-cidr, and the masks or the flag named by the error.
    type Case = (
        &'static str,
        Flags,
        &'static str,
        Result<Vec<u8>, &'static str>,
    );

    // Upstream (sample CCM) setNodeCIDRMaskSizes cases, plus the cidrset limits.
    #[test]
    fn set_node_cidr_mask_sizes() {
        let cases: &[Case] = &[
            (
                "single stack ipv4 defaults",
                flags(None, None, None),
                "10.0.0.0/16",
                Ok(vec![24]),
            ),
            (
                "single stack ipv6 defaults",
                flags(None, None, None),
                "fd00::/48",
                Ok(vec![64]),
            ),
            (
                "dual stack defaults",
                flags(None, None, None),
                "10.0.0.0/16,fd00::/48",
                Ok(vec![24, 64]),
            ),
            (
                "dual stack order follows --cluster-cidr",
                flags(None, Some(26), Some(60)),
                "fd00::/48,10.0.0.0/16",
                Ok(vec![60, 26]),
            ),
            (
                "single stack ipv4 --node-cidr-mask-size",
                flags(Some(20), None, None),
                "10.0.0.0/8",
                Ok(vec![20]),
            ),
            (
                "single stack ipv6 --node-cidr-mask-size",
                flags(Some(56), None, None),
                "fd00::/48",
                Ok(vec![56]),
            ),
            (
                "single stack ipv4 -ipv4",
                flags(None, Some(25), None),
                "10.0.0.0/16",
                Ok(vec![25]),
            ),
            (
                "single stack ipv6 -ipv6",
                flags(None, None, Some(60)),
                "fd00::/48",
                Ok(vec![60]),
            ),
            (
                "dual stack with --node-cidr-mask-size",
                flags(Some(24), None, None),
                "10.0.0.0/16,fd00::/48",
                Err("--node-cidr-mask-size"),
            ),
            (
                "--node-cidr-mask-size with -ipv4",
                flags(Some(24), Some(24), None),
                "10.0.0.0/16",
                Err("--node-cidr-mask-size"),
            ),
            (
                "--node-cidr-mask-size with -ipv6",
                flags(Some(64), None, Some(64)),
                "fd00::/48",
                Err("--node-cidr-mask-size"),
            ),
            (
                "single stack ipv6 with -ipv4",
                flags(None, Some(24), None),
                "fd00::/48",
                Err("--node-cidr-mask-size-ipv4"),
            ),
            (
                "single stack ipv4 with -ipv6",
                flags(None, None, Some(64)),
                "10.0.0.0/16",
                Err("--node-cidr-mask-size-ipv6"),
            ),
            (
                "mask shorter than the cluster prefix",
                flags(None, Some(8), None),
                "10.0.0.0/16",
                Err("--node-cidr-mask-size-ipv4"),
            ),
            (
                "ipv6 mask more than 16 bits longer",
                flags(None, None, Some(65)),
                "fd00::/48",
                Err("--node-cidr-mask-size-ipv6"),
            ),
            (
                "ipv4 mask 17 bits longer, as upstream allows",
                flags(None, Some(25), None),
                "10.0.0.0/8",
                Ok(vec![25]),
            ),
            (
                "ipv4 mask more than 24 bits longer",
                flags(None, Some(25), None),
                "0.0.0.0/0",
                Err("--node-cidr-mask-size-ipv4"),
            ),
            (
                "default ipv6 mask too long for a /32",
                flags(None, None, None),
                "fd00::/32",
                Err("--node-cidr-mask-size-ipv6"),
            ),
            (
                "ipv4 mask beyond 32",
                flags(None, Some(33), None),
                "10.0.0.0/16",
                Err("--node-cidr-mask-size-ipv4"),
            ),
            (
                "no cluster CIDR",
                flags(None, None, None),
                "",
                Err("--cluster-cidr"),
            ),
        ];
        for (name, flags, cluster, want) in cases {
            let got = masks(flags, cluster);
            match want {
                Ok(want) => assert_eq!(got.as_ref(), Ok(want), "{name}"),
                Err(flag) => {
                    let err = got.expect_err(name);
                    assert_eq!(err.flag, *flag, "{name}: {err}");
                }
            }
        }
    }

    #[test]
    fn cloud_allocator_is_refused_with_a_clear_error() {
        let flags = Flags {
            cidr_allocator_type: AllocatorType::Cloud,
            ..Flags::default()
        };
        let err = validate(&flags).expect_err("CloudAllocator");
        assert_eq!(err.flag, "--cidr-allocator-type");
        assert!(
            err.message.contains("only has the range allocator"),
            "{err}"
        );
    }

    #[test]
    fn service_ranges_follow_the_cluster_cidr_rules() {
        assert!(parse_service_ranges("10.96.0.0/12,fd00:96::/108").is_ok());
        assert!(parse_service_ranges("10.96.0.0/12,10.100.0.0/16").is_err());
        assert!(parse_service_ranges("bogus").is_err());
        assert!(parse_service_ranges("").is_ok_and(|r| r.is_empty()));
    }
}
