//! The cross-component suites (`tests/`): the project's binaries as processes against a real
//! kube-apiserver, talking over real sockets. The harness they share with `bench` and
//! `local-cluster` (processes, waiting, temp directories, the shim's mutual TLS, node fixtures)
//! is the `test-support` crate; `tests/common` holds the suites' own fixtures.

use std::path::{Path, PathBuf};

/// Writes a `local` shim inventory file and returns its path.
pub fn write_inventory(dir: &Path, yaml: &str) -> std::io::Result<PathBuf> {
    let path = dir.join("inventory.yaml");
    std::fs::write(&path, yaml)?;
    Ok(path)
}
