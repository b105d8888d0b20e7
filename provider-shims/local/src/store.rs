//! The shim's crash-safe state: one redb database (`state.redb` in `--state-dir`) with typed
//! tables. Every write is its own durable (fsynced) transaction, so a crash loses nothing that
//! was acknowledged.
//!
//! Tables today: `meta` (schema version) and `fence_marks` (the framework's fence high-water
//! marks). Load-balancer addresses and routes will get their own tables.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use shim_framework::{FenceMark, FenceStore, FenceStoreError};

/// Schema version written by this build; a newer one on disk refuses to open.
const SCHEMA_VERSION: u64 = 1;
const SCHEMA_KEY: &str = "schema_version";

/// `key → value` metadata about the database itself.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// `lease → (lease_transitions, holder_identity)`.
const FENCE_MARKS: TableDefinition<&str, (i64, &str)> = TableDefinition::new("fence_marks");

/// A state-database failure, naming the file and what was being done.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The state directory could not be created.
    #[error("creating --state-dir {}: {error}", .path.display())]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// Another process holds the database.
    #[error(
        "state database {} is in use by another process (is another local-shim running with \
         the same --state-dir?)",
        .path.display()
    )]
    InUse {
        /// The database file.
        path: PathBuf,
    },
    /// The database could not be opened (permissions, corruption, unsupported format).
    #[error("opening state database {}: {message}", .path.display())]
    Open {
        /// The database file.
        path: PathBuf,
        /// redb's explanation.
        message: String,
    },
    /// The database was written by a newer local-shim.
    #[error(
        "state database {} has schema version {found}, newer than the {supported} this \
         local-shim understands; refusing to touch it",
        .path.display()
    )]
    NewerSchema {
        /// The database file.
        path: PathBuf,
        /// Version on disk.
        found: u64,
        /// Version of this build.
        supported: u64,
    },
    /// A read or write failed.
    #[error("state database {}: {action}: {message}", .path.display())]
    Io {
        /// The database file.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// redb's explanation.
        message: String,
    },
}

#[derive(Debug)]
struct Inner {
    db: Database,
    path: PathBuf,
}

/// The state database; cheap to clone, shared by everything that persists state.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl Store {
    /// File name of the database inside `--state-dir`.
    pub const FILE_NAME: &'static str = "state.redb";

    /// Opens (creating if needed) `<state_dir>/state.redb` and its tables. Blocking.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        create_private_dir(state_dir).map_err(|error| StoreError::StateDir {
            path: state_dir.to_path_buf(),
            error,
        })?;
        let path = state_dir.join(Self::FILE_NAME);
        let db = Database::create(&path).map_err(|err| match err {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse { path: path.clone() },
            other => StoreError::Open {
                path: path.clone(),
                message: other.to_string(),
            },
        })?;
        let store = Self {
            inner: Arc::new(Inner { db, path }),
        };
        store.init_schema()?;
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    fn io_error(&self, action: &'static str) -> impl Fn(redb::Error) -> StoreError + '_ {
        move |err| StoreError::Io {
            path: self.inner.path.clone(),
            action,
            message: err.to_string(),
        }
    }

    /// Creates missing tables and checks the schema version, in one transaction.
    fn init_schema(&self) -> Result<(), StoreError> {
        let fail = self.io_error("initialising tables");
        let txn = self.inner.db.begin_write().map_err(|e| fail(e.into()))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| fail(e.into()))?;
            let found = meta
                .get(SCHEMA_KEY)
                .map_err(|e| fail(e.into()))?
                .map(|v| v.value());
            match found {
                Some(found) if found > SCHEMA_VERSION => {
                    return Err(StoreError::NewerSchema {
                        path: self.inner.path.clone(),
                        found,
                        supported: SCHEMA_VERSION,
                    });
                }
                Some(_) => {}
                None => {
                    meta.insert(SCHEMA_KEY, SCHEMA_VERSION)
                        .map_err(|e| fail(e.into()))?;
                }
            }
            txn.open_table(FENCE_MARKS).map_err(|e| fail(e.into()))?;
        }
        txn.commit().map_err(|e| fail(e.into()))
    }

    /// The stored fence mark of `lease`.
    pub fn fence_mark(&self, lease: &str) -> Result<Option<FenceMark>, StoreError> {
        let fail = self.io_error("reading a fence mark");
        let txn = self.inner.db.begin_read().map_err(|e| fail(e.into()))?;
        let table = txn.open_table(FENCE_MARKS).map_err(|e| fail(e.into()))?;
        let mark = table.get(lease).map_err(|e| fail(e.into()))?.map(|v| {
            let (lease_transitions, holder) = v.value();
            FenceMark {
                lease_transitions,
                holder_identity: holder.to_string(),
            }
        });
        Ok(mark)
    }

    /// Durably replaces the fence mark of `lease`.
    pub fn set_fence_mark(&self, lease: &str, mark: &FenceMark) -> Result<(), StoreError> {
        let fail = self.io_error("writing a fence mark");
        let txn = self.inner.db.begin_write().map_err(|e| fail(e.into()))?;
        {
            let mut table = txn.open_table(FENCE_MARKS).map_err(|e| fail(e.into()))?;
            table
                .insert(
                    lease,
                    (mark.lease_transitions, mark.holder_identity.as_str()),
                )
                .map_err(|e| fail(e.into()))?;
        }
        txn.commit().map_err(|e| fail(e.into()))
    }
}

impl FenceStore for Store {
    fn load(&self, lease: &str) -> Result<Option<FenceMark>, FenceStoreError> {
        self.fence_mark(lease).map_err(FenceStoreError::new)
    }

    fn store(&self, lease: &str, mark: &FenceMark) -> Result<(), FenceStoreError> {
        self.set_fence_mark(lease, mark)
            .map_err(FenceStoreError::new)
    }
}

/// Creates `dir` (and parents) readable by the owner only: the state is nobody else's business.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn mark(transitions: i64, holder: &str) -> FenceMark {
        FenceMark {
            lease_transitions: transitions,
            holder_identity: holder.into(),
        }
    }

    #[test]
    fn fence_marks_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        {
            let store = Store::open(&state).unwrap();
            assert_eq!(store.fence_mark("kube-system/ccm").unwrap(), None);
            store
                .set_fence_mark("kube-system/ccm", &mark(3, "a"))
                .unwrap();
            store
                .set_fence_mark("kube-system/ccm", &mark(4, "b"))
                .unwrap();
        }
        let store = Store::open(&state).unwrap();
        assert_eq!(
            store.fence_mark("kube-system/ccm").unwrap(),
            Some(mark(4, "b"))
        );
        assert_eq!(store.path(), state.join("state.redb"));
    }

    #[tokio::test]
    async fn fence_guard_over_a_reopened_store_refuses_the_old_leader() {
        let dir = tempfile::tempdir().unwrap();
        let fence = |t: i64, h: &str| cpi_proto::v1::Fence {
            lease: "kube-system/ccm".into(),
            holder_identity: h.into(),
            lease_transitions: t,
        };
        {
            let guard = shim_framework::FenceGuard::new(Arc::new(Store::open(dir.path()).unwrap()));
            guard.check(Some(&fence(7, "new"))).await.unwrap();
        }
        let guard = shim_framework::FenceGuard::new(Arc::new(Store::open(dir.path()).unwrap()));
        assert!(matches!(
            guard.check(Some(&fence(6, "old"))).await,
            Err(cpi_proto::CpiError::StaleLeader(_))
        ));
    }

    #[test]
    fn second_open_reports_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::InUse { .. }), "{err}");
    }

    #[test]
    fn corrupt_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(Store::FILE_NAME), vec![0x42; 8192]).unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("state.redb"), "{msg}");
    }

    #[test]
    fn state_dir_that_is_a_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, "x").unwrap();
        let msg = Store::open(&file).unwrap_err().to_string();
        assert!(msg.contains("--state-dir"), "{msg}");
        assert!(msg.contains("not-a-dir"), "{msg}");
    }
}
