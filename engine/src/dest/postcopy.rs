//! Post-copy's state on the destination, from the page set's arrival to the last page: what
//! the session's phases (`switch.rs`) keep between messages.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rmig_transport::rdma::{RdmaDevice, RdmaPageReader};

use super::faults::FaultThread;
use super::lanes::LaneSocket;
use super::placer::Placer;

/// Post-copy's state on the destination.
pub(crate) struct DestPostcopy {
    /// Over RDMA: the device the missing pages are read with, and how long the source's
    /// answer to the reader's setup may take.
    pub(super) rdma: Option<(Arc<RdmaDevice>, Duration)>,
    /// Over RDMA: the reader, connected as soon as the fetch lane joined (before the pause).
    pub(super) reader: Option<(RdmaPageReader, LaneSocket)>,
    /// The pages the source still holds (region, first, pages), as they arrive.
    pub(super) runs: Vec<(u32, u64, u64)>,
    /// All of `PostcopyPages` arrived: the handover will resume the guest with them missing.
    pub(super) armed: bool,
    /// The fetch lane, once the source joined it.
    pub(super) fetch: Option<LaneSocket>,
    /// Guest memory under userfaultfd, after the switch.
    pub(super) placer: Option<Arc<Placer>>,
    /// The thread that serves the guest's faults.
    pub(super) faults: Option<FaultThread>,
    /// When our guest resumed.
    pub(super) resumed_at: Option<Instant>,
    /// The round the source starts after the handover.
    pub(super) next: u32,
}

impl DestPostcopy {
    /// Post-copy's state before any switch; `rdma`: the device of RDMA lanes.
    pub fn new(rdma: Option<Arc<RdmaDevice>>, setup_wait: Duration) -> Self {
        DestPostcopy {
            rdma: rdma.map(|d| (d, setup_wait)),
            reader: None,
            runs: Vec::new(),
            armed: false,
            fetch: None,
            placer: None,
            faults: None,
            resumed_at: None,
            next: 0,
        }
    }

    /// Whether the source switched to post-copy (the page set arrived).
    pub fn armed(&self) -> bool {
        self.armed
    }

    /// Whether our guest runs with pages still on the source.
    pub fn resumed(&self) -> bool {
        self.resumed_at.is_some()
    }
}
