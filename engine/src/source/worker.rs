//! A source lane worker: scans its share of a round's dirty pages, splits them into data and
//! zero runs, hashes them while they are in cache, and sends them on its lane.
//!
//! Work comes as page ranges from a queue shared by all lanes of the round, so a fast lane
//! takes more and a dead lane's share is taken by the others. A page counts as delivered only
//! when the destination acknowledged its batch; when a lane fails, the pages of every batch it
//! could not confirm are marked dirty again, for a later round.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use rmig_transport::{Batch, LaneError, MemoryMap, Run, RunKind, SourceLane};

use crate::bitmap::AtomicBitmap;
use crate::verify::{HashScratch, RegionHashes};

/// Payload bytes gathered into one batch before it is sent (cache-sized, so that the pages
/// hashed for it are still in cache when they are written to the socket).
const BATCH_BYTES: u64 = 1 << 20;
/// Most runs in one batch.
const BATCH_RUNS: usize = 256;
/// Longest data run in bytes.
const MAX_DATA_RUN: u64 = 1 << 20;
/// Pages in one work item (aligned to bitmap words).
pub(crate) const ITEM_PAGES: u64 = 1024;
/// Pages ahead of the scan that are prefetched. Hardware prefetchers stop at 4 KiB page
/// boundaries, so without this every page starts with a cache miss that the zero check and the
/// hash wait for in full.
const PREFETCH_PAGES: u64 = 2;

/// State shared by the session and its lane workers.
pub(crate) struct Shared {
    pub map: MemoryMap,
    /// Pages to send in the current round, per region.
    pub round: Vec<AtomicBitmap>,
    /// Pages dirty and not yet sent (synced, or re-marked after a lane failure).
    pub pending: Vec<AtomicBitmap>,
    /// Page hashes, when verifying.
    pub hashes: Option<Vec<RegionHashes>>,
    /// How long a lane may wait for its last acknowledgement before it is declared dead
    /// (twice the peer timeout: a destination that stops reading is a dead one).
    pub ack_timeout: Duration,
    /// Set to stop every worker at its next batch.
    pub abort: AtomicBool,
    /// Progress counters (bytes acknowledged).
    pub monitor: Arc<crate::Monitor>,
}

/// A range of pages of one region to scan.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Item {
    pub region: u32,
    pub first: u64,
    pub end: u64,
}

/// Orders from the session to a worker.
pub(crate) enum Cmd {
    /// Serve a round from these queues (in the worker's order) until all are empty.
    Round(Arc<Vec<Receiver<Item>>>),
    /// Close the lane and exit.
    Close,
}

/// A worker's account of a round.
#[derive(Debug, Default, Clone)]
pub(crate) struct Report {
    pub lane: usize,
    pub data_pages: u64,
    pub zero_pages: u64,
    /// Bytes of guest memory the pages sent hold (data and zero, at their regions' page size).
    pub memory_bytes: u64,
    pub payload: u64,
    pub wire_bytes: u64,
    /// Set when the lane failed (and its worker exited).
    pub error: Option<String>,
    /// CPUs the worker was seen on during the round.
    pub cpus: Vec<usize>,
}

pub(crate) struct Worker {
    pub lane_idx: usize,
    /// Queue indices in the order this worker takes from them (its own node's first).
    pub order: Vec<usize>,
    pub metrics: crate::metrics::LaneMetrics,
    pub lane: Box<dyn SourceLane>,
    pub shared: Arc<Shared>,
    pub seq: u64,
    pub unacked: VecDeque<(u64, u64, Vec<Run>)>,
    /// Where pages are copied to be zero-checked and hashed, when verifying.
    pub scratch: Box<HashScratch>,
}

impl Worker {
    /// The worker's thread body.
    pub fn main(mut self, cmds: Receiver<Cmd>, reports: Sender<Report>) {
        while let Ok(cmd) = cmds.recv() {
            match cmd {
                Cmd::Round(items) => {
                    let r = self.round(&items);
                    let failed = r.error.is_some();
                    if reports.send(r).is_err() || failed {
                        return;
                    }
                }
                Cmd::Close => {
                    self.lane.close();
                    return;
                }
            }
        }
    }

    /// The next item: from the worker's own queue first, then the others.
    fn next_item(&self, queues: &[Receiver<Item>]) -> Option<Item> {
        self.order
            .iter()
            .find_map(|&q| queues.get(q).and_then(|r| r.try_recv().ok()))
    }

    fn round(&mut self, queues: &[Receiver<Item>]) -> Report {
        let mut rep = Report {
            lane: self.lane_idx,
            ..Default::default()
        };
        let mut batch = Batch::default();
        let mut current: Option<Item> = None;
        let res = (|| -> Result<(), LaneError> {
            while let Some(item) = self.next_item(queues) {
                current = Some(item);
                if self.shared.abort.load(Ordering::Relaxed) {
                    return Err(LaneError::Aborted);
                }
                self.scan(item, &mut batch, &mut rep)?;
                current = None;
            }
            if !batch.is_empty() {
                self.send(&mut batch, &mut rep)?;
            }
            self.wait_all_acked()
        })();
        if let Err(e) = res {
            // Everything this lane could not confirm goes back to the dirty set.
            for (_, _, runs) in self.unacked.drain(..) {
                remark(&self.shared, &runs);
            }
            remark(&self.shared, &batch.runs);
            if let Some(it) = current {
                let round = &self.shared.round[it.region as usize];
                let pend = &self.shared.pending[it.region as usize];
                for p in it.first..it.end {
                    if round.test(p) {
                        pend.set(p);
                    }
                }
            }
            rep.error = Some(e.to_string());
        }
        rep
    }

    fn scan(&mut self, it: Item, batch: &mut Batch, rep: &mut Report) -> Result<(), LaneError> {
        let shared = self.shared.clone();
        let region = *shared.map.get(it.region as usize).expect("item in table");
        let round = &shared.round[it.region as usize];
        let hashes = shared.hashes.as_ref().map(|h| &h[it.region as usize]);
        let psize = region.page_size() as u64;
        let max_data_pages = (MAX_DATA_RUN / psize).max(1);
        let mut run: Option<Run> = None;
        let words = round.words();
        let (w0, w1) = ((it.first / 64) as usize, it.end.div_ceil(64) as usize);
        for (wi, w) in words.iter().enumerate().take(w1).skip(w0) {
            let mut bits = w.load(Ordering::Acquire);
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                let p = wi as u64 * 64 + b;
                if p < it.first || p >= it.end {
                    continue;
                }
                if p + PREFETCH_PAGES < region.pages() {
                    // Hashing reads the whole page; the zero check alone only its start.
                    let ahead = region.guest_pages(p + PREFETCH_PAGES, 1);
                    ahead.prefetch(if hashes.is_some() { ahead.len() } else { 64 });
                }
                let page = region.guest_pages(p, 1);
                // Hashed from a copy (guest memory is never a `&[u8]`); the page itself goes
                // to the lane, which sends it from guest memory.
                let zero = match hashes {
                    Some(h) => match self.scratch.hash_guest(page) {
                        Some(x) => {
                            h.set(p, x);
                            false
                        }
                        None => {
                            h.set_zero(p, 1);
                            true
                        }
                    },
                    None => page.is_zero(),
                };
                let kind = if zero { RunKind::Zero } else { RunKind::Data };
                let extend = match &run {
                    Some(r) => {
                        r.kind == kind
                            && r.first_page + r.npages as u64 == p
                            && (kind == RunKind::Zero || (r.npages as u64) < max_data_pages)
                            && r.npages < u32::MAX
                    }
                    None => false,
                };
                if extend {
                    run.as_mut().expect("run").npages += 1;
                } else {
                    if let Some(r) = run.take() {
                        self.push(batch, r, psize, rep)?;
                    }
                    run = Some(Run {
                        region: it.region,
                        first_page: p,
                        npages: 1,
                        kind,
                    });
                }
            }
        }
        if let Some(r) = run.take() {
            self.push(batch, r, psize, rep)?;
        }
        Ok(())
    }

    fn push(
        &mut self,
        batch: &mut Batch,
        r: Run,
        psize: u64,
        rep: &mut Report,
    ) -> Result<(), LaneError> {
        if r.kind == RunKind::Data {
            batch.data_bytes += r.npages as u64 * psize;
        }
        batch.runs.push(r);
        if batch.data_bytes >= BATCH_BYTES || batch.runs.len() >= BATCH_RUNS {
            self.send(batch, rep)?;
        }
        Ok(())
    }

    fn send(&mut self, batch: &mut Batch, rep: &mut Report) -> Result<(), LaneError> {
        if self.shared.abort.load(Ordering::Relaxed) {
            return Err(LaneError::Aborted);
        }
        self.seq += 1;
        batch.seq = self.seq;
        let wire = self.lane.send(batch)?;
        if let Some(c) = rmig_numa::current_cpu() {
            if !rep.cpus.contains(&c) {
                rep.cpus.push(c);
            }
        }
        rep.wire_bytes += wire;
        rep.payload += batch.data_bytes;
        for r in &batch.runs {
            match r.kind {
                RunKind::Data => rep.data_pages += r.npages as u64,
                RunKind::Zero => rep.zero_pages += r.npages as u64,
            }
            let psize = self
                .shared
                .map
                .get(r.region as usize)
                .map_or(0, |m| m.page_size());
            rep.memory_bytes += r.npages as u64 * psize as u64;
        }
        self.unacked
            .push_back((self.seq, wire, std::mem::take(&mut batch.runs)));
        batch.clear();
        self.collect_acked();
        Ok(())
    }

    fn collect_acked(&mut self) {
        let acked = self.lane.acked();
        while self.unacked.front().is_some_and(|(s, _, _)| *s <= acked) {
            let (_, wire, runs) = self.unacked.pop_front().expect("front");
            self.shared
                .monitor
                .bytes_acked
                .fetch_add(wire, Ordering::Relaxed);
            let m = &self.metrics;
            m.bytes.increment(wire);
            m.batches.increment(1);
            for r in &runs {
                match r.kind {
                    RunKind::Data => m.normal_pages.increment(r.npages as u64),
                    RunKind::Zero => m.zero_pages.increment(r.npages as u64),
                }
            }
        }
    }

    fn wait_all_acked(&mut self) -> Result<(), LaneError> {
        let start = Instant::now();
        while !self.unacked.is_empty() {
            if self.shared.abort.load(Ordering::Relaxed) {
                return Err(LaneError::Aborted);
            }
            match self.lane.wait_acked(self.seq, Duration::from_millis(100)) {
                Ok(()) => {}
                Err(LaneError::AckTimeout(_)) if start.elapsed() < self.shared.ack_timeout => {}
                Err(e) => return Err(e),
            }
            self.collect_acked();
        }
        Ok(())
    }
}

/// Marks the pages of `runs` dirty again.
fn remark(shared: &Shared, runs: &[Run]) {
    for r in runs {
        shared.pending[r.region as usize].set_range(r.first_page, r.npages as u64);
    }
}
