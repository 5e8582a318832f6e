//! A tokio TCP stream whose writes never raise SIGPIPE.
//!
//! librmig runs inside C embedders (QEMU) that may keep SIGPIPE's default action, which ends
//! the process when it writes to a connection whose peer has gone. tokio's `TcpStream` writes
//! single buffers with `send(MSG_NOSIGNAL)` (through `std`), but its vectored write is a plain
//! `writev`, and tokio-rustls writes every TLS record vectored: an encrypted control
//! connection whose peer closed first killed the embedder instead of failing with EPIPE.
//! [`NoSigPipe`] sits under tokio-rustls at both ends (the [`tls`](super::tls) connector and
//! acceptor wrap every connection in it) and writes with `send`/`sendmsg` and `MSG_NOSIGNAL`,
//! through tokio's readiness (`poll_write_ready` + `try_io`), so a closed peer is an error.
//! The data lanes do the same with `SocketOut` in rmig-transport.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// A tokio TCP stream that writes with `MSG_NOSIGNAL` (see the module doc); reads and
/// shutdown are tokio's own.
#[derive(Debug)]
pub struct NoSigPipe(TcpStream);

impl NoSigPipe {
    /// Wraps `s`.
    pub fn new(s: TcpStream) -> NoSigPipe {
        NoSigPipe(s)
    }

    /// The TCP stream.
    pub fn get_ref(&self) -> &TcpStream {
        &self.0
    }

    /// The TCP stream, unwrapped.
    pub fn into_inner(self) -> TcpStream {
        self.0
    }

    /// The TCP stream as a `std` one (still non-blocking), as [`TcpStream::into_std`].
    pub fn into_std(self) -> io::Result<std::net::TcpStream> {
        self.0.into_std()
    }

    /// One `send` attempt by `op` once the socket is writable; a socket that turns out not
    /// to be (`WouldBlock`) waits again, an interrupted call is retried.
    fn poll_send(
        &self,
        cx: &mut Context<'_>,
        op: impl Fn(SockRef<'_>) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self
                .0
                .try_io(Interest::WRITABLE, || op(SockRef::from(&self.0)))
            {
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted =>
                {
                    continue
                }
                r => return Poll::Ready(r),
            }
        }
    }
}

impl AsyncRead for NoSigPipe {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for NoSigPipe {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_send(cx, |s| s.send_with_flags(buf, libc::MSG_NOSIGNAL))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_send(cx, |s| s.send_vectored_with_flags(bufs, libc::MSG_NOSIGNAL))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Nothing is buffered here: what `send` took is the kernel's.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // `shutdown(SHUT_WR)` writes nothing, so it raises no SIGPIPE.
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}
