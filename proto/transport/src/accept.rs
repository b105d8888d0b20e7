//! Accepting TCP connections under limits, so that idle and slow clients cannot take a port
//! away from legitimate ones (issue 8: about 1024 idle sockets used to fill the handshake cap
//! and every new connection, kubelet probes included, was refused).
//!
//! Every listener started here ([`tls_incoming_with`], [`tcp_incoming`]) applies
//! [`AcceptLimits`]:
//!
//! - **Handshakes** (TLS only): each must complete within `handshake_timeout`. At most
//!   `max_handshakes` run at once; when a new connection arrives at that cap, the *oldest*
//!   handshake in progress is closed to make room. A real client completes its handshake within
//!   a few round trips, so to keep it out a flood would have to open `max_handshakes` new
//!   connections during that time; idle sockets and byte-by-byte handshakes are simply pushed
//!   out by the next arrivals.
//! - **Established connections**: at most `max_connections`; when a connection is admitted at
//!   that cap, the established connection that has been idle the longest (no byte read or
//!   written) is closed. New connections are therefore never refused for being one too many, and
//!   a client that keeps connections open without using them loses them first. Gracefully
//!   served HTTP/2 connections are never idle for long: the server pings every 30 s.
//! - **Idle connections**: an established connection without a byte in either direction for
//!   `idle_timeout` is closed.
//! - **TCP**: `TCP_NODELAY`, and TCP keepalive probes after `tcp_keepalive` of silence, so the
//!   sockets of vanished peers are reclaimed.
//!
//! Warnings about what a client can cause at will (failed or abandoned handshakes, connections
//! closed by the cap, failed `accept` calls) are rate limited to one per
//! [`crate::WARN_INTERVAL`] each; the rest are logged at `debug` and counted in the
//! next warning's `suppressed` field.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::MissedTickBehavior;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tracing::debug;

use crate::log_limit::{LogLimiter, warn_limited};

/// How long a client may take to complete the TLS handshake before it is disconnected.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Default cap on TLS handshakes in progress; at the cap the oldest one is closed.
pub const MAX_HANDSHAKES: usize = 256;

/// Default cap on established connections; at the cap the one idle the longest is closed.
pub const MAX_CONNECTIONS: usize = 1024;

/// Default time without a byte in either direction after which a connection is closed: four
/// times the HTTP/2 keepalive interval, so it only catches connections nobody serves.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Default silence on a socket before the kernel starts TCP keepalive probes.
pub const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// Interval between TCP keepalive probes, and how many may go unanswered: a vanished peer is
/// noticed about 60 s after its last packet.
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const TCP_KEEPALIVE_RETRIES: u32 = 3;

/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Connections accepted but not yet taken by the server; they count as established.
const QUEUE: usize = 64;

/// Bounds on what one listening port holds (see the [module documentation](self)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptLimits {
    /// How long a TLS handshake may take.
    pub handshake_timeout: Duration,
    /// TLS handshakes in progress at once (at least 1); at the cap the oldest is closed.
    pub max_handshakes: usize,
    /// Established connections at once (at least 1); at the cap the one idle the longest is
    /// closed.
    pub max_connections: usize,
    /// Time without a byte in either direction after which a connection is closed; `None`
    /// keeps idle connections.
    pub idle_timeout: Option<Duration>,
    /// Silence before TCP keepalive probes start; `None` leaves the system default (off).
    pub tcp_keepalive: Option<Duration>,
}

impl Default for AcceptLimits {
    fn default() -> Self {
        Self {
            handshake_timeout: HANDSHAKE_TIMEOUT,
            max_handshakes: MAX_HANDSHAKES,
            max_connections: MAX_CONNECTIONS,
            idle_timeout: Some(IDLE_TIMEOUT),
            tcp_keepalive: Some(TCP_KEEPALIVE),
        }
    }
}

/// The TLS connections accepted on `listener` under `limits`, each handshaken with the
/// configuration `config` returns at accept time (so reloaded certificates apply to new
/// connections). Only connections whose handshake succeeded (for a server requiring client
/// certificates: whose certificate was accepted) are yielded. Accepting stops, and handshakes in
/// progress are abandoned, when the stream is dropped.
pub fn tls_incoming_with(
    listener: TcpListener,
    config: impl Fn() -> Arc<rustls::ServerConfig> + Send + 'static,
    limits: AcceptLimits,
) -> impl futures::Stream<Item = TrackedConnection<TlsStream<TcpStream>>> + Send + 'static {
    let (tx, rx) = mpsc::channel(QUEUE);
    let established = Established::new(&limits);
    let admission = TlsAdmission {
        config,
        tx: tx.clone(),
        established: Arc::clone(&established),
        handshakes: Arc::new(Handshakes::new(limits.max_handshakes)),
        failures: Arc::new(LogLimiter::default()),
        timeout: limits.handshake_timeout,
        next_id: 0,
    };
    run_accept_loop(
        rx,
        accept_loop(listener, limits, admission, established, tx),
    )
}

/// The plain TCP connections accepted on `listener` under `limits` (handshake limits do not
/// apply). Accepting stops when the stream is dropped.
pub fn tcp_incoming(
    listener: TcpListener,
    limits: AcceptLimits,
) -> impl futures::Stream<Item = TrackedConnection<TcpStream>> + Send + 'static {
    let (tx, rx) = mpsc::channel(QUEUE);
    let established = Established::new(&limits);
    run_accept_loop(
        rx,
        accept_loop(listener, limits, PlainAdmission, established, tx),
    )
}

/// Runs `accept_loop` for as long as the returned stream of what it accepts exists.
fn run_accept_loop<T: Send + 'static>(
    rx: mpsc::Receiver<T>,
    accept_loop: impl Future<Output = ()> + Send + 'static,
) -> impl futures::Stream<Item = T> + Send + 'static {
    // The accept loop ends by itself once the receiving end is dropped; aborting on drop covers
    // a loop that is paused at that moment.
    let accept = AbortOnDrop(tokio::spawn(accept_loop));
    ReceiverStream::new(rx).map(move |conn| {
        let _keep = &accept;
        conn
    })
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What happens to a freshly accepted TCP connection before it may be served.
trait Admission: Send + 'static {
    /// What is served.
    type Io: Send + 'static;
    /// Takes `tcp` over; returns it when it can be served right away.
    fn admit(&mut self, tcp: TcpStream, peer: SocketAddr) -> Option<Self::Io>;
}

/// Plain TCP: served as accepted.
struct PlainAdmission;

impl Admission for PlainAdmission {
    type Io = TcpStream;

    fn admit(&mut self, tcp: TcpStream, _peer: SocketAddr) -> Option<TcpStream> {
        Some(tcp)
    }
}

async fn accept_loop<A: Admission>(
    listener: TcpListener,
    limits: AcceptLimits,
    mut admission: A,
    established: Arc<Established>,
    tx: mpsc::Sender<TrackedConnection<A::Io>>,
) {
    let accept_errors = LogLimiter::default();
    // Idle connections are found by a periodic sweep rather than a timer per connection.
    let sweep_period = limits.idle_timeout.map_or(Duration::from_secs(1), |idle| {
        (idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
    });
    let mut sweep = tokio::time::interval(sweep_period);
    sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let ready = tokio::select! {
            () = tx.closed() => break,
            _ = sweep.tick(), if limits.idle_timeout.is_some() => {
                established.close_idle();
                None
            }
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    configure_socket(&tcp, peer, &limits);
                    admission.admit(tcp, peer).map(|io| (io, peer))
                }
                Err(err) => {
                    warn_limited!(accept_errors, error = %err, "accepting a TCP connection failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    None
                }
            },
        };
        if let Some((io, peer)) = ready {
            let conn = TrackedConnection::new(io, established.admit(peer));
            if tx.send(conn).await.is_err() {
                break;
            }
        }
    }
}

fn configure_socket(tcp: &TcpStream, peer: SocketAddr, limits: &AcceptLimits) {
    if let Err(err) = tcp.set_nodelay(true) {
        debug!(%peer, error = %err, "cannot set TCP_NODELAY");
    }
    if let Some(idle) = limits.tcp_keepalive {
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(idle)
            .with_interval(TCP_KEEPALIVE_INTERVAL)
            .with_retries(TCP_KEEPALIVE_RETRIES);
        if let Err(err) = socket2::SockRef::from(tcp).set_tcp_keepalive(&keepalive) {
            debug!(%peer, error = %err, "cannot enable TCP keepalive");
        }
    }
}

/// TLS: each connection is handshaken in a task of its own, bounded in time and number.
struct TlsAdmission<C> {
    config: C,
    tx: mpsc::Sender<TrackedConnection<TlsStream<TcpStream>>>,
    established: Arc<Established>,
    handshakes: Arc<Handshakes>,
    failures: Arc<LogLimiter>,
    timeout: Duration,
    next_id: u64,
}

impl<C> Admission for TlsAdmission<C>
where
    C: Fn() -> Arc<rustls::ServerConfig> + Send + 'static,
{
    type Io = TlsStream<TcpStream>;

    fn admit(&mut self, tcp: TcpStream, peer: SocketAddr) -> Option<Self::Io> {
        let id = self.next_id;
        self.next_id += 1;
        let (slot, evicted) = self.handshakes.reserve(id, peer);
        if let Some(oldest) = evicted {
            warn_limited!(
                self.failures,
                peer = %oldest,
                "refusing TLS connection: handshake closed to make room for a new connection ({} in progress)",
                self.handshakes.max
            );
        }
        let task = tokio::spawn(handshake(
            TlsAcceptor::from((self.config)()),
            tcp,
            peer,
            slot,
            HandshakeContext {
                timeout: self.timeout,
                failures: Arc::clone(&self.failures),
                established: Arc::clone(&self.established),
                tx: self.tx.clone(),
            },
        ));
        self.handshakes.started(id, task.abort_handle());
        None
    }
}

impl<C> Drop for TlsAdmission<C> {
    fn drop(&mut self) {
        // The accept loop is over: nobody would serve these connections any more.
        self.handshakes.abort_all();
    }
}

/// What a handshake task needs besides its connection.
struct HandshakeContext {
    timeout: Duration,
    failures: Arc<LogLimiter>,
    established: Arc<Established>,
    tx: mpsc::Sender<TrackedConnection<TlsStream<TcpStream>>>,
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    slot: HandshakeSlot,
    ctx: HandshakeContext,
) {
    let result = tokio::time::timeout(ctx.timeout, acceptor.accept(tcp)).await;
    // Done handshaking, whatever the outcome: the slot is free for the next connection.
    drop(slot);
    let timeout = ctx.timeout;
    match result {
        Ok(Ok(stream)) => {
            debug!(%peer, "TLS handshake complete");
            let conn = TrackedConnection::new(stream, ctx.established.admit(peer));
            // Fails only when the server is shutting down; the connection is then dropped.
            let _ = ctx.tx.send(conn).await;
        }
        Ok(Err(err)) => {
            warn_limited!(ctx.failures, %peer, error = %err, "refusing TLS connection");
        }
        Err(_) => {
            warn_limited!(
                ctx.failures,
                %peer,
                "refusing TLS connection: handshake not completed within {timeout:?}"
            );
        }
    }
}

/// The TLS handshakes in progress, oldest first, so the oldest can be closed at the cap.
struct Handshakes {
    max: usize,
    /// By accept order; the abort handle is set right after the task is spawned.
    tasks: Mutex<BTreeMap<u64, (SocketAddr, Option<AbortHandle>)>>,
}

impl Handshakes {
    fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            tasks: Mutex::new(BTreeMap::new()),
        }
    }

    /// Reserves a place for handshake `id`, closing the oldest handshake (whose peer is
    /// returned) when all places are taken.
    fn reserve(self: &Arc<Self>, id: u64, peer: SocketAddr) -> (HandshakeSlot, Option<SocketAddr>) {
        let mut tasks = lock(&self.tasks);
        let evicted = if tasks.len() >= self.max {
            tasks.pop_first().map(|(_, (oldest, task))| {
                if let Some(task) = task {
                    task.abort();
                }
                oldest
            })
        } else {
            None
        };
        tasks.insert(id, (peer, None));
        let slot = HandshakeSlot {
            id,
            handshakes: Arc::clone(self),
        };
        (slot, evicted)
    }

    /// Records the task of handshake `id` (unless it has already finished).
    fn started(&self, id: u64, task: AbortHandle) {
        let mut tasks = lock(&self.tasks);
        if let Some((_, handle)) = tasks.get_mut(&id) {
            *handle = Some(task);
        }
    }

    fn abort_all(&self) {
        let tasks = std::mem::take(&mut *lock(&self.tasks));
        for (_, task) in tasks.into_values() {
            if let Some(task) = task {
                task.abort();
            }
        }
    }
}

/// A handshake's place; released when the handshake ends or its task is aborted.
struct HandshakeSlot {
    id: u64,
    handshakes: Arc<Handshakes>,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        lock(&self.handshakes.tasks).remove(&self.id);
    }
}

/// The tables stay consistent at every step, so one left behind by a panicking holder is used
/// as it is.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Why a tracked connection was closed by the limits (stored in [`Activity::closed`]).
const OPEN: u8 = 0;
const CLOSED_FOR_ROOM: u8 = 1;
const CLOSED_IDLE: u8 = 2;

/// When a connection last carried a byte, and whether the limits have closed it.
struct Activity {
    /// Microseconds since the table's epoch.
    last_active: AtomicU64,
    closed: AtomicU8,
    /// The task serving the connection, woken when the connection is closed from outside.
    waker: AtomicWaker,
}

impl Activity {
    fn close(&self, reason: u8) {
        self.closed.store(reason, Ordering::Release);
        self.waker.wake();
    }
}

/// The established connections of one listener.
struct Established {
    epoch: Instant,
    max: usize,
    idle_timeout: Option<Duration>,
    table: Mutex<Table>,
    /// Rate limits the warning that the cap closed a connection.
    at_cap: LogLimiter,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    connections: HashMap<u64, (SocketAddr, Arc<Activity>)>,
}

impl Established {
    fn new(limits: &AcceptLimits) -> Arc<Self> {
        Arc::new(Self {
            epoch: Instant::now(),
            max: limits.max_connections.max(1),
            idle_timeout: limits.idle_timeout,
            table: Mutex::new(Table::default()),
            at_cap: LogLimiter::default(),
        })
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Registers a new connection from `peer`, closing the one idle the longest when the table
    /// is full.
    fn admit(self: &Arc<Self>, peer: SocketAddr) -> ConnectionSlot {
        let activity = Arc::new(Activity {
            last_active: AtomicU64::new(self.now_us()),
            closed: AtomicU8::new(OPEN),
            waker: AtomicWaker::new(),
        });
        let (id, evicted) = {
            let mut table = lock(&self.table);
            let evicted = if table.connections.len() >= self.max {
                let idlest = table
                    .connections
                    .iter()
                    // Among equally idle connections, the oldest.
                    .min_by_key(|(id, (_, activity))| {
                        (activity.last_active.load(Ordering::Relaxed), **id)
                    })
                    .map(|(id, _)| *id);
                idlest.and_then(|id| table.connections.remove(&id))
            } else {
                None
            };
            let id = table.next_id;
            table.next_id += 1;
            table.connections.insert(id, (peer, Arc::clone(&activity)));
            (id, evicted)
        };
        if let Some((idlest, victim)) = evicted {
            victim.close(CLOSED_FOR_ROOM);
            warn_limited!(
                self.at_cap,
                peer = %idlest,
                "closing the connection idle the longest: {} connections open",
                self.max
            );
        }
        ConnectionSlot {
            id,
            activity,
            established: Arc::clone(self),
        }
    }

    /// Closes every connection idle for `idle_timeout` or longer.
    fn close_idle(&self) {
        let Some(idle_timeout) = self.idle_timeout else {
            return;
        };
        let idle_us = u64::try_from(idle_timeout.as_micros()).unwrap_or(u64::MAX);
        let now = self.now_us();
        let closed: Vec<(SocketAddr, Arc<Activity>)> = {
            let mut table = lock(&self.table);
            let idle: Vec<u64> = table
                .connections
                .iter()
                .filter(|(_, (_, activity))| {
                    now.saturating_sub(activity.last_active.load(Ordering::Relaxed)) >= idle_us
                })
                .map(|(id, _)| *id)
                .collect();
            idle.iter()
                .filter_map(|id| table.connections.remove(id))
                .collect()
        };
        for (peer, activity) in closed {
            debug!(%peer, ?idle_timeout, "closing idle connection");
            activity.close(CLOSED_IDLE);
        }
    }
}

/// A connection's entry in [`Established`]; removed when the connection is dropped.
struct ConnectionSlot {
    id: u64,
    activity: Arc<Activity>,
    established: Arc<Established>,
}

impl ConnectionSlot {
    /// Fails once the limits have closed the connection; otherwise arranges for the current
    /// task to be woken if they do.
    fn check(&self, cx: &Context<'_>) -> io::Result<()> {
        self.activity.waker.register(cx.waker());
        match self.activity.closed.load(Ordering::Acquire) {
            OPEN => Ok(()),
            CLOSED_IDLE => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection closed: idle for too long",
            )),
            _ => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection closed to make room for a new one: connection limit reached",
            )),
        }
    }

    fn touch(&self) {
        self.activity
            .last_active
            .store(self.established.now_us(), Ordering::Relaxed);
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        lock(&self.established.table).connections.remove(&self.id);
    }
}

/// An accepted connection counted against [`AcceptLimits::max_connections`] until dropped.
/// Reads and writes go to the inner stream and mark it active; once the limits close it
/// (to make room, or idle), they fail, which ends the HTTP connection served on it.
pub struct TrackedConnection<IO> {
    io: IO,
    slot: ConnectionSlot,
}

impl<IO> TrackedConnection<IO> {
    fn new(io: IO, slot: ConnectionSlot) -> Self {
        Self { io, slot }
    }

    /// The inner stream (for a TLS stream: the negotiated protocol, the peer's certificates).
    pub fn get_ref(&self) -> &IO {
        &self.io
    }
}

impl<IO> std::fmt::Debug for TrackedConnection<IO> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrackedConnection")
            .field("id", &self.slot.id)
            .finish_non_exhaustive()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for TrackedConnection<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.slot.check(cx)?;
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.io).poll_read(cx, buf);
        if matches!(poll, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.slot.touch();
        }
        poll
    }
}

impl<IO: AsyncWrite + Unpin> TrackedConnection<IO> {
    /// Runs `write` on the inner stream unless the limits closed the connection; marks the
    /// connection active when bytes were written.
    fn tracked_write(
        &mut self,
        cx: &mut Context<'_>,
        write: impl FnOnce(Pin<&mut IO>, &mut Context<'_>) -> Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        self.slot.check(cx)?;
        let poll = write(Pin::new(&mut self.io), cx);
        if matches!(poll, Poll::Ready(Ok(written)) if written > 0) {
            self.slot.touch();
        }
        poll
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for TrackedConnection<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .tracked_write(cx, |io, cx| io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .tracked_write(cx, |io, cx| io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<IO: tonic::transport::server::Connected> tonic::transport::server::Connected
    for TrackedConnection<IO>
{
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}
