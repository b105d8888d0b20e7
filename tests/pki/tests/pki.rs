//! Tests of the throwaway PKI: certificate contents (parsed back with x509-parser), real TLS
//! handshakes with rustls, and the file helpers used by rotation tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::IpAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use test_pki::{Ca, Error, Leaf, LeafSpec, Pki, ca_bundle, rewrite_in_place, write_atomic};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn parse(der: &[u8]) -> X509Certificate<'_> {
    let (rest, cert) = X509Certificate::from_der(der).expect("certificate parses");
    assert!(rest.is_empty(), "trailing bytes after certificate");
    cert
}

fn pem_to_der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[test]
fn issued_leaf_parses_with_typed_sans_and_both_ekus() {
    let ca = Ca::new("unit-ca").unwrap();
    let leaf = ca
        .issue(&["localhost", "127.0.0.1", "::1", "spiffe://ccm/provider"])
        .unwrap();
    assert_eq!(pem_to_der(&leaf.cert_pem), leaf.cert_der);
    assert!(leaf.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));

    let cert = parse(&leaf.cert_der);
    let sans = &cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names;
    let mut dns = Vec::new();
    let mut ips = Vec::new();
    let mut uris = Vec::new();
    for san in sans {
        match san {
            GeneralName::DNSName(d) => dns.push(d.to_string()),
            GeneralName::IPAddress(b) => ips.push(match b.len() {
                4 => IpAddr::from(<[u8; 4]>::try_from(*b).unwrap()),
                16 => IpAddr::from(<[u8; 16]>::try_from(*b).unwrap()),
                n => panic!("IP SAN of {n} bytes"),
            }),
            GeneralName::URI(u) => uris.push(u.to_string()),
            other => panic!("unexpected SAN {other:?}"),
        }
    }
    assert_eq!(dns, ["localhost"]);
    assert_eq!(
        ips,
        [
            "127.0.0.1".parse::<IpAddr>().unwrap(),
            "::1".parse().unwrap()
        ]
    );
    assert_eq!(uris, ["spiffe://ccm/provider"]);

    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(!cert.is_ca());
    assert_eq!(cert.issuer(), parse(ca.cert_der()).subject());
    let now = now_secs();
    assert!(cert.validity().not_before.timestamp() < now);
    assert!(cert.validity().not_after.timestamp() > now);
    assert_eq!(
        cert.subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap(),
        "localhost"
    );
}

#[test]
fn ca_certificate_is_a_ca_with_its_name() {
    let ca = Ca::new("my test ca").unwrap();
    assert_eq!(ca.name(), "my test ca");
    assert_eq!(pem_to_der(ca.cert_pem()), ca.cert_der());
    let cert = parse(ca.cert_der());
    assert!(cert.is_ca());
    assert_eq!(cert.subject(), cert.issuer(), "root is self-signed");
    assert_eq!(
        cert.subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap(),
        "my test ca"
    );
    assert!(ca.key_pem().starts_with("-----BEGIN PRIVATE KEY-----"));
}

#[test]
fn expired_and_not_yet_valid_leaves_have_windows_off_now() {
    let ca = Ca::new("unit-ca").unwrap();
    let now = now_secs();
    let expired = parse(&ca.issue_expired(&["localhost"]).unwrap().cert_der)
        .validity()
        .clone();
    assert!(expired.not_after.timestamp() < now);
    assert!(expired.not_before.timestamp() < expired.not_after.timestamp());
    let future = parse(&ca.issue_not_yet_valid(&["localhost"]).unwrap().cert_der)
        .validity()
        .clone();
    assert!(future.not_before.timestamp() > now);
}

#[test]
fn client_leaf_carries_kubernetes_identity() {
    let ca = Ca::new("unit-ca").unwrap();
    let leaf = ca
        .issue_client(
            "system:cloud-controller-manager",
            &["system:masters", "ccm"],
        )
        .unwrap();
    let cert = parse(&leaf.cert_der);
    let subject = cert.subject();
    assert_eq!(
        subject.iter_common_name().next().unwrap().as_str().unwrap(),
        "system:cloud-controller-manager"
    );
    let orgs: Vec<_> = subject
        .iter_organization()
        .map(|o| o.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(orgs, ["system:masters", "ccm"]);
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth);

    assert!(matches!(
        ca.issue_client("u", &["a", "b", "c"]),
        Err(Error::TooManyOrganizations(3))
    ));
}

#[test]
fn invalid_inputs_are_errors_not_panics() {
    let ca = Ca::new("unit-ca").unwrap();
    assert!(matches!(
        ca.issue(&["bücher.example"]),
        Err(Error::InvalidSan { .. })
    ));
    let now = SystemTime::now();
    assert!(matches!(
        ca.issue_with(&LeafSpec::new(&["x"]).valid(now, now)),
        Err(Error::InvalidValidity { .. })
    ));
}

#[test]
fn intermediate_chain_is_included_in_leaf_chain() {
    let root = Ca::new("root").unwrap();
    let mid = root.intermediate("mid").unwrap();
    let leaf = mid.issue(&["localhost"]).unwrap();
    let chain: Vec<_> = CertificateDer::pem_slice_iter(leaf.chain_pem.as_bytes())
        .map(|c| c.unwrap().to_vec())
        .collect();
    assert_eq!(chain, [leaf.cert_der.clone(), mid.cert_der().to_vec()]);
    assert_eq!(
        parse(mid.cert_der()).issuer(),
        parse(root.cert_der()).subject()
    );
    let direct = root.issue(&["x"]).unwrap();
    assert_eq!(
        direct.chain_pem, direct.cert_pem,
        "root-issued chain is the leaf alone"
    );
}

// --- real handshakes -------------------------------------------------------------------------

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(bundle_pem: &str) -> Arc<RootCertStore> {
    let mut store = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()) {
        store.add(cert.unwrap()).unwrap();
    }
    Arc::new(store)
}

fn chain_and_key(leaf: &Leaf) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let chain = CertificateDer::pem_slice_iter(leaf.chain_pem.as_bytes())
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
    (chain, key)
}

/// Runs a full in-memory TLS 1.3 handshake; mutual when `client` and `client_roots` are given.
fn handshake(
    server: &Leaf,
    server_name: &str,
    client_trust: &str,
    client: Option<(&Leaf, &str)>,
) -> Result<(), rustls::Error> {
    let (chain, key) = chain_and_key(server);
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap();
    let server_config = match client {
        Some((_, server_trust)) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(roots(server_trust), provider())
                    .build()
                    .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    }
    .with_single_cert(chain, key)
    .unwrap();
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(client_trust));
    let client_config = match client {
        Some((leaf, _)) => {
            let (chain, key) = chain_and_key(leaf);
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    let name = ServerName::try_from(server_name.to_owned()).unwrap();
    let mut c = ClientConnection::new(Arc::new(client_config), name).unwrap();
    let mut s = ServerConnection::new(Arc::new(server_config)).unwrap();
    for _ in 0..10 {
        if !c.is_handshaking() && !s.is_handshaking() {
            return Ok(());
        }
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            s.read_tls(&mut buf.as_slice()).unwrap();
            s.process_new_packets()?;
        }
        let mut buf = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            c.read_tls(&mut buf.as_slice()).unwrap();
            c.process_new_packets()?;
        }
    }
    panic!("handshake did not finish");
}

#[test]
fn mutual_tls_handshake_succeeds_with_issued_certificates() {
    let ca = Ca::new("mtls-ca").unwrap();
    let server = ca.issue(&["localhost", "127.0.0.1"]).unwrap();
    let client = ca.issue_client("ccm", &[]).unwrap();
    handshake(
        &server,
        "localhost",
        ca.cert_pem(),
        Some((&client, ca.cert_pem())),
    )
    .unwrap();
    handshake(&server, "127.0.0.1", ca.cert_pem(), None).unwrap();
}

#[test]
fn handshake_through_intermediate_and_bundle_succeeds() {
    let root = Ca::new("root").unwrap();
    let mid = root.intermediate("mid").unwrap();
    let other = Ca::new("other").unwrap();
    let server = mid.issue(&["provider.local"]).unwrap();
    let client = mid.issue(&["spiffe://ccm/controller"]).unwrap();
    let trust = ca_bundle(&[&other, &root]);
    handshake(&server, "provider.local", &trust, Some((&client, &trust))).unwrap();
}

#[test]
fn handshake_rejects_expired_wrong_name_and_foreign_client() {
    let ca = Ca::new("mtls-ca").unwrap();
    let other = Ca::new("other-ca").unwrap();

    let expired = ca.issue_expired(&["localhost"]).unwrap();
    let err = handshake(&expired, "localhost", ca.cert_pem(), None).unwrap_err();
    assert!(
        format!("{err:?}").contains("Expired"),
        "expired server cert: {err:?}"
    );

    let server = ca.issue(&["localhost"]).unwrap();
    let err = handshake(&server, "elsewhere.example", ca.cert_pem(), None).unwrap_err();
    assert!(format!("{err:?}").contains("NotValidForName"), "{err:?}");

    let err = handshake(&server, "localhost", other.cert_pem(), None).unwrap_err();
    assert!(format!("{err:?}").contains("UnknownIssuer"), "{err:?}");

    let foreign_client = other.issue_client("intruder", &[]).unwrap();
    let err = handshake(
        &server,
        "localhost",
        ca.cert_pem(),
        Some((&foreign_client, ca.cert_pem())),
    )
    .unwrap_err();
    assert!(format!("{err:?}").contains("UnknownIssuer"), "{err:?}");
}

// --- files -----------------------------------------------------------------------------------

#[test]
fn tls_files_are_written_rotated_and_rewritten() {
    let ca = Ca::new("files-ca").unwrap();
    let pki = Pki::new().unwrap();
    let first = ca.issue(&["localhost"]).unwrap();
    let files = pki
        .write_tls_files("server", &first, ca.cert_pem())
        .unwrap();
    assert_eq!(files.cert, pki.path().join("server.crt"));
    assert_eq!(files.key, pki.path().join("server.key"));
    assert_eq!(files.ca, pki.path().join("server-ca.crt"));
    assert_eq!(
        std::fs::read_to_string(&files.cert).unwrap(),
        first.chain_pem
    );
    assert_eq!(std::fs::read_to_string(&files.key).unwrap(), first.key_pem);
    assert_eq!(std::fs::read_to_string(&files.ca).unwrap(), ca.cert_pem());
    let mode = std::fs::metadata(&files.key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "private key is owner-only");

    // Atomic rotation: new contents, new inode, no temp files left behind.
    let inode_before = std::fs::metadata(&files.cert).unwrap().ino();
    let second = ca.issue(&["localhost"]).unwrap();
    let new_ca = Ca::new("files-ca-2").unwrap();
    files.rotate(&second, &ca_bundle(&[&ca, &new_ca])).unwrap();
    assert_eq!(
        std::fs::read_to_string(&files.cert).unwrap(),
        second.chain_pem
    );
    assert_eq!(std::fs::read_to_string(&files.key).unwrap(), second.key_pem);
    assert_eq!(
        std::fs::read_to_string(&files.ca).unwrap(),
        format!("{}{}", ca.cert_pem(), new_ca.cert_pem())
    );
    assert_ne!(std::fs::metadata(&files.cert).unwrap().ino(), inode_before);
    let names: Vec<_> = std::fs::read_dir(pki.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 3, "only the three files remain: {names:?}");

    // In-place rewrite keeps the inode.
    let inode = std::fs::metadata(&files.cert).unwrap().ino();
    rewrite_in_place(&files.cert, first.chain_pem.as_bytes()).unwrap();
    assert_eq!(std::fs::metadata(&files.cert).unwrap().ino(), inode);
    assert_eq!(
        std::fs::read_to_string(&files.cert).unwrap(),
        first.chain_pem
    );

    let extra = pki.write("bundle.pem", b"data").unwrap();
    assert_eq!(std::fs::read(&extra).unwrap(), b"data");
    write_atomic(&extra, b"other", false).unwrap();
    assert_eq!(std::fs::read(&extra).unwrap(), b"other");

    let dir = pki.path().to_path_buf();
    drop(pki);
    assert!(!dir.exists(), "temp dir removed on drop");
}
