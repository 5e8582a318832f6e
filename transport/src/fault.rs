//! Faults injected on purpose, so that tests can break a lane at a chosen point. Compiled only
//! with the `fault-injection` feature: a normal build has no fault plan and no fault branch.
//!
//! [`FaultyLane`] wraps a lane and decides *when* a fault strikes, by counting the payload
//! sent through it. *How* a lane breaks is the lane's own business ([`Breakable`]): a batch
//! cut short on the wire, or RDMA WRITEs with a wrong remote key, can only be made from inside
//! it.
//!
//! A lane can also lie instead of breaking ([`FaultPlan::zero_a_page_after_bytes`]): it sends
//! one page of a batch as a zero marker, so that page lands as zeros while the source believes
//! it sent the page's bytes. Only end-to-end verification can notice that, which is what the
//! fault is for.

use std::time::Duration;

use crate::{Batch, LaneError, Run, RunKind, SourceLane};

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
    /// Once, in the first batch that takes the payload sent on the lane past this many bytes,
    /// send the first page of its first data run as a zero marker instead of its bytes (the
    /// lane goes on as if nothing happened). The page size is taken as the batch's payload over
    /// its data pages: use it with regions of one page size. A batch whose payload is not a
    /// whole number of equal pages is left alone, and the fault strikes in the next one.
    pub zero_a_page_after_bytes: Option<u64>,
    /// RDMA with chunked registration: the lane keeps this many more of the destination's
    /// chunks than the destination advertised (`max_chunks`), so once it holds that many it
    /// asks for one more without naming one to drop, which the destination must refuse. An
    /// honest source never does this: it sizes its cache from the advertised limit.
    pub chunks_beyond_limit: Option<u32>,
}

/// A source lane that can be broken from inside, for [`FaultyLane`].
pub trait Breakable: SourceLane {
    /// Sends part of `batch`, about half of it, then breaks the lane so that nothing more
    /// passes: the destination sees the batch cut short. Returns the lane's error.
    fn tear(&mut self, batch: &Batch) -> LaneError;
    /// From now on, writes to the destination's memory with a wrong remote key. A lane that
    /// has no remote keys (TCP) ignores this.
    fn corrupt_remote_keys(&mut self) {}
    /// From now on, keeps `extra` more of the destination's chunks than it advertised (see
    /// [`FaultPlan::chunks_beyond_limit`]). A lane without chunked registration ignores this.
    fn ignore_chunk_limit(&mut self, _extra: u32) {}
}

/// A lane with a [`FaultPlan`]: it behaves as the lane it wraps until the plan says to break.
pub struct FaultyLane<L> {
    lane: L,
    plan: FaultPlan,
    /// Payload bytes the wrapped lane has sent.
    payload_sent: u64,
    /// Whether the page of [`FaultPlan::zero_a_page_after_bytes`] was zeroed already.
    zeroed: bool,
}

impl<L: Breakable> FaultyLane<L> {
    /// Wraps `lane`, to break it as `plan` says.
    pub fn new(mut lane: L, plan: FaultPlan) -> Self {
        if let Some(extra) = plan.chunks_beyond_limit {
            lane.ignore_chunk_limit(extra);
        }
        FaultyLane {
            lane,
            plan,
            payload_sent: 0,
            zeroed: false,
        }
    }

    /// The batch with the first page of its first data run turned into a zero marker, when
    /// the plan says so now.
    fn lie(&mut self, batch: &Batch) -> Option<Batch> {
        let limit = self.plan.zero_a_page_after_bytes?;
        if self.zeroed || self.payload_sent + batch.data_bytes <= limit {
            return None;
        }
        let forged = zero_first_data_page(batch)?;
        self.zeroed = true;
        Some(forged)
    }
}

/// `batch` with the first page of its first data run sent as a zero marker; `None` when the
/// batch has no data run or its payload is not a whole number of equal pages (the page size
/// is then unknown here).
fn zero_first_data_page(batch: &Batch) -> Option<Batch> {
    let data_pages: u64 = batch
        .runs
        .iter()
        .filter(|r| r.kind == RunKind::Data)
        .map(|r| u64::from(r.npages))
        .sum();
    if data_pages == 0 || !batch.data_bytes.is_multiple_of(data_pages) {
        return None;
    }
    let page = batch.data_bytes / data_pages;
    let at = batch.runs.iter().position(|r| r.kind == RunKind::Data)?;
    let run = batch.runs[at];
    let mut runs = batch.runs[..at].to_vec();
    runs.push(Run {
        npages: 1,
        kind: RunKind::Zero,
        ..run
    });
    if run.npages > 1 {
        runs.push(Run {
            first_page: run.first_page + 1,
            npages: run.npages - 1,
            ..run
        });
    }
    runs.extend_from_slice(&batch.runs[at + 1..]);
    Some(Batch {
        seq: batch.seq,
        runs,
        data_bytes: batch.data_bytes - page,
    })
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
        let wire = match self.lie(batch) {
            Some(forged) => self.lane.send(&forged)?,
            None => self.lane.send(batch)?,
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn run(first_page: u64, npages: u32, kind: RunKind) -> Run {
        Run {
            region: 0,
            first_page,
            npages,
            kind,
        }
    }

    #[test]
    fn the_first_data_page_becomes_a_zero_marker() {
        let b = Batch {
            seq: 9,
            runs: vec![run(0, 2, RunKind::Zero), run(5, 3, RunKind::Data)],
            data_bytes: 3 * 4096,
        };
        let f = zero_first_data_page(&b).unwrap();
        assert_eq!(f.seq, 9);
        assert_eq!(
            f.runs,
            vec![
                run(0, 2, RunKind::Zero),
                run(5, 1, RunKind::Zero),
                run(6, 2, RunKind::Data)
            ]
        );
        assert_eq!(f.data_bytes, 2 * 4096);
        let one = Batch {
            seq: 1,
            runs: vec![run(7, 1, RunKind::Data)],
            data_bytes: 4096,
        };
        let f = zero_first_data_page(&one).unwrap();
        assert_eq!((f.runs, f.data_bytes), (vec![run(7, 1, RunKind::Zero)], 0));
    }

    #[test]
    fn batches_without_a_known_page_size_are_left_alone() {
        let zeros = Batch {
            seq: 1,
            runs: vec![run(0, 4, RunKind::Zero)],
            data_bytes: 0,
        };
        assert!(zero_first_data_page(&zeros).is_none());
        let mixed = Batch {
            seq: 1,
            runs: vec![run(0, 1, RunKind::Data), run(0, 1, RunKind::Data)],
            data_bytes: 4096 + (2 << 20) + 1,
        };
        assert!(zero_first_data_page(&mixed).is_none());
    }
}
