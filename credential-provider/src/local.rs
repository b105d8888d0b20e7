//! The `local` family: credentials per registry from a file the operator manages (Harbor,
//! Nexus, a plain distribution registry). The file is read on every invocation, so an edit
//! takes effect on the next pull the kubelet does not answer from its own cache (keep
//! `cacheDuration` short for quick rotation).
//!
//! ```yaml
//! cacheDuration: 1m            # optional, Go duration, default 1m
//! registries:
//!   - match: 127.0.0.1:5000    # the kubelet's matchImages glob syntax
//!     username: alice
//!     password: s3cret
//!   - match: harbor.example.com/team
//!     token: eyJhbGciOi...     # a token is sent as the password
//!     username: robot$team     # optional with a token (default "<token>")
//!     expires: "2027-01-01T00:00:00Z"   # optional, RFC 3339
//! ```
//! JSON with the same fields works too. Unknown and duplicate fields are errors.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::error::Error;
use crate::matching::urls_match;
use crate::protocol::{AuthConfig, CacheKeyType, CredentialProviderResponse, parse_go_duration};

/// How long the kubelet may cache a local answer unless the file says otherwise.
pub const DEFAULT_CACHE_DURATION: Duration = Duration::from_secs(60);
/// The user name sent with a token when the entry names none (Docker's identity-token user).
pub const TOKEN_USERNAME: &str = "<token>";

/// The parsed file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalConfig {
    /// How long the kubelet may cache answers.
    pub cache_duration: Duration,
    /// The entries, in file order.
    pub registries: Vec<LocalEntry>,
}

/// One registry's credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct LocalEntry {
    /// The image pattern.
    pub pattern: String,
    /// The credentials.
    pub auth: AuthConfig,
    /// When they expire (Unix seconds).
    pub expires_at: Option<i64>,
}

impl std::fmt::Debug for LocalEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalEntry")
            .field("pattern", &self.pattern)
            .field("auth", &self.auth)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawFile {
    cache_duration: Option<String>,
    registries: Vec<RawEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    #[serde(rename = "match")]
    pattern: String,
    username: Option<String>,
    password: Option<String>,
    token: Option<String>,
    expires: Option<String>,
}

/// Parses the file's text; `path` only names it in errors.
pub fn parse_local_config(text: &str, path: &Path) -> Result<LocalConfig, Error> {
    let bad = |detail: String| Error::LocalParse {
        path: path.to_path_buf(),
        detail,
    };
    let raw: RawFile = if text.trim_start().starts_with('{') {
        serde_json::from_str(text)
            .map_err(|e| bad(crate::protocol::DecodeError::from_json(e).to_string()))?
    } else {
        serde_saphyr::from_str(text).map_err(|e| bad(yaml_error_without_values(&e.to_string())))?
    };
    let cache_duration = match raw.cache_duration {
        None => DEFAULT_CACHE_DURATION,
        Some(s) => parse_go_duration(&s).ok_or_else(|| {
            bad(format!(
                "cacheDuration {s:?} is not a duration such as 1m or 30s"
            ))
        })?,
    };
    let mut registries = Vec::with_capacity(raw.registries.len());
    for (i, e) in raw.registries.into_iter().enumerate() {
        let at = format!("registries[{i}]");
        if e.pattern.trim().is_empty() {
            return Err(bad(format!("{at}: `match` is empty")));
        }
        let auth = match (e.username, e.password, e.token) {
            (Some(username), Some(password), None) => AuthConfig { username, password },
            (username, None, Some(token)) => AuthConfig {
                username: username.unwrap_or_else(|| TOKEN_USERNAME.to_string()),
                password: token,
            },
            (None, Some(_), None) => {
                return Err(bad(format!(
                    "{at} ({}): `password` needs `username`",
                    e.pattern
                )));
            }
            (_, Some(_), Some(_)) => {
                return Err(bad(format!(
                    "{at} ({}): give `password` or `token`, not both",
                    e.pattern
                )));
            }
            (_, None, None) => {
                return Err(bad(format!(
                    "{at} ({}): needs `username` and `password`, or `token`",
                    e.pattern
                )));
            }
        };
        let expires_at = match e.expires {
            None => None,
            Some(s) => Some(
                chrono::DateTime::parse_from_rfc3339(&s)
                    .map_err(|err| {
                        bad(format!(
                            "{at} ({}): expires {s:?} is not RFC 3339: {err}",
                            e.pattern
                        ))
                    })?
                    .timestamp(),
            ),
        };
        registries.push(LocalEntry {
            pattern: e.pattern,
            auth,
            expires_at,
        });
    }
    Ok(LocalConfig {
        cache_duration,
        registries,
    })
}

/// YAML errors may quote the document (and so a credential): keep the first line's
/// position and wording, up to any quoted value.
fn yaml_error_without_values(text: &str) -> String {
    let first = text.lines().next().unwrap_or(text);
    let first = first.strip_prefix("error: ").unwrap_or(first);
    let unquoted = first.split(['"', '\'']).next().unwrap_or(first);
    unquoted
        .split(", expected")
        .next()
        .unwrap_or(unquoted)
        .trim_end()
        .to_string()
}

/// Reads and parses the file.
pub fn load_local_config(path: &Path) -> Result<LocalConfig, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::LocalRead {
        path: path.to_path_buf(),
        source,
    })?;
    parse_local_config(&text, path)
}

/// Whether some entry's pattern matches `image`.
pub fn local_matches(config: &LocalConfig, image: &str) -> bool {
    config
        .registries
        .iter()
        .any(|e| urls_match(&e.pattern, image))
}

/// The answer for `image` at `now` (Unix seconds): every unexpired matching entry, keyed by
/// its pattern; the kubelet tries them longest first.
pub fn resolve_local(
    config: &LocalConfig,
    image: &str,
    now: i64,
    path: &Path,
) -> Result<CredentialProviderResponse, Error> {
    let matching: Vec<&LocalEntry> = config
        .registries
        .iter()
        .filter(|e| urls_match(&e.pattern, image))
        .collect();
    let Some(first) = matching.first() else {
        return Err(Error::LocalNoMatch {
            image: image.to_string(),
            path: path.to_path_buf(),
        });
    };
    let live: Vec<&&LocalEntry> = matching
        .iter()
        .filter(|e| e.expires_at.is_none_or(|t| t > now))
        .collect();
    if live.is_empty() {
        let expired_at = first
            .expires_at
            .and_then(|t| chrono::DateTime::from_timestamp(t, 0))
            .map(|t| t.to_rfc3339())
            .unwrap_or_default();
        return Err(Error::LocalExpired {
            pattern: first.pattern.clone(),
            path: path.to_path_buf(),
            expired_at,
        });
    }
    let soonest = live.iter().filter_map(|e| e.expires_at).min();
    let until_expiry = soonest.map(|t| Duration::from_secs(u64::try_from(t - now).unwrap_or(0)));
    let cache_duration =
        until_expiry.map_or(config.cache_duration, |d| d.min(config.cache_duration));
    // A pattern with a path must not let the kubelet reuse the answer for the whole registry.
    let cache_key_type = if live.iter().any(|e| e.pattern.contains('/')) {
        CacheKeyType::Image
    } else {
        CacheKeyType::Registry
    };
    let auth: BTreeMap<String, AuthConfig> = live
        .iter()
        .map(|e| (e.pattern.clone(), e.auth.clone()))
        .collect();
    Ok(CredentialProviderResponse {
        cache_key_type,
        cache_duration: Some(cache_duration),
        auth,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
cacheDuration: 2m
registries:
  - match: 127.0.0.1:5000
    username: alice
    password: s3cret
  - match: harbor.example.com/team
    token: tok
    expires: "2030-01-01T00:00:00Z"
  - match: old.example.com
    username: bob
    password: x
    expires: "2020-01-01T00:00:00Z"
"#;

    fn path() -> &'static Path {
        Path::new("/etc/creds.yaml")
    }

    #[test]
    fn parses_yaml_and_json() {
        let c = parse_local_config(FILE, path()).unwrap();
        assert_eq!(c.cache_duration, Duration::from_secs(120));
        assert_eq!(c.registries.len(), 3);
        assert_eq!(c.registries[1].auth.username, TOKEN_USERNAME);
        let json = r#"{"registries":[{"match":"r.io","username":"u","password":"p"}]}"#;
        let c = parse_local_config(json, path()).unwrap();
        assert_eq!(c.cache_duration, DEFAULT_CACHE_DURATION);
    }

    #[test]
    fn resolves_per_registry_with_expiry() {
        let c = parse_local_config(FILE, path()).unwrap();
        let now = chrono::DateTime::parse_from_rfc3339("2029-12-31T23:59:00Z")
            .unwrap()
            .timestamp();
        let r = resolve_local(&c, "127.0.0.1:5000/app:v1", now, path()).unwrap();
        assert_eq!(r.cache_key_type, CacheKeyType::Registry);
        assert_eq!(r.auth["127.0.0.1:5000"].username, "alice");
        assert_eq!(r.cache_duration, Some(Duration::from_secs(120)));
        let r = resolve_local(&c, "harbor.example.com/team/app", now, path()).unwrap();
        assert_eq!(r.cache_key_type, CacheKeyType::Image);
        assert_eq!(
            r.cache_duration,
            Some(Duration::from_secs(60)),
            "capped at expiry"
        );
        assert!(matches!(
            resolve_local(&c, "old.example.com/app", now, path()),
            Err(Error::LocalExpired { .. })
        ));
        assert!(matches!(
            resolve_local(&c, "127.0.0.1/app", now, path()),
            Err(Error::LocalNoMatch { .. })
        ));
    }

    #[test]
    fn bad_files_name_the_entry_and_never_the_secret() {
        let cases = [
            (
                "registries:\n  - match: r.io\n    username: u\n",
                "needs `username` and `password`",
            ),
            (
                "registries:\n  - match: r.io\n    password: hunter2\n",
                "`password` needs `username`",
            ),
            (
                "registries:\n  - match: r.io\n    username: u\n    password: hunter2\n    token: t\n",
                "not both",
            ),
            (
                "registries:\n  - match: r.io\n    token: hunter2\n    expires: tomorrow\n",
                "RFC 3339",
            ),
            (
                "registries:\n  - match: r.io\n    token: hunter2\n    colour: red\n",
                "colour",
            ),
            ("cacheDuration: soon\nregistries: []\n", "cacheDuration"),
            (
                "registries:\n  - match: r.io\n    token: hunter2\n    token: hunter3\n",
                "uplicate",
            ),
            (
                r#"{"registries":[{"match":"r.io","token":"hunter2","token":"x"}]}"#,
                "duplicate field",
            ),
        ];
        for (text, want) in cases {
            let err = parse_local_config(text, path()).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
            assert!(err.contains("/etc/creds.yaml"), "{err}");
            assert!(!err.contains("hunter2"), "secret leaked: {err}");
        }
    }
}
