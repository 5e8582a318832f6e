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
//!
//! Records are cut where the destination can use them in place. rustls seals each write in
//! records of at most 16 KiB from the write's first byte, and the destination reads each
//! record's plaintext as one piece (`BufRead::fill_buf`). So the sealer starts a record
//! wherever guest bytes follow a header, and ends it after at most 16 KiB of guest bytes or
//! at the headers after them: a record is `[whole 4 KiB pages][the next headers]`. The
//! destination then hashes pages and streams them into guest memory straight from rustls's
//! buffer, 16-byte aligned, instead of copying every record out first (one copy of every
//! byte fewer; the next header is a 24-byte read). A peer that cut records elsewhere still
//! works: the destination stages the pages that straddle records.

use std::io::Read;
use std::net::TcpStream;

use super::sendmsg::SocketOut;
use crate::mem::GuestPages;
use crate::LaneError;

/// Plaintext sealed at once: four records, so that `sendmsg` is paid once per 64 KiB, while
/// the plaintext and its sealed copy stay in L1/L2. (256 KiB looked about 15 % dearer in
/// alternated runs on a host loaded by builds; on a quiet host the whole in-place rework,
/// this included, saved about 5 %.)
const CHUNK: usize = 64 * 1024;

/// Most plaintext in one TLS record (rustls's default fragment size, TLS's maximum).
const RECORD: usize = 16 * 1024;

/// Granularity at which guest bytes are cut into records: the smallest guest page.
const PAGE: usize = 4096;

/// A source lane's TLS session and its buffers; only the lane thread uses it.
pub(super) struct Sealer {
    /// The session.
    conn: rustls::ClientConnection,
    /// Plaintext not yet sealed: `plain[..used]`. Allocated (and zeroed) once, so that
    /// filling it is one copy, with no zeroing first (that was 7 % of a lane's CPU time).
    plain: Box<[u8]>,
    used: usize,
    /// Where each record of `plain[..used]` ends but the last (which ends at `used`).
    cuts: Vec<usize>,
    /// Where the last record began, and whether it holds headers already (guest bytes then
    /// start a new record).
    record: usize,
    has_header: bool,
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
            cuts: Vec::new(),
            record: 0,
            has_header: false,
            opened: Vec::new(),
        }
    }

    /// Ends the current record at `used`.
    fn cut(&mut self) {
        if self.used > self.record {
            self.cuts.push(self.used);
        }
        (self.record, self.has_header) = (self.used, false);
    }

    /// Appends ordinary bytes (a header), at most `budget` of them. They end the record of
    /// the guest bytes before them, in it if it has room.
    pub fn push(&mut self, s: &TcpStream, b: &[u8], budget: &mut u64) -> Result<(), LaneError> {
        let len = (b.len() as u64).min(*budget) as usize;
        let mut off = 0;
        while off < len {
            if self.used == CHUNK {
                self.flush(s, false)?;
            }
            if self.used - self.record == RECORD {
                self.cut();
            }
            let n = (RECORD - (self.used - self.record)).min(len - off);
            let n = n.min(CHUNK - self.used);
            self.plain[self.used..self.used + n].copy_from_slice(&b[off..off + n]);
            (self.used, off, self.has_header) = (self.used + n, off + n, true);
        }
        *budget -= len as u64;
        Ok(())
    }

    /// Appends guest pages (copied out of guest memory), at most `budget` bytes of them,
    /// sealing and writing the buffer whenever the next record's worth does not fit.
    pub fn push_guest(
        &mut self,
        s: &TcpStream,
        g: GuestPages<'_>,
        budget: &mut u64,
    ) -> Result<(), LaneError> {
        let len = (g.len() as u64).min(*budget) as usize;
        let mut off = 0;
        while off < len {
            if self.has_header || self.used - self.record > RECORD - PAGE {
                self.cut();
            }
            // Whole pages up to the record's end, so that every record starts on a page.
            let room = (RECORD - (self.used - self.record)) / PAGE * PAGE;
            let n = room.min(len - off);
            if self.used + n > CHUNK {
                self.flush(s, false)?;
                continue;
            }
            g.subrange(off, n)
                .copy_to(&mut self.plain[self.used..self.used + n]);
            (self.used, off) = (self.used + n, off + n);
        }
        *budget -= len as u64;
        Ok(())
    }

    /// Seals what is buffered (with `close`, followed by a `close_notify` alert) and writes
    /// the records to `s`.
    pub fn flush(&mut self, s: &TcpStream, close: bool) -> Result<(), LaneError> {
        self.cut();
        let mut start = 0;
        for &end in &self.cuts {
            // One write per record: rustls seals each write from its first byte.
            std::io::Write::write_all(&mut self.conn.writer(), &self.plain[start..end])?;
            start = end;
        }
        (self.used, self.record) = (0, 0);
        self.cuts.clear();
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
