//! [`ServingTls`]: server-only TLS (no client certificate asked for) whose certificate is
//! reloaded from disk, keeping the last good one when a bad file is written.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use cpi_transport::ServingTls;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig};
use rustls::{ServerConnection, crypto::ring::default_provider};
use test_pki::{Ca, Pki, write_atomic};

/// A client trusting only `ca` and presenting no certificate.
fn client_trusting(ca: &Ca) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca.cert_der().to_vec()))
        .unwrap();
    let config = ClientConfig::builder_with_provider(Arc::new(default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// Moves everything `from` wants to send into `to` and lets `to` process it.
fn transfer(from: &mut Connection, to: &mut Connection) -> Result<(), rustls::Error> {
    let mut buf = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut buf).unwrap();
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        to.read_tls(&mut rd).unwrap();
        to.process_new_packets()?;
    }
    Ok(())
}

/// An in-memory handshake of a client trusting only `ca` against `server`.
fn handshake(server: Arc<ServerConfig>, ca: &Ca) -> Result<(), rustls::Error> {
    let name = ServerName::try_from("localhost").unwrap();
    let mut client: Connection = ClientConnection::new(client_trusting(ca), name)
        .unwrap()
        .into();
    let mut server: Connection = ServerConnection::new(server).unwrap().into();
    for _ in 0..10 {
        transfer(&mut client, &mut server)?;
        transfer(&mut server, &mut client)?;
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok(());
        }
    }
    Err(rustls::Error::General("handshake did not finish".into()))
}

/// Polls `check` for up to 5 s.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn serves_without_client_auth_and_picks_up_a_rotated_certificate() {
    let pki = Pki::new().unwrap();
    let (ca1, ca2) = (Ca::new("ca1").unwrap(), Ca::new("ca2").unwrap());
    let leaf1 = ca1.issue(&["localhost"]).unwrap();
    let (cert, key) = (pki.path().join("tls.crt"), pki.path().join("tls.key"));
    write_atomic(&cert, leaf1.chain_pem.as_bytes(), false).unwrap();
    write_atomic(&key, leaf1.key_pem.as_bytes(), true).unwrap();

    let serving = ServingTls::new(
        cert.clone(),
        key.clone(),
        vec![b"http/1.1".to_vec()],
        Duration::from_millis(20),
    )
    .unwrap();
    let before = serving.current_config();
    assert_eq!(before.alpn_protocols, vec![b"http/1.1".to_vec()]);
    // The client presents no certificate and is still accepted.
    handshake(Arc::clone(&before), &ca1).unwrap();
    handshake(Arc::clone(&before), &ca2).unwrap_err();

    let leaf2 = ca2.issue(&["localhost"]).unwrap();
    write_atomic(&key, leaf2.key_pem.as_bytes(), true).unwrap();
    write_atomic(&cert, leaf2.chain_pem.as_bytes(), false).unwrap();
    eventually("the CA2 certificate to be served", || {
        handshake(serving.current_config(), &ca2).is_ok()
    });
    handshake(serving.current_config(), &ca1).unwrap_err();
    // A configuration taken before the rotation (an established connection's) is unchanged.
    handshake(before, &ca1).unwrap();
}

#[test]
fn keeps_the_last_good_certificate_when_a_bad_one_is_written() {
    let pki = Pki::new().unwrap();
    let ca = Ca::new("ca").unwrap();
    let leaf = ca.issue(&["localhost"]).unwrap();
    let other = ca.issue(&["localhost"]).unwrap();
    let (cert, key) = (pki.path().join("tls.crt"), pki.path().join("tls.key"));
    write_atomic(&cert, leaf.chain_pem.as_bytes(), false).unwrap();
    write_atomic(&key, leaf.key_pem.as_bytes(), true).unwrap();
    let serving =
        ServingTls::new(cert.clone(), key, Vec::new(), Duration::from_millis(20)).unwrap();
    let good = serving.current_config();

    // A certificate whose key is not in the key file: rejected, the old config stays.
    write_atomic(&cert, other.chain_pem.as_bytes(), false).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(Arc::ptr_eq(&good, &serving.current_config()));
    // Garbage: likewise.
    write_atomic(&cert, b"-----BEGIN CERTIFICATE-----\nnot base64", false).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(Arc::ptr_eq(&good, &serving.current_config()));
    handshake(serving.current_config(), &ca).unwrap();

    // The good files again (same contents as at start, but changed since the last attempt).
    write_atomic(&cert, leaf.chain_pem.as_bytes(), false).unwrap();
    eventually("the good certificate to be rebuilt", || {
        !Arc::ptr_eq(&good, &serving.current_config())
    });
    handshake(serving.current_config(), &ca).unwrap();
}

#[test]
fn missing_files_fail_fast() {
    let pki = Pki::new().unwrap();
    let err = ServingTls::new(
        pki.path().join("absent.crt"),
        pki.path().join("absent.key"),
        Vec::new(),
        Duration::ZERO,
    )
    .unwrap_err();
    assert!(
        matches!(err, cpi_transport::TlsError::MissingFile { .. }),
        "{err}"
    );
}
