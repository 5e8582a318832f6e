//! The steps of a pre-copy round ([`SourceSession::run_round`](super::SourceSession)):
//! announce it, fill the work queues, drive the lane workers until each has reported, fence
//! the round with the destination, and account for it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, RecvError};

use super::worker::{Item, Report, ITEM_PAGES};
use super::{SourceSession, MIN_BW_SAMPLE};
use crate::bitmap::AtomicBitmap;
use crate::control::link::ControlLink;
use crate::converge::Converge;
use crate::protocol::Message;
use crate::stats::RoundStats;
use crate::EngineError;

/// The work queues of a round, shared by its workers.
pub(super) type Queues = Arc<Vec<Receiver<Item>>>;

/// A round while its workers run: what they reported so far and what ends it.
pub(super) struct RoundDriver {
    /// Workers yet to report.
    waiting: usize,
    /// The round's figures so far.
    stats: RoundStats,
    /// What ends the round in failure; the first one is kept.
    failure: Option<EngineError>,
}

impl SourceSession {
    /// Publishes that the round starts at `t0` with the pages of the round set, and tells the
    /// destination (`last`: the stop-and-copy round).
    pub(super) fn announce_round(&self, t0: Instant, last: bool) {
        let round_pages: u64 = self.shared.round.iter().map(AtomicBitmap::count).sum();
        let round_bytes = round_pages * self.regions[0].page_size();
        let m = &self.monitor;
        m.round.store(self.round, Ordering::Relaxed);
        m.round_start_bytes
            .store(m.bytes_acked.load(Ordering::Relaxed), Ordering::Relaxed);
        m.round_dirty.store(round_bytes, Ordering::Relaxed);
        *m.round_started.lock().unwrap_or_else(|e| e.into_inner()) = Some(t0);
        crate::metrics::round_started(self.round, round_bytes);
        self.link.send(Message::RoundStart {
            round: self.round,
            last,
        });
    }

    /// Fills the round's work queues: one per node that has lanes, plus a shared one. Each
    /// span of memory goes to the queue of its node, so that lanes serve local memory first.
    pub(super) fn plan_round(&self) -> Queues {
        let placement = self.lanes.placement();
        let nq = placement.queues();
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..nq).map(|_| crossbeam_channel::unbounded()).unzip();
        for (ri, r) in self.regions.iter().enumerate() {
            let region = ri as u32;
            for (start, stop, node) in placement.spans_of(region, r.pages()) {
                let queue = &txs[placement.queue_of(node)];
                for first in (start..stop).step_by(ITEM_PAGES as usize) {
                    let end = (first + ITEM_PAGES).min(stop);
                    let _ = queue.send(Item { region, first, end });
                }
            }
        }
        Arc::new(rxs)
    }

    /// Sets every live worker on `queues` and drives the round until each has reported: the
    /// lanes account for their failures (and, once every RDMA lane failed, TCP lanes replace
    /// them); a control message, a lost link or a cancel stops the lanes and fails the round.
    pub(super) fn drive_round(
        &mut self,
        last: bool,
        queues: &Queues,
    ) -> Result<RoundStats, EngineError> {
        let mut d = RoundDriver {
            waiting: self.lanes.dispatch(queues),
            stats: RoundStats {
                round: self.round,
                last,
                ..Default::default()
            },
            failure: None,
        };
        while d.waiting > 0 {
            select! {
                recv(self.lanes.reports()) -> r => {
                    let Ok(r) = r else { break };
                    self.take_report(&mut d, r, queues);
                }
                recv(self.link.inbox()) -> m => self.stop_on_control_message(&mut d, m),
                default(Duration::from_millis(50)) => self.stop_if_cancelled(&mut d),
            }
        }
        if let Some(e) = d.failure {
            return Err(e);
        }
        self.lanes.ensure_alive()?;
        Ok(d.stats)
    }

    /// Takes in a worker's account of the round; the lanes take in what it says about its
    /// lane (and may set fallback lanes on the rest of `queues`).
    fn take_report(&mut self, d: &mut RoundDriver, r: Report, queues: &Queues) {
        d.waiting -= 1;
        d.stats.pages += r.data_pages + r.zero_pages;
        d.stats.zero_pages += r.zero_pages;
        d.stats.memory_bytes += r.memory_bytes;
        d.stats.bytes += r.wire_bytes;
        self.monitor.update(|s| {
            s.ram.duplicate += r.zero_pages;
            s.ram.normal += r.data_pages;
            s.ram.normal_bytes += r.payload;
            s.ram.transferred += r.wire_bytes;
        });
        match self.lanes.account(&r, queues) {
            Ok(started) => d.waiting += started,
            Err(e) => {
                d.failure.get_or_insert(e);
            }
        }
    }

    /// A control message during a round (the peer's error or cancel, an unexpected message,
    /// a lost link) stops the lanes and fails the round.
    fn stop_on_control_message(
        &mut self,
        d: &mut RoundDriver,
        m: Result<Result<Message, EngineError>, RecvError>,
    ) {
        let r = m
            .map_err(|_| EngineError::PeerClosed)
            .and_then(ControlLink::screen);
        let e = match r {
            Ok(m) => EngineError::Protocol(format!("unexpected {} during a round", m.name())),
            Err(e) => e,
        };
        self.lanes.stop();
        d.failure.get_or_insert(e);
    }

    /// A cancel from another thread stops the lanes and fails the round.
    fn stop_if_cancelled(&mut self, d: &mut RoundDriver) {
        if self.monitor.cancel.is_cancelled() && d.failure.is_none() {
            self.lanes.stop();
            d.failure = Some(EngineError::Cancelled(self.monitor.cancel.reason()));
        }
    }

    /// The round's fence: `RoundEnd`, answered by the destination's `RoundEndAck` within
    /// twice the peer timeout.
    pub(super) fn fence_round(&mut self) -> Result<(), EngineError> {
        self.link.send(Message::RoundEnd { round: self.round });
        let round = self.round;
        self.link.expect(
            self.cfg.liveness.peer_timeout * 2,
            "RoundEndAck",
            |m| match m {
                Message::RoundEndAck { round: r } if r == round => Ok(()),
                m => Err(m),
            },
        )
    }

    /// Completes the figures of a round that took `secs` (bandwidth, dirty rate, what remains
    /// and the downtime it would take) and publishes them.
    pub(super) fn account_round(
        &mut self,
        mut rs: RoundStats,
        secs: f64,
        last: bool,
    ) -> Result<RoundStats, EngineError> {
        let bw = self.update_bandwidth(rs.bytes, secs);
        // Dirty rate: what the log gathered while the round ran.
        let remaining = if last { 0 } else { self.sync_pending()? };
        let dirty_rate = if secs > 0.0 {
            remaining as f64 / secs
        } else {
            0.0
        };
        let expected = Converge::expected_downtime(remaining, bw);
        rs.duration_ms = secs * 1e3;
        rs.dirty_rate = dirty_rate;
        rs.remaining = remaining;
        rs.mbps = bw * 8.0 / 1e6;
        rs.expected_downtime_ms = expected.as_secs_f64() * 1e3;
        rs.lanes = self.lanes.alive();
        *self
            .monitor
            .bandwidth
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = (bw, dirty_rate);
        self.monitor.dirty_bytes.store(remaining, Ordering::Relaxed);
        crate::metrics::round_done(dirty_rate, bw, expected.as_secs_f64(), remaining, secs);
        let rsc = rs.clone();
        let syncs = self.sync_count;
        let numa = self.lanes.numa_report();
        let psize = self.regions[0].page_size();
        self.monitor.update(|s| {
            s.numa = Some(numa);
            s.rounds.push(rsc);
            s.ram.remaining = remaining;
            s.ram.dirty_sync_count = syncs;
            if !last {
                s.ram.dirty_pages_rate = dirty_rate / psize as f64;
                s.expected_downtime_ms = rs.expected_downtime_ms;
            }
        });
        Ok(rs)
    }

    /// Takes `bytes` sent in `secs` as the session's bandwidth estimate: a round too small
    /// to measure keeps the previous figure, and the result never exceeds the pacer's ceiling.
    fn update_bandwidth(&mut self, bytes: u64, secs: f64) -> f64 {
        let mut bw = if secs > 0.0 { bytes as f64 / secs } else { 0.0 };
        if bytes < MIN_BW_SAMPLE && self.bandwidth > 0.0 {
            bw = self.bandwidth;
        }
        let cap = self.monitor.pacer.rate();
        if cap > 0 {
            bw = bw.min(cap as f64);
        }
        self.bandwidth = bw;
        bw
    }
}
