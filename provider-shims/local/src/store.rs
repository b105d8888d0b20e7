//! The shim's crash-safe state: one redb database (`state.redb` in `--state-dir`) with typed
//! tables. Every write is a durable (fsynced) transaction, committed before the change is
//! acknowledged, so a crash loses nothing that was; load-balancer changes decided while a
//! commit runs share the next one ([`Store::write_lb_batch`]).
//!
//! Tables today: `meta` (schema version) and `fence_marks_v2` (the framework's fence marks, one
//! row per fenced lease: with `--fence-lease` there is one, and [`MAX_FENCE_MARKS`] bounds the
//! table whatever happens), `lb_records_v1` (load balancers by cluster/Service UID, JSON),
//! `lb_backends_v1` (backend lists by content digest, JSON, each stored once however many load
//! balancers name it), `lb_holds_v1` (addresses of deleted Services by cluster/namespace/name,
//! JSON) and `routes_v1` (routes the shim made, by (cluster, destination CIDR), JSON).
//!
//! Schema versions: 1 had `fence_marks` without the lease UID; opening it drops those marks
//! (they cannot be compared with fences that carry a UID), as a reset would. 2 kept each load
//! balancer's backends inside its record; 3 rows name a list in `lb_backends_v1` instead (2
//! rows are still read, and rewritten as 3 rows when the shim starts). A schema-2 build refuses a
//! schema-3 database rather than misread it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use shim_framework::{FenceMark, FenceStore, FenceStoreError};

use crate::state_file::ZeroFilledFile;

/// Schema version written by this build; a newer one on disk refuses to open.
const SCHEMA_VERSION: u64 = 3;
const SCHEMA_KEY: &str = "schema_version";

/// `key → value` metadata about the database itself.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Schema 1: `lease → (lease_transitions, holder_identity)`; dropped when opened.
const FENCE_MARKS_V1: TableDefinition<&str, (i64, &str)> = TableDefinition::new("fence_marks");
/// `lease → (lease_uid, lease_transitions, holder_identity)`.
const FENCE_MARKS: TableDefinition<&str, (&str, i64, &str)> =
    TableDefinition::new("fence_marks_v2");

/// `cluster/uid → load balancer` (JSON of `lb::LbRecord`).
const LB_RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("lb_records_v1");
/// `digest → backend list` (JSON of `[lb::Backend]`), named by `lb_records_v1` rows.
const LB_BACKENDS: TableDefinition<&str, &[u8]> = TableDefinition::new("lb_backends_v1");
/// `cluster/namespace/name → hold` (JSON of `lb::Hold`).
const LB_HOLDS: TableDefinition<&str, &[u8]> = TableDefinition::new("lb_holds_v1");

/// `(cluster, destination CIDR) → route` (JSON of `routes::RouteRecord`).
const ROUTES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("routes_v1");

/// One row of the route table, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRow {
    /// `--cluster-name` of the caller that made the route.
    pub cluster: String,
    /// Destination CIDR.
    pub destination: String,
    /// The record (JSON).
    pub value: Vec<u8>,
}

/// One change to the route table: the row of `(cluster, destination)` put (`Some`) or removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteWrite {
    /// `--cluster-name` of the caller.
    pub cluster: String,
    /// Destination CIDR.
    pub destination: String,
    /// The record (JSON), or `None` to remove the row.
    pub value: Option<Vec<u8>>,
}

/// The rows of the load-balancer tables, as stored.
#[derive(Debug, Default)]
pub struct LbRows {
    /// `(key, value)` of every load balancer.
    pub records: Vec<(String, Vec<u8>)>,
    /// `(key, value)` of every hold.
    pub holds: Vec<(String, Vec<u8>)>,
    /// `(digest, value)` of every backend list.
    pub backends: Vec<(String, Vec<u8>)>,
}

/// Changes to the load-balancer tables, written in one transaction.
#[derive(Debug, Default)]
pub struct LbWrite {
    /// Load balancers to insert or replace.
    pub put_records: Vec<(String, Vec<u8>)>,
    /// Load balancers to remove.
    pub delete_records: Vec<String>,
    /// Holds to insert or replace.
    pub put_holds: Vec<(String, Vec<u8>)>,
    /// Holds to remove.
    pub delete_holds: Vec<String>,
    /// Backend lists to insert (before the records naming them).
    pub put_backends: Vec<(String, Vec<u8>)>,
    /// Backend lists no record names any more.
    pub delete_backends: Vec<String>,
}

impl LbWrite {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.put_records.is_empty()
            && self.delete_records.is_empty()
            && self.put_holds.is_empty()
            && self.delete_holds.is_empty()
            && self.put_backends.is_empty()
            && self.delete_backends.is_empty()
    }
}

/// Most rows `fence_marks_v2` holds. The framework only stores its `--fence-lease`, so more
/// rows only come from changing that flag; a mark for a new lease beyond this many drops the
/// others (leases no longer fenced on) rather than grow the table.
pub const MAX_FENCE_MARKS: u64 = 16;

/// A state-database failure, naming the file and what was being done.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The state directory could not be inspected or created.
    #[error("preparing --state-dir {}: {error}", .path.display())]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The state directory exists but others may write to it.
    #[error(
        "--state-dir {} has mode {mode:04o}, which is group- or world-writable; refusing to keep \
         state there (run `chmod go-w` on it, or point --state-dir elsewhere)",
        .path.display()
    )]
    StateDirWritableByOthers {
        /// The directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
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
        prepare_state_dir(state_dir)?;
        let path = state_dir.join(Self::FILE_NAME);
        let db = ZeroFilledFile::open(&path)
            .and_then(|file| {
                Database::builder()
                    .set_cache_size(CACHE_BYTES)
                    .create_with_backend(file)
            })
            .map_err(|err| match err {
                redb::DatabaseError::DatabaseAlreadyOpen => {
                    StoreError::InUse { path: path.clone() }
                }
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
                Some(SCHEMA_VERSION) => {}
                older => {
                    if older.is_some()
                        && txn
                            .delete_table(FENCE_MARKS_V1)
                            .map_err(|e| fail(e.into()))?
                    {
                        tracing::warn!(
                            path = %self.inner.path.display(),
                            "dropped the fence marks of schema 1 (no lease UID); the next \
                             leader's fence sets a new mark"
                        );
                    }
                    meta.insert(SCHEMA_KEY, SCHEMA_VERSION)
                        .map_err(|e| fail(e.into()))?;
                }
            }
            txn.open_table(FENCE_MARKS).map_err(|e| fail(e.into()))?;
            txn.open_table(LB_RECORDS).map_err(|e| fail(e.into()))?;
            txn.open_table(LB_HOLDS).map_err(|e| fail(e.into()))?;
            txn.open_table(LB_BACKENDS).map_err(|e| fail(e.into()))?;
            txn.open_table(ROUTES).map_err(|e| fail(e.into()))?;
        }
        txn.commit().map_err(|e| fail(e.into()))
    }

    /// Every route row (start-up).
    pub fn load_routes(&self) -> Result<Vec<RouteRow>, StoreError> {
        let fail = self.io_error("reading the routes");
        let txn = self.inner.db.begin_read().map_err(|e| fail(e.into()))?;
        let table = txn.open_table(ROUTES).map_err(|e| fail(e.into()))?;
        let mut rows = Vec::new();
        for row in table.iter().map_err(|e| fail(e.into()))? {
            let (key, value) = row.map_err(|e| fail(e.into()))?;
            let (cluster, destination) = key.value();
            rows.push(RouteRow {
                cluster: cluster.to_string(),
                destination: destination.to_string(),
                value: value.value().to_vec(),
            });
        }
        Ok(rows)
    }

    /// Durably writes one route row (`Some`) or removes it (`None`).
    pub fn write_route(
        &self,
        cluster: &str,
        destination: &str,
        value: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        self.write_routes(&[RouteWrite {
            cluster: cluster.to_string(),
            destination: destination.to_string(),
            value: value.map(<[u8]>::to_vec),
        }])
    }

    /// Applies `writes` in order in one durable transaction (group commit: one fsync for
    /// every route change queued while the previous commit was running).
    pub fn write_routes(&self, writes: &[RouteWrite]) -> Result<(), StoreError> {
        let fail = self.io_error("writing the routes");
        let txn = self.inner.db.begin_write().map_err(|e| fail(e.into()))?;
        {
            let mut table = txn.open_table(ROUTES).map_err(|e| fail(e.into()))?;
            for write in writes {
                let key = (write.cluster.as_str(), write.destination.as_str());
                match &write.value {
                    Some(value) => {
                        table
                            .insert(key, value.as_slice())
                            .map_err(|e| fail(e.into()))?;
                    }
                    None => {
                        table.remove(key).map_err(|e| fail(e.into()))?;
                    }
                }
            }
        }
        txn.commit().map_err(|e| fail(e.into()))
    }

    /// Every load-balancer row (start-up).
    pub fn load_lb_rows(&self) -> Result<LbRows, StoreError> {
        let fail = self.io_error("reading the load balancers");
        let txn = self.inner.db.begin_read().map_err(|e| fail(e.into()))?;
        let mut rows = LbRows::default();
        for (table, out) in [
            (LB_RECORDS, &mut rows.records),
            (LB_HOLDS, &mut rows.holds),
            (LB_BACKENDS, &mut rows.backends),
        ] {
            let table = txn.open_table(table).map_err(|e| fail(e.into()))?;
            for row in table.iter().map_err(|e| fail(e.into()))? {
                let (key, value) = row.map_err(|e| fail(e.into()))?;
                out.push((key.value().to_string(), value.value().to_vec()));
            }
        }
        Ok(rows)
    }

    /// Applies `write` in one durable transaction.
    pub fn write_lb(&self, write: &LbWrite) -> Result<(), StoreError> {
        self.write_lb_batch(std::slice::from_ref(write))
    }

    /// Applies `writes` in order in one durable transaction (group commit: one fsync for
    /// every change decided while the previous commit was running).
    pub fn write_lb_batch(&self, writes: &[LbWrite]) -> Result<(), StoreError> {
        let fail = self.io_error("writing the load balancers");
        let txn = self.inner.db.begin_write().map_err(|e| fail(e.into()))?;
        {
            let mut records = txn.open_table(LB_RECORDS).map_err(|e| fail(e.into()))?;
            let mut holds = txn.open_table(LB_HOLDS).map_err(|e| fail(e.into()))?;
            let mut backends = txn.open_table(LB_BACKENDS).map_err(|e| fail(e.into()))?;
            for write in writes {
                for (key, value) in &write.put_backends {
                    backends
                        .insert(key.as_str(), value.as_slice())
                        .map_err(|e| fail(e.into()))?;
                }
                for key in &write.delete_records {
                    records.remove(key.as_str()).map_err(|e| fail(e.into()))?;
                }
                for (key, value) in &write.put_records {
                    records
                        .insert(key.as_str(), value.as_slice())
                        .map_err(|e| fail(e.into()))?;
                }
                for key in &write.delete_holds {
                    holds.remove(key.as_str()).map_err(|e| fail(e.into()))?;
                }
                for (key, value) in &write.put_holds {
                    holds
                        .insert(key.as_str(), value.as_slice())
                        .map_err(|e| fail(e.into()))?;
                }
                for key in &write.delete_backends {
                    backends.remove(key.as_str()).map_err(|e| fail(e.into()))?;
                }
            }
        }
        txn.commit().map_err(|e| fail(e.into()))
    }

    /// The stored fence mark of `lease`.
    pub fn fence_mark(&self, lease: &str) -> Result<Option<FenceMark>, StoreError> {
        let fail = self.io_error("reading a fence mark");
        let txn = self.inner.db.begin_read().map_err(|e| fail(e.into()))?;
        let table = txn.open_table(FENCE_MARKS).map_err(|e| fail(e.into()))?;
        let mark = table.get(lease).map_err(|e| fail(e.into()))?.map(|v| {
            let (lease_uid, lease_transitions, holder) = v.value();
            FenceMark {
                lease_uid: lease_uid.to_string(),
                lease_transitions,
                holder_identity: holder.to_string(),
            }
        });
        Ok(mark)
    }

    /// Durably replaces the fence mark of `lease`; a new lease in a table already holding
    /// [`MAX_FENCE_MARKS`] rows drops the other rows first.
    pub fn set_fence_mark(&self, lease: &str, mark: &FenceMark) -> Result<(), StoreError> {
        let fail = self.io_error("writing a fence mark");
        let txn = self.inner.db.begin_write().map_err(|e| fail(e.into()))?;
        {
            let mut table = txn.open_table(FENCE_MARKS).map_err(|e| fail(e.into()))?;
            let known = table.get(lease).map_err(|e| fail(e.into()))?.is_some();
            let rows = table.len().map_err(|e| fail(e.into()))?;
            if !known && rows >= MAX_FENCE_MARKS {
                table.retain(|_, _| false).map_err(|e| fail(e.into()))?;
                tracing::warn!(
                    path = %self.inner.path.display(),
                    rows,
                    %lease,
                    "fence mark table full; dropped the marks of other leases"
                );
            }
            table
                .insert(
                    lease,
                    (
                        mark.lease_uid.as_str(),
                        mark.lease_transitions,
                        mark.holder_identity.as_str(),
                    ),
                )
                .map_err(|e| fail(e.into()))?;
        }
        txn.commit().map_err(|e| fail(e.into()))
    }

    /// Durably forgets every fence mark (`local-shim --reset-fence`); returns how many there
    /// were.
    pub fn clear_fence_marks(&self) -> Result<u64, StoreError> {
        let fail = self.io_error("clearing the fence marks");
        let txn = self.inner.db.begin_write().map_err(|e| fail(e.into()))?;
        let rows = {
            let mut table = txn.open_table(FENCE_MARKS).map_err(|e| fail(e.into()))?;
            let rows = table.len().map_err(|e| fail(e.into()))?;
            table.retain(|_, _| false).map_err(|e| fail(e.into()))?;
            rows
        };
        txn.commit().map_err(|e| fail(e.into()))?;
        Ok(rows)
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

/// redb's page cache. Its default (1 GiB) lets the cache grow with every page written; the
/// whole database is a few MiB at the bench's scale (1000 load balancers), and a page not in
/// the cache is read back from the OS page cache, so a few MiB cost nothing noticeable.
const CACHE_BYTES: usize = 4 * 1024 * 1024;

/// Mode of a `--state-dir` the shim creates: the state is nobody else's business.
pub const STATE_DIR_MODE: u32 = 0o700;

/// Creates a missing `dir` (and parents) with [`STATE_DIR_MODE`]; refuses an existing one that
/// is group- or world-writable, since whoever can write there can replace the database (and
/// with it the fence marks).
fn prepare_state_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};

    let dir_error = |error| StoreError::StateDir {
        path: dir.to_path_buf(),
        error,
    };
    match std::fs::metadata(dir) {
        Ok(metadata) if !metadata.is_dir() => Err(dir_error(std::io::Error::other(
            "exists and is not a directory",
        ))),
        Ok(metadata) => {
            let mode = metadata.permissions().mode() & 0o7777;
            if mode & 0o022 != 0 {
                return Err(StoreError::StateDirWritableByOthers {
                    path: dir.to_path_buf(),
                    mode,
                });
            }
            Ok(())
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(STATE_DIR_MODE)
                .create(dir)
                .map_err(dir_error)?;
            // DirBuilder's mode is filtered by the umask; set it exactly.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(STATE_DIR_MODE))
                .map_err(dir_error)
        }
        Err(err) => Err(dir_error(err)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const LEASE: &str = "kube-system/cloud-controller-manager";

    fn mark(uid: &str, transitions: i64, holder: &str) -> FenceMark {
        FenceMark {
            lease_uid: uid.into(),
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
            assert_eq!(store.fence_mark(LEASE).unwrap(), None);
            store.set_fence_mark(LEASE, &mark("u1", 3, "a")).unwrap();
            store.set_fence_mark(LEASE, &mark("u2", 0, "b")).unwrap();
        }
        let store = Store::open(&state).unwrap();
        assert_eq!(store.fence_mark(LEASE).unwrap(), Some(mark("u2", 0, "b")));
        assert_eq!(store.path(), state.join("state.redb"));
    }

    #[tokio::test]
    async fn fence_guard_over_a_reopened_store_refuses_the_old_leader() {
        let dir = tempfile::tempdir().unwrap();
        let fence = |t: i64, h: &str| cpi_proto::v1::Fence {
            lease: LEASE.into(),
            holder_identity: h.into(),
            lease_transitions: t,
            lease_uid: "u1".into(),
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
    fn clearing_forgets_every_mark_durably() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store.set_fence_mark(LEASE, &mark("u1", 9, "a")).unwrap();
            store
                .set_fence_mark("infra/ccm", &mark("u2", 1, "b"))
                .unwrap();
            assert_eq!(store.clear_fence_marks().unwrap(), 2);
            assert_eq!(store.clear_fence_marks().unwrap(), 0);
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.fence_mark(LEASE).unwrap(), None);
        assert_eq!(store.fence_mark("infra/ccm").unwrap(), None);
    }

    #[test]
    fn the_fence_mark_table_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for i in 0..MAX_FENCE_MARKS {
            store
                .set_fence_mark(&format!("ns/lease-{i}"), &mark("u", 1, "a"))
                .unwrap();
        }
        // Known leases are updated in place, whatever the count.
        store
            .set_fence_mark("ns/lease-0", &mark("u", 2, "a"))
            .unwrap();
        assert_eq!(
            store.fence_mark("ns/lease-1").unwrap(),
            Some(mark("u", 1, "a"))
        );
        // One more lease drops the others instead of growing the table.
        store.set_fence_mark(LEASE, &mark("u", 5, "b")).unwrap();
        assert_eq!(store.fence_mark(LEASE).unwrap(), Some(mark("u", 5, "b")));
        assert_eq!(store.fence_mark("ns/lease-0").unwrap(), None);
        assert_eq!(store.clear_fence_marks().unwrap(), 1);
    }

    #[test]
    fn schema_1_marks_are_dropped_on_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Database::create(dir.path().join(Store::FILE_NAME)).unwrap();
            let txn = db.begin_write().unwrap();
            {
                txn.open_table(META).unwrap().insert(SCHEMA_KEY, 1).unwrap();
                txn.open_table(FENCE_MARKS_V1)
                    .unwrap()
                    .insert(LEASE, (7, "old"))
                    .unwrap();
            }
            txn.commit().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.fence_mark(LEASE).unwrap(), None);
        store.set_fence_mark(LEASE, &mark("u1", 0, "a")).unwrap();
        drop(store);
        // Reopening a current database keeps its marks.
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.fence_mark(LEASE).unwrap(), Some(mark("u1", 0, "a")));
    }

    #[test]
    fn lb_rows_survive_reopening_and_apply_in_one_write() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .write_lb(&LbWrite {
                    put_records: vec![
                        ("c/u1".into(), b"a".to_vec()),
                        ("c/u2".into(), b"b".to_vec()),
                    ],
                    put_holds: vec![("c/ns/x".into(), b"h".to_vec())],
                    ..LbWrite::default()
                })
                .unwrap();
            store
                .write_lb(&LbWrite {
                    delete_records: vec!["c/u1".into(), "c/absent".into()],
                    ..LbWrite::default()
                })
                .unwrap();
        }
        let rows = Store::open(dir.path()).unwrap().load_lb_rows().unwrap();
        assert_eq!(rows.records, vec![("c/u2".to_string(), b"b".to_vec())]);
        assert_eq!(rows.holds, vec![("c/ns/x".to_string(), b"h".to_vec())]);
    }

    #[test]
    fn a_batch_applies_its_writes_in_order_in_one_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let put = |key: &str, value: &[u8]| LbWrite {
            put_records: vec![(key.into(), value.to_vec())],
            ..LbWrite::default()
        };
        let delete = |key: &str| LbWrite {
            delete_records: vec![key.into()],
            ..LbWrite::default()
        };
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .write_lb_batch(&[
                    put("c/gone", b"1"),
                    put("c/kept", b"1"),
                    delete("c/gone"),
                    put("c/kept", b"2"),
                ])
                .unwrap();
        }
        let rows = Store::open(dir.path()).unwrap().load_lb_rows().unwrap();
        assert_eq!(rows.records, vec![("c/kept".to_string(), b"2".to_vec())]);
    }

    #[test]
    fn route_rows_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .write_route("c1", "10.244.1.0/24", Some(b"a"))
                .unwrap();
            store
                .write_route("c1", "10.244.2.0/24", Some(b"b"))
                .unwrap();
            store
                .write_route("c2", "10.244.1.0/24", Some(b"c"))
                .unwrap();
            store.write_route("c1", "10.244.2.0/24", None).unwrap();
            store.write_route("c1", "absent", None).unwrap();
        }
        let rows = Store::open(dir.path()).unwrap().load_routes().unwrap();
        let row = |cluster: &str, destination: &str, value: &[u8]| RouteRow {
            cluster: cluster.into(),
            destination: destination.into(),
            value: value.to_vec(),
        };
        assert_eq!(
            rows,
            vec![
                row("c1", "10.244.1.0/24", b"a"),
                row("c2", "10.244.1.0/24", b"c")
            ]
        );
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
