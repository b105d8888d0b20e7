//! `admission.k8s.io` AdmissionReview in and out, in `v1` and `v1beta1` (older API servers
//! send the latter): what a request must look like to be admitted at all, and how a verdict
//! is written back in the version it came in.
//!
//! The checks keep upstream's order and status codes (`app/webhooks.go`): a wrong content
//! type, an empty body and a missing `request` are 400s. Beyond upstream, a body that is not
//! JSON, not an AdmissionReview or too large is refused with a message saying which.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::patch::PatchOp;

/// The most a request body may hold: the API server's own limit on a request (3 MiB), so any
/// object it can store fits, and nothing larger is read.
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;

/// The API group of AdmissionReview.
const GROUP: &str = "admission.k8s.io";

/// The AdmissionReview version a request used, and its answer must use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReviewVersion {
    /// `admission.k8s.io/v1`.
    V1,
    /// `admission.k8s.io/v1beta1` (API servers before 1.16 only send this).
    V1Beta1,
}

impl ReviewVersion {
    /// The `apiVersion` string.
    pub fn api_version(self) -> &'static str {
        match self {
            Self::V1 => "admission.k8s.io/v1",
            Self::V1Beta1 => "admission.k8s.io/v1beta1",
        }
    }

    fn parse(api_version: &str) -> Option<Self> {
        match api_version.strip_prefix(GROUP)?.strip_prefix('/')? {
            "v1" => Some(Self::V1),
            "v1beta1" => Some(Self::V1Beta1),
            _ => None,
        }
    }
}

/// `group/version/kind` of the object under review.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct GroupVersionKind {
    /// API group (empty for core).
    #[serde(default)]
    pub group: String,
    /// API version.
    #[serde(default)]
    pub version: String,
    /// Kind.
    #[serde(default)]
    pub kind: String,
}

/// The part of an AdmissionRequest the webhooks use.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionRequest {
    /// Identifies this review; echoed in the response.
    #[serde(default)]
    pub uid: String,
    /// Kind of the object.
    #[serde(default)]
    pub kind: GroupVersionKind,
    /// `CREATE`, `UPDATE`, `DELETE` or `CONNECT`.
    #[serde(default)]
    pub operation: String,
    /// Object name (may be empty on CREATE with generateName).
    #[serde(default)]
    pub name: String,
    /// Object namespace (empty for cluster-scoped objects).
    #[serde(default)]
    pub namespace: String,
    /// The object as it would be stored.
    #[serde(default)]
    pub object: Option<Value>,
    /// The stored object on UPDATE and DELETE.
    #[serde(default)]
    pub old_object: Option<Value>,
}

/// A well-formed review: its version and its request.
#[derive(Debug, Clone)]
pub struct Review {
    /// The version the answer is written in.
    pub version: ReviewVersion,
    /// The request.
    pub request: AdmissionRequest,
}

/// Why a request is not reviewed at all; the message names what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum BadReview {
    /// Content-Type is not `application/json`.
    #[error("contentType={0:?}, expected application/json")]
    ContentType(String),
    /// No body.
    #[error("request body is empty")]
    EmptyBody,
    /// The body is larger than [`MAX_BODY_BYTES`].
    #[error("request body is larger than {0} bytes")]
    TooLarge(usize),
    /// The body did not arrive in time.
    #[error("request body not received within {0:?}")]
    SlowBody(std::time::Duration),
    /// The body could not be read.
    #[error("reading the request body: {0}")]
    Read(String),
    /// The body is not JSON.
    #[error("request body is not JSON: {0}")]
    NotJson(serde_json::Error),
    /// The body is JSON but not an AdmissionReview of a known version.
    #[error(
        "request body is not an admission.k8s.io/v1 or v1beta1 AdmissionReview (apiVersion {api_version:?}, kind {kind:?})"
    )]
    NotAReview {
        /// `apiVersion` found.
        api_version: String,
        /// `kind` found.
        kind: String,
    },
    /// The review carries no request.
    #[error("AdmissionReview has no request")]
    NoRequest,
    /// The request is not an object, or has fields of the wrong shape.
    #[error("AdmissionReview request is malformed: {0}")]
    MalformedRequest(String),
    /// The request has no uid to answer with.
    #[error("AdmissionReview request has no uid")]
    NoUid,
    /// The object is of a kind this webhook does not review (a misconfigured rule).
    #[error("webhook {webhook} reviews {expected} objects, not {got}")]
    UnexpectedKind {
        /// Webhook name.
        webhook: &'static str,
        /// Kind it reviews.
        expected: &'static str,
        /// `group/version, Kind=kind` received.
        got: String,
    },
    /// The request has no object where one is needed.
    #[error("AdmissionReview request has no object")]
    NoObject,
    /// The object does not parse as its kind.
    #[error("request.object is not a valid {kind}: {source}")]
    BadObject {
        /// Kind expected.
        kind: &'static str,
        /// Why it does not parse.
        source: serde_json::Error,
    },
}

impl BadReview {
    /// The HTTP status answered.
    pub fn status(&self) -> http::StatusCode {
        match self {
            Self::TooLarge(_) => http::StatusCode::PAYLOAD_TOO_LARGE,
            Self::SlowBody(_) => http::StatusCode::REQUEST_TIMEOUT,
            _ => http::StatusCode::BAD_REQUEST,
        }
    }
}

/// Checks the Content-Type header value: `application/json`, parameters (a charset) allowed.
pub fn check_content_type(value: Option<&str>) -> Result<(), BadReview> {
    let value = value.unwrap_or_default();
    let media = value.split(';').next().unwrap_or_default().trim();
    if media.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(BadReview::ContentType(value.to_string()))
    }
}

/// Parses a request body into a [`Review`].
pub fn parse(body: &[u8]) -> Result<Review, BadReview> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(BadReview::EmptyBody);
    }
    let mut value: Value = serde_json::from_slice(body).map_err(BadReview::NotJson)?;
    let field = |value: &Value, name: &str| {
        value
            .get(name)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let (api_version, kind) = (field(&value, "apiVersion"), field(&value, "kind"));
    let version = ReviewVersion::parse(&api_version)
        .filter(|_| kind == "AdmissionReview")
        .ok_or(BadReview::NotAReview { api_version, kind })?;
    let request = match value.get_mut("request").map(Value::take) {
        None | Some(Value::Null) => return Err(BadReview::NoRequest),
        Some(request @ Value::Object(_)) => request,
        Some(other) => {
            return Err(BadReview::MalformedRequest(format!(
                "expected an object, got {other}"
            )));
        }
    };
    let request: AdmissionRequest = serde_json::from_value(request)
        .map_err(|err| BadReview::MalformedRequest(err.to_string()))?;
    if request.uid.is_empty() {
        return Err(BadReview::NoUid);
    }
    Ok(Review { version, request })
}

/// `metav1.Status` of a denial.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    /// HTTP-like code (403, 422, ...).
    pub code: u16,
    /// Machine-readable reason (`Forbidden`, `Invalid`, ...).
    pub reason: String,
    /// What the user reads.
    pub message: String,
}

/// A webhook's answer, before it is written in a review version.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Verdict {
    /// Whether the request may proceed.
    pub allowed: bool,
    /// Why it may not (only when denied).
    pub status: Option<Status>,
    /// Changes to the object (mutating webhooks only; empty: none).
    pub patch: Vec<PatchOp>,
    /// Warnings shown to the user.
    pub warnings: Vec<String>,
}

impl Verdict {
    /// Allowed, unchanged.
    pub fn allow() -> Self {
        Self {
            allowed: true,
            ..Self::default()
        }
    }

    /// Allowed with `patch` (unchanged when empty).
    pub fn patched(patch: Vec<PatchOp>) -> Self {
        Self {
            allowed: true,
            patch,
            ..Self::default()
        }
    }

    /// Denied with `code`/`reason` and `message`.
    pub fn deny(code: u16, reason: &str, message: impl Into<String>) -> Self {
        Self {
            allowed: false,
            status: Some(Status {
                code,
                reason: reason.to_string(),
                message: message.into(),
            }),
            ..Self::default()
        }
    }

    /// Adds a warning.
    pub fn with_warning(mut self, warning: impl Into<String>) -> Self {
        self.warnings.push(warning.into());
        self
    }

    /// What the verdict counts as: `denied`, `patched` or `allowed`.
    pub fn outcome(&self) -> &'static str {
        if !self.allowed {
            "denied"
        } else if self.patch.is_empty() {
            "allowed"
        } else {
            "patched"
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ResponseOut<'a> {
    uid: &'a str,
    allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<&'a Status>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_type: Option<&'static str>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    warnings: &'a [String],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReviewOut<'a> {
    api_version: &'static str,
    kind: &'static str,
    response: ResponseOut<'a>,
}

/// The answer to the review `uid` in `version`: the verdict with the patch base64-encoded.
pub fn encode(version: ReviewVersion, uid: &str, verdict: &Verdict) -> Vec<u8> {
    let patch = (!verdict.patch.is_empty()).then(|| {
        // Serialising plain data cannot fail; an empty patch would only lose the labels.
        let json = serde_json::to_vec(&verdict.patch).unwrap_or_default();
        base64::engine::general_purpose::STANDARD.encode(json)
    });
    let review = ReviewOut {
        api_version: version.api_version(),
        kind: "AdmissionReview",
        response: ResponseOut {
            uid,
            allowed: verdict.allowed,
            status: verdict.status.as_ref(),
            patch_type: patch.as_ref().map(|_| "JSONPatch"),
            patch,
            warnings: &verdict.warnings,
        },
    };
    serde_json::to_vec(&review).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_type_must_be_json() {
        assert!(check_content_type(Some("application/json")).is_ok());
        assert!(check_content_type(Some("application/json; charset=utf-8")).is_ok());
        assert!(matches!(
            check_content_type(Some("text/plain")),
            Err(BadReview::ContentType(_))
        ));
        assert!(matches!(
            check_content_type(None),
            Err(BadReview::ContentType(_))
        ));
    }

    #[test]
    fn parse_rules() {
        assert!(matches!(parse(b""), Err(BadReview::EmptyBody)));
        assert!(matches!(parse(b"{"), Err(BadReview::NotJson(_))));
        assert!(matches!(
            parse(br#"{"apiVersion":"v1","kind":"Pod"}"#),
            Err(BadReview::NotAReview { .. })
        ));
        assert!(matches!(
            parse(br#"{"apiVersion":"admission.k8s.io/v2","kind":"AdmissionReview"}"#),
            Err(BadReview::NotAReview { .. })
        ));
        assert!(matches!(
            parse(br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#),
            Err(BadReview::NoRequest)
        ));
        assert!(matches!(
            parse(br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":5}}"#),
            Err(BadReview::MalformedRequest(_))
        ));
        assert!(matches!(
            parse(br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{}}"#),
            Err(BadReview::NoUid)
        ));
        let review = parse(
            br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":{"uid":"u1","operation":"CREATE"}}"#,
        )
        .unwrap();
        assert_eq!(review.version, ReviewVersion::V1Beta1);
        assert_eq!(review.request.uid, "u1");
    }

    #[test]
    fn encode_echoes_uid_and_version() {
        let out = encode(ReviewVersion::V1Beta1, "abc", &Verdict::allow());
        let value: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            value,
            serde_json::json!({
                "apiVersion": "admission.k8s.io/v1beta1",
                "kind": "AdmissionReview",
                "response": {"uid": "abc", "allowed": true}
            })
        );
    }
}
