//! The route flags: where routes go (`--routes`, `--route-netns`, `--route-table`), how the
//! shim recognises its own (`--route-protocol`) and what it reports (`--route-capacity`).

use std::path::PathBuf;

/// The kernel's `main` routing table.
pub const MAIN_TABLE: u32 = 254;

/// Default `--route-protocol`. 0–4 are the kernel's own, and iproute2's `rt_protos` names 8–16,
/// 18 (keepalived), 42 (babel), 99 (openr) and 186–192 (bgp, isis, ospf, rip, eigrp); Calico
/// marks its routes 80. 108 is none of these, so a routing daemon sharing the table does not
/// take the shim's routes for its own, nor the shim theirs.
pub const DEFAULT_ROUTE_PROTOCOL: u8 = 108;

/// Where routes are programmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RouteMode {
    /// Into a Linux routing table through netlink (and the state database).
    Kernel,
    /// Only into the state database, for machines where the shim may not touch routing.
    StateOnly,
}

/// A routing table: a number, or `main`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteTableId(pub u32);

impl std::str::FromStr for RouteTableId {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        if value == "main" {
            return Ok(Self(MAIN_TABLE));
        }
        match value.parse::<u32>() {
            // 0 is "unspecified" and 255 the kernel's `local` table: neither is for routes of
            // pods.
            Ok(0) | Ok(255) => Err(format!(
                "table {value} is reserved (0: unspecified, 255: local); use `main` or another \
                 number"
            )),
            Ok(table) => Ok(Self(table)),
            Err(_) => Err(format!(
                "{value:?} is neither `main` nor a table number (1..=4294967295)"
            )),
        }
    }
}

impl std::fmt::Display for RouteTableId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0 == MAIN_TABLE {
            f.write_str("main")
        } else {
            write!(f, "{}", self.0)
        }
    }
}

/// Route flags of the `local-shim` binary.
#[derive(Debug, Clone, clap::Args)]
pub struct RouteFlags {
    /// Where CreateRoute programs routes: `kernel` (a Linux routing table, through netlink) or
    /// `state-only` (only the state database; the shim touches no routing table).
    #[arg(long = "routes", value_enum, default_value = "kernel")]
    pub mode: RouteMode,

    /// Network namespace whose routing table is programmed: a name under /var/run/netns or an
    /// absolute path to a namespace file (default: the shim's own namespace).
    #[arg(long, value_name = "NAME|PATH")]
    pub route_netns: Option<String>,

    /// Routing table programmed: a number or `main`.
    #[arg(long, value_name = "TABLE", default_value = "main")]
    pub route_table: RouteTableId,

    /// Protocol number marking the routes the shim made (1..=255); routes of any other protocol
    /// in the table are listed as not owned and never deleted.
    #[arg(
        long,
        value_name = "NUMBER",
        default_value_t = DEFAULT_ROUTE_PROTOCOL,
        value_parser = clap::value_parser!(u8).range(1..=255)
    )]
    pub route_protocol: u8,

    /// Add routes with the `onlink` flag through this interface, for node addresses that are
    /// not on a connected subnet of the namespace (the kernel then trusts the next hop is
    /// reachable on that link).
    #[arg(long, value_name = "IFNAME")]
    pub route_onlink_device: Option<String>,

    /// Route capacity reported by ListRoutes (absent by default: no limit known).
    #[arg(long, value_name = "N")]
    pub route_capacity: Option<u32>,
}

impl RouteFlags {
    /// The namespace file `--route-netns` names, if any.
    pub fn netns_path(&self) -> Option<PathBuf> {
        self.route_netns.as_deref().map(netns_path)
    }
}

/// `/var/run/netns/<name>` for a name, the path itself when absolute.
pub fn netns_path(value: &str) -> PathBuf {
    if value.starts_with('/') {
        PathBuf::from(value)
    } else {
        PathBuf::from("/var/run/netns").join(value)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_numbers_or_main() {
        assert_eq!("main".parse::<RouteTableId>().unwrap(), RouteTableId(254));
        assert_eq!("100".parse::<RouteTableId>().unwrap(), RouteTableId(100));
        assert_eq!(
            "70000".parse::<RouteTableId>().unwrap(),
            RouteTableId(70000)
        );
        let err = "mian".parse::<RouteTableId>().unwrap_err();
        assert!(err.contains("\"mian\""), "{err}");
        assert!("255".parse::<RouteTableId>().is_err());
        assert!("0".parse::<RouteTableId>().is_err());
        assert_eq!(RouteTableId(254).to_string(), "main");
        assert_eq!(RouteTableId(7).to_string(), "7");
    }

    #[test]
    fn netns_names_live_under_var_run_netns() {
        assert_eq!(netns_path("blue"), PathBuf::from("/var/run/netns/blue"));
        assert_eq!(
            netns_path("/proc/1/ns/net"),
            PathBuf::from("/proc/1/ns/net")
        );
    }

    #[test]
    fn the_default_protocol_is_no_well_known_one() {
        let known = [
            0, 1, 2, 3, 4, 8, 9, 10, 11, 12, 13, 14, 15, 16, 18, 42, 80, 99, 186, 187, 188, 189,
            192,
        ];
        assert!(!known.contains(&DEFAULT_ROUTE_PROTOCOL));
    }
}
