//! Post-copy over RDMA: the destination reads every missing page itself, with one-sided RDMA
//! READs of the source's memory, so no source thread ever serves a fault.
//!
//! One thread owns the reader (a queue pair is driven from one place): it takes the guest's
//! fault reports first and reads each faulting page on the reader's own fault slot, then keeps
//! the background slots busy with runs of missing pages, in page order from just after the
//! most recent fault (a guest that touched a page will likely touch its neighbours next), and
//! places whatever lands. When no READ is in flight and no page is missing it only waits for
//! fault reports (which can then only be about pages that are there, or zero).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rmig_transport::rdma::RdmaPageReader;
use rmig_transport::PageSink;

use super::placer::{gather, Arrival, FaultFigures, Placer, Waiting};
use super::sink::DestSink;

/// How long the thread waits for a background READ before it looks at fault reports again.
const WAIT_READS: Duration = Duration::from_micros(200);
/// How long it waits for fault reports when nothing else is to be done (milliseconds).
const IDLE_MS: i32 = 20;

/// The background reads: which pages each slot carries, which pages were asked for, and
/// where the next run starts.
struct Puller {
    /// Per slot: (region, first page, pages) of its READ in flight.
    slots: Vec<Option<(usize, u64, u64)>>,
    /// Pages asked for in the background, per region (bitmap words).
    requested: Vec<Vec<u64>>,
    /// Where the next run is looked for: (region, page).
    cursor: (usize, u64),
    /// Pages in one READ.
    run_pages: u64,
}

impl Puller {
    fn new(placer: &Placer, slots: usize, slot_bytes: usize) -> Self {
        Puller {
            slots: vec![None; slots],
            requested: placer
                .missing
                .iter()
                .map(|b| vec![0u64; b.words().len()])
                .collect(),
            cursor: (0, 0),
            run_pages: (slot_bytes / 4096).max(1) as u64,
        }
    }

    fn in_flight(&self) -> bool {
        self.slots.iter().any(Option::is_some)
    }

    /// The next run of pages missing and not asked for, from the cursor on, once around
    /// (the last step comes back to the cursor's region, for what lies before the cursor).
    fn next_run(&mut self, placer: &Placer) -> Option<(usize, u64, u64)> {
        let regions = placer.missing.len();
        for step in 0..=regions {
            let r = (self.cursor.0 + step) % regions;
            let from = if step == 0 { self.cursor.1 } else { 0 };
            if let Some(run) = self.run_in(placer, r, from) {
                self.cursor = (r, run.1 + run.2);
                return Some(run);
            }
        }
        None
    }

    /// The first run in region `r` at or after page `from`.
    fn run_in(&mut self, placer: &Placer, r: usize, from: u64) -> Option<(usize, u64, u64)> {
        let missing = placer.missing[r].words();
        let asked = &mut self.requested[r];
        let pages = placer.missing[r].len();
        let mut w = (from / 64) as usize;
        while w < missing.len() {
            let mut bits = missing[w].load(Ordering::Acquire) & !asked[w];
            if w == (from / 64) as usize {
                bits &= u64::MAX.checked_shl((from % 64) as u32).unwrap_or(0);
            }
            if bits == 0 {
                w += 1;
                continue;
            }
            let first = w as u64 * 64 + bits.trailing_zeros() as u64;
            let mut n = 0;
            while n < self.run_pages && first + n < pages {
                let p = first + n;
                let (wi, b) = ((p / 64) as usize, 1u64 << (p % 64));
                if missing[wi].load(Ordering::Acquire) & b == 0 || asked[wi] & b != 0 {
                    break;
                }
                asked[wi] |= b;
                n += 1;
            }
            return Some((r, first, n));
        }
        None
    }

    /// Posts a READ on every free slot while runs remain.
    fn fill(&mut self, placer: &Placer, reader: &mut RdmaPageReader) -> Result<(), String> {
        for slot in 0..self.slots.len() {
            if self.slots[slot].is_some() {
                continue;
            }
            let Some((r, first, n)) = self.next_run(placer) else {
                return Ok(());
            };
            reader
                .post(slot, r as u32, first, n as u32)
                .map_err(|e| format!("RDMA READ: {e}"))?;
            self.slots[slot] = Some((r, first, n));
        }
        Ok(())
    }

    /// Places what the finished `slots` carry.
    fn landed(
        &mut self,
        done: &[usize],
        reader: &RdmaPageReader,
        sink: &DestSink,
    ) -> Result<(), String> {
        for &slot in done {
            let Some((r, first, n)) = self.slots.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            let bytes = reader.bytes(slot).ok_or("a finished slot without bytes")?;
            sink.place_as(r, first, n, bytes, Arrival::Background)?;
            sink.data_landed_from(r, first, n, bytes);
        }
        Ok(())
    }
}

/// The RDMA fault thread's loop (see the module documentation).
pub(super) fn serve_faults_rdma(
    placer: &Placer,
    reader: &mut RdmaPageReader,
    sink: &DestSink,
    stop: &AtomicBool,
) -> FaultFigures {
    let mut figures = FaultFigures::default();
    let mut pull = Puller::new(placer, reader.config().slots, reader.config().slot_bytes);
    let mut waiting: Vec<Waiting> = Vec::new();
    while !stop.load(Ordering::Acquire) {
        let busy = pull.in_flight() || placer.left() > 0;
        let r = step(
            placer,
            reader,
            sink,
            &mut pull,
            &mut waiting,
            &mut figures,
            busy,
        );
        if let Err(e) = r {
            figures.error = Some(e);
            break;
        }
    }
    figures
}

/// One turn: fault reports first, then the background reads.
fn step(
    placer: &Placer,
    reader: &mut RdmaPageReader,
    sink: &DestSink,
    pull: &mut Puller,
    waiting: &mut Vec<Waiting>,
    figures: &mut FaultFigures,
    busy: bool,
) -> Result<(), String> {
    if placer.wait_reports(if busy { 0 } else { IDLE_MS }) {
        gather(placer, waiting)?;
    }
    for w in std::mem::take(waiting) {
        if !placer.is_missing(w.region, w.page) {
            placer.wake(w.region, w.page);
            continue;
        }
        let bytes = reader
            .read(w.region as u32, w.page, 1)
            .map_err(|e| format!("RDMA READ of a faulting page: {e}"))?;
        sink.place_as(w.region, w.page, 1, bytes, Arrival::Fetched)?;
        sink.data_landed_from(w.region, w.page, 1, bytes);
        figures
            .latencies_us
            .push(w.since.elapsed().as_secs_f64() * 1e6);
        pull.cursor = (w.region, w.page + 1);
    }
    if !busy {
        return Ok(());
    }
    pull.fill(placer, reader)?;
    let done = if pull.in_flight() {
        reader.wait(WAIT_READS)
    } else {
        reader.poll()
    }
    .map_err(|e| format!("RDMA READ: {e}"))?;
    pull.landed(&done, reader, sink)
}
