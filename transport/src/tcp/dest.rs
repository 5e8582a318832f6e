//! The receiving end of a TCP lane: payloads land in guest memory.
//!
//! When nothing reads what lands (no verification), a payload is received straight into guest
//! memory. When the sink hashes what lands, that would make the kernel's copy write cold guest
//! memory (reading every line first) and the hash then read it back from far caches; instead
//! the payload is received into a staging buffer that stays in cache, streamed into guest
//! memory with non-temporal stores and hashed from the staging buffer. Measured on the 2-core
//! test host, 2 GiB with verification: that cut the destination's copy and hash time by about
//! a third and raised the lane rate by a tenth.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;

use super::sendmsg::SocketOut;
use super::wire::{self, Header, HEADER_LEN};
use crate::mem::GuestPages;
use crate::stream_copy::copy_streaming;
use crate::{DestLane, DestLaneSummary, LaneError, MemRegion, MemoryMap, PageSink};

/// Bytes read ahead when looking for a header. Payload bytes that come along are copied once
/// from here (so this stays small: 16 KiB is under 2 % of a 1 MiB run); the rest of a payload
/// is read straight into guest memory or the staging buffer. Runs of single pages still arrive
/// several per read.
const READ_AHEAD: usize = 16 * 1024;

/// A TCP destination lane.
pub struct TcpDestLane {
    rx: Incoming,
    map: MemoryMap,
    stage: Vec<Line>,
}

/// A lane's connection: the socket itself, or a TLS session over it.
enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsIn>),
}

impl Conn {
    fn socket(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(t) => &t.sock,
        }
    }
}

/// Records read from the socket at once. rustls reads at most 4 KiB per call from what it
/// is given; fed from this buffer, that is a copy in cache instead of a system call (measured
/// on the 2-core host: reading the socket 4 KiB at a time, through rustls's `StreamOwned`,
/// held TLS lanes to a fifth of the cleartext rate). Four records: small enough to stay in
/// L1/L2 between the kernel's copy and rustls's (256 KiB looked about 15 % dearer in
/// alternated runs on a host loaded by builds; on a quiet host the difference is a few %).
const TLS_READ: usize = 64 * 1024;

/// A TLS session over a lane socket, read in large pieces.
struct TlsIn {
    conn: rustls::ServerConnection,
    sock: TcpStream,
    raw: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
}

impl TlsIn {
    /// Feeds the next piece of the socket's bytes to the session and opens the records that
    /// are whole. A record that fails authentication is an `InvalidData` error.
    fn feed(&mut self) -> std::io::Result<()> {
        if self.start == self.end && !self.eof {
            let n = loop {
                match self.sock.read(&mut self.raw) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    r => break r?,
                }
            };
            (self.start, self.end, self.eof) = (0, n, n == 0);
        }
        let mut piece = &self.raw[self.start..self.end];
        let before = piece.len();
        self.conn.read_tls(&mut piece)?;
        self.start += before - piece.len();
        self.conn
            .process_new_packets()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        Ok(())
    }

    /// The opened plaintext of the next record (what is left of it), opening records as
    /// needed: ordinary memory inside rustls, read in place instead of copied out. The peer
    /// closing the session is `UnexpectedEof`.
    fn chunk(&mut self) -> std::io::Result<&[u8]> {
        loop {
            match self.conn.reader().into_first_chunk() {
                Ok([]) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(_) => return self.conn.reader().into_first_chunk(),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if self.eof && self.start == self.end {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.feed()?;
        }
    }

    /// Marks the first `n` bytes of [`TlsIn::chunk`] as used.
    fn consume(&mut self, n: usize) {
        std::io::BufRead::consume(&mut self.conn.reader(), n);
    }
}

impl Read for TlsIn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.conn.reader().read(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                r => return r,
            }
            if self.eof && self.start == self.end {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.feed()?;
        }
    }
}

impl Write for TlsIn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.conn.writer().write(buf)?;
        self.flush()?;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        while self.conn.wants_write() {
            self.conn.write_tls(&mut SocketOut(&self.sock))?;
        }
        Ok(())
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(t) => t.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(t) => t.flush(),
        }
    }
}

/// The lane socket with its read-ahead buffer (`buf[start..end]` is read but not consumed).
struct Incoming {
    stream: Conn,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// Bytes of a run staged at once when the sink reads what lands: the source's largest run,
/// and half of a core's L2 on the hosts this was measured on, so that the staged bytes are
/// still cached when the sink hashes them.
const STAGE_BYTES: usize = 1 << 20;

/// Bytes in a cache line.
const LINE: usize = 64;

/// A cache line, so that the staging buffer is aligned for streaming stores.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; LINE]);

/// The staging buffer's lines as bytes.
fn lines_as_bytes(v: &mut [Line]) -> &mut [u8] {
    // SAFETY: `Line` is 64 plain bytes, aligned and without padding, so a slice of lines is
    // one valid byte slice of 64 times its length, borrowed as mutably as `v`.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), v.len() * LINE) }
}

impl Incoming {
    /// Reads at least `n` buffered bytes. `Ok(false)` on a clean end of stream before any.
    fn fill(&mut self, n: usize) -> Result<bool, LaneError> {
        if self.end - self.start >= n {
            return Ok(true);
        }
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        // A TLS lane reads no further than it needs: the payload that follows is used in
        // place, in rustls's buffer (`TcpDestLane::land_in_place`).
        let ahead = match self.stream {
            Conn::Plain(_) => self.buf.len(),
            Conn::Tls(_) => n,
        };
        while self.end < n {
            match self.stream.read(&mut self.buf[self.end..ahead]) {
                Ok(0) if self.end == 0 => return Ok(false),
                Ok(0) => return Err(LaneError::Closed),
                Ok(k) => self.end += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }

    /// Receives into `dst` (ordinary memory): first what is buffered, then straight from the
    /// socket.
    fn read_into(&mut self, dst: &mut [u8]) -> Result<(), LaneError> {
        let have = (self.end - self.start).min(dst.len());
        dst[..have].copy_from_slice(&self.buf[self.start..self.start + have]);
        self.start += have;
        let rest = &mut dst[have..];
        if !rest.is_empty() {
            self.stream.read_exact(rest).map_err(ended_is_closed)?;
        }
        Ok(())
    }

    /// Receives into guest memory: first what is buffered (copied), then with `read(2)`
    /// straight into the range, so that no reference to guest memory is ever made.
    ///
    /// # Safety
    /// As for [`GuestPages::copy_from`]: `dst` is writable and this lane is its only writer.
    unsafe fn read_into_guest(&mut self, dst: GuestPages<'_>) -> Result<(), LaneError> {
        assert!(
            matches!(self.stream, Conn::Plain(_)),
            "a TLS lane opens records into the staging buffer"
        );
        let have = (self.end - self.start).min(dst.len());
        // SAFETY: this function's contract is `copy_from`'s.
        unsafe {
            dst.subrange(0, have)
                .copy_from(&self.buf[self.start..self.start + have])
        };
        self.start += have;
        let mut done = have;
        while done < dst.len() {
            let rest = dst.subrange(done, dst.len() - done);
            let fd = self.stream.socket().as_raw_fd();
            // SAFETY: the kernel writes at most `rest.len()` bytes at `rest.as_ptr()`, inside
            // `dst`, which is writable and has no other writer (this function's contract); the
            // bytes are written by the kernel, and no reference to them exists here.
            let r = unsafe { libc::read(fd, rest.as_ptr().cast(), rest.len()) };
            match r {
                0 => return Err(LaneError::Closed),
                r if r > 0 => done += r as usize,
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(e.into());
                    }
                }
            }
        }
        Ok(())
    }
}

/// A stream that ended inside a run is a closed lane; any other error is itself.
fn ended_is_closed(e: std::io::Error) -> LaneError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        LaneError::Closed
    } else {
        e.into()
    }
}

/// Puts pages `first..first+n` of region `idx`, received into ordinary memory (`bytes`), where
/// they belong: placed by the sink (post-copy) or streamed into guest memory; then hands them
/// to the sink.
fn put_in_place(
    sink: &dyn PageSink,
    idx: usize,
    region: &MemRegion,
    first: u64,
    n: u64,
    bytes: &[u8],
) -> Result<(), LaneError> {
    if sink.places() {
        sink.place(idx, first, n, bytes)
            .map_err(LaneError::Refused)?;
    } else {
        // SAFETY: destination memory is writable (the region's contract), and the sink
        // admitted this run (`claim`): no other lane writes these pages until it is released.
        unsafe { copy_streaming(region.guest_pages(first, n), bytes) };
    }
    sink.data_landed_from(idx, first, n, bytes);
    Ok(())
}

impl TcpDestLane {
    /// Takes over a connected, authenticated lane socket.
    pub fn new(stream: TcpStream, map: MemoryMap) -> Result<Self, LaneError> {
        stream.set_nodelay(true)?;
        Ok(Self::over(Conn::Plain(stream), map))
    }

    /// Takes over a connected lane socket whose TLS session `conn` is established and
    /// authenticated: every record is opened into the staging buffer, never into guest
    /// memory directly (a record is only known to be authentic once it is whole).
    pub fn new_tls(
        stream: TcpStream,
        conn: rustls::ServerConnection,
        map: MemoryMap,
    ) -> Result<Self, LaneError> {
        stream.set_nodelay(true)?;
        let tls = TlsIn {
            conn,
            sock: stream,
            raw: vec![0u8; TLS_READ],
            start: 0,
            end: 0,
            eof: false,
        };
        Ok(Self::over(Conn::Tls(Box::new(tls)), map))
    }

    fn over(stream: Conn, map: MemoryMap) -> Self {
        TcpDestLane {
            rx: Incoming {
                stream,
                buf: vec![0u8; READ_AHEAD],
                start: 0,
                end: 0,
            },
            map,
            stage: Vec::new(),
        }
    }

    /// A handle that can shut the lane's socket down from another thread (to stop `run`).
    pub fn shutdown_handle(&self) -> std::io::Result<TcpStream> {
        self.rx.stream.socket().try_clone()
    }

    /// Lands a data run for a sink that reads what lands: each piece is received into the
    /// staging buffer (which stays in cache), streamed into guest memory without reading it
    /// first (or placed by the sink, in post-copy), and handed to the sink from the staging
    /// buffer.
    fn land_staged(
        &mut self,
        sink: &dyn PageSink,
        idx: usize,
        region: &MemRegion,
        first: u64,
        count: u64,
    ) -> Result<(), LaneError> {
        let psize = region.page_size() as u64;
        let per = (STAGE_BYTES as u64 / psize).max(1);
        let mut p = first;
        while p < first + count {
            let n = per.min(first + count - p);
            let len = (n * psize) as usize;
            if self.stage.len() * LINE < len {
                // Grown on first use, and for a page larger than STAGE_BYTES (2 MiB).
                self.stage.resize(len.div_ceil(LINE), Line([0; LINE]));
            }
            let staged = &mut lines_as_bytes(&mut self.stage)[..len];
            self.rx.read_into(staged)?;
            put_in_place(sink, idx, region, p, n, staged)?;
            p += n;
        }
        Ok(())
    }

    /// Lands a data run from a TLS lane: whole pages are hashed and streamed into guest memory
    /// (or placed) straight from the opened records in rustls's buffer; a page that straddles
    /// two records (a peer that cuts records elsewhere, or pages larger than a record) goes
    /// through the staging buffer.
    fn land_in_place(
        &mut self,
        sink: &dyn PageSink,
        idx: usize,
        region: &MemRegion,
        first: u64,
        count: u64,
    ) -> Result<(), LaneError> {
        let psize = region.page_size() as u64;
        let mut p = first;
        while p < first + count {
            let Conn::Tls(tls) = &mut self.rx.stream else {
                unreachable!("a TLS lane")
            };
            let chunk = tls.chunk().map_err(ended_is_closed)?;
            let n = (chunk.len() as u64 / psize).min(first + count - p);
            if n == 0 {
                self.land_staged(sink, idx, region, p, 1)?;
                p += 1;
                continue;
            }
            let bytes = &chunk[..(n * psize) as usize];
            put_in_place(sink, idx, region, p, n, bytes)?;
            let used = bytes.len();
            tls.consume(used);
            p += n;
        }
        Ok(())
    }

    /// Lands one admitted run: its payload into guest memory (straight, or staged when the
    /// sink reads what lands), or the zero pages it names.
    fn land_run(
        &mut self,
        sink: &dyn PageSink,
        idx: usize,
        region: &MemRegion,
        h: &Header,
        sum: &mut DestLaneSummary,
    ) -> Result<(), LaneError> {
        if h.kind != wire::KIND_DATA {
            sink.zero_pages(idx, h.first_page, h.count);
            sum.zero_pages += h.count;
            return Ok(());
        }
        if matches!(self.rx.stream, Conn::Tls(_)) {
            // A TLS lane's read-ahead holds no payload (`Incoming::fill` reads only headers).
            debug_assert_eq!(self.rx.start, self.rx.end);
            self.land_in_place(sink, idx, region, h.first_page, h.count)?;
        } else if sink.reads_landed() || sink.places() {
            self.land_staged(sink, idx, region, h.first_page, h.count)?;
        } else {
            let dst = region.guest_pages(h.first_page, h.count);
            // SAFETY: destination memory is writable (the region's contract), and the sink
            // admitted this run (`claim`): a round is open and no other lane writes these
            // pages until it is released.
            unsafe { self.rx.read_into_guest(dst) }?;
            sink.data_landed(idx, h.first_page, h.count);
        }
        sum.data_bytes += h.count * region.page_size() as u64;
        sum.data_pages += h.count;
        Ok(())
    }

    /// Receives until the source closes the lane, handing every run to `sink`.
    ///
    /// Any header that does not fit the region table ends the lane with
    /// [`LaneError::Malformed`] before a byte of its payload is written.
    pub fn run(&mut self, sink: &dyn PageSink) -> Result<DestLaneSummary, LaneError> {
        let mut sum = DestLaneSummary::default();
        loop {
            if !self.rx.fill(HEADER_LEN)? {
                return Err(LaneError::Closed);
            }
            let rx = &mut self.rx;
            let hb: [u8; HEADER_LEN] = rx.buf[rx.start..rx.start + HEADER_LEN]
                .try_into()
                .expect("header length");
            rx.start += HEADER_LEN;
            let h = Header::decode(&hb).map_err(LaneError::Malformed)?;
            match h.kind {
                wire::KIND_DATA | wire::KIND_ZERO => {
                    let idx = h.region as usize;
                    let region = *self.map.get(idx).ok_or_else(|| {
                        LaneError::Malformed(format!("run names unknown region {}", h.region))
                    })?;
                    if !region.contains(h.first_page, h.count) {
                        return Err(LaneError::Malformed(format!(
                            "run of {} pages at page {} lies outside region {} ({} pages)",
                            h.count,
                            h.first_page,
                            h.region,
                            region.pages()
                        )));
                    }
                    sink.claim(idx, h.first_page, h.count)
                        .map_err(LaneError::Refused)?;
                    let landed = self.land_run(sink, idx, &region, &h, &mut sum);
                    sink.release(idx, h.first_page, h.count);
                    landed?;
                }
                wire::KIND_BATCH_END => {
                    self.rx.stream.write_all(&wire::encode_ack(h.count))?;
                    self.rx.stream.flush()?;
                    sum.batches += 1;
                }
                wire::KIND_CLOSE => return Ok(sum),
                _ => unreachable!("Header::decode accepts only known kinds"),
            }
        }
    }
}

impl DestLane for TcpDestLane {
    fn run(&mut self, sink: &dyn PageSink) -> Result<DestLaneSummary, LaneError> {
        TcpDestLane::run(self, sink)
    }

    fn shutdown_handle(&self) -> std::io::Result<TcpStream> {
        TcpDestLane::shutdown_handle(self)
    }
}
