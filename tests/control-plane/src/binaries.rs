//! Finding the etcd and kube-apiserver binaries.
//!
//! Order, per binary: `TEST_ASSET_KUBE_APISERVER` / `TEST_ASSET_ETCD` (a single binary), then
//! `KUBEBUILDER_ASSETS` (envtest layout: a directory holding `kube-apiserver` and `etcd`), then
//! the cache filled by `tests/control-plane/provision.sh`:
//! `${CCM_TEST_ASSETS_CACHE:-$HOME/.cache/ccm-test-assets}/<version>/`.
//! The first source that is *set* decides: a variable pointing at a missing or non-executable
//! file is an error rather than a silent fall-through to the next source.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::{Error, K8S_VERSION};

/// Names a single kube-apiserver binary (envtest convention).
pub const ENV_KUBE_APISERVER: &str = "TEST_ASSET_KUBE_APISERVER";
/// Names a single etcd binary (envtest convention).
pub const ENV_ETCD: &str = "TEST_ASSET_ETCD";
/// Names a directory holding `kube-apiserver` and `etcd` (envtest convention).
pub const ENV_KUBEBUILDER_ASSETS: &str = "KUBEBUILDER_ASSETS";
/// Overrides the cache root used by `provision.sh` (default `~/.cache/ccm-test-assets`).
pub const ENV_ASSETS_CACHE: &str = "CCM_TEST_ASSETS_CACHE";

/// Paths of the two server binaries a control plane runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryPaths {
    /// The kube-apiserver binary.
    pub kube_apiserver: PathBuf,
    /// The etcd binary.
    pub etcd: PathBuf,
}

impl BinaryPaths {
    /// Finds the binaries using the process environment.
    pub fn discover() -> Result<BinaryPaths, Error> {
        Self::discover_from(|name| std::env::var_os(name))
    }

    /// Finds the binaries using `env` as the environment (so tests need not mutate the real one).
    pub fn discover_from(env: impl Fn(&str) -> Option<OsString>) -> Result<BinaryPaths, Error> {
        let get = |name: &str| env(name).filter(|v| !v.is_empty());
        let cache = get(ENV_ASSETS_CACHE)
            .map(PathBuf::from)
            .or_else(|| get("HOME").map(|h| PathBuf::from(h).join(".cache/ccm-test-assets")))
            .map(|root| root.join(K8S_VERSION));
        let assets = get(ENV_KUBEBUILDER_ASSETS).map(PathBuf::from);

        let mut problems = Vec::new();
        let mut find = |binary: &str, single_var: &str| -> Option<PathBuf> {
            let (path, source) = if let Some(p) = get(single_var) {
                (PathBuf::from(p), format!("from {single_var}"))
            } else if let Some(dir) = &assets {
                (dir.join(binary), format!("from {ENV_KUBEBUILDER_ASSETS}"))
            } else if let Some(dir) = &cache {
                (
                    dir.join(binary),
                    format!("default cache; {single_var} and {ENV_KUBEBUILDER_ASSETS} are unset"),
                )
            } else {
                problems.push(format!(
                    "{binary}: {single_var}, {ENV_KUBEBUILDER_ASSETS}, {ENV_ASSETS_CACHE} and HOME are all unset"
                ));
                return None;
            };
            match check_executable(&path) {
                Ok(()) => Some(path),
                Err(why) => {
                    problems.push(format!("{binary} at {} ({source}): {why}", path.display()));
                    None
                }
            }
        };
        let kube_apiserver = find("kube-apiserver", ENV_KUBE_APISERVER);
        let etcd = find("etcd", ENV_ETCD);
        match (kube_apiserver, etcd) {
            (Some(kube_apiserver), Some(etcd)) => Ok(BinaryPaths {
                kube_apiserver,
                etcd,
            }),
            _ => Err(Error::BinariesNotFound {
                details: problems.join("; "),
            }),
        }
    }
}

impl BinaryPaths {
    /// Checks that both paths are executable files (for paths given explicitly in options).
    pub fn check(&self) -> Result<(), Error> {
        let problems: Vec<String> = [
            ("kube-apiserver", &self.kube_apiserver),
            ("etcd", &self.etcd),
        ]
        .into_iter()
        .filter_map(|(binary, path)| {
            check_executable(path)
                .err()
                .map(|why| format!("{binary} at {} (given explicitly): {why}", path.display()))
        })
        .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::BinariesNotFound {
                details: problems.join("; "),
            })
        }
    }
}

/// Ok if `path` (following symlinks) is a regular file with an execute bit.
fn check_executable(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "does not exist".to_owned(),
        _ => e.to_string(),
    })?;
    if !meta.is_file() {
        return Err("not a regular file".to_owned());
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err("not executable".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::collections::HashMap;
    use std::os::unix::fs::PermissionsExt;

    fn env<'a>(vars: &'a HashMap<&str, PathBuf>) -> impl Fn(&str) -> Option<OsString> + 'a {
        |name| vars.get(name).map(|p| p.clone().into_os_string())
    }

    fn fake_binary(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn single_binary_variables_win_over_directories() {
        let dir = tempfile::tempdir().unwrap();
        let api = dir.path().join("single/kube-apiserver");
        let etcd = dir.path().join("assets/etcd");
        fake_binary(&api);
        fake_binary(&etcd);
        fake_binary(&dir.path().join("assets/kube-apiserver"));
        let vars = HashMap::from([
            (ENV_KUBE_APISERVER, api.clone()),
            (ENV_KUBEBUILDER_ASSETS, dir.path().join("assets")),
        ]);
        let found = BinaryPaths::discover_from(env(&vars)).unwrap();
        assert_eq!(
            found,
            BinaryPaths {
                kube_apiserver: api,
                etcd
            }
        );
    }

    #[test]
    fn default_cache_is_versioned_under_home_or_override() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("custom-cache");
        fake_binary(&cache.join(K8S_VERSION).join("kube-apiserver"));
        fake_binary(&cache.join(K8S_VERSION).join("etcd"));
        let vars = HashMap::from([
            (ENV_ASSETS_CACHE, cache.clone()),
            ("HOME", dir.path().join("home")),
        ]);
        let found = BinaryPaths::discover_from(env(&vars)).unwrap();
        assert_eq!(found.etcd, cache.join(K8S_VERSION).join("etcd"));

        let home = dir.path().join("home");
        fake_binary(
            &home
                .join(".cache/ccm-test-assets")
                .join(K8S_VERSION)
                .join("etcd"),
        );
        fake_binary(
            &home
                .join(".cache/ccm-test-assets")
                .join(K8S_VERSION)
                .join("kube-apiserver"),
        );
        let vars = HashMap::from([("HOME", home.clone())]);
        let found = BinaryPaths::discover_from(env(&vars)).unwrap();
        assert!(found.kube_apiserver.starts_with(&home));
    }

    #[test]
    fn non_executable_and_unset_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let api = dir.path().join("kube-apiserver");
        std::fs::write(&api, "").unwrap();
        std::fs::set_permissions(&api, std::fs::Permissions::from_mode(0o644)).unwrap();
        let vars = HashMap::from([(ENV_KUBE_APISERVER, api)]);
        let err = BinaryPaths::discover_from(env(&vars))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not executable"), "{err}");
        assert!(
            err.contains(&format!(
                "etcd: {ENV_ETCD}, {ENV_KUBEBUILDER_ASSETS}, {ENV_ASSETS_CACHE} and HOME are all unset"
            )),
            "{err}"
        );
    }
}
