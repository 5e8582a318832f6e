//! The source side of post-copy over RDMA: guest memory the destination reads by itself.
//!
//! Once the guest runs on the destination, every page it still lacks is fetched by the
//! destination with a one-sided RDMA READ (see `reader.rs`). The source's part is set up once
//! and then does nothing: [`ExposedMemory`] registers every region of the guest's memory for
//! remote read, and [`serve_reader`] connects one RC queue pair per reader that allows remote
//! reads and tells the reader where each region is and with which key. From then on the NIC
//! answers READs from registered memory without this host's CPU: no thread of the source polls,
//! posts or wakes for a read, so a source that is busy (or slow) cannot delay a fault.
//!
//! Registration is pin-all: the whole of guest memory is registered (and so pinned) when
//! exposed. Chunked registration cannot work here, because a READ may ask for any page at any
//! time and the source is not on the path to register a chunk on demand. The locked-memory
//! limit must therefore cover guest RAM, as for pin-all lanes ([`RdmaError::LockedMemory`]
//! says so).
//!
//! Lifetime: a [`ReadExposure`] keeps its queue pair and (through an `Arc`) the registration
//! alive until it is dropped; the registration goes when its last holder does. Dropping the
//! queue pair first and then deregistering is what "the source discards its copy" means here:
//! a reader's later READ then fails at the reader with an error completion, and the source's
//! memory is never touched again.

use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::AccessFlags;

use super::memory::register_with;
use super::queue::{Completion, QpEndpoint, Queue};
use super::read_wire::{self, ExposedRegion, ReadSetup, MAX_REGIONS};
use super::{RdmaDevice, RdmaError};
use crate::MemoryMap;

/// Source memory registered for remote read: every region, once (pin-all).
pub struct ExposedMemory {
    dev: Arc<RdmaDevice>,
    /// One registration per non-empty region; dropping them deregisters (and unpins).
    _mrs: Vec<Arc<MemoryRegion>>,
    table: Vec<ExposedRegion>,
    took: Duration,
}

impl std::fmt::Debug for ExposedMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExposedMemory")
            .field("regions", &self.table.len())
            .field("took", &self.took)
            .finish()
    }
}

impl ExposedMemory {
    /// Registers every region of `map` on `dev` for remote read (and nothing else: a peer
    /// can never write the source's memory through these keys). An empty region is listed with
    /// no pages and no key, so that region numbers stay those of the map.
    pub fn register(
        dev: &Arc<RdmaDevice>,
        map: &MemoryMap,
    ) -> Result<Arc<ExposedMemory>, RdmaError> {
        let t0 = Instant::now();
        if map.regions().len() > MAX_REGIONS {
            return Err(RdmaError::Setup(format!(
                "{} regions: at most {MAX_REGIONS} can be exposed",
                map.regions().len()
            )));
        }
        let mut mrs = Vec::new();
        let mut table = Vec::new();
        for r in map.regions() {
            let page_size = u32::try_from(r.page_size())
                .map_err(|_| RdmaError::Setup(format!("page size {} too large", r.page_size())))?;
            let rkey = if r.is_empty() {
                0
            } else {
                let mr = register_with(dev, r.as_ptr(), r.len(), AccessFlags::RemoteRead)?;
                let k = mr.rkey();
                mrs.push(mr);
                k
            };
            table.push(ExposedRegion {
                addr: r.as_ptr() as u64,
                len: r.len() as u64,
                rkey,
                page_size,
            });
        }
        Ok(Arc::new(ExposedMemory {
            dev: dev.clone(),
            _mrs: mrs,
            table,
            took: t0.elapsed(),
        }))
    }

    /// The regions as a reader sees them, in the map's order.
    pub fn regions(&self) -> &[ExposedRegion] {
        &self.table
    }

    /// How long the registration took.
    pub fn took(&self) -> Duration {
        self.took
    }
}

/// One reader's connection to exposed memory: a queue pair that answers its READs. Holding it
/// keeps the queue pair and the registration alive; dropping it destroys the queue pair, and
/// the registration too when no other exposure holds it.
pub struct ReadExposure {
    // Dropped first: the queue pair goes before the registration it reads from.
    queue: Queue,
    mem: Arc<ExposedMemory>,
    peer: QpEndpoint,
    depth: u8,
    /// Completions ever taken from this queue pair's completion queue.
    completions: AtomicU64,
}

impl std::fmt::Debug for ReadExposure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadExposure")
            .field("peer_qpn", &self.peer.qpn)
            .field("depth", &self.depth)
            .finish()
    }
}

/// Answers one reader on `sock` (a lane socket the engine has authenticated; the frames go
/// inside the lane's TLS session `tls` when the session is encrypted, since the answer carries
/// this end's memory keys): reads its CONNECT within `wait`, creates and connects a queue pair
/// that allows remote reads of `mem`, and answers ACCEPT with it and the region table. A
/// failure (a frame that is not a CONNECT, a queue pair that cannot be made) is told to the
/// reader (REFUSE, with the reason) before it is returned. The socket is free for other use
/// afterwards: nothing more is read from or written to it.
pub fn serve_reader(
    sock: &TcpStream,
    tls: Option<&mut rustls::ClientConnection>,
    mem: &Arc<ExposedMemory>,
    wait: Duration,
) -> Result<ReadExposure, RdmaError> {
    super::on_setup_channel(sock, tls, |mut ch| serve_on(sock, &mut ch, mem, wait))
}

/// [`serve_reader`] on `ch`: `sock` itself or its TLS session.
fn serve_on(
    sock: &TcpStream,
    ch: &mut (impl std::io::Read + std::io::Write),
    mem: &Arc<ExposedMemory>,
    wait: Duration,
) -> Result<ReadExposure, RdmaError> {
    let (peer, want) = match read_wire::read_frame(sock, ch, wait) {
        Ok(ReadSetup::Connect(endpoint, depth)) => (endpoint, depth),
        Ok(other) => {
            let e = RdmaError::Setup(format!("expected CONNECT, got {}", other.name()));
            return Err(refuse(ch, e));
        }
        Err(e) => return Err(refuse(ch, e)),
    };
    match expose_to(mem, &peer, want) {
        Ok(exp) => {
            let answer = ReadSetup::Accept(exp.queue.endpoint(), exp.depth, mem.table.clone());
            read_wire::write_frame(ch, &answer)?;
            Ok(exp)
        }
        Err(e) => Err(refuse(ch, e)),
    }
}

/// Tells the reader on `ch` why it is refused; returns the reason.
fn refuse(ch: &mut impl std::io::Write, e: RdmaError) -> RdmaError {
    let _ = read_wire::write_frame(ch, &ReadSetup::Refuse(e.to_string()));
    e
}

/// Creates and connects the queue pair that answers `peer`'s READs, at most `want` at once
/// (and at most what the device allows).
fn expose_to(
    mem: &Arc<ExposedMemory>,
    peer: &QpEndpoint,
    want: u8,
) -> Result<ReadExposure, RdmaError> {
    let dev = mem.dev.clone();
    let depth = want.min(dev.max_rd_atom).max(1);
    // Nothing is ever posted here: one send and one receive entry are the least a queue pair
    // can have. No completion channel: nothing waits on this queue.
    let mut queue = Queue::with_access(dev, 1, 1, false, AccessFlags::RemoteRead)?;
    queue.set_reads(0, depth);
    queue.connect(peer)?;
    Ok(ReadExposure {
        queue,
        mem: mem.clone(),
        peer: *peer,
        depth,
        completions: AtomicU64::new(0),
    })
}

impl ReadExposure {
    /// The exposed memory this queue pair reads from.
    pub fn memory(&self) -> &Arc<ExposedMemory> {
        &self.mem
    }

    /// How many READs the queue pair answers at once (what the reader asked for, at most
    /// what the device allows).
    pub fn depth(&self) -> u8 {
        self.depth
    }

    /// Work the source's side has done for reads since setup: completions of this queue
    /// pair, counted over its life (what is in its completion queue now is taken in first,
    /// without waiting). It is zero, and stays zero however
    /// many READs are answered: a READ is answered by the NIC and completes only at the
    /// reader, and this side posts nothing (no receive, no send) after setup. A non-zero value
    /// means something reached the source's CPU, which post-copy's "the source served no fault"
    /// rules out.
    pub fn source_completions(&self) -> u64 {
        let mut seen: Vec<Completion> = Vec::new();
        self.queue.poll(&mut seen);
        self.completions
            .fetch_add(seen.len() as u64, Ordering::Relaxed)
            + seen.len() as u64
    }
}
