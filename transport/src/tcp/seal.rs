//! The TLS side of a TCP lane's source: plaintext gathered from headers and guest memory,
//! sealed into TLS 1.3 records by rustls, written with `sendmsg`; and the acknowledgements
//! opened again on the reader thread.
//!
//! A rustls connection is one object for both directions, while the source lane writes on its
//! own thread and reads acknowledgements on another (so that sending never waits for them).
//! Both share the connection behind a mutex held only to seal a chunk or to open what was
//! read: the socket is written and read outside it, so a sender blocked on a full socket never
//! holds up the reader, and the reader never holds up sealing.
//!
//! Guest memory is copied into an ordinary buffer before it is sealed: rustls takes `&[u8]`,
//! which memory the guest writes must never be (see [`crate::mem`]). That copy reads each
//! page once from DRAM into a buffer that stays in cache, where rustls seals it (the same
//! shape as the destination's staging buffer).

use std::io::Read;
use std::net::TcpStream;
use std::sync::{Arc, Mutex};

use super::source::{iovec_of, write_all_iov};
use crate::mem::GuestPages;
use crate::replies::lock;
use crate::LaneError;

/// Plaintext sealed at once: large enough that the lock and `sendmsg` are paid rarely, small
/// enough (with its sealed copy) to stay in a core's L2.
const CHUNK: usize = 256 * 1024;

/// A source lane's TLS session and its buffers.
pub(super) struct Sealer {
    /// The session, shared with the acknowledgement reader.
    pub conn: Arc<Mutex<rustls::ClientConnection>>,
    /// Plaintext not yet sealed.
    pub plain: Vec<u8>,
    /// Sealed records not yet written.
    wire: Vec<u8>,
}

impl Sealer {
    /// Takes over an established session.
    pub fn new(mut conn: rustls::ClientConnection) -> Sealer {
        // The lane bounds what it buffers itself (one chunk); rustls must take it all.
        conn.set_buffer_limit(None);
        Sealer {
            conn: Arc::new(Mutex::new(conn)),
            plain: Vec::with_capacity(CHUNK),
            wire: Vec::with_capacity(CHUNK + CHUNK / 16),
        }
    }

    /// Appends ordinary bytes (a header), at most `budget` of them.
    pub fn push(&mut self, s: &TcpStream, b: &[u8], budget: &mut u64) -> Result<(), LaneError> {
        let n = (b.len() as u64).min(*budget) as usize;
        self.plain.extend_from_slice(&b[..n]);
        *budget -= n as u64;
        if self.plain.len() >= CHUNK {
            self.flush(s, false)?;
        }
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
            let n = (CHUNK - self.plain.len().min(CHUNK)).max(1).min(len - off);
            let at = self.plain.len();
            self.plain.resize(at + n, 0);
            g.subrange(off, n).copy_to(&mut self.plain[at..]);
            off += n;
            if self.plain.len() >= CHUNK {
                self.flush(s, false)?;
            }
        }
        *budget -= len as u64;
        Ok(())
    }

    /// Seals what is buffered (with `close`, followed by a `close_notify` alert) and writes
    /// the records to `s`.
    pub fn flush(&mut self, s: &TcpStream, close: bool) -> Result<(), LaneError> {
        {
            let mut c = lock(&self.conn);
            if !self.plain.is_empty() {
                std::io::Write::write_all(&mut c.writer(), &self.plain)?;
            }
            if close {
                c.send_close_notify();
            }
            while c.wants_write() {
                c.write_tls(&mut self.wire)?;
            }
        }
        self.plain.clear();
        let mut iov = [iovec_of(&self.wire)];
        // SAFETY: the entry describes `self.wire`, ordinary memory unchanged during the call.
        let r = unsafe { write_all_iov(s, &mut iov) };
        self.wire.clear();
        Ok(r?)
    }
}

/// Reads `N`-byte records of plaintext from the TLS session `conn` over `rd` and hands each to
/// `on`, until the socket ends or fails, a record fails authentication, or `on` refuses a
/// record; returns why it stopped.
pub(crate) fn read_records_tls<const N: usize>(
    rd: &mut TcpStream,
    conn: &Mutex<rustls::ClientConnection>,
    mut on: impl FnMut(&[u8; N]) -> Result<(), String>,
) -> String {
    let mut raw = vec![0u8; 16 * 1024];
    let mut plain: Vec<u8> = Vec::new();
    loop {
        let n = match rd.read(&mut raw) {
            Ok(0) => return "peer closed the lane".to_string(),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return e.to_string(),
        };
        if let Err(e) = open(conn, &raw[..n], &mut plain) {
            return e;
        }
        let whole = plain.len() / N * N;
        for rec in plain[..whole].chunks_exact(N) {
            if let Err(e) = on(rec.try_into().expect("N bytes")) {
                return e;
            }
        }
        plain.drain(..whole);
    }
}

/// Feeds `bytes` read from the socket to the session and appends the plaintext they carried
/// to `plain`. `Err` when a record fails to open (a changed byte: AEAD failure) or the peer
/// closed the session.
fn open(
    conn: &Mutex<rustls::ClientConnection>,
    mut bytes: &[u8],
    plain: &mut Vec<u8>,
) -> Result<(), String> {
    let mut c = lock(conn);
    let mut buf = [0u8; 4096];
    while !bytes.is_empty() {
        c.read_tls(&mut bytes).map_err(|e| format!("TLS: {e}"))?;
        c.process_new_packets()
            .map_err(|e| format!("TLS record refused: {e}"))?;
        // Drained after every record batch, so rustls's plaintext buffer never fills.
        loop {
            match c.reader().read(&mut buf) {
                Ok(0) => return Err("peer closed the lane".to_string()),
                Ok(k) => plain.extend_from_slice(&buf[..k]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(format!("TLS: {e}")),
            }
        }
    }
    Ok(())
}
