//! A small HTTP(S) client for the token services (GCE metadata, Google STS, Azure IMDS / AAD,
//! ACR's exchange): hyper 1 over rustls with ring and the system's roots, built only on a
//! cache miss.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Per-request deadline: well inside the kubelet's one-minute exec timeout.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
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

/// The client.
pub struct HttpClient {
    inner: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl HttpClient {
    /// A client trusting the system's roots.
    pub fn new() -> Result<Self, String> {
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
        let tls = tls.map_err(|e| format!("TLS set-up: {e}"))?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Self {
            inner: Client::builder(TokioExecutor::new()).build(connector),
        })
    }

    /// Sends `request` and reads the whole answer within [`REQUEST_TIMEOUT`]. The error is a
    /// description without the request (which may carry a token).
    pub async fn send(&self, request: Request<Full<Bytes>>) -> Result<Answer, String> {
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
