//! `ccm_certgen::run` against a real API server: it makes the Secrets, changes nothing on a
//! second run, re-issues the leaves (and only them) once they are within the renewal window,
//! and never touches a Secret another party made.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use ccm_certgen::{Config, LeafSpec, Policy, Usage, run};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, ObjectMeta, PostParams};
use test_control_plane::{ControlPlane, unique_name};

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

fn config(namespace: &str) -> Config {
    let leaf = |secret: &str, name: &str, usage| LeafSpec {
        secret: secret.into(),
        names: vec![name.into()],
        usage,
    };
    Config {
        namespace: namespace.into(),
        ca_secret: "ca".into(),
        leaves: vec![
            leaf("server", "server.example.svc", Usage::Server),
            leaf("client", "client", Usage::Client),
            leaf("theirs", "theirs", Usage::Client),
        ],
        webhook_configuration: None,
        webhook_serving_secret: None,
        webhook_wait: Duration::ZERO,
        policy: Policy::default(),
    }
}

async fn versions(secrets: &Api<Secret>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for name in ["ca", "server", "client", "theirs"] {
        let secret = secrets.get(name).await.unwrap();
        out.insert(name.to_owned(), secret.metadata.resource_version.unwrap());
    }
    out
}

#[tokio::test]
async fn creates_keeps_and_renews_near_expiry() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cp = ControlPlane::shared().await.expect("control plane");
    let client = cp.client().unwrap();
    let namespace = unique_name("certgen");
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(namespace.clone()),
                    ..ObjectMeta::default()
                },
                ..Namespace::default()
            },
        )
        .await
        .unwrap();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    // Made by someone else (no managed-by label), with nothing usable in it.
    let theirs = Secret {
        metadata: ObjectMeta {
            name: Some("theirs".into()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            "tls.crt".to_owned(),
            ByteString(b"not a certificate".to_vec()),
        )])),
        ..Secret::default()
    };
    secrets
        .create(&PostParams::default(), &theirs)
        .await
        .unwrap();

    let config = config(&namespace);
    let now = SystemTime::now();
    let first = run(&client, &config, now).await.unwrap();
    assert!(!first.unchanged(), "{first:?}");
    let made = versions(&secrets).await;
    for name in ["server", "client"] {
        let secret = secrets.get(name).await.unwrap();
        assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
        let data = secret.data.unwrap();
        assert_eq!(
            data["ca.crt"],
            secrets.get("ca").await.unwrap().data.unwrap()["ca.crt"]
        );
    }
    assert_eq!(
        secrets.get("theirs").await.unwrap().data,
        theirs.data,
        "a Secret ccm-certgen did not make was changed"
    );

    // Idempotent.
    let second = run(&client, &config, now).await.unwrap();
    assert!(second.unchanged(), "{second:?}");
    assert_eq!(versions(&secrets).await, made);

    // 340 days on, the year-long leaves are within the 30-day window; the CA is not.
    let later = run(&client, &config, now + 340 * DAY).await.unwrap();
    let renewed = versions(&secrets).await;
    assert_eq!(renewed["ca"], made["ca"], "{later:?}");
    assert_eq!(renewed["theirs"], made["theirs"], "{later:?}");
    for name in ["server", "client"] {
        assert_ne!(renewed[name], made[name], "{name} not renewed: {later:?}");
    }
}
