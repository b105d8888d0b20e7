//! The leader fence on mutating calls: every request that changes cloud state carries the
//! [`Fence`] of the caller's current leadership term, so a shim refuses a deposed leader's late
//! writes (the shim keeps the highest term it has seen per lease). [`Cloud::fenced`](super::Cloud::fenced)
//! stamps them.

use cpi_proto::v1;

/// Proof of leadership sent with every mutating CPI call: the CPI's own message.
pub type Fence = v1::Fence;

/// Whether a previous leader may still have writes in flight when a leadership term starts
/// (learnt when the Lease is acquired, told to the controllers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Predecessor {
    /// Nobody can: the Lease was created by us, free, released (no holder) or already ours,
    /// or leader election is off.
    None,
    /// We took the Lease over from this holder after it expired without being released: the
    /// holder may still be finishing writes it started.
    Unreleased(String),
}

/// A mutating CPI request: one with a `fence` field.
pub trait Fenced {
    /// Sets the request's fence.
    fn set_fence(&mut self, fence: Option<Fence>);
}

macro_rules! fenced {
    ($($request:ty),* $(,)?) => {
        $(impl Fenced for $request {
            fn set_fence(&mut self, fence: Option<Fence>) {
                self.fence = fence;
            }
        })*
    };
}

fenced!(
    v1::AddSshKeyRequest,
    v1::EnsureLoadBalancerRequest,
    v1::UpdateLoadBalancerRequest,
    v1::EnsureLoadBalancerDeletedRequest,
    v1::CreateRouteRequest,
    v1::DeleteRouteRequest,
);

/// The shim's answer meaning "fencing is off" (its `--fence-lease=none`).
pub const NO_FENCE: &str = "none";

/// Why the fences this manager sends cannot pass the shim's guard, if they cannot: `ours` is
/// the lease this manager holds (`None` without leader election), `shims` the lease the shim
/// fences on (empty from a shim that does not say).
pub fn fence_mismatch(ours: Option<&str>, shims: &str) -> Option<String> {
    match ours {
        _ if shims.is_empty() => None,
        Some(ours) if shims != ours && shims != NO_FENCE => Some(format!(
            "the provider shim fences mutating calls on the lease {shims:?} but this manager \
             holds {ours:?}: every mutating call would be refused; run the shim with \
             --fence-lease={ours} or set --leader-elect-resource-namespace/-name to match"
        )),
        None if shims != NO_FENCE => Some(format!(
            "--leader-elect=false sends no fence but the provider shim requires one on the lease \
             {shims:?}: every mutating call would be refused; run the shim with --fence-lease=none"
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fences_that_cannot_pass_the_shims_guard_are_named() {
        let ours = Some("kube-system/cloud-controller-manager");
        assert_eq!(
            fence_mismatch(ours, "kube-system/cloud-controller-manager"),
            None
        );
        assert_eq!(
            fence_mismatch(ours, NO_FENCE),
            None,
            "fencing off accepts anything"
        );
        assert_eq!(fence_mismatch(ours, ""), None, "an older shim does not say");
        assert_eq!(fence_mismatch(None, NO_FENCE), None);
        assert_eq!(fence_mismatch(None, ""), None);
        let other = fence_mismatch(ours, "infra/ccm").unwrap_or_default();
        assert!(
            other.contains("\"infra/ccm\"")
                && other.contains("--fence-lease=kube-system/cloud-controller-manager"),
            "{other}"
        );
        let unfenced = fence_mismatch(None, "infra/ccm").unwrap_or_default();
        assert!(unfenced.contains("--fence-lease=none"), "{unfenced}");
    }
}
