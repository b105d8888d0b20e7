//! The cloud-node-lifecycle rules as pure functions of (node, provider answers, state, now):
//! what to ask the provider, and what to do with its answers. The controller only carries
//! out what these return.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use kube::Resource;

use crate::k8s::CachedNode;
use crate::k8s::well_known::TAINT_SHUTDOWN;

/// When a node whose instance is gone may actually be deleted: upstream deletes at the first
/// NOT_FOUND; the binary's defaults are more careful (README: the deletion policy).
#[derive(Debug, Clone, PartialEq)]
pub struct DeletionPolicy {
    /// Nodes younger than this (by creationTimestamp) are never deleted for NOT_FOUND: lookups
    /// right after an instance launches are often eventually consistent.
    pub grace_period: Duration,
    /// Consecutive NOT_FOUND answers (one per monitor pass) needed before deleting.
    pub confirmations: u32,
    /// At most this fraction of the provider's nodes (and at least one) is deleted per window;
    /// `None` disables the budget.
    pub budget: Option<DeletionBudget>,
}

/// A rate limit on node deletions.
#[derive(Debug, Clone, PartialEq)]
pub struct DeletionBudget {
    /// Fraction of managed nodes, 0 < fraction ≤ 1.
    pub fraction: f64,
    /// Sliding window the fraction applies to.
    pub window: Duration,
}

impl DeletionPolicy {
    /// Upstream behaviour: delete at the first authoritative NOT_FOUND, no budget.
    pub fn upstream() -> Self {
        Self {
            grace_period: Duration::ZERO,
            confirmations: 1,
            budget: None,
        }
    }
}

/// What a pass does with a node before asking the provider anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstLook {
    /// Another provider's node, or a Ready one without a shutdown taint: nothing.
    Skip,
    /// A Ready node still carrying the shutdown taint: remove it (upstream).
    RemoveShutdownTaint,
    /// A node that is not Ready: ask whether its instance exists.
    AskExistence,
}

/// Upstream `MonitorNodes`' first branch: Ready nodes are never checked against the provider.
pub fn first_look(node: &CachedNode, owned: bool) -> FirstLook {
    if !owned {
        FirstLook::Skip
    } else if node.ready_status() == "True" {
        if node.has_taint(TAINT_SHUTDOWN) {
            FirstLook::RemoveShutdownTaint
        } else {
            FirstLook::Skip
        }
    } else {
        FirstLook::AskExistence
    }
}

/// What to do with the shutdown taint once the provider said whether the instance is shut
/// down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaintChange {
    /// Add the shutdown taint.
    Add,
    /// Remove it: beyond upstream (which waits for Ready), an instance that runs again loses
    /// the taint at once, so the taint never claims a shutdown that is over.
    Remove,
}

/// The shutdown-taint change for an existing instance; `None` when the taint is right.
pub fn shutdown_taint(node: &CachedNode, shut_down: bool) -> Option<TaintChange> {
    match (shut_down, node.has_taint(TAINT_SHUTDOWN)) {
        (true, false) => Some(TaintChange::Add),
        (false, true) => Some(TaintChange::Remove),
        _ => None,
    }
}

/// Why a node the provider reported gone is not deleted (yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Younger than the grace period (a negative age, from clock skew, counts as young).
    GracePeriod,
    /// Fewer consecutive NOT_FOUND answers than the policy asks for.
    Confirming,
    /// The deletion budget of the window is spent.
    Budget,
}

impl Hold {
    /// The reason label of `deletions_suppressed_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Self::GracePeriod => "grace_period",
            Self::Confirming => "confirming",
            Self::Budget => "budget",
        }
    }
}

/// Per-node confirmation counts and the deletions of the budget window.
#[derive(Debug, Default)]
pub struct DeletionState {
    not_found: HashMap<String, u32>,
    /// Why each node's existence was last inconclusive (until the provider answers again).
    suppressed: HashMap<String, &'static str>,
    recent: VecDeque<Instant>,
    budget_exhausted: bool,
    exhaustion_reported: bool,
}

impl DeletionState {
    /// Forgets the counts of nodes no longer in the cache.
    pub fn retain_nodes(&mut self, live_uids: &HashSet<String>) {
        self.not_found.retain(|uid, _| live_uids.contains(uid));
        self.suppressed.retain(|uid, _| live_uids.contains(uid));
    }

    /// Records that the provider could not say whether the node's instance exists, for
    /// `reason`; true when that is news (the first pass so, or another reason than last time),
    /// so the Warning is emitted on a change, not on every pass.
    pub fn inconclusive(&mut self, uid: &str, reason: &'static str) -> bool {
        self.suppressed.insert(uid.to_string(), reason) != Some(reason)
    }

    /// Records that the provider answered conclusively (the instance exists, or is gone).
    pub fn conclusive(&mut self, uid: &str) {
        self.suppressed.remove(uid);
    }

    /// Forgets the NOT_FOUND count of a node whose instance was not reported gone.
    pub fn not_gone(&mut self, uid: &str) {
        self.not_found.remove(uid);
    }

    /// Whether the last admission was refused by the budget.
    pub fn budget_exhausted(&self) -> bool {
        self.budget_exhausted
    }

    /// True once per exhaustion of the budget: when deletions have just been paused.
    pub fn pause_started(&mut self) -> bool {
        let started = self.budget_exhausted && !self.exhaustion_reported;
        self.exhaustion_reported = self.budget_exhausted;
        started
    }

    /// Applies `policy` to a node the provider reported gone, at `now` (monotonic) and
    /// `wall_now` (for the node's age); `managed` is the number of the provider's nodes. An
    /// admitted deletion is counted in the budget window.
    pub fn admit(
        &mut self,
        node: &CachedNode,
        policy: &DeletionPolicy,
        managed: usize,
        now: Instant,
        wall_now: Timestamp,
    ) -> Result<(), Hold> {
        if !policy.grace_period.is_zero() {
            let young = node
                .meta()
                .creation_timestamp
                .as_ref()
                .is_none_or(|created| {
                    match Duration::try_from(wall_now.duration_since(created.0)) {
                        Ok(age) => age < policy.grace_period,
                        // Created "in the future": our clock is behind the API server's.
                        Err(_) => true,
                    }
                });
            if young {
                return Err(Hold::GracePeriod);
            }
        }
        let uid = node.meta().uid.clone();
        if let Some(uid) = &uid {
            let seen = self.not_found.entry(uid.clone()).or_insert(0);
            *seen = seen.saturating_add(1);
            if *seen < policy.confirmations.max(1) {
                return Err(Hold::Confirming);
            }
        }
        if let Some(budget) = &policy.budget {
            if !budget_allows(&mut self.recent, now, managed, budget) {
                self.budget_exhausted = true;
                return Err(Hold::Budget);
            }
            self.budget_exhausted = false;
        }
        if let Some(uid) = &uid {
            self.not_found.remove(uid);
        }
        Ok(())
    }
}

/// Admits one deletion if fewer than max(1, ⌊fraction × managed⌋) happened within the window,
/// recording it in `recent`.
pub fn budget_allows(
    recent: &mut VecDeque<Instant>,
    now: Instant,
    managed: usize,
    budget: &DeletionBudget,
) -> bool {
    while recent
        .front()
        .is_some_and(|at| now.duration_since(*at) > budget.window)
    {
        recent.pop_front();
    }
    // Truncation is intended: the budget is a whole number of nodes.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let allowed = ((managed as f64 * budget.fraction).floor() as usize).max(1);
    if recent.len() >= allowed {
        return false;
    }
    recent.push_back(now);
    true
}

#[cfg(test)]
mod tests;
