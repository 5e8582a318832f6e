//! The sending end of a TCP lane.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::seal::Sealer;
use super::sendmsg::{iovec_of, write_all_iov};
use super::wire::{self, Header, ACK_LEN, HEADER_LEN};
use crate::replies::{lock, read_records};
use crate::{Batch, LaneError, MemoryMap, Pacer, RunKind, SourceLane};

/// What the acknowledgement reader has learnt.
#[derive(Debug, Default)]
struct AckInner {
    seq: u64,
    /// Set once the lane ended (the reader stopped, or a record failed to open); the reason
    /// why.
    closed: Option<String>,
    /// An encrypted lane's bytes read from the socket, not yet opened by the lane thread.
    sealed: Vec<u8>,
}

#[derive(Debug, Default)]
struct Acks {
    inner: Mutex<AckInner>,
    cv: Condvar,
}

/// A TCP source lane: vectored writes from guest memory (or TLS records sealed from it),
/// acknowledgements read on a helper thread so that sending never waits for them.
pub struct TcpSourceLane {
    stream: TcpStream,
    map: MemoryMap,
    pacer: Arc<Pacer>,
    acks: Arc<Acks>,
    reader: Option<JoinHandle<()>>,
    headers: Vec<[u8; HEADER_LEN]>,
    /// The TLS session, when the lane is encrypted. Only the lane thread locks it (`acked`
    /// takes `&self`), so the lock is never contended.
    tls: Option<Mutex<Sealer>>,
}

impl TcpSourceLane {
    /// Takes over a connected, authenticated lane socket.
    pub fn new(stream: TcpStream, map: MemoryMap, pacer: Arc<Pacer>) -> Result<Self, LaneError> {
        Self::start(stream, map, pacer, read_acks, None)
    }

    /// Takes over a connected lane socket whose TLS session `conn` is established and
    /// authenticated: every byte of the lane then travels in TLS records.
    pub fn new_tls(
        stream: TcpStream,
        conn: rustls::ClientConnection,
        map: MemoryMap,
        pacer: Arc<Pacer>,
    ) -> Result<Self, LaneError> {
        let sealer = Mutex::new(Sealer::new(conn));
        Self::start(stream, map, pacer, read_sealed, Some(sealer))
    }

    /// Starts the lane's acknowledgement reader (`read`: cleartext acknowledgements, or
    /// sealed records for the TLS session in `tls`) and takes over the socket.
    fn start(
        stream: TcpStream,
        map: MemoryMap,
        pacer: Arc<Pacer>,
        read: fn(&mut TcpStream, &Acks),
        tls: Option<Mutex<Sealer>>,
    ) -> Result<Self, LaneError> {
        stream.set_nodelay(true)?;
        let acks = Arc::new(Acks::default());
        let mut rd = stream.try_clone()?;
        let a = acks.clone();
        let reader = std::thread::Builder::new()
            .name("rmig-ack".into())
            .spawn(move || read(&mut rd, &a))?;
        Ok(TcpSourceLane {
            stream,
            map,
            pacer,
            acks,
            reader: Some(reader),
            headers: Vec::new(),
            tls,
        })
    }

    fn closed_reason(&self) -> Option<String> {
        lock(&self.acks.inner).closed.clone()
    }

    /// Opens what the reader took off an encrypted lane's socket and records the
    /// acknowledgements it carried; a record that fails to open ends the lane.
    fn open_acks(&self) {
        let Some(t) = &self.tls else { return };
        let mut t = lock(t);
        let sealed = std::mem::take(&mut lock(&self.acks.inner).sealed);
        if sealed.is_empty() {
            return;
        }
        if let Err(reason) = t.open::<ACK_LEN>(&sealed, |b| on_ack(&self.acks, b)) {
            ack_reader_stopped(&self.acks, reason);
        }
    }
}

/// Records acknowledgement `b`.
fn on_ack(acks: &Acks, b: &[u8; ACK_LEN]) -> Result<(), String> {
    let seq = wire::decode_ack(b)?;
    let mut g = lock(&acks.inner);
    g.seq = g.seq.max(seq);
    acks.cv.notify_all();
    Ok(())
}

/// Marks the lane ended for `reason` (the first reason stays).
fn ack_reader_stopped(acks: &Acks, reason: String) {
    lock(&acks.inner).closed.get_or_insert(reason);
    acks.cv.notify_all();
}

fn read_acks(rd: &mut TcpStream, acks: &Acks) {
    let reason = read_records::<ACK_LEN>(rd, |b| on_ack(acks, b));
    ack_reader_stopped(acks, reason);
}

/// An encrypted lane's reader: moves what the socket brings into the inbox, for the lane
/// thread to open, until the socket ends or fails.
fn read_sealed(rd: &mut TcpStream, acks: &Acks) {
    let mut raw = vec![0u8; 16 * 1024];
    let reason = loop {
        match rd.read(&mut raw) {
            Ok(0) => break "peer closed the lane".to_string(),
            Ok(n) => {
                lock(&acks.inner).sealed.extend_from_slice(&raw[..n]);
                acks.cv.notify_all();
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break e.to_string(),
        }
    };
    ack_reader_stopped(acks, reason);
}

impl TcpSourceLane {
    /// The I/O vector of `batch` (a header per run, data runs' pages straight from guest
    /// memory, the batch-end header) and its length in bytes. Fails if the lane has ended.
    fn frame(&mut self, batch: &Batch) -> Result<(Vec<libc::iovec>, u64), LaneError> {
        if let Some(r) = self.closed_reason() {
            return Err(LaneError::Io(std::io::Error::other(r)));
        }
        self.headers.clear();
        for run in &batch.runs {
            let kind = match run.kind {
                RunKind::Data => wire::KIND_DATA,
                RunKind::Zero => wire::KIND_ZERO,
            };
            self.headers.push(
                Header {
                    kind,
                    region: run.region,
                    first_page: run.first_page,
                    count: run.npages as u64,
                }
                .encode(),
            );
        }
        self.headers.push(
            Header {
                kind: wire::KIND_BATCH_END,
                region: 0,
                first_page: 0,
                count: batch.seq,
            }
            .encode(),
        );
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(batch.runs.len() * 2 + 1);
        let mut total = 0u64;
        for (run, h) in batch.runs.iter().zip(&self.headers) {
            iov.push(iovec_of(h));
            total += HEADER_LEN as u64;
            if run.kind == RunKind::Data {
                let region = self
                    .map
                    .get(run.region as usize)
                    .ok_or_else(|| LaneError::Malformed(format!("no region {}", run.region)))?;
                let g = region.guest_pages(run.first_page, run.npages as u64);
                total += g.len() as u64;
                iov.push(g.as_iovec());
            }
        }
        iov.push(iovec_of(self.headers.last().expect("batch end header")));
        total += HEADER_LEN as u64;
        Ok((iov, total))
    }
}

impl SourceLane for TcpSourceLane {
    fn send(&mut self, batch: &Batch) -> Result<u64, LaneError> {
        if self.tls.is_some() {
            return self.send_tls(batch, None);
        }
        let (mut iov, total) = self.frame(batch)?;
        self.pacer.take(total);
        // SAFETY: the entries describe `self.headers`, unchanged until the call returns, and
        // pages of `self.map`'s regions, readable for the session by their contract.
        unsafe { write_all_iov(&self.stream, &mut iov) }?;
        Ok(total)
    }

    fn acked(&self) -> u64 {
        self.open_acks();
        lock(&self.acks.inner).seq
    }

    fn wait_acked(&mut self, seq: u64, timeout: Duration) -> Result<(), LaneError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.open_acks();
            let g = lock(&self.acks.inner);
            if g.seq >= seq {
                return Ok(());
            }
            if !g.sealed.is_empty() {
                continue; // bytes came in since `open_acks`: open them first
            }
            if let Some(r) = &g.closed {
                return Err(LaneError::Io(std::io::Error::other(r.clone())));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(LaneError::AckTimeout(timeout));
            }
            // Woken when the reader brings bytes or stops (both under this lock).
            drop(
                self.acks
                    .cv
                    .wait_timeout(g, deadline - now)
                    .unwrap_or_else(|e| e.into_inner()),
            );
        }
    }

    fn close(&mut self) {
        let h = Header {
            kind: wire::KIND_CLOSE,
            region: 0,
            first_page: 0,
            count: 0,
        }
        .encode();
        match &mut self.tls {
            Some(t) => {
                let t = t.get_mut().unwrap_or_else(|e| e.into_inner());
                let mut all = u64::MAX;
                let _ = t
                    .push(&self.stream, &h, &mut all)
                    .and_then(|()| t.flush(&self.stream, true));
            }
            None => {
                let _ = self.stream.write_all(&h);
            }
        }
        let _ = self.stream.shutdown(Shutdown::Write);
    }
}

impl TcpSourceLane {
    /// Sends `batch` through the lane's TLS session: headers and pages are gathered into the
    /// sealer's plaintext buffer (guest memory is copied out with [`GuestPages::copy_to`],
    /// never borrowed as `&[u8]`), sealed into records and written. With `limit`, only that
    /// many plaintext bytes are sent (a torn batch, for fault injection).
    fn send_tls(&mut self, batch: &Batch, limit: Option<u64>) -> Result<u64, LaneError> {
        let total = self.frame(batch)?.1;
        self.pacer.take(total);
        let t = self.tls.as_mut().expect("a TLS lane");
        let t = t.get_mut().unwrap_or_else(|e| e.into_inner());
        let mut budget = limit.unwrap_or(u64::MAX);
        for (run, h) in batch.runs.iter().zip(&self.headers) {
            t.push(&self.stream, h, &mut budget)?;
            if run.kind == RunKind::Data {
                let region = self.map.get(run.region as usize).expect("checked by frame");
                let g = region.guest_pages(run.first_page, run.npages as u64);
                t.push_guest(&self.stream, g, &mut budget)?;
            }
        }
        let end = self.headers.last().expect("batch end header");
        t.push(&self.stream, end, &mut budget)?;
        t.flush(&self.stream, false)?;
        Ok(total)
    }
}

#[cfg(feature = "fault-injection")]
impl crate::fault::Breakable for TcpSourceLane {
    fn tear(&mut self, batch: &Batch) -> LaneError {
        if self.tls.is_some() {
            let total = match self.frame(batch) {
                Ok(f) => f.1,
                Err(e) => return e,
            };
            let _ = self.send_tls(batch, Some(total / 2));
            let _ = self.stream.shutdown(Shutdown::Both);
            return LaneError::Injected("lane killed mid-batch");
        }
        let (mut iov, total) = match self.frame(batch) {
            Ok(f) => f,
            Err(e) => return e,
        };
        self.pacer.take(total);
        // Die mid-batch: half the bytes reach the peer, then the connection drops.
        let mut half = total / 2;
        for v in iov.iter_mut() {
            v.iov_len = (v.iov_len as u64).min(half) as usize;
            half -= v.iov_len as u64;
        }
        iov.retain(|v| v.iov_len > 0);
        // SAFETY: the entries describe `self.headers` and pages of `self.map`'s regions
        // (shortened, never lengthened), valid for reads during the call.
        let _ = unsafe { write_all_iov(&self.stream, &mut iov) };
        let _ = self.stream.shutdown(Shutdown::Both);
        LaneError::Injected("lane killed mid-batch")
    }
}

impl Drop for TcpSourceLane {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}
