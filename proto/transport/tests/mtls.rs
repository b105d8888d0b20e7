//! Mutual TLS over real TCP sockets: who is admitted, who is refused, and hot rotation of
//! certificates and CA bundles without restarting either side.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::Duration;

use common::{
    Ca, LogCapture, MtlsServer, TestServer, channel, check, client_tls, eventually, presented_cert,
    raw_channel, server_tls,
};
use test_pki::{ca_bundle, rewrite_in_place, write_atomic};
use tokio_stream::StreamExt as _;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The SAN the controller-manager's client certificate carries in these tests.
const CCM: &str = "ccm.kube-system";

#[tokio::test]
async fn mtls_client_with_valid_cert_is_served() {
    let s = MtlsServer::start(&[CCM]).await;
    let client_leaf = s.ca.issue(&[CCM]).unwrap();
    let client = s.client("client", &client_leaf);
    let addr = s.server.addr.unwrap();
    // A client that connects and never starts its handshake must not hold up anyone else.
    let _silent = tokio::net::TcpStream::connect(addr).await.unwrap();

    let channel = channel(&s.server.uri(), &client);
    check(channel.clone()).await.unwrap();
    // The server negotiates HTTP/2 through ALPN with the client's configuration.
    let negotiated = common::handshake(addr, client.current_config())
        .await
        .unwrap();
    assert_eq!(negotiated.alpn.as_deref(), Some(&b"h2"[..]));
    // Handlers see the authenticated client certificate through `request.peer_certs()`.
    assert_eq!(
        s.server.seen.last().peer_cert,
        Some(client_leaf.cert_der.clone())
    );

    // Graceful shutdown returns cleanly and closes the listening socket.
    drop(channel);
    s.server.stop().await.unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn uri_san_on_allow_list_is_served() {
    let spiffe = "spiffe://cluster.local/ns/kube-system/sa/cloud-controller-manager";
    let s = MtlsServer::start(&[spiffe]).await;
    // test-pki issues a SAN containing `://` as a URI SAN (and only SAN).
    let client = s.client_with_sans("client", &[spiffe]);

    check(channel(&s.server.uri(), &client)).await.unwrap();
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let logs = LogCapture::default();
    let _guard = logs.install();
    let s = MtlsServer::start(&[]).await;

    let anonymous = raw_channel(
        s.server.addr.unwrap(),
        common::anonymous_client_config(s.ca.cert_pem()),
    );
    let err = check(anonymous).await.unwrap_err();
    assert_ne!(err.code(), tonic::Code::Ok);
    eventually("server logs the refusal", || {
        let logs = logs.clone();
        async move { logs.contents().contains("peer sent no certificates") }
    })
    .await;
}

#[tokio::test]
async fn client_cert_from_other_ca_is_refused() {
    let logs = LogCapture::default();
    let _guard = logs.install();
    let s = MtlsServer::start(&[]).await;
    let rogue_ca = Ca::new("rogue ca").unwrap();
    // Trusts the real server, but its own certificate (same SAN) is from another CA.
    let rogue = s.client("rogue", &rogue_ca.issue(&[CCM]).unwrap());
    let legit = s.client_with_sans("client", &[CCM]);

    assert!(check(channel(&s.server.uri(), &rogue)).await.is_err());
    // The server itself refused the certificate, for the right reason.
    eventually("server logs the refusal", || {
        let logs = logs.clone();
        async move {
            logs.contents().lines().any(|line| {
                line.contains("WARN")
                    && line.contains("refusing TLS connection")
                    && line.contains("UnknownIssuer")
            })
        }
    })
    .await;
    check(channel(&s.server.uri(), &legit)).await.unwrap();
}

#[tokio::test]
async fn client_san_not_on_allow_list_is_refused() {
    let logs = LogCapture::default();
    let _guard = logs.install();
    let s = MtlsServer::start(&[CCM]).await;
    let intruder = s.client_with_sans("intruder", &["intruder.default"]);
    let legit = s.client_with_sans("client", &[CCM]);

    assert!(check(channel(&s.server.uri(), &intruder)).await.is_err());
    check(channel(&s.server.uri(), &legit)).await.unwrap();
    let logs = logs.contents();
    assert!(
        logs.lines().any(|line| line.contains("WARN")
            && line.contains("client certificate SANs [\"intruder.default\"] not in allow-list [\"ccm.kube-system\"]")),
        "no clear warning in logs:\n{logs}"
    );
}

#[tokio::test]
async fn empty_allow_list_accepts_any_cert_from_ca() {
    let s = MtlsServer::start(&[]).await;
    let anyone = s.client_with_sans("client", &["whoever.example"]);

    check(channel(&s.server.uri(), &anyone)).await.unwrap();
}

#[tokio::test]
async fn client_refuses_server_with_wrong_ca() {
    let pki = common::Pki::new().unwrap();
    let ca = Ca::new("ca").unwrap();
    let impostor_ca = Ca::new("impostor ca").unwrap();
    // The impostor accepts our client certificate but presents one from a CA we do not trust.
    let impostor_files = pki
        .write_tls_files(
            "impostor",
            &impostor_ca.issue(&["localhost"]).unwrap(),
            ca.cert_pem(),
        )
        .unwrap();
    let impostor = TestServer::start_tls(server_tls(&impostor_files, &[])).await;
    let client_files = pki
        .write_tls_files("client", &ca.issue(&[CCM]).unwrap(), ca.cert_pem())
        .unwrap();
    let client = client_tls(&client_files);

    let err = check(channel(&impostor.uri(), &client)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    let refused = presented_cert(impostor.addr.unwrap(), client.current_config()).await;
    let refused = refused.unwrap_err().to_string();
    assert!(refused.contains("UnknownIssuer"), "{refused}");
}

#[tokio::test]
async fn rotated_server_certificate_is_used_without_restart() {
    let s = MtlsServer::start(&[CCM]).await;
    let (old_ca, server) = (&s.ca, &s.server);
    let new_ca = Ca::new("new ca").unwrap();
    let client_files = s
        .pki
        .write_tls_files("client", &old_ca.issue(&[CCM]).unwrap(), old_ca.cert_pem())
        .unwrap();
    let client = client_tls(&client_files);

    let established = channel(&server.uri(), &client);
    check(established.clone()).await.unwrap();
    // A streaming call that stays open across the rotation.
    let mut watch = HealthClient::new(established.clone())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.next().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    let old_client_config = client.current_config();
    assert_eq!(
        presented_cert(server.addr.unwrap(), client.current_config())
            .await
            .unwrap()
            .as_ref(),
        s.leaf.cert_der.as_slice()
    );

    // Rotate to a new CA: the server trusts both CAs for clients during the transition.
    let new_server_leaf = new_ca.issue(&["localhost"]).unwrap();
    s.files
        .rotate(&new_server_leaf, &ca_bundle(&[old_ca, &new_ca]))
        .unwrap();
    client_files
        .rotate(&new_ca.issue(&[CCM]).unwrap(), new_ca.cert_pem())
        .unwrap();

    let addr = server.addr.unwrap();
    eventually(
        "server presents the new certificate to a reloaded client",
        || {
            let config = client.current_config();
            let expected = new_server_leaf.cert_der.clone();
            async move {
                presented_cert(addr, config)
                    .await
                    .is_ok_and(|cert| cert.as_ref() == expected.as_slice())
            }
        },
    )
    .await;
    // A client still trusting only the old CA now rejects the server: it really switched.
    assert!(presented_cert(addr, old_client_config).await.is_err());

    // New connections succeed with the new material on both sides.
    check(channel(&server.uri(), &client)).await.unwrap();
    // The connection established before the rotation still serves unary and streaming calls.
    check(established.clone()).await.unwrap();
    server
        .reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let update = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("in-flight stream stalled")
        .unwrap()
        .unwrap();
    assert_eq!(update.status(), ServingStatus::NotServing);
}

#[tokio::test]
async fn rotated_ca_bundle_refuses_old_clients() {
    let s = MtlsServer::start(&[CCM]).await;
    let new_ca = Ca::new("new ca").unwrap();
    let old_client = s.client_with_sans("old-client", &[CCM]);
    let new_client = s.client("new-client", &new_ca.issue(&[CCM]).unwrap());
    check(channel(&s.server.uri(), &old_client)).await.unwrap();
    assert!(check(channel(&s.server.uri(), &new_client)).await.is_err());

    write_atomic(&s.files.ca, new_ca.cert_pem().as_bytes(), false).unwrap();

    let uri = s.server.uri();
    eventually("old client refused on a new connection", || {
        let channel = channel(&uri, &old_client);
        async move { check(channel).await.is_err() }
    })
    .await;
    check(channel(&s.server.uri(), &new_client)).await.unwrap();
}

#[tokio::test]
async fn half_written_file_keeps_previous_material() {
    let logs = LogCapture::default();
    let _guard = logs.install();
    let s = MtlsServer::start(&[CCM]).await;
    let (old_leaf, server_files) = (&s.leaf, &s.files);
    let client = s.client_with_sans("client", &[CCM]);
    let addr = s.server.addr.unwrap();
    let presented = || async { presented_cert(addr, client.current_config()).await.unwrap() };
    assert_eq!(presented().await.as_ref(), old_leaf.cert_der.as_slice());

    // New key written first: it does not match the old certificate.
    let new_leaf = s.ca.issue(&["localhost"]).unwrap();
    rewrite_in_place(&server_files.key, new_leaf.key_pem.as_bytes()).unwrap();
    eventually("mismatch reported", || {
        let logs = logs.clone();
        async move { logs.contents().contains("does not match the certificate") }
    })
    .await;
    assert_eq!(presented().await.as_ref(), old_leaf.cert_der.as_slice());
    check(channel(&s.server.uri(), &client)).await.unwrap();

    // Certificate caught half-way through being written.
    let half = &new_leaf.cert_pem[..new_leaf.cert_pem.len() / 2];
    rewrite_in_place(&server_files.cert, half.as_bytes()).unwrap();
    eventually("half-written certificate reported", || {
        let logs = logs.clone();
        async move { logs.contents().contains("is not valid PEM") }
    })
    .await;
    tokio::time::sleep(common::RELOAD * 3).await;
    assert_eq!(presented().await.as_ref(), old_leaf.cert_der.as_slice());
    check(channel(&s.server.uri(), &client)).await.unwrap();

    // Once the write completes, the next poll picks the new material up.
    rewrite_in_place(&server_files.cert, new_leaf.cert_pem.as_bytes()).unwrap();
    eventually("new certificate presented", || async {
        presented().await.as_ref() == new_leaf.cert_der.as_slice()
    })
    .await;
    check(channel(&s.server.uri(), &client)).await.unwrap();
}
