//! The credential provider as the kubelet runs it: a real kubelet (1.20, so v1alpha1, behind the
//! `KubeletCredentialProviders` gate) configured with `--image-credential-provider-config` from
//! `deploy/credential-provider/` pulls a pod's image from a local registry that requires a user
//! and password, through this binary (`local` family); an image in a registry no provider
//! matches is refused by that registry.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use cloud_controller_manager::well_known::TAINT_UNINITIALIZED;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use real_node::{Cluster, ClusterOptions, CredentialProviders, Registry, busybox_image};
use serde_json::{Value, json};
use test_support::wait_for;

const USER: &str = "puller";
const PASSWORD: &str = "pull-secret-7f3a";
const WAIT: Duration = Duration::from_secs(90);

/// `deploy/credential-provider/credential-provider-config-v1alpha1.yaml` with the `local`
/// provider matching `registry` and told where its registries file and cache are.
fn kubelet_config(registry: &str, registries_file: &Path, cache_dir: &Path) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/credential-provider/credential-provider-config-v1alpha1.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut config: Value = serde_saphyr::from_str(&text).unwrap();
    let providers = config["providers"].as_array_mut().unwrap();
    let local = providers
        .iter_mut()
        .find(|p| p["name"] == "local-credential-provider")
        .unwrap_or_else(|| panic!("{} has no local-credential-provider", path.display()));
    local["matchImages"] = json!([registry]);
    local["env"] = json!([
        {"name": "CREDENTIAL_PROVIDER_LOCAL_CONFIG", "value": registries_file},
        {"name": "CREDENTIAL_PROVIDER_CACHE_DIR", "value": cache_dir},
    ]);
    config.to_string()
}

#[tokio::test]
async fn kubelet_pulls_from_an_authenticated_registry_through_the_credential_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let work = tempfile::tempdir().unwrap();
    let port = test_support::free_port().unwrap();
    let registry_host = format!("127.0.0.1:{port}");

    // The plugin directory, as the DaemonSet's `install` fills it on a node.
    let bin_dir = work.path().join("bin");
    let binary = test_support::workspace_binary("credential-provider").unwrap();
    let out = Command::new(&binary)
        .arg("install")
        .arg(&bin_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "credential-provider install: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let registries = work.path().join("local-registries.yaml");
    std::fs::write(
        &registries,
        format!("registries:\n  - match: \"{registry_host}\"\n    username: {USER}\n    password: {PASSWORD}\n"),
    )
    .unwrap();
    let config = work.path().join("credential-provider-config.yaml");
    std::fs::write(
        &config,
        kubelet_config(&registry_host, &registries, &work.path().join("cache")),
    )
    .unwrap();

    let cluster = Cluster::start(ClusterOptions {
        credential_providers: Some(CredentialProviders { config, bin_dir }),
        ..ClusterOptions::default()
    })
    .await
    .unwrap_or_else(|e| panic!("starting the real node: {e}"));
    let covered = Registry::start_on(&cluster, port, Some((USER, PASSWORD)))
        .await
        .unwrap();
    // The same image in a registry with the same credentials that no provider matches.
    let uncovered = Registry::start(&cluster, Some((USER, PASSWORD)))
        .await
        .unwrap();
    let image = busybox_image(
        work.path(),
        "ccm.local/pulled:1",
        "pulled with credentials\n",
    )
    .unwrap();
    let with_plugin = covered.push(&image.path, "demo/pulled:1").unwrap();
    let without_plugin = uncovered.push(&image.path, "demo/pulled:1").unwrap();

    let pods: Api<Pod> = Api::namespaced(cluster.client().unwrap(), "default");
    for (name, image) in [
        ("with-plugin", &with_plugin),
        ("without-plugin", &without_plugin),
    ] {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "tolerations": [{"key": TAINT_UNINITIALIZED, "operator": "Exists"}],
                "containers": [{"name": "web", "image": image, "imagePullPolicy": "Always",
                                "args": ["httpd", "-f", "-p", "8080", "-h", "/www"]}],
            }
        }))
        .unwrap();
        pods.create(&PostParams::default(), &pod).await.unwrap();
    }

    let state = |pod: Pod| {
        let status = pod.status.unwrap_or_default();
        let waiting = status
            .container_statuses
            .unwrap_or_default()
            .into_iter()
            .find_map(|c| c.state.and_then(|s| s.waiting))
            .map(|w| {
                format!(
                    "{}: {}",
                    w.reason.unwrap_or_default(),
                    w.message.unwrap_or_default()
                )
            });
        (status.phase.unwrap_or_default(), waiting)
    };
    wait_for("pod with-plugin Running", WAIT, || {
        let pods = pods.clone();
        async move {
            match state(pods.get("with-plugin").await.map_err(|e| e.to_string())?) {
                (phase, _) if phase == "Running" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nkubelet:\n{}", cluster.log_tail("kubelet", 40)));
    assert!(
        covered.logs().contains(USER),
        "the registry should have served an authenticated pull by {USER}:\n{}",
        covered.logs()
    );

    let refused = wait_for("pod without-plugin to fail pulling", WAIT, || {
        let pods = pods.clone();
        async move {
            match state(
                pods.get("without-plugin")
                    .await
                    .map_err(|e| e.to_string())?,
            ) {
                (_, Some(waiting))
                    if waiting.starts_with("ErrImagePull")
                        || waiting.starts_with("ImagePullBackOff") =>
                {
                    Ok(waiting)
                }
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await
    .unwrap();
    assert!(
        refused.contains("401") || refused.to_lowercase().contains("unauthorized"),
        "the pull without credentials should be refused by the registry: {refused}"
    );
    // No secret in what the kubelet recorded.
    let events = cluster
        .kubectl()
        .args(["get", "events", "-n", "default", "-o", "json"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&events.stdout).contains(PASSWORD),
        "an Event carries the password"
    );
}
