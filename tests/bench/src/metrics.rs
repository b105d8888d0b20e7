//! Scraping the controller-manager's `/metrics` over HTTPS and reading the text exposition
//! format.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context as _;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name, including any `_total`/`_bucket` suffix.
    pub name: String,
    /// Label pairs.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

/// Parses the Prometheus/OpenMetrics text format; comment and malformed lines are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let close = line.rfind('}')?;
            (
                &line[..open],
                parse_labels(&line[open + 1..close])?,
                &line[close + 1..],
            )
        }
        None => {
            let (name, rest) = line.split_once(char::is_whitespace)?;
            (name, BTreeMap::new(), rest)
        }
    };
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

fn parse_labels(raw: &str) -> Option<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    let mut chars = raw.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Some(labels);
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if chars.next()? != '"' {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()? {
                '\\' => match chars.next()? {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break,
                c => value.push(c),
            }
        }
        labels.insert(key.trim().to_string(), value);
    }
}

/// Sum of every sample named `name`.
pub fn sum(samples: &[Sample], name: &str) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .map(|s| s.value)
        .sum()
}

/// Sum of every sample named `name`, or `None` when there is none.
pub fn total(samples: &[Sample], name: &str) -> Option<f64> {
    samples
        .iter()
        .any(|s| s.name == name)
        .then(|| sum(samples, name))
}

/// Sums of the samples named `name`, grouped by the value of `label`.
pub fn sum_by(samples: &[Sample], name: &str, label: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for s in samples.iter().filter(|s| s.name == name) {
        let key = s.labels.get(label).cloned().unwrap_or_default();
        *out.entry(key).or_insert(0.0) += s.value;
    }
    out
}

/// Fetches `https://127.0.0.1:<port>/metrics`, verifying the server against one CA.
pub struct Scraper {
    connector: tokio_rustls::TlsConnector,
    port: u16,
    token: String,
}

impl Scraper {
    /// A scraper trusting only the CA certificate `ca_der` and authenticating with `token`
    /// (the secure port reviews it with the API server).
    pub fn new(ca_der: &[u8], port: u16, token: String) -> anyhow::Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(ca_der.to_vec()))
            .context("adding the CA of the controller-manager's serving certificate")?;
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            port,
            token,
        })
    }

    /// The current metrics text.
    pub async fn fetch(&self) -> anyhow::Result<String> {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .with_context(|| format!("connecting to 127.0.0.1:{}", self.port))?;
        let name = ServerName::try_from("127.0.0.1")
            .context("server name")?
            .to_owned();
        let mut tls = self
            .connector
            .connect(name, tcp)
            .await
            .context("TLS handshake with the controller-manager's secure port")?;
        let request = format!(
            "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            self.token
        );
        tls.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        // A server that closes without close_notify makes the last read fail; what was read
        // until then is checked below.
        if let Err(e) = tls.read_to_end(&mut raw).await
            && e.kind() != std::io::ErrorKind::UnexpectedEof
        {
            return Err(e).context("reading /metrics");
        }
        decode_response(&raw)
    }

    /// Samples of the current metrics.
    pub async fn samples(&self) -> anyhow::Result<Vec<Sample>> {
        Ok(parse(&self.fetch().await?))
    }
}

/// The body of a `200 OK` HTTP/1.1 response (plain, `Content-Length` or chunked).
pub fn decode_response(raw: &[u8]) -> anyhow::Result<String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of HTTP headers in the /metrics response")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let body = &raw[split + 4..];
    let status = head.lines().next().unwrap_or_default();
    anyhow::ensure!(
        status.split_whitespace().nth(1) == Some("200"),
        "/metrics answered {status:?}"
    );
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_ascii_lowercase())
        })
    };
    let body = if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        dechunk(body)?
    } else if let Some(length) = header("content-length") {
        let length: usize = length.parse().context("Content-Length")?;
        anyhow::ensure!(
            body.len() >= length,
            "/metrics body truncated: {} of {length} bytes",
            body.len()
        );
        body[..length].to_vec()
    } else {
        body.to_vec()
    };
    String::from_utf8(body).context("/metrics body is not UTF-8")
}

fn dechunk(mut body: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("truncated chunk header")?;
        let size_text = String::from_utf8_lossy(&body[..line_end]);
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .with_context(|| format!("bad chunk size {size_text:?}"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        anyhow::ensure!(body.len() >= size + 2, "truncated chunk");
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP rest_client_requests_total x
# TYPE rest_client_requests_total counter
rest_client_requests_total{code="200",method="PUT"} 2000
rest_client_requests_total{code="201",method="POST"} 1999
rest_client_requests_total{code="200",method="GET"} 3
rest_client_requests_total{code="409",method="PUT"} 4
cloudprovider_requests_total{method="InstancesV2/InstanceMetadata",code="OK"} 2000
ccm_uninitialized_nodes 0
weird{a="x\"y,z",b="2"} 1.5
# EOF
"#;

    #[test]
    fn parses_and_sums() {
        let samples = parse(TEXT);
        assert_eq!(sum(&samples, "rest_client_requests_total"), 4006.0);
        let by_method = sum_by(&samples, "rest_client_requests_total", "method");
        assert_eq!(by_method["PUT"], 2004.0);
        assert_eq!(by_method["GET"], 3.0);
        assert_eq!(sum(&samples, "ccm_uninitialized_nodes"), 0.0);
        assert_eq!(total(&samples, "ccm_uninitialized_nodes"), Some(0.0));
        assert_eq!(total(&samples, "absent_total"), None);
        let weird = samples.iter().find(|s| s.name == "weird").unwrap();
        assert_eq!(weird.labels["a"], "x\"y,z");
        assert_eq!(weird.labels["b"], "2");
    }

    #[test]
    fn decodes_length_and_chunked_bodies() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
        assert_eq!(decode_response(plain).unwrap(), "hello");
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n";
        assert_eq!(decode_response(chunked).unwrap(), "hello");
        let error = b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n";
        assert!(decode_response(error).is_err());
    }
}
