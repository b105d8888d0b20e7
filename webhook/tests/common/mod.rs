//! The webhook served in-process over real HTTPS, calling the fake provider over gRPC with
//! mutual TLS, and a raw HTTP/1.1 client speaking to it byte for byte as an API server would.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use clap::Parser as _;
use cloud_provider_webhook::Options;
use fake_provider::{FakeCloud, ServeFlags, ServedFake};
use serde_json::{Value, json};
use test_pki::{Ca, Pki};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

/// The SAN of the webhook's client certificate, the only one the fake admits.
pub const CLIENT_SAN: &str = "cloud-provider-webhook";

/// A running webhook and the fake shim behind it.
pub struct Harness {
    /// The fake shim (`None` once stopped).
    pub fake: Option<ServedFake>,
    /// The webhook's HTTPS address.
    pub addr: SocketAddr,
    /// The CA (PEM) of the webhook's serving certificate: a webhook configuration's caBundle.
    pub ca_pem: String,
    /// The CA every certificate of the test is issued by.
    pub ca: Ca,
    /// The webhook's serving certificate files.
    pub serving: test_pki::TlsFiles,
    connector: tokio_rustls::TlsConnector,
    stop: Option<oneshot::Sender<()>>,
    _pki: Pki,
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// Header block.
    pub head: String,
    /// Body.
    pub body: String,
}

impl Answer {
    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("answer is not JSON ({e}): {self:?}"))
    }

    /// `response` of the AdmissionReview answered.
    pub fn response(&self) -> Value {
        assert_eq!(self.status, 200, "{self:?}");
        self.json()["response"].clone()
    }
}

/// The JSON Patch of an admission response, decoded.
pub fn patch_of(response: &Value) -> Value {
    assert_eq!(response["patchType"], "JSONPatch", "{response}");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().unwrap())
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

impl Harness {
    /// Serves `fake` over mTLS and the webhook in front of it with the `extra` flags (and
    /// `--webhooks=*` unless they say otherwise).
    pub async fn start(fake: FakeCloud, extra: &[&str]) -> Harness {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca = Ca::new("webhook-test").unwrap();
        let pki = Pki::new().unwrap();
        let bundle = ca.cert_pem().to_string();
        let shim = pki
            .write_tls_files(
                "shim",
                &ca.issue(&["localhost", "127.0.0.1"]).unwrap(),
                &bundle,
            )
            .unwrap();
        let client = pki
            .write_tls_files("client", &ca.issue(&[CLIENT_SAN]).unwrap(), &bundle)
            .unwrap();
        let serving = pki
            .write_tls_files(
                "serving",
                &ca.issue(&["localhost", "127.0.0.1"]).unwrap(),
                &bundle,
            )
            .unwrap();
        let mut flags = ServeFlags::unix("unused");
        flags.unix_socket = None;
        flags.bind_address = "127.0.0.1:0".parse().unwrap();
        flags.tls_cert_file = Some(shim.cert.clone());
        flags.tls_private_key_file = Some(shim.key.clone());
        flags.client_ca_file = Some(shim.ca.clone());
        flags.allowed_client_sans = vec![CLIENT_SAN.to_string()];
        let fake = fake.serve_with(flags).await.unwrap();
        let port = fake.address().tcp().unwrap().port();
        let mut args: Vec<String> = vec![
            "cloud-provider-webhook".into(),
            "--webhook-bind-address=127.0.0.1".into(),
            "--webhook-secure-port=0".into(),
            format!("--webhook-tls-cert-file={}", serving.cert.display()),
            format!("--webhook-tls-private-key-file={}", serving.key.display()),
            format!("--provider-endpoint=https://127.0.0.1:{port}"),
            format!("--provider-tls-cert-file={}", client.cert.display()),
            format!("--provider-tls-private-key-file={}", client.key.display()),
            format!("--provider-ca-file={}", client.ca.display()),
            "--provider-server-name=localhost".into(),
        ];
        if !extra.iter().any(|a| a.starts_with("--webhooks")) {
            args.push("--webhooks=*".into());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let options = Options::try_parse_from(args).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let bound = cloud_provider_webhook::bind(&options, async move {
            let _ = stopped.await;
        })
        .await
        .unwrap();
        let addr = bound.local_addr();
        tokio::spawn(bound.serve());
        let connector = test_support::tls_connector(ca.cert_der()).unwrap();
        Harness {
            fake: Some(fake),
            addr,
            ca_pem: bundle,
            ca,
            serving,
            connector,
            stop: Some(stop),
            _pki: pki,
        }
    }

    /// The fake shim.
    pub fn fake(&self) -> &ServedFake {
        self.fake.as_ref().expect("the fake is serving")
    }

    /// Stops the fake shim (the webhook keeps running).
    pub async fn stop_shim(&mut self) {
        if let Some(fake) = self.fake.take() {
            fake.shutdown().await.unwrap();
        }
    }

    /// Sends raw bytes as one request (`Connection: close` must be in them) and reads the
    /// answer to the end.
    pub async fn raw(&self, request: &[u8]) -> Answer {
        let mut tls = test_support::tls_connect(&self.connector, self.addr)
            .await
            .unwrap();
        // The server may answer (and close) before reading everything, e.g. a 413.
        let _ = tls.write_all(request).await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(20), tls.read_to_end(&mut answer)).await;
        parse_answer(&answer)
    }

    /// The DER certificate the webhook presents to a new connection.
    pub async fn served_certificate(&self) -> Vec<u8> {
        let tls = test_support::tls_connect(&self.connector, self.addr)
            .await
            .unwrap();
        tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    }

    /// POSTs `body` to `path` with `content_type` (none when `None`).
    pub async fn post(&self, path: &str, content_type: Option<&str>, body: &[u8]) -> Answer {
        let content_type =
            content_type.map_or_else(String::new, |t| format!("Content-Type: {t}\r\n"));
        let mut request = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\n{content_type}Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(body);
        self.raw(&request).await
    }

    /// POSTs a JSON review to `path`.
    pub async fn review(&self, path: &str, review: &Value) -> Answer {
        self.post(
            path,
            Some("application/json"),
            review.to_string().as_bytes(),
        )
        .await
    }

    /// The response of pv-labeler to creating `pv`, in review `version`.
    pub async fn pv_response(&self, version: &str, uid: &str, pv: Value) -> Value {
        self.review("/pv-labeler", &review(version, uid, pv_create(pv)))
            .await
            .response()
    }

    /// The response of service-lb-validator to the Service `request`, in review `version`.
    pub async fn service_response(&self, version: &str, uid: &str, request: Value) -> Value {
        self.review("/service-lb-validator", &review(version, uid, request))
            .await
            .response()
    }

    /// GETs `path`.
    pub async fn get(&self, path: &str) -> Answer {
        self.raw(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn parse_answer(answer: &[u8]) -> Answer {
    let text = String::from_utf8_lossy(answer).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP answer: {text:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {head:?}"));
    Answer {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

/// An AdmissionReview of `version` (`v1` or `v1beta1`).
pub fn review(version: &str, uid: &str, request: Value) -> Value {
    let mut request = request;
    request["uid"] = json!(uid);
    json!({
        "apiVersion": format!("admission.k8s.io/{version}"),
        "kind": "AdmissionReview",
        "request": request,
    })
}

/// The request part for creating the PersistentVolume `pv`.
pub fn pv_create(pv: Value) -> Value {
    json!({
        "kind": {"group": "", "version": "v1", "kind": "PersistentVolume"},
        "resource": {"group": "", "version": "v1", "resource": "persistentvolumes"},
        "operation": "CREATE",
        "name": pv["metadata"]["name"],
        "object": pv,
    })
}

/// An EBS PersistentVolume named `name` with volume ID `id`.
pub fn ebs_pv(name: &str, id: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": name},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                 "awsElasticBlockStore": {"volumeID": id}}
    })
}

/// The request part for `operation` on the Service `svc` (with `old` on UPDATE).
pub fn service_request(operation: &str, svc: Value, old: Option<Value>) -> Value {
    json!({
        "kind": {"group": "", "version": "v1", "kind": "Service"},
        "resource": {"group": "", "version": "v1", "resource": "services"},
        "operation": operation,
        "name": svc["metadata"]["name"],
        "namespace": svc["metadata"]["namespace"],
        "object": svc,
        "oldObject": old,
    })
}

/// A LoadBalancer Service `default/<name>` with `annotations`.
pub fn lb_service(name: &str, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "annotations": annotations},
        "spec": {"type": "LoadBalancer", "ports": [{"port": 80, "protocol": "TCP"}]}
    })
}
