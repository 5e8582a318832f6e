//! What the destination does with each run as it lands: keep page hashes and the set of pages
//! known to be zero current, and zero pages only where needed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use rmig_transport::{MemoryMap, PageSink};

use super::landing::Landing;
use super::placer::Arrival;
use crate::bitmap::AtomicBitmap;
use crate::region::Region;
use crate::stats::LandingReport;
use crate::verify::{hash_page, HashScratch, RegionHashes};

/// How long a lane waits for its round to open: `RoundStart` travels on the control
/// connection while the round's first data may already be on a lane.
const ROUND_OPENS_WITHIN: Duration = Duration::from_secs(2);

/// Whether a round is open: lanes may land data only while one is.
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    opened: Condvar,
    /// The same, for the lanes' fast path.
    fast: AtomicBool,
}

pub(crate) struct DestSink {
    map: MemoryMap,
    gate: Gate,
    /// Pages a lane is writing right now, per region: one page is never written by two lanes
    /// at once.
    writing: Vec<AtomicBitmap>,
    pub hashes: Option<Vec<RegionHashes>>,
    known_zero: Vec<AtomicBitmap>,
    pub landed: AtomicU64,
    /// An injected crash (tests only).
    pub crash: Crash,
    /// Post-copy, once switched: every page is placed through userfaultfd.
    pub placer: std::sync::OnceLock<std::sync::Arc<super::placer::Placer>>,
    /// Pre-copy landing with `UFFDIO_COPY`, once the session chose it (`Err`: why not).
    landing: std::sync::OnceLock<Result<Landing, String>>,
}

/// An injected crash (tests, the `fault-injection` feature): once this many payload bytes
/// have landed, every lane socket is shut down and the session drops its control connection
/// without a word, as a process that died would.
#[cfg(feature = "fault-injection")]
#[derive(Default)]
pub(crate) struct Crash {
    /// Bytes after which the destination "dies".
    after: Option<u64>,
    /// Lane sockets to shut down.
    handles: Mutex<Vec<std::net::TcpStream>>,
    /// Set when the crash happened.
    happened: AtomicBool,
}

#[cfg(feature = "fault-injection")]
impl Crash {
    /// The crash `cfg` plans, if any.
    pub fn planned(cfg: &crate::DestConfig) -> Crash {
        Crash {
            after: cfg.fault.die_after_bytes,
            ..Default::default()
        }
    }

    /// Shuts `lane` down too when the crash comes.
    pub fn watch(&self, lane: &dyn rmig_transport::DestLane) -> Result<(), crate::EngineError> {
        let h = lane.shutdown_handle()?;
        self.handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(h);
        Ok(())
    }

    /// Crashes once `landed` bytes reach the planned amount.
    fn check(&self, landed: u64) {
        if self.after.is_some_and(|n| landed >= n) && !self.happened.swap(true, Ordering::AcqRel) {
            let handles = self.handles.lock().unwrap_or_else(|e| e.into_inner());
            for s in handles.iter() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    /// Whether the crash happened.
    pub fn happened(&self) -> bool {
        self.happened.load(Ordering::Acquire)
    }
}

/// No crash can be injected in a build without the `fault-injection` feature: every call is
/// empty and compiles away.
#[cfg(not(feature = "fault-injection"))]
#[derive(Default)]
pub(crate) struct Crash;

#[cfg(not(feature = "fault-injection"))]
impl Crash {
    /// No crash.
    pub fn planned(_cfg: &crate::DestConfig) -> Crash {
        Crash
    }

    /// Nothing to watch.
    pub fn watch(&self, _lane: &dyn rmig_transport::DestLane) -> Result<(), crate::EngineError> {
        Ok(())
    }

    #[inline(always)]
    fn check(&self, _landed: u64) {}

    /// Never.
    pub fn happened(&self) -> bool {
        false
    }
}

impl DestSink {
    pub fn new(regions: &[Region], verify: bool, crash: Crash) -> Self {
        DestSink {
            map: MemoryMap::new(regions.iter().map(|r| r.mem).collect()),
            gate: Gate::default(),
            writing: regions
                .iter()
                .map(|r| AtomicBitmap::new(r.pages()))
                .collect(),
            hashes: verify.then(|| {
                regions
                    .iter()
                    .map(|r| RegionHashes::new(r.pages(), r.page_size()))
                    .collect()
            }),
            known_zero: regions
                .iter()
                .map(|r| {
                    if r.known_zero {
                        AtomicBitmap::new_full(r.pages())
                    } else {
                        AtomicBitmap::new(r.pages())
                    }
                })
                .collect(),
            landed: AtomicU64::new(0),
            crash,
            placer: std::sync::OnceLock::new(),
            landing: std::sync::OnceLock::new(),
        }
    }

    /// With `on`, lands pre-copy pages that are not in memory yet with `UFFDIO_COPY` from now
    /// on, where it can (see [`Landing`]); once per session.
    pub fn start_landing(&self, on: bool) {
        let _ = self.landing.get_or_init(|| {
            if on {
                Landing::start(&self.map)
            } else {
                Err("userfaultfd landing turned off".into())
            }
        });
    }

    /// The landing, while it places pages.
    fn landing(&self) -> Option<&Landing> {
        match self.landing.get() {
            Some(Ok(l)) if l.is_on() => Some(l),
            _ => None,
        }
    }

    /// Ends pre-copy landing with `UFFDIO_COPY` (idempotent): from now on pages are written in
    /// place, and those never sent read as zero.
    pub fn end_landing(&self) {
        if let Some(Ok(l)) = self.landing.get() {
            l.end();
        }
    }

    /// How pre-copy pages landed; `None` if the session never chose (RDMA).
    pub fn landing_report(&self) -> Option<LandingReport> {
        match self.landing.get()? {
            Ok(l) => Some(l.report()),
            Err(why) => Some(LandingReport {
                method: "copy".into(),
                why_not: Some(why.clone()),
                ..LandingReport::default()
            }),
        }
    }

    pub fn map(&self) -> &MemoryMap {
        &self.map
    }

    /// Opens (a round started) or closes (it ended, or the session is past its rounds) the
    /// gate for data.
    pub fn set_round_open(&self, open: bool) {
        let mut g = self.gate.open.lock().unwrap_or_else(|e| e.into_inner());
        *g = open;
        self.gate.fast.store(open, Ordering::Release);
        self.gate.opened.notify_all();
    }

    /// Waits (briefly) for a round to be open.
    fn round_open(&self) -> bool {
        if self.gate.fast.load(Ordering::Acquire) {
            return true;
        }
        let g = self.gate.open.lock().unwrap_or_else(|e| e.into_inner());
        let (g, _) = self
            .gate
            .opened
            .wait_timeout_while(g, ROUND_OPENS_WITHIN, |open| !*open)
            .unwrap_or_else(|e| e.into_inner());
        *g
    }

    /// Post-copy: puts `bytes` (pages `first..first+n` of `region`) in place as `how`,
    /// recording their hashes first (when verifying). The order matters: placing the last
    /// missing page is what lets the session's end go on to compare digests
    /// ([`Placer::wait_all_landed`](super::placer::Placer::wait_all_landed)), so a hash
    /// recorded after placing could be compared before it is there (an RDMA post-copy failed
    /// its verification in 2 runs of 13 that way, with both memories equal).
    pub fn place_as(
        &self,
        region: usize,
        first: u64,
        n: u64,
        bytes: &[u8],
        how: Arrival,
    ) -> Result<(), String> {
        let placer = self.placer.get().ok_or("not in post-copy")?;
        self.record_hashes(region, first, n, bytes);
        placer.place(region, first, n, bytes, how)
    }

    /// Sets the hashes of pages `first..first+n` of `region` from `bytes`, their staged copy
    /// (ordinary memory, hashed as it is), when verifying.
    fn record_hashes(&self, region: usize, first: u64, n: u64, bytes: &[u8]) {
        let Some(h) = &self.hashes else { return };
        let ps = self
            .map
            .get(region)
            .expect("lane checked the region")
            .page_size();
        debug_assert_eq!(bytes.len(), n as usize * ps, "the staged bytes of the run");
        for (i, page) in bytes.chunks_exact(ps).take(n as usize).enumerate() {
            h[region].set(first + i as u64, hash_page(page));
        }
    }

    /// Records that pages `first..first+n` of `region` hold new data (their hashes are the
    /// caller's to set).
    fn landed(&self, region: usize, first: u64, n: u64) {
        let r = self.map.get(region).expect("lane checked the region");
        self.known_zero[region].clear_range(first, n);
        let b = n * r.page_size() as u64;
        let landed = self.landed.fetch_add(b, Ordering::Relaxed) + b;
        crate::metrics::received(b);
        self.crash.check(landed);
    }
}

impl PageSink for DestSink {
    fn claim(&self, region: usize, first: u64, n: u64) -> Result<(), String> {
        if !self.round_open() {
            return Err("data outside an open round".into());
        }
        if !self.writing[region].try_claim(first, n) {
            return Err(format!(
                "pages {first}..{} of region {region} sent on two lanes at once",
                first + n
            ));
        }
        Ok(())
    }

    fn release(&self, region: usize, first: u64, n: u64) {
        self.writing[region].clear_range(first, n);
    }

    fn reads_landed(&self) -> bool {
        self.hashes.is_some()
    }

    fn places(&self) -> bool {
        self.placer.get().is_some() || self.landing().is_some()
    }

    fn place(&self, region: usize, first: u64, n: u64, bytes: &[u8]) -> Result<(), String> {
        if self.placer.get().is_some() {
            return self.place_as(region, first, n, bytes, Arrival::Background);
        }
        match self.landing.get() {
            // Also once it ended (the run was handed here before): it then copies.
            Some(Ok(l)) => {
                l.place(region, first, n, bytes);
                Ok(())
            }
            _ => Err("no pages are placed here".into()),
        }
    }

    fn data_landed(&self, region: usize, first: u64, n: u64) {
        if let Some(h) = &self.hashes {
            // Guest memory (written by the lane or its NIC) is hashed from a copy, see
            // `HashScratch`.
            let (h, r) = (
                &h[region],
                self.map.get(region).expect("lane checked the region"),
            );
            let mut scratch = HashScratch::new();
            for p in first..first + n {
                match scratch.hash_guest(r.guest_pages(p, 1)) {
                    Some(x) => h.set(p, x),
                    None => h.set_zero(p, 1),
                }
            }
        }
        self.landed(region, first, n);
    }

    fn data_landed_from(&self, region: usize, first: u64, n: u64, bytes: &[u8]) {
        // In post-copy the hashes were recorded before the pages were placed (`place_as`).
        if self.placer.get().is_none() {
            self.record_hashes(region, first, n, bytes);
        }
        self.landed(region, first, n);
    }

    fn zero_pages(&self, region: usize, first: u64, n: u64) {
        if let Some(placer) = self.placer.get() {
            // Post-copy: the guest runs, so a missing page is never read or written here;
            // a page the zero page cannot be mapped at stays missing, and the phase's end
            // reports it.
            // Hashes first, for the reason `place_as` gives.
            if let Some(h) = &self.hashes {
                h[region].set_zero(first, n);
            }
            let _ = placer.zero(region, first, n, Arrival::Background);
            return;
        }
        let r = self.map.get(region).expect("lane checked the region");
        let kz = &self.known_zero[region];
        if !kz.all_set(first, n) {
            let landing = self.landing();
            for p in first..first + n {
                if landing.is_some_and(|l| l.is_missing(region, p)) {
                    // Never here: it reads as zero, and reading it would only fault.
                    kz.set(p);
                } else if !kz.test(p) {
                    // Read before writing: a page that is zero already stays untouched (and,
                    // if never faulted in, unallocated).
                    let page = r.guest_pages(p, 1);
                    if !page.is_zero() {
                        // SAFETY: destination memory is writable (the region's contract), and
                        // the page belongs to this round's run on the calling lane, which is
                        // its only writer while the round runs.
                        unsafe { page.fill_zero() };
                    }
                    kz.set(p);
                }
            }
        }
        if let Some(h) = &self.hashes {
            h[region].set_zero(first, n);
        }
    }
}
