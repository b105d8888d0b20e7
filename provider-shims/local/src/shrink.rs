//! The shrink rule: how many machines a reload may take away before it is refused.
//!
//! A machine missing from the inventory is authoritatively gone, and the controller manager
//! deletes NotReady Nodes whose machine is gone. An emptied file, or one cut between two entries
//! by an in-place edit read half-way, is still valid YAML; without this rule it would make every
//! machine it lost "not found" at once. A refused reload keeps the last good inventory.

use crate::inventory::Inventory;

/// Machines of the served inventory that a new content would take away, as counted by the
/// reloader: only machines that exist now (running or shut down) count, and one counts as
/// removed when the new content has no machine with its instance ID. A terminated machine
/// already reads as gone, so dropping its entry changes no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shrink {
    /// Existing machines in the inventory being served.
    pub existing: usize,
    /// How many of them the new content lacks.
    pub removed: usize,
    /// Machines (in any state) listed by the new content.
    pub listed: usize,
}

impl Shrink {
    /// What replacing `served` by `next` takes away.
    pub fn between(served: &Inventory, next: &Inventory) -> Self {
        let mut existing = 0;
        let mut removed = 0;
        for machine in served.machines().iter().filter(|m| m.state.exists()) {
            existing += 1;
            if next.by_instance_id(&machine.instance_id).is_none() {
                removed += 1;
            }
        }
        Self {
            existing,
            removed,
            listed: next.machines().len(),
        }
    }
}

/// Limits on shrinking, from `--inventory-max-drop-percent` and `--allow-empty-inventory`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShrinkPolicy {
    /// A reload removing more than this percentage of the existing machines is refused
    /// (0: any removal is refused; 100: no limit).
    pub max_drop_percent: u8,
    /// Whether an inventory listing no machines is accepted, at start-up and on reload.
    pub allow_empty: bool,
}

impl Default for ShrinkPolicy {
    fn default() -> Self {
        Self {
            max_drop_percent: 50,
            allow_empty: false,
        }
    }
}

/// What the shrink rule says about a new inventory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShrinkVerdict {
    /// Serve the new content.
    Accept,
    /// The new content lists no machines and `allow_empty` is off.
    RefuseEmpty,
    /// The new content removes more than `max_drop_percent` of the existing machines.
    RefuseShrink,
}

impl ShrinkPolicy {
    /// Judges a change. An empty result is governed by `allow_empty` alone (the flag exists to
    /// allow exactly that); any other result by the share of existing machines it removes.
    pub fn judge(&self, shrink: Shrink) -> ShrinkVerdict {
        if shrink.listed == 0 {
            return if self.allow_empty {
                ShrinkVerdict::Accept
            } else {
                ShrinkVerdict::RefuseEmpty
            };
        }
        // removed / existing > max / 100, in integers (no rounding at the boundary).
        let removed = u128::try_from(shrink.removed).unwrap_or(u128::MAX);
        let existing = u128::try_from(shrink.existing).unwrap_or(u128::MAX);
        if removed.saturating_mul(100) > existing.saturating_mul(u128::from(self.max_drop_percent))
        {
            ShrinkVerdict::RefuseShrink
        } else {
            ShrinkVerdict::Accept
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn judge(
        max_drop_percent: u8,
        allow_empty: bool,
        existing: usize,
        removed: usize,
    ) -> ShrinkVerdict {
        let listed = existing - removed;
        ShrinkPolicy {
            max_drop_percent,
            allow_empty,
        }
        .judge(Shrink {
            existing,
            removed,
            listed,
        })
    }

    #[test]
    fn shrink_rule_refuses_an_emptied_inventory_by_default() {
        assert_eq!(judge(50, false, 3, 3), ShrinkVerdict::RefuseEmpty);
        // Even with no percentage limit: emptying is governed by its own flag.
        assert_eq!(judge(100, false, 3, 3), ShrinkVerdict::RefuseEmpty);
        assert_eq!(judge(100, false, 1, 1), ShrinkVerdict::RefuseEmpty);
    }

    #[test]
    fn shrink_rule_accepts_an_emptied_inventory_when_allowed() {
        assert_eq!(judge(50, true, 3, 3), ShrinkVerdict::Accept);
        assert_eq!(judge(0, true, 3, 3), ShrinkVerdict::Accept);
        assert_eq!(judge(50, true, 0, 0), ShrinkVerdict::Accept);
    }

    #[test]
    fn shrink_rule_refuses_an_empty_start_up_inventory_unless_allowed() {
        // At start-up nothing is served yet: existing 0, listed 0.
        assert_eq!(judge(50, false, 0, 0), ShrinkVerdict::RefuseEmpty);
        assert_eq!(judge(50, true, 0, 0), ShrinkVerdict::Accept);
    }

    #[test]
    fn shrink_rule_accepts_removing_up_to_the_percentage() {
        assert_eq!(judge(50, false, 2, 1), ShrinkVerdict::Accept, "exactly 50%");
        assert_eq!(judge(50, false, 3, 1), ShrinkVerdict::Accept, "33%");
        assert_eq!(
            judge(50, false, 10, 5),
            ShrinkVerdict::Accept,
            "exactly 50%"
        );
        assert_eq!(judge(50, false, 10, 0), ShrinkVerdict::Accept, "no removal");
    }

    #[test]
    fn shrink_rule_refuses_removing_more_than_the_percentage() {
        assert_eq!(judge(50, false, 3, 2), ShrinkVerdict::RefuseShrink, "67%");
        assert_eq!(judge(50, false, 10, 6), ShrinkVerdict::RefuseShrink, "60%");
        assert_eq!(
            judge(10, false, 100, 11),
            ShrinkVerdict::RefuseShrink,
            "11%"
        );
        assert_eq!(judge(10, false, 100, 10), ShrinkVerdict::Accept, "10%");
        // allow_empty does not lift the percentage for a non-empty result.
        assert_eq!(judge(50, true, 3, 2), ShrinkVerdict::RefuseShrink);
    }

    #[test]
    fn shrink_rule_with_zero_percent_refuses_any_removal() {
        assert_eq!(judge(0, false, 1000, 1), ShrinkVerdict::RefuseShrink);
        assert_eq!(judge(0, false, 1000, 0), ShrinkVerdict::Accept);
    }

    #[test]
    fn shrink_rule_with_hundred_percent_accepts_any_non_empty_result() {
        assert_eq!(judge(100, false, 1000, 999), ShrinkVerdict::Accept);
    }

    #[test]
    fn shrink_rule_accepts_growth_and_a_first_machine() {
        let policy = ShrinkPolicy::default();
        let grow = |existing, listed| {
            policy.judge(Shrink {
                existing,
                removed: 0,
                listed,
            })
        };
        assert_eq!(grow(3, 10), ShrinkVerdict::Accept);
        assert_eq!(grow(0, 1), ShrinkVerdict::Accept);
    }

    #[test]
    fn shrink_rule_counts_replaced_machines_as_removed() {
        // Same number of entries, but every instance ID is new: all existing machines go.
        let verdict = ShrinkPolicy::default().judge(Shrink {
            existing: 4,
            removed: 4,
            listed: 4,
        });
        assert_eq!(verdict, ShrinkVerdict::RefuseShrink);
    }

    #[test]
    fn shrink_between_counts_existing_machines_the_new_content_lacks() {
        let parse = |text: &str| Inventory::parse(std::path::Path::new("inv.yaml"), text).unwrap();
        let served = parse(
            "machines:\n- {name: a, instanceID: i-a}\n- {name: b, instanceID: i-b, state: shutdown}\n\
             - {name: c, instanceID: i-c, state: terminated}\n",
        );
        // b dropped, c (already gone) dropped, a renamed but same instance, d new.
        let next =
            parse("machines:\n- {name: a2, instanceID: i-a}\n- {name: d, instanceID: i-d}\n");
        assert_eq!(
            Shrink::between(&served, &next),
            Shrink {
                existing: 2,
                removed: 1,
                listed: 2
            }
        );
    }

    #[test]
    fn shrink_rule_default_is_fifty_percent_and_no_empty() {
        assert_eq!(
            ShrinkPolicy::default(),
            ShrinkPolicy {
                max_drop_percent: 50,
                allow_empty: false
            }
        );
    }
}
