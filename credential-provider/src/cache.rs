//! The on-disk cache shared between invocations: one JSON file, private mode, replaced
//! atomically, bounded in entries and bytes. Lookups and inserts are pure functions of the
//! entries and `now`; [`DiskCache`] only reads and writes the file. A missing, corrupt,
//! oversized or non-private file is ignored (and rewritten on the next store), never fatal.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::protocol::{AuthConfig, CacheKeyType, CredentialProviderResponse};

/// At most this many entries are kept; the ones expiring soonest go first.
pub const MAX_ENTRIES: usize = 256;
/// A cache file larger than this is ignored.
pub const MAX_FILE_BYTES: u64 = 1 << 20;
/// The cache file's name inside the cache directory.
pub const FILE_NAME: &str = "credentials.json";
const FORMAT_VERSION: u32 = 1;

/// One cached answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CacheEntry {
    /// Family, registry and a hash of the identity the credentials belong to.
    pub key: String,
    /// When the credentials were obtained (Unix seconds).
    pub issued_at: i64,
    /// When they stop working (Unix seconds).
    pub expires_at: i64,
    /// The response's cache key type.
    pub cache_key_type: CacheKeyType,
    /// The cache duration the provider answered with, in seconds.
    pub cache_duration_secs: Option<u64>,
    /// The credentials.
    pub auth: BTreeMap<String, AuthConfig>,
}

impl CacheEntry {
    /// How long before expiry an entry stops being served: a tenth of its lifetime, at least
    /// 10 s and at most 5 min, so that a pull never starts with a nearly expired token.
    pub fn margin_secs(&self) -> i64 {
        ((self.expires_at - self.issued_at) / 10).clamp(10, 300)
    }

    /// Whether the entry may be served at `now`.
    pub fn usable_at(&self, now: i64) -> bool {
        self.expires_at - now > self.margin_secs()
    }

    /// The response served from this entry at `now`: the kubelet is never told to cache it
    /// past the point where this cache would stop serving it.
    pub fn response_at(&self, now: i64) -> CredentialProviderResponse {
        let left = u64::try_from(self.expires_at - self.margin_secs() - now).unwrap_or(0);
        CredentialProviderResponse {
            cache_key_type: self.cache_key_type,
            cache_duration: Some(Duration::from_secs(
                self.cache_duration_secs.map_or(left, |d| d.min(left)),
            )),
            auth: self.auth.clone(),
        }
    }
}

/// The usable entry for `key` at `now`.
pub fn lookup<'a>(entries: &'a [CacheEntry], key: &str, now: i64) -> Option<&'a CacheEntry> {
    entries
        .iter()
        .find(|e| e.key == key)
        .filter(|e| e.usable_at(now))
}

/// The entries after storing `entry` at `now`: the old entry of its key and unusable ones
/// dropped, then the soonest-expiring ones until at most [`MAX_ENTRIES`] remain.
pub fn insert(mut entries: Vec<CacheEntry>, entry: CacheEntry, now: i64) -> Vec<CacheEntry> {
    entries.retain(|e| e.key != entry.key && e.usable_at(now));
    entries.push(entry);
    if entries.len() > MAX_ENTRIES {
        entries.sort_by_key(|e| std::cmp::Reverse(e.expires_at));
        entries.truncate(MAX_ENTRIES);
    }
    entries
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CacheFile {
    version: u32,
    entries: Vec<CacheEntry>,
}

/// What loading the cache file found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheState {
    /// No file yet.
    Missing,
    /// Read.
    Loaded,
    /// Ignored: unreadable, not JSON, the wrong format or too large.
    Corrupt(String),
    /// Ignored: readable by others than its owner.
    NotPrivate,
}

/// The cache file in a directory.
#[derive(Debug, Clone)]
pub struct DiskCache {
    dir: PathBuf,
}

impl DiskCache {
    /// The cache in `dir` (created on the first store, mode 0700).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The cache file's path.
    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    /// Reads the entries; anything wrong with the file gives none and says why.
    pub fn load(&self) -> (Vec<CacheEntry>, CacheState) {
        let path = self.path();
        let meta = match fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return (Vec::new(), CacheState::Missing);
            }
            Err(e) => return (Vec::new(), CacheState::Corrupt(e.to_string())),
        };
        if meta.permissions().mode() & 0o077 != 0 {
            return (Vec::new(), CacheState::NotPrivate);
        }
        if meta.len() > MAX_FILE_BYTES {
            return (
                Vec::new(),
                CacheState::Corrupt(format!("larger than {MAX_FILE_BYTES} bytes")),
            );
        }
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) => return (Vec::new(), CacheState::Corrupt(e.to_string())),
        };
        match serde_json::from_slice::<CacheFile>(&bytes) {
            Ok(f) if f.version == FORMAT_VERSION => (f.entries, CacheState::Loaded),
            Ok(f) => (
                Vec::new(),
                CacheState::Corrupt(format!("format version {}", f.version)),
            ),
            Err(e) => (Vec::new(), CacheState::Corrupt(e.to_string())),
        }
    }

    /// Replaces the file with `entries`: written to a private temporary file, then renamed.
    pub fn store(&self, entries: Vec<CacheEntry>) -> std::io::Result<()> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)?;
        let body = serde_json::to_vec(&CacheFile {
            version: FORMAT_VERSION,
            entries,
        })
        .map_err(std::io::Error::other)?;
        let tmp = self
            .dir
            .join(format!(".{FILE_NAME}.{}.tmp", std::process::id()));
        let result = write_private(&tmp, &body).and_then(|()| fs::rename(&tmp, self.path()));
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

fn write_private(path: &Path, body: &[u8]) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // The mode given to open is masked by the umask; set it explicitly.
    f.set_permissions(fs::Permissions::from_mode(0o600))?;
    f.write_all(body)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, issued: i64, expires: i64) -> CacheEntry {
        CacheEntry {
            key: key.into(),
            issued_at: issued,
            expires_at: expires,
            cache_key_type: CacheKeyType::Registry,
            cache_duration_secs: Some(6 * 3600),
            auth: BTreeMap::from([(
                "r.io".to_string(),
                AuthConfig {
                    username: "AWS".into(),
                    password: "p".into(),
                },
            )]),
        }
    }

    #[test]
    fn expired_and_nearly_expired_entries_are_not_served() {
        let e = entry("k", 0, 12 * 3600);
        let entries = vec![e.clone()];
        assert!(lookup(&entries, "k", 3600).is_some());
        // 5 minutes before expiry (the margin of a 12 h token) it is no longer served.
        assert!(lookup(&entries, "k", 12 * 3600 - 300).is_none());
        assert!(lookup(&entries, "k", 12 * 3600 - 301).is_some());
        assert!(lookup(&entries, "k", 13 * 3600).is_none());
        assert!(lookup(&entries, "other", 3600).is_none());
        // A short-lived token gets a margin of a tenth of its life, at least 10 s.
        assert_eq!(entry("s", 0, 60).margin_secs(), 10);
        assert_eq!(entry("s", 0, 1000).margin_secs(), 100);
    }

    #[test]
    fn served_duration_never_outlives_the_entry() {
        let e = entry("k", 0, 12 * 3600);
        assert_eq!(
            e.response_at(0).cache_duration,
            Some(Duration::from_secs(6 * 3600))
        );
        let late = e.response_at(11 * 3600);
        assert_eq!(late.cache_duration, Some(Duration::from_secs(3600 - 300)));
    }

    #[test]
    fn insert_replaces_drops_stale_and_bounds_size() {
        let entries = vec![entry("a", 0, 100), entry("b", 0, 10_000)];
        let out = insert(entries, entry("b", 50, 20_000), 95);
        assert_eq!(out.len(), 1, "a is stale, b replaced");
        assert_eq!(out[0].expires_at, 20_000);
        let many: Vec<CacheEntry> = (0..MAX_ENTRIES as i64)
            .map(|i| entry(&format!("k{i}"), 0, 10_000 + i))
            .collect();
        let out = insert(many, entry("new", 0, 50_000), 0);
        assert_eq!(out.len(), MAX_ENTRIES);
        assert!(out.iter().any(|e| e.key == "new"));
        assert!(
            !out.iter().any(|e| e.key == "k0"),
            "soonest expiring evicted"
        );
    }

    #[test]
    fn file_is_private_atomic_and_corruption_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::new(dir.path().join("c"));
        assert_eq!(cache.load().1, CacheState::Missing);
        cache.store(vec![entry("k", 0, 100)]).unwrap();
        let mode = fs::metadata(cache.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = fs::metadata(dir.path().join("c"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        let (entries, state) = cache.load();
        assert_eq!((entries.len(), state), (1, CacheState::Loaded));

        fs::write(cache.path(), b"{not json").unwrap();
        assert!(matches!(cache.load(), (e, CacheState::Corrupt(_)) if e.is_empty()));
        cache.store(vec![entry("k", 0, 100)]).unwrap();
        assert_eq!(cache.load().1, CacheState::Loaded, "rewritten");

        fs::set_permissions(cache.path(), fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(cache.load().1, CacheState::NotPrivate);

        let big = vec![b' '; MAX_FILE_BYTES as usize + 1];
        fs::write(cache.path(), big).unwrap();
        fs::set_permissions(cache.path(), fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(cache.load().1, CacheState::Corrupt(_)));
    }
}
