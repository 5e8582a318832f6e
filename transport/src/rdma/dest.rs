//! The receiving end of an RDMA lane. The data lands without this side's CPU; this side
//! handles the descriptors that follow it: hashes the pages that landed (while the source
//! goes on writing), zeroes the zero runs, reposts the buffer and acknowledges the batch.
//!
//! The lane thread sleeps on the completion channel (no busy polling: the destination's CPU
//! is left to the guest's other work) and on the lane socket, whose end means the source is
//! gone.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::queue_pair::{QueuePair, SetScatterGatherEntry};

use super::memory::{chunk_span, register, Admission, ChunkCache, LocalMemory, Registration};
use super::queue::{QpEndpoint, Queue};
use super::source::SLOTS;
use super::wire::{self, Reply, Request, SLOT_BYTES};
use super::{RdmaDevice, RdmaError};
use crate::{DestLane, DestLaneSummary, LaneError, PageSink, RunKind};

/// A destination queue pair with its receives posted, waiting for the source's end.
pub struct DestPrepared {
    queue: Queue,
    mem: Arc<LocalMemory>,
    slots_mr: Arc<MemoryRegion>,
    slots: Vec<u8>,
}

impl DestPrepared {
    /// Creates the lane's queue pair on `dev` and posts its receives; `mem` holds the
    /// destination's registrations.
    pub fn new(dev: Arc<RdmaDevice>, mem: Arc<LocalMemory>) -> Result<DestPrepared, RdmaError> {
        let queue = Queue::new(dev.clone(), 4, SLOTS as u32, true)?;
        let mut slots = vec![0u8; SLOTS * SLOT_BYTES];
        let slots_mr = register(&dev, slots.as_mut_ptr(), slots.len(), false)?;
        let mut p = DestPrepared {
            queue,
            mem,
            slots_mr,
            slots,
        };
        for i in 0..SLOTS {
            post_recv(&mut p.queue, &p.slots_mr, &mut p.slots, i)
                .map_err(|e| RdmaError::Setup(e.to_string()))?;
        }
        Ok(p)
    }

    /// Our end of the queue pair, for the source.
    pub fn endpoint(&self) -> QpEndpoint {
        self.queue.endpoint()
    }

    /// Connects to the source's end; the lane then runs on its (authenticated) socket.
    pub fn connect(
        mut self,
        peer: &QpEndpoint,
        stream: TcpStream,
    ) -> Result<RdmaDestLane, RdmaError> {
        self.queue.connect(peer)?;
        let cap = match self.mem.mode {
            Registration::Chunked { max_chunks, .. } => max_chunks as usize,
            Registration::PinAll => 1,
        };
        Ok(RdmaDestLane {
            queue: self.queue,
            chunks: ChunkCache::new(cap),
            slots_mr: self.slots_mr,
            slots: self.slots,
            mem: self.mem,
            stream,
            summary: DestLaneSummary::default(),
        })
    }
}

fn post_recv(
    q: &mut Queue,
    mr: &MemoryRegion,
    slots: &mut [u8],
    i: usize,
) -> Result<(), LaneError> {
    let mut g = q.qp.start_post_recv();
    let h = g.construct_wr(i as u64);
    // SAFETY: buffer `i` is inside the registered `slots`, which outlive the queue pair; it is
    // not read again until its receive completes.
    unsafe {
        h.setup_sge(
            mr.lkey(),
            slots.as_mut_ptr().add(i * SLOT_BYTES) as u64,
            SLOT_BYTES as u32,
        )
    };
    g.post()
        .map_err(|e| LaneError::Rdma(format!("ibv_post_recv: {e}")))
}

/// An RDMA destination lane.
pub struct RdmaDestLane {
    // Dropped first: the queue pair goes before the memory registered for it.
    queue: Queue,
    chunks: ChunkCache<Arc<MemoryRegion>>,
    slots_mr: Arc<MemoryRegion>,
    slots: Vec<u8>,
    mem: Arc<LocalMemory>,
    stream: TcpStream,
    summary: DestLaneSummary,
}

impl RdmaDestLane {
    /// A handle that can shut the lane's socket down from another thread (to stop `run`).
    pub fn shutdown_handle(&self) -> std::io::Result<TcpStream> {
        self.stream.try_clone()
    }

    /// Serves the lane until the source closes it (`Ok`) or it fails.
    pub fn run(&mut self, sink: &dyn PageSink) -> Result<DestLaneSummary, LaneError> {
        let fd = self.stream.as_raw_fd();
        let mut comps = Vec::new();
        loop {
            comps.clear();
            self.queue.poll(&mut comps);
            if comps.is_empty() {
                let sock = self.queue.wait(fd, Duration::from_secs(1), &mut comps)?;
                if sock && comps.is_empty() {
                    // The source says nothing on the socket but that it is closing; else the
                    // socket's end means the source is gone. Either way a receive may still be
                    // on its way here.
                    let mut b = [0u8; 1];
                    let grace = match self.stream.read(&mut b) {
                        Ok(1) if b[0] == wire::CLOSING => super::CLOSE_WAIT,
                        Ok(0) => super::EOF_GRACE,
                        Ok(_) => {
                            return Err(LaneError::Malformed(
                                "unexpected bytes on an RDMA lane socket".into(),
                            ))
                        }
                        Err(e) => return Err(e.into()),
                    };
                    let until = std::time::Instant::now() + grace;
                    while comps.is_empty() && std::time::Instant::now() < until {
                        std::thread::sleep(Duration::from_millis(1));
                        self.queue.poll(&mut comps);
                    }
                    if comps.is_empty() {
                        return Err(LaneError::Closed);
                    }
                }
                if comps.is_empty() {
                    continue;
                }
            }
            for c in &comps {
                if !c.ok() {
                    return Err(c.error("receive"));
                }
                let slot = c.wr_id as usize;
                if slot >= SLOTS || c.byte_len as usize > SLOT_BYTES {
                    return Err(LaneError::Rdma(format!(
                        "completion for unknown buffer {slot}"
                    )));
                }
                let msg = &self.slots[slot * SLOT_BYTES..slot * SLOT_BYTES + c.byte_len as usize];
                let req = wire::decode_request(msg).map_err(LaneError::Malformed)?;
                let reply = match req {
                    Request::Batch { seq, runs } => {
                        self.batch(sink, &runs)?;
                        self.summary.batches += 1;
                        Reply::Ack(seq)
                    }
                    Request::Register {
                        region,
                        chunk,
                        evict,
                    } => self.register(region, chunk, evict)?,
                    Request::Close => return Ok(self.summary),
                };
                post_recv(&mut self.queue, &self.slots_mr, &mut self.slots, slot)?;
                self.stream.write_all(&wire::encode_reply(reply))?;
            }
        }
    }

    /// Hands a batch's runs to the sink (data landed; zero runs to be zeroed).
    fn batch(&mut self, sink: &dyn PageSink, runs: &[crate::Run]) -> Result<(), LaneError> {
        let map = &self.mem.map;
        for r in runs {
            let ok = map
                .get(r.region as usize)
                .is_some_and(|m| m.contains(r.first_page, r.npages as u64));
            if !ok {
                return Err(LaneError::Malformed(format!(
                    "run of {} pages at page {} of region {} is outside the table",
                    r.npages, r.first_page, r.region
                )));
            }
        }
        for r in runs {
            let region = map.get(r.region as usize).expect("checked");
            let n = r.npages as u64;
            // The NIC has written the data already (one-sided): the claim can refuse the run
            // (and end the lane) but not undo it.
            sink.claim(r.region as usize, r.first_page, n)
                .map_err(LaneError::Refused)?;
            match r.kind {
                RunKind::Zero => {
                    sink.zero_pages(r.region as usize, r.first_page, n);
                    self.summary.zero_pages += n;
                }
                RunKind::Data => {
                    sink.data_landed(r.region as usize, r.first_page, n);
                    self.summary.data_pages += n;
                    self.summary.data_bytes += n * region.page_size() as u64;
                }
            }
            sink.release(r.region as usize, r.first_page, n);
        }
        Ok(())
    }

    /// Registers a chunk the source asked for (dropping the one it gave up).
    fn register(
        &mut self,
        ri: u32,
        chunk: u64,
        evict: Option<(u32, u64)>,
    ) -> Result<Reply, LaneError> {
        let Registration::Chunked { chunk_bytes, .. } = self.mem.mode else {
            return Err(LaneError::Malformed(
                "chunk request while all memory is registered".into(),
            ));
        };
        let span = self
            .mem
            .map
            .get(ri as usize)
            .and_then(|r| chunk_span(r, chunk, chunk_bytes));
        let Some((ptr, len)) = span else {
            return Err(LaneError::Malformed(format!(
                "no chunk {chunk} in region {ri}"
            )));
        };
        match self.chunks.admit((ri, chunk), evict) {
            Admission::Held(m) => {
                return Ok(Reply::Key {
                    addr: m.get_ptr() as u64,
                    rkey: m.rkey(),
                })
            }
            Admission::Refuse => return Ok(Reply::Refused(libc::ENOSPC as u32)),
            Admission::Register => {}
        }
        match register(&self.queue.dev, ptr, len, true) {
            Ok(m) => {
                let r = Reply::Key {
                    addr: m.get_ptr() as u64,
                    rkey: m.rkey(),
                };
                self.chunks.insert((ri, chunk), m);
                Ok(r)
            }
            Err(super::RdmaError::LockedMemory { source, .. })
            | Err(super::RdmaError::Verbs { source, .. }) => Ok(Reply::Refused(
                source.raw_os_error().unwrap_or(libc::EIO) as u32,
            )),
            Err(e) => Err(LaneError::Rdma(e.to_string())),
        }
    }
}

impl DestLane for RdmaDestLane {
    fn run(&mut self, sink: &dyn PageSink) -> Result<DestLaneSummary, LaneError> {
        RdmaDestLane::run(self, sink)
    }

    fn shutdown_handle(&self) -> std::io::Result<TcpStream> {
        RdmaDestLane::shutdown_handle(self)
    }
}
