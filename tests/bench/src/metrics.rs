//! Scraping the controller-manager's `/metrics` over HTTPS and reading the text exposition
//! format.

use std::collections::BTreeMap;

use anyhow::Context as _;

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

/// Sum of every sample named `name` (0 when there is none).
pub fn sum(samples: &[Sample], name: &str) -> f64 {
    // Not `Iterator::sum`: the float sum of nothing is -0, printed as "-0".
    samples
        .iter()
        .filter(|s| s.name == name)
        .fold(0.0, |sum, s| sum + s.value)
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
    // The secure port speaks the API server's conventions (bearer token, Status errors), so a
    // kube client pointed at it does TLS, HTTP and error mapping for us.
    client: kube::Client,
}

impl Scraper {
    /// A scraper trusting only the CA certificate `ca_der` and authenticating with `token`
    /// (the secure port reviews it with the API server).
    pub fn new(ca_der: &[u8], port: u16, token: String) -> anyhow::Result<Self> {
        let url: http::Uri = format!("https://127.0.0.1:{port}")
            .parse()
            .context("the controller-manager's secure port URL")?;
        let mut config = kube::Config::new(url);
        config.root_cert = Some(vec![ca_der.to_vec()]);
        config.auth_info.token = Some(token.into());
        let client = kube::Client::try_from(config)
            .context("building a client for the controller-manager's secure port")?;
        Ok(Self { client })
    }

    /// The current metrics text; any answer but `200 OK` is an error.
    pub async fn fetch(&self) -> anyhow::Result<String> {
        let request = http::Request::get("/metrics")
            .body(kube::client::Body::empty())
            .context("building the /metrics request")?;
        // `send`, not `request_text`: that one only rejects 4xx and 5xx, and a redirect or an
        // empty 204 must not pass for a scrape.
        let response = self
            .client
            .send(request)
            .await
            .context("GET /metrics from the controller-manager's secure port")?;
        let status = response.status();
        let body = response
            .into_body()
            .collect_bytes()
            .await
            .context("reading /metrics")?;
        let text = String::from_utf8(body.to_vec()).context("/metrics body is not UTF-8")?;
        anyhow::ensure!(
            status == http::StatusCode::OK,
            "/metrics answered {status}: {text}"
        );
        Ok(text)
    }

    /// Samples of the current metrics.
    pub async fn samples(&self) -> anyhow::Result<Vec<Sample>> {
        Ok(parse(&self.fetch().await?))
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
        // Positive zero, so a report prints "0", not "-0".
        assert_eq!(format!("{:.0}", sum(&samples, "absent_total")), "0");
        let weird = samples.iter().find(|s| s.name == "weird").unwrap();
        assert_eq!(weird.labels["a"], "x\"y,z");
        assert_eq!(weird.labels["b"], "2");
    }
}
