//! The webhook's view of the provider shim: one lazily connected channel (the webhook starts,
//! and answers by its failure policy, while the shim is down), the shim's self-description
//! read on first use and refreshed by each readiness probe, and calls bounded by a deadline.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use cpi_proto::CpiError;
use cpi_proto::v1::{
    self as pb, Capability, GetProviderInfoRequest, ProviderInfo,
    load_balancer_validation_client::LoadBalancerValidationClient, provider_client::ProviderClient,
    volume_labels_client::VolumeLabelsClient,
};
use cpi_transport::{ConnectOptions, CpiChannel, ProviderEndpoint};

/// Why the shim gave no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ShimError {
    /// The shim did not answer in time.
    #[error("the provider shim at {endpoint} did not answer within {deadline:?}")]
    Timeout {
        /// Endpoint called.
        endpoint: String,
        /// Deadline that passed.
        deadline: Duration,
    },
    /// The call failed (unreachable shim, or an error of the provider).
    #[error("{0}")]
    Call(CpiError),
}

/// Failure to set up the shim client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// TLS material could not be loaded.
    #[error("provider TLS: {0}")]
    Tls(#[from] cpi_transport::TlsError),
    /// The channel could not be built.
    #[error("provider endpoint: {0}")]
    Connect(#[from] cpi_transport::ConnectError),
}

/// A provider shim, shared by every request.
#[derive(Clone)]
pub struct Shim {
    channel: CpiChannel,
    endpoint: String,
    info: Arc<Mutex<Option<Arc<ProviderInfo>>>>,
}

impl Shim {
    /// Builds the channel (no connection is made until the first call).
    pub fn new(
        endpoint: &ProviderEndpoint,
        reload_interval: Duration,
    ) -> Result<Self, ClientError> {
        let (client_endpoint, shown) = endpoint.client(reload_interval)?;
        let channel = cpi_transport::client::connect(client_endpoint, ConnectOptions::default())?;
        Ok(Self {
            channel,
            endpoint: shown,
            info: Arc::new(Mutex::new(None)),
        })
    }

    /// The endpoint, for messages.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The shim's self-description: cached, or asked for now.
    pub async fn info(&self, deadline: Duration) -> Result<Arc<ProviderInfo>, ShimError> {
        let cached = self
            .info
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        match cached {
            Some(info) => Ok(info),
            None => self.refresh_info(deadline).await,
        }
    }

    /// Asks the shim for its self-description and caches it (a restarted shim may have other
    /// capabilities; readiness probes call this).
    pub async fn refresh_info(&self, deadline: Duration) -> Result<Arc<ProviderInfo>, ShimError> {
        let mut client = ProviderClient::new(self.channel.clone());
        let info = Arc::new(
            self.call(
                deadline,
                client.get_provider_info(request(GetProviderInfoRequest {}, deadline)),
            )
            .await?,
        );
        *self.info.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(&info));
        Ok(info)
    }

    /// GetLabelsForVolume.
    pub async fn labels_for_volume(
        &self,
        volume: pb::PersistentVolume,
        deadline: Duration,
    ) -> Result<pb::GetLabelsForVolumeResponse, ShimError> {
        let mut client = VolumeLabelsClient::new(self.channel.clone());
        let message = pb::GetLabelsForVolumeRequest {
            volume: Some(volume),
        };
        self.call(
            deadline,
            client.get_labels_for_volume(request(message, deadline)),
        )
        .await
    }

    /// ValidateLoadBalancer.
    pub async fn validate_load_balancer(
        &self,
        message: pb::ValidateLoadBalancerRequest,
        deadline: Duration,
    ) -> Result<pb::ValidateLoadBalancerResponse, ShimError> {
        let mut client = LoadBalancerValidationClient::new(self.channel.clone());
        self.call(
            deadline,
            client.validate_load_balancer(request(message, deadline)),
        )
        .await
    }

    /// Awaits `call` for at most `deadline` (the gRPC deadline travels with the request too,
    /// so the shim stops working on it; this bound also covers connecting).
    async fn call<T>(
        &self,
        deadline: Duration,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, ShimError> {
        match tokio::time::timeout(deadline, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            // tonic reports its own expiry of the deadline as CANCELLED.
            Ok(Err(status))
                if matches!(
                    status.code(),
                    tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
                ) =>
            {
                Err(self.timeout(deadline))
            }
            Ok(Err(status)) => Err(ShimError::Call(CpiError::from_status(&status))),
            Err(_) => Err(self.timeout(deadline)),
        }
    }
}

impl Shim {
    fn timeout(&self, deadline: Duration) -> ShimError {
        ShimError::Timeout {
            endpoint: self.endpoint.clone(),
            deadline,
        }
    }
}

/// Whether `info` declares `capability`.
pub fn has_capability(info: &ProviderInfo, capability: Capability) -> bool {
    info.capabilities.contains(&(capability as i32))
}

fn request<T>(message: T, deadline: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(deadline);
    request
}
