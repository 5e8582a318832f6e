//! Writing to a lane's socket: `sendmsg` with `MSG_NOSIGNAL` over raw I/O vectors.
//!
//! Raw `iovec`s, because guest memory must never become a `&[u8]` (see [`crate::mem`]), and
//! `sendmsg` rather than `writev`, because a peer that closed must be an EPIPE error and not a
//! SIGPIPE that kills an embedder which did not ignore it. Both the cleartext source lane and
//! the TLS one (whose records rustls writes through [`send_some`]) write this way.

use std::net::TcpStream;
use std::os::fd::AsRawFd;

/// Most slices one `sendmsg` takes (Linux's IOV_MAX).
const IOV_MAX: usize = 1024;

/// An I/O vector entry for ordinary memory (a header).
pub(super) fn iovec_of(b: &[u8]) -> libc::iovec {
    libc::iovec {
        iov_base: b.as_ptr().cast_mut().cast(),
        iov_len: b.len(),
    }
}

/// Drops the first `n` bytes of `iov` (whole entries, then the start of the next one).
fn advance(iov: &mut &mut [libc::iovec], mut n: usize) {
    let skip = iov
        .iter()
        .take_while(|v| {
            let whole = n >= v.iov_len;
            if whole {
                n -= v.iov_len;
            }
            whole
        })
        .count();
    *iov = &mut std::mem::take(iov)[skip..];
    if let Some(v) = iov.first_mut() {
        v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n).cast();
        v.iov_len -= n;
    }
}

/// Writes what one `sendmsg` call takes of `iov` (at most [`IOV_MAX`] entries), retried if
/// a signal interrupts it; returns how many bytes went.
///
/// `sendmsg` rather than `writev` for `MSG_NOSIGNAL`: a peer that closed must be an EPIPE
/// error, not a SIGPIPE that kills an embedder (QEMU) that did not ignore it.
///
/// # Safety
/// Every entry describes memory valid for reads for the whole call: ordinary buffers, or
/// guest memory by the contract of the [`MemRegion`](crate::MemRegion) it came from.
pub(super) unsafe fn send_some(s: &TcpStream, iov: &[libc::iovec]) -> std::io::Result<usize> {
    // SAFETY: an all-zero `msghdr` is valid (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr().cast_mut();
    msg.msg_iovlen = iov.len().min(IOV_MAX) as _;
    loop {
        // SAFETY: `msg` points at the first `msg_iovlen` entries of `iov`, which describe
        // readable memory (this function's contract); the kernel only reads them, and no
        // reference to guest memory is made here.
        let w = unsafe { libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        match w {
            0 if !iov.is_empty() => return Err(std::io::ErrorKind::WriteZero.into()),
            w if w >= 0 => return Ok(w as usize),
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// Writes all of `iov`, in `sendmsg` calls of at most [`IOV_MAX`] entries.
///
/// Guest memory goes to the kernel as raw `iovec`s: `std`'s `IoSlice` would need a `&[u8]`
/// over it (see the module doc of [`crate::mem`]).
///
/// # Safety
/// As for [`send_some`].
pub(super) unsafe fn write_all_iov(
    s: &TcpStream,
    mut iov: &mut [libc::iovec],
) -> std::io::Result<()> {
    while !iov.is_empty() {
        // SAFETY: this function's contract is `send_some`'s.
        let w = unsafe { send_some(s, iov) }?;
        advance(&mut iov, w);
    }
    Ok(())
}

/// A lane socket as rustls's output, at either end: records go out with `sendmsg` and
/// `MSG_NOSIGNAL` (never a SIGPIPE: `TcpStream`'s own `write_vectored` is a plain `writev`,
/// which would kill an embedder that does not ignore SIGPIPE when the peer has closed),
/// several of rustls's buffers per call.
pub(super) struct SocketOut<'a>(pub &'a TcpStream);

impl std::io::Write for SocketOut<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // SAFETY: the entry describes `buf`, ordinary memory borrowed for the call.
        unsafe { send_some(self.0, &[iovec_of(buf)]) }
    }

    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        let iov: Vec<libc::iovec> = bufs.iter().map(|b| iovec_of(b)).collect();
        // SAFETY: the entries describe `bufs`, ordinary memory borrowed for the call.
        unsafe { send_some(self.0, &iov) }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
