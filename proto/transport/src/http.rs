//! Serving plain HTTP/1.1 (health probes, metrics) on connections from [`crate::accept`], with a
//! header-read timeout so that a client sending its request byte by byte, or keeping a
//! connection open without sending one, is disconnected.
//!
//! ```ignore
//! let incoming = cpi_transport::tcp_incoming(listener, AcceptLimits::default());
//! cpi_transport::serve_http1(incoming, axum_router, HEADER_READ_TIMEOUT, shutdown).await;
//! ```

use std::future::Future;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_stream::StreamExt as _;
use tracing::debug;

/// Default time a client has to send a request's headers, counted from the moment the
/// connection waits for them: on a new connection, and between requests on a kept-alive one
/// (so it also closes idle keep-alive connections).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves HTTP/1.1 with `service` on every connection of `incoming` until `shutdown` resolves;
/// then stops accepting (dropping `incoming`), closes idle connections and lets requests in
/// progress finish for up to `header_read_timeout` more (a client that stops reading its
/// response cannot hold shutdown up), and returns once every connection is closed. Dropping the
/// returned future closes every connection at once.
pub async fn serve_http1<I, IO, S, B>(
    incoming: I,
    service: S,
    header_read_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send,
) where
    I: futures::Stream<Item = IO> + Send,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<B>,
            Error: Into<Box<dyn std::error::Error + Send + Sync>>,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static,
    B: hyper::body::Body<Data: Send, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
        + Send
        + 'static,
{
    let (closing_tx, closing_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    {
        let mut incoming = std::pin::pin!(incoming);
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                next = incoming.next() => match next {
                    Some(io) => {
                        let mut closing = closing_rx.clone();
                        let service = TowerToHyperService::new(service.clone());
                        connections.spawn(async move {
                            let mut builder = hyper::server::conn::http1::Builder::new();
                            // hyper enforces the header-read timeout only with a timer.
                            builder
                                .timer(TokioTimer::new())
                                .header_read_timeout(header_read_timeout);
                            let conn = builder.serve_connection(TokioIo::new(io), service);
                            let mut conn = std::pin::pin!(conn);
                            let result = tokio::select! {
                                result = conn.as_mut() => result,
                                // The guard `wait_for` returns must not live across the
                                // await below (it is not `Send`).
                                () = async { let _ = closing.wait_for(|closing| *closing).await; } => {
                                    conn.as_mut().graceful_shutdown();
                                    conn.await
                                }
                            };
                            if let Err(err) = result {
                                debug!(error = %err, "HTTP connection ended with an error");
                            }
                        });
                    }
                    None => break,
                },
            }
        }
        // Leaving this block drops `incoming`: the listener closes before connections drain.
    }
    let _ = closing_tx.send(true);
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(header_read_timeout, drained)
        .await
        .is_err()
    {
        debug!("closing HTTP connections still open after {header_read_timeout:?}");
        connections.shutdown().await;
    }
}
