//! The secure port against a real kube-apiserver: health paths are open, `/metrics` needs a
//! token that a TokenReview accepts and a SubjectAccessReview allows (upstream's delegated
//! authentication and authorisation); `/readyz` follows the provider shim.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use cloud_controller_manager::serve::{self, Authorizer};
use cloud_controller_manager::{
    Cloud, CloudMetrics, ConnectSettings, Health, ProviderEndpoint, Scope,
};
use fake_provider::FakeCloud;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject};
use kube::api::{Api, PostParams};
use rustls::pki_types::ServerName;
use test_control_plane::{ControlPlane, UNPRIVILEGED_USER, unique_name};
use test_pki::{Ca, write_atomic};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Serves the secure-port router with delegated auth on a free port; returns its address and
/// the CA that signed its certificate.
async fn secure_port(client: kube::Client, dir: &std::path::Path) -> (std::net::SocketAddr, Ca) {
    let health = Health::default();
    health.add("ping", Scope::Live, Arc::new(|| Ok(())));
    let authorizer = Authorizer::new(
        client,
        vec!["/healthz".into(), "/readyz".into(), "/livez".into()],
    )
    .with_cache_ttl(Duration::from_millis(200));
    serve_health(health, Some(authorizer), dir).await
}

/// Serves the secure-port router with `health` on a free port; returns its address and the CA
/// that signed its certificate.
async fn serve_health(
    health: Health,
    authorizer: Option<Authorizer>,
    dir: &std::path::Path,
) -> (std::net::SocketAddr, Ca) {
    let ca = Ca::new("secure-port-test").unwrap();
    let leaf = ca.issue(&["localhost", "127.0.0.1"]).unwrap();
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    write_atomic(&cert, leaf.chain_pem.as_bytes(), false).unwrap();
    write_atomic(&key, leaf.key_pem.as_bytes(), true).unwrap();
    let acceptor = serve::tls_acceptor(Some((&cert, &key))).unwrap();
    let router = serve::router(health, Arc::default(), authorizer.map(Arc::new));
    let (addr, server) = serve::bind("127.0.0.1:0".parse().unwrap(), acceptor, router)
        .await
        .unwrap();
    tokio::spawn(server);
    (addr, ca)
}

/// GETs `path` over verified TLS; returns the status code.
async fn get(addr: std::net::SocketAddr, ca: &Ca, path: &str, token: Option<&str>) -> u16 {
    get_response(addr, ca, path, token).await.0
}

/// GETs `path` over verified TLS; returns the status code and the whole response text.
async fn get_response(
    addr: std::net::SocketAddr,
    ca: &Ca,
    path: &str,
    token: Option<&str>,
) -> (u16, String) {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(
            ca.cert_der().to_vec(),
        ))
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let auth = token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let _ = tls.read_to_end(&mut response).await;
    let text = String::from_utf8_lossy(&response).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    (code, text)
}

/// Polls `/readyz?verbose` until its status is `want`; returns the last response text.
async fn readyz_until(addr: std::net::SocketAddr, ca: &Ca, want: u16) -> String {
    test_support::Wait::new(format!("/readyz to answer {want}"), Duration::from_secs(15))
        .every(Duration::from_millis(50))
        .until(|| async move {
            let (code, text) = get_response(addr, ca, "/readyz?verbose", None).await;
            if code == want {
                Ok(text)
            } else {
                Err(format!("{code}: {text}"))
            }
        })
        .await
        .expect("/readyz turns as expected")
}

#[tokio::test]
async fn readyz_fails_while_the_shim_is_down_and_recovers_when_it_returns() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cpi.sock");
    let shim = FakeCloud::default().serve_at(&socket).await.unwrap();
    let cloud = Cloud::connect(
        &ProviderEndpoint::Unix(socket.clone()),
        &ConnectSettings {
            request_timeout: Duration::from_secs(1),
            reload_interval: Duration::from_secs(10),
            startup_timeout: Duration::from_secs(5),
        },
        CloudMetrics::default(),
    )
    .await
    .unwrap();
    let health = Health::default();
    health.add(
        "provider",
        Scope::Ready,
        cloud.readiness_check(Duration::from_millis(100)),
    );
    let (addr, ca) = serve_health(health, None, dir.path()).await;

    let up = readyz_until(addr, &ca, 200).await;
    assert!(up.contains("[+]provider ok"), "{up}");

    shim.shutdown().await.unwrap();
    let down = readyz_until(addr, &ca, 500).await;
    assert!(
        down.contains("[-]provider failed: provider shim not answering"),
        "{down}"
    );
    // Liveness is not tied to the shim: a shim outage must not get the pod restarted.
    assert_eq!(get(addr, &ca, "/livez", None).await, 200);

    let _restarted = FakeCloud::default().serve_at(&socket).await.unwrap();
    let back = readyz_until(addr, &ca, 200).await;
    assert!(back.contains("[+]provider ok"), "{back}");
}

#[tokio::test]
async fn metrics_need_an_authorized_token_and_health_paths_are_open() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cp = ControlPlane::shared().await.expect("shared control plane");
    let client = cp.client().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (addr, ca) = secure_port(client.clone(), dir.path()).await;

    // Health paths are always allowed, with or without credentials.
    assert_eq!(get(addr, &ca, "/healthz", None).await, 200);
    assert_eq!(get(addr, &ca, "/livez", Some("garbage")).await, 200);
    // Anonymous: authenticated as system:anonymous, then refused by RBAC.
    assert_eq!(get(addr, &ca, "/metrics", None).await, 403);
    // A token the API server does not know.
    assert_eq!(get(addr, &ca, "/metrics", Some("not-a-token")).await, 401);
    // A valid token without RBAC permission.
    let unprivileged = cp.unprivileged_token().unwrap();
    assert_eq!(get(addr, &ca, "/metrics", Some(&unprivileged)).await, 403);
    // system:masters skips the review.
    let admin = cp.admin_token().unwrap();
    assert_eq!(get(addr, &ca, "/metrics", Some(&admin)).await, 200);

    // Granting `get` on the non-resource URL /metrics lets the unprivileged user scrape.
    let name = unique_name("metrics-reader");
    Api::<ClusterRole>::all(client.clone())
        .create(
            &PostParams::default(),
            &ClusterRole {
                metadata: kube::api::ObjectMeta {
                    name: Some(name.clone()),
                    ..Default::default()
                },
                rules: Some(vec![PolicyRule {
                    non_resource_urls: Some(vec!["/metrics".into()]),
                    verbs: vec!["get".into()],
                    ..Default::default()
                }]),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    Api::<ClusterRoleBinding>::all(client.clone())
        .create(
            &PostParams::default(),
            &ClusterRoleBinding {
                metadata: kube::api::ObjectMeta {
                    name: Some(name.clone()),
                    ..Default::default()
                },
                role_ref: RoleRef {
                    api_group: "rbac.authorization.k8s.io".into(),
                    kind: "ClusterRole".into(),
                    name: name.clone(),
                },
                subjects: Some(vec![Subject {
                    kind: "User".into(),
                    name: UNPRIVILEGED_USER.into(),
                    api_group: Some("rbac.authorization.k8s.io".into()),
                    ..Default::default()
                }]),
            },
        )
        .await
        .unwrap();
    let granted = test_support::Wait::new("the RBAC grant to be honoured", Duration::from_secs(12))
        .every(Duration::from_millis(250))
        .until(|| {
            let (ca, token) = (&ca, &unprivileged);
            async move {
                match get(addr, ca, "/metrics", Some(token)).await {
                    200 => Ok(()),
                    code => Err(code.to_string()),
                }
            }
        })
        .await;
    assert!(granted.is_ok(), "RBAC grant not honoured: {granted:?}");
    // Still not allowed elsewhere.
    assert_eq!(
        get(addr, &ca, "/debug/anything", Some(&unprivileged)).await,
        403
    );
}
