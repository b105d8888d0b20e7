//! Mutual TLS over real TCP sockets: who is admitted, who is refused, and hot rotation of
//! certificates and CA bundles without restarting either side.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::Duration;

use common::{
    Ca, LogCapture, TestServer, channel, check, client_tls, eventually, presented_cert,
    raw_channel, replace, server_tls, write_files,
};
use tokio_stream::StreamExt as _;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The SAN the controller-manager's client certificate carries in these tests.
const CCM: &str = "ccm.kube-system";

#[tokio::test]
async fn mtls_client_with_valid_cert_is_served() {
    let dir = common::tempdir();
    let ca = Ca::new("ca");
    let server = TestServer::start_tls(server_tls(
        write_files(dir.path(), "server", &ca.leaf(&["localhost"]), &ca.pem),
        &[CCM],
    ))
    .await;
    let client_leaf = ca.leaf(&[CCM]);
    let client = client_tls(write_files(dir.path(), "client", &client_leaf, &ca.pem));
    let addr = server.addr.unwrap();
    // A client that connects and never starts its handshake must not hold up anyone else.
    let _silent = tokio::net::TcpStream::connect(addr).await.unwrap();

    let channel = channel(&server.uri(), &client);
    check(channel.clone()).await.unwrap();
    assert_eq!(client.alpn_protocols(), vec![b"h2".to_vec()]);
    // Handlers see the authenticated client certificate through `request.peer_certs()`.
    assert_eq!(server.seen.last().peer_cert, Some(client_leaf.der.clone()));

    // Graceful shutdown returns cleanly and closes the listening socket.
    drop(channel);
    server.stop().await.unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn uri_san_on_allow_list_is_served() {
    let dir = common::tempdir();
    let ca = Ca::new("ca");
    let spiffe = "spiffe://cluster.local/ns/kube-system/sa/cloud-controller-manager";
    let server = TestServer::start_tls(server_tls(
        write_files(dir.path(), "server", &ca.leaf(&["localhost"]), &ca.pem),
        &[spiffe],
    ))
    .await;
    let client = client_tls(write_files(
        dir.path(),
        "client",
        &ca.leaf_uri(spiffe),
        &ca.pem,
    ));

    check(channel(&server.uri(), &client)).await.unwrap();
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let logs = LogCapture::default();
    let _guard = logs.install();
    let dir = common::tempdir();
    let ca = Ca::new("ca");
    let server = TestServer::start_tls(server_tls(
        write_files(dir.path(), "server", &ca.leaf(&["localhost"]), &ca.pem),
        &[],
    ))
    .await;

    let anonymous = raw_channel(
        server.addr.unwrap(),
        common::anonymous_client_config(&ca.pem),
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
    let dir = common::tempdir();
    let ca = Ca::new("ca");
    let rogue_ca = Ca::new("rogue ca");
    let server = TestServer::start_tls(server_tls(
        write_files(dir.path(), "server", &ca.leaf(&["localhost"]), &ca.pem),
        &[],
    ))
    .await;
    // Trusts the real server, but its own certificate (same SAN) is from another CA.
    let rogue = client_tls(write_files(
        dir.path(),
        "rogue",
        &rogue_ca.leaf(&[CCM]),
        &ca.pem,
    ));
    let legit = client_tls(write_files(dir.path(), "client", &ca.leaf(&[CCM]), &ca.pem));

    assert!(check(channel(&server.uri(), &rogue)).await.is_err());
    check(channel(&server.uri(), &legit)).await.unwrap();
}

#[tokio::test]
async fn client_san_not_on_allow_list_is_refused() {
    let logs = LogCapture::default();
    let _guard = logs.install();
    let dir = common::tempdir();
    let ca = Ca::new("ca");
    let server = TestServer::start_tls(server_tls(
        write_files(dir.path(), "server", &ca.leaf(&["localhost"]), &ca.pem),
        &[CCM],
    ))
    .await;
    let intruder = client_tls(write_files(
        dir.path(),
        "intruder",
        &ca.leaf(&["intruder.default"]),
        &ca.pem,
    ));
    let legit = client_tls(write_files(dir.path(), "client", &ca.leaf(&[CCM]), &ca.pem));

    assert!(check(channel(&server.uri(), &intruder)).await.is_err());
    check(channel(&server.uri(), &legit)).await.unwrap();
    let logs = logs.contents();
    assert!(
        logs.lines().any(|line| line.contains("WARN")
            && line.contains("client certificate SANs [\"intruder.default\"] not in allow-list [\"ccm.kube-system\"]")),
        "no clear warning in logs:\n{logs}"
    );
}

#[tokio::test]
async fn empty_allow_list_accepts_any_cert_from_ca() {
    let dir = common::tempdir();
    let ca = Ca::new("ca");
    let server = TestServer::start_tls(server_tls(
        write_files(dir.path(), "server", &ca.leaf(&["localhost"]), &ca.pem),
        &[],
    ))
    .await;
    let anyone = client_tls(write_files(
        dir.path(),
        "client",
        &ca.leaf(&["whoever.example"]),
        &ca.pem,
    ));

    check(channel(&server.uri(), &anyone)).await.unwrap();
}

#[tokio::test]
async fn client_refuses_server_with_wrong_ca() {
    let dir = common::tempdir();
    let ca = Ca::new("ca");
    let impostor_ca = Ca::new("impostor ca");
    // The impostor accepts our client certificate but presents one from a CA we do not trust.
    let impostor = TestServer::start_tls(server_tls(
        write_files(
            dir.path(),
            "impostor",
            &impostor_ca.leaf(&["localhost"]),
            &ca.pem,
        ),
        &[],
    ))
    .await;
    let client = client_tls(write_files(dir.path(), "client", &ca.leaf(&[CCM]), &ca.pem));

    let err = check(channel(&impostor.uri(), &client)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    let refused = presented_cert(impostor.addr.unwrap(), client.current_config()).await;
    let refused = refused.unwrap_err().to_string();
    assert!(refused.contains("UnknownIssuer"), "{refused}");
}

#[tokio::test]
async fn rotated_server_certificate_is_used_without_restart() {
    let dir = common::tempdir();
    let old_ca = Ca::new("old ca");
    let new_ca = Ca::new("new ca");
    let old_server_leaf = old_ca.leaf(&["localhost"]);
    let server_files = write_files(dir.path(), "server", &old_server_leaf, &old_ca.pem);
    let server = TestServer::start_tls(server_tls(server_files.clone(), &[CCM])).await;
    let client_files = write_files(dir.path(), "client", &old_ca.leaf(&[CCM]), &old_ca.pem);
    let client = client_tls(client_files.clone());

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
        old_server_leaf.der.as_slice()
    );

    // Rotate to a new CA: the server trusts both CAs for clients during the transition.
    let new_server_leaf = new_ca.leaf(&["localhost"]);
    replace(&server_files.key, &new_server_leaf.key_pem);
    replace(&server_files.cert, &new_server_leaf.cert_pem);
    replace(&server_files.ca, &format!("{}{}", old_ca.pem, new_ca.pem));
    let new_client_leaf = new_ca.leaf(&[CCM]);
    replace(&client_files.key, &new_client_leaf.key_pem);
    replace(&client_files.cert, &new_client_leaf.cert_pem);
    replace(&client_files.ca, &new_ca.pem);

    let addr = server.addr.unwrap();
    eventually(
        "server presents the new certificate to a reloaded client",
        || {
            let config = client.current_config();
            let expected = new_server_leaf.der.clone();
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
    let dir = common::tempdir();
    let old_ca = Ca::new("old ca");
    let new_ca = Ca::new("new ca");
    let server_files = write_files(
        dir.path(),
        "server",
        &old_ca.leaf(&["localhost"]),
        &old_ca.pem,
    );
    let server = TestServer::start_tls(server_tls(server_files.clone(), &[CCM])).await;
    let old_client = client_tls(write_files(
        dir.path(),
        "old-client",
        &old_ca.leaf(&[CCM]),
        &old_ca.pem,
    ));
    let new_client = client_tls(write_files(
        dir.path(),
        "new-client",
        &new_ca.leaf(&[CCM]),
        &old_ca.pem,
    ));
    check(channel(&server.uri(), &old_client)).await.unwrap();
    assert!(check(channel(&server.uri(), &new_client)).await.is_err());

    replace(&server_files.ca, &new_ca.pem);

    let uri = server.uri();
    eventually("old client refused on a new connection", || {
        let channel = channel(&uri, &old_client);
        async move { check(channel).await.is_err() }
    })
    .await;
    check(channel(&server.uri(), &new_client)).await.unwrap();
}

#[tokio::test]
async fn half_written_file_keeps_previous_material() {
    let logs = LogCapture::default();
    let _guard = logs.install();
    let dir = common::tempdir();
    let ca = Ca::new("ca");
    let old_leaf = ca.leaf(&["localhost"]);
    let server_files = write_files(dir.path(), "server", &old_leaf, &ca.pem);
    let server = TestServer::start_tls(server_tls(server_files.clone(), &[CCM])).await;
    let client = client_tls(write_files(dir.path(), "client", &ca.leaf(&[CCM]), &ca.pem));
    let addr = server.addr.unwrap();
    let presented = || async { presented_cert(addr, client.current_config()).await.unwrap() };
    assert_eq!(presented().await.as_ref(), old_leaf.der.as_slice());

    // New key written first: it does not match the old certificate.
    let new_leaf = ca.leaf(&["localhost"]);
    std::fs::write(&server_files.key, &new_leaf.key_pem).unwrap();
    eventually("mismatch reported", || {
        let logs = logs.clone();
        async move { logs.contents().contains("does not match the certificate") }
    })
    .await;
    assert_eq!(presented().await.as_ref(), old_leaf.der.as_slice());
    check(channel(&server.uri(), &client)).await.unwrap();

    // Certificate caught half-way through being written.
    let half = &new_leaf.cert_pem[..new_leaf.cert_pem.len() / 2];
    std::fs::write(&server_files.cert, half).unwrap();
    eventually("half-written certificate reported", || {
        let logs = logs.clone();
        async move { logs.contents().contains("is not valid PEM") }
    })
    .await;
    tokio::time::sleep(common::RELOAD * 3).await;
    assert_eq!(presented().await.as_ref(), old_leaf.der.as_slice());
    check(channel(&server.uri(), &client)).await.unwrap();

    // Once the write completes, the next poll picks the new material up.
    std::fs::write(&server_files.cert, &new_leaf.cert_pem).unwrap();
    eventually("new certificate presented", || async {
        presented().await.as_ref() == new_leaf.der.as_slice()
    })
    .await;
    check(channel(&server.uri(), &client)).await.unwrap();
}
