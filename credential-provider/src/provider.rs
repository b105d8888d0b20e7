//! The plan for one request (pure: family, cache key, cache decision) and the thin executor
//! that reads the cache, calls the token service on a miss and stores the answer.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::args::Options;
use crate::cache::{self, CacheEntry, DiskCache};
use crate::error::Error;
use crate::family::{EcrHost, Family, parse_ecr_host};
use crate::fetched::Fetched;
use crate::local::{load_local_config, local_matches, resolve_local};
use crate::matching::{host_of, registry_of};
use crate::protocol::{CredentialProviderRequest, CredentialProviderResponse};

/// Environment variables that change whose credentials a family obtains, so they are part of
/// the cache key.
const IDENTITY_ENV: [&str; 16] = [
    "AWS_PROFILE",
    "AWS_ACCESS_KEY_ID",
    "AWS_ROLE_ARN",
    "AWS_ECR_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_ECR",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "GCE_METADATA_HOST",
    "KUBE_SIDECAR_CACHE_TYPE",
    "KUBE_SIDECAR_CACHE_DURATION",
    crate::gcp::STS_URL_ENV,
    crate::acr::IMDS_URL_ENV,
    crate::acr::REGISTRY_URL_ENV,
    "AZURE_AUTHORITY_HOST",
];

/// The family for `image`: the forced one, the image's cloud, else `local`.
pub fn choose_family(options: &Options, image: &str) -> Family {
    options
        .family
        .or_else(|| Family::detect(image))
        .unwrap_or(Family::Local)
}

/// The cache key: family, registry, and a SHA-256 of everything that decides the identity
/// (the service-account token and annotations, the family's options and environment), so
/// that one workload never receives another's credentials.
pub fn cache_key(
    family: Family,
    request: &CredentialProviderRequest,
    options: &Options,
    env: impl Fn(&str) -> Option<String>,
) -> String {
    let registry = match family {
        Family::Ecr => host_of(&request.image),
        _ => registry_of(&request.image),
    };
    let mut material = String::new();
    let _ = write!(
        material,
        "{:?}\n{:?}\n{:?}\n{}\n",
        options.gcp,
        options.acr,
        request.service_account_annotations,
        request.service_account_token.as_deref().unwrap_or("")
    );
    for name in IDENTITY_ENV {
        let _ = writeln!(material, "{name}={}", env(name).unwrap_or_default());
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, material.as_bytes());
    let hex: String = digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{}|{registry}|{hex}", family.name())
}

/// The entry to store for `fetched` at `now`, when its expiry is known and far enough.
pub fn entry_to_store(key: String, fetched: &Fetched, now: i64) -> Option<CacheEntry> {
    let expires_at = fetched.expires_at?;
    let entry = CacheEntry {
        key,
        issued_at: now,
        expires_at,
        cache_key_type: fetched.response.cache_key_type,
        cache_duration_secs: fetched.response.cache_duration.map(|d| d.as_secs()),
        auth: fetched.response.auth.clone(),
    };
    entry.usable_at(now).then_some(entry)
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Answers `request` at `now` (Unix seconds): the local file, the on-disk cache, or the
/// family's token service.
pub fn answer(
    options: &Options,
    request: &CredentialProviderRequest,
    now: i64,
) -> Result<CredentialProviderResponse, Error> {
    let family = choose_family(options, &request.image);
    if family == Family::Local {
        return answer_local(options, request, now);
    }
    let key = cache_key(family, request, options, env_var);
    let disk = options.cache_dir.as_ref().map(DiskCache::new);
    let entries = disk.as_ref().map(|d| d.load().0).unwrap_or_default();
    if let Some(hit) = cache::lookup(&entries, &key, now) {
        return Ok(hit.response_at(now));
    }
    let fetched = fetch(options, family, request, now)?;
    if let (Some(disk), Some(entry)) = (disk, entry_to_store(key, &fetched, now)) {
        // The cache is an optimisation: failing to write it must not fail the pull.
        let _ = disk.store(cache::insert(entries, entry, now));
    }
    Ok(fetched.response)
}

fn answer_local(
    options: &Options,
    request: &CredentialProviderRequest,
    now: i64,
) -> Result<CredentialProviderResponse, Error> {
    let path = &options.local_config;
    let config = match load_local_config(path) {
        Ok(c) => c,
        // Not forced and no file: the image belongs to no family at all.
        Err(Error::LocalRead { source, .. })
            if options.family.is_none() && source.kind() == std::io::ErrorKind::NotFound =>
        {
            return Err(Error::NoFamily {
                image: request.image.clone(),
                path: path.clone(),
            });
        }
        Err(e) => return Err(e),
    };
    if options.family.is_none() && !local_matches(&config, &request.image) {
        return Err(Error::NoFamily {
            image: request.image.clone(),
            path: path.clone(),
        });
    }
    resolve_local(&config, &request.image, now, path)
}

/// Calls the family's token service (never the cache).
pub fn fetch(
    options: &Options,
    family: Family,
    request: &CredentialProviderRequest,
    now: i64,
) -> Result<Fetched, Error> {
    // One thread: a multi-threaded runtime costs start-up time for nothing here.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    let sa = request
        .service_account_token
        .as_deref()
        .map(|t| (t, &request.service_account_annotations));
    runtime.block_on(async {
        match family {
            Family::Ecr => {
                let host = host_of(&request.image);
                let parsed = parse_ecr_host(host);
                let role = sa
                    .and_then(|(_, ann)| crate::ecr::role_for(ann, env_var(crate::ecr::ROLE_ENV)));
                // Without a role the node's own credentials are used, as upstream falls back.
                let web_identity = match (sa, role.as_deref()) {
                    (Some((token, _)), Some(role)) => Some((role, token)),
                    _ => None,
                };
                crate::ecr::fetch(host, &parsed, web_identity, now).await
            }
            Family::Gcp => {
                let client = crate::http::HttpClient::new()?;
                crate::gcp::fetch(&client, &options.gcp, &request.image, sa, now).await
            }
            Family::Acr => {
                let client = crate::http::HttpClient::new()?;
                crate::acr::fetch(&client, &options.acr, &request.image, sa).await
            }
            Family::Local => Ok(Fetched {
                response: answer_local(options, request, now)?,
                expires_at: None,
            }),
        }
    })
}

/// `credential-provider doctor IMAGE`: which family serves the image, where credentials come
/// from, the cache's state, and whether obtaining them works; never the secret. Returns the
/// report and whether it worked.
pub fn doctor(options: &Options, image: &str, now: i64) -> (String, bool) {
    let mut out = String::new();
    let family = choose_family(options, image);
    let why = if options.family.is_some() {
        "forced by the program name or --provider"
    } else if family == Family::Local {
        "not a cloud registry host"
    } else {
        "from the image's host"
    };
    let _ = writeln!(out, "image:       {image}");
    let _ = writeln!(out, "family:      {} ({why})", family.name());
    let _ = writeln!(out, "registry:    {}", registry_of(image));
    let source = match family {
        Family::Ecr => {
            let host = host_of(image);
            let region = match parse_ecr_host(host) {
                EcrHost::Private { region, fips, .. } => {
                    format!("region {region}{}", if fips { " (FIPS host)" } else { "" })
                }
                EcrHost::Public => "ECR Public, region us-east-1".to_string(),
                EcrHost::Other => "not an ECR host: the SDK's default region".to_string(),
            };
            let set: Vec<&str> = IDENTITY_ENV
                .iter()
                .copied()
                .filter(|n| n.starts_with("AWS_") && env_var(n).is_some())
                .collect();
            format!(
                "ECR GetAuthorizationToken, {region}, AWS default credential chain (set: {})",
                if set.is_empty() {
                    "none; instance role or ~/.aws".to_string()
                } else {
                    set.join(", ")
                }
            )
        }
        Family::Gcp => format!(
            "GCE metadata server {} ({:?} flow)",
            env_var("GCE_METADATA_HOST").unwrap_or_else(|| crate::gcp::METADATA_HOST.to_string()),
            options.gcp.auth_flow
        ),
        Family::Acr => format!(
            "Azure cloud config {}",
            options
                .acr
                .cloud_config
                .as_ref()
                .map_or("(none: managed identity)".to_string(), |p| p
                    .display()
                    .to_string())
        ),
        Family::Local => format!("local credentials file {}", options.local_config.display()),
    };
    let _ = writeln!(out, "credentials: {source}");
    let request = CredentialProviderRequest::new(crate::protocol::ApiVersion::V1, image);
    if family != Family::Local {
        match &options.cache_dir {
            None => {
                let _ = writeln!(out, "cache:       disabled");
            }
            Some(dir) => {
                let disk = DiskCache::new(dir);
                let (entries, state) = disk.load();
                let key = cache_key(family, &request, options, env_var);
                let entry = match cache::lookup(&entries, &key, now) {
                    Some(e) => format!("entry valid until Unix time {}", e.expires_at),
                    None => "no usable entry for this image".to_string(),
                };
                let _ = writeln!(
                    out,
                    "cache:       {} ({state:?}; {entry})",
                    disk.path().display()
                );
            }
        }
    }
    let result = match family {
        Family::Local => answer_local(options, &request, now),
        _ => fetch(options, family, &request, now).map(|f| f.response),
    };
    let ok = match result {
        Ok(r) => {
            let users: BTreeMap<&str, &str> = r
                .auth
                .iter()
                .map(|(k, a)| (k.as_str(), a.username.as_str()))
                .collect();
            let _ = writeln!(
                out,
                "result:      ok: credentials for {} key(s) {users:?} (passwords not shown), cacheKeyType {:?}, cacheDuration {}",
                r.auth.len(),
                r.cache_key_type,
                r.cache_duration
                    .map_or("unset".to_string(), crate::protocol::format_go_duration)
            );
            true
        }
        Err(e) => {
            let _ = writeln!(out, "result:      FAILED: {e}");
            false
        }
    };
    (out, ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::parse_args;
    use crate::protocol::ApiVersion;

    fn options() -> Options {
        parse_args("credential-provider", &[], |_| None).unwrap().1
    }

    #[test]
    fn cache_key_follows_registry_token_and_environment() {
        let o = options();
        let mut r = CredentialProviderRequest::new(
            ApiVersion::V1,
            "123456789012.dkr.ecr.us-east-1.amazonaws.com/a:1",
        );
        let none = |_: &str| None;
        let base = cache_key(Family::Ecr, &r, &o, none);
        assert!(
            base.starts_with("ecr|123456789012.dkr.ecr.us-east-1.amazonaws.com|"),
            "{base}"
        );
        r.image = "123456789012.dkr.ecr.us-east-1.amazonaws.com/b:2".into();
        assert_eq!(
            cache_key(Family::Ecr, &r, &o, none),
            base,
            "same registry, same key"
        );
        r.service_account_token = Some("tok-a".into());
        let a = cache_key(Family::Ecr, &r, &o, none);
        r.service_account_token = Some("tok-b".into());
        let b = cache_key(Family::Ecr, &r, &o, none);
        assert!(a != base && a != b, "the token is part of the key");
        assert!(!a.contains("tok-a"), "the token is hashed");
        let profile = cache_key(Family::Ecr, &r, &o, |n| {
            (n == "AWS_PROFILE").then(|| "x".to_string())
        });
        assert_ne!(profile, b);
    }

    #[test]
    fn only_known_future_expiries_are_stored() {
        let f = |exp| Fetched {
            response: CredentialProviderResponse {
                cache_key_type: crate::protocol::CacheKeyType::Registry,
                cache_duration: None,
                auth: BTreeMap::new(),
            },
            expires_at: exp,
        };
        assert!(entry_to_store("k".into(), &f(Some(1000)), 0).is_some());
        assert!(entry_to_store("k".into(), &f(Some(5)), 0).is_none());
        assert!(entry_to_store("k".into(), &f(None), 0).is_none());
    }

    #[test]
    fn family_choice() {
        let mut o = options();
        assert_eq!(choose_family(&o, "gcr.io/a/b"), Family::Gcp);
        assert_eq!(choose_family(&o, "127.0.0.1:5000/a"), Family::Local);
        o.family = Some(Family::Ecr);
        assert_eq!(choose_family(&o, "registry.k8s.io/a"), Family::Ecr);
    }
}
