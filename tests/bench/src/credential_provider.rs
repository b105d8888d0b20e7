//! The `credential-provider` run: the wall time of one invocation of the kubelet image
//! credential-provider plugin as the kubelet makes it (spawn the binary, write the request on
//! stdin, read the response on stdout, wait for the exit), with a warm on-disk cache and with
//! a cold one against `moto_server`, next to the same spawn of `/bin/true` (the floor any exec
//! plugin pays), and the binary's size.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use credential_provider::testing::{CannedServer, Moto, Route};
use credential_provider::{ApiVersion, CredentialProviderRequest};
use serde::Serialize;
use test_support::{Location, temp_dir};

use crate::CredentialProviderArgs;
use crate::report::{Quantiles, write_quantiles};
use crate::run::{build_profile, progress};

/// Target: median of an invocation answered from the warm on-disk cache.
pub const TARGET_WARM_MS: f64 = 3.0;
/// Target: median of an invocation that calls ECR (moto) with a cold cache.
pub const TARGET_COLD_MS: f64 = 50.0;

const BINARY: &str = "credential-provider";
const BUILD_HINT: &str = "cargo build --release -p credential-provider -p bench";
/// Untimed invocations before each timed series (page cache, moto's first answers).
const WARM_UP: usize = 5;
const GCP_IMAGE: &str = "europe-docker.pkg.dev/p/r/app:1";
const ECR_IMAGE: &str = "123456789012.dkr.ecr.us-west-2.amazonaws.com/app:v1";
const LOCAL_IMAGE: &str = "127.0.0.1:5000/app:1";

/// Everything `bench credential-provider` measured.
#[derive(Debug, Clone, Serialize)]
pub struct CredentialProviderReport {
    /// Cargo profile of the measured binary.
    pub build_profile: String,
    /// CPU cores of the machine.
    pub cores: usize,
    /// The measured binary.
    pub binary: PathBuf,
    /// Its size in bytes.
    pub binary_bytes: u64,
    /// `/bin/true` spawned the same way: the floor of any exec plugin.
    pub spawn_floor: Quantiles,
    /// GCP family (`auth-provider-gcp get-credentials`), answered from the on-disk cache a
    /// first call filled from the in-bench metadata server.
    pub warm: Quantiles,
    /// Metadata-server requests during the warm series (0 when the cache served them all).
    pub warm_token_requests: usize,
    /// `local` family: the operator's file read and matched on every call (no token service,
    /// no cache).
    pub local: Quantiles,
    /// ECR family against `moto_server`, nothing cached (moto's tokens carry a past expiry,
    /// so none is stored): SDK configuration, one `GetAuthorizationToken`.
    pub cold: Quantiles,
    /// The same `GetAuthorizationToken` sent by the bench itself over a new connection: how
    /// much of `cold` is moto.
    pub moto_alone: Quantiles,
}

/// One invocation's wall time, as the kubelet makes it.
fn invoke(
    program: &Path,
    args: &[&str],
    env: &[(&str, String)],
    stdin: &[u8],
) -> anyhow::Result<(Duration, std::process::Output)> {
    let start = Instant::now();
    let mut child = Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env_remove("AWS_PROFILE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {}", program.display()))?;
    if let Some(mut input) = child.stdin.take() {
        // `/bin/true` may exit before reading: a broken pipe is its answer, not a failure.
        let _ = input.write_all(stdin);
    }
    let output = child
        .wait_with_output()
        .with_context(|| format!("waiting for {}", program.display()))?;
    Ok((start.elapsed(), output))
}

/// `runs` timed invocations after [`WARM_UP`] untimed ones; each must succeed with a response.
fn series(
    label: &str,
    runs: usize,
    program: &Path,
    args: &[&str],
    env: &[(&str, String)],
    stdin: &[u8],
    expect_output: bool,
) -> anyhow::Result<Quantiles> {
    progress(format_args!("{label}: {runs} invocations"));
    let mut samples = Vec::with_capacity(runs);
    for i in 0..WARM_UP + runs {
        let (took, out) = invoke(program, args, env, stdin)?;
        anyhow::ensure!(
            out.status.success() && (!expect_output || !out.stdout.is_empty()),
            "{label}: invocation {i} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        if i >= WARM_UP {
            samples.push(took);
        }
    }
    Ok(Quantiles::of(samples))
}

/// `GetAuthorizationToken` straight to moto over a new connection (as the plugin opens one
/// per invocation), with a placeholder signature moto only reads the service and region from.
fn moto_alone(moto: &Moto, runs: usize) -> anyhow::Result<Quantiles> {
    progress(format_args!(
        "moto alone: {runs} GetAuthorizationToken requests"
    ));
    let body = "{}";
    let request = format!(
        "POST / HTTP/1.1\r\nHost: localhost:{port}\r\nContent-Type: application/x-amz-json-1.1\r\nX-Amz-Target: AmazonEC2ContainerRegistry_V20150921.GetAuthorizationToken\r\nAuthorization: AWS4-HMAC-SHA256 Credential=testing/20240101/us-west-2/ecr/aws4_request, SignedHeaders=host, Signature=0\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len(),
        port = moto.port()
    );
    let mut samples = Vec::with_capacity(runs);
    for i in 0..WARM_UP + runs {
        let start = Instant::now();
        let mut stream =
            TcpStream::connect(("127.0.0.1", moto.port())).context("connecting to moto")?;
        stream.write_all(request.as_bytes())?;
        let answer = read_answer(&mut stream)?;
        let took = start.elapsed();
        anyhow::ensure!(
            answer.starts_with("HTTP/1.1 200") && answer.contains("authorizationToken"),
            "moto did not answer GetAuthorizationToken: {}",
            answer.lines().next().unwrap_or_default()
        );
        if i >= WARM_UP {
            samples.push(took);
        }
    }
    Ok(Quantiles::of(samples))
}

/// Reads one HTTP/1.1 answer up to its `Content-Length` (the server may close the connection
/// only later, which a client does not wait for).
fn read_answer(stream: &mut TcpStream) -> anyhow::Result<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let text = String::from_utf8_lossy(&buf);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse::<usize>().ok());
            if length.is_some_and(|n| body.len() >= n) {
                return Ok(text.into_owned());
            }
        }
        let n = stream.read(&mut chunk).context("reading moto's answer")?;
        if n == 0 {
            return Ok(String::from_utf8_lossy(&buf).into_owned());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Runs `bench credential-provider`.
pub fn credential_provider(
    args: &CredentialProviderArgs,
) -> anyhow::Result<CredentialProviderReport> {
    anyhow::ensure!(
        args.runs > 0 && args.cold_runs > 0,
        "--runs and --cold-runs must be positive"
    );
    let binary = match test_support::workspace_binary(BINARY) {
        Ok(path) => path,
        Err(test_support::Error::MissingBinary { path, .. }) => anyhow::bail!(
            "{BINARY} is not built next to this bench executable ({}); build it with `{BUILD_HINT}`",
            path.display()
        ),
        Err(e) => return Err(e.into()),
    };
    let profile = build_profile()?;
    if profile != "release" {
        eprintln!(
            "bench: warning: measuring a {profile} build; targets apply to release builds ({BUILD_HINT})"
        );
    }
    let binary_bytes = std::fs::metadata(&binary)
        .with_context(|| format!("reading the size of {}", binary.display()))?
        .len();
    let work =
        temp_dir("ccm-bench-credprov-", Location::System).context("creating a work directory")?;
    let dir = work.path();
    let request = |image: &str| CredentialProviderRequest::new(ApiVersion::V1, image).to_json();

    // The upstream plugins' names, so each family is chosen as the kubelet's configs do.
    let link = |name: &str| -> anyhow::Result<PathBuf> {
        let path = dir.join(name);
        std::os::unix::fs::symlink(&binary, &path)
            .with_context(|| format!("linking {}", path.display()))?;
        Ok(path)
    };
    let gcp = link("auth-provider-gcp")?;
    let ecr = link("ecr-credential-provider")?;

    let floor = series(
        "spawn floor (/bin/true)",
        args.runs,
        Path::new("/bin/true"),
        &[],
        &[],
        request(GCP_IMAGE).as_bytes(),
        false,
    )?;

    // (a) Warm: the first call fills the cache from the metadata server, the rest read it.
    let metadata = CannedServer::start(vec![Route::json(
        "/computeMetadata/v1/instance/service-accounts/default/token",
        r#"{"access_token":"ya29.bench","expires_in":3599,"token_type":"Bearer"}"#,
    )])?;
    let cache = dir.join("cache");
    let gcp_env = [
        (
            "GCE_METADATA_HOST",
            format!("127.0.0.1:{}", metadata.port()),
        ),
        ("CREDENTIAL_PROVIDER_CACHE_DIR", cache.display().to_string()),
    ];
    let gcp_args = ["get-credentials", "--v=3"];
    let gcp_request = request(GCP_IMAGE);
    let (_, first) = invoke(&gcp, &gcp_args, &gcp_env, gcp_request.as_bytes())?;
    anyhow::ensure!(
        first.status.success() && metadata.hits() == 1,
        "the first GCP call did not fill the cache from the metadata server: {}",
        String::from_utf8_lossy(&first.stderr).trim()
    );
    let warm = series(
        "warm cache (GCP)",
        args.runs,
        &gcp,
        &gcp_args,
        &gcp_env,
        gcp_request.as_bytes(),
        true,
    )?;
    let warm_token_requests = metadata.hits() - 1;

    // The local family: no token service at all.
    let local_config = dir.join("local.yaml");
    std::fs::write(
        &local_config,
        "registries:\n  - match: 127.0.0.1:5000\n    username: bench\n    password: bench-pw\n",
    )
    .with_context(|| format!("writing {}", local_config.display()))?;
    let local = series(
        "local family",
        args.runs,
        &binary,
        &["--local-config", &local_config.display().to_string()],
        &[("CREDENTIAL_PROVIDER_CACHE_DIR", String::new())],
        request(LOCAL_IMAGE).as_bytes(),
        true,
    )?;

    // (b) Cold: ECR at moto; its tokens expired in 2015, so nothing is ever cached.
    progress(format_args!("starting moto_server"));
    let moto = Moto::start()?;
    let mut ecr_env = moto.aws_env();
    let cold_cache = dir.join("cold-cache");
    ecr_env.push((
        "CREDENTIAL_PROVIDER_CACHE_DIR",
        cold_cache.display().to_string(),
    ));
    let cold = series(
        "cold cache (ECR at moto)",
        args.cold_runs,
        &ecr,
        &["get-credentials"],
        &ecr_env,
        request(ECR_IMAGE).as_bytes(),
        true,
    )?;
    anyhow::ensure!(
        !cold_cache.join("credentials.json").exists(),
        "an ECR answer was cached: the cold series was not cold"
    );
    let moto_alone = moto_alone(&moto, args.cold_runs)?;

    Ok(CredentialProviderReport {
        build_profile: profile,
        cores: std::thread::available_parallelism().map_or(1, usize::from),
        binary,
        binary_bytes,
        spawn_floor: floor,
        warm,
        warm_token_requests,
        local,
        cold,
        moto_alone,
    })
}

/// The human-readable report.
pub fn render_text(r: &CredentialProviderReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let floor = Some(r.spawn_floor.median_ms);
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "credential-provider: one invocation as the kubelet makes it (spawn, request on stdin, response, exit), {} build, {} cores",
        r.build_profile, r.cores
    );
    let _ = writeln!(
        out,
        "  binary {} : {:.2} MiB ({} bytes)",
        r.binary.display(),
        r.binary_bytes as f64 / (1024.0 * 1024.0),
        r.binary_bytes
    );
    write_quantiles(
        &mut out,
        "spawn floor (/bin/true, same spawn)",
        &r.spawn_floor,
        None,
        None,
    );
    write_quantiles(
        &mut out,
        "warm on-disk cache (GCP, cache hit)",
        &r.warm,
        Some(TARGET_WARM_MS),
        floor,
    );
    let _ = writeln!(
        out,
        "    metadata-server requests during the warm series: {}",
        r.warm_token_requests
    );
    write_quantiles(
        &mut out,
        "local family (file read per call)",
        &r.local,
        None,
        floor,
    );
    write_quantiles(
        &mut out,
        "cold cache (ECR at moto, no cache entry)",
        &r.cold,
        Some(TARGET_COLD_MS),
        floor,
    );
    write_quantiles(
        &mut out,
        "moto alone (same call from the bench)",
        &r.moto_alone,
        None,
        None,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_report_names_targets_and_the_floor() {
        let q = |median_ms| Quantiles {
            samples: 10,
            median_ms,
            p90_ms: median_ms,
            p99_ms: median_ms,
            max_ms: median_ms,
        };
        let r = CredentialProviderReport {
            build_profile: "release".into(),
            cores: 2,
            binary: PathBuf::from("/x/credential-provider"),
            binary_bytes: 3 * 1024 * 1024,
            spawn_floor: q(0.5),
            warm: q(1.0),
            warm_token_requests: 0,
            local: q(1.1),
            cold: q(60.0),
            moto_alone: q(20.0),
        };
        let text = render_text(&r);
        assert!(text.contains("3.00 MiB"), "{text}");
        assert!(
            text.contains("target median <= 3 ms [ok]   2.0x the spawn floor"),
            "{text}"
        );
        assert!(text.contains("target median <= 50 ms [MISSED]"), "{text}");
    }
}
