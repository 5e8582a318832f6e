//! The data plane of rmig: lanes that move runs of guest pages from source memory into
//! destination memory.
//!
//! The engine decides *what* to send and *when* (dirty tracking, rounds, convergence); a
//! transport only knows *how* to move a [`Batch`] of page runs and to say when the other side
//! has it. That split is what lets one round plan feed a TCP `writev`, an RDMA scatter-gather
//! list or a checksum alike.
//!
//! A source lane is driven by exactly one thread (no locks on the hot path): it sends batches
//! and learns, through acknowledgements, which of them have landed in destination memory. A
//! TCP send is not a receipt, so the engine counts pages as delivered only once acknowledged,
//! and marks the pages of unacknowledged batches dirty again when a lane dies.

pub mod batch;
pub mod error;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod mem;
pub mod pace;
pub mod rdma;
mod replies;
pub mod stream_copy;
pub mod tcp;

pub use batch::{Batch, Run, RunKind};
pub use error::LaneError;
#[cfg(feature = "fault-injection")]
pub use fault::{Breakable, FaultPlan, FaultyLane};
pub use mem::{GuestPages, MemRegion, MemoryMap};
pub use pace::Pacer;

use std::time::Duration;

/// The sending end of one data lane.
pub trait SourceLane: Send {
    /// Sends every run of `batch` and returns once the bytes are handed to the transport.
    /// Returns the number of bytes put on the wire (payload and framing).
    fn send(&mut self, batch: &Batch) -> Result<u64, LaneError>;
    /// The highest batch sequence number that the destination has acknowledged.
    fn acked(&self) -> u64;
    /// Blocks until batch `seq` (and every earlier one) is acknowledged or `timeout` passes.
    fn wait_acked(&mut self, seq: u64, timeout: Duration) -> Result<(), LaneError>;
    /// Ends the lane in an orderly way (the destination sees a clean end of stream).
    fn close(&mut self);
}

/// What a destination lane received before it ended.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DestLaneSummary {
    /// Payload bytes written into guest memory.
    pub data_bytes: u64,
    /// Pages received as data.
    pub data_pages: u64,
    /// Pages received as zero markers.
    pub zero_pages: u64,
    /// Batches acknowledged.
    pub batches: u64,
}

/// The receiving end of one data lane, run by one thread until the source closes it.
pub trait DestLane: Send {
    /// Receives until the source closes the lane (`Ok`, with what landed) or the lane fails.
    fn run(&mut self, sink: &dyn PageSink) -> Result<DestLaneSummary, LaneError>;
    /// A handle that can shut the lane's socket down from another thread (which ends `run`).
    fn shutdown_handle(&self) -> std::io::Result<std::net::TcpStream>;
}

/// Receives what a destination lane wrote, so the engine can keep its per-page state
/// (checksums, known-zero pages) current while the data is still in cache.
pub trait PageSink: Sync {
    /// Admits a run about to land: `Err` (why) when no round is open, or when another lane is
    /// writing any of these pages now. A lane calls it before the run's first byte reaches
    /// guest memory (over RDMA, where the NIC writes first, before the run is handed on), and
    /// ends every admitted run with [`release`](Self::release), whether it landed or not.
    fn claim(&self, region: usize, first_page: u64, npages: u64) -> Result<(), String> {
        let _ = (region, first_page, npages);
        Ok(())
    }
    /// Ends a claim made with [`claim`](Self::claim).
    fn release(&self, region: usize, first_page: u64, npages: u64) {
        let _ = (region, first_page, npages);
    }
    /// `npages` pages from `first_page` of region `region` now hold the source's bytes.
    fn data_landed(&self, region: usize, first_page: u64, npages: u64);
    /// As [`data_landed`](Self::data_landed), with `bytes`, equal to what landed, to read
    /// instead of guest memory: a lane that staged the run in a cached buffer passes it.
    fn data_landed_from(&self, region: usize, first_page: u64, npages: u64, bytes: &[u8]) {
        let _ = bytes;
        self.data_landed(region, first_page, npages)
    }
    /// The source says these pages are all zero; the sink makes them so (or knows they are).
    fn zero_pages(&self, region: usize, first_page: u64, npages: u64);
    /// Whether the sink reads the bytes that land (to hash them). A lane that copies the data
    /// itself then stages it in a cached buffer and calls
    /// [`data_landed_from`](Self::data_landed_from), so that the sink reads from cache and
    /// not from guest memory.
    fn reads_landed(&self) -> bool {
        false
    }
    /// Whether the sink puts what lands into guest memory itself (post-copy: the guest
    /// already runs, so each page must appear whole and at once, with `UFFDIO_COPY`). A lane
    /// then stages every run and calls [`place`](Self::place) instead of writing guest
    /// memory, before [`data_landed_from`](Self::data_landed_from).
    fn places(&self) -> bool {
        false
    }
    /// Puts `bytes` (the `npages` pages from `first_page`) into place; `Err` (why) ends the
    /// lane. Only called when [`places`](Self::places) says so.
    fn place(
        &self,
        region: usize,
        first_page: u64,
        npages: u64,
        bytes: &[u8],
    ) -> Result<(), String> {
        let _ = (region, first_page, npages, bytes);
        Err("this sink does not place pages".into())
    }
}
