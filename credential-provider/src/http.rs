//! A small HTTP(S) client for the token services (GCE metadata, Google STS, Azure IMDS / AAD,
//! ACR's exchange): hyper 1 over rustls with ring and the system's roots, built only on a
//! cache miss.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::error::Error;

/// Per-request deadline: well inside the kubelet's one-minute exec timeout.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// What a token endpoint's answer must hold.
pub const TOKEN_JSON: &str = "token (JSON with access_token)";
/// Answers larger than this are refused.
const MAX_BODY: usize = 1 << 20;

/// An answer.
pub struct Answer {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

/// What a request is for and what to check when it fails; both go into the error.
pub struct Purpose {
    /// What the request obtains ("GCE metadata token").
    pub what: &'static str,
    /// What the operator should check.
    pub hint: String,
}

impl Purpose {
    /// The error for a request to `url` that failed with `detail`.
    pub fn error(&self, url: &str, detail: String) -> Error {
        Error::Http {
            what: self.what,
            url: url.to_string(),
            detail,
            hint: self.hint.clone(),
        }
    }

    /// A request to `url` with the fixed `headers` and, when given, a form-encoded `form` body.
    pub fn request(
        &self,
        method: Method,
        url: &str,
        headers: &[(&'static str, &'static str)],
        form: Option<String>,
    ) -> Result<Request<Full<Bytes>>, Error> {
        let mut b = Request::builder().method(method).uri(url);
        for (name, value) in headers {
            b = b.header(*name, *value);
        }
        if form.is_some() {
            b = b.header("Content-Type", "application/x-www-form-urlencoded");
        }
        b.body(Full::new(Bytes::from(form.unwrap_or_default())))
            .map_err(|e| self.error(url, e.to_string()))
    }
}

/// The client.
pub struct HttpClient {
    inner: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl HttpClient {
    /// A client trusting the system's roots.
    pub fn new() -> Result<Self, Error> {
        let mut roots = rustls::RootCertStore::empty();
        // Unreadable system certificates leave an empty store: plain-HTTP metadata servers
        // still work and HTTPS fails with a certificate error that names the problem.
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map(|b| b.with_root_certificates(roots).with_no_client_auth());
        // ring supports the default protocol versions, so this cannot fail in practice.
        let tls = tls.map_err(Error::Tls)?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Self {
            inner: Client::builder(TokioExecutor::new()).build(connector),
        })
    }

    /// Sends `request` and reads the whole answer within [`REQUEST_TIMEOUT`], whatever its
    /// status. The error names the URL and `purpose`, never the request's body or headers
    /// (which may carry a token).
    pub async fn send(
        &self,
        request: Request<Full<Bytes>>,
        purpose: &Purpose,
    ) -> Result<Answer, Error> {
        let url = request.uri().to_string();
        self.send_raw(request)
            .await
            .map_err(|detail| purpose.error(&url, detail))
    }

    /// [`Self::send`], then the body of a success status; any other status is an error.
    pub async fn send_ok(
        &self,
        request: Request<Full<Bytes>>,
        purpose: &Purpose,
    ) -> Result<Bytes, Error> {
        let url = request.uri().to_string();
        let answer = self.send(request, purpose).await?;
        if !answer.status.is_success() {
            return Err(purpose.error(&url, format!("HTTP {}", answer.status)));
        }
        Ok(answer.body)
    }

    /// [`Self::send_ok`], then the body decoded as JSON; an undecodable body is
    /// [`Error::BadAnswer`] of `service` lacking `expected`.
    pub async fn send_json<T: serde::de::DeserializeOwned>(
        &self,
        request: Request<Full<Bytes>>,
        purpose: &Purpose,
        service: &'static str,
        expected: &'static str,
    ) -> Result<T, Error> {
        let body = self.send_ok(request, purpose).await?;
        serde_json::from_slice(&body).map_err(|_| Error::BadAnswer {
            service,
            what: expected,
        })
    }

    async fn send_raw(&self, request: Request<Full<Bytes>>) -> Result<Answer, String> {
        let fut = async {
            let resp = self
                .inner
                .request(request)
                .await
                .map_err(|e| describe(&e))?;
            let (parts, body) = resp.into_parts();
            let body = http_body_util::Limited::new(body, MAX_BODY)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok(Answer {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(REQUEST_TIMEOUT, fut)
            .await
            .map_err(|_| format!("no answer within {}s", REQUEST_TIMEOUT.as_secs()))?
    }
}

/// The error and its sources on one line.
fn describe(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// `application/x-www-form-urlencoded` of `pairs`.
pub fn form_encode(pairs: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(&percent_encode(k));
        out.push('=');
        out.push_str(&percent_encode(v));
    }
    out
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_encoding() {
        assert_eq!(
            form_encode(&[("grant_type", "access_token"), ("service", "a b/c")]),
            "grant_type=access_token&service=a%20b%2Fc"
        );
    }
}
