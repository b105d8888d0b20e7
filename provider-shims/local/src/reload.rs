//! The live inventory: the last good version of the file, re-read on a timer and on demand.
//!
//! A broken edit never replaces a good inventory: the shim keeps answering from the last good
//! one, logs the error once per distinct broken content, and reports it through
//! `local_shim_inventory_stale` and `local_shim_inventory_reload_errors_total`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::inventory::{Inventory, InventoryError};

/// Metrics about the inventory file.
#[derive(Debug, Clone, Default)]
struct InventoryMetrics {
    machines: Gauge,
    reloads: Counter,
    reload_errors: Counter,
    stale: Gauge,
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
    /// Loads the inventory at `path`; any error fails start-up.
    pub fn load(path: &Path) -> Result<Self, InventoryError> {
        let text = std::fs::read_to_string(path).map_err(|error| InventoryError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        let inventory = Inventory::parse(path, &text)?;
        let metrics = InventoryMetrics::default();
        metrics.machines.set(machine_count(&inventory));
        Ok(Self {
            shared: Arc::new(Shared {
                path: path.to_path_buf(),
                current: RwLock::new(Arc::new(inventory)),
                seen: Mutex::new(Seen {
                    text: Some(text),
                    error: None,
                }),
                metrics,
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

    /// Re-reads the file now (blocking). `Ok(true)` when a new inventory was installed,
    /// `Ok(false)` when the file is unchanged, `Err` when the file is unreadable or invalid (the
    /// last good inventory stays current).
    pub fn reload(&self) -> Result<bool, Arc<InventoryError>> {
        let shared = &self.shared;
        let mut seen = match shared.seen.lock() {
            Ok(seen) => seen,
            Err(poisoned) => poisoned.into_inner(),
        };
        let text = match std::fs::read_to_string(&shared.path) {
            Ok(text) => text,
            Err(error) => {
                let err = InventoryError::Read {
                    path: shared.path.clone(),
                    error,
                };
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
                self.report_broken(&err);
                return Err(err);
            }
        };
        if seen.text.as_deref() == Some(text.as_str()) {
            return match &seen.error {
                None => Ok(false),
                Some(err) => Err(Arc::clone(err)),
            };
        }
        match Inventory::parse(&shared.path, &text) {
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
                shared.metrics.reloads.inc();
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
                self.report_broken(&err);
                Err(err)
            }
        }
    }

    fn report_broken(&self, err: &InventoryError) {
        let metrics = &self.shared.metrics;
        metrics.reload_errors.inc();
        metrics.stale.set(1);
        tracing::error!(error = %err, "inventory rejected; still serving the last good inventory");
    }

    /// Re-reads the file off the async threads and returns the inventory it yields (for calls
    /// asking for strong consistency). Errors when the file on disk is not a valid inventory:
    /// then nothing fresh can be said.
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
            "Times a changed inventory file was loaded",
            m.reloads.clone(),
        );
        registry.register(
            "local_shim_inventory_reload_errors",
            "Times the inventory file was found unreadable or invalid",
            m.reload_errors.clone(),
        );
        registry.register(
            "local_shim_inventory_stale",
            "1 while the file on disk is broken and the last good inventory is served",
            m.stale.clone(),
        );
    }

    /// Whether the file on disk is currently broken (the last good inventory is being served).
    pub fn is_stale(&self) -> bool {
        self.shared.metrics.stale.get() != 0
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
        let err = InventoryHandle::load(&dir.path().join("nope.yaml")).unwrap_err();
        assert!(err.to_string().contains("nope.yaml"), "{err}");
    }

    #[test]
    fn invalid_file_fails_start_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inv.yaml");
        std::fs::write(&path, "machines:\n- {name: a}\n").unwrap();
        let err = InventoryHandle::load(&path).unwrap_err();
        assert!(err.to_string().contains("instanceID: is required"), "{err}");
    }

    #[test]
    fn reload_picks_up_a_change_and_survives_a_broken_edit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inv.yaml");
        std::fs::write(&path, ONE).unwrap();
        let handle = InventoryHandle::load(&path).unwrap();
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

    #[tokio::test]
    async fn background_reloader_applies_edits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inv.yaml");
        std::fs::write(&path, ONE).unwrap();
        let handle = InventoryHandle::load(&path).unwrap();
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
