//! The binary as the kubelet runs it: spawned, one request on stdin, the response on stdout.
//! ECR against a real `moto_server`; GCP and Azure against in-test HTTP servers speaking the
//! metadata, token and exchange endpoints; the local family against a file.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::zombie_processes)]

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use credential_provider::testing::{CannedServer, Moto, Route};
use credential_provider::{
    ApiVersion, CacheKeyType, CredentialProviderRequest, CredentialProviderResponse,
    decode_response,
};

const BIN: &str = env!("CARGO_BIN_EXE_credential-provider");

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(args: &[&str], env: &[(&str, &str)], stdin: &[u8]) -> Run {
    run_program(Path::new(BIN), args, env, stdin)
}

/// Runs `program` as the kubelet does (no disk cache unless `env` sets one).
fn run_program(program: &Path, args: &[&str], env: &[(&str, &str)], stdin: &[u8]) -> Run {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_remove("AWS_PROFILE")
        .env("CREDENTIAL_PROVIDER_CACHE_DIR", "")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn credential-provider");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

fn local_file(dir: &Path) -> PathBuf {
    let p = dir.join("local.yaml");
    std::fs::write(
        &p,
        "registries:\n  - match: 127.0.0.1:5000\n    username: alice\n    password: s3cret-pw\n  - match: old.example.com\n    token: t0k\n    expires: \"2020-01-01T00:00:00Z\"\n",
    )
    .unwrap();
    p
}

#[test]
fn protocol_round_trip_in_every_version() {
    let dir = tempfile::tempdir().unwrap();
    let file = local_file(dir.path());
    for version in ApiVersion::ALL {
        let req = CredentialProviderRequest::new(version, "127.0.0.1:5000/app:v1");
        let r = run(
            &["--local-config", file.to_str().unwrap()],
            &[],
            req.to_json().as_bytes(),
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        let resp = decode_response(r.stdout.as_bytes()).expect("strictly decodable");
        assert_eq!(
            resp.api_version, version,
            "answered in the request's version"
        );
        assert_eq!(resp.response.cache_key_type, CacheKeyType::Registry);
        assert_eq!(resp.response.auth["127.0.0.1:5000"].password, "s3cret-pw");
    }
}

#[test]
fn bad_input_gives_one_line_and_no_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let file = local_file(dir.path());
    let f = file.to_str().unwrap();
    let v1 = "credentialprovider.kubelet.k8s.io/v1";
    let cases: Vec<(String, &str)> = vec![
        (String::new(), "empty request"),
        ("garbage".into(), "not valid JSON"),
        (r#"{"apiVersion":"credentialprovider.kubelet.k8s.io/v2","kind":"CredentialProviderRequest","image":"a"}"#.into(), "unsupported apiVersion"),
        (format!(r#"{{"apiVersion":"{v1}","kind":"Pod","image":"a"}}"#), "unexpected kind"),
        (format!(r#"{{"apiVersion":"{v1}","kind":"CredentialProviderRequest","image":"a","image":"b"}}"#), "duplicate field `image`"),
        (format!(r#"{{"apiVersion":"{v1}","kind":"CredentialProviderRequest","image":"a","extra":1}}"#), "unknown field `extra`"),
        (format!(r#"{{"apiVersion":"{v1}","kind":"CredentialProviderRequest","image":"a","serviceAccountToken":"secret-tok","serviceAccountAnnotations":{{"k":"1","k":"2"}}}}"#), "duplicate field `serviceAccountAnnotations.k`"),
        (r#"{"apiVersion":"credentialprovider.kubelet.k8s.io/v1alpha1","kind":"CredentialProviderRequest","image":"a","serviceAccountToken":"secret-tok"}"#.into(), "unknown field `serviceAccountToken`"),
        (format!(r#"{{"apiVersion":"{v1}","kind":"CredentialProviderRequest","image":"unknown.example.com/a"}}"#), "no entry of the local credentials file"),
        (format!(r#"{{"apiVersion":"{v1}","kind":"CredentialProviderRequest","image":"old.example.com/a"}}"#), "expired at 2020-01-01"),
    ];
    for (input, want) in cases {
        let r = run(
            &["--provider", "local", "--local-config", f],
            &[],
            input.as_bytes(),
        );
        assert_ne!(r.code, 0, "{input}");
        assert!(r.stdout.is_empty(), "no stdout on error: {}", r.stdout);
        assert_eq!(
            r.stderr.trim_end().lines().count(),
            1,
            "one line: {}",
            r.stderr
        );
        assert!(r.stderr.contains(want), "{input}: {}", r.stderr);
        assert!(
            !r.stderr.contains("secret-tok") && !r.stderr.contains("t0k"),
            "{}",
            r.stderr
        );
    }
    // Auto mode with no file: the image matches no family.
    let req = CredentialProviderRequest::new(ApiVersion::V1, "unknown.example.com/a");
    let r = run(
        &["--local-config", "/nonexistent.yaml"],
        &[],
        req.to_json().as_bytes(),
    );
    assert!(
        r.stderr.contains("matches no registry family"),
        "{}",
        r.stderr
    );
}

#[test]
fn ecr_against_moto_as_the_kubelet_calls_it() {
    let moto = Moto::start().unwrap();
    let env = moto.aws_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let image = "123456789012.dkr.ecr.us-west-2.amazonaws.com/app:v1";
    let req = CredentialProviderRequest::new(ApiVersion::V1, image);
    // Invoked under the upstream plugin's name and argument.
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("ecr-credential-provider");
    std::os::unix::fs::symlink(BIN, &link).unwrap();
    let cache = dir.path().join("cache");
    let mut with_cache = env.clone();
    with_cache.push(("CREDENTIAL_PROVIDER_CACHE_DIR", cache.to_str().unwrap()));
    let out = run_program(
        &link,
        &["get-credentials"],
        &with_cache,
        req.to_json().as_bytes(),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let resp = decode_response(out.stdout.as_bytes()).unwrap();
    let auth = &resp.response.auth["123456789012.dkr.ecr.us-west-2.amazonaws.com"];
    assert_eq!(auth.username, "AWS");
    assert!(!auth.password.is_empty());
    assert_eq!(resp.response.cache_key_type, CacheKeyType::Registry);
    // moto's token "expired" in 2015: explicitly not cached, by the kubelet or on disk.
    assert_eq!(resp.response.cache_duration, Some(Duration::ZERO));
    assert!(!dir.path().join("cache/credentials.json").exists());

    // ECR Public goes to us-east-1's ecr-public API.
    let req = CredentialProviderRequest::new(ApiVersion::V1Beta1, "public.ecr.aws/nginx/nginx:1");
    let r = run(&["--provider", "ecr"], &env, req.to_json().as_bytes());
    // moto may not implement ECR Public; either a response or a clear one-line error.
    if r.code != 0 {
        assert!(
            r.stderr.contains("ECR Public GetAuthorizationToken failed"),
            "{}",
            r.stderr
        );
    }

    // Registry unreachable: a clear error naming the call, nothing on stdout.
    drop(moto);
    let req = CredentialProviderRequest::new(ApiVersion::V1, image);
    let r = run(&["--provider", "ecr"], &env, req.to_json().as_bytes());
    assert_ne!(r.code, 0);
    assert!(r.stdout.is_empty());
    assert!(
        r.stderr.contains("ECR GetAuthorizationToken failed"),
        "{}",
        r.stderr
    );
    assert!(
        !r.stderr.contains("testing"),
        "no credentials in errors: {}",
        r.stderr
    );
}

#[test]
fn gcp_metadata_token_and_disk_cache() {
    let server = CannedServer::start(vec![Route::json(
        "/computeMetadata/v1/instance/service-accounts/default/token",
        r#"{"access_token":"ya29.gcp-secret","expires_in":3599,"token_type":"Bearer"}"#,
    )])
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let host = format!("127.0.0.1:{}", server.port());
    let cache = dir.path().join("cache");
    let env = [
        ("GCE_METADATA_HOST", host.as_str()),
        ("CREDENTIAL_PROVIDER_CACHE_DIR", cache.to_str().unwrap()),
    ];
    let req = CredentialProviderRequest::new(ApiVersion::V1, "europe-docker.pkg.dev/p/r/app:1");
    for _ in 0..2 {
        let r = run(
            &["get-credentials", "--v=3"],
            &env,
            req.to_json().as_bytes(),
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        let resp = decode_response(r.stdout.as_bytes()).unwrap();
        assert_eq!(
            resp.response.auth["europe-docker.pkg.dev"].password,
            "ya29.gcp-secret"
        );
        assert_eq!(resp.response.auth["*.gcr.io"].username, "_token");
    }
    assert_eq!(
        server.hits(),
        1,
        "the second invocation came from the disk cache"
    );
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(cache.join("credentials.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // A corrupt cache is ignored and rewritten, never fatal.
    std::fs::write(cache.join("credentials.json"), "{{{").unwrap();
    let r = run(&[], &env, req.to_json().as_bytes());
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(server.hits(), 2);
    let r = run(&[], &env, req.to_json().as_bytes());
    assert_eq!(r.code, 0);
    assert_eq!(server.hits(), 2, "rewritten cache serves again");
}

/// An ACR stand-in: `front` is the registry, whose `/v2/` challenge names `back` as realm;
/// `back` serves the exchange, Azure IMDS and AAD's token endpoint for tenant `tenant-1`.
struct Acr {
    front: CannedServer,
    back: CannedServer,
    env: Vec<(&'static str, String)>,
}

fn acr_servers() -> Acr {
    let back = CannedServer::start(vec![
        Route::json(
            "/oauth2/exchange",
            r#"{"refresh_token":"acr-refresh-secret"}"#,
        ),
        Route::json(
            "/metadata/identity/oauth2/token",
            r#"{"access_token":"aad-secret"}"#,
        ),
        Route::json(
            "/tenant-1/oauth2/v2.0/token",
            r#"{"access_token":"aad-federated-secret","expires_in":3600}"#,
        ),
    ])
    .unwrap();
    let front = CannedServer::start(vec![Route {
        status: "401 Unauthorized",
        path: "/v2/".into(),
        headers: format!(
            "Www-Authenticate: Bearer realm=\"{}/oauth2/token\",service=\"myreg.azurecr.io\"\r\n",
            back.base_url()
        ),
        body: String::new(),
    }])
    .unwrap();
    let env = vec![
        ("CREDENTIAL_PROVIDER_AZURE_IMDS_URL", back.base_url()),
        ("AZURE_AUTHORITY_HOST", back.base_url()),
        ("CREDENTIAL_PROVIDER_ACR_URL", front.base_url()),
    ];
    Acr { front, back, env }
}

fn borrow_env<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// The binary under the upstream plugin's `name` in `dir`.
fn upstream_name(dir: &Path, name: &str) -> PathBuf {
    let link = dir.join(name);
    std::os::unix::fs::symlink(BIN, &link).unwrap();
    link
}

#[test]
fn acr_managed_identity_exchange() {
    let acr = acr_servers();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("azure.json");
    std::fs::write(&cfg, r#"{"cloud":"AzurePublicCloud","tenantId":"t","useManagedIdentityExtension":true,"subscriptionId":"s"}"#).unwrap();
    let link = upstream_name(dir.path(), "acr-credential-provider");
    let req = CredentialProviderRequest::new(ApiVersion::V1, "myreg.azurecr.io/app:1");
    let out = run_program(
        &link,
        &[cfg.to_str().unwrap()],
        &borrow_env(&acr.env),
        req.to_json().as_bytes(),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let resp = decode_response(out.stdout.as_bytes()).unwrap();
    let auth = &resp.response.auth["myreg.azurecr.io"];
    assert_eq!(auth.username, "00000000-0000-0000-0000-000000000000");
    assert_eq!(auth.password, "acr-refresh-secret");
    assert_eq!(
        resp.response.cache_duration,
        Some(Duration::from_secs(3600))
    );
    assert_eq!(acr.front.hits(), 1, "one challenge");
}

/// A v1 request in service-account token mode (KEP-4412), as the kubelet sends it.
fn sa_request(image: &str, token: &str, annotations: &[(&str, &str)]) -> String {
    let mut req = CredentialProviderRequest::new(ApiVersion::V1, image);
    req.service_account_token = Some(token.to_string());
    req.service_account_annotations = annotations
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect::<BTreeMap<_, _>>();
    req.to_json()
}

fn ok_response(r: &Run) -> CredentialProviderResponse {
    assert_eq!(r.code, 0, "{}", r.stderr);
    decode_response(r.stdout.as_bytes()).unwrap().response
}

/// Keys of the on-disk cache file in `dir`.
fn cache_keys(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join("credentials.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut keys: Vec<String> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["key"].as_str().unwrap().to_string())
        .collect();
    keys.sort();
    keys
}

#[test]
fn ecr_service_account_token_assumes_the_annotated_role_at_moto() {
    let moto = Moto::start().unwrap();
    let env = moto.aws_env();
    let env = borrow_env(&env);
    let dir = tempfile::tempdir().unwrap();
    let link = upstream_name(dir.path(), "ecr-credential-provider");
    let image = "123456789012.dkr.ecr.us-west-2.amazonaws.com/app:v1";
    let host = "123456789012.dkr.ecr.us-west-2.amazonaws.com";
    // moto names the registry after the caller's account: the node's is 123456789012, the
    // role's (assumed with the token through STS AssumeRoleWithWebIdentity) 111122223333.
    let role = "arn:aws:iam::111122223333:role/pull";
    let req = sa_request(
        image,
        "sa-jwt-secret",
        &[("eks.amazonaws.com/ecr-role-arn", role)],
    );
    let resp = ok_response(&run_program(
        &link,
        &["get-credentials"],
        &env,
        req.as_bytes(),
    ));
    assert_eq!(resp.cache_key_type, CacheKeyType::Registry);
    assert_eq!(resp.auth[host].password, "111122223333-auth-token");

    // No annotation: AWS_ECR_ROLE_ARN names the role.
    let mut with_role = env.clone();
    with_role.push(("AWS_ECR_ROLE_ARN", "arn:aws:iam::444455556666:role/pull"));
    let req = sa_request(image, "sa-jwt-secret", &[]);
    let resp = ok_response(&run_program(
        &link,
        &["get-credentials"],
        &with_role,
        req.as_bytes(),
    ));
    assert_eq!(resp.auth[host].password, "444455556666-auth-token");

    // No role at all: the node's own credentials, as upstream falls back.
    let resp = ok_response(&run_program(
        &link,
        &["get-credentials"],
        &env,
        req.as_bytes(),
    ));
    assert_eq!(resp.auth[host].password, "123456789012-auth-token");

    // STS unreachable: a clear error naming the role, never the token.
    drop(moto);
    let req = sa_request(
        image,
        "sa-jwt-secret",
        &[("eks.amazonaws.com/ecr-role-arn", role)],
    );
    let r = run_program(&link, &["get-credentials"], &env, req.as_bytes());
    assert_ne!(r.code, 0);
    assert!(r.stdout.is_empty());
    assert!(
        r.stderr
            .contains("failed to assume role arn:aws:iam::111122223333:role/pull"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("sa-jwt-secret"), "{}", r.stderr);
}

#[test]
fn gcp_workload_identity_federation_follows_the_token() {
    let sts = CannedServer::start(vec![Route::json(
        "/v1/token",
        r#"{"access_token":"federated-secret","issued_token_type":"urn:ietf:params:oauth:token-type:access_token","token_type":"Bearer","expires_in":3600}"#,
    )])
    .unwrap();
    let metadata = CannedServer::start(vec![Route::json(
        "/computeMetadata/v1/instance/service-accounts/default/token",
        r#"{"access_token":"node-secret","expires_in":3600}"#,
    )])
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let sts_url = format!("{}/v1/token", sts.base_url());
    let metadata_host = format!("127.0.0.1:{}", metadata.port());
    let env = [
        ("CREDENTIAL_PROVIDER_GCP_STS_URL", sts_url.as_str()),
        ("GCE_METADATA_HOST", metadata_host.as_str()),
        ("CREDENTIAL_PROVIDER_CACHE_DIR", cache.to_str().unwrap()),
    ];
    let link = upstream_name(dir.path(), "auth-provider-gcp");
    let args = [
        "get-credentials",
        "--v=3",
        "--identity-provider=https://container.googleapis.com/v1/projects/p/locations/l/clusters/c",
        "--project-id=p",
    ];
    let image = "europe-docker.pkg.dev/p/r/app:1";
    let opted_in = [("iam.gke.io/enable-wi-image-pull", "true")];
    let req_a = sa_request(image, "sa-token-a", &opted_in);
    let resp = ok_response(&run_program(&link, &args, &env, req_a.as_bytes()));
    assert_eq!(
        resp.auth["europe-docker.pkg.dev"].password,
        "federated-secret"
    );
    assert_eq!(resp.auth["europe-docker.pkg.dev"].username, "_token");
    assert_eq!(resp.cache_key_type, CacheKeyType::Image);
    assert_eq!(metadata.hits(), 0, "no node-identity fallback");
    let exchange = sts.received();
    assert_eq!(exchange.len(), 1);
    let form = &exchange[0].body;
    assert_eq!(exchange[0].method, "POST");
    for part in [
        "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange",
        "subject_token=sa-token-a",
        "subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Ajwt",
        "audience=identitynamespace%3Ap.svc.id.goog%3Ahttps%3A%2F%2Fcontainer.googleapis.com%2Fv1%2Fprojects%2Fp%2Flocations%2Fl%2Fclusters%2Fc",
        "scope=https%3A%2F%2Fwww.googleapis.com%2Fauth%2Fcloud-platform",
    ] {
        assert!(form.contains(part), "{part} in {form}");
    }

    // The same token again: the disk cache answers. Another token: its own exchange and its
    // own cache entry, so one workload never gets another's credentials.
    ok_response(&run_program(&link, &args, &env, req_a.as_bytes()));
    assert_eq!(sts.hits(), 1, "same token served from the disk cache");
    let req_b = sa_request(image, "sa-token-b", &opted_in);
    ok_response(&run_program(&link, &args, &env, req_b.as_bytes()));
    assert_eq!(sts.hits(), 2, "another token is another identity");
    assert!(sts.received()[0].body.contains("subject_token=sa-token-b"));
    let keys = cache_keys(&cache);
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(
        keys.iter()
            .all(|k| k.starts_with("gcp|europe-docker.pkg.dev|"))
    );
    let text = std::fs::read_to_string(cache.join("credentials.json")).unwrap();
    assert!(
        !text.contains("sa-token-"),
        "tokens are hashed into the key"
    );

    // Not opted in: the node's identity, as upstream.
    let req = sa_request(image, "sa-token-c", &[]);
    let resp = ok_response(&run_program(&link, &args, &env, req.as_bytes()));
    assert_eq!(resp.auth["europe-docker.pkg.dev"].password, "node-secret");

    // STS refuses (an endpoint that answers 404): a clear error naming the pool, never the
    // token, and no fallback to the node's identity.
    let refusing = format!("{}/v1/refused", sts.base_url());
    let mut env = env.to_vec();
    env[0].1 = refusing.as_str();
    let req = sa_request(image, "sa-token-d", &opted_in);
    let r = run_program(&link, &args, &env, req.as_bytes());
    assert!(r.stderr.contains("HTTP 404"), "{}", r.stderr);
    assert_ne!(r.code, 0);
    assert!(r.stdout.is_empty());
    assert!(
        r.stderr.contains("Google STS token exchange"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("p.svc.id.goog"), "{}", r.stderr);
    assert!(!r.stderr.contains("sa-token-d"), "{}", r.stderr);
}

#[test]
fn acr_federated_service_account_token() {
    let acr = acr_servers();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("azure.json");
    std::fs::write(&cfg, r#"{"cloud":"AzurePublicCloud","tenantId":"node-tenant","useManagedIdentityExtension":true}"#).unwrap();
    let link = upstream_name(dir.path(), "acr-credential-provider");
    let req = sa_request(
        "myreg.azurecr.io/app:1",
        "sa-jwt-secret",
        &[
            ("kubernetes.azure.com/acr-tenant-id", "tenant-1"),
            ("kubernetes.azure.com/acr-client-id", "client-1"),
        ],
    );
    let resp = ok_response(&run_program(
        &link,
        &[cfg.to_str().unwrap()],
        &borrow_env(&acr.env),
        req.as_bytes(),
    ));
    assert_eq!(resp.cache_key_type, CacheKeyType::Registry);
    assert_eq!(resp.auth["myreg.azurecr.io"].password, "acr-refresh-secret");
    let seen = acr.back.received();
    let paths: Vec<&str> = seen.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(
        paths,
        ["/tenant-1/oauth2/v2.0/token", "/oauth2/exchange"],
        "AAD with the token, then the exchange; not the managed identity"
    );
    for part in [
        "grant_type=client_credentials",
        "client_id=client-1",
        "client_assertion=sa-jwt-secret",
        "client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer",
        "scope=https%3A%2F%2Fcontainerregistry.azure.net%2F.default",
    ] {
        assert!(seen[0].body.contains(part), "{part} in {}", seen[0].body);
    }
    for part in [
        "grant_type=access_token_refresh_token",
        "access_token=aad-federated-secret",
        "refresh_token=aad-federated-secret",
        "tenant=tenant-1",
    ] {
        assert!(seen[1].body.contains(part), "{part} in {}", seen[1].body);
    }

    // Without the annotations: a clear error naming them.
    let req = sa_request("myreg.azurecr.io/app:1", "sa-jwt-secret", &[]);
    let r = run_program(
        &link,
        &[cfg.to_str().unwrap()],
        &borrow_env(&acr.env),
        req.as_bytes(),
    );
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("kubernetes.azure.com/acr-tenant-id"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("sa-jwt-secret"));
}

#[test]
fn gcp_dockercfg_flows() {
    let cfg = r#"{"https://gcr.io":{"username":"u","password":"dockercfg-secret"},"registry.example.com":{"auth":"dTI6cDI="}}"#;
    let config_server = CannedServer::start(vec![Route::json("/config.json", cfg)]).unwrap();
    let url = format!("{}/config.json", config_server.base_url());
    let metadata = CannedServer::start(vec![
        Route::json(
            "/computeMetadata/v1/instance/attributes/google-dockercfg-url",
            url,
        ),
        Route::json(
            "/computeMetadata/v1/instance/attributes/google-dockercfg",
            cfg,
        ),
    ])
    .unwrap();
    let host = format!("127.0.0.1:{}", metadata.port());
    let env = [("GCE_METADATA_HOST", host.as_str())];
    let req = CredentialProviderRequest::new(ApiVersion::V1, "gcr.io/p/app:1").to_json();
    for flow in ["--authFlow=dockercfg", "--authFlow=dockercfg-url"] {
        let resp = ok_response(&run(
            &["get-credentials", flow, "--provider", "gcp"],
            &env,
            req.as_bytes(),
        ));
        assert_eq!(resp.auth["gcr.io"].password, "dockercfg-secret", "{flow}");
        assert_eq!(resp.auth["registry.example.com"].username, "u2", "{flow}");
        assert_eq!(resp.auth["registry.example.com"].password, "p2", "{flow}");
    }
    assert_eq!(
        config_server.hits(),
        1,
        "only the -url flow fetches the URL"
    );
}

#[test]
fn doctor_explains_without_printing_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let file = local_file(dir.path());
    let r = run(
        &[
            "doctor",
            "127.0.0.1:5000/app",
            "--local-config",
            file.to_str().unwrap(),
        ],
        &[],
        b"",
    );
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("family:      local"), "{}", r.stdout);
    assert!(r.stdout.contains("result:      ok"), "{}", r.stdout);
    assert!(r.stdout.contains("alice"));
    assert!(!r.stdout.contains("s3cret-pw"), "{}", r.stdout);
    let r = run(
        &[
            "doctor",
            "old.example.com/app",
            "--local-config",
            file.to_str().unwrap(),
        ],
        &[],
        b"",
    );
    assert_eq!(r.code, 1);
    assert!(
        r.stdout.contains("FAILED") && r.stdout.contains("expired"),
        "{}",
        r.stdout
    );
    assert!(!r.stdout.contains("t0k"));
}
