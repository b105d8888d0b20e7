//! Tests of the test control plane itself: it serves the API, reports actionable errors,
//! shares one instance per process, and leaves no processes or directories behind.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::version::Info;
use kube::api::{Api, PostParams};
use test_control_plane::{
    BinaryPaths, ControlPlane, ENV_ETCD, ENV_KUBE_APISERVER, ENV_KUBEBUILDER_ASSETS, Error,
    K8S_VERSION, UNPRIVILEGED_USER, unique_name, wait_until_nodes_listable,
};
use test_support::{process_alive, wait_for};

/// Set in the child process of `children_die_with_a_killed_test_process`.
const HELPER_ENV: &str = "CCM_TEST_CONTROL_PLANE_HOLDER";

fn node(name: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        ..Node::default()
    }
}

#[tokio::test]
async fn starts_and_serves_nodes() {
    let cp = ControlPlane::shared().await.unwrap();
    let nodes: Api<Node> = Api::all(cp.client().unwrap());
    let name = unique_name("node");
    nodes
        .create(&PostParams::default(), &node(&name))
        .await
        .unwrap();
    let got = nodes.get(&name).await.unwrap();
    assert_eq!(got.metadata.name.as_deref(), Some(name.as_str()));
    assert!(got.metadata.uid.is_some(), "server assigned a uid");

    // The version reported at start-up is what /version says now, and what the binary says.
    let raw: Info = cp
        .client()
        .unwrap()
        .request(http::Request::get("/version").body(Vec::new()).unwrap())
        .await
        .unwrap();
    assert!(!raw.git_version.is_empty());
    assert_eq!(raw.git_version, cp.server_version().git_version);
    let binary_says = Command::new(&cp.binaries().kube_apiserver)
        .arg("--version")
        .output()
        .unwrap();
    let binary_says = String::from_utf8_lossy(&binary_says.stdout);
    assert!(
        binary_says.contains(&raw.git_version),
        "binary reports {binary_says:?}, server {:?}",
        raw.git_version
    );
    assert!(cp.version_at_least(1, 20), "{:?}", cp.server_version());
    assert!(!cp.version_at_least(99, 0));
    eprintln!(
        "control plane {} ({}) started in {:?}",
        cp.server_url(),
        raw.git_version,
        cp.startup_duration()
    );
}

#[tokio::test]
async fn shared_instance_is_reused() {
    let (a, b) = tokio::join!(ControlPlane::shared(), ControlPlane::shared());
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(std::ptr::eq(a, b));
    assert_eq!(
        a.server_url(),
        ControlPlane::shared().await.unwrap().server_url()
    );
    // A client built on this test's runtime works even if another runtime started the instance.
    let nodes: Api<Node> = Api::all(a.client().unwrap());
    nodes.list(&Default::default()).await.unwrap();
}

#[tokio::test]
async fn kubeconfig_file_and_identities_work() {
    let cp = ControlPlane::shared().await.unwrap();

    // The kubeconfig on disk (what a spawned controller-manager reads) yields a working client.
    let kubeconfig = kube::config::Kubeconfig::read_from(cp.kubeconfig_path()).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    assert!(!config.accept_invalid_certs, "TLS is really verified");
    let nodes: Api<Node> = Api::all(kube::Client::try_from(config).unwrap());
    nodes.list(&Default::default()).await.unwrap();

    // The unprivileged user is authenticated but forbidden.
    let denied: Api<Node> = Api::all(cp.unprivileged_client().unwrap());
    match denied.list(&Default::default()).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 403, "{status:?}");
            assert!(status.message.contains(UNPRIVILEGED_USER), "{status:?}");
        }
        other => panic!("expected 403 for {UNPRIVILEGED_USER}, got {other:?}"),
    }

    // An impersonated user gains exactly what RBAC grants it.
    let user = unique_name("tests:reader");
    let as_user: Api<Node> = Api::all(cp.client_as(&user, &["tests:readers"]).unwrap());
    match as_user.list(&Default::default()).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("expected 403 for {user} before the grant, got {other:?}"),
    }
    let role_name = unique_name("node-reader");
    let admin = cp.client().unwrap();
    Api::<ClusterRole>::all(admin.clone())
        .create(
            &PostParams::default(),
            &ClusterRole {
                metadata: ObjectMeta {
                    name: Some(role_name.clone()),
                    ..ObjectMeta::default()
                },
                rules: Some(vec![PolicyRule {
                    api_groups: Some(vec![String::new()]),
                    resources: Some(vec!["nodes".to_owned()]),
                    verbs: vec!["list".to_owned()],
                    ..PolicyRule::default()
                }]),
                ..ClusterRole::default()
            },
        )
        .await
        .unwrap();
    Api::<ClusterRoleBinding>::all(admin)
        .create(
            &PostParams::default(),
            &ClusterRoleBinding {
                metadata: ObjectMeta {
                    name: Some(role_name.clone()),
                    ..ObjectMeta::default()
                },
                role_ref: RoleRef {
                    api_group: "rbac.authorization.k8s.io".to_owned(),
                    kind: "ClusterRole".to_owned(),
                    name: role_name,
                },
                subjects: Some(vec![Subject {
                    kind: "User".to_owned(),
                    name: user.clone(),
                    ..Subject::default()
                }]),
            },
        )
        .await
        .unwrap();
    let granted = wait_until_nodes_listable(
        cp.client_as(&user, &["tests:readers"]).unwrap(),
        Duration::from_secs(10),
    )
    .await
    .is_ok();
    assert!(granted, "RBAC grant to {user} took effect");

    // A kubeconfig file with impersonation behaves the same.
    let path = cp.write_kubeconfig_as(&user, &[]).unwrap();
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&path).unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    let via_file: Api<Node> = Api::all(kube::Client::try_from(config).unwrap());
    via_file.list(&Default::default()).await.unwrap();
    // An existing node, so that only RBAC (get was not granted) can refuse it, not a 404.
    let existing = unique_name("node");
    Api::<Node>::all(cp.client().unwrap())
        .create(&PostParams::default(), &node(&existing))
        .await
        .unwrap();
    match via_file.get(&existing).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 403, "get was not granted: {status:?}")
        }
        other => panic!("expected 403 for get as {user}, got {other:?}"),
    }
}

#[tokio::test]
async fn client_certificates_from_the_ca_authenticate() {
    let cp = ControlPlane::shared().await.unwrap();
    let leaf = cp
        .ca()
        .issue_client("tests:cert-admin", &["system:masters"])
        .unwrap();
    let pki = test_pki::Pki::new().unwrap();
    let files = pki
        .write_tls_files("client", &leaf, cp.ca().cert_pem())
        .unwrap();
    let mut config = kube::Config::new(cp.server_url().parse().unwrap());
    config.root_cert = Some(vec![cp.ca().cert_der().to_vec()]);
    config.auth_info.client_certificate = Some(files.cert.display().to_string());
    config.auth_info.client_key = Some(files.key.display().to_string());
    let nodes: Api<Node> = Api::all(kube::Client::try_from(config).unwrap());
    nodes.list(&Default::default()).await.unwrap();
}

#[test]
fn missing_binaries_give_actionable_error() {
    let empty = tempfile::tempdir().unwrap();
    let env: HashMap<&str, OsString> = HashMap::from([
        (ENV_KUBEBUILDER_ASSETS, empty.path().as_os_str().to_owned()),
        ("HOME", empty.path().as_os_str().to_owned()),
    ]);
    let err = BinaryPaths::discover_from(|k| env.get(k).cloned()).unwrap_err();
    assert!(matches!(err, Error::BinariesNotFound { .. }), "{err:?}");
    let msg = err.to_string();
    for needle in [
        "bash tests/control-plane/provision.sh",
        ENV_KUBEBUILDER_ASSETS,
        ENV_KUBE_APISERVER,
        ENV_ETCD,
        K8S_VERSION,
        &empty.path().join("kube-apiserver").display().to_string(),
        &empty.path().join("etcd").display().to_string(),
        "does not exist",
    ] {
        assert!(msg.contains(needle), "{needle:?} missing from: {msg}");
    }

    // The same error comes out of start_with, before anything is spawned.
    let missing = BinaryPaths {
        kube_apiserver: empty.path().join("kube-apiserver"),
        etcd: empty.path().join("etcd"),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = rt
        .block_on(ControlPlane::start_with(test_control_plane::Options {
            binaries: Some(missing),
            ..Default::default()
        }))
        .unwrap_err();
    assert!(matches!(err, Error::BinariesNotFound { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("provision.sh") && msg.contains("given explicitly"),
        "{msg}"
    );
}

#[test]
fn processes_are_gone_after_drop() {
    // Start on a thread and runtime that end right away: the servers must not depend on either.
    let cp = std::thread::spawn(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(ControlPlane::start())
            .unwrap()
    })
    .join()
    .unwrap();
    std::thread::sleep(Duration::from_millis(1500)); // > the watchdog's 0.5 s poll period
    let (etcd, apiserver, dir) = (cp.etcd_pid(), cp.apiserver_pid(), cp.state_dir().to_owned());
    assert!(process_alive(etcd) && process_alive(apiserver) && cp.is_running());
    assert!(dir.is_dir());
    // A client made on another runtime works.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let nodes: Api<Node> = Api::all(cp.client().unwrap());
            nodes.list(&Default::default()).await.unwrap();
        });

    let stopping = Instant::now();
    drop(cp);
    eprintln!("control plane stopped in {:?}", stopping.elapsed());
    assert!(!process_alive(etcd), "etcd {etcd} still running");
    assert!(
        !process_alive(apiserver),
        "kube-apiserver {apiserver} still running"
    );
    assert!(!dir.exists(), "{} not removed", dir.display());
}

#[tokio::test]
async fn startup_failure_reports_the_log_tail() {
    let err = ControlPlane::start_with(test_control_plane::Options {
        extra_apiserver_args: vec!["--no-such-flag=1".to_owned()],
        ..Default::default()
    })
    .await
    .unwrap_err();
    let msg = err.to_string();
    let Error::ExitedEarly {
        process, log, tail, ..
    } = err
    else {
        panic!("expected ExitedEarly, got {msg}");
    };
    assert_eq!(process, "kube-apiserver");
    assert!(tail.contains("unknown flag: --no-such-flag"), "{tail}");
    assert!(msg.contains(&log.display().to_string()), "{msg}");
    // The log was copied out of the removed state directory, so the path in the message works.
    assert!(log.starts_with(std::env::temp_dir()), "{}", log.display());
    let kept = std::fs::read_to_string(&log).unwrap();
    assert!(kept.contains("unknown flag"));
    std::fs::remove_dir_all(log.parent().unwrap()).unwrap();
}

/// Runs only inside the child process of `children_die_with_a_killed_test_process`: starts a
/// control plane, reports it on stdout, and waits to be killed.
#[tokio::test]
#[ignore = "helper process for children_die_with_a_killed_test_process"]
async fn hold_control_plane_until_killed() {
    if std::env::var_os(HELPER_ENV).is_none() {
        return;
    }
    let cp = ControlPlane::start().await.unwrap();
    println!(
        "HOLDING {} {} {}",
        cp.etcd_pid(),
        cp.apiserver_pid(),
        cp.state_dir().display()
    );
    tokio::time::sleep(Duration::from_secs(300)).await;
}

#[tokio::test]
async fn children_die_with_a_killed_test_process() {
    let mut holder = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "hold_control_plane_until_killed",
            "--ignored",
            "--nocapture",
        ])
        .env(HELPER_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(holder.stdout.take().unwrap());
    let line = stdout
        .lines()
        .map(Result::unwrap)
        .find(|l| l.starts_with("HOLDING "))
        .expect("helper reports its control plane");
    let mut fields = line.split(' ').skip(1);
    let etcd: u32 = fields.next().unwrap().parse().unwrap();
    let apiserver: u32 = fields.next().unwrap().parse().unwrap();
    let dir = PathBuf::from(fields.next().unwrap());
    assert!(process_alive(etcd) && process_alive(apiserver));

    holder.kill().unwrap(); // SIGKILL: no destructor runs in the helper.
    holder.wait().unwrap();

    assert!(
        eventually("the servers to die", Duration::from_secs(10), || {
            !process_alive(etcd) && !process_alive(apiserver)
        })
        .await,
        "servers {etcd}/{apiserver} survived their test process"
    );
    assert!(
        eventually(
            "the state directory to be removed",
            Duration::from_secs(5),
            || { !dir.exists() }
        )
        .await,
        "{} not removed after the test process died",
        dir.display()
    );
}

/// Whether `done` becomes true within `timeout`.
async fn eventually(what: &str, timeout: Duration, done: impl Fn() -> bool) -> bool {
    wait_for(what, timeout, || {
        std::future::ready(if done() {
            Ok(())
        } else {
            Err("not yet".to_owned())
        })
    })
    .await
    .is_ok()
}
