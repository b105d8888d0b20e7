//! Azure Container Registry, as acr-credential-provider does: an AAD token (managed
//! identity, or with a service-account token the workload's federated identity) exchanged at
//! the registry's `/oauth2/exchange` for an ACR refresh token; or, for a service principal
//! with a secret in the cloud config, the client id and secret themselves.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use http::Method;
use serde::Deserialize;

use crate::args::AcrOptions;
use crate::error::Error;
use crate::family::acr_login_server_with;
use crate::fetched::Fetched;
use crate::http::{HttpClient, Purpose, TOKEN_JSON, form_encode, percent_encode};
use crate::matching::registry_of;
use crate::protocol::{AuthConfig, CacheKeyType, CredentialProviderResponse};

/// The user name ACR refresh tokens are sent with.
pub const REFRESH_TOKEN_USER: &str = "00000000-0000-0000-0000-000000000000";
/// The service-account annotations of the federated (token) mode.
pub const TENANT_ANNOTATION: &str = "kubernetes.azure.com/acr-tenant-id";
/// See [`TENANT_ANNOTATION`].
pub const CLIENT_ANNOTATION: &str = "kubernetes.azure.com/acr-client-id";
/// Overrides the instance metadata service's base URL (tests).
pub const IMDS_URL_ENV: &str = "CREDENTIAL_PROVIDER_AZURE_IMDS_URL";
/// Overrides the registry's base URL for `/v2/` (tests, private endpoints).
pub const REGISTRY_URL_ENV: &str = "CREDENTIAL_PROVIDER_ACR_URL";
const IMDS_URL: &str = "http://169.254.169.254";
const AUTHORITY: &str = "https://login.microsoftonline.com";
const RESOURCE: &str = "https://containerregistry.azure.net";
/// How long the kubelet caches an ACR answer (upstream raised it to 60 min against throttling).
pub const CACHE_DURATION: Duration = Duration::from_secs(3600);

/// The fields of `azure.json` used here (others are ignored: the file is shared with the
/// cloud provider).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AzureConfig {
    /// Tenant.
    #[serde(default)]
    pub tenant_id: String,
    /// Service principal client id.
    #[serde(default)]
    pub aad_client_id: String,
    /// Service principal secret.
    #[serde(default)]
    pub aad_client_secret: String,
    /// Use the VM's managed identity.
    #[serde(default)]
    pub use_managed_identity_extension: bool,
    /// A user-assigned identity: client id, or resource id when it contains `/subscriptions/`.
    #[serde(default, rename = "userAssignedIdentityID")]
    pub user_assigned_identity_id: String,
    /// A custom cloud's registry DNS suffix.
    #[serde(default)]
    pub container_registry_dns_suffix: String,
}

/// Reads the cloud config.
pub fn load_config(path: &Path) -> Result<AzureConfig, Error> {
    let text = std::fs::read(path).map_err(|e| Error::AzureConfig {
        path: path.to_path_buf(),
        detail: format!("{e}; pass the azure.json path as the provider's argument"),
    })?;
    serde_json::from_slice(&text).map_err(|e| Error::AzureConfig {
        path: path.to_path_buf(),
        detail: crate::protocol::DecodeError::from_json(e).to_string(),
    })
}

/// The login server an image is pulled from after `--registry-mirror`, and the source
/// registry when mirrored.
pub fn target_registry<'a>(image: &'a str, options: &'a AcrOptions) -> (&'a str, Option<&'a str>) {
    let registry = registry_of(image);
    match options.mirrors.iter().find(|(src, _)| src == registry) {
        Some((src, dst)) => (dst.as_str(), Some(src.as_str())),
        None => (registry, None),
    }
}

/// The answer with `password` for the login server (and the mirrored source).
pub fn build_response(login_server: &str, source: Option<&str>, auth: AuthConfig) -> Fetched {
    let mut map = BTreeMap::from([(login_server.to_string(), auth.clone())]);
    if let Some(src) = source {
        map.insert(src.to_string(), auth);
    }
    Fetched {
        response: CredentialProviderResponse {
            cache_key_type: CacheKeyType::Registry,
            cache_duration: Some(CACHE_DURATION),
            auth: map,
        },
        expires_at: None,
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// What to check when the registry, IMDS or AAD fails.
const HINT: &str = "check the identity's AcrPull role on the registry, the azure.json given as argument and that the registry and AAD are reachable";

fn purpose(what: &'static str) -> Purpose {
    Purpose {
        what,
        hint: HINT.to_string(),
    }
}

#[derive(Deserialize)]
struct AadToken {
    access_token: String,
}

#[derive(Deserialize)]
struct Exchange {
    refresh_token: String,
}

/// Obtains credentials for `image`. Returns `None` when the image is not on ACR.
pub async fn fetch(
    client: &HttpClient,
    options: &AcrOptions,
    image: &str,
    sa: Option<(&str, &BTreeMap<String, String>)>,
) -> Result<Fetched, Error> {
    let config = match &options.cloud_config {
        Some(p) => load_config(p)?,
        None => AzureConfig {
            use_managed_identity_extension: true,
            ..AzureConfig::default()
        },
    };
    let (login_server, source) = target_registry(image, options);
    let suffix = (!config.container_registry_dns_suffix.is_empty())
        .then_some(config.container_registry_dns_suffix.as_str());
    if acr_login_server_with(login_server, suffix).is_none() {
        return Err(Error::Args(format!(
            "image {image:?} is not on an Azure Container Registry (<name>.azurecr.io|cn|de|us)"
        )));
    }
    let mirrored = source.is_some();
    // The exchange names the tenant the AAD token was issued in: the service account's with a
    // federated token, else the node's.
    let (aad, tenant) = match sa {
        Some((token, ann)) if !mirrored => {
            let (Some(tenant), Some(client_id)) =
                (ann.get(TENANT_ANNOTATION), ann.get(CLIENT_ANNOTATION))
            else {
                return Err(Error::ServiceAccount(format!(
                    "the service account lacks the annotations {TENANT_ANNOTATION} and {CLIENT_ANNOTATION}; add them or list them in requiredServiceAccountAnnotationKeys"
                )));
            };
            (
                federated_token(client, tenant, client_id, token).await?,
                tenant.as_str(),
            )
        }
        _ if config.use_managed_identity_extension => (
            managed_identity_token(client, &config).await?,
            config.tenant_id.as_str(),
        ),
        _ if !config.aad_client_secret.is_empty() => {
            // A service principal: ACR accepts its id and secret directly.
            let auth = AuthConfig {
                username: config.aad_client_id.clone(),
                password: config.aad_client_secret.clone(),
            };
            return Ok(build_response(login_server, source, auth));
        }
        _ => {
            return Err(Error::AzureConfig {
                path: options.cloud_config.clone().unwrap_or_default(),
                detail: "neither useManagedIdentityExtension nor aadClientSecret is set"
                    .to_string(),
            });
        }
    };
    let refresh = exchange(client, login_server, tenant, &aad).await?;
    Ok(build_response(
        login_server,
        source,
        AuthConfig {
            username: REFRESH_TOKEN_USER.to_string(),
            password: refresh,
        },
    ))
}

async fn managed_identity_token(
    client: &HttpClient,
    config: &AzureConfig,
) -> Result<String, Error> {
    let base = env(IMDS_URL_ENV).unwrap_or_else(|| IMDS_URL.to_string());
    let mut url = format!(
        "{base}/metadata/identity/oauth2/token?api-version=2018-02-01&resource={}",
        percent_encode(RESOURCE)
    );
    let id = &config.user_assigned_identity_id;
    if !id.is_empty() {
        let key = if id.contains("/subscriptions/") {
            "msi_res_id"
        } else {
            "client_id"
        };
        url.push_str(&format!("&{key}={}", percent_encode(id)));
    }
    let purpose = purpose("Azure managed identity token");
    let req = purpose.request(Method::GET, &url, &[("Metadata", "true")], None)?;
    let t: AadToken = client
        .send_json(req, &purpose, "Azure instance metadata", TOKEN_JSON)
        .await?;
    Ok(t.access_token)
}

async fn federated_token(
    client: &HttpClient,
    tenant: &str,
    client_id: &str,
    assertion: &str,
) -> Result<String, Error> {
    let authority = env("AZURE_AUTHORITY_HOST").unwrap_or_else(|| AUTHORITY.to_string());
    let url = format!(
        "{}/{}/oauth2/v2.0/token",
        authority.trim_end_matches('/'),
        percent_encode(tenant)
    );
    let body = form_encode(&[
        ("grant_type", "client_credentials"),
        ("client_id", client_id),
        ("scope", &format!("{RESOURCE}/.default")),
        (
            "client_assertion_type",
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        ),
        ("client_assertion", assertion),
    ]);
    let purpose = Purpose {
        what: "AAD federated token",
        hint: format!(
            "check the federated credential of client {client_id} for the service account's issuer and subject"
        ),
    };
    let req = purpose.request(Method::POST, &url, &[], Some(body))?;
    let t: AadToken = client.send_json(req, &purpose, "AAD", TOKEN_JSON).await?;
    Ok(t.access_token)
}

/// The `realm` and `service` of a `Www-Authenticate: Bearer ...` challenge.
pub fn parse_challenge(header: &str) -> Option<(String, String)> {
    let params = header.trim().strip_prefix("Bearer ")?;
    let mut realm = None;
    let mut service = None;
    for part in params.split(',') {
        let (k, v) = part.trim().split_once('=')?;
        let v = v.trim_matches('"').to_string();
        match k {
            "realm" => realm = Some(v),
            "service" => service = Some(v),
            _ => {}
        }
    }
    Some((realm?, service?))
}

async fn exchange(
    client: &HttpClient,
    login_server: &str,
    tenant: &str,
    aad: &str,
) -> Result<String, Error> {
    let base = env(REGISTRY_URL_ENV).unwrap_or_else(|| format!("https://{login_server}"));
    let challenge_purpose = purpose("ACR challenge (GET /v2/)");
    let url = format!("{}/v2/", base.trim_end_matches('/'));
    let req = challenge_purpose.request(Method::GET, &url, &[], None)?;
    let answer = client.send(req, &challenge_purpose).await?;
    let challenge = answer
        .headers
        .get(http::header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .filter(|_| answer.status == http::StatusCode::UNAUTHORIZED)
        .and_then(parse_challenge)
        .ok_or(Error::BadAnswer {
            service: "ACR",
            what: "401 with a Www-Authenticate Bearer challenge on /v2/",
        })?;
    let (realm, service) = challenge;
    let realm_uri: http::Uri = realm.parse().map_err(|_| Error::BadAnswer {
        service: "ACR",
        what: "realm URL in the challenge",
    })?;
    let (Some(scheme), Some(authority)) = (realm_uri.scheme_str(), realm_uri.authority()) else {
        return Err(Error::BadAnswer {
            service: "ACR",
            what: "realm URL in the challenge",
        });
    };
    let url = format!("{scheme}://{authority}/oauth2/exchange");
    // As the upstream plugin sends it: the AAD token as both access and refresh token.
    let body = form_encode(&[
        ("grant_type", "access_token_refresh_token"),
        ("service", &service),
        ("tenant", tenant),
        ("access_token", aad),
        ("refresh_token", aad),
    ]);
    let purpose = purpose("ACR token exchange");
    let req = purpose.request(Method::POST, &url, &[], Some(body))?;
    let e: Exchange = client
        .send_json(req, &purpose, "ACR", "refresh_token in the exchange answer")
        .await?;
    Ok(e.refresh_token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_and_mirrors() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://r.azurecr.io/oauth2/token",service="r.azurecr.io""#
            ),
            Some((
                "https://r.azurecr.io/oauth2/token".into(),
                "r.azurecr.io".into()
            ))
        );
        assert_eq!(parse_challenge("Basic realm=x"), None);
        let o = AcrOptions {
            cloud_config: None,
            mirrors: vec![("mcr.microsoft.com".into(), "x.azurecr.io".into())],
        };
        assert_eq!(
            target_registry("mcr.microsoft.com/a", &o),
            ("x.azurecr.io", Some("mcr.microsoft.com"))
        );
        assert_eq!(
            target_registry("y.azurecr.io/a", &o),
            ("y.azurecr.io", None)
        );
        let f = build_response(
            "x.azurecr.io",
            Some("mcr.microsoft.com"),
            AuthConfig {
                username: "u".into(),
                password: "p".into(),
            },
        );
        assert_eq!(f.response.auth.len(), 2);
        assert_eq!(f.response.cache_duration, Some(CACHE_DURATION));
    }
}
