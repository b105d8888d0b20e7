//! Fencing of mutating calls by the caller's leader lease.
//!
//! Each mutating request carries the `Fence` its caller acquired with its lease: lease name,
//! holder, `lease_transitions` and the Lease's UID. A fence is only what its caller claims, so
//! the guard trusts it no further than it has to. It fences on one lease, the one named by
//! `--fence-lease`, and keeps one [`FenceMark`] for it: the UID, transitions and holder of the
//! newest term it accepted. Each fence is judged in this order:
//!
//! 1. **Another lease** than `--fence-lease`: refused as `InvalidObject` on `fence.lease`, the
//!    message naming the expected lease. Nothing is stored, so the store holds one row whatever
//!    callers send.
//! 2. **An absurd jump**: more than [`MAX_TRANSITIONS_JUMP`] above the mark's transitions when
//!    the UID is the mark's, or above 0 when it is not (a new generation starts at 0): refused as
//!    `InvalidObject` on `fence.lease_transitions`. A real leader's count grows by one per
//!    leadership change, so no real leader gets that far past the last term the shim saw;
//!    `i64::MAX` cannot lock the lease.
//! 3. **Another lease UID** than the mark's (or no mark yet): a new generation of the Lease,
//!    which was deleted and created again with its transitions back at 0. Accepted; it replaces
//!    the mark, so a recreated Lease does not lock out every future leader.
//! 4. **The mark's UID**: a lower `lease_transitions` is `StaleLeader` (a deposed leader), and
//!    so is an equal one from another holder (two holders cannot share a term); an equal one
//!    from the mark's holder is accepted; a higher one is accepted and raises the mark.
//!
//! The trade-off of rule 3, and why it is still the rule: Lease UIDs carry no order, so the
//! guard cannot tell the previous generation from the next one. After a generation change, a
//! deposed leader of the previous generation is accepted again (and switches the mark back),
//! and a caller sending a made-up UID opens a generation of its own. The alternatives lock the
//! lease instead: remembering retired UIDs lets one made-up UID retire the real one, and only
//! reading the Lease itself (API access from the shim) would tell the truth. A lockout stops
//! every cloud write until an operator acts, a reopened window lets through the late writes of
//! a replica that is stepping down anyway, so the guard errs on that side. Within rule 2's
//! bound a caller can still claim a term ahead of the real leader and lock it out; the way out
//! is deleting the Lease (a new generation, rule 3) or resetting the shim's marks (README,
//! "Resetting the fence"). The fence guards against a deposed leader's late writes; it is no
//! authorisation: which clients may call at all is the transport's business (mutual TLS with a
//! SAN allow-list).
//!
//! A call that passed the check before the successor's first call can still land: fencing
//! closes the window from the successor's first call on, not before it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use cpi_proto::CpiError;
use cpi_proto::v1::Fence;

use crate::validate::invalid;

/// The lease a shim fences on unless `--fence-lease` says otherwise: the controller-manager's
/// default `--leader-elect-resource-namespace`/`--leader-elect-resource-name`.
pub const DEFAULT_FENCE_LEASE: &str = "kube-system/cloud-controller-manager";

/// `--fence-lease` value that turns fencing off, for a single controller-manager run with
/// `--leader-elect=false`: such a caller holds no lease and sends no fence.
pub const NO_FENCE: &str = "none";

/// How far above the mark (or above 0, for a new lease generation) `lease_transitions` may be.
/// A million leadership changes, none of which made a mutating call, is about 23 days of a new
/// leader every two seconds (the default retry period): no real lease gets there.
pub const MAX_TRANSITIONS_JUMP: i64 = 1_000_000;

/// Longest `holder_identity` stored (upstream identities are `<hostname>_<uuid>`, under 300).
const MAX_HOLDER_IDENTITY_BYTES: usize = 1024;
/// Longest `lease_uid` stored (Kubernetes UIDs are 36-character UUIDs).
const MAX_LEASE_UID_BYTES: usize = 128;

/// Why a `--fence-lease` value is not `<namespace>/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not <namespace>/<name> of a Lease (for example {DEFAULT_FENCE_LEASE})")]
pub(crate) struct FenceLeaseError {
    /// The value given.
    value: String,
}

/// Parses `--fence-lease`: `<namespace>/<name>`, both Kubernetes names, or [`NO_FENCE`].
pub(crate) fn parse_fence_lease(s: &str) -> Result<String, FenceLeaseError> {
    if s == NO_FENCE {
        return Ok(s.to_string());
    }
    // Namespaces are DNS labels and Lease names DNS subdomains: at most 253 characters of
    // lower-case letters, digits, '-' and '.'.
    let is_name = |part: &str| {
        !part.is_empty()
            && part.len() <= 253
            && part
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
    };
    match s.split_once('/') {
        Some((namespace, name)) if is_name(namespace) && is_name(name) => Ok(s.to_string()),
        _ => Err(FenceLeaseError {
            value: s.to_string(),
        }),
    }
}

/// The newest term accepted for one lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceMark {
    /// `metadata.uid` of the Lease generation (empty for callers that do not send it).
    pub lease_uid: String,
    /// Highest `lease_transitions` accepted within that generation.
    pub lease_transitions: i64,
    /// The holder that presented it.
    pub holder_identity: String,
}

/// Failure of a [`FenceStore`]; the fenced call then fails as a retryable cloud error.
#[derive(Debug, thiserror::Error)]
#[error("fence store: {0}")]
pub struct FenceStoreError(pub Box<dyn std::error::Error + Send + Sync>);

impl FenceStoreError {
    /// Wraps any error.
    pub fn new(err: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self(err.into())
    }
}

/// Where fence marks live; a provider persists them so a shim restart cannot forget that a
/// leader was deposed. Calls may block (they run on the blocking pool). The guard only ever
/// passes its `--fence-lease`.
pub trait FenceStore: Send + Sync + 'static {
    /// The mark of `lease`, if any was ever stored.
    fn load(&self, lease: &str) -> Result<Option<FenceMark>, FenceStoreError>;
    /// Durably replaces the mark of `lease`.
    fn store(&self, lease: &str, mark: &FenceMark) -> Result<(), FenceStoreError>;
}

/// The default, process-lifetime [`FenceStore`].
#[derive(Debug, Default)]
pub struct MemoryFenceStore {
    marks: Mutex<HashMap<String, FenceMark>>,
}

impl FenceStore for MemoryFenceStore {
    fn load(&self, lease: &str) -> Result<Option<FenceMark>, FenceStoreError> {
        // Every write replaces one whole entry: a poisoned map is still consistent.
        let marks = self.marks.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(marks.get(lease).cloned())
    }

    fn store(&self, lease: &str, mark: &FenceMark) -> Result<(), FenceStoreError> {
        let mut marks = self.marks.lock().unwrap_or_else(PoisonError::into_inner);
        marks.insert(lease.to_string(), mark.clone());
        Ok(())
    }
}

/// What the guard decides about one fence of the expected lease.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Same generation, term and holder as the mark.
    Accept,
    /// Same generation, newer term: accept and raise the mark.
    Raise,
    /// First fence seen, or another lease UID: accept and replace the mark.
    NewGeneration,
    /// Older than the mark, or the mark's term claimed by another holder.
    Stale(String),
    /// More than [`MAX_TRANSITIONS_JUMP`] above `base`.
    Implausible {
        /// The mark's transitions (same generation) or 0 (new generation).
        base: i64,
    },
}

fn judge(mark: Option<&FenceMark>, fence: &Fence) -> Verdict {
    let same_generation = mark.filter(|mark| mark.lease_uid == fence.lease_uid);
    let base = same_generation.map_or(0, |mark| mark.lease_transitions);
    if fence.lease_transitions > base.saturating_add(MAX_TRANSITIONS_JUMP) {
        return Verdict::Implausible { base };
    }
    let Some(mark) = same_generation else {
        return Verdict::NewGeneration;
    };
    if fence.lease_transitions > mark.lease_transitions {
        Verdict::Raise
    } else if fence.lease_transitions < mark.lease_transitions {
        Verdict::Stale(format!(
            "lease {:?} (uid {:?}): transitions {} of {:?} is older than {} of {:?}",
            fence.lease,
            fence.lease_uid,
            fence.lease_transitions,
            fence.holder_identity,
            mark.lease_transitions,
            mark.holder_identity
        ))
    } else if fence.holder_identity != mark.holder_identity {
        // Two holders cannot share one term; the first one seen keeps it.
        Verdict::Stale(format!(
            "lease {:?} (uid {:?}): transitions {} is held by {:?}, not {:?}",
            fence.lease,
            fence.lease_uid,
            fence.lease_transitions,
            mark.holder_identity,
            fence.holder_identity
        ))
    } else {
        Verdict::Accept
    }
}

/// Checks the fields of `fence` that do not depend on the mark.
fn check_shape<'a>(fence: Option<&'a Fence>, lease: &str) -> Result<&'a Fence, CpiError> {
    let fence = fence.ok_or_else(|| invalid("fence", "is required on mutating calls"))?;
    if fence.lease != lease {
        tracing::warn!(
            lease = %fence.lease,
            expected = %lease,
            holder = %fence.holder_identity,
            "refused a fence for another lease"
        );
        return Err(invalid(
            "fence.lease",
            format!(
                "is {:?}, but this shim fences on the lease {:?} (--fence-lease); the \
                 controller-manager's --leader-elect-resource-namespace/-name must name it",
                fence.lease, lease
            ),
        ));
    }
    if fence.holder_identity.is_empty() {
        return Err(invalid("fence.holder_identity", "must not be empty"));
    }
    if fence.holder_identity.len() > MAX_HOLDER_IDENTITY_BYTES {
        return Err(invalid(
            "fence.holder_identity",
            format!("must not be longer than {MAX_HOLDER_IDENTITY_BYTES} bytes"),
        ));
    }
    if fence.lease_uid.len() > MAX_LEASE_UID_BYTES {
        return Err(invalid(
            "fence.lease_uid",
            format!("must not be longer than {MAX_LEASE_UID_BYTES} bytes"),
        ));
    }
    if fence.lease_transitions < 0 {
        return Err(invalid("fence.lease_transitions", "must not be negative"));
    }
    Ok(fence)
}

/// The guard's lease and its cached mark.
struct GuardState {
    lease: String,
    /// The mark of `lease` once loaded or stored; `None` is read from the store again.
    mark: Option<FenceMark>,
}

/// Checks fences against the mark of the one lease it fences on, kept in a [`FenceStore`].
pub struct FenceGuard {
    store: Arc<dyn FenceStore>,
    // Held across load-compare-store so two racing fences cannot both raise the mark; only the
    // check is serialised, never the provider call behind it.
    state: tokio::sync::Mutex<GuardState>,
}

impl std::fmt::Debug for FenceGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FenceGuard").finish_non_exhaustive()
    }
}

impl FenceGuard {
    /// A guard over `store` fencing on [`DEFAULT_FENCE_LEASE`].
    pub fn new(store: Arc<dyn FenceStore>) -> Self {
        Self::for_lease(store, DEFAULT_FENCE_LEASE)
    }

    /// A guard over `store` fencing on `lease` (`<namespace>/<name>`).
    pub fn for_lease(store: Arc<dyn FenceStore>, lease: impl Into<String>) -> Self {
        Self {
            store,
            state: tokio::sync::Mutex::new(GuardState {
                lease: lease.into(),
                mark: None,
            }),
        }
    }

    /// The lease fenced on (`--fence-lease`), or [`NO_FENCE`].
    pub(crate) async fn lease(&self) -> String {
        self.state.lock().await.lease.clone()
    }

    /// Fences on `lease` from now on (the server applies `--fence-lease` when it starts).
    pub(crate) async fn set_lease(&self, lease: &str) {
        let mut state = self.state.lock().await;
        if state.lease != lease {
            *state = GuardState {
                lease: lease.to_string(),
                mark: None,
            };
        }
    }

    /// Accepts `fence` (recording its term when it is newer or of a new lease generation) or
    /// refuses it: absent, malformed, for another lease or an absurd jump → `InvalidObject`
    /// naming the field; older than the mark → `StaleLeader`; store failure → `Cloud`. The rules
    /// are in the module documentation.
    pub async fn check(&self, fence: Option<&Fence>) -> Result<(), CpiError> {
        let mut state = self.state.lock().await;
        if state.lease == NO_FENCE {
            // Fencing is off: there is no lease whose terms could order the callers.
            return Ok(());
        }
        let fence = check_shape(fence, &state.lease)?;
        let mark = match &state.mark {
            Some(mark) => Some(mark.clone()),
            None => {
                let loaded = self.blocking_load(&state.lease).await?;
                state.mark.clone_from(&loaded);
                loaded
            }
        };
        match judge(mark.as_ref(), fence) {
            Verdict::Accept => Ok(()),
            Verdict::Stale(message) => Err(CpiError::StaleLeader(message)),
            Verdict::Implausible { base } => {
                tracing::warn!(
                    lease = %fence.lease,
                    lease_uid = %fence.lease_uid,
                    lease_transitions = fence.lease_transitions,
                    holder = %fence.holder_identity,
                    base,
                    "refused a fence jumping implausibly far"
                );
                Err(invalid(
                    "fence.lease_transitions",
                    format!(
                        "is {}, more than {MAX_TRANSITIONS_JUMP} above {base}, the highest this \
                         shim has accepted for lease uid {:?} (0 for a new uid); no real \
                         leader gets there (see README, \"Resetting the fence\")",
                        fence.lease_transitions, fence.lease_uid
                    ),
                ))
            }
            verdict @ (Verdict::Raise | Verdict::NewGeneration) => {
                let new = FenceMark {
                    lease_uid: fence.lease_uid.clone(),
                    lease_transitions: fence.lease_transitions,
                    holder_identity: fence.holder_identity.clone(),
                };
                // Persist before accepting: a mark accepted but lost on restart would let the
                // deposed leader back in.
                self.blocking_store(&state.lease, &new).await?;
                if verdict == Verdict::NewGeneration && mark.is_some() {
                    tracing::warn!(
                        lease = %fence.lease,
                        lease_uid = %fence.lease_uid,
                        previous_uid = mark.as_ref().map_or("", |m| m.lease_uid.as_str()),
                        lease_transitions = fence.lease_transitions,
                        holder = %fence.holder_identity,
                        "new lease generation (the Lease was recreated); fence mark replaced"
                    );
                } else {
                    tracing::info!(
                        lease = %fence.lease,
                        lease_uid = %fence.lease_uid,
                        lease_transitions = fence.lease_transitions,
                        holder = %fence.holder_identity,
                        "fence raised"
                    );
                }
                state.mark = Some(new);
                Ok(())
            }
        }
    }

    async fn blocking_load(&self, lease: &str) -> Result<Option<FenceMark>, CpiError> {
        let store = Arc::clone(&self.store);
        let lease = lease.to_string();
        tokio::task::spawn_blocking(move || store.load(&lease))
            .await
            .map_err(|err| CpiError::Cloud(format!("fence store task failed: {err}")))?
            .map_err(|err| CpiError::Cloud(err.to_string()))
    }

    async fn blocking_store(&self, lease: &str, mark: &FenceMark) -> Result<(), CpiError> {
        let store = Arc::clone(&self.store);
        let lease = lease.to_string();
        let mark = mark.clone();
        tokio::task::spawn_blocking(move || store.store(&lease, &mark))
            .await
            .map_err(|err| CpiError::Cloud(format!("fence store task failed: {err}")))?
            .map_err(|err| CpiError::Cloud(err.to_string()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const UID: &str = "uid-1";

    fn fence(uid: &str, transitions: i64, holder: &str) -> Fence {
        Fence {
            lease: DEFAULT_FENCE_LEASE.into(),
            holder_identity: holder.into(),
            lease_transitions: transitions,
            lease_uid: uid.into(),
        }
    }

    fn mark(uid: &str, transitions: i64, holder: &str) -> FenceMark {
        FenceMark {
            lease_uid: uid.into(),
            lease_transitions: transitions,
            holder_identity: holder.into(),
        }
    }

    #[test]
    fn judge_within_one_generation() {
        let m = mark(UID, 3, "a");
        assert_eq!(judge(Some(&m), &fence(UID, 4, "b")), Verdict::Raise);
        assert_eq!(judge(Some(&m), &fence(UID, 3, "a")), Verdict::Accept);
        assert!(matches!(
            judge(Some(&m), &fence(UID, 2, "a")),
            Verdict::Stale(_)
        ));
        assert!(matches!(
            judge(Some(&m), &fence(UID, 3, "b")),
            Verdict::Stale(_)
        ));
    }

    #[test]
    fn judge_new_generations() {
        assert_eq!(judge(None, &fence(UID, 0, "a")), Verdict::NewGeneration);
        // A recreated Lease starts over at 0 under a new UID.
        let m = mark(UID, 7, "a");
        assert_eq!(
            judge(Some(&m), &fence("uid-2", 0, "b")),
            Verdict::NewGeneration
        );
        // Callers older than lease_uid send none: the empty UID is a generation of its own.
        assert_eq!(judge(Some(&m), &fence("", 2, "b")), Verdict::NewGeneration);
        assert_eq!(
            judge(Some(&mark("", 2, "b")), &fence("", 2, "b")),
            Verdict::Accept
        );
    }

    #[test]
    fn judge_bounds_the_jump() {
        let m = mark(UID, 3, "a");
        let top = 3 + MAX_TRANSITIONS_JUMP;
        assert_eq!(judge(Some(&m), &fence(UID, top, "b")), Verdict::Raise);
        assert_eq!(
            judge(Some(&m), &fence(UID, top + 1, "b")),
            Verdict::Implausible { base: 3 }
        );
        assert_eq!(
            judge(Some(&m), &fence(UID, i64::MAX, "b")),
            Verdict::Implausible { base: 3 }
        );
        // A new generation is measured from 0.
        assert_eq!(
            judge(Some(&m), &fence("uid-2", MAX_TRANSITIONS_JUMP + 1, "b")),
            Verdict::Implausible { base: 0 }
        );
        assert_eq!(
            judge(None, &fence(UID, i64::MAX, "b")),
            Verdict::Implausible { base: 0 }
        );
        // A mark near the top cannot overflow the bound.
        let high = mark(UID, i64::MAX - 1, "a");
        assert_eq!(
            judge(Some(&high), &fence(UID, i64::MAX, "b")),
            Verdict::Raise
        );
    }

    #[tokio::test]
    async fn guard_persists_raised_marks() {
        let store = Arc::new(MemoryFenceStore::default());
        let guard = FenceGuard::new(store.clone());
        guard.check(Some(&fence(UID, 5, "b"))).await.unwrap();
        assert_eq!(
            store.load(DEFAULT_FENCE_LEASE).unwrap(),
            Some(mark(UID, 5, "b"))
        );
        // A fresh guard over the same store (a restarted shim) still refuses the old leader.
        let restarted = FenceGuard::new(store.clone());
        assert!(matches!(
            restarted.check(Some(&fence(UID, 4, "a"))).await,
            Err(CpiError::StaleLeader(_))
        ));
        // A new generation replaces the mark.
        restarted
            .check(Some(&fence("uid-2", 0, "c")))
            .await
            .unwrap();
        assert_eq!(
            store.load(DEFAULT_FENCE_LEASE).unwrap(),
            Some(mark("uid-2", 0, "c"))
        );
    }

    #[tokio::test]
    async fn refused_fences_store_nothing() {
        let store = Arc::new(MemoryFenceStore::default());
        let guard = FenceGuard::new(store.clone());
        let mut other = fence(UID, 1, "a");
        other.lease = "kube-system/other".into();
        assert!(guard.check(Some(&other)).await.is_err());
        assert!(guard.check(Some(&fence(UID, i64::MAX, "a"))).await.is_err());
        assert_eq!(store.load("kube-system/other").unwrap(), None);
        assert_eq!(store.load(DEFAULT_FENCE_LEASE).unwrap(), None);
    }

    #[tokio::test]
    async fn fencing_off_accepts_calls_without_a_fence_and_stores_nothing() {
        let store = Arc::new(MemoryFenceStore::default());
        let guard = FenceGuard::new(store.clone());
        assert!(
            guard.check(None).await.is_err(),
            "a fence is required by default"
        );
        guard.set_lease(NO_FENCE).await;
        guard.check(None).await.unwrap();
        guard.check(Some(&fence(UID, 3, "a"))).await.unwrap();
        assert_eq!(store.load(NO_FENCE).unwrap(), None);
        assert_eq!(store.load(DEFAULT_FENCE_LEASE).unwrap(), None);
    }

    #[tokio::test]
    async fn set_lease_switches_the_fenced_lease() {
        let guard = FenceGuard::new(Arc::new(MemoryFenceStore::default()));
        guard.check(Some(&fence(UID, 5, "a"))).await.unwrap();
        guard.set_lease("infra/ccm").await;
        assert!(guard.check(Some(&fence(UID, 5, "a"))).await.is_err());
        let mut pinned = fence(UID, 1, "a");
        pinned.lease = "infra/ccm".into();
        guard.check(Some(&pinned)).await.unwrap();
    }

    #[tokio::test]
    async fn malformed_fences_name_their_field() {
        let guard = FenceGuard::new(Arc::new(MemoryFenceStore::default()));
        let mut other = fence(UID, 1, "a");
        other.lease = String::new();
        for (f, field) in [
            (None, "fence"),
            (Some(other), "fence.lease"),
            (Some(fence(UID, 1, "")), "fence.holder_identity"),
            (
                Some(fence(UID, 1, &"h".repeat(1025))),
                "fence.holder_identity",
            ),
            (Some(fence(&"u".repeat(129), 1, "a")), "fence.lease_uid"),
            (Some(fence(UID, -1, "a")), "fence.lease_transitions"),
        ] {
            match guard.check(f.as_ref()).await {
                Err(CpiError::InvalidObject { field: got, .. }) => assert_eq!(got, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn fence_lease_is_namespace_and_name() {
        assert_eq!(
            parse_fence_lease(DEFAULT_FENCE_LEASE).unwrap(),
            DEFAULT_FENCE_LEASE
        );
        assert_eq!(
            parse_fence_lease("kube-system/ccm-e2e").unwrap(),
            "kube-system/ccm-e2e"
        );
        for bad in [
            "",
            "ccm",
            "/ccm",
            "kube-system/",
            "a/b/c",
            "Kube/ccm",
            "a b/c",
        ] {
            let err = parse_fence_lease(bad).unwrap_err().to_string();
            assert!(err.contains(DEFAULT_FENCE_LEASE), "{bad:?}: {err}");
        }
    }
}
