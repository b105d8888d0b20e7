//! Leader election on a `coordination.k8s.io/v1` Lease, with client-go's semantics: expiry is
//! judged by when *we* last saw the record change (immune to clock skew), the leader renews
//! every retry period and gives up when it could not renew within the renew deadline.
//!
//! Acquiring yields a [`Fence`]: the lease transitions count at acquisition, carried by every
//! mutating CPI call so a shim can refuse a deposed leader's writes.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tracing::{debug, info, warn};

use crate::cloud::Fence;

/// Lease-lock settings (upstream `--leader-elect-*`).
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Lease namespace.
    pub namespace: String,
    /// Lease name.
    pub name: String,
    /// Our identity, `<hostname>_<uuid>` upstream.
    pub identity: String,
    /// How long a lease is valid after its last observed renewal.
    pub lease_duration: Duration,
    /// How long the leader keeps trying to renew before it steps down.
    pub renew_deadline: Duration,
    /// Pause between acquire/renew attempts.
    pub retry_period: Duration,
}

/// Why leadership ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Lost {
    /// Another replica holds the lease now.
    #[error("lease taken over by {0:?}")]
    TakenOver(String),
    /// No renewal succeeded within the renew deadline.
    #[error("could not renew the lease within {0:?}: {1}")]
    RenewDeadline(Duration, String),
}

/// Live leadership state, read by the health checks and metrics.
#[derive(Debug, Default)]
pub struct LeaderStatus {
    /// Whether we currently lead.
    pub leading: bool,
    /// When the lease was last renewed by us.
    pub last_renew: Option<Instant>,
}

/// Shared handle on [`LeaderStatus`].
pub type SharedStatus = Arc<Mutex<LeaderStatus>>;

/// Runs the acquire/renew protocol for one lease.
pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaseConfig,
    observed: Option<(LeaseSpec, Instant)>,
    status: SharedStatus,
}

/// Outcome of one acquire-or-renew attempt.
enum Attempt {
    Held(i64),
    HeldByOther(String),
    /// Someone wrote the lease between our read and our write; try again.
    Conflict,
}

impl LeaderElector {
    /// Creates an elector; nothing is written until [`acquire`](Self::acquire).
    pub fn new(client: kube::Client, config: LeaseConfig, status: SharedStatus) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: None,
            status,
        }
    }

    fn lease_key(&self) -> String {
        format!("{}/{}", self.config.namespace, self.config.name)
    }

    /// Waits until we hold the lease and returns the fence of this term.
    pub async fn acquire(&mut self) -> Fence {
        info!(lease = %self.lease_key(), identity = %self.config.identity, "attempting to acquire leader lease");
        loop {
            match self.try_acquire_or_renew().await {
                Ok(Attempt::Held(transitions)) => {
                    info!(lease = %self.lease_key(), identity = %self.config.identity, "successfully acquired lease");
                    self.set_status(true);
                    return Fence {
                        lease: self.lease_key(),
                        holder_identity: self.config.identity.clone(),
                        lease_transitions: transitions,
                    };
                }
                Ok(Attempt::HeldByOther(holder)) => {
                    debug!(%holder, "lease is held by another replica");
                }
                Ok(Attempt::Conflict) => debug!("lease changed while acquiring; retrying"),
                Err(err) => warn!(error = %err, lease = %self.lease_key(), "error acquiring lease"),
            }
            tokio::time::sleep(jitter(self.config.retry_period)).await;
        }
    }

    /// Renews the lease until leadership is lost; returns why.
    pub async fn hold(&mut self) -> Lost {
        let mut last_renew = Instant::now();
        let mut last_error = String::from("no attempt");
        loop {
            tokio::time::sleep(self.config.retry_period).await;
            let remaining = self
                .config
                .renew_deadline
                .saturating_sub(last_renew.elapsed());
            match tokio::time::timeout(remaining, self.try_acquire_or_renew()).await {
                Ok(Ok(Attempt::Held(_))) => {
                    last_renew = Instant::now();
                    self.set_status(true);
                }
                Ok(Ok(Attempt::HeldByOther(holder))) => {
                    self.set_status(false);
                    return Lost::TakenOver(holder);
                }
                Ok(Ok(Attempt::Conflict)) => last_error = "conflicting lease update".into(),
                Ok(Err(err)) => {
                    warn!(error = %err, "failed to renew lease");
                    last_error = err.to_string();
                }
                Err(_) => last_error = "renew attempt timed out".into(),
            }
            if last_renew.elapsed() >= self.config.renew_deadline {
                self.set_status(false);
                return Lost::RenewDeadline(self.config.renew_deadline, last_error);
            }
        }
    }

    /// Gives the lease up (on graceful shutdown) so a standby takes over at once.
    pub async fn release(&mut self) {
        self.set_status(false);
        let Ok(Some(mut lease)) = self.api.get_opt(&self.config.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => info!(lease = %self.lease_key(), "released leader lease"),
            Err(err) => warn!(error = %err, "failed to release leader lease"),
        }
    }

    fn set_status(&self, leading: bool) {
        // Both fields are plain values set whole: a poisoned status is still consistent.
        let mut status = self
            .status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        status.leading = leading;
        if leading {
            status.last_renew = Some(Instant::now());
        }
    }

    async fn try_acquire_or_renew(&mut self) -> Result<Attempt, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let duration_secs = i32::try_from(self.config.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            let spec = LeaseSpec {
                holder_identity: Some(self.config.identity.clone()),
                lease_duration_seconds: Some(duration_secs),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..Default::default()
            };
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(spec.clone()),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => {
                    self.observed = Some((spec, Instant::now()));
                    Ok(Attempt::Held(0))
                }
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(Attempt::Conflict),
                Err(err) => Err(err),
            };
        };
        let old = lease.spec.clone().unwrap_or_default();
        let changed = self.observed.as_ref().is_none_or(|(spec, _)| *spec != old);
        if changed {
            self.observed = Some((old.clone(), Instant::now()));
        }
        let holder = old.holder_identity.clone().unwrap_or_default();
        let ours = holder == self.config.identity;
        if !holder.is_empty() && !ours {
            let observed_at = self
                .observed
                .as_ref()
                .map_or_else(Instant::now, |(_, at)| *at);
            let their_duration = old
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(self.config.lease_duration, Duration::from_secs);
            if observed_at.elapsed() < their_duration {
                return Ok(Attempt::HeldByOther(holder));
            }
        }
        let transitions = old.lease_transitions.unwrap_or(0);
        let transitions = if ours {
            transitions
        } else {
            transitions.saturating_add(1)
        };
        let spec = LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(duration_secs),
            acquire_time: if ours {
                old.acquire_time.clone()
            } else {
                Some(now.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..old
        };
        lease.spec = Some(spec.clone());
        // resourceVersion stays set, so a concurrent writer makes this fail with 409.
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                self.observed = Some((spec, Instant::now()));
                Ok(Attempt::Held(i64::from(transitions)))
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(Attempt::Conflict),
            Err(err) => Err(err),
        }
    }
}

/// Adds up to 20% jitter so replicas do not retry in lock-step.
fn jitter(base: Duration) -> Duration {
    let extra = rand::random::<f64>() * 0.2;
    base.mul_f64(1.0 + extra)
}
