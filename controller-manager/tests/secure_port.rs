//! The secure port against a real kube-apiserver: health paths are open, `/metrics` needs a
//! token that a TokenReview accepts and a SubjectAccessReview allows (upstream's delegated
//! authentication and authorisation); `/readyz` follows the provider shim.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cloud_controller_manager::serve::{self, Authorizer, MAX_REVIEWS_IN_FLIGHT};
use cloud_controller_manager::{
    Cloud, CloudMetrics, ConnectSettings, Health, ProviderEndpoint, Scope,
};
use fake_provider::FakeCloud;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject};
use kube::api::{Api, PostParams};
use test_control_plane::{ControlPlane, UNPRIVILEGED_USER, unique_name};
use test_pki::{Ca, write_atomic};
use test_support::{https_get, tls_connect, tls_connector};
use tokio::io::AsyncWriteExt;

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
    let connector = tls_connector(ca.cert_der()).unwrap();
    https_get(&connector, addr, path, token).await.unwrap()
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
    // Which check fails is shown; why is withheld from anonymous callers (it is logged).
    assert!(
        down.contains("[-]provider failed: reason withheld"),
        "{down}"
    );
    assert!(!down.contains("not answering"), "{down}");
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
    // Nothing is served elsewhere; an unknown path is answered 404 without a review (a
    // review per probed path would let anyone load the API server).
    assert_eq!(
        get(addr, &ca, "/debug/anything", Some(&unprivileged)).await,
        404
    );
}

/// An admin client that counts the requests it sends.
fn counting_client(cp: &ControlPlane) -> (kube::Client, Arc<AtomicUsize>) {
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = sent.clone();
    let client = kube::client::ClientBuilder::try_from(cp.kube_config())
        .unwrap()
        .with_layer(&tower::util::MapRequestLayer::new(
            move |request: http::Request<kube::client::Body>| {
                counter.fetch_add(1, Ordering::SeqCst);
                request
            },
        ))
        .build();
    (client, sent)
}

#[tokio::test]
async fn unknown_paths_are_not_reviewed() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cp = ControlPlane::shared().await.expect("shared control plane");
    let (client, reviews) = counting_client(cp);
    let dir = tempfile::tempdir().unwrap();
    let (addr, ca) = secure_port(client, dir.path()).await;
    for i in 0..20 {
        let path = format!("/no-such-path-{i}");
        assert_eq!(get(addr, &ca, &path, None).await, 404, "{path}");
        let token = format!("random-token-{i}");
        assert_eq!(get(addr, &ca, &path, Some(&token)).await, 404, "{path}");
    }
    assert_eq!(
        reviews.load(Ordering::SeqCst),
        0,
        "requests for unknown paths must cause no TokenReview or SubjectAccessReview"
    );
    // A routed path is still reviewed.
    assert_eq!(get(addr, &ca, "/metrics", Some("random-token")).await, 401);
    assert!(reviews.load(Ordering::SeqCst) >= 1);
}

#[tokio::test]
async fn reviews_in_flight_are_capped() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cp = ControlPlane::shared().await.expect("shared control plane");
    let dir = tempfile::tempdir().unwrap();
    let (addr, ca) = secure_port(cp.client().unwrap(), dir.path()).await;
    let ca = Arc::new(ca);
    let requests = 4 * MAX_REVIEWS_IN_FLIGHT;
    let mut answers = tokio::task::JoinSet::new();
    for i in 0..requests {
        let ca = ca.clone();
        answers.spawn(async move { get(addr, &ca, "/metrics", Some(&format!("flood-{i}"))).await });
    }
    let mut codes = Vec::new();
    while let Some(code) = answers.join_next().await {
        codes.push(code.unwrap());
    }
    assert!(
        codes.iter().all(|c| *c == 401 || *c == 429),
        "only refusals expected: {codes:?}"
    );
    assert!(
        codes.contains(&429),
        "{requests} concurrent reviews must hit the cap of {MAX_REVIEWS_IN_FLIGHT}: {codes:?}"
    );
}

/// A kubelet probe's budget: `timeoutSeconds: 1`.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

#[tokio::test]
async fn livez_answers_while_idle_and_slow_clients_hold_connections() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let health = Health::default();
    health.add("ping", Scope::Live, Arc::new(|| Ok(())));
    let (addr, ca) = serve_health(health, None, dir.path()).await;

    // 1024 connections that never say a word (no TLS handshake)...
    let mut idle = Vec::new();
    for _ in 0..1024 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // ...and one that completes TLS, then sends its request headers a byte at a time.
    let connector = tls_connector(ca.cert_der()).unwrap();
    let slow = tokio::spawn(async move {
        let mut tls = tls_connect(&connector, addr).await.ok()?;
        for byte in b"GET /livez HTTP/1.1\r\nHost: localhost\r\nX-Slow: " {
            tls.write_all(&[*byte]).await.ok()?;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Some(())
    });

    // A probe still gets its answer in time.
    let started = tokio::time::Instant::now();
    let code = tokio::time::timeout(PROBE_TIMEOUT, get(addr, &ca, "/livez", None))
        .await
        .unwrap_or_else(|_| {
            panic!("/livez did not answer within {PROBE_TIMEOUT:?} with 1024 idle connections open")
        });
    assert_eq!(code, 200);
    eprintln!("/livez answered in {:?}", started.elapsed());
    slow.abort();
    drop(idle);
}

/// Completes a TLS handshake with the secure port as a client trusting only `ca`.
async fn handshake_trusting(addr: std::net::SocketAddr, ca: &Ca) -> Result<(), String> {
    let connector = tls_connector(ca.cert_der()).map_err(|e| e.to_string())?;
    tls_connect(&connector, addr)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn a_rotated_serving_certificate_is_used_for_new_connections() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let health = Health::default();
    health.add("ping", Scope::Live, Arc::new(|| Ok(())));
    // `serve_health` writes `tls.crt`/`tls.key` in `dir`, signed by the returned CA.
    let (addr, ca1) = serve_health(health, None, dir.path()).await;
    assert_eq!(get(addr, &ca1, "/livez", None).await, 200);

    let ca2 = Ca::new("secure-port-rotated").unwrap();
    let leaf = ca2.issue(&["localhost", "127.0.0.1"]).unwrap();
    write_atomic(&dir.path().join("tls.key"), leaf.key_pem.as_bytes(), true).unwrap();
    write_atomic(
        &dir.path().join("tls.crt"),
        leaf.chain_pem.as_bytes(),
        false,
    )
    .unwrap();

    // Bounded by the reload interval plus slack: a server that never reloads fails here.
    let wait = serve::SERVING_CERT_RELOAD_INTERVAL + Duration::from_secs(10);
    test_support::wait_for("a client trusting only the new CA to connect", wait, || {
        handshake_trusting(addr, &ca2)
    })
    .await
    .expect("the rotated certificate is served");
    assert_eq!(get(addr, &ca2, "/livez", None).await, 200);
    assert!(handshake_trusting(addr, &ca1).await.is_err());
}
