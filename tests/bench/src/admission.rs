//! The `admission` run: the webhook binary (`cloud-provider-webhook`) in front of a provider
//! shim over mutual TLS, sent AdmissionReviews over TLS on loopback at a fixed rate.
//!
//! Open loop: request `i` is due at `i / rate` from the start whatever happened to the earlier
//! ones, and its latency is counted from when it was due, so a slow answer that delays the
//! next requests on its connection shows up in their latencies too (no coordinated omission).
//! The requests go over a fixed pool of keep-alive HTTP/1.1 connections: the webhook offers
//! only `http/1.1` in ALPN, so the API server's client (which would use HTTP/2 when offered)
//! keeps a pool of HTTP/1.1 connections to it as well.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use test_support::{Location, Process, ShimMtls, Wait, last_lines, temp_dir};

use crate::procfs;
use crate::report::verdict;
use crate::run::{Machine, SHIM_BINARY, progress};
use crate::{AdmissionArgs, FakeShimArgs};

/// Target: p99 latency at [`TARGET_RATE`], in milliseconds.
pub const TARGET_P99_MS: f64 = 2.0;
/// The rate [`TARGET_P99_MS`] applies to, in requests per second.
pub const TARGET_RATE: f64 = 500.0;
/// `--find-max` reports the highest rate whose p99 stays under this many milliseconds.
pub const FIND_MAX_P99_MS: f64 = 10.0;

const WEBHOOK_BINARY: &str = "cloud-provider-webhook";
const WEBHOOK_BUILD_HINT: &str = "cargo build --release -p cloud-provider-webhook -p bench";
/// The PersistentVolume the reviews create; the fake shim labels it.
const PV_NAME: &str = "bench-pv";
/// The Service the probe sends, which the shim must refuse.
const REFUSED_SERVICE: &str = "bench-refused";
/// The `local` shim's `--csi-driver-name` in the run.
const LOCAL_CSI_DRIVER: &str = "bench.csi.local";
/// The inventory machine the `local` shim's volume lives on.
const LOCAL_MACHINE: &str = "bench-machine";
/// Requests sent before the first measured step (connections, the shim channel, caches).
const WARM_UP_REQUESTS: usize = 200;
/// The most steps `--find-max` runs.
const MAX_STEPS: usize = 16;
/// Rates `--find-max` multiplies by while p99 stays under the limit.
const STEP_FACTOR: f64 = 1.5;
/// Bisections `--find-max` makes between the last rate under the limit and the first over it.
const REFINEMENTS: u32 = 3;
/// A request not answered within this long counts as an error (the API server's default
/// `timeoutSeconds`).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The provider shim behind the webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShimKind {
    /// The fake provider of `tests/fake-provider`, served by `bench fake-shim`.
    Fake,
    /// The `local-shim` binary, with an address pool and a CSI driver of its own.
    Local,
}

impl ShimKind {
    fn describe(self) -> &'static str {
        match self {
            Self::Fake => "fake-provider (bench fake-shim process) over mutual TLS on loopback TCP",
            Self::Local => "local-shim over mutual TLS on loopback TCP",
        }
    }
}

/// Which webhook the reviews go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// A LoadBalancer Service CREATE to `/service-lb-validator` (ValidateLoadBalancer).
    ServiceLbValidator,
    /// A GCE PD PersistentVolume CREATE to `/pv-labeler` (GetLabelsForVolume, a patch back).
    PvLabeler,
}

impl Target {
    /// The webhook's name, as in `--webhooks` and its path.
    pub fn name(self) -> &'static str {
        match self {
            Self::ServiceLbValidator => "service-lb-validator",
            Self::PvLabeler => "pv-labeler",
        }
    }

    /// The `request` of the AdmissionReview (without its uid): one `shim` admits (labelling
    /// the volume), or with `refused`, a Service it refuses (an SCTP port).
    fn request(self, shim: ShimKind, refused: bool) -> serde_json::Value {
        let (name, protocol) = if refused {
            (REFUSED_SERVICE, "SCTP")
        } else {
            ("bench-lb", "TCP")
        };
        let volume_source = match shim {
            ShimKind::Fake => serde_json::json!({"gcePersistentDisk": {"pdName": "bench-disk"}}),
            ShimKind::Local => serde_json::json!({"csi": {
                "driver": LOCAL_CSI_DRIVER,
                "volumeHandle": "bench-volume",
                "volumeAttributes": {"local-shim/machine": LOCAL_MACHINE},
            }}),
        };
        match self {
            Self::ServiceLbValidator => serde_json::json!({
                "kind": {"group": "", "version": "v1", "kind": "Service"},
                "resource": {"group": "", "version": "v1", "resource": "services"},
                "operation": "CREATE",
                "name": name,
                "namespace": "default",
                "userInfo": {"username": "bench"},
                "object": {
                    "apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": name, "namespace": "default"},
                    "spec": {"type": "LoadBalancer", "selector": {"app": "bench"},
                             "ports": [{"name": "http", "port": 80, "protocol": protocol,
                                        "targetPort": 8080}]}
                },
                "oldObject": null,
                "dryRun": false,
            }),
            Self::PvLabeler => serde_json::json!({
                "kind": {"group": "", "version": "v1", "kind": "PersistentVolume"},
                "resource": {"group": "", "version": "v1", "resource": "persistentvolumes"},
                "operation": "CREATE",
                "name": PV_NAME,
                "userInfo": {"username": "bench"},
                "object": {
                    "apiVersion": "v1", "kind": "PersistentVolume",
                    "metadata": {"name": PV_NAME},
                    "spec": volume_spec(volume_source)
                },
                "dryRun": false,
            }),
        }
    }
}

/// A PersistentVolume spec with `source`.
fn volume_spec(source: serde_json::Value) -> serde_json::Value {
    let mut spec = serde_json::json!({
        "capacity": {"storage": "10Gi"},
        "accessModes": ["ReadWriteOnce"],
    });
    if let (Some(spec), serde_json::Value::Object(source)) = (spec.as_object_mut(), source) {
        spec.extend(source);
    }
    spec
}

/// A v1 AdmissionReview for `target` split around its uid, so each request gets its own uid
/// without serialising the review again.
#[derive(Debug, Clone)]
struct ReviewBody {
    prefix: Bytes,
    suffix: Bytes,
}

impl ReviewBody {
    const UID_MARK: &'static str = "@@uid@@";

    fn new(target: Target, shim: ShimKind, refused: bool) -> anyhow::Result<Self> {
        let mut request = target.request(shim, refused);
        request["uid"] = serde_json::json!(Self::UID_MARK);
        let review = serde_json::json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": request,
        })
        .to_string();
        let (prefix, suffix) = review
            .split_once(Self::UID_MARK)
            .context("the review template lost its uid mark")?;
        Ok(Self {
            prefix: Bytes::copy_from_slice(prefix.as_bytes()),
            suffix: Bytes::copy_from_slice(suffix.as_bytes()),
        })
    }

    fn with_uid(&self, uid: &str) -> Bytes {
        let mut body = Vec::with_capacity(self.prefix.len() + uid.len() + self.suffix.len());
        body.extend_from_slice(&self.prefix);
        body.extend_from_slice(uid.as_bytes());
        body.extend_from_slice(&self.suffix);
        Bytes::from(body)
    }
}

/// When each request of a step is due, from the step's start: request `i` at `i / rate`, for
/// every `i` with `i / rate < duration`.
pub fn schedule(rate: f64, duration: Duration) -> impl Iterator<Item = Duration> {
    let count = if rate > 0.0 {
        (rate * duration.as_secs_f64()).ceil() as u64
    } else {
        0
    };
    (0..count).map(move |i| Duration::from_secs_f64(i as f64 / rate))
}

/// The `q` quantile (0 < q ≤ 1) of `sorted` by nearest rank: the smallest sample with at least
/// `q` of the samples at or below it. `None` for no samples.
pub fn percentile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// The rate search of `--find-max`: multiply the rate by a factor while the step stays under
/// the limit, then bisect between the last rate under it and the first over it.
#[derive(Debug, Clone)]
pub struct RateSearch {
    factor: f64,
    refinements_left: u32,
    /// Highest rate under the limit so far.
    under: Option<f64>,
    /// Lowest rate over the limit so far.
    over: Option<f64>,
}

impl RateSearch {
    /// Rates below this are not tried (a webhook this slow has no useful maximum).
    pub const MIN_RATE: f64 = 10.0;

    /// A search multiplying by `factor` and then bisecting `refinements` times.
    pub fn new(factor: f64, refinements: u32) -> Self {
        Self {
            factor,
            refinements_left: refinements,
            under: None,
            over: None,
        }
    }

    /// Records whether the step at `rate` stayed under the limit; returns the next rate to try,
    /// or `None` when the search is over.
    pub fn record(&mut self, rate: f64, stayed_under: bool) -> Option<f64> {
        if stayed_under {
            self.under = Some(self.under.map_or(rate, |u| u.max(rate)));
        } else {
            self.over = Some(self.over.map_or(rate, |o| o.min(rate)));
        }
        match (self.under, self.over) {
            (_, None) => Some((rate * self.factor).round()),
            (None, Some(over)) => {
                let lower = (over / self.factor).round();
                (lower >= Self::MIN_RATE).then_some(lower)
            }
            (Some(under), Some(over)) => {
                let middle = ((under + over) / 2.0).round();
                if self.refinements_left == 0 || middle <= under || middle >= over {
                    return None;
                }
                self.refinements_left -= 1;
                Some(middle)
            }
        }
    }

    /// The highest rate that stayed under the limit.
    pub fn highest_under(&self) -> Option<f64> {
        self.under
    }
}

/// What one step at a fixed rate measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Step {
    /// Requests per second asked for.
    pub target_rate: f64,
    /// Seconds the requests were sent over.
    pub duration_seconds: f64,
    /// Requests sent.
    pub requests: usize,
    /// Requests answered `200` with `allowed: true` and their uid, per second from the first
    /// due time to the last answer.
    pub achieved_rps: f64,
    /// Requests that failed (transport error, timeout, another status, a denial, a wrong uid).
    pub errors: usize,
    /// The first error, for the report.
    pub first_error: Option<String>,
    /// Latency quantiles of the successful requests, from when each was due, in ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// 99.9th percentile, ms.
    pub p999_ms: f64,
    /// Slowest, ms.
    pub max_ms: f64,
    /// Webhook CPU seconds over the step.
    pub webhook_cpu_seconds: f64,
    /// Shim CPU seconds over the step.
    pub shim_cpu_seconds: f64,
    /// This process's CPU seconds over the step (the load generator shares the cores).
    pub bench_cpu_seconds: f64,
    /// How late the dispatcher sent its latest request, ms (counted in the latencies).
    pub latest_dispatch_ms: f64,
}

impl Step {
    /// No errors, p99 under `limit_ms`, and at least 95% of the asked rate achieved.
    pub fn stayed_under(&self, limit_ms: f64) -> bool {
        self.errors == 0 && self.p99_ms < limit_ms && self.achieved_rps >= 0.95 * self.target_rate
    }
}

/// Everything `bench admission` measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AdmissionReport {
    /// The webhook the reviews went to.
    pub webhook: Target,
    /// Keep-alive connections in the pool.
    pub connections: usize,
    /// The HTTP protocol of the pool.
    pub protocol: String,
    /// The provider behind the webhook and how it was reached.
    pub shim: String,
    /// Cargo profile of the measured binaries.
    pub build_profile: String,
    /// CPU cores of the machine.
    pub cores: usize,
    /// The steps, in the order run.
    pub steps: Vec<Step>,
    /// `--find-max`: the highest rate whose p99 stayed under [`FIND_MAX_P99_MS`].
    pub highest_rate_under_limit: Option<f64>,
    /// Webhook CPU seconds from its start to the end of the run.
    pub webhook_cpu_seconds: f64,
    /// Webhook peak RSS in MiB.
    pub webhook_peak_rss_mib: f64,
    /// Shim CPU seconds from its start to the end of the run.
    pub shim_cpu_seconds: f64,
    /// Shim peak RSS in MiB.
    pub shim_peak_rss_mib: f64,
}

/// Where the load goes.
#[derive(Clone)]
struct Endpoint {
    addr: SocketAddr,
    connector: tokio_rustls::TlsConnector,
    path: &'static str,
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

impl Endpoint {
    /// A new keep-alive HTTP/1.1 connection over TLS.
    async fn connect(&self) -> anyhow::Result<Sender> {
        let tcp = tokio::net::TcpStream::connect(self.addr)
            .await
            .with_context(|| format!("connecting to the webhook at {}", self.addr))?;
        // As Go's net package (the API server's client) does by default.
        tcp.set_nodelay(true).context("setting TCP_NODELAY")?;
        let name = rustls::pki_types::ServerName::try_from("localhost")
            .context("the webhook's certificate name")?;
        let tls = self
            .connector
            .connect(name, tcp)
            .await
            .with_context(|| format!("TLS handshake with the webhook at {}", self.addr))?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .context("HTTP/1.1 handshake with the webhook")?;
        tokio::spawn(async move {
            // The connection ends when its sender is dropped or the webhook closes it; the
            // sender then reports the error on its next request.
            let _ = connection.await;
        });
        Ok(sender)
    }

    /// Sends one review; `Ok` when it was allowed with its uid echoed.
    async fn review(&self, sender: &mut Sender, body: Bytes, uid: &str) -> Result<(), String> {
        let text = self.answer(sender, body).await?;
        if !text.contains("\"allowed\":true") || !text.contains(uid) {
            return Err(format!("not allowed, or uid {uid} not echoed: {text}"));
        }
        Ok(())
    }

    /// Sends one review; the body of its `200` answer.
    async fn answer(&self, sender: &mut Sender, body: Bytes) -> Result<String, String> {
        sender
            .ready()
            .await
            .map_err(|e| format!("connection: {e}"))?;
        let request = http::Request::post(self.path)
            .header(http::header::HOST, "localhost")
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| format!("building the request: {e}"))?;
        let answer = sender
            .send_request(request)
            .await
            .map_err(|e| format!("sending: {e}"))?;
        let status = answer.status();
        let body = answer
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        let text = String::from_utf8_lossy(&body).into_owned();
        if status != http::StatusCode::OK {
            return Err(format!("status {status}: {}", last_lines(&text, 3)));
        }
        Ok(text)
    }
}

/// One request's outcome: when it finished and its latency, or why it failed.
type Outcome = Result<(Instant, Duration), String>;

/// What [`send_at_rate`] saw.
struct Sent {
    /// When the first request was due.
    start: Instant,
    /// Every request's outcome.
    outcomes: Vec<Outcome>,
    /// How late the dispatcher sent the latest request.
    latest_dispatch: Duration,
}

/// Sends `rate` requests per second for `duration` over `connections` keep-alive
/// connections.
async fn send_at_rate(
    endpoint: &Endpoint,
    body: &ReviewBody,
    connections: usize,
    rate: f64,
    duration: Duration,
    uid_prefix: &str,
) -> anyhow::Result<Sent> {
    let (jobs, queue) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant)>();
    let queue = Arc::new(tokio::sync::Mutex::new(queue));
    let mut workers = Vec::with_capacity(connections);
    for _ in 0..connections {
        let mut sender = endpoint.connect().await?;
        let (endpoint, body, queue) = (endpoint.clone(), body.clone(), queue.clone());
        let uid_prefix = uid_prefix.to_string();
        workers.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            loop {
                let next = queue.lock().await.recv().await;
                let Some((i, due)) = next else { break };
                let uid = format!("{uid_prefix}-{i}");
                if sender.is_closed() {
                    match endpoint.connect().await {
                        Ok(fresh) => sender = fresh,
                        Err(e) => {
                            outcomes.push(Err(format!("{e:#}")));
                            continue;
                        }
                    }
                }
                let sent = endpoint.review(&mut sender, body.with_uid(&uid), &uid);
                let outcome = match tokio::time::timeout(REQUEST_TIMEOUT, sent).await {
                    Ok(Ok(())) => {
                        let done = Instant::now();
                        Ok((done, done.saturating_duration_since(due)))
                    }
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(format!("no answer within {REQUEST_TIMEOUT:?}")),
                };
                outcomes.push(outcome);
            }
            outcomes
        }));
    }
    // Dispatch on schedule from a thread of its own: the runtime's timer wheel rounds sleeps
    // up to the next millisecond, which would add up to 1 ms to every latency counted from
    // the due time; a thread's sleep wakes within tens of microseconds. A late wake-up sends
    // the overdue requests at once, their latency still counted from when they were due.
    let start = Instant::now() + Duration::from_millis(5);
    let offsets: Vec<Duration> = schedule(rate, duration).collect();
    let dispatcher = std::thread::spawn(move || {
        let mut latest = Duration::ZERO;
        for (i, offset) in offsets.into_iter().enumerate() {
            let due = start + offset;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            latest = latest.max(Instant::now().saturating_duration_since(due));
            if jobs.send((i, due)).is_err() {
                break;
            }
        }
        latest
    });
    let mut outcomes = Vec::new();
    for worker in workers {
        outcomes.extend(worker.await.context("a load worker panicked")?);
    }
    let latest = dispatcher
        .join()
        .map_err(|_| anyhow::anyhow!("the dispatcher thread panicked"))?;
    Ok(Sent {
        start,
        outcomes,
        latest_dispatch: latest,
    })
}

/// The running processes of a run.
struct Processes {
    webhook: Process,
    shim: Process,
    ticks: f64,
}

impl Processes {
    fn cpu(&self) -> anyhow::Result<(f64, f64, f64)> {
        Ok((
            procfs::cpu_seconds(&self.webhook.pid().to_string(), self.ticks)?,
            procfs::cpu_seconds(&self.shim.pid().to_string(), self.ticks)?,
            procfs::cpu_seconds("self", self.ticks)?,
        ))
    }

    /// Why the run cannot go on, if a process has exited.
    fn exited(&self) -> Option<String> {
        [&self.webhook, &self.shim].into_iter().find_map(|p| {
            p.exit_status().map(|status| {
                format!(
                    "{} exited ({status}); log tail:\n{}",
                    p.name(),
                    last_lines(&p.logs(), 40)
                )
            })
        })
    }
}

/// Runs one measured step.
async fn step(
    endpoint: &Endpoint,
    body: &ReviewBody,
    processes: &Processes,
    connections: usize,
    rate: f64,
    duration: Duration,
    index: usize,
) -> anyhow::Result<Step> {
    progress(format_args!(
        "{rate:.0} requests/s for {:.1} s over {connections} connections",
        duration.as_secs_f64()
    ));
    let before = processes.cpu()?;
    let Sent {
        start,
        outcomes,
        latest_dispatch,
    } = send_at_rate(
        endpoint,
        body,
        connections,
        rate,
        duration,
        &format!("step{index}"),
    )
    .await?;
    let after = processes.cpu()?;
    if let Some(why) = processes.exited() {
        anyhow::bail!("{why}");
    }
    let requests = outcomes.len();
    let mut latencies = Vec::with_capacity(requests);
    let mut last_done = start;
    let mut errors = 0;
    let mut first_error = None;
    for outcome in outcomes {
        match outcome {
            Ok((done, latency)) => {
                last_done = last_done.max(done);
                latencies.push(latency);
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    latencies.sort_unstable();
    let ms = |q: f64| percentile(&latencies, q).map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
    let span = last_done.duration_since(start).as_secs_f64();
    Ok(Step {
        target_rate: rate,
        duration_seconds: duration.as_secs_f64(),
        requests,
        achieved_rps: if span > 0.0 {
            latencies.len() as f64 / span
        } else {
            0.0
        },
        errors,
        first_error,
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: ms(1.0),
        webhook_cpu_seconds: after.0 - before.0,
        shim_cpu_seconds: after.1 - before.1,
        bench_cpu_seconds: after.2 - before.2,
        latest_dispatch_ms: latest_dispatch.as_secs_f64() * 1e3,
    })
}

/// Runs `bench admission`.
pub async fn admission(args: &AdmissionArgs) -> anyhow::Result<AdmissionReport> {
    anyhow::ensure!(
        args.rate > 0.0 && args.rate.is_finite(),
        "--rate must be positive"
    );
    anyhow::ensure!(args.duration_secs > 0, "--duration-secs must be positive");
    anyhow::ensure!(
        (1..=1024).contains(&args.connections),
        "--connections must be in 1..=1024"
    );
    let Machine {
        profile,
        ticks,
        cores,
    } = Machine::check()?;
    let work =
        temp_dir("ccm-bench-admission-", Location::System).context("creating a work directory")?;
    let dir = work.path();

    let shim_port = test_support::free_port().context("finding a free port for the shim")?;
    let webhook_port = test_support::free_port().context("finding a free port for the webhook")?;
    let mtls = ShimMtls::write(dir, "bench-admission-cpi")?;
    let serving_ca = test_pki::Ca::new("bench-admission-webhook")?;
    let serving = serving_ca.issue(&["localhost", "127.0.0.1"])?;
    let (cert, key) = (dir.join("webhook.pem"), dir.join("webhook-key.pem"));
    test_pki::write_atomic(&cert, serving.chain_pem.as_bytes(), false)?;
    test_pki::write_atomic(&key, serving.key_pem.as_bytes(), true)?;

    progress(format_args!(
        "starting {} (127.0.0.1:{shim_port}) and {WEBHOOK_BINARY}",
        args.shim.describe()
    ));
    let env = [("RUST_LOG", args.log_level.as_str()), ("NO_COLOR", "1")];
    let mut shim_args = mtls.shim_args(shim_port);
    shim_args.push("--metrics-bind-address=0".into());
    let shim = match args.shim {
        ShimKind::Fake => {
            let bench_exe = std::env::current_exe().context("locating the bench executable")?;
            shim_args.insert(0, "fake-shim".into());
            Process::builder("fake-shim", bench_exe, dir.join("fake-shim.log"))
        }
        ShimKind::Local => {
            let inventory = dir.join("inventory.yaml");
            std::fs::write(&inventory, local_inventory())
                .with_context(|| format!("writing {}", inventory.display()))?;
            let lb_config = dir.join("lb-config.yaml");
            std::fs::write(
                &lb_config,
                "pools:\n  - name: bench\n    addresses: [\"127.77.0.0/16\"]\n",
            )
            .with_context(|| format!("writing {}", lb_config.display()))?;
            shim_args.extend([
                format!("--inventory={}", inventory.display()),
                format!("--state-dir={}", dir.join("shim-state").display()),
                format!("--lb-config={}", lb_config.display()),
                format!("--csi-driver-name={LOCAL_CSI_DRIVER}"),
                // ValidateLoadBalancer and GetLabelsForVolume change nothing: no fence.
                "--fence-lease=none".into(),
            ]);
            Process::for_workspace_binary(SHIM_BINARY, "local-shim", dir)?
        }
    }
    .args(shim_args)
    .envs(env)
    .spawn()?;
    let mut webhook_args = vec![
        format!("--webhooks={}", args.webhook.name()),
        "--webhook-bind-address=127.0.0.1".into(),
        format!("--webhook-secure-port={webhook_port}"),
        format!("--webhook-tls-cert-file={}", cert.display()),
        format!("--webhook-tls-private-key-file={}", key.display()),
        "--cluster-name=bench".into(),
    ];
    webhook_args.extend(mtls.ccm_args(shim_port));
    let webhook = match Process::for_workspace_binary(WEBHOOK_BINARY, "webhook", dir) {
        Ok(builder) => builder.args(webhook_args).envs(env).spawn()?,
        Err(test_support::Error::MissingBinary { .. }) => anyhow::bail!(
            "{WEBHOOK_BINARY} is not built next to this bench executable; build it with `{WEBHOOK_BUILD_HINT}`"
        ),
        Err(e) => return Err(e.into()),
    };
    let processes = Processes {
        webhook,
        shim,
        ticks,
    };
    let connector = test_support::tls_connector(serving_ca.cert_der())?;
    let addr = SocketAddr::from(([127, 0, 0, 1], webhook_port));
    wait_ready(&connector, addr, &processes).await?;

    let result = measure(args, &processes, connector, addr).await;
    let usage = (
        procfs::usage(&processes.webhook.pid().to_string(), ticks),
        procfs::usage(&processes.shim.pid().to_string(), ticks),
    );
    processes.webhook.terminate(Duration::from_secs(5));
    processes.shim.terminate(Duration::from_secs(5));
    if let Some(into) = args.keep_logs.as_deref()
        && let Err(e) = copy_logs(
            into,
            dir,
            &["webhook.log", "fake-shim.log", "local-shim.log"],
        )
    {
        eprintln!("bench: --keep-logs {}: {e}", into.display());
    }
    let (steps, highest) = result?;
    let (webhook_usage, shim_usage) = (usage.0?, usage.1?);
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    Ok(AdmissionReport {
        webhook: args.webhook,
        connections: args.connections,
        protocol: "HTTP/1.1 keep-alive over TLS 1.3 (the webhook offers only http/1.1)".into(),
        shim: args.shim.describe().into(),
        build_profile: profile,
        cores,
        steps,
        highest_rate_under_limit: highest,
        webhook_cpu_seconds: webhook_usage.cpu_seconds,
        webhook_peak_rss_mib: mib(webhook_usage.peak_rss_bytes),
        shim_cpu_seconds: shim_usage.cpu_seconds,
        shim_peak_rss_mib: mib(shim_usage.peak_rss_bytes),
    })
}

/// The warm-up, then one step at `--rate`, or the `--find-max` search.
async fn measure(
    args: &AdmissionArgs,
    processes: &Processes,
    connector: tokio_rustls::TlsConnector,
    addr: SocketAddr,
) -> anyhow::Result<(Vec<Step>, Option<f64>)> {
    let endpoint = Endpoint {
        addr,
        connector,
        path: match args.webhook {
            Target::ServiceLbValidator => "/service-lb-validator",
            Target::PvLabeler => "/pv-labeler",
        },
    };
    probe(&endpoint, args.webhook, args.shim).await?;
    let body = ReviewBody::new(args.webhook, args.shim, false)?;
    let duration = Duration::from_secs(args.duration_secs);
    let warm_up = Duration::from_secs_f64(WARM_UP_REQUESTS as f64 / args.rate);
    let warm = step(
        &endpoint,
        &body,
        processes,
        args.connections,
        args.rate,
        warm_up,
        0,
    )
    .await?;
    if warm.errors > 0 {
        anyhow::bail!(
            "{} of {} warm-up requests failed; first: {}",
            warm.errors,
            warm.requests,
            warm.first_error.unwrap_or_default()
        );
    }
    let mut steps = Vec::new();
    if !args.find_max {
        steps.push(
            step(
                &endpoint,
                &body,
                processes,
                args.connections,
                args.rate,
                duration,
                1,
            )
            .await?,
        );
        return Ok((steps, None));
    }
    let mut search = RateSearch::new(STEP_FACTOR, REFINEMENTS);
    let mut rate = args.rate;
    for index in 1..=MAX_STEPS {
        let measured = step(
            &endpoint,
            &body,
            processes,
            args.connections,
            rate,
            duration,
            index,
        )
        .await?;
        let under = measured.stayed_under(FIND_MAX_P99_MS);
        progress(format_args!(
            "  p99 {:.2} ms, {:.0} rps achieved, {} errors: {}",
            measured.p99_ms,
            measured.achieved_rps,
            measured.errors,
            if under { "under" } else { "over" }
        ));
        steps.push(measured);
        match search.record(rate, under) {
            Some(next) => rate = next,
            None => break,
        }
        // Let queues drain and connections settle between steps.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok((steps, search.highest_under()))
}

/// Checks the shim is on the path: it refuses the refused Service, or labels the volume (a
/// shim without the capability would let the webhook allow everything without asking).
async fn probe(endpoint: &Endpoint, target: Target, shim: ShimKind) -> anyhow::Result<()> {
    let mut sender = endpoint.connect().await?;
    let (refused, expected, capability) = match target {
        Target::ServiceLbValidator => (true, "\"allowed\":false", "LoadBalancerValidation"),
        Target::PvLabeler => (false, "\"patchType\":\"JSONPatch\"", "VolumeLabels"),
    };
    let body = ReviewBody::new(target, shim, refused)?.with_uid("probe");
    let answer = endpoint
        .answer(&mut sender, body)
        .await
        .map_err(|e| anyhow::anyhow!("the probe review failed: {e}"))?;
    anyhow::ensure!(
        answer.contains(expected),
        "the {shim:?} shim is not on the path of /{}: the probe review's answer lacks {expected} (does the shim serve {capability}?): {answer}",
        target.name()
    );
    Ok(())
}

/// The `local` shim's inventory: the machine the bench's volume lives on.
fn local_inventory() -> String {
    format!(
        "region: bench-region\nmachines:\n  - name: {LOCAL_MACHINE}\n    instanceID: m-bench\n    instanceType: local.small\n    zone: bench-zone\n    addresses:\n      - {{type: InternalIP, address: 127.0.0.1}}\n"
    )
}

/// Waits until the webhook answers `/readyz` (which asks the shim) with 200.
async fn wait_ready(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    processes: &Processes,
) -> anyhow::Result<()> {
    let ready = Wait::new("the webhook to be ready", Duration::from_secs(30))
        .every(Duration::from_millis(50))
        .until(|| async {
            if let Some(why) = processes.exited() {
                return Ok(Err(why));
            }
            match test_support::https_get(connector, addr, "/readyz", None).await {
                Ok((200, _)) => Ok(Ok(())),
                Ok((code, answer)) => Err(format!("/readyz answered {code}: {answer}")),
                Err(e) => Err(e.to_string()),
            }
        })
        .await;
    match ready {
        Ok(Ok(())) => Ok(()),
        Ok(Err(why)) => anyhow::bail!("{why}"),
        Err(e) => anyhow::bail!(
            "{e}; webhook log tail:\n{}\nshim log tail:\n{}",
            last_lines(&processes.webhook.logs(), 30),
            last_lines(&processes.shim.logs(), 30)
        ),
    }
}

/// `bench fake-shim`: serves the fake provider with LoadBalancerValidation (allowing every
/// Service) and VolumeLabels (zone and region for [`PV_NAME`]) until SIGTERM. Its call log is
/// emptied every 100 ms so the log does not grow with the load.
pub async fn fake_shim(args: FakeShimArgs) -> anyhow::Result<()> {
    let mut fake = fake_provider::FakeCloud {
        lb_validation_enabled: true,
        volume_labels_enabled: true,
        ..fake_provider::FakeCloud::default()
    };
    fake.volume_labels.insert(
        PV_NAME.into(),
        [
            ("topology.kubernetes.io/zone", "zone-a"),
            ("topology.kubernetes.io/region", "region-a"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
    );
    fake.lb_validation.insert(
        format!("default/{REFUSED_SERVICE}"),
        fake_provider::proto::ValidateLoadBalancerResponse {
            violations: vec![fake_provider::proto::Violation {
                field: "service.spec.ports[0].protocol".into(),
                message: "SCTP is not served".into(),
            }],
            ..Default::default()
        },
    );
    let served = fake.serve_with(args.serve).await?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = tick.tick() => served.update(|f| {
                f.calls.clear();
                f.validations_asked.clear();
                f.volumes_asked.clear();
            }),
        }
    }
    served.shutdown().await?;
    Ok(())
}

/// Renders the report as text.
pub fn render_text(r: &AdmissionReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "admission: /{}, {} connections of {}; {}; {} build, {} cores",
        r.webhook.name(),
        r.connections,
        r.protocol,
        r.shim,
        r.build_profile,
        r.cores
    );
    for s in &r.steps {
        let target = if (s.target_rate - TARGET_RATE).abs() < f64::EPSILON {
            format!(
                "   target p99 <= {TARGET_P99_MS} ms {}",
                verdict(s.errors == 0 && s.p99_ms <= TARGET_P99_MS)
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "  {:6.0} rps asked, {:7.1} achieved, {} requests, {} errors: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms{target}",
            s.target_rate,
            s.achieved_rps,
            s.requests,
            s.errors,
            s.p50_ms,
            s.p99_ms,
            s.p999_ms,
            s.max_ms
        );
        let _ = writeln!(
            out,
            "         CPU over {:.0} s: webhook {:.2} s ({:.0} µs/request), shim {:.2} s, bench client {:.2} s; latest dispatch {:.2} ms after due",
            s.duration_seconds,
            s.webhook_cpu_seconds,
            s.webhook_cpu_seconds * 1e6 / s.requests.max(1) as f64,
            s.shim_cpu_seconds,
            s.bench_cpu_seconds,
            s.latest_dispatch_ms
        );
        if let Some(e) = &s.first_error {
            let _ = writeln!(out, "         first error: {e}");
        }
    }
    if r.steps.len() > 1 || r.highest_rate_under_limit.is_some() {
        match r.highest_rate_under_limit {
            Some(rate) => {
                let _ = writeln!(
                    out,
                    "  highest rate with p99 < {FIND_MAX_P99_MS} ms: {rate:.0} rps"
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "  no rate tried kept p99 under {FIND_MAX_P99_MS} ms without errors"
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "  whole run: webhook {:.2} s CPU, peak RSS {:.1} MiB; shim {:.2} s CPU, peak RSS {:.1} MiB",
        r.webhook_cpu_seconds, r.webhook_peak_rss_mib, r.shim_cpu_seconds, r.shim_peak_rss_mib
    );
    out
}

/// Copies the files `names` of `dir` to `into` (for `--keep-logs`).
fn copy_logs(into: &Path, dir: &Path, names: &[&str]) -> std::io::Result<()> {
    std::fs::create_dir_all(into)?;
    for name in names {
        let from = dir.join(name);
        if from.exists() {
            std::fs::copy(&from, into.join(name))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_spaces_requests_evenly_from_zero() {
        let due: Vec<Duration> = schedule(4.0, Duration::from_secs(1)).collect();
        assert_eq!(
            due,
            [0, 250, 500, 750].map(Duration::from_millis).to_vec(),
            "request i is due at i / rate"
        );
        assert_eq!(schedule(500.0, Duration::from_secs(10)).count(), 5000);
        // A fractional count rounds up: 2.5 requests over 1 s is request 0, 1 and 2.
        assert_eq!(schedule(2.5, Duration::from_secs(1)).count(), 3);
        assert_eq!(schedule(0.0, Duration::from_secs(1)).count(), 0);
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let sorted: Vec<Duration> = (1..=1000).map(Duration::from_micros).collect();
        assert_eq!(percentile(&sorted, 0.5), Some(Duration::from_micros(500)));
        assert_eq!(percentile(&sorted, 0.99), Some(Duration::from_micros(990)));
        assert_eq!(percentile(&sorted, 0.999), Some(Duration::from_micros(999)));
        assert_eq!(percentile(&sorted, 1.0), Some(Duration::from_micros(1000)));
        // Fewer samples than the quantile resolves: the slowest one.
        let few = [1, 2, 3].map(Duration::from_millis);
        assert_eq!(percentile(&few, 0.999), Some(Duration::from_millis(3)));
        assert_eq!(percentile(&few, 0.0), Some(Duration::from_millis(1)));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn rate_search_steps_up_then_bisects() {
        let mut search = RateSearch::new(1.5, 2);
        assert_eq!(search.record(500.0, true), Some(750.0));
        assert_eq!(search.record(750.0, true), Some(1125.0));
        // Over the limit: bisect between 750 and 1125, twice.
        assert_eq!(search.record(1125.0, false), Some(938.0));
        assert_eq!(search.record(938.0, true), Some(1032.0));
        assert_eq!(search.record(1032.0, false), None);
        assert_eq!(search.highest_under(), Some(938.0));
    }

    #[test]
    fn rate_search_steps_down_when_the_first_rate_is_over() {
        let mut search = RateSearch::new(2.0, 0);
        assert_eq!(search.record(40.0, false), Some(20.0));
        assert_eq!(search.record(20.0, false), Some(10.0));
        assert_eq!(search.record(10.0, false), None, "not below MIN_RATE");
        assert_eq!(search.highest_under(), None);
    }

    #[test]
    fn review_body_carries_each_uid_in_a_v1_review() {
        for target in [Target::ServiceLbValidator, Target::PvLabeler] {
            for shim in [ShimKind::Fake, ShimKind::Local] {
                let body = ReviewBody::new(target, shim, false)
                    .unwrap()
                    .with_uid("step1-42");
                let review: serde_json::Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
                assert_eq!(review["request"]["uid"], "step1-42");
                assert_eq!(review["request"]["operation"], "CREATE");
            }
        }
    }

    #[test]
    fn probe_service_has_an_sctp_port_and_volumes_a_source_per_shim() {
        let refused = Target::ServiceLbValidator.request(ShimKind::Local, true);
        assert_eq!(refused["object"]["metadata"]["name"], REFUSED_SERVICE);
        assert_eq!(refused["object"]["spec"]["ports"][0]["protocol"], "SCTP");
        let local = Target::PvLabeler.request(ShimKind::Local, false);
        assert_eq!(
            local["object"]["spec"]["csi"]["driver"], LOCAL_CSI_DRIVER,
            "{local}"
        );
        assert_eq!(local["object"]["spec"]["capacity"]["storage"], "10Gi");
        let fake = Target::PvLabeler.request(ShimKind::Fake, false);
        assert!(
            fake["object"]["spec"]["gcePersistentDisk"].is_object(),
            "{fake}"
        );
    }

    #[test]
    fn a_step_with_errors_or_a_backlog_is_not_under_the_limit() {
        let step = Step {
            target_rate: 1000.0,
            duration_seconds: 10.0,
            requests: 10_000,
            achieved_rps: 990.0,
            errors: 0,
            first_error: None,
            p50_ms: 0.5,
            p99_ms: 3.0,
            p999_ms: 8.0,
            max_ms: 12.0,
            webhook_cpu_seconds: 1.0,
            shim_cpu_seconds: 0.5,
            bench_cpu_seconds: 0.5,
            latest_dispatch_ms: 0.1,
        };
        assert!(step.stayed_under(10.0));
        assert!(!step.stayed_under(3.0));
        assert!(
            !Step {
                errors: 1,
                ..step.clone()
            }
            .stayed_under(10.0)
        );
        assert!(
            !Step {
                achieved_rps: 900.0,
                ..step
            }
            .stayed_under(10.0)
        );
    }
}
