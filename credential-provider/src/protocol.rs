//! The exec-plugin protocol: `CredentialProviderRequest` in, `CredentialProviderResponse` out,
//! in the `credentialprovider.kubelet.k8s.io` version the request used.
//!
//! Decoding is strict like the kubelet's codec: unknown fields, duplicate fields (also
//! duplicate annotation keys) and fields a version does not have are errors.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

/// The API group of the protocol.
pub const GROUP: &str = "credentialprovider.kubelet.k8s.io";
const REQUEST_KIND: &str = "CredentialProviderRequest";
const RESPONSE_KIND: &str = "CredentialProviderResponse";

/// A version of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiVersion {
    /// `credentialprovider.kubelet.k8s.io/v1alpha1` (kubelet 1.20–1.25).
    V1Alpha1,
    /// `credentialprovider.kubelet.k8s.io/v1beta1` (kubelet 1.24+).
    V1Beta1,
    /// `credentialprovider.kubelet.k8s.io/v1` (kubelet 1.26+; service-account tokens).
    V1,
}

impl ApiVersion {
    /// Every version, oldest first.
    pub const ALL: [ApiVersion; 3] = [Self::V1Alpha1, Self::V1Beta1, Self::V1];

    /// The full `apiVersion` string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V1Alpha1 => "credentialprovider.kubelet.k8s.io/v1alpha1",
            Self::V1Beta1 => "credentialprovider.kubelet.k8s.io/v1beta1",
            Self::V1 => "credentialprovider.kubelet.k8s.io/v1",
        }
    }

    /// Parses a full `apiVersion` string.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// One decoded request.
#[derive(Clone, PartialEq, Eq)]
pub struct CredentialProviderRequest {
    /// The version the request used; the response uses the same.
    pub api_version: ApiVersion,
    /// The image as the kubelet was given it.
    pub image: String,
    /// v1 only: the pod's service-account token (KEP-4412).
    pub service_account_token: Option<String>,
    /// v1 only: the service account's annotations the provider config asked for.
    pub service_account_annotations: BTreeMap<String, String>,
}

// Hand-written so that the token never reaches a log line.
impl fmt::Debug for CredentialProviderRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialProviderRequest")
            .field("api_version", &self.api_version)
            .field("image", &self.image)
            .field(
                "service_account_token",
                &self.service_account_token.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "service_account_annotations",
                &self.service_account_annotations,
            )
            .finish()
    }
}

impl CredentialProviderRequest {
    /// A request for `image` without a service-account token.
    pub fn new(api_version: ApiVersion, image: impl Into<String>) -> Self {
        Self {
            api_version,
            image: image.into(),
            service_account_token: None,
            service_account_annotations: BTreeMap::new(),
        }
    }

    /// The request as JSON, as the kubelet writes it (for tests and the bench).
    pub fn to_json(&self) -> String {
        let mut v = serde_json::json!({
            "apiVersion": self.api_version.as_str(),
            "kind": REQUEST_KIND,
            "image": self.image,
        });
        if let Some(token) = &self.service_account_token {
            v["serviceAccountToken"] = token.clone().into();
        }
        if !self.service_account_annotations.is_empty() {
            v["serviceAccountAnnotations"] =
                serde_json::to_value(&self.service_account_annotations).unwrap_or_default();
        }
        v.to_string()
    }
}

/// A JSON object whose keys must be unique (serde's map types keep the last duplicate).
struct UniqueMap(BTreeMap<String, String>);

impl<'de> Deserialize<'de> for UniqueMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = UniqueMap;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of strings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<UniqueMap, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((k, v)) = access.next_entry::<String, String>()? {
                    if out.contains_key(&k) {
                        return Err(serde::de::Error::custom(format_args!(
                            "duplicate field `serviceAccountAnnotations.{k}`"
                        )));
                    }
                    out.insert(k, v);
                }
                Ok(UniqueMap(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRequest {
    api_version: Option<String>,
    kind: Option<String>,
    image: Option<String>,
    service_account_token: Option<String>,
    service_account_annotations: Option<UniqueMap>,
}

/// Decodes one request from the bytes the kubelet wrote on stdin.
pub fn decode_request(input: &[u8]) -> Result<CredentialProviderRequest, DecodeError> {
    if input.iter().all(u8::is_ascii_whitespace) {
        return Err(DecodeError::Empty);
    }
    let raw: RawRequest = serde_json::from_slice(input).map_err(DecodeError::from_json)?;
    let version = raw
        .api_version
        .ok_or(DecodeError::MissingField("apiVersion"))?;
    let api_version =
        ApiVersion::parse(&version).ok_or_else(|| DecodeError::UnknownVersion(version.clone()))?;
    let kind = raw.kind.ok_or(DecodeError::MissingField("kind"))?;
    if kind != REQUEST_KIND {
        return Err(DecodeError::WrongKind(kind));
    }
    let image = raw.image.unwrap_or_default();
    if image.is_empty() {
        return Err(DecodeError::MissingField("image"));
    }
    if api_version != ApiVersion::V1 {
        // The older versions do not have these fields: the kubelet's strict codec refuses them.
        if raw.service_account_token.is_some() {
            return Err(DecodeError::NotInVersion(
                "serviceAccountToken",
                api_version,
            ));
        }
        if raw.service_account_annotations.is_some() {
            return Err(DecodeError::NotInVersion(
                "serviceAccountAnnotations",
                api_version,
            ));
        }
    }
    Ok(CredentialProviderRequest {
        api_version,
        image,
        service_account_token: raw.service_account_token.filter(|t| !t.is_empty()),
        service_account_annotations: raw
            .service_account_annotations
            .map(|m| m.0)
            .unwrap_or_default(),
    })
}

/// How the kubelet keys the response in its cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheKeyType {
    /// The image without tag or digest.
    Image,
    /// The registry: host and port.
    Registry,
    /// Every image this plugin matches.
    Global,
}

impl CacheKeyType {
    /// Parses `image`, `registry` or `global` (any case), as `KUBE_SIDECAR_CACHE_TYPE` takes.
    pub fn parse_lenient(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "image" => Some(Self::Image),
            "registry" => Some(Self::Registry),
            "global" => Some(Self::Global),
            _ => None,
        }
    }
}

/// One registry credential.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthConfig {
    /// The user name.
    pub username: String,
    /// The password or token.
    pub password: String,
}

// Hand-written so that the password never reaches a log line.
impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// The plugin's answer (identical across versions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialProviderResponse {
    /// How the kubelet keys its cache.
    pub cache_key_type: CacheKeyType,
    /// How long the kubelet may cache; `None` lets it use `defaultCacheDuration`, zero means
    /// do not cache.
    pub cache_duration: Option<Duration>,
    /// Credentials by image-matching pattern.
    pub auth: BTreeMap<String, AuthConfig>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WireResponse<'a> {
    api_version: &'static str,
    kind: &'static str,
    cache_key_type: CacheKeyType,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_duration: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    auth: &'a BTreeMap<String, AuthConfig>,
}

/// Encodes `response` in `version`, as one line of JSON.
pub fn encode_response(version: ApiVersion, response: &CredentialProviderResponse) -> String {
    let wire = WireResponse {
        api_version: version.as_str(),
        kind: RESPONSE_KIND,
        cache_key_type: response.cache_key_type,
        cache_duration: response.cache_duration.map(format_go_duration),
        auth: &response.auth,
    };
    // Serialising strings and maps of strings cannot fail.
    serde_json::to_string(&wire).unwrap_or_default()
}

/// A decoded response (what the kubelet reads), for tests and the bench.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedResponse {
    /// The response's `apiVersion`.
    pub api_version: ApiVersion,
    /// The rest.
    pub response: CredentialProviderResponse,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawResponse {
    api_version: String,
    kind: String,
    cache_key_type: CacheKeyType,
    cache_duration: Option<String>,
    #[serde(default)]
    auth: BTreeMap<String, AuthConfig>,
}

/// Decodes a response strictly, as the kubelet does.
pub fn decode_response(input: &[u8]) -> Result<DecodedResponse, DecodeError> {
    let raw: RawResponse = serde_json::from_slice(input).map_err(DecodeError::from_json)?;
    let api_version = ApiVersion::parse(&raw.api_version)
        .ok_or_else(|| DecodeError::UnknownVersion(raw.api_version.clone()))?;
    if raw.kind != RESPONSE_KIND {
        return Err(DecodeError::WrongKind(raw.kind));
    }
    let cache_duration = match raw.cache_duration {
        None => None,
        Some(s) => Some(parse_go_duration(&s).ok_or(DecodeError::BadDuration(s))?),
    };
    Ok(DecodedResponse {
        api_version,
        response: CredentialProviderResponse {
            cache_key_type: raw.cache_key_type,
            cache_duration,
            auth: raw.auth,
        },
    })
}

/// Formats whole seconds as Go's `time.Duration.String` does (`0s`, `1m30s`, `6h0m0s`).
pub fn format_go_duration(d: Duration) -> String {
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, (secs / 60) % 60, secs % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

/// Parses a Go duration (`1h2m3s`, `90s`, `500ms`, `1.5h`); negative durations are refused.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = s;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let value: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += value * scale;
    }
    Some(Duration::from_secs_f64(total))
}

/// The request on stdin could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Nothing (or only whitespace) on stdin.
    #[error("empty request on stdin; the kubelet writes one CredentialProviderRequest as JSON")]
    Empty,
    /// Not JSON, or a field of the wrong type, unknown or duplicated.
    #[error("invalid request at line {line} column {column}: {what}")]
    Json {
        /// Line of the error.
        line: usize,
        /// Column of the error.
        column: usize,
        /// What is wrong, without the offending value (it may be a secret).
        what: String,
    },
    /// A required field is missing or empty.
    #[error("request has no `{0}`")]
    MissingField(&'static str),
    /// The `apiVersion` is not a credentialprovider.kubelet.k8s.io version.
    #[error(
        "unsupported apiVersion {0:?}; expected credentialprovider.kubelet.k8s.io/v1, v1beta1 or v1alpha1 (check the provider's apiVersion in the kubelet's --image-credential-provider-config)"
    )]
    UnknownVersion(String),
    /// The `kind` is not the expected one.
    #[error("unexpected kind {0:?}; expected CredentialProviderRequest")]
    WrongKind(String),
    /// A v1-only field in an older version.
    #[error("unknown field `{0}` in {v}", v = .1.as_str())]
    NotInVersion(&'static str, ApiVersion),
    /// A `cacheDuration` that is not a Go duration.
    #[error("cacheDuration {0:?} is not a duration")]
    BadDuration(String),
}

impl DecodeError {
    /// Keeps the position and the kind of a JSON error but never the value it quotes.
    pub(crate) fn from_json(e: serde_json::Error) -> Self {
        let text = e.to_string();
        let what = if text.contains("unknown field")
            || text.contains("duplicate field")
            || text.contains("missing field")
            || text.contains("unknown variant")
        {
            // "unknown field `x`, expected one of ..." — the field name only.
            let head = text.split(" at line").next().unwrap_or(&text);
            head.split(", expected").next().unwrap_or(head).to_string()
        } else if e.is_syntax() || e.is_eof() {
            "not valid JSON".to_string()
        } else {
            "a field has the wrong type".to_string()
        };
        Self::Json {
            line: e.line(),
            column: e.column(),
            what,
        }
    }
}
