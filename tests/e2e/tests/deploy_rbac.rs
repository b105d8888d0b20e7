//! The local overlay's ServiceAccounts and RBAC are enough, and no more: with the overlay
//! applied to a real API server, tokens minted for the ServiceAccounts (TokenRequest API) let
//! the real binaries do their whole job — `ccm-certgen` makes the CA and the four TLS Secrets
//! and fills the webhook configurations' caBundle (and changes nothing when run again);
//! `local-shim` and `cloud-controller-manager`, over mutual TLS with those certificates,
//! initialise a node, give a LoadBalancer Service an ingress, take the Lease, write Events and
//! serve `/metrics` through TokenReview and SubjectAccessReview — while requests outside their
//! roles are refused with 403.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use e2e_tests::write_inventory;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Node, Secret, Service, ServiceAccount};
use kube::api::{Api, ListParams, PostParams};
use test_control_plane::ControlPlane;
use test_support::{
    Location, Process, free_port, https_get, load_balancer_service, temp_dir, tls_connector,
    wait_for, workspace_binary,
};

const WAIT: Duration = Duration::from_secs(60);
const NAMESPACE: &str = "kube-system";
const SECRETS: [&str; 5] = [
    "ccm-certgen-ca",
    "local-shim-tls",
    "cloud-controller-manager-cpi-tls",
    "cloud-provider-webhook-tls",
    "cloud-provider-webhook-cpi-tls",
];

/// A token for the ServiceAccount `name` in kube-system, from the TokenRequest API.
async fn token(admin: &kube::Client, name: &str) -> String {
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: Vec::new(),
            expiration_seconds: Some(3600),
            ..TokenRequestSpec::default()
        },
        ..TokenRequest::default()
    };
    Api::<ServiceAccount>::namespaced(admin.clone(), NAMESPACE)
        .create_token_request(name, &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("TokenRequest for {name}: {e}"))
        .status
        .unwrap()
        .token
}

/// A client authenticating with `token` only.
fn client_with(cp: &ControlPlane, token: &str) -> kube::Client {
    let mut config = cp.kube_config();
    config.auth_info = kube::config::AuthInfo {
        token: Some(token.to_owned().into()),
        ..kube::config::AuthInfo::default()
    };
    kube::Client::try_from(config).unwrap()
}

fn forbidden<T: std::fmt::Debug>(what: &str, result: Result<T, kube::Error>) {
    match result {
        Err(kube::Error::Api(status)) if status.code == 403 => {}
        other => panic!("{what}: expected 403, got {other:?}"),
    }
}

/// Runs `ccm-certgen` as the Job does, with `kubeconfig`.
fn run_certgen(kubeconfig: &Path) -> String {
    let binary = workspace_binary("ccm-certgen").expect("ccm-certgen: cargo build -p ccm-certgen");
    let output = Command::new(binary)
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .args([
            "--namespace=kube-system",
            "--ca-secret=ccm-certgen-ca",
            "--server=local-shim-tls=local-shim.kube-system.svc",
            "--server=cloud-provider-webhook-tls=cloud-provider-webhook.kube-system.svc",
            "--client=cloud-controller-manager-cpi-tls=cloud-controller-manager",
            "--client=cloud-provider-webhook-cpi-tls=cloud-provider-webhook",
            "--webhook-configuration=cloud-provider-webhook",
            "--webhook-serving-secret=cloud-provider-webhook-tls",
        ])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "ccm-certgen failed:\n{log}");
    log
}

/// The Secret's keys written as files `dir/<secret>/<key>`.
fn write_secret_files(secret: &Secret, dir: &Path) -> PathBuf {
    let out = dir.join(secret.metadata.name.as_deref().unwrap());
    std::fs::create_dir_all(&out).unwrap();
    for (key, value) in secret.data.as_ref().unwrap() {
        std::fs::write(out.join(key), &value.0).unwrap();
    }
    out
}

async fn resource_versions(secrets: &Api<Secret>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for name in SECRETS {
        let secret = secrets.get(name).await.unwrap();
        out.insert(name.to_owned(), secret.metadata.resource_version.unwrap());
    }
    out
}

#[tokio::test]
async fn service_accounts_do_their_job_and_no_more() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cp = ControlPlane::start().await.expect("control plane");
    let admin = cp.client().unwrap();
    let dir = temp_dir("ccm-e2e-rbac-", Location::System).unwrap();
    let d = dir.path();
    let overlay = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/overlays/local");
    kubectl(
        &[
            &format!("--kubeconfig={}", cp.kubeconfig_path().display()),
            "apply",
            "-k",
            &overlay.display().to_string(),
        ],
        None,
    );
    // RBAC objects reach the authorizer through a watch: wait until the manager's role works.
    test_control_plane::wait_until_nodes_listable(
        cp.client_as(CCM_USER, CCM_GROUPS).unwrap(),
        WAIT,
    )
    .await
    .unwrap();

    // ccm-certgen, as its ServiceAccount.
    let certgen_token = token(&admin, "ccm-certgen").await;
    let certgen_kubeconfig = cp.write_kubeconfig_with_token(&certgen_token).unwrap();
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), NAMESPACE);
    wait_for("ccm-certgen's RBAC", WAIT, || {
        let secrets = Api::<Secret>::namespaced(client_with(&cp, &certgen_token), NAMESPACE);
        async move {
            match secrets.get_opt("ccm-certgen-ca").await {
                Ok(_) => Ok(()),
                Err(e) => Err(e.to_string()),
            }
        }
    })
    .await
    .unwrap();
    run_certgen(&certgen_kubeconfig);
    for name in SECRETS {
        let secret = secrets.get(name).await.unwrap();
        assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"), "{name}");
        let data = secret.data.unwrap();
        for key in ["tls.crt", "tls.key", "ca.crt"] {
            assert!(data.contains_key(key), "{name} has no {key}");
        }
    }
    let serving_ca = secrets
        .get("cloud-provider-webhook-tls")
        .await
        .unwrap()
        .data
        .unwrap()["ca.crt"]
        .clone();
    let mutating = Api::<MutatingWebhookConfiguration>::all(admin.clone())
        .get("cloud-provider-webhook")
        .await
        .unwrap();
    let validating = Api::<ValidatingWebhookConfiguration>::all(admin.clone())
        .get("cloud-provider-webhook")
        .await
        .unwrap();
    for bundle in mutating
        .webhooks
        .unwrap()
        .iter()
        .map(|w| w.client_config.ca_bundle.clone())
        .chain(
            validating
                .webhooks
                .unwrap()
                .iter()
                .map(|w| w.client_config.ca_bundle.clone()),
        )
    {
        assert_eq!(
            bundle.as_ref(),
            Some(&serving_ca),
            "caBundle is not the serving CA"
        );
    }
    // Idempotent: a second run keeps every valid Secret as it is.
    let before = resource_versions(&secrets).await;
    let log = run_certgen(&certgen_kubeconfig);
    assert_eq!(
        resource_versions(&secrets).await,
        before,
        "second run changed Secrets:\n{log}"
    );
    // Outside its role: other Secrets, listing, other kinds.
    let as_certgen = client_with(&cp, &certgen_token);
    forbidden(
        "ccm-certgen reads another Secret",
        Api::<Secret>::namespaced(as_certgen.clone(), NAMESPACE)
            .get("not-its-own")
            .await,
    );
    forbidden(
        "ccm-certgen lists Secrets",
        Api::<Secret>::namespaced(as_certgen.clone(), NAMESPACE)
            .list(&ListParams::default())
            .await,
    );
    forbidden(
        "ccm-certgen reads a Secret in default",
        Api::<Secret>::namespaced(as_certgen.clone(), "default")
            .get("local-shim-tls")
            .await,
    );
    forbidden(
        "ccm-certgen lists Nodes",
        Api::<Node>::all(as_certgen)
            .list(&ListParams::default())
            .await,
    );

    // The shim and the controller-manager with ccm-certgen's certificates.
    let shim_tls = write_secret_files(&secrets.get("local-shim-tls").await.unwrap(), d);
    let ccm_tls = write_secret_files(
        &secrets
            .get("cloud-controller-manager-cpi-tls")
            .await
            .unwrap(),
        d,
    );
    let inventory = write_inventory(d, INVENTORY).unwrap();
    let lb_config = d.join("lb-config.yaml");
    std::fs::write(
        &lb_config,
        "pools:\n  - name: rbac\n    addresses: [\"127.0.71.0/28\"]\n",
    )
    .unwrap();
    let port = free_port().unwrap();
    let _shim = spawn_local_shim(
        d,
        &inventory,
        &[
            format!("--bind-address=127.0.0.1:{port}"),
            format!("--tls-cert-file={}", shim_tls.join("tls.crt").display()),
            format!(
                "--tls-private-key-file={}",
                shim_tls.join("tls.key").display()
            ),
            format!("--client-ca-file={}", shim_tls.join("ca.crt").display()),
            "--allowed-client-sans=cloud-controller-manager,cloud-provider-webhook".into(),
            "--fence-lease=kube-system/cloud-controller-manager".into(),
            "--routes=state-only".into(),
            format!("--lb-config={}", lb_config.display()),
        ],
        &[],
    );
    let ccm_token = token(&admin, "cloud-controller-manager").await;
    let secure_port = free_port().unwrap();
    let serving = cp.ca().issue(&["localhost"]).unwrap();
    std::fs::write(d.join("serving.crt"), &serving.chain_pem).unwrap();
    std::fs::write(d.join("serving.key"), &serving.key_pem).unwrap();
    let _ccm = Process::for_workspace_binary("cloud-controller-manager", "ccm", d)
        .unwrap()
        .args([
            format!(
                "--kubeconfig={}",
                cp.write_kubeconfig_with_token(&ccm_token)
                    .unwrap()
                    .display()
            ),
            format!("--provider-endpoint=https://127.0.0.1:{port}"),
            "--provider-server-name=local-shim.kube-system.svc".into(),
            format!(
                "--provider-tls-cert-file={}",
                ccm_tls.join("tls.crt").display()
            ),
            format!(
                "--provider-tls-private-key-file={}",
                ccm_tls.join("tls.key").display()
            ),
            format!("--provider-ca-file={}", ccm_tls.join("ca.crt").display()),
            "--cloud-provider=local".into(),
            "--cluster-name=rbac-cluster".into(),
            "--allocate-node-cidrs=false".into(),
            format!("--secure-port={secure_port}"),
            "--bind-address=127.0.0.1".into(),
            format!("--tls-cert-file={}", d.join("serving.crt").display()),
            format!("--tls-private-key-file={}", d.join("serving.key").display()),
        ])
        .spawn()
        .unwrap();

    create_tainted_node(&admin, "node-a").await;
    let nodes: Api<Node> = Api::all(admin.clone());
    wait_initialised(&nodes, "node-a", WAIT).await.unwrap();

    let services: Api<Service> = Api::namespaced(admin.clone(), "default");
    services
        .create(
            &PostParams::default(),
            &load_balancer_service("default", "rbac-lb", &[("TCP", 80)]),
        )
        .await
        .unwrap();
    wait_for("rbac-lb to get an ingress", WAIT, || {
        let services = services.clone();
        async move {
            let svc = services.get("rbac-lb").await.map_err(|e| e.to_string())?;
            let ingress = svc
                .status
                .and_then(|s| s.load_balancer)
                .and_then(|lb| lb.ingress)
                .unwrap_or_default();
            if ingress.is_empty() {
                Err("no ingress yet".to_string())
            } else {
                Ok(())
            }
        }
    })
    .await
    .unwrap();

    let lease = Api::<Lease>::namespaced(admin.clone(), NAMESPACE)
        .get("cloud-controller-manager")
        .await
        .unwrap();
    assert!(
        lease
            .spec
            .and_then(|s| s.holder_identity)
            .is_some_and(|h| !h.is_empty()),
        "the Lease has no holder"
    );
    wait_for("an Event from the controller-manager", WAIT, || {
        let events = Api::<Event>::all(admin.clone());
        async move {
            let list = events
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?;
            list.items
                .iter()
                .any(|e| {
                    matches!(
                        e.involved_object.name.as_deref(),
                        Some("node-a" | "rbac-lb")
                    )
                })
                .then_some(())
                .ok_or_else(|| "no event yet".to_string())
        }
    })
    .await
    .unwrap();

    // The secure port reviews a token (TokenReview) and the request (SubjectAccessReview) as
    // the manager's ServiceAccount: the admin may read /metrics, the manager's own token not.
    let connector = tls_connector(cp.ca().cert_der()).unwrap();
    let addr: SocketAddr = ([127, 0, 0, 1], secure_port).into();
    let admin_token = cp.admin_token().unwrap();
    let (code, answer) = https_get(&connector, addr, "/metrics", Some(&admin_token))
        .await
        .unwrap();
    assert_eq!(code, 200, "{answer}");
    let (code, answer) = https_get(&connector, addr, "/metrics", Some(&ccm_token))
        .await
        .unwrap();
    assert_eq!(code, 403, "{answer}");

    // Outside the manager's role.
    let as_ccm = client_with(&cp, &ccm_token);
    forbidden(
        "the manager reads a Secret",
        Api::<Secret>::namespaced(as_ccm.clone(), NAMESPACE)
            .get("local-shim-tls")
            .await,
    );
    forbidden(
        "the manager lists ConfigMaps",
        Api::<ConfigMap>::namespaced(as_ccm.clone(), NAMESPACE)
            .list(&ListParams::default())
            .await,
    );
    forbidden(
        "the manager reads a Lease outside kube-system",
        Api::<Lease>::namespaced(as_ccm.clone(), "default")
            .get("cloud-controller-manager")
            .await,
    );
    forbidden(
        "the manager deletes a Service",
        services_as(&as_ccm)
            .delete("rbac-lb", &Default::default())
            .await,
    );

    // The shim and the webhook read nothing: their accounts can do nothing.
    for account in ["local-shim", "cloud-provider-webhook"] {
        let as_account = client_with(&cp, &token(&admin, account).await);
        forbidden(
            &format!("{account} lists Nodes"),
            Api::<Node>::all(as_account.clone())
                .list(&ListParams::default())
                .await,
        );
        forbidden(
            &format!("{account} reads a Secret"),
            Api::<Secret>::namespaced(as_account, NAMESPACE)
                .get("local-shim-tls")
                .await,
        );
    }
}

fn services_as(client: &kube::Client) -> Api<Service> {
    Api::namespaced(client.clone(), "default")
}
