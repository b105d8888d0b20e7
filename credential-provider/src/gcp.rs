//! GCR and Artifact Registry, as auth-provider-gcp does: an access token of the node's
//! service account from the GCE metadata server (user `_token`), or with
//! `--identity-provider` and an opted-in service account, a federated token from Google STS
//! for the workload's identity; or a docker config from instance metadata.

use std::collections::BTreeMap;
use std::time::Duration;

use http::Method;
use hyper::body::Bytes;
use serde::Deserialize;

use crate::args::{GcpAuthFlow, GcpOptions};
use crate::error::Error;
use crate::family::GCP_REGISTRY_PATTERNS;
use crate::fetched::Fetched;
use crate::http::{HttpClient, Purpose, TOKEN_JSON, form_encode};
use crate::matching::registry_of;
use crate::protocol::{AuthConfig, CacheKeyType, CredentialProviderResponse, parse_go_duration};

/// The metadata server's host unless `GCE_METADATA_HOST` names another (as Google's client
/// libraries honour it).
pub const METADATA_HOST: &str = "metadata.google.internal.";
/// Overrides the STS token endpoint (tests, private service connect).
pub const STS_URL_ENV: &str = "CREDENTIAL_PROVIDER_GCP_STS_URL";
const STS_URL: &str = "https://sts.googleapis.com/v1/token";
/// The annotation a service account sets to pull as itself.
pub const WI_ANNOTATION: &str = "iam.gke.io/enable-wi-image-pull";
const USER_AGENT: &str = "GKE auth-provider-gcp image pull";
const TOKEN_USER: &str = "_token";

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: Option<i64>,
}

/// The response: `token` for the image's registry and the fixed Google registries; cache
/// type and duration from `KUBE_SIDECAR_CACHE_TYPE` / `KUBE_SIDECAR_CACHE_DURATION` as
/// upstream, the duration capped by the token's life.
pub fn build_response(
    image: &str,
    password: String,
    expires_in: Option<i64>,
    now: i64,
    cache_type: Option<&str>,
    cache_duration: Option<&str>,
) -> Fetched {
    let auth_for = || AuthConfig {
        username: TOKEN_USER.to_string(),
        password: password.clone(),
    };
    let mut auth = BTreeMap::new();
    auth.insert(registry_of(image).to_string(), auth_for());
    for p in GCP_REGISTRY_PATTERNS {
        auth.insert(p.to_string(), auth_for());
    }
    let wanted = cache_duration
        .and_then(parse_go_duration)
        .unwrap_or(Duration::ZERO);
    let life = expires_in.map_or(wanted, |s| {
        Duration::from_secs(u64::try_from(s / 2).unwrap_or(0))
    });
    Fetched {
        response: CredentialProviderResponse {
            cache_key_type: cache_type
                .and_then(CacheKeyType::parse_lenient)
                .unwrap_or(CacheKeyType::Image),
            cache_duration: Some(wanted.min(life)),
            auth,
        },
        expires_at: expires_in.map(|s| now + s),
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn metadata_url(path: &str) -> String {
    let host = env("GCE_METADATA_HOST").unwrap_or_else(|| METADATA_HOST.to_string());
    format!("http://{host}/computeMetadata/v1/{path}")
}

/// What to check when the metadata server fails.
const METADATA_HINT: &str = "check that the node runs on GCE with a service account that has the cloud-platform or devstorage scope (GCE_METADATA_HOST overrides the metadata server)";

async fn metadata_get(client: &HttpClient, path: &str, what: &'static str) -> Result<Bytes, Error> {
    let purpose = Purpose {
        what,
        hint: METADATA_HINT.to_string(),
    };
    let req = purpose.request(
        Method::GET,
        &metadata_url(path),
        &[("Metadata-Flavor", "Google"), ("User-Agent", USER_AGENT)],
        None,
    )?;
    client.send_ok(req, &purpose).await
}

/// Obtains credentials for `image`.
pub async fn fetch(
    client: &HttpClient,
    options: &GcpOptions,
    image: &str,
    sa: Option<(&str, &BTreeMap<String, String>)>,
    now: i64,
) -> Result<Fetched, Error> {
    let cache_type = env("KUBE_SIDECAR_CACHE_TYPE");
    let cache_duration = env("KUBE_SIDECAR_CACHE_DURATION");
    let (password, expires_in) = match options.auth_flow {
        GcpAuthFlow::Gcr => match (&options.identity_provider, &options.project_id, sa) {
            (Some(idp), Some(project), Some((token, ann)))
                if ann.get(WI_ANNOTATION).map(String::as_str) == Some("true") =>
            {
                let t = sts_exchange(client, idp, project, token).await?;
                (t.access_token, t.expires_in)
            }
            _ => {
                let body = metadata_get(
                    client,
                    "instance/service-accounts/default/token",
                    "GCE metadata token",
                )
                .await?;
                let t: TokenAnswer =
                    serde_json::from_slice(&body).map_err(|_| Error::BadAnswer {
                        service: "GCE metadata server",
                        what: TOKEN_JSON,
                    })?;
                (t.access_token, t.expires_in)
            }
        },
        GcpAuthFlow::Dockercfg | GcpAuthFlow::DockercfgUrl => {
            return dockercfg(client, options.auth_flow, image).await;
        }
    };
    Ok(build_response(
        image,
        password,
        expires_in,
        now,
        cache_type.as_deref(),
        cache_duration.as_deref(),
    ))
}

async fn sts_exchange(
    client: &HttpClient,
    identity_provider: &str,
    project: &str,
    token: &str,
) -> Result<TokenAnswer, Error> {
    let url = env(STS_URL_ENV).unwrap_or_else(|| STS_URL.to_string());
    let audience = format!("identitynamespace:{project}.svc.id.goog:{identity_provider}");
    let body = form_encode(&[
        (
            "grant_type",
            "urn:ietf:params:oauth:grant-type:token-exchange",
        ),
        ("audience", &audience),
        ("scope", "https://www.googleapis.com/auth/cloud-platform"),
        (
            "requested_token_type",
            "urn:ietf:params:oauth:token-type:access_token",
        ),
        ("subject_token", token),
        ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
    ]);
    let purpose = Purpose {
        what: "Google STS token exchange",
        hint: format!(
            "check the workload identity pool {project}.svc.id.goog, --identity-provider and the service account's IAM binding"
        ),
    };
    let req = purpose.request(Method::POST, &url, &[], Some(body))?;
    client
        .send_json(req, &purpose, "Google STS", TOKEN_JSON)
        .await
}

#[derive(Deserialize)]
struct DockerEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

async fn dockercfg(client: &HttpClient, flow: GcpAuthFlow, image: &str) -> Result<Fetched, Error> {
    let body = if flow == GcpAuthFlow::Dockercfg {
        metadata_get(
            client,
            "instance/attributes/google-dockercfg",
            "GCE metadata google-dockercfg",
        )
        .await?
    } else {
        let url_bytes = metadata_get(
            client,
            "instance/attributes/google-dockercfg-url",
            "GCE metadata google-dockercfg-url",
        )
        .await?;
        let url = String::from_utf8_lossy(&url_bytes).trim().to_string();
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(Error::BadAnswer {
                service: "GCE metadata server",
                what: "google-dockercfg-url (an http or https URL)",
            });
        }
        let purpose = Purpose {
            what: "docker config from google-dockercfg-url",
            hint: "check the URL in the instance attribute google-dockercfg-url and that it is reachable from the node".to_string(),
        };
        let req = purpose.request(Method::GET, &url, &[], None)?;
        client.send_ok(req, &purpose).await?
    };
    let cfg: BTreeMap<String, DockerEntry> =
        serde_json::from_slice(&body).map_err(|_| Error::BadAnswer {
            service: "GCE metadata server",
            what: "docker config JSON",
        })?;
    let mut auth = BTreeMap::new();
    for (registry, e) in cfg {
        let pair = match (e.username, e.password, e.auth) {
            (Some(u), Some(p), _) => AuthConfig {
                username: u,
                password: p,
            },
            (_, _, Some(a)) => crate::fetched::split_token(&a).map_err(|_| Error::BadAnswer {
                service: "GCE metadata server",
                what: "docker config auth (base64 of user:password)",
            })?,
            _ => continue,
        };
        let key = registry
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        auth.insert(key, pair);
    }
    let _ = image;
    Ok(Fetched {
        response: CredentialProviderResponse {
            cache_key_type: CacheKeyType::Image,
            cache_duration: Some(Duration::ZERO),
            auth,
        },
        expires_at: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_keys_and_cache_settings_follow_upstream() {
        let f = build_response(
            "europe-docker.pkg.dev/p/r/app",
            "tok".into(),
            Some(3600),
            0,
            None,
            None,
        );
        let keys: Vec<&str> = f.response.auth.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "*.gcr.io",
                "*.pkg.dev",
                "container.cloud.google.com",
                "europe-docker.pkg.dev",
                "gcr.io"
            ]
        );
        assert_eq!(f.response.auth["gcr.io"].username, "_token");
        // Upstream default: no caching, Image keys.
        assert_eq!(f.response.cache_duration, Some(Duration::ZERO));
        assert_eq!(f.response.cache_key_type, CacheKeyType::Image);
        let f = build_response(
            "gcr.io/p/a",
            "tok".into(),
            Some(3600),
            0,
            Some("registry"),
            Some("1h"),
        );
        assert_eq!(f.response.cache_key_type, CacheKeyType::Registry);
        assert_eq!(
            f.response.cache_duration,
            Some(Duration::from_secs(1800)),
            "capped at half the token's life"
        );
    }
}
