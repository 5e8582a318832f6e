//! Faults injected on purpose, so that tests can break a lane at a chosen point. Compiled only
//! with the `fault-injection` feature: a normal build has no fault plan and no fault branch.
//!
//! [`FaultyLane`] wraps a lane and decides *when* a fault strikes, by counting the payload
//! sent through it. *How* a lane breaks is the lane's own business ([`Breakable`]): a batch
//! cut short on the wire, or RDMA WRITEs with a wrong remote key, can only be made from inside
//! it.

use std::time::Duration;

use crate::{Batch, LaneError, SourceLane};

/// A fault to inject into a source lane.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultPlan {
    /// Break the lane in the middle of the batch that would take the payload sent on it past
    /// this many bytes (TCP: half of the batch's bytes reach the peer, then the socket is shut
    /// down; RDMA: half of its WRITEs are posted, then the queue pair is forced into the error
    /// state).
    pub fail_after_bytes: Option<u64>,
    /// RDMA: once this many payload bytes were sent, write with a wrong remote key (the
    /// destination answers with a remote access error).
    pub bad_rkey_after_bytes: Option<u64>,
}

/// A source lane that can be broken from inside, for [`FaultyLane`].
pub trait Breakable: SourceLane {
    /// Sends part of `batch`, about half of it, then breaks the lane so that nothing more
    /// passes: the destination sees the batch cut short. Returns the lane's error.
    fn tear(&mut self, batch: &Batch) -> LaneError;
    /// From now on, writes to the destination's memory with a wrong remote key. A lane that
    /// has no remote keys (TCP) ignores this.
    fn corrupt_remote_keys(&mut self) {}
}

/// A lane with a [`FaultPlan`]: it behaves as the lane it wraps until the plan says to break.
pub struct FaultyLane<L> {
    lane: L,
    plan: FaultPlan,
    /// Payload bytes the wrapped lane has sent.
    payload_sent: u64,
}

impl<L: Breakable> FaultyLane<L> {
    /// Wraps `lane`, to break it as `plan` says.
    pub fn new(lane: L, plan: FaultPlan) -> Self {
        FaultyLane {
            lane,
            plan,
            payload_sent: 0,
        }
    }
}

impl<L: Breakable> SourceLane for FaultyLane<L> {
    fn send(&mut self, batch: &Batch) -> Result<u64, LaneError> {
        let sent = self.payload_sent;
        if self.plan.bad_rkey_after_bytes.is_some_and(|l| sent >= l) {
            self.lane.corrupt_remote_keys();
        }
        if self
            .plan
            .fail_after_bytes
            .is_some_and(|l| sent + batch.data_bytes > l)
        {
            return Err(self.lane.tear(batch));
        }
        let wire = self.lane.send(batch)?;
        self.payload_sent += batch.data_bytes;
        Ok(wire)
    }

    fn acked(&self) -> u64 {
        self.lane.acked()
    }

    fn wait_acked(&mut self, seq: u64, timeout: Duration) -> Result<(), LaneError> {
        self.lane.wait_acked(seq, timeout)
    }

    fn close(&mut self) {
        self.lane.close()
    }
}
