//! The binary as the kubelet runs it: spawned, one request on stdin, the response on stdout.
//! ECR against a real `moto_server`; GCP and Azure against in-test HTTP servers speaking the
//! metadata, token and exchange endpoints; the local family against a file.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::zombie_processes)]

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use credential_provider::{ApiVersion, CacheKeyType, CredentialProviderRequest, decode_response};

const BIN: &str = env!("CARGO_BIN_EXE_credential-provider");

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(args: &[&str], env: &[(&str, &str)], stdin: &[u8]) -> Run {
    let mut cmd = Command::new(BIN);
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

/// `moto_server` from the test-assets venv or PATH.
fn moto_server() -> PathBuf {
    let cache = std::env::var("CCM_TEST_ASSETS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/ccm-test-assets")
        });
    let venv = cache.join("moto-venv/bin/moto_server");
    if venv.exists() {
        return venv;
    }
    let on_path = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| Path::new(d).join("moto_server"))
        .find(|p| p.exists());
    on_path.unwrap_or_else(|| {
        panic!("moto_server not found: run tests/run-all.sh (it installs moto[server] into {}/moto-venv) or `pip install 'moto[server]'`", cache.display())
    })
}

struct Moto(Child, u16);
impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_moto() -> Moto {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(moto_server())
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start moto_server");
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Moto(child, port);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("moto_server did not listen on {port} within 10 s");
}

fn aws_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT_URL", endpoint.to_string()),
        ("AWS_ACCESS_KEY_ID", "testing".into()),
        ("AWS_SECRET_ACCESS_KEY", "testing".into()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ("AWS_CONFIG_FILE", "/nonexistent".into()),
        ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent".into()),
    ]
}

#[test]
fn ecr_against_moto_as_the_kubelet_calls_it() {
    let moto = start_moto();
    let endpoint = format!("http://localhost:{}", moto.1);
    let env = aws_env(&endpoint);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let image = "123456789012.dkr.ecr.us-west-2.amazonaws.com/app:v1";
    let req = CredentialProviderRequest::new(ApiVersion::V1, image);
    // Invoked under the upstream plugin's name and argument.
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("ecr-credential-provider");
    std::os::unix::fs::symlink(BIN, &link).unwrap();
    let out = Command::new(&link)
        .arg("get-credentials")
        .envs(env.iter().copied())
        .env("CREDENTIAL_PROVIDER_CACHE_DIR", dir.path().join("cache"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin
                .take()
                .unwrap()
                .write_all(req.to_json().as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let resp = decode_response(&out.stdout).unwrap();
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

/// A tiny HTTP/1.1 server answering by path with canned responses, counting requests.
struct Server {
    port: u16,
    hits: Arc<AtomicUsize>,
}

fn serve(routes: Vec<(&'static str, &'static str, String, String)>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            counter.fetch_add(1, Ordering::SeqCst);
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap_or(0);
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let mut len = 0;
            let mut flavor_ok = false;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
                let lower = h.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                flavor_ok |= lower.starts_with("metadata-flavor: google")
                    || lower.starts_with("metadata: true");
            }
            let mut body = vec![0; len];
            let _ = reader.read_exact(&mut body);
            let route = routes.iter().find(|(_, p, _, _)| path.starts_with(p));
            let (status, headers, body) = match route {
                Some((status, p, headers, body)) if flavor_ok || !p.contains("metadata") => {
                    (*status, headers.clone(), body.clone())
                }
                _ => ("404 Not Found", String::new(), String::new()),
            };
            let mut s = stream;
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{headers}\r\n{body}",
                body.len()
            );
        }
    });
    Server { port, hits }
}

#[test]
fn gcp_metadata_token_and_disk_cache() {
    let server = serve(vec![(
        "200 OK",
        "/computeMetadata/v1/instance/service-accounts/default/token",
        "Content-Type: application/json\r\n".into(),
        r#"{"access_token":"ya29.gcp-secret","expires_in":3599,"token_type":"Bearer"}"#.into(),
    )]);
    let dir = tempfile::tempdir().unwrap();
    let host = format!("127.0.0.1:{}", server.port);
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
        server.hits.load(Ordering::SeqCst),
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
    assert_eq!(server.hits.load(Ordering::SeqCst), 2);
    let r = run(&[], &env, req.to_json().as_bytes());
    assert_eq!(r.code, 0);
    assert_eq!(
        server.hits.load(Ordering::SeqCst),
        2,
        "rewritten cache serves again"
    );
}

#[test]
fn acr_managed_identity_exchange() {
    let registry = serve(vec![
        ("401 Unauthorized", "/v2/", String::new(), String::new()),
        (
            "200 OK",
            "/oauth2/exchange",
            String::new(),
            r#"{"refresh_token":"acr-refresh-secret"}"#.into(),
        ),
        (
            "200 OK",
            "/metadata/identity/oauth2/token",
            String::new(),
            r#"{"access_token":"aad-secret"}"#.into(),
        ),
    ]);
    // The /v2/ challenge must point at the exchange: serve a second registry whose 401 carries it.
    let base = format!("http://127.0.0.1:{}", registry.port);
    let challenge = format!(
        "Www-Authenticate: Bearer realm=\"{base}/oauth2/token\",service=\"myreg.azurecr.io\"\r\n"
    );
    let leaked: &'static str = Box::leak(challenge.into_boxed_str());
    let front = serve(vec![(
        "401 Unauthorized",
        "/v2/",
        leaked.to_string(),
        String::new(),
    )]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("azure.json");
    std::fs::write(&cfg, r#"{"cloud":"AzurePublicCloud","tenantId":"t","useManagedIdentityExtension":true,"subscriptionId":"s"}"#).unwrap();
    let front_url = format!("http://127.0.0.1:{}", front.port);
    let env = [
        ("CREDENTIAL_PROVIDER_AZURE_IMDS_URL", base.as_str()),
        ("CREDENTIAL_PROVIDER_ACR_URL", front_url.as_str()),
    ];
    let link = dir.path().join("acr-credential-provider");
    std::os::unix::fs::symlink(BIN, &link).unwrap();
    let req = CredentialProviderRequest::new(ApiVersion::V1, "myreg.azurecr.io/app:1");
    let mut child = Command::new(&link)
        .arg(&cfg)
        .envs(env)
        .env("CREDENTIAL_PROVIDER_CACHE_DIR", "")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(req.to_json().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let resp = decode_response(&out.stdout).unwrap();
    let auth = &resp.response.auth["myreg.azurecr.io"];
    assert_eq!(auth.username, "00000000-0000-0000-0000-000000000000");
    assert_eq!(auth.password, "acr-refresh-secret");
    assert_eq!(
        resp.response.cache_duration,
        Some(Duration::from_secs(3600))
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
