//! The state database's file: redb's own file backend, except that each growth of the file is
//! written out as zeros when it happens (up to [`MAX_FILLED_GROWTH`] bytes at a time).
//!
//! redb grows its file with `set_len`, which leaves a hole. The first commit that writes a page
//! into the hole has the file system allocate its block, and on ext4 that makes the commit's
//! fdatasync write the inode too: a second synchronous write on most commits while the
//! database is young. Written once at growth, the blocks are allocated then; later commits
//! overwrite them and sync only their own pages. The zeros are what `set_len` promises anyway,
//! and they only ever cover bytes past the old end, so a crash while writing them loses nothing.

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Bound;
use std::os::unix::fs::FileExt as _;
use std::path::Path;

use redb::backends::FileBackend;
use redb::{BackendError, DatabaseError, StorageBackend};

/// The largest growth written out as zeros; a larger one is left sparse, as redb leaves it.
const MAX_FILLED_GROWTH: u64 = 64 * 1024 * 1024;

/// Zeros are written in pieces of this size.
const ZERO_CHUNK: usize = 256 * 1024;

/// redb's file backend with the file's growth written out (see the module documentation).
#[derive(Debug)]
pub(crate) struct ZeroFilledFile {
    inner: FileBackend,
    /// The same open file, for the zeros.
    file: File,
    max_filled_growth: u64,
}

impl ZeroFilledFile {
    /// Opens (creating if needed) the database file at `path`, as redb's own `create` does.
    pub(crate) fn open(path: &Path) -> Result<Self, DatabaseError> {
        Self::open_with_limit(path, MAX_FILLED_GROWTH)
    }

    fn open_with_limit(path: &Path, max_filled_growth: u64) -> Result<Self, DatabaseError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let writer = file.try_clone()?;
        Ok(Self {
            inner: FileBackend::new(file)?,
            file: writer,
            max_filled_growth,
        })
    }

    fn fill(&self, from: u64, to: u64) -> io::Result<()> {
        let zeros = vec![0u8; ZERO_CHUNK];
        let mut at = from;
        while at < to {
            let n = usize::try_from(to - at).map_or(ZERO_CHUNK, |left| left.min(ZERO_CHUNK));
            self.file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }
}

impl StorageBackend for ZeroFilledFile {
    fn len(&self) -> Result<u64, io::Error> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let old = self.inner.len()?;
        self.inner.set_len(len)?;
        if len > old && len - old <= self.max_filled_growth {
            self.fill(old, len)?;
        }
        Ok(())
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        self.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        self.inner.write(offset, data)
    }

    fn close(&self) -> Result<(), io::Error> {
        self.inner.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    use std::os::unix::fs::MetadataExt as _;

    /// Bytes the file system has allocated to `path`.
    fn allocated(path: &Path) -> u64 {
        std::fs::metadata(path).unwrap().blocks() * 512
    }

    #[test]
    fn growth_is_allocated_and_reads_as_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let backend = ZeroFilledFile::open(&path).unwrap();
        backend.write(0, b"kept").unwrap();
        backend.set_len(1 << 20).unwrap();
        assert_eq!(backend.len().unwrap(), 1 << 20);
        assert!(allocated(&path) >= 1 << 20, "{}", allocated(&path));
        let mut head = [0u8; 8];
        backend.read(0, &mut head).unwrap();
        assert_eq!(&head, b"kept\0\0\0\0");
        let mut tail = vec![1u8; 4096];
        backend.read((1 << 20) - 4096, &mut tail).unwrap();
        assert!(tail.iter().all(|b| *b == 0));
        // Shrinking is passed through.
        backend.set_len(4096).unwrap();
        assert_eq!(backend.len().unwrap(), 4096);
    }

    #[test]
    fn a_growth_over_the_limit_is_left_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let backend = ZeroFilledFile::open_with_limit(&path, 64 * 1024).unwrap();
        backend.set_len(1 << 20).unwrap();
        assert_eq!(backend.len().unwrap(), 1 << 20);
        assert!(allocated(&path) < 1 << 20, "{}", allocated(&path));
    }

    #[test]
    fn a_second_open_of_the_same_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let _db = redb::Database::builder()
            .create_with_backend(ZeroFilledFile::open(&path).unwrap())
            .unwrap();
        let again =
            redb::Database::builder().create_with_backend(ZeroFilledFile::open(&path).unwrap());
        assert!(
            matches!(again, Err(DatabaseError::DatabaseAlreadyOpen)),
            "{again:?}"
        );
    }
}
