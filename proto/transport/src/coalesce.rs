//! Write coalescing for HTTP/2 connections.
//!
//! h2 hands its I/O one write per frame run: a request's HEADERS, then its DATA, then the
//! WINDOW_UPDATEs of the responses it read, each a separate `writev` (and, under TLS, a
//! separate record). With tens of calls in flight that is most of a connection's system
//! calls. HTTP/1.1 and HTTP/2 both flush after every run of writes, so gathering writes until
//! the flush sends the same bytes at the same moment in one call.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, BufWriter, ReadBuf};

/// Bytes gathered before a write goes out without waiting for the flush: one full-size HTTP/2
/// DATA frame. A larger write goes straight through.
const GATHER_BYTES: usize = 16 * 1024;

/// A connection whose writes are gathered until the protocol flushes (see the module docs).
/// Reads pass through.
#[derive(Debug)]
pub struct Coalesced<IO> {
    inner: BufWriter<IO>,
}

impl<IO: AsyncRead + AsyncWrite> Coalesced<IO> {
    /// Wraps `io`.
    pub fn new(io: IO) -> Self {
        Self {
            inner: BufWriter::with_capacity(GATHER_BYTES, io),
        }
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &IO {
        self.inner.get_ref()
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for Coalesced<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Coalesced<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        // Gathered slices are copied into one buffer, whatever the connection supports.
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<IO: tonic::transport::server::Connected + AsyncRead + AsyncWrite>
    tonic::transport::server::Connected for Coalesced<IO>
{
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.get_ref().connect_info()
    }
}

impl<IO: hyper_util::client::legacy::connect::Connection + AsyncRead + AsyncWrite>
    hyper_util::client::legacy::connect::Connection for Coalesced<IO>
{
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        self.get_ref().connected()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn writes_wait_for_the_flush_and_then_arrive_whole_and_in_order() {
        let (near, mut far) = tokio::io::duplex(64 * 1024);
        let mut near = Coalesced::new(near);
        near.write_all(b"HEADERS ").await.unwrap();
        near.write_all(b"DATA").await.unwrap();
        let mut buf = [0u8; 64];
        let nothing_yet =
            tokio::time::timeout(std::time::Duration::from_millis(50), far.read(&mut buf)).await;
        assert!(nothing_yet.is_err(), "a write went out before the flush");
        near.flush().await.unwrap();
        let n = far.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"HEADERS DATA");
    }

    #[tokio::test]
    async fn a_write_larger_than_the_gather_buffer_goes_through_in_order() {
        let (near, mut far) = tokio::io::duplex(4 * GATHER_BYTES);
        let mut near = Coalesced::new(near);
        let big = vec![7u8; 2 * GATHER_BYTES];
        near.write_all(b"head").await.unwrap();
        near.write_all(&big).await.unwrap();
        near.flush().await.unwrap();
        let mut got = vec![0u8; 4 + big.len()];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..4], b"head");
        assert!(got[4..].iter().all(|b| *b == 7));
    }

    #[tokio::test]
    async fn reads_pass_through() {
        let (near, mut far) = tokio::io::duplex(1024);
        let mut near = Coalesced::new(near);
        far.write_all(b"response").await.unwrap();
        let mut buf = [0u8; 8];
        near.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"response");
    }
}
