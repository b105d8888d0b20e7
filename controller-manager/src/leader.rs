//! Leader election on a `coordination.k8s.io/v1` Lease, with client-go's semantics: expiry is
//! judged by when *we* last saw the record change (immune to clock skew), the leader renews
//! every retry period and gives up when it could not renew within the renew deadline.
//!
//! Acquiring yields a [`Fence`]: the Lease's UID and transitions count at acquisition, carried
//! by every mutating CPI call so a shim can refuse a deposed leader's writes. The UID tells the
//! shim a Lease that was deleted and created again (its transitions restart at 0) from a
//! deposed leader; for the same reason a leader whose Lease is deleted under it stops leading
//! instead of recreating it under its old fence.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tracing::{debug, info, warn};

use crate::cloud::{Fence, Predecessor};

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
    /// The Lease was deleted (and maybe created again) while we held it: our fence names a
    /// lease generation that is gone.
    #[error("lease with uid {0:?} was deleted")]
    LeaseDeleted(String),
}

/// The predecessor when the Lease held `spec` just before we wrote ourselves into it as
/// `identity` (a released Lease has no holder; an expired one still names it).
pub fn predecessor_of(spec: &LeaseSpec, identity: &str) -> Predecessor {
    match spec.holder_identity.as_deref() {
        None | Some("") => Predecessor::None,
        Some(holder) if holder == identity => Predecessor::None,
        Some(holder) => Predecessor::Unreleased(holder.to_string()),
    }
}

/// A term just won: its fence and how the Lease came to us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acquired {
    /// What every mutating CPI call of this term carries.
    pub fence: Fence,
    /// Who held the Lease before us, if they may still write.
    pub predecessor: Predecessor,
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
    /// UID of the Lease we acquired, while we lead.
    held_uid: Option<String>,
}

/// The Lease generation and transitions count we hold.
struct Term {
    uid: String,
    transitions: i64,
    predecessor: Predecessor,
}

/// Outcome of one acquire-or-renew attempt.
enum Attempt {
    Held(Term),
    HeldByOther(String),
    /// Someone wrote the lease between our read and our write; try again.
    Conflict,
    /// The Lease we lead on does not exist any more.
    Deleted,
}

impl LeaderElector {
    /// Creates an elector; nothing is written until [`acquire`](Self::acquire).
    pub fn new(client: kube::Client, config: LeaseConfig, status: SharedStatus) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: None,
            status,
            held_uid: None,
        }
    }

    fn lease_key(&self) -> String {
        format!("{}/{}", self.config.namespace, self.config.name)
    }

    /// Waits until we hold the lease and returns the fence of this term and its predecessor.
    pub async fn acquire(&mut self) -> Acquired {
        info!(lease = %self.lease_key(), identity = %self.config.identity, "attempting to acquire leader lease");
        loop {
            match self.try_acquire_or_renew().await {
                Ok(Attempt::Held(term)) => {
                    info!(lease = %self.lease_key(), identity = %self.config.identity, lease_uid = %term.uid, predecessor = ?term.predecessor, "successfully acquired lease");
                    self.set_status(true);
                    self.held_uid = Some(term.uid.clone());
                    return Acquired {
                        fence: Fence {
                            lease: self.lease_key(),
                            holder_identity: self.config.identity.clone(),
                            lease_transitions: term.transitions,
                            lease_uid: term.uid,
                        },
                        predecessor: term.predecessor,
                    };
                }
                Ok(Attempt::HeldByOther(holder)) => {
                    debug!(%holder, "lease is held by another replica");
                }
                Ok(Attempt::Conflict) => debug!("lease changed while acquiring; retrying"),
                // Only while leading is a missing Lease not simply created.
                Ok(Attempt::Deleted) => debug!("lease deleted while acquiring; retrying"),
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
            let held_uid = self.held_uid.clone().unwrap_or_default();
            match tokio::time::timeout(remaining, self.try_acquire_or_renew()).await {
                Ok(Ok(Attempt::Held(term))) if term.uid == held_uid => {
                    last_renew = Instant::now();
                    self.set_status(true);
                }
                // Recreated between two renewals and taken by us: the fence we hand out names
                // the old generation, so this term is over all the same.
                Ok(Ok(Attempt::Held(_) | Attempt::Deleted)) => {
                    self.set_status(false);
                    self.held_uid = None;
                    return Lost::LeaseDeleted(held_uid);
                }
                Ok(Ok(Attempt::HeldByOther(holder))) => {
                    self.set_status(false);
                    self.held_uid = None;
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
                self.held_uid = None;
                return Lost::RenewDeadline(self.config.renew_deadline, last_error);
            }
        }
    }

    /// Gives the lease up (on graceful shutdown) so a standby takes over at once.
    pub async fn release(&mut self) {
        self.set_status(false);
        self.held_uid = None;
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
            if self.held_uid.is_some() {
                // Recreating it would lead on under a fence naming the deleted generation.
                return Ok(Attempt::Deleted);
            }
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
                Ok(created) => {
                    self.observed = Some((spec, Instant::now()));
                    Ok(Attempt::Held(Term {
                        uid: created.metadata.uid.unwrap_or_default(),
                        transitions: 0,
                        predecessor: Predecessor::None,
                    }))
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
        let predecessor = predecessor_of(&old, &self.config.identity);
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
            Ok(replaced) => {
                self.observed = Some((spec, Instant::now()));
                Ok(Attempt::Held(Term {
                    uid: replaced.metadata.uid.unwrap_or_default(),
                    transitions: i64::from(transitions),
                    predecessor,
                }))
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    //! The fence leader election hands out, against the real API server and a shim served by
    //! the shim framework (the fake provider) over a real socket.

    use super::*;
    use crate::cloud::{Cloud, CloudMetrics, ConnectSettings, ProviderEndpoint};
    use cpi_proto::CpiError;
    use cpi_proto::v1::AddSshKeyRequest;
    use fake_provider::FakeCloud;
    use kube::api::DeleteParams;
    use test_control_plane::ControlPlane;

    // The lease the shim framework fences on by default. No other test of this binary uses a
    // Lease, so the shared control plane is ours for it.
    const NAMESPACE: &str = "kube-system";
    const NAME: &str = "cloud-controller-manager";

    fn elector(client: &kube::Client, identity: &str) -> LeaderElector {
        elector_for(client, identity, Duration::from_secs(15))
    }

    /// An elector whose lease lapses `lease_duration` after its last renewal.
    fn elector_for(
        client: &kube::Client,
        identity: &str,
        lease_duration: Duration,
    ) -> LeaderElector {
        LeaderElector::new(
            client.clone(),
            LeaseConfig {
                namespace: NAMESPACE.into(),
                name: NAME.into(),
                identity: identity.into(),
                lease_duration,
                renew_deadline: Duration::from_secs(10).min(lease_duration),
                retry_period: Duration::from_millis(200),
            },
            SharedStatus::default(),
        )
    }

    async fn acquire(elector: &mut LeaderElector) -> Acquired {
        tokio::time::timeout(Duration::from_secs(30), elector.acquire())
            .await
            .expect("lease acquired")
    }

    fn spec(holder: Option<&str>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_string),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn no_predecessor_when_the_lease_is_free_released_or_ours() {
        assert_eq!(predecessor_of(&spec(None), "me"), Predecessor::None);
        assert_eq!(predecessor_of(&spec(Some("")), "me"), Predecessor::None);
        assert_eq!(predecessor_of(&spec(Some("me")), "me"), Predecessor::None);
    }

    #[test]
    fn an_expired_holder_is_an_unreleased_predecessor() {
        assert_eq!(
            predecessor_of(&spec(Some("other")), "me"),
            Predecessor::Unreleased("other".into())
        );
    }

    /// One mutating call (AddSSHKeyToAllInstances: the fake provider does not implement it, so
    /// a call that passes the fence fails with NOT_IMPLEMENTED).
    async fn mutate(cloud: &Cloud, fence: &Fence) -> Result<(), CpiError> {
        let request = AddSshKeyRequest {
            user: "core".into(),
            key_data: b"ssh-ed25519 AAAA".to_vec(),
            fence: Some(fence.clone()),
        };
        let mut instances = cloud.instances();
        let call = instances.add_ssh_key_to_all_instances(request);
        match cloud.call("Instances/AddSSHKeyToAllInstances", call).await {
            Ok(_) | Err(CpiError::NotImplemented(_)) => Ok(()),
            Err(err) => Err(err),
        }
    }

    async fn lease_uid(leases: &Api<Lease>) -> String {
        leases.get(NAME).await.unwrap().metadata.uid.unwrap()
    }

    #[tokio::test]
    async fn fences_name_the_lease_generation_and_a_recreated_lease_is_accepted() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let cp = ControlPlane::shared().await.unwrap();
        let client = cp.client().unwrap();
        let leases: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
        let _ = leases.delete(NAME, &DeleteParams::default()).await;
        let fake = FakeCloud::default().serve().await.unwrap();
        let cloud = Cloud::connect(
            &ProviderEndpoint::Unix(fake.socket_path().to_path_buf()),
            &ConnectSettings {
                request_timeout: Duration::from_secs(5),
                reload_interval: Duration::from_secs(10),
                startup_timeout: Duration::from_secs(5),
            },
            CloudMetrics::default(),
        )
        .await
        .unwrap();

        // A creates the Lease; its fence names the Lease and its UID.
        let mut a = elector(&client, "replica-a");
        let Acquired {
            fence: first,
            predecessor,
        } = acquire(&mut a).await;
        assert_eq!(predecessor, Predecessor::None, "A created the Lease");
        let uid = lease_uid(&leases).await;
        assert_eq!(first.lease, "kube-system/cloud-controller-manager");
        assert_eq!(
            (first.lease_uid.as_str(), first.lease_transitions),
            (uid.as_str(), 0)
        );
        mutate(&cloud, &first).await.expect("first leader");

        // A hands over to B: same generation, one transition later; A is deposed.
        a.release().await;
        let mut b = elector(&client, "replica-b");
        let Acquired {
            fence: second,
            predecessor,
        } = acquire(&mut b).await;
        assert_eq!(predecessor, Predecessor::None, "A released the Lease");
        assert_eq!(
            (second.lease_uid.as_str(), second.lease_transitions),
            (uid.as_str(), 1)
        );
        mutate(&cloud, &second).await.expect("second leader");
        let deposed = mutate(&cloud, &first).await;
        assert!(
            matches!(deposed, Err(CpiError::StaleLeader(_))),
            "{deposed:?}"
        );

        // A client claiming the real lease at i64::MAX is refused and does not lock B out.
        let forged = Fence {
            lease_transitions: i64::MAX,
            holder_identity: "rogue".into(),
            ..second.clone()
        };
        let refused = mutate(&cloud, &forged).await;
        assert!(
            matches!(refused, Err(CpiError::InvalidObject { .. })),
            "{refused:?}"
        );
        mutate(&cloud, &second).await.expect("B is not locked out");

        // The Lease is deleted: B stops leading rather than recreate it under its old fence.
        leases.delete(NAME, &DeleteParams::default()).await.unwrap();
        let lost = tokio::time::timeout(Duration::from_secs(5), b.hold())
            .await
            .expect("B notices the deletion within its renew deadline");
        assert_eq!(lost, Lost::LeaseDeleted(uid.clone()));
        assert!(
            leases.get_opt(NAME).await.unwrap().is_none(),
            "B recreated the Lease"
        );

        // C creates it again: a new UID, transitions back at 0, and the shim accepts it.
        // C's lease lapses a second after its last renewal.
        let mut c = elector_for(&client, "replica-c", Duration::from_secs(1));
        let Acquired {
            fence: third,
            predecessor,
        } = acquire(&mut c).await;
        assert_eq!(predecessor, Predecessor::None, "C created the Lease again");
        assert_ne!(third.lease_uid, uid);
        assert_eq!(
            (third.lease_uid.clone(), third.lease_transitions),
            (lease_uid(&leases).await, 0)
        );
        mutate(&cloud, &third)
            .await
            .expect("the recreated Lease's first leader is accepted");

        // C stops renewing without releasing: D takes the lapsed Lease over and learns that C
        // may still be writing.
        let mut d = elector(&client, "replica-d");
        let fourth = acquire(&mut d).await;
        assert_eq!(
            fourth.predecessor,
            Predecessor::Unreleased("replica-c".into())
        );
        assert_eq!(fourth.fence.lease_transitions, 1);
        d.release().await;
    }
}
