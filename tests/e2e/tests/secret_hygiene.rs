//! Secret hygiene: with `RUST_LOG=trace`, a kubeconfig carrying a bearer token inline, and a
//! kubeconfig whose credential plugin fails printing secrets, no token, plugin output or key
//! material appears in the controller-manager's logs, in the Events it writes, in
//! `/healthz?verbose` or in the secure port's error bodies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use e2e_tests::write_inventory;
use k8s_openapi::api::core::v1::{Event, Node};
use kube::api::{Api, ListParams};
use test_control_plane::ControlPlane;
use test_pki::{Ca, write_atomic};
use test_support::{Process, free_port, https_get, tls_connector, wait_for};

/// What the failing credential plugin prints and is called with.
const PLUGIN_SECRET: &str = "plugin-secret-6c1f0e";
const PLUGIN_ARG_SECRET: &str = "--password=arg-secret-93b2";

/// A kubeconfig with the admin token inline.
fn token_kubeconfig(cp: &ControlPlane, dir: &Path, token: &str) -> PathBuf {
    let yaml = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: x\n  context: {{cluster: c, user: u}}\ncurrent-context: x\n",
        cp.server_url(),
        cp.ca_file().display()
    );
    let path = dir.join("token.kubeconfig");
    std::fs::write(&path, yaml).unwrap();
    path
}

/// A kubeconfig whose credential plugin prints secrets and fails.
fn failing_plugin_kubeconfig(cp: &ControlPlane, dir: &Path) -> PathBuf {
    let plugin = dir.join("credential-plugin.sh");
    std::fs::write(
        &plugin,
        format!("#!/bin/sh\necho '{{\"token\": \"{PLUGIN_SECRET}\"}}'\necho '{PLUGIN_SECRET} on stderr' >&2\nexit 3\n"),
    )
    .unwrap();
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&plugin)
        .status()
        .unwrap();
    let yaml = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: u\n  user:\n    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: {}\n      args: [\"{PLUGIN_ARG_SECRET}\"]\n      interactiveMode: Never\ncontexts:\n- name: x\n  context: {{cluster: c, user: u}}\ncurrent-context: x\n",
        cp.server_url(),
        cp.ca_file().display(),
        plugin.display()
    );
    let path = dir.join("plugin.kubeconfig");
    std::fs::write(&path, yaml).unwrap();
    path
}

/// One HTTPS GET to the secure port; the whole answer.
async fn get(port: u16, ca: &Ca, path: &str, token: Option<&str>) -> String {
    let connector = tls_connector(ca.cert_der()).unwrap();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    https_get(&connector, addr, path, token).await.unwrap().1
}

/// Fails naming where `secret` was found.
fn assert_absent(secret: &str, place: &str, text: &str) {
    assert!(
        !text.contains(secret),
        "{secret:?} appears in {place}:\n{}",
        text.lines()
            .filter(|l| l.contains(secret))
            .take(5)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

fn spawn(
    cp: &ControlPlane,
    kubeconfig: &Path,
    socket: &Path,
    extra: &[String],
    dir: &Path,
    label: &str,
) -> Process {
    let _ = cp;
    let mut args = vec![
        format!("--kubeconfig={}", arg(kubeconfig)),
        format!("--provider-endpoint=unix://{}", arg(socket)),
        "--leader-elect-resource-name=ccm-hygiene".into(),
        "--leader-elect-retry-period=1s".into(),
        "--controllers=cloud-node".into(),
    ];
    args.extend_from_slice(extra);
    Process::for_workspace_binary("cloud-controller-manager", label, dir)
        .unwrap()
        .args(&args)
        .envs([("RUST_LOG", "trace".to_string())])
        .spawn()
        .unwrap()
}

#[tokio::test]
async fn no_credentials_in_logs_events_or_bodies() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (cp, client, dir) = start_control_plane().await;
    let d = dir.path();
    let inventory = write_inventory(d, INVENTORY).unwrap();
    let (_shim, socket) = spawn_local_shim_unix(d, &inventory, &[], &[]);
    let token = cp.admin_token().unwrap();

    // 1. A working manager with an inline token, traced at the finest level.
    let ca = Ca::new("hygiene").unwrap();
    let leaf = ca.issue(&["localhost", "127.0.0.1"]).unwrap();
    let (cert, key) = (d.join("serving.crt"), d.join("serving.key"));
    write_atomic(&cert, leaf.chain_pem.as_bytes(), false).unwrap();
    write_atomic(&key, leaf.key_pem.as_bytes(), true).unwrap();
    let port = free_port().unwrap();
    let ccm = spawn(
        &cp,
        &token_kubeconfig(&cp, d, &token),
        &socket,
        &[
            format!("--secure-port={port}"),
            "--bind-address=127.0.0.1".into(),
            format!("--tls-cert-file={}", arg(&cert)),
            format!("--tls-private-key-file={}", arg(&key)),
        ],
        d,
        "ccm-token",
    );
    create_tainted_node(&client, "node-a").await;
    let nodes: Api<Node> = Api::all(client.clone());
    wait_initialised(&nodes, "node-a", Duration::from_secs(60))
        .await
        .unwrap();
    // A node whose machine is unknown fails to initialise: its error text reaches an Event.
    create_tainted_node(&client, "node-unknown").await;
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let events_ref = &events;
    wait_for(
        "a FailedToInitialize event",
        Duration::from_secs(30),
        || async move {
            let list = events_ref
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?;
            if list
                .items
                .iter()
                .any(|e| e.reason.as_deref() == Some("FailedToInitialize"))
            {
                Ok(())
            } else {
                Err("none yet".to_string())
            }
        },
    )
    .await
    .unwrap();
    let bodies = [
        get(port, &ca, "/healthz?verbose", None).await,
        get(port, &ca, "/readyz?verbose", None).await,
        get(port, &ca, "/metrics", Some("not-a-token")).await,
        get(port, &ca, "/metrics", None).await,
    ]
    .join("\n");
    let all_events =
        serde_json::to_string(&events.list(&ListParams::default()).await.unwrap().items).unwrap();
    let key_material = leaf.key_pem.lines().nth(1).unwrap().to_string();
    for (place, text) in [
        ("the logs", ccm.logs()),
        ("the Events", all_events),
        ("the secure port's answers", bodies),
    ] {
        assert_absent(&token, place, &text);
        assert_absent(&key_material, place, &text);
        assert_absent("PRIVATE KEY", place, &text);
    }
    drop(ccm);

    // 2. A credential plugin that fails printing secrets: the manager says it failed, and
    // what it printed or was called with appears nowhere.
    let failing = spawn(
        &cp,
        &failing_plugin_kubeconfig(&cp, d),
        &socket,
        &["--secure-port=0".into()],
        d,
        "ccm-plugin",
    );
    let failing_ref = &failing;
    wait_for(
        "the plugin failure to be logged",
        Duration::from_secs(30),
        || {
            let logs = failing_ref.logs();
            let logged = logs.contains("credential plugin failed");
            let tail: String = logs.lines().rev().take(6).collect::<Vec<_>>().join("\n");
            async move { if logged { Ok(()) } else { Err(tail) } }
        },
    )
    .await
    .unwrap();
    let logs = failing.logs();
    assert_absent(PLUGIN_SECRET, "the logs", &logs);
    assert_absent(PLUGIN_ARG_SECRET, "the logs", &logs);
}
