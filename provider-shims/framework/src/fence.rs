//! Fencing of mutating calls by the caller's leader lease.
//!
//! Each mutating request carries the `Fence` its caller acquired with its lease. The guard keeps,
//! per lease, the highest `lease_transitions` seen and the holder that presented it, and refuses
//! older fences with `STALE_LEADER`, so a deposed leader's writes cannot land after its
//! successor has spoken. A call that passed the check before the successor's first call can still
//! land: fencing closes the window from the successor's first call on, not before it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cpi_proto::CpiError;
use cpi_proto::v1::Fence;

use crate::validate::invalid;

/// The high-water mark of one lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceMark {
    /// Highest `lease_transitions` accepted.
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
/// leader was deposed. Calls may block (they run on the blocking pool).
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
        let marks = self
            .marks
            .lock()
            .map_err(|_| FenceStoreError::new("memory fence store poisoned"))?;
        Ok(marks.get(lease).cloned())
    }

    fn store(&self, lease: &str, mark: &FenceMark) -> Result<(), FenceStoreError> {
        let mut marks = self
            .marks
            .lock()
            .map_err(|_| FenceStoreError::new("memory fence store poisoned"))?;
        marks.insert(lease.to_string(), mark.clone());
        Ok(())
    }
}

/// What the guard decides about one fence.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Same lease generation and holder as the mark.
    Accept,
    /// Newer than the mark (or first seen): accept and raise the mark.
    Raise,
    /// Older than the mark, or the same generation claimed by another holder.
    Stale(String),
}

fn judge(mark: Option<&FenceMark>, fence: &Fence) -> Verdict {
    let Some(mark) = mark else {
        return Verdict::Raise;
    };
    if fence.lease_transitions > mark.lease_transitions {
        Verdict::Raise
    } else if fence.lease_transitions < mark.lease_transitions {
        Verdict::Stale(format!(
            "lease {:?}: transitions {} of {:?} is older than {} of {:?}",
            fence.lease,
            fence.lease_transitions,
            fence.holder_identity,
            mark.lease_transitions,
            mark.holder_identity
        ))
    } else if fence.holder_identity != mark.holder_identity {
        // Two holders cannot share one generation; the first one seen keeps it.
        Verdict::Stale(format!(
            "lease {:?}: transitions {} is held by {:?}, not {:?}",
            fence.lease, fence.lease_transitions, mark.holder_identity, fence.holder_identity
        ))
    } else {
        Verdict::Accept
    }
}

/// Checks fences against the per-lease high-water marks of a [`FenceStore`].
pub struct FenceGuard {
    store: Arc<dyn FenceStore>,
    // Held across load-compare-store so two racing fences cannot both raise the mark; only the
    // check is serialised, never the provider call behind it.
    cache: tokio::sync::Mutex<HashMap<String, FenceMark>>,
}

impl std::fmt::Debug for FenceGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FenceGuard").finish_non_exhaustive()
    }
}

impl FenceGuard {
    /// A guard over `store`.
    pub fn new(store: Arc<dyn FenceStore>) -> Self {
        Self {
            store,
            cache: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Accepts `fence` (raising its lease's mark when newer) or refuses it: absent or malformed
    /// → `InvalidObject`, older than the mark → `StaleLeader`, store failure → `Cloud`.
    pub async fn check(&self, fence: Option<&Fence>) -> Result<(), CpiError> {
        let fence = fence.ok_or_else(|| invalid("fence", "is required on mutating calls"))?;
        if fence.lease.is_empty() {
            return Err(invalid("fence.lease", "must not be empty"));
        }
        if fence.holder_identity.is_empty() {
            return Err(invalid("fence.holder_identity", "must not be empty"));
        }
        if fence.lease_transitions < 0 {
            return Err(invalid("fence.lease_transitions", "must not be negative"));
        }
        let mut cache = self.cache.lock().await;
        let mark = match cache.get(&fence.lease) {
            Some(mark) => Some(mark.clone()),
            None => {
                let loaded = self.blocking_load(&fence.lease).await?;
                if let Some(mark) = &loaded {
                    cache.insert(fence.lease.clone(), mark.clone());
                }
                loaded
            }
        };
        match judge(mark.as_ref(), fence) {
            Verdict::Accept => Ok(()),
            Verdict::Stale(message) => Err(CpiError::StaleLeader(message)),
            Verdict::Raise => {
                let mark = FenceMark {
                    lease_transitions: fence.lease_transitions,
                    holder_identity: fence.holder_identity.clone(),
                };
                // Persist before accepting: a mark accepted but lost on restart would let the
                // deposed leader back in.
                self.blocking_store(&fence.lease, &mark).await?;
                tracing::info!(
                    lease = %fence.lease,
                    lease_transitions = fence.lease_transitions,
                    holder = %fence.holder_identity,
                    "fence raised"
                );
                cache.insert(fence.lease.clone(), mark);
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

    fn fence(transitions: i64, holder: &str) -> Fence {
        Fence {
            lease: "kube-system/ccm".into(),
            holder_identity: holder.into(),
            lease_transitions: transitions,
        }
    }

    fn mark(transitions: i64, holder: &str) -> FenceMark {
        FenceMark {
            lease_transitions: transitions,
            holder_identity: holder.into(),
        }
    }

    #[test]
    fn judge_table() {
        assert_eq!(judge(None, &fence(0, "a")), Verdict::Raise);
        assert_eq!(judge(Some(&mark(3, "a")), &fence(4, "b")), Verdict::Raise);
        assert_eq!(judge(Some(&mark(3, "a")), &fence(3, "a")), Verdict::Accept);
        assert!(matches!(
            judge(Some(&mark(3, "a")), &fence(2, "a")),
            Verdict::Stale(_)
        ));
        assert!(matches!(
            judge(Some(&mark(3, "a")), &fence(3, "b")),
            Verdict::Stale(_)
        ));
    }

    #[tokio::test]
    async fn guard_persists_raised_marks() {
        let store = Arc::new(MemoryFenceStore::default());
        let guard = FenceGuard::new(store.clone());
        guard.check(Some(&fence(5, "b"))).await.unwrap();
        assert_eq!(store.load("kube-system/ccm").unwrap(), Some(mark(5, "b")));
        // A fresh guard over the same store (a restarted shim) still refuses the old leader.
        let restarted = FenceGuard::new(store);
        assert!(matches!(
            restarted.check(Some(&fence(4, "a"))).await,
            Err(CpiError::StaleLeader(_))
        ));
    }

    #[tokio::test]
    async fn malformed_fences_name_their_field() {
        let guard = FenceGuard::new(Arc::new(MemoryFenceStore::default()));
        for (f, field) in [
            (None, "fence"),
            (Some(fence(1, "")), "fence.holder_identity"),
            (Some(fence(-1, "a")), "fence.lease_transitions"),
        ] {
            match guard.check(f.as_ref()).await {
                Err(CpiError::InvalidObject { field: got, .. }) => assert_eq!(got, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }
}
