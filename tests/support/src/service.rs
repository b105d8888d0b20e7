//! Services of type LoadBalancer, and a stand-in for kube-proxy's `/healthz`, for the suites,
//! the bench and the local demo.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// kube-proxy's health port, which load balancers probe for `externalTrafficPolicy: Cluster`.
pub const KUBE_PROXY_HEALTH_PORT: u16 = 10256;

/// A Service `namespace/name` of type LoadBalancer with one port per `(protocol, port)`, each
/// targeting 8080, selecting `app=<name>`; the API server allocates the node ports.
pub fn load_balancer_service(namespace: &str, name: &str, ports: &[(&str, i32)]) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            selector: Some(BTreeMap::from([("app".to_string(), name.to_string())])),
            ports: Some(
                ports
                    .iter()
                    .map(|&(protocol, port)| ServicePort {
                        name: Some(format!("{}-{port}", protocol.to_lowercase())),
                        protocol: Some(protocol.into()),
                        port,
                        target_port: Some(IntOrString::Int(8080)),
                        ..ServicePort::default()
                    })
                    .collect(),
            ),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// Serves `ip:port` over HTTP/1.1: every request gets `200` and `body` while `healthy()` says
/// so, `503` otherwise; the connection closes after the answer. Ends when the task is aborted.
pub async fn serve_http(
    ip: IpAddr,
    port: u16,
    body: String,
    healthy: impl Fn() -> bool + Send + Sync + 'static,
) -> std::io::Result<JoinHandle<()>> {
    let listener = TcpListener::bind((ip, port)).await?;
    Ok(tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let (status, body) = if healthy() {
                ("200 OK", body.clone())
            } else {
                ("503 Service Unavailable", String::new())
            };
            tokio::spawn(async move {
                let mut request = [0u8; 2048];
                let _ = conn.read(&mut request).await;
                let answer = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(answer.as_bytes()).await;
            });
        }
    }))
}

/// One plain HTTP/1.0 `GET /` to `addr` (`host:port`); the whole response (status line, headers
/// and body), or what kept it from being read.
pub async fn http_get(addr: &str) -> Result<String, String> {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    stream
        .write_all(b"GET / HTTP/1.0\r\n\r\n")
        .await
        .map_err(|e| format!("writing to {addr}: {e}"))?;
    let mut out = String::new();
    stream
        .read_to_string(&mut out)
        .await
        .map_err(|e| format!("reading from {addr}: {e}"))?;
    Ok(out)
}
