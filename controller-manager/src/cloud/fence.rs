//! The leader fence on mutating calls: every request that changes cloud state carries the
//! [`Fence`] of the caller's current leadership term, so a shim refuses a deposed leader's late
//! writes (the shim keeps the highest term it has seen per lease). [`Cloud::fenced`](super::Cloud::fenced)
//! stamps them.

use cpi_proto::v1;

/// Proof of leadership sent with every mutating CPI call: the CPI's own message.
pub type Fence = v1::Fence;

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
