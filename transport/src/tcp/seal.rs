//! The TLS side of a TCP lane's source: plaintext gathered from headers and guest memory,
//! sealed into TLS 1.3 records by rustls and written with `sendmsg`; and the
//! acknowledgements the destination sends back, opened again.
//!
//! A rustls connection is one object for both directions, while the source lane writes on its
//! own thread and a helper reads the socket (so that sending never waits for
//! acknowledgements). Only the lane thread touches the session: the helper moves the sealed
//! bytes it reads into the lane's inbox, and the lane thread opens them whenever it looks at
//! its acknowledgements. So the session needs no lock that two threads contend for, and rustls
//! writes its records straight from its own buffers to the socket: the first pass copied them
//! into a buffer of ours first, to write the socket outside a lock shared with the reader.
//! The destination never stops reading acknowledgements because of this: the helper keeps
//! draining the socket while the lane thread is blocked on a full one.
//!
//! Guest memory is copied into an ordinary buffer before it is sealed: rustls takes `&[u8]`,
//! which memory the guest writes must never be (see [`crate::mem`]). That copy reads each
//! page once from DRAM into a buffer that stays in cache, where rustls seals it (the same
//! shape as the destination's staging buffer).

use std::io::Read;
use std::net::TcpStream;

use super::sendmsg::SocketOut;
use crate::mem::GuestPages;
use crate::LaneError;

/// Plaintext sealed at once: large enough that `sendmsg` is paid rarely, small enough (with
/// its sealed copy) to stay in a core's L2.
const CHUNK: usize = 256 * 1024;

/// A source lane's TLS session and its buffers; only the lane thread uses it.
pub(super) struct Sealer {
    /// The session.
    conn: rustls::ClientConnection,
    /// Plaintext not yet sealed: `plain[..used]`. Allocated (and zeroed) once, so that
    /// filling it is one copy, with no zeroing first (that was 7 % of a lane's CPU time).
    plain: Box<[u8]>,
    used: usize,
    /// Plaintext opened from the destination's records, not yet a whole acknowledgement.
    opened: Vec<u8>,
}

impl Sealer {
    /// Takes over an established session.
    pub fn new(mut conn: rustls::ClientConnection) -> Sealer {
        // The lane bounds what it buffers itself (one chunk); rustls must take it all.
        conn.set_buffer_limit(None);
        Sealer {
            conn,
            plain: vec![0u8; CHUNK].into_boxed_slice(),
            used: 0,
            opened: Vec::new(),
        }
    }

    /// Appends ordinary bytes (a header), at most `budget` of them.
    pub fn push(&mut self, s: &TcpStream, b: &[u8], budget: &mut u64) -> Result<(), LaneError> {
        let len = (b.len() as u64).min(*budget) as usize;
        let mut off = 0;
        while off < len {
            let n = (CHUNK - self.used).min(len - off);
            self.plain[self.used..self.used + n].copy_from_slice(&b[off..off + n]);
            (self.used, off) = (self.used + n, off + n);
            if self.used == CHUNK {
                self.flush(s, false)?;
            }
        }
        *budget -= len as u64;
        Ok(())
    }

    /// Appends guest pages (copied out of guest memory), at most `budget` bytes of them,
    /// sealing and writing each chunk as it fills.
    pub fn push_guest(
        &mut self,
        s: &TcpStream,
        g: GuestPages<'_>,
        budget: &mut u64,
    ) -> Result<(), LaneError> {
        let len = (g.len() as u64).min(*budget) as usize;
        let mut off = 0;
        while off < len {
            let n = (CHUNK - self.used).min(len - off);
            g.subrange(off, n)
                .copy_to(&mut self.plain[self.used..self.used + n]);
            (self.used, off) = (self.used + n, off + n);
            if self.used == CHUNK {
                self.flush(s, false)?;
            }
        }
        *budget -= len as u64;
        Ok(())
    }

    /// Seals what is buffered (with `close`, followed by a `close_notify` alert) and writes
    /// the records to `s`.
    pub fn flush(&mut self, s: &TcpStream, close: bool) -> Result<(), LaneError> {
        if self.used > 0 {
            std::io::Write::write_all(&mut self.conn.writer(), &self.plain[..self.used])?;
            self.used = 0;
        }
        if close {
            self.conn.send_close_notify();
        }
        while self.conn.wants_write() {
            self.conn.write_tls(&mut SocketOut(s))?;
        }
        Ok(())
    }

    /// Opens `sealed` (bytes read from the socket) and hands every whole `N`-byte record of
    /// plaintext to `on`. `Err` when a record fails to open (a changed byte: AEAD failure),
    /// the peer closed the session, or `on` refuses a record.
    pub fn open<const N: usize>(
        &mut self,
        mut sealed: &[u8],
        mut on: impl FnMut(&[u8; N]) -> Result<(), String>,
    ) -> Result<(), String> {
        let mut buf = [0u8; 4096];
        while !sealed.is_empty() {
            self.conn
                .read_tls(&mut sealed)
                .map_err(|e| format!("TLS: {e}"))?;
            self.conn
                .process_new_packets()
                .map_err(|e| format!("TLS record refused: {e}"))?;
            // Drained after every record batch, so rustls's plaintext buffer never fills.
            loop {
                match self.conn.reader().read(&mut buf) {
                    Ok(0) => return Err("peer closed the lane".to_string()),
                    Ok(k) => self.opened.extend_from_slice(&buf[..k]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(format!("TLS: {e}")),
                }
            }
        }
        let whole = self.opened.len() / N * N;
        let r = self.opened[..whole]
            .chunks_exact(N)
            .try_for_each(|rec| on(rec.try_into().expect("N bytes")));
        self.opened.drain(..whole);
        r
    }
}
