//! The serving flags every shim shares (`#[command(flatten)]` them into the shim's own flags).

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use cpi_transport::{Listen, ServerTls, TlsFiles};

use crate::error::ShimError;
use crate::fence::{DEFAULT_FENCE_LEASE, parse_fence_lease};

/// Where the gRPC service listens and how it shuts down.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeFlags {
    /// Address of the mTLS gRPC listener.
    #[arg(long, default_value = "0.0.0.0:10270")]
    pub bind_address: SocketAddr,

    /// Serve plaintext gRPC on this Unix socket instead of mTLS TCP (sidecar deployments).
    #[arg(long, value_name = "PATH", conflicts_with_all = [
        "bind_address", "tls_cert_file", "tls_private_key_file", "client_ca_file",
        "allowed_client_sans",
    ])]
    pub unix_socket: Option<PathBuf>,

    /// PEM certificate chain of the gRPC server.
    #[arg(long, value_name = "PATH")]
    pub tls_cert_file: Option<PathBuf>,

    /// PEM private key of --tls-cert-file.
    #[arg(long, value_name = "PATH")]
    pub tls_private_key_file: Option<PathBuf>,

    /// PEM CA bundle client certificates must chain to.
    #[arg(long, value_name = "PATH")]
    pub client_ca_file: Option<PathBuf>,

    /// Comma-separated SANs a client certificate must carry one of; empty accepts any
    /// certificate from the CA.
    #[arg(long, value_delimiter = ',', value_name = "SAN,...")]
    pub allowed_client_sans: Vec<String>,

    /// How often the TLS files are re-read.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub tls_reload_interval: Duration,

    /// Address of the plain-HTTP /metrics, /healthz, /readyz and /livez endpoint; "0" or ""
    /// disables it. Loopback by default: the endpoint has neither TLS nor authentication, so
    /// exposing it (e.g. 0.0.0.0:10271 for Prometheus or HTTP probes) is an explicit choice.
    #[arg(long, default_value = "127.0.0.1:10271")]
    pub metrics_bind_address: MetricsBind,

    /// How long in-flight calls may run after SIGTERM before they are abandoned.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_grace_period: Duration,

    /// The Lease mutating calls are fenced on, as the controller-manager's
    /// --leader-elect-resource-namespace/--leader-elect-resource-name; a fence naming another
    /// lease is refused. `none` turns fencing off, for one controller-manager run with
    /// --leader-elect=false (which sends no fence).
    #[arg(
        long,
        value_name = "NAMESPACE/NAME",
        default_value = DEFAULT_FENCE_LEASE,
        value_parser = parse_fence_lease,
    )]
    pub fence_lease: String,
}

impl Default for ServeFlags {
    fn default() -> Self {
        Self {
            bind_address: SocketAddr::from(([0, 0, 0, 0], 10270)),
            unix_socket: None,
            tls_cert_file: None,
            tls_private_key_file: None,
            client_ca_file: None,
            allowed_client_sans: Vec::new(),
            tls_reload_interval: Duration::from_secs(10),
            metrics_bind_address: MetricsBind(Some(SocketAddr::from(([127, 0, 0, 1], 10271)))),
            shutdown_grace_period: Duration::from_secs(30),
            fence_lease: DEFAULT_FENCE_LEASE.to_string(),
        }
    }
}

impl ServeFlags {
    /// Flags serving plaintext on `path` with metrics disabled, for tests and sidecars.
    pub fn unix(path: impl Into<PathBuf>) -> Self {
        Self {
            unix_socket: Some(path.into()),
            metrics_bind_address: MetricsBind(None),
            ..Self::default()
        }
    }

    /// Resolves the listener, loading TLS material now so bad files fail start-up.
    pub fn listen(&self) -> Result<Listen, ShimError> {
        if let Some(path) = &self.unix_socket {
            let tls_flags = [
                ("--tls-cert-file", self.tls_cert_file.is_some()),
                (
                    "--tls-private-key-file",
                    self.tls_private_key_file.is_some(),
                ),
                ("--client-ca-file", self.client_ca_file.is_some()),
                (
                    "--allowed-client-sans",
                    !self.allowed_client_sans.is_empty(),
                ),
            ];
            let given: Vec<&str> = tls_flags
                .iter()
                .filter(|(_, set)| *set)
                .map(|(name, _)| *name)
                .collect();
            if !given.is_empty() {
                return Err(ShimError::ConflictingListen(given.join(", ")));
            }
            return Ok(Listen::Unix { path: path.clone() });
        }
        let (Some(cert), Some(key), Some(ca)) = (
            &self.tls_cert_file,
            &self.tls_private_key_file,
            &self.client_ca_file,
        ) else {
            let missing: Vec<&str> = [
                ("--tls-cert-file", self.tls_cert_file.is_none()),
                (
                    "--tls-private-key-file",
                    self.tls_private_key_file.is_none(),
                ),
                ("--client-ca-file", self.client_ca_file.is_none()),
            ]
            .iter()
            .filter(|(_, absent)| *absent)
            .map(|(name, _)| *name)
            .collect();
            let verb = if missing.len() == 1 { "is" } else { "are" };
            return Err(ShimError::MissingTls {
                missing: format!("{} {verb}", missing.join(", ")),
            });
        };
        let tls = ServerTls::new(
            TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            },
            self.allowed_client_sans.clone(),
            self.tls_reload_interval,
        )?;
        Ok(Listen::Tls {
            addr: self.bind_address,
            tls,
        })
    }
}

/// `--metrics-bind-address`: an address, or disabled (`0` or empty).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsBind(pub Option<SocketAddr>);

impl FromStr for MetricsBind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() || s == "0" {
            return Ok(Self(None));
        }
        s.parse::<SocketAddr>()
            .map(|addr| Self(Some(addr)))
            .map_err(|err| {
                format!("{s:?} is not an address like 0.0.0.0:10271 (or 0 to disable): {err}")
            })
    }
}

impl fmt::Display for MetricsBind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(addr) => write!(f, "{addr}"),
            None => f.write_str("0"),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        serve: ServeFlags,
    }

    #[test]
    fn defaults_match_upstream_style_ports() {
        let cli = Cli::try_parse_from(["shim"]).unwrap();
        let d = ServeFlags::default();
        assert_eq!(cli.serve.bind_address, d.bind_address);
        assert_eq!(cli.serve.metrics_bind_address, d.metrics_bind_address);
        assert_eq!(cli.serve.tls_reload_interval, d.tls_reload_interval);
        assert_eq!(cli.serve.shutdown_grace_period, d.shutdown_grace_period);
        assert_eq!(cli.serve.fence_lease, d.fence_lease);
    }

    #[test]
    fn parses_every_flag() {
        let cli = Cli::try_parse_from([
            "shim",
            "--bind-address=127.0.0.1:9000",
            "--tls-cert-file=c.pem",
            "--tls-private-key-file=k.pem",
            "--client-ca-file=ca.pem",
            "--allowed-client-sans=ccm.kube-system.svc,webhook",
            "--tls-reload-interval=1m",
            "--metrics-bind-address=0",
            "--shutdown-grace-period=5s",
            "--fence-lease=infra/my-ccm",
        ])
        .unwrap();
        assert_eq!(
            cli.serve.allowed_client_sans,
            vec!["ccm.kube-system.svc", "webhook"]
        );
        assert_eq!(cli.serve.tls_reload_interval, Duration::from_secs(60));
        assert_eq!(cli.serve.metrics_bind_address, MetricsBind(None));
        assert_eq!(cli.serve.shutdown_grace_period, Duration::from_secs(5));
        assert_eq!(cli.serve.fence_lease, "infra/my-ccm");
    }

    #[test]
    fn bad_values_fail_fast() {
        for args in [
            ["shim", "--shutdown-grace-period=soon"],
            ["shim", "--metrics-bind-address=localhost"],
            ["shim", "--bind-address=nowhere"],
            ["shim", "--fence-lease=cloud-controller-manager"],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?}");
        }
        assert!(Cli::try_parse_from(["shim", "--unix-socket=/s", "--tls-cert-file=c"]).is_err());
        let off = Cli::try_parse_from(["shim", "--fence-lease=none"]).map(|c| c.serve.fence_lease);
        assert_eq!(off.ok().as_deref(), Some("none"));
        assert!(
            Cli::try_parse_from(["shim", "--unix-socket=/s", "--metrics-bind-address="]).is_ok()
        );
    }

    #[test]
    fn missing_tls_names_the_flags() {
        let flags = ServeFlags {
            tls_cert_file: Some("c.pem".into()),
            ..ServeFlags::default()
        };
        let msg = flags.listen().err().unwrap().to_string();
        assert!(
            msg.contains("--tls-private-key-file, --client-ca-file are"),
            "{msg}"
        );
        assert!(msg.contains("--unix-socket"), "{msg}");
    }

    #[test]
    fn unix_socket_needs_no_tls() {
        assert!(matches!(
            ServeFlags::unix("/tmp/x.sock").listen(),
            Ok(Listen::Unix { .. })
        ));
    }
}
