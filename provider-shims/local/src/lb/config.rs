//! The load balancer's flags and its configuration file (`--lb-config`, YAML: address pools).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::balance::Thresholds;
use super::health::HealthConfig;
use super::pool::{PoolError, PoolSpec, Pools};
use super::proxy::ProxyConfig;

/// The default pool when no `--lb-config` is given: loopback, so every Linux machine can bind
/// it without setup, and a /24 nothing else in 127/8 uses by convention.
pub const DEFAULT_POOL_CIDR: &str = "127.0.100.0/24";

/// Largest `--lb-config` accepted (a pool is a few lines).
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// Load-balancer flags of `local-shim`.
#[derive(Debug, Clone, clap::Args)]
pub struct LbFlags {
    /// Load-balancer configuration (YAML, address pools; read at start-up). Without it, one
    /// auto-assign pool `default` of 127.0.100.0/24.
    #[arg(long = "lb-config", value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Time between health probes of a backend target.
    #[arg(long = "lb-health-interval", default_value = "2s", value_parser = humantime::parse_duration)]
    pub health_interval: Duration,

    /// Time a health probe may take.
    #[arg(long = "lb-health-timeout", default_value = "1s", value_parser = humantime::parse_duration)]
    pub health_timeout: Duration,

    /// Consecutive failed probes that take a backend out.
    #[arg(long = "lb-health-down-after", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub health_down_after: u32,

    /// Consecutive successful probes that bring a backend back.
    #[arg(long = "lb-health-up-after", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub health_up_after: u32,

    /// kube-proxy's health port, probed for `externalTrafficPolicy: Cluster`.
    #[arg(long = "lb-kube-proxy-health-port", default_value_t = 10256)]
    pub kube_proxy_health_port: u16,

    /// Time a connect to one backend may take before the next node is tried.
    #[arg(long = "lb-connect-timeout", default_value = "2s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,

    /// A UDP flow idle this long (both directions) is forgotten.
    #[arg(long = "lb-udp-idle-timeout", default_value = "60s", value_parser = humantime::parse_duration)]
    pub udp_idle_timeout: Duration,

    /// How long a deleted Service's address stays reserved for a Service of the same
    /// namespace/name (delete-and-recreate keeps its address); 0 frees it at once.
    #[arg(long = "lb-address-hold", default_value = "10m", value_parser = humantime::parse_duration)]
    pub address_hold: Duration,
}

impl LbFlags {
    pub(crate) fn health(&self) -> HealthConfig {
        HealthConfig {
            interval: self.health_interval,
            timeout: self.health_timeout,
            thresholds: Thresholds {
                down_after: self.health_down_after,
                up_after: self.health_up_after,
            },
        }
    }

    pub(crate) fn proxy(&self) -> ProxyConfig {
        ProxyConfig {
            connect_timeout: self.connect_timeout,
            udp_idle_timeout: self.udp_idle_timeout,
        }
    }

    /// The pools of `--lb-config`, or the default pool.
    pub fn pools(&self) -> Result<Pools, LbConfigError> {
        match &self.config {
            Some(path) => load_pools(path),
            None => Pools::new(vec![PoolSpec {
                name: "default".into(),
                addresses: vec![DEFAULT_POOL_CIDR.into()],
                auto_assign: true,
            }])
            .map_err(|error| LbConfigError::Pools {
                path: PathBuf::from("(built-in default)"),
                error: Box::new(error),
            }),
        }
    }
}

/// Why `--lb-config` could not be used; names the file.
#[derive(Debug, thiserror::Error)]
pub enum LbConfigError {
    /// Unreadable or too large.
    #[error("reading --lb-config {}: {error}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// Not a valid configuration document.
    #[error("parsing --lb-config {}: {error}", .path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// Where and why.
        error: Box<serde_saphyr::Error>,
    },
    /// The pools are invalid (bad entry, overlap, duplicate name).
    #[error("--lb-config {}: {error}", .path.display())]
    Pools {
        /// The file.
        path: PathBuf,
        /// Which pool and why (boxed: errors travel in Results).
        error: Box<PoolError>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    pools: Vec<RawPool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    #[serde(default)]
    name: String,
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(rename = "autoAssign", default = "yes")]
    auto_assign: bool,
}

fn yes() -> bool {
    true
}

/// Reads and validates the pools of `path`.
pub fn load_pools(path: &Path) -> Result<Pools, LbConfigError> {
    let read_error = |error| LbConfigError::Read {
        path: path.to_path_buf(),
        error,
    };
    let size = std::fs::metadata(path).map_err(read_error)?.len();
    if size > MAX_CONFIG_BYTES {
        return Err(read_error(std::io::Error::other(format!(
            "{size} bytes, more than the {MAX_CONFIG_BYTES} allowed"
        ))));
    }
    let text = std::fs::read_to_string(path).map_err(read_error)?;
    parse_pools(path, &text)
}

/// Parses and validates configuration text; `path` is only used in errors.
pub fn parse_pools(path: &Path, text: &str) -> Result<Pools, LbConfigError> {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_documents = 1;
    budget.max_aliases = 0;
    budget.max_anchors = 0;
    budget.max_merge_keys = 0;
    budget.max_depth = 8;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options.with_snippet = false;
    let raw: RawConfig = serde_saphyr::from_str_with_options(text, options).map_err(|error| {
        LbConfigError::Parse {
            path: path.to_path_buf(),
            error: Box::new(error),
        }
    })?;
    Pools::new(
        raw.pools
            .into_iter()
            .map(|p| PoolSpec {
                name: p.name,
                addresses: p.addresses,
                auto_assign: p.auto_assign,
            })
            .collect(),
    )
    .map_err(|error| LbConfigError::Pools {
        path: path.to_path_buf(),
        error: Box::new(error),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn example_config_is_valid() {
        let text = include_str!("../../examples/lb-config.yaml");
        let pools = parse_pools(Path::new("lb-config.yaml"), text).unwrap();
        assert!(pools.get("default").is_some_and(|p| p.auto_assign));
    }

    #[test]
    fn config_errors_name_the_file_and_pool() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "unknown key",
                "pools:\n  - name: a\n    adresses: [10.0.0.1]\n",
                "unknown field",
            ),
            (
                "overlap",
                "pools:\n  - name: a\n    addresses: [10.0.0.0/24]\n  - name: b\n    addresses: [10.0.0.5]\n",
                "pool b: addresses[0] (10.0.0.5-10.0.0.5) overlaps pool a's",
            ),
            (
                "start after end",
                "pools:\n  - name: a\n    addresses: [10.0.0.9-10.0.0.1]\n",
                "pool a: addresses[0]: range \"10.0.0.9-10.0.0.1\" starts after it ends",
            ),
            ("alias", "pools: &p []\nother: *p\n", "lb.yaml"),
        ];
        for (name, text, want) in cases {
            let err = parse_pools(Path::new("lb.yaml"), text)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{name}: {err}");
            assert!(err.contains("lb.yaml"), "{name}: {err}");
        }
    }
}
