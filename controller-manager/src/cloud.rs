//! The controller-manager's view of the provider shim: one multiplexed channel, the shim's
//! self-description, and typed calls that return [`CpiError`]s.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cpi_proto::CpiError;
use cpi_proto::v1::{
    self, Capability, GetProviderInfoRequest, ProviderInfo, instances_client::InstancesClient,
    instances_v2_client::InstancesV2Client, provider_client::ProviderClient,
    zones_client::ZonesClient,
};
use cpi_transport::{ClientEndpoint, ClientTls, ConnectOptions, CpiChannel, TlsFiles};
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::options::ProviderEndpoint;

/// Failure to reach or understand the shim at start-up.
#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    /// TLS material for the shim connection could not be loaded.
    #[error("provider TLS: {0}")]
    Tls(#[from] cpi_transport::TlsError),
    /// The channel could not be built.
    #[error("provider endpoint: {0}")]
    Connect(#[from] cpi_transport::ConnectError),
    /// The shim did not answer GetProviderInfo in time.
    #[error("provider shim at {endpoint} did not answer within {waited:?}: {last}")]
    Unreachable {
        /// Endpoint tried.
        endpoint: String,
        /// How long we tried.
        waited: Duration,
        /// Last error seen.
        last: CpiError,
    },
    /// The shim answered with something we cannot work with.
    #[error("provider shim at {endpoint}: {message}")]
    Incompatible {
        /// Endpoint tried.
        endpoint: String,
        /// What is wrong.
        message: String,
    },
}

/// A connected provider shim.
#[derive(Clone)]
pub struct Cloud {
    info: ProviderInfo,
    channel: CpiChannel,
}

impl Cloud {
    /// Builds the channel and reads ProviderInfo, retrying with backoff until `startup_timeout`
    /// (the shim may start after us).
    pub async fn connect(
        endpoint: &ProviderEndpoint,
        request_timeout: Duration,
        reload_interval: Duration,
        startup_timeout: Duration,
    ) -> Result<Self, CloudError> {
        let (client_endpoint, shown) = match endpoint {
            ProviderEndpoint::Unix(path) => (
                ClientEndpoint::Unix { path: path.clone() },
                format!("unix://{}", path.display()),
            ),
            ProviderEndpoint::Tls {
                uri,
                server_name,
                cert,
                key,
                ca,
            } => {
                let tls = ClientTls::new(
                    TlsFiles {
                        cert: cert.clone(),
                        key: key.clone(),
                        ca: ca.clone(),
                    },
                    server_name.clone(),
                    reload_interval,
                )?;
                (
                    ClientEndpoint::Tls {
                        uri: uri.clone(),
                        tls,
                    },
                    uri.clone(),
                )
            }
        };
        let channel = cpi_transport::client::connect(
            client_endpoint,
            ConnectOptions {
                request_timeout,
                ..ConnectOptions::default()
            },
        )?;
        let started = Instant::now();
        let mut delay = Duration::from_millis(200);
        let info = loop {
            match ProviderClient::new(channel.clone())
                .get_provider_info(GetProviderInfoRequest {})
                .await
            {
                Ok(response) => break response.into_inner(),
                Err(status) => {
                    let err = CpiError::from_status(&status);
                    if started.elapsed() + delay > startup_timeout {
                        return Err(CloudError::Unreachable {
                            endpoint: shown,
                            waited: started.elapsed(),
                            last: err,
                        });
                    }
                    warn!(endpoint = %shown, error = %err, "provider shim not ready yet; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        };
        if info.name.is_empty() {
            return Err(CloudError::Incompatible {
                endpoint: shown,
                message: "ProviderInfo.name is empty".into(),
            });
        }
        info!(
            provider = %info.name,
            shim_version = %info.shim_version,
            capabilities = ?capabilities(&info),
            "connected to provider shim"
        );
        Ok(Self { info, channel })
    }

    /// Asks the shim for its ProviderInfo again: a cheap end-to-end check that it answers.
    pub async fn probe(&self) -> Result<(), CpiError> {
        ProviderClient::new(self.channel.clone())
            .get_provider_info(GetProviderInfoRequest {})
            .await
            .map(drop)
            .map_err(|status| CpiError::from_status(&status))
    }

    /// A `/readyz` check fed by a background probe of the shim every `period`. It fails once
    /// [`ProbeHistory::FAILURES_TO_FAIL`] probes in a row went unanswered (one miss is
    /// tolerated: a shim restart should not flap readiness). The probe stops when the check is
    /// dropped.
    pub fn readiness_check(&self, period: Duration) -> crate::serve::Check {
        let history = Arc::new(Mutex::new(ProbeHistory::default()));
        let weak = Arc::downgrade(&history);
        let cloud = self.clone();
        tokio::spawn(async move {
            loop {
                let result = cloud.probe().await;
                let Some(history) = weak.upgrade() else {
                    return;
                };
                if let Ok(mut history) = history.lock() {
                    history.record(result);
                }
                drop(history);
                tokio::time::sleep(period).await;
            }
        });
        Arc::new(move || match history.lock() {
            Ok(history) => history.verdict(),
            Err(_) => Err("provider probe state poisoned".into()),
        })
    }

    /// The shim's self-description.
    pub fn info(&self) -> &ProviderInfo {
        &self.info
    }

    /// Services the shim implements.
    pub fn capabilities(&self) -> Vec<Capability> {
        capabilities(&self.info)
    }

    /// Whether the shim implements a service.
    pub fn has(&self, capability: Capability) -> bool {
        self.info.capabilities.contains(&(capability as i32))
    }

    /// Whether `provider_id` belongs to this provider (its prefix is one the shim claims).
    pub fn owns_provider_id(&self, provider_id: &str) -> bool {
        owns_provider_id(&self.info, provider_id)
    }

    /// Whether a Node is this provider's to manage: its providerID (if set) has a claimed
    /// prefix. Nodes without one yet are candidates (they are looked up by name).
    pub fn owns_node(&self, node: &crate::controllers::CachedNode) -> bool {
        node.provider_id()
            .is_none_or(|id| self.owns_provider_id(id))
    }

    /// InstancesV2 client over the shared channel.
    pub fn instances_v2(&self) -> InstancesV2Client<CpiChannel> {
        InstancesV2Client::new(self.channel.clone())
    }

    /// Legacy Instances client over the shared channel.
    pub fn instances(&self) -> InstancesClient<CpiChannel> {
        InstancesClient::new(self.channel.clone())
    }

    /// Legacy Zones client over the shared channel.
    pub fn zones(&self) -> ZonesClient<CpiChannel> {
        ZonesClient::new(self.channel.clone())
    }

    /// Whether objects handed to the shim should carry their raw JSON.
    pub fn wants_raw_objects(&self) -> bool {
        self.info.wants_raw_objects
    }
}

/// Awaits one CPI call, counts its outcome in `cloudprovider_requests_total{method,code}` and
/// decodes a failure into a [`CpiError`]. Every controller calls the shim through this.
pub async fn counted<T>(
    metrics: &Metrics,
    method: &str,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, CpiError> {
    match call.await {
        Ok(response) => {
            metrics.count_rpc(method, "OK");
            Ok(response.into_inner())
        }
        Err(status) => {
            let err = CpiError::from_status(&status);
            metrics.count_rpc(method, err.class());
            Err(err)
        }
    }
}

impl Cloud {
    /// Upstream `GetInstanceProviderID`: `<provider>://<InstanceID(node_name)>`; `None` when the
    /// provider answers an empty instance ID.
    pub async fn instance_provider_id(
        &self,
        metrics: &Metrics,
        node_name: &str,
        consistency: v1::Consistency,
    ) -> Result<Option<String>, CpiError> {
        let request = v1::NodeNameRequest {
            node_name: node_name.to_string(),
            consistency: consistency as i32,
        };
        let response = counted(
            metrics,
            "Instances/InstanceID",
            self.instances().instance_id(request),
        )
        .await?;
        Ok((!response.instance_id.is_empty())
            .then(|| cpi_proto::provider_id::join(&self.info.name, &response.instance_id)))
    }
}

fn capabilities(info: &ProviderInfo) -> Vec<Capability> {
    info.capabilities
        .iter()
        .filter_map(|c| Capability::try_from(*c).ok())
        .filter(|c| *c != Capability::Unspecified)
        .collect()
}

/// Ownership rule shared by every controller ([`cpi_proto::provider_id::strip_owned`]): a
/// providerID is ours when it starts with one of the prefixes the shim claims (default
/// `<name>://`).
pub fn owns_provider_id(info: &v1::ProviderInfo, provider_id: &str) -> bool {
    cpi_proto::provider_id::strip_owned(&info.name, &info.provider_id_prefixes, provider_id)
        .is_some()
}

/// Consecutive failed probes of the shim and the last error, behind the `/readyz` check.
#[derive(Debug, Default)]
pub struct ProbeHistory {
    consecutive_failures: u32,
    last_error: String,
}

impl ProbeHistory {
    /// Failed probes in a row after which the shim counts as down.
    pub const FAILURES_TO_FAIL: u32 = 2;

    /// Records one probe's outcome; a success forgets earlier failures.
    pub fn record(&mut self, result: Result<(), CpiError>) {
        match result {
            Ok(()) => *self = Self::default(),
            Err(err) => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                self.last_error = err.to_string();
            }
        }
    }

    /// The readiness verdict: an error naming the last failure once the shim counts as down.
    pub fn verdict(&self) -> Result<(), String> {
        if self.consecutive_failures >= Self::FAILURES_TO_FAIL {
            Err(format!(
                "provider shim not answering ({} probes in a row failed): {}",
                self.consecutive_failures, self.last_error
            ))
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ownership_defaults_to_provider_name_prefix() {
        let info = ProviderInfo {
            name: "local".into(),
            ..Default::default()
        };
        assert!(owns_provider_id(&info, "local://m-1"));
        assert!(!owns_provider_id(&info, "aws:///us-east-1a/i-1"));
        assert!(!owns_provider_id(&info, "localhost://x"));
    }

    #[test]
    fn ownership_uses_claimed_prefixes() {
        let info = ProviderInfo {
            name: "hcloud".into(),
            provider_id_prefixes: vec!["hcloud://".into(), "hrobot://".into()],
            ..Default::default()
        };
        assert!(owns_provider_id(&info, "hrobot://42"));
        assert!(!owns_provider_id(&info, "talos://x"));
    }

    fn unavailable() -> Result<(), CpiError> {
        Err(CpiError::from_status(&tonic::Status::unavailable(
            "connection refused",
        )))
    }

    #[test]
    fn one_failed_probe_is_tolerated() {
        let mut history = ProbeHistory::default();
        history.record(unavailable());
        assert_eq!(history.verdict(), Ok(()));
    }

    #[test]
    fn two_failed_probes_in_a_row_fail_with_the_last_error() {
        let mut history = ProbeHistory::default();
        history.record(unavailable());
        history.record(unavailable());
        let err = history.verdict().expect_err("down after two misses");
        assert!(err.contains("2 probes in a row"), "{err}");
        assert!(err.contains("connection refused"), "{err}");
    }

    #[test]
    fn a_success_resets_the_count() {
        let mut history = ProbeHistory::default();
        history.record(unavailable());
        history.record(Ok(()));
        history.record(unavailable());
        assert_eq!(history.verdict(), Ok(()));
    }
}
