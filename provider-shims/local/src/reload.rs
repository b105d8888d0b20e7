//! The live inventory: the last good version of the file, re-read on a timer and on demand.
//!
//! A broken edit never replaces a good inventory, and neither does one that takes away too many
//! machines at once ([`crate::shrink`]): the shim keeps answering from the last good one, logs
//! the rejection once per distinct content (naming the file and the machine counts), keeps it
//! for callers ([`InventoryHandle::last_error`], and every strongly-consistent answer), and
//! reports it through `local_shim_inventory_reloads_total{result}`,
//! `local_shim_inventory_reload_errors_total` and `local_shim_inventory_stale`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::inventory::{Inventory, InventoryError};
use crate::shrink::{Shrink, ShrinkPolicy, ShrinkVerdict};

/// What became of one distinct file content (the `result` label of the reloads counter).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadResult {
    result: &'static str,
}

const OK: ReloadResult = ReloadResult { result: "ok" };
const INVALID: ReloadResult = ReloadResult { result: "invalid" };
const REFUSED_EMPTY: ReloadResult = ReloadResult {
    result: "refused_empty",
};
const REFUSED_SHRINK: ReloadResult = ReloadResult {
    result: "refused_shrink",
};

impl ReloadResult {
    fn of(error: &InventoryError) -> Self {
        match error {
            InventoryError::Empty { .. } => REFUSED_EMPTY,
            InventoryError::Shrink { .. } => REFUSED_SHRINK,
            _ => INVALID,
        }
    }
}

/// Metrics about the inventory file.
#[derive(Debug, Clone, Default)]
struct InventoryMetrics {
    machines: Gauge,
    reloads: Family<ReloadResult, Counter>,
    reload_errors: Counter,
    stale: Gauge,
}

impl InventoryMetrics {
    fn new(machines: i64) -> Self {
        let metrics = Self::default();
        metrics.machines.set(machines);
        // Every result is exported from the start, so an alert on a refusal has a series to
        // compare against before the first one happens.
        for result in [OK, INVALID, REFUSED_EMPTY, REFUSED_SHRINK] {
            drop(metrics.reloads.get_or_create(&result));
        }
        metrics
    }
}

/// What was last read from disk, good or bad, so an unchanged file is not re-parsed or
/// re-reported.
#[derive(Debug, Default)]
struct Seen {
    /// File content last read; `None` when the last read failed.
    text: Option<String>,
    /// Why that content (or read) was rejected; `None` when it is the current inventory.
    error: Option<Arc<InventoryError>>,
}

#[derive(Debug)]
struct Shared {
    path: PathBuf,
    policy: ShrinkPolicy,
    current: RwLock<Arc<Inventory>>,
    seen: Mutex<Seen>,
    metrics: InventoryMetrics,
}

/// A shared handle on the live inventory.
#[derive(Debug, Clone)]
pub struct InventoryHandle {
    shared: Arc<Shared>,
}

impl InventoryHandle {
    /// Loads the inventory at `path`; any error fails start-up, and so does an inventory without
    /// machines unless `policy` allows it.
    pub fn load(path: &Path, policy: ShrinkPolicy) -> Result<Self, InventoryError> {
        let text = Inventory::read(path)?;
        let inventory = Inventory::parse(path, &text)?;
        judge(path, policy, &Inventory::default(), &inventory)?;
        Ok(Self {
            shared: Arc::new(Shared {
                path: path.to_path_buf(),
                policy,
                metrics: InventoryMetrics::new(machine_count(&inventory)),
                current: RwLock::new(Arc::new(inventory)),
                seen: Mutex::new(Seen {
                    text: Some(text),
                    error: None,
                }),
            }),
        })
    }

    /// The current (last good) inventory.
    pub fn current(&self) -> Arc<Inventory> {
        match self.shared.current.read() {
            Ok(current) => Arc::clone(&current),
            // A panic while swapping cannot leave a half-written Arc behind; keep serving it.
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Why the file on disk is not the inventory being served (unreadable, invalid, or refused
    /// as too great a shrink), or `None` when it is.
    pub fn last_error(&self) -> Option<Arc<InventoryError>> {
        self.seen().error.clone()
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        match self.shared.seen.lock() {
            Ok(seen) => seen,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Re-reads the file now (blocking). `Ok(true)` when a new inventory was installed,
    /// `Ok(false)` when the file is unchanged, `Err` when the file is unreadable, invalid or
    /// refused by the shrink rule (the last good inventory stays current).
    pub fn reload(&self) -> Result<bool, Arc<InventoryError>> {
        let shared = &self.shared;
        let mut seen = self.seen();
        let text = match Inventory::read(&shared.path) {
            Ok(text) => text,
            Err(err) => {
                let repeated = seen.text.is_none()
                    && seen
                        .error
                        .as_ref()
                        .is_some_and(|e| e.to_string() == err.to_string());
                if repeated {
                    return Err(seen.error.clone().unwrap_or_else(|| Arc::new(err)));
                }
                let err = Arc::new(err);
                *seen = Seen {
                    text: None,
                    error: Some(Arc::clone(&err)),
                };
                self.report_rejected(&err);
                return Err(err);
            }
        };
        if seen.text.as_deref() == Some(text.as_str()) {
            return match &seen.error {
                None => Ok(false),
                Some(err) => Err(Arc::clone(err)),
            };
        }
        let accepted = Inventory::parse(&shared.path, &text).and_then(|next| {
            judge(&shared.path, shared.policy, &self.current(), &next).map(|()| next)
        });
        match accepted {
            Ok(inventory) => {
                let count = machine_count(&inventory);
                match shared.current.write() {
                    Ok(mut current) => *current = Arc::new(inventory),
                    Err(poisoned) => *poisoned.into_inner() = Arc::new(inventory),
                }
                *seen = Seen {
                    text: Some(text),
                    error: None,
                };
                shared.metrics.machines.set(count);
                shared.metrics.reloads.get_or_create(&OK).inc();
                shared.metrics.stale.set(0);
                tracing::info!(path = %shared.path.display(), machines = count, "inventory reloaded");
                Ok(true)
            }
            Err(err) => {
                let err = Arc::new(err);
                *seen = Seen {
                    text: Some(text),
                    error: Some(Arc::clone(&err)),
                };
                self.report_rejected(&err);
                Err(err)
            }
        }
    }

    fn report_rejected(&self, err: &InventoryError) {
        let shared = &self.shared;
        let result = ReloadResult::of(err);
        shared.metrics.reloads.get_or_create(&result).inc();
        shared.metrics.reload_errors.inc();
        shared.metrics.stale.set(1);
        let path = shared.path.display();
        match err {
            InventoryError::Empty { existing, .. } => tracing::error!(
                %path,
                machines_served = existing,
                machines_in_file = 0,
                error = %err,
                "inventory refused: the file lists no machines; still serving the last good inventory"
            ),
            InventoryError::Shrink {
                existing,
                removed,
                listed,
                ..
            } => tracing::error!(
                %path,
                machines_served = existing,
                machines_in_file = listed,
                machines_removed = removed,
                error = %err,
                "inventory refused: it removes too many machines at once; still serving the last \
                 good inventory"
            ),
            _ => tracing::error!(
                %path,
                error = %err,
                "inventory rejected; still serving the last good inventory"
            ),
        }
    }

    /// Re-reads the file off the async threads and returns the inventory it yields (for calls
    /// asking for strong consistency). Errors when the file on disk is not the inventory served
    /// (invalid, or refused by the shrink rule): then nothing fresh can be said.
    pub async fn fresh(&self) -> Result<Arc<Inventory>, Arc<InventoryError>> {
        let handle = self.clone();
        let reloaded = tokio::task::spawn_blocking(move || handle.reload())
            .await
            .unwrap_or_else(|join| {
                Err(Arc::new(InventoryError::Read {
                    path: self.shared.path.clone(),
                    error: std::io::Error::other(join.to_string()),
                }))
            });
        reloaded.map(|_| self.current())
    }

    /// Re-reads the file every `every` for as long as any handle is alive (zero disables it).
    pub fn spawn_reloader(&self, every: Duration) -> Option<tokio::task::JoinHandle<()>> {
        if every.is_zero() {
            return None;
        }
        let weak: Weak<Shared> = Arc::downgrade(&self.shared);
        Some(tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await;
            loop {
                ticker.tick().await;
                // Only a transient strong reference: the loop ends once the shim is dropped.
                let Some(shared) = weak.upgrade() else { break };
                let handle = InventoryHandle { shared };
                // Errors were already logged and counted by reload().
                let _ = tokio::task::spawn_blocking(move || handle.reload()).await;
            }
        }))
    }

    /// Registers the inventory metrics.
    pub fn register_metrics(&self, registry: &mut Registry) {
        let m = &self.shared.metrics;
        registry.register(
            "local_shim_inventory_machines",
            "Machines in the inventory being served",
            m.machines.clone(),
        );
        registry.register(
            "local_shim_inventory_reloads",
            "Changed inventory file contents read, by result: ok (served), invalid (unreadable, \
             too large, not a valid inventory), refused_empty or refused_shrink (valid, but \
             removing all or too many machines at once)",
            m.reloads.clone(),
        );
        registry.register(
            "local_shim_inventory_reload_errors",
            "Times the inventory file was found unreadable, invalid or refused",
            m.reload_errors.clone(),
        );
        registry.register(
            "local_shim_inventory_stale",
            "1 while the file on disk is not served (broken or refused) and the last good \
             inventory is",
            m.stale.clone(),
        );
    }

    /// Whether the file on disk is currently not served (broken or refused; the last good
    /// inventory is being served).
    pub fn is_stale(&self) -> bool {
        self.shared.metrics.stale.get() != 0
    }
}

/// Applies the shrink rule to replacing `served` by `next`, as an error naming `path`.
fn judge(
    path: &Path,
    policy: ShrinkPolicy,
    served: &Inventory,
    next: &Inventory,
) -> Result<(), InventoryError> {
    let shrink = Shrink::between(served, next);
    match policy.judge(shrink) {
        ShrinkVerdict::Accept => Ok(()),
        ShrinkVerdict::RefuseEmpty => Err(InventoryError::Empty {
            path: path.to_path_buf(),
            existing: shrink.existing,
        }),
        ShrinkVerdict::RefuseShrink => Err(InventoryError::Shrink {
            path: path.to_path_buf(),
            existing: shrink.existing,
            removed: shrink.removed,
            listed: shrink.listed,
            max_drop_percent: policy.max_drop_percent,
        }),
    }
}

fn machine_count(inventory: &Inventory) -> i64 {
    i64::try_from(inventory.machines().len()).unwrap_or(i64::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const ONE: &str = "machines:\n- {name: node-a, instanceID: i-a}\n";
    const TWO: &str =
        "machines:\n- {name: node-a, instanceID: i-a}\n- {name: node-b, instanceID: i-b}\n";

    #[test]
    fn missing_file_fails_start_up() {
        let dir = tempfile::tempdir().unwrap();
        let err = InventoryHandle::load(&dir.path().join("nope.yaml"), ShrinkPolicy::default())
            .unwrap_err();
        assert!(err.to_string().contains("nope.yaml"), "{err}");
    }

    #[test]
    fn invalid_file_fails_start_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inv.yaml");
        std::fs::write(&path, "machines:\n- {name: a}\n").unwrap();
        let err = InventoryHandle::load(&path, ShrinkPolicy::default()).unwrap_err();
        assert!(err.to_string().contains("instanceID: is required"), "{err}");
    }

    #[test]
    fn reload_picks_up_a_change_and_survives_a_broken_edit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inv.yaml");
        std::fs::write(&path, ONE).unwrap();
        let handle = InventoryHandle::load(&path, ShrinkPolicy::default()).unwrap();
        assert!(!handle.reload().unwrap(), "unchanged");

        std::fs::write(&path, TWO).unwrap();
        assert!(handle.reload().unwrap());
        assert!(handle.current().by_name("node-b").is_some());

        std::fs::write(&path, "machines: [ {name: node-b}").unwrap();
        assert!(handle.reload().is_err());
        assert!(handle.is_stale());
        assert!(
            handle.current().by_name("node-b").is_some(),
            "last good inventory kept"
        );
        // Unchanged broken content is reported again to callers but counted once.
        assert!(handle.reload().is_err());
        assert_eq!(handle.shared.metrics.reload_errors.get(), 1);

        std::fs::remove_file(&path).unwrap();
        assert!(handle.reload().is_err());
        assert!(handle.current().by_name("node-b").is_some());
        assert_eq!(handle.shared.metrics.reload_errors.get(), 2);

        std::fs::write(&path, ONE).unwrap();
        assert!(handle.reload().unwrap());
        assert!(!handle.is_stale());
        assert!(handle.current().by_name("node-b").is_none());
    }

    const THREE: &str = "machines:\n- {name: node-a, instanceID: i-a}\n- {name: node-b, instanceID: i-b}\n\
                         - {name: node-c, instanceID: i-c}\n";

    fn loaded(text: &str, policy: ShrinkPolicy) -> (tempfile::TempDir, PathBuf, InventoryHandle) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inv.yaml");
        std::fs::write(&path, text).unwrap();
        let handle = InventoryHandle::load(&path, policy).unwrap();
        (dir, path, handle)
    }

    fn reloads(handle: &InventoryHandle, result: ReloadResult) -> u64 {
        handle.shared.metrics.reloads.get_or_create(&result).get()
    }

    #[test]
    fn empty_file_fails_start_up_unless_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inv.yaml");
        for text in [
            "",
            "# nothing yet\n",
            "machines: []\n",
            "region: r\nmachines:\n",
        ] {
            std::fs::write(&path, text).unwrap();
            let msg = InventoryHandle::load(&path, ShrinkPolicy::default())
                .unwrap_err()
                .to_string();
            assert!(
                msg.contains("inv.yaml: lists no machines"),
                "{text:?}: {msg}"
            );
            assert!(msg.contains("--allow-empty-inventory"), "{msg}");
            let allowed = ShrinkPolicy {
                allow_empty: true,
                ..ShrinkPolicy::default()
            };
            let handle = InventoryHandle::load(&path, allowed).unwrap();
            assert!(handle.current().machines().is_empty());
        }
    }

    #[test]
    fn reload_refuses_an_emptied_file_and_keeps_serving() {
        let (_dir, path, handle) = loaded(TWO, ShrinkPolicy::default());
        std::fs::write(&path, "").unwrap();
        let err = handle.reload().unwrap_err();
        assert!(
            matches!(*err, InventoryError::Empty { existing: 2, .. }),
            "{err}"
        );
        assert!(
            handle.current().by_name("node-a").is_some(),
            "last good kept"
        );
        assert!(handle.is_stale());
        assert_eq!(handle.shared.metrics.machines.get(), 2);
        assert_eq!(reloads(&handle, REFUSED_EMPTY), 1);
        assert_eq!(
            handle.last_error().unwrap().to_string(),
            err.to_string(),
            "kept for callers"
        );
        // Unchanged: reported again to callers, counted once.
        assert!(handle.reload().is_err());
        assert_eq!(reloads(&handle, REFUSED_EMPTY), 1);
        assert_eq!(handle.shared.metrics.reload_errors.get(), 1);

        // Restoring the file (or any acceptable edit) clears the refusal.
        std::fs::write(&path, ONE).unwrap();
        assert!(handle.reload().unwrap());
        assert!(!handle.is_stale());
        assert!(handle.last_error().is_none());
        assert_eq!(reloads(&handle, OK), 1);
    }

    #[test]
    fn reload_accepts_an_emptied_file_when_allowed() {
        let policy = ShrinkPolicy {
            allow_empty: true,
            ..ShrinkPolicy::default()
        };
        let (_dir, path, handle) = loaded(THREE, policy);
        std::fs::write(&path, "machines: []\n").unwrap();
        assert!(handle.reload().unwrap());
        assert!(handle.current().machines().is_empty());
        assert_eq!(handle.shared.metrics.machines.get(), 0);
    }

    #[test]
    fn reload_refuses_removing_more_than_the_limit() {
        let (_dir, path, handle) = loaded(THREE, ShrinkPolicy::default());
        // A cut between two entries: one of three machines left.
        std::fs::write(&path, ONE).unwrap();
        let err = handle.reload().unwrap_err();
        assert!(
            matches!(
                *err,
                InventoryError::Shrink {
                    existing: 3,
                    removed: 2,
                    listed: 1,
                    max_drop_percent: 50,
                    ..
                }
            ),
            "{err}"
        );
        let msg = err.to_string();
        assert!(msg.contains("inv.yaml"), "{msg}");
        assert!(msg.contains("removes 2 of the 3 machines"), "{msg}");
        assert!(msg.contains("--inventory-max-drop-percent=50"), "{msg}");
        assert_eq!(handle.current().machines().len(), 3, "last good kept");
        assert_eq!(reloads(&handle, REFUSED_SHRINK), 1);
        assert!(handle.is_stale());

        // One of three is within 50%.
        std::fs::write(&path, TWO).unwrap();
        assert!(handle.reload().unwrap());
        assert_eq!(handle.current().machines().len(), 2);
    }

    #[test]
    fn reload_limit_of_hundred_percent_accepts_any_non_empty_shrink() {
        let policy = ShrinkPolicy {
            max_drop_percent: 100,
            ..ShrinkPolicy::default()
        };
        let (_dir, path, handle) = loaded(THREE, policy);
        std::fs::write(&path, ONE).unwrap();
        assert!(handle.reload().unwrap());
        std::fs::write(&path, "machines: []\n").unwrap();
        assert!(
            matches!(*handle.reload().unwrap_err(), InventoryError::Empty { .. }),
            "emptying needs --allow-empty-inventory"
        );
    }

    #[test]
    fn every_reload_result_is_exported_from_the_start() {
        let (_dir, _path, handle) = loaded(ONE, ShrinkPolicy::default());
        let mut registry = Registry::default();
        handle.register_metrics(&mut registry);
        let mut page = String::new();
        prometheus_client::encoding::text::encode(&mut page, &registry).unwrap();
        for result in ["ok", "invalid", "refused_empty", "refused_shrink"] {
            assert!(
                page.contains(&format!(
                    "local_shim_inventory_reloads_total{{result=\"{result}\"}} 0"
                )),
                "{page}"
            );
        }
        assert!(page.contains("local_shim_inventory_machines 1"), "{page}");
    }

    #[tokio::test]
    async fn background_reloader_applies_edits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inv.yaml");
        std::fs::write(&path, ONE).unwrap();
        let handle = InventoryHandle::load(&path, ShrinkPolicy::default()).unwrap();
        let task = handle
            .spawn_reloader(Duration::from_millis(20))
            .expect("enabled");
        std::fs::write(&path, TWO).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while handle.current().by_name("node-b").is_none() {
            assert!(tokio::time::Instant::now() < deadline, "edit not picked up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(handle);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("reloader outlived the last handle")
            .unwrap();
    }
}
