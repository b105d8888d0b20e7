//! Temp directories for tests.

use std::path::Path;

use crate::Error;

/// Where [`temp_dir`] creates a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// The system temp directory (`$TMPDIR`, else `/tmp`).
    System,
    /// `/dev/shm` (memory) when it is usable, else the system temp directory: for servers that
    /// fsync a lot, such as etcd.
    PreferMemory,
}

/// A fresh directory named `<prefix><random>`, removed with everything in it when dropped.
pub fn temp_dir(prefix: &str, location: Location) -> Result<tempfile::TempDir, Error> {
    let mut builder = tempfile::Builder::new();
    builder.prefix(prefix);
    let shm = Path::new("/dev/shm");
    if location == Location::PreferMemory
        && shm.is_dir()
        && let Ok(dir) = builder.tempdir_in(shm)
    {
        return Ok(dir);
    }
    builder.tempdir().map_err(Error::io(format!(
        "creating a temp dir {prefix}* in {}",
        std::env::temp_dir().display()
    )))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn creates_prefixed_dirs_and_removes_them() {
        for location in [Location::System, Location::PreferMemory] {
            let dir = temp_dir("ccm-support-test-", location).unwrap();
            let path = dir.path().to_owned();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            assert!(name.starts_with("ccm-support-test-"), "{name}");
            assert!(path.is_dir());
            if location == Location::PreferMemory && Path::new("/dev/shm").is_dir() {
                assert!(path.starts_with("/dev/shm"), "{}", path.display());
            }
            drop(dir);
            assert!(!path.exists());
        }
    }
}
