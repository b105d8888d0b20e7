//! Stand-ins for the token services, shared by the binary's tests and the bench (feature
//! `test-servers`): a `moto_server` child for ECR and STS, and a canned HTTP/1.1 server for
//! the GCE metadata server, Google STS, Azure IMDS / AAD and a registry's `/v2/` and
//! `/oauth2/exchange`.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Why a stand-in could not start.
#[derive(Debug, thiserror::Error)]
pub enum TestServerError {
    /// No `moto_server` executable.
    #[error(
        "moto_server not found: run tests/run-all.sh (it installs moto[server] into {venv}) or `pip install 'moto[server]'`"
    )]
    MotoMissing {
        /// Where the test-assets venv would hold it.
        venv: PathBuf,
    },
    /// A socket or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        source: std::io::Error,
    },
    /// `moto_server` did not listen in time.
    #[error("moto_server did not listen on 127.0.0.1:{port} within {secs} s")]
    MotoTimeout {
        /// Its port.
        port: u16,
        /// How long was waited.
        secs: u64,
    },
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> TestServerError {
    move |source| TestServerError::Io { what, source }
}

/// `moto_server` from the test-assets venv (`$CCM_TEST_ASSETS_CACHE`, default
/// `~/.cache/ccm-test-assets`, `moto-venv/bin/moto_server`) or `PATH`.
pub fn moto_server() -> Result<PathBuf, TestServerError> {
    let cache = std::env::var("CCM_TEST_ASSETS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/ccm-test-assets")
        });
    let venv = cache.join("moto-venv/bin/moto_server");
    if venv.exists() {
        return Ok(venv);
    }
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| Path::new(d).join("moto_server"))
        .find(|p| p.exists())
        .ok_or(TestServerError::MotoMissing { venv })
}

/// A running `moto_server` on loopback, killed on drop.
pub struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    /// Starts one on a free port and waits until it listens.
    pub fn start() -> Result<Self, TestServerError> {
        let port = free_port()?;
        let child = Command::new(moto_server()?)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io("starting moto_server"))?;
        let moto = Self { child, port };
        let deadline = Duration::from_secs(20);
        let start = Instant::now();
        while start.elapsed() < deadline {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(moto);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(TestServerError::MotoTimeout {
            port,
            secs: deadline.as_secs(),
        })
    }

    /// Its endpoint, for `AWS_ENDPOINT_URL`.
    pub fn endpoint(&self) -> String {
        format!("http://localhost:{}", self.port)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The environment that sends the AWS SDK to it with dummy static credentials and no
    /// instance metadata or shared config.
    pub fn aws_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
            ("AWS_CONFIG_FILE", "/nonexistent".into()),
            ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent".into()),
        ]
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16, TestServerError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(io("finding a free port"))
}

/// One canned answer: requests whose path starts with `path` get `status` (e.g. `200 OK`),
/// the extra header lines `headers` (each ending in `\r\n`) and `body`.
#[derive(Debug, Clone)]
pub struct Route {
    /// Status line after `HTTP/1.1 `.
    pub status: &'static str,
    /// Path prefix.
    pub path: String,
    /// Extra header lines.
    pub headers: String,
    /// Body.
    pub body: String,
}

impl Route {
    /// `200 OK` with a JSON body.
    pub fn json(path: impl Into<String>, body: impl Into<String>) -> Self {
        Self {
            status: "200 OK",
            path: path.into(),
            headers: "Content-Type: application/json\r\n".into(),
            body: body.into(),
        }
    }
}

/// A request the server received.
#[derive(Debug, Clone)]
pub struct Received {
    /// Method.
    pub method: String,
    /// Path with query.
    pub path: String,
    /// Header lines, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: String,
}

/// A tiny HTTP/1.1 server on loopback answering by path prefix, one connection at a time.
/// Paths containing `metadata` are answered only with the metadata servers' header
/// (`Metadata-Flavor: Google` or `Metadata: true`), as the real ones insist; everything else
/// gets `404`.
pub struct CannedServer {
    port: u16,
    hits: Arc<AtomicUsize>,
    received: mpsc::Receiver<Received>,
}

impl CannedServer {
    /// Starts serving `routes` on a thread.
    pub fn start(routes: Vec<Route>) -> Result<Self, TestServerError> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(io("binding a test server"))?;
        let port = listener
            .local_addr()
            .map_err(io("reading the test server's address"))?
            .port();
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let (tx, received) = mpsc::channel();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                counter.fetch_add(1, Ordering::SeqCst);
                // A connection that breaks is the client's problem; serve the next one.
                let _ = answer(stream, &routes, &tx);
            }
        });
        Ok(Self {
            port,
            hits,
            received,
        })
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Connections accepted so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// The requests answered since the last call.
    pub fn received(&self) -> Vec<Received> {
        self.received.try_iter().collect()
    }
}

/// Reads one request, records it (before answering, so a client that has its answer finds it
/// recorded) and answers it.
fn answer(
    stream: TcpStream,
    routes: &[Route],
    record: &mpsc::Sender<Received>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut words = line.split_whitespace();
    let method = words.next().unwrap_or_default().to_string();
    let path = words.next().unwrap_or_default().to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        if let Some((name, value)) = h.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let len = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let flavor_ok =
        header("metadata-flavor") == Some("Google") || header("metadata") == Some("true");
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    let route = routes
        .iter()
        .find(|r| path.starts_with(&r.path) && (flavor_ok || !r.path.contains("metadata")));
    let (status, extra, reply) = match route {
        Some(r) => (r.status, r.headers.as_str(), r.body.as_str()),
        None => ("404 Not Found", "", ""),
    };
    let _ = record.send(Received {
        method,
        path,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    });
    let mut s = stream;
    write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{reply}",
        reply.len()
    )
}
