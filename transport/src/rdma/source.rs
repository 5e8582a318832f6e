//! The sending end of an RDMA lane: dirty runs become RDMA WRITEs straight from guest memory,
//! then one SEND describes the batch.
//!
//! Work requests are posted in chains of up to [`SIGNAL_EVERY`]; only the last of a chain asks
//! for a completion (selective signalling), which also frees the send-queue slots of the
//! unsignalled ones before it. At most `send_depth` work requests are outstanding, and at most
//! [`SLOTS`] descriptors, the number of receives the destination keeps posted.

use std::collections::VecDeque;
use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdma_mummy_sys::ibv_sge;
use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::queue_pair::{
    PostSendGuard, QueuePair, SetScatterGatherEntry, WorkRequestFlags,
};

use super::memory::{chunk_span, register, ChunkCache, LocalMemory, Registration, RemoteMemory};
use super::queue::{Completion, QpEndpoint, Queue, MAX_SGE};
use super::wire::{self, Reply, REPLY_LEN, SLOT_BYTES};
use super::{RdmaDevice, RdmaError};
use crate::replies::{lock, read_records};
use crate::{Batch, LaneError, Pacer, RunKind, SourceLane};

/// Descriptor buffers; the destination keeps as many receives posted.
pub const SLOTS: usize = 32;
/// Work requests in one posted chain; the last is signalled.
const SIGNAL_EVERY: usize = 64;
/// Outstanding work requests per queue pair (bounded by the device).
const SEND_DEPTH: u32 = 512;
/// How long a lane waits for the destination's answer to a registration request.
const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Default)]
struct RepliesInner {
    acked: u64,
    key: Option<Reply>,
    closed: Option<String>,
}

#[derive(Default)]
struct Replies {
    inner: Mutex<RepliesInner>,
    cv: Condvar,
}

/// A source queue pair created and waiting for the destination's end.
pub struct SourcePrepared {
    queue: Queue,
    mem: Arc<LocalMemory>,
}

impl SourcePrepared {
    /// Creates the lane's queue pair on `dev`; `mem` holds (or will hold) the source's
    /// registrations.
    pub fn new(dev: Arc<RdmaDevice>, mem: Arc<LocalMemory>) -> Result<SourcePrepared, RdmaError> {
        let depth = SEND_DEPTH.min(dev.max_qp_wr);
        Ok(SourcePrepared {
            queue: Queue::new(dev, depth, 1, true)?,
            mem,
        })
    }

    /// Our end of the queue pair, for the destination.
    pub fn endpoint(&self) -> QpEndpoint {
        self.queue.endpoint()
    }

    /// Connects to the destination's end and starts the lane on its (authenticated) socket.
    pub fn connect(
        mut self,
        peer: &QpEndpoint,
        remote: RemoteMemory,
        stream: TcpStream,
        pacer: Arc<Pacer>,
    ) -> Result<RdmaSourceLane, RdmaError> {
        self.check_remote(&remote)?;
        self.queue.connect(peer)?;
        let dev = self.queue.dev.clone();
        let mut slots = vec![0u8; SLOTS * SLOT_BYTES];
        let slots_mr = register(&dev, slots.as_mut_ptr(), slots.len(), false)?;
        let (replies, reader) = start_reply_reader(&stream)?;
        let local_cache = match self.mem.mode {
            Registration::Chunked { max_chunks, .. } => max_chunks as usize,
            Registration::PinAll => 1,
        };
        let remote_cache = match remote {
            RemoteMemory::Chunked { max_chunks, .. } => max_chunks as usize,
            RemoteMemory::PinAll(_) => 1,
        };
        Ok(RdmaSourceLane {
            queue: self.queue,
            slots_mr,
            slots,
            local_chunks: ChunkCache::new(local_cache),
            remote_chunks: ChunkCache::new(remote_cache),
            mem: self.mem,
            remote,
            stream,
            replies,
            reader: Some(reader),
            pacer,
            sge_max: dev.max_sge.min(MAX_SGE) as usize,
            pending: Vec::new(),
            sges: Vec::new(),
            next_sig: 1,
            done_sig: 0,
            inflight: VecDeque::new(),
            outstanding: 0,
            slot_sig: [0; SLOTS],
            msgs: 0,
            seq_posted: 0,
            sent: VecDeque::new(),
            done_seq: 0,
            comps: Vec::new(),
            failed: None,
            #[cfg(feature = "fault-injection")]
            rkey_flip: 0,
        })
    }

    /// Refuses a destination memory description this lane cannot use: a region table of
    /// another length, or chunks that are not a power of two, smaller than a page or too few.
    fn check_remote(&self, remote: &RemoteMemory) -> Result<(), RdmaError> {
        let nregions = self.mem.map.regions().len();
        match remote {
            RemoteMemory::PinAll(r) if r.len() != nregions => Err(RdmaError::Setup(format!(
                "destination registered {} regions, the table has {nregions}",
                r.len()
            ))),
            RemoteMemory::Chunked {
                chunk_bytes,
                max_chunks,
            } => {
                let page = self
                    .mem
                    .map
                    .regions()
                    .iter()
                    .map(|r| r.page_size() as u64)
                    .max();
                if !chunk_bytes.is_power_of_two()
                    || page.is_some_and(|p| *chunk_bytes < p)
                    || *max_chunks < 2
                {
                    return Err(RdmaError::Setup(format!(
                        "unusable chunking from the destination: {chunk_bytes} bytes × {max_chunks}"
                    )));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// Starts the thread that reads the destination's replies from the lane socket.
fn start_reply_reader(stream: &TcpStream) -> Result<(Arc<Replies>, JoinHandle<()>), RdmaError> {
    let replies = Arc::new(Replies::default());
    let mut rd = stream
        .try_clone()
        .map_err(|e| RdmaError::verbs("lane socket", e))?;
    let r = replies.clone();
    let reader = std::thread::Builder::new()
        .name("rmig-rdma-ack".into())
        .spawn(move || read_replies(&mut rd, &r))
        .map_err(|e| RdmaError::verbs("spawning the reply reader", e))?;
    Ok((replies, reader))
}

fn read_replies(rd: &mut TcpStream, r: &Replies) {
    let reason = read_records::<REPLY_LEN>(rd, |b| {
        match wire::decode_reply(b)? {
            Reply::Ack(s) => {
                let mut g = lock(&r.inner);
                g.acked = g.acked.max(s);
            }
            k => lock(&r.inner).key = Some(k),
        }
        r.cv.notify_all();
        Ok(())
    });
    lock(&r.inner).closed = Some(reason);
    r.cv.notify_all();
}

/// One WRITE waiting to be posted: a remote span and its local pieces (`sges[first..end]`).
#[derive(Debug, Clone, Copy)]
struct PendingWrite {
    addr: u64,
    rkey: u32,
    first: usize,
    end: usize,
}

/// An RDMA source lane.
pub struct RdmaSourceLane {
    // Dropped first: the queue pair goes before the memory it may still point at.
    queue: Queue,
    slots_mr: Arc<MemoryRegion>,
    slots: Vec<u8>,
    local_chunks: ChunkCache<Arc<MemoryRegion>>,
    remote_chunks: ChunkCache<(u64, u32)>,
    mem: Arc<LocalMemory>,
    remote: RemoteMemory,
    stream: TcpStream,
    replies: Arc<Replies>,
    reader: Option<JoinHandle<()>>,
    pacer: Arc<Pacer>,
    sge_max: usize,
    pending: Vec<PendingWrite>,
    sges: Vec<ibv_sge>,
    /// Number of the next signalled work request (its wr_id).
    next_sig: u64,
    /// Highest signalled work request known complete.
    done_sig: u64,
    /// Signalled work requests outstanding, with how many work requests each completes.
    inflight: VecDeque<(u64, usize)>,
    outstanding: usize,
    /// The signalled SEND that last used each descriptor buffer.
    slot_sig: [u64; SLOTS],
    msgs: u64,
    seq_posted: u64,
    /// Batches posted and not yet complete here: (signal id of their SEND, sequence number).
    sent: VecDeque<(u64, u64)>,
    /// The highest batch whose work requests have all completed on this side.
    done_seq: u64,
    comps: Vec<Completion>,
    failed: Option<String>,
    /// Tests: what the remote key of every WRITE is XORed with (0: the right keys).
    #[cfg(feature = "fault-injection")]
    rkey_flip: u32,
}

impl RdmaSourceLane {
    fn fail<T>(&mut self, e: LaneError) -> Result<T, LaneError> {
        self.failed.get_or_insert_with(|| e.to_string());
        Err(e)
    }

    /// Takes in completions; a failed one fails the lane.
    fn reap(&mut self) -> Result<(), LaneError> {
        if let Some(f) = &self.failed {
            return Err(LaneError::Rdma(f.clone()));
        }
        let mut comps = std::mem::take(&mut self.comps);
        comps.clear();
        self.queue.poll(&mut comps);
        let r = self.take(&comps);
        self.comps = comps;
        r?;
        let closed = lock(&self.replies.inner).closed.clone();
        if let Some(r) = closed {
            return self.fail(LaneError::Io(std::io::Error::other(r)));
        }
        Ok(())
    }

    /// Accounts for completed work requests; a failed one fails the lane.
    fn take(&mut self, comps: &[Completion]) -> Result<(), LaneError> {
        for c in comps {
            if !c.ok() {
                let e = c.error("RDMA WRITE/SEND");
                return self.fail(e);
            }
            if c.wr_id != 0 {
                self.done_sig = self.done_sig.max(c.wr_id);
                while self.sent.front().is_some_and(|(s, _)| *s <= self.done_sig) {
                    self.done_seq = self.sent.pop_front().expect("front").1;
                }
                while self.inflight.front().is_some_and(|(s, _)| *s <= c.wr_id) {
                    let (_, n) = self.inflight.pop_front().expect("front");
                    self.outstanding -= n;
                }
            }
        }
        Ok(())
    }

    /// Polls until `done` holds, failing after `timeout`.
    fn poll_until(
        &mut self,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut(&Self) -> bool,
    ) -> Result<(), LaneError> {
        let deadline = Instant::now() + timeout;
        let mut spins = 0u32;
        loop {
            self.reap()?;
            if done(self) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return self.fail(LaneError::Rdma(format!("timed out waiting for {what}")));
            }
            spins += 1;
            if spins > 64 {
                // Sleep on the completion channel rather than poll: on soft-RoCE the device is
                // this machine's CPUs, and a spinning lane takes them from it.
                let mut early = std::mem::take(&mut self.comps);
                early.clear();
                let r = self.queue.wait(-1, Duration::from_millis(5), &mut early);
                let r = r.and_then(|_| self.take(&early));
                self.comps = early;
                r?;
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// Posts the pending WRITEs (and `send`, a descriptor of `len` bytes in buffer `slot`),
    /// in signalled chains.
    fn post(&mut self, send: Option<(usize, usize)>) -> Result<(), LaneError> {
        let total = self.pending.len() + send.is_some() as usize;
        let mut done = 0;
        while done < total {
            let n = (total - done).min(SIGNAL_EVERY);
            let cap = SEND_DEPTH.min(self.queue.dev.max_qp_wr) as usize;
            self.poll_until(REPLY_TIMEOUT, "send queue room", |s| {
                s.outstanding + n <= cap
            })?;
            let sig = self.next_sig;
            self.next_sig += 1;
            let mut guard = self.queue.qp.start_post_send();
            for i in done..done + n {
                let last = i + 1 == done + n;
                let (id, flags) = if last {
                    (sig, WorkRequestFlags::Signaled)
                } else {
                    (0, WorkRequestFlags::none())
                };
                if i < self.pending.len() {
                    let w = self.pending[i];
                    #[cfg(feature = "fault-injection")]
                    let w = PendingWrite {
                        rkey: w.rkey ^ self.rkey_flip,
                        ..w
                    };
                    let h = guard.construct_wr(id, flags).setup_write(w.rkey, w.addr);
                    // SAFETY: every entry points into guest memory or the descriptor buffers,
                    // registered (lkey) and alive until this work request completes: the
                    // queue pair is destroyed before either.
                    unsafe { h.setup_sge_list(&self.sges[w.first..w.end]) };
                } else {
                    let (slot, len) = send.expect("descriptor");
                    let h = guard.construct_wr(id, flags).setup_send();
                    // SAFETY: the descriptor buffer is registered and outlives the queue pair.
                    unsafe {
                        h.setup_sge(
                            self.slots_mr.lkey(),
                            self.slots.as_ptr().add(slot * SLOT_BYTES) as u64,
                            len as u32,
                        )
                    };
                    self.slot_sig[slot] = sig;
                }
            }
            if let Err(e) = guard.post() {
                return self.fail(LaneError::Rdma(format!("ibv_post_send: {e}")));
            }
            self.inflight.push_back((sig, n));
            self.outstanding += n;
            done += n;
        }
        self.pending.clear();
        self.sges.clear();
        Ok(())
    }

    /// Posts what is pending and waits until nothing is outstanding.
    fn drain(&mut self) -> Result<(), LaneError> {
        self.post(None)?;
        self.poll_until(REPLY_TIMEOUT, "outstanding writes", |s| s.outstanding == 0)
    }

    /// A free descriptor buffer for the next message.
    fn slot(&mut self) -> Result<usize, LaneError> {
        let slot = (self.msgs % SLOTS as u64) as usize;
        self.msgs += 1;
        let need = self.slot_sig[slot];
        self.poll_until(REPLY_TIMEOUT, "a descriptor buffer", |s| s.done_sig >= need)?;
        Ok(slot)
    }

    /// The local key covering `len` bytes at page offset `off` of region `ri`, and how many of
    /// them it covers.
    fn local_key(&mut self, ri: u32, off: u64, len: u64) -> Result<(u32, u64), LaneError> {
        match self.mem.mode {
            Registration::PinAll => Ok((self.mem.regions[ri as usize].lkey(), len)),
            Registration::Chunked { chunk_bytes, .. } => {
                let chunk = off / chunk_bytes;
                let covers = ((chunk + 1) * chunk_bytes - off).min(len);
                if let Some(m) = self.local_chunks.get((ri, chunk)) {
                    return Ok((m.lkey(), covers));
                }
                if self.local_chunks.is_full() {
                    let v = self.local_chunks.victim().expect("full cache has a victim");
                    self.drain()?;
                    self.local_chunks.remove(v);
                }
                let region = *self.mem.map.get(ri as usize).expect("region");
                let (p, l) = chunk_span(&region, chunk, chunk_bytes).expect("chunk in region");
                let mr = match register(&self.queue.dev, p, l, false) {
                    Ok(m) => m,
                    Err(e) => return self.fail(LaneError::Rdma(e.to_string())),
                };
                let lkey = mr.lkey();
                self.local_chunks.insert((ri, chunk), mr);
                Ok((lkey, covers))
            }
        }
    }

    /// The remote address and key for byte `off` of region `ri`, and how many bytes from
    /// there the key covers.
    fn remote_key(&mut self, ri: u32, off: u64, len: u64) -> Result<(u64, u32, u64), LaneError> {
        let (chunk_bytes, _) = match &self.remote {
            RemoteMemory::PinAll(r) => {
                let r = r[ri as usize];
                return Ok((r.addr + off, r.rkey, len));
            }
            RemoteMemory::Chunked {
                chunk_bytes,
                max_chunks,
            } => (*chunk_bytes, *max_chunks),
        };
        let chunk = off / chunk_bytes;
        let within = off - chunk * chunk_bytes;
        let covers = (chunk_bytes - within).min(len);
        if let Some(&(addr, rkey)) = self.remote_chunks.get((ri, chunk)) {
            return Ok((addr + within, rkey, covers));
        }
        let evict = if self.remote_chunks.is_full() {
            let v = self
                .remote_chunks
                .victim()
                .expect("full cache has a victim");
            // No WRITE to the victim may be outstanding when the destination drops it.
            self.drain()?;
            self.remote_chunks.remove(v);
            Some(v)
        } else {
            None
        };
        // Keep one receive free for this request: at most SLOTS - 1 batches unacknowledged.
        self.wait_credit(1)?;
        let slot = self.slot()?;
        let len_msg = {
            let buf = &mut self.slots[slot * SLOT_BYTES..(slot + 1) * SLOT_BYTES];
            wire::encode_register(buf, ri, chunk, evict)
        };
        lock(&self.replies.inner).key = None;
        self.post(Some((slot, len_msg)))?;
        let Some(reply) = self.wait_reply(REPLY_TIMEOUT, |r| r.key.take())? else {
            return self.fail(LaneError::Rdma(
                "no answer to a registration request".into(),
            ));
        };
        match reply {
            Reply::Key { addr, rkey } => {
                self.remote_chunks.insert((ri, chunk), (addr, rkey));
                Ok((addr + within, rkey, covers))
            }
            Reply::Refused(e) => self.fail(LaneError::Rdma(format!(
                "the destination could not register chunk {chunk} of region {ri}: {}",
                std::io::Error::from_raw_os_error(e as i32)
            ))),
            Reply::Ack(_) => unreachable!("acks are not keys"),
        }
    }

    /// Waits until at most `SLOTS - 1 - reserve` batches are unacknowledged.
    fn wait_credit(&mut self, reserve: u64) -> Result<(), LaneError> {
        let limit = SLOTS as u64 - 1 - reserve;
        let floor = self.seq_posted.saturating_sub(limit);
        match self.wait_reply(REPLY_TIMEOUT, |r| (r.acked >= floor).then_some(()))? {
            Some(()) => Ok(()),
            None => self.fail(LaneError::AckTimeout(REPLY_TIMEOUT)),
        }
    }

    /// Takes in completions and waits for the reply reader until `got` finds what it wants
    /// (`None` after `timeout`).
    fn wait_reply<T>(
        &mut self,
        timeout: Duration,
        mut got: impl FnMut(&mut RepliesInner) -> Option<T>,
    ) -> Result<Option<T>, LaneError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.reap()?;
            let mut g = lock(&self.replies.inner);
            if let Some(v) = got(&mut g) {
                return Ok(Some(v));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            let _ = self.replies.cv.wait_timeout(g, Duration::from_millis(1));
        }
    }

    /// Queues the WRITEs of `len` bytes at byte `off` of region `ri`.
    fn queue_writes(&mut self, ri: u32, off: u64, len: u64) -> Result<(), LaneError> {
        let region = *self.mem.map.get(ri as usize).expect("region");
        let mut pos = off;
        let end = off + len;
        while pos < end {
            let (addr, rkey, rcover) = self.remote_key(ri, pos, end - pos)?;
            let first = self.sges.len();
            let wend = pos + rcover;
            while pos < wend && self.sges.len() - first < self.sge_max {
                let (lkey, lcover) = self.local_key(ri, pos, wend - pos)?;
                self.sges.push(ibv_sge {
                    // SAFETY: pos < region length (the run is inside the region).
                    addr: unsafe { region.as_ptr().add(pos as usize) } as u64,
                    length: lcover as u32,
                    lkey,
                });
                pos += lcover;
            }
            // A WRITE cut short by the gather limit goes on in the next one, from `pos`.
            self.pending.push(PendingWrite {
                addr,
                rkey,
                first,
                end: self.sges.len(),
            });
            if self.pending.len() >= SIGNAL_EVERY {
                self.post(None)?;
            }
        }
        Ok(())
    }

    /// Queues the WRITEs of `batch`'s data runs (posting them in chains as they fill).
    fn queue_batch(&mut self, batch: &Batch) -> Result<(), LaneError> {
        self.reap()?;
        if wire::entries(&batch.runs) > wire::MAX_DESC_RUNS {
            return Err(LaneError::Malformed(format!(
                "{} runs do not fit one descriptor",
                batch.runs.len()
            )));
        }
        for run in &batch.runs {
            if run.kind == RunKind::Data {
                let region = *self
                    .mem
                    .map
                    .get(run.region as usize)
                    .ok_or_else(|| LaneError::Malformed(format!("no region {}", run.region)))?;
                let ps = region.page_size() as u64;
                self.queue_writes(run.region, run.first_page * ps, run.npages as u64 * ps)?;
            }
        }
        Ok(())
    }
}

impl SourceLane for RdmaSourceLane {
    fn send(&mut self, batch: &Batch) -> Result<u64, LaneError> {
        self.queue_batch(batch)?;
        self.wait_credit(0)?;
        let slot = self.slot()?;
        let seq = batch.seq;
        let len = {
            let buf = &mut self.slots[slot * SLOT_BYTES..(slot + 1) * SLOT_BYTES];
            wire::encode_batch(buf, seq, &batch.runs)
        };
        let total = batch.data_bytes + len as u64;
        self.pacer.take(total);
        self.post(Some((slot, len)))?;
        self.sent.push_back((self.slot_sig[slot], seq));
        self.seq_posted = seq;
        Ok(total)
    }

    fn acked(&self) -> u64 {
        lock(&self.replies.inner).acked.min(self.done_seq)
    }

    fn wait_acked(&mut self, seq: u64, timeout: Duration) -> Result<(), LaneError> {
        match self.wait_reply(timeout, |r| (r.acked >= seq).then_some(()))? {
            // The destination's acknowledgement can overtake the transport's own: until the
            // batch's work requests have completed here, the device may still retransmit one
            // of its WRITEs, with the page's bytes as they are then, after a later round wrote
            // that page over another lane. So a batch counts only once it is complete here too.
            Some(()) => self.poll_until(REPLY_TIMEOUT, "outstanding writes", |s| s.done_seq >= seq),
            None => Err(LaneError::AckTimeout(timeout)),
        }
    }

    fn close(&mut self) {
        if self.failed.is_none() {
            if let Ok(slot) = self.slot() {
                let len = wire::encode_close(&mut self.slots[slot * SLOT_BYTES..]);
                if self.post(Some((slot, len))).is_ok() {
                    let _ = self.stream.write_all(&[wire::CLOSING]);
                    let _ = self.poll_until(super::CLOSE_WAIT, "the close", |s| s.outstanding == 0);
                }
            }
        }
        let _ = self.stream.flush();
        let _ = self.stream.shutdown(Shutdown::Write);
    }
}

#[cfg(feature = "fault-injection")]
impl crate::fault::Breakable for RdmaSourceLane {
    /// Posts half of the batch's WRITEs, forces the queue pair into the error state, posts the
    /// other half, and returns the error as a real failure shows it: through a completion that
    /// the device flushed (`IBV_WC_WR_FLUSH_ERR`), taken from the completion queue. The writes
    /// posted after the error are flushed by the device in every case, so one always comes.
    fn tear(&mut self, batch: &Batch) -> LaneError {
        if let Err(e) = self.queue_batch(batch) {
            return e;
        }
        // The second half's entries index `sges`, which posting the first half clears.
        let (rest, sges) = (
            self.pending.split_off(self.pending.len() / 2),
            self.sges.clone(),
        );
        if let Err(e) = self.post(None) {
            return e;
        }
        self.queue.set_error();
        (self.pending, self.sges) = (rest, sges);
        if let Err(e) = self.post(None) {
            return e; // the flushed completion, reaped while waiting for room
        }
        match self.poll_until(REPLY_TIMEOUT, "a flushed completion", |_| false) {
            Err(e) => e,
            Ok(()) => unreachable!("the condition never holds"),
        }
    }

    fn corrupt_remote_keys(&mut self) {
        self.rkey_flip = 0x5a;
    }

    /// Sizes the cache of the destination's chunks beyond its limit (called as the plan wraps
    /// the lane, before any chunk is cached).
    fn ignore_chunk_limit(&mut self, extra: u32) {
        if let RemoteMemory::Chunked { max_chunks, .. } = self.remote {
            self.remote_chunks = ChunkCache::new(max_chunks as usize + extra as usize);
        }
    }
}

impl Drop for RdmaSourceLane {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}
