//! Whoever reaches the secure port (:10258) must not be able to cost the leader its lease: a
//! flood of requests with random tokens and random paths, against a real controller-manager
//! holding a real Lease, while its client-side API budget is small. Reviews have their own
//! client and budget and are capped in flight; renewals go on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use e2e_tests::write_inventory;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use test_pki::{Ca, write_atomic};
use test_support::{free_port, https_get, tls_connector, wait_for};

const LEASE_NAME: &str = "ccm-flood";
const FLOOD: Duration = Duration::from_secs(12);
const CLIENTS: usize = 32;

/// One HTTPS GET; the status code, or 0 when it failed or took over 3 s.
async fn get(
    addr: std::net::SocketAddr,
    tls: &tokio_rustls::TlsConnector,
    path: &str,
    token: &str,
) -> u16 {
    let answer = tokio::time::timeout(
        Duration::from_secs(3),
        https_get(tls, addr, path, Some(token)),
    );
    match answer.await {
        Ok(Ok((code, _))) => code,
        _ => 0,
    }
}

#[tokio::test]
async fn a_review_flood_does_not_cost_the_leader_its_lease() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (cp, client, dir) = start_control_plane().await;
    let d = dir.path();
    let inventory = write_inventory(d, INVENTORY).unwrap();
    let (_shim, socket) = spawn_local_shim_unix(d, &inventory, &[], &[]);

    let ca = Ca::new("secure-port-flood").unwrap();
    let leaf = ca.issue(&["localhost", "127.0.0.1"]).unwrap();
    let (cert, key) = (d.join("serving.crt"), d.join("serving.key"));
    write_atomic(&cert, leaf.chain_pem.as_bytes(), false).unwrap();
    write_atomic(&key, leaf.key_pem.as_bytes(), true).unwrap();
    let port = free_port().unwrap();
    let ccm = spawn_ccm(
        &cp,
        "ccm",
        &[
            format!("--provider-endpoint=unix://{}", arg(&socket)),
            format!("--secure-port={port}"),
            "--bind-address=127.0.0.1".into(),
            format!("--tls-cert-file={}", arg(&cert)),
            format!("--tls-private-key-file={}", arg(&key)),
            "--leader-elect-lease-duration=6s".into(),
            "--leader-elect-renew-deadline=4s".into(),
            "--leader-elect-retry-period=1s".into(),
            format!("--leader-elect-resource-name={LEASE_NAME}"),
            "--controllers=cloud-node".into(),
            // A small budget: on a shared client the reviews would starve the renewals at once.
            "--kube-api-qps=5".into(),
            "--kube-api-burst=5".into(),
        ],
        &[],
        d,
    );
    let ccm_ref = &ccm;
    wait_for(
        "the controller-manager to lead",
        Duration::from_secs(60),
        || {
            let leads = ccm_ref.logs().contains("became leader");
            async move {
                if leads {
                    Ok(())
                } else {
                    Err("not leading yet".into())
                }
            }
        },
    )
    .await
    .unwrap();
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-system");
    let holder = leases
        .get(LEASE_NAME)
        .await
        .unwrap()
        .spec
        .unwrap()
        .holder_identity;

    let tls = tls_connector(ca.cert_der()).unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    // The flood: every request has a token never seen before; half ask for routed paths
    // (each one a TokenReview unless refused), half for random ones.
    let until = Instant::now() + FLOOD;
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..CLIENTS {
        let tls = tls.clone();
        clients.spawn(async move {
            let mut codes = Vec::new();
            let mut i = 0u32;
            // Bounded in time and count (a dead server answers refusals very fast).
            while Instant::now() < until && i < 2_000 {
                i += 1;
                let path = if i.is_multiple_of(2) {
                    "/metrics".to_string()
                } else {
                    format!("/x{c}-{i}")
                };
                codes.push((
                    path.starts_with("/x"),
                    get(addr, &tls, &path, &format!("t-{c}-{i}")).await,
                ));
            }
            codes
        });
    }
    // Meanwhile the lease must keep being renewed.
    let mut stalest = Duration::ZERO;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let spec = leases.get(LEASE_NAME).await.unwrap().spec.unwrap();
        assert_eq!(
            spec.holder_identity, holder,
            "leadership changed hands during the flood"
        );
        let renewed = spec.renew_time.unwrap().0;
        let age = Duration::try_from(Timestamp::now().duration_since(renewed)).unwrap_or_default();
        stalest = stalest.max(age);
    }
    let mut answers = Vec::new();
    while let Some(codes) = clients.join_next().await {
        answers.extend(codes.unwrap());
    }
    let unknown: Vec<u16> = answers
        .iter()
        .filter(|(u, _)| *u)
        .map(|(_, c)| *c)
        .collect();
    let routed: Vec<u16> = answers
        .iter()
        .filter(|(u, _)| !*u)
        .map(|(_, c)| *c)
        .collect();
    eprintln!(
        "{} requests; routed answers: 401 x{}, 429 x{}; stalest renewal {stalest:?}",
        answers.len(),
        routed.iter().filter(|c| **c == 401).count(),
        routed.iter().filter(|c| **c == 429).count()
    );
    assert!(
        answers.len() > 100,
        "the flood must be a flood: {}",
        answers.len()
    );
    assert!(
        unknown.iter().all(|c| *c == 404),
        "unknown paths are 404 without a review: {unknown:?}"
    );
    assert!(routed.iter().all(|c| [401, 429].contains(c)), "{routed:?}");
    // Renewed every retry period (1 s); the renew deadline is 4 s.
    assert!(
        stalest < Duration::from_secs(4),
        "a renewal was {stalest:?} old during the flood"
    );
    assert!(
        ccm.exit_status().is_none(),
        "the leader exited:\n{}",
        ccm.logs()
    );
    assert!(
        !ccm.logs().contains("leaderelection lost"),
        "{}",
        ccm.logs()
    );
}
