//! Faults injected on purpose, so that tests can kill a lane at a chosen point.

/// A fault to inject into a source lane.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultPlan {
    /// Shut the lane's socket down once this many payload bytes have been sent on it.
    /// (On RDMA: post half of the batch, then force the queue pair into the error state.)
    pub fail_after_bytes: Option<u64>,
    /// RDMA: once this many payload bytes were sent, write with a wrong remote key (the
    /// destination answers with a remote access error).
    pub bad_rkey_after_bytes: Option<u64>,
}
