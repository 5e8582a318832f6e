//! What the destination does with each run as it lands: keep page hashes and the set of pages
//! known to be zero current, and zero pages only where needed.

use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use rmig_transport::{MemoryMap, PageSink};

use crate::bitmap::AtomicBitmap;
use crate::region::Region;
use crate::verify::{hash_page, HashScratch, RegionHashes};

pub(crate) struct DestSink {
    map: MemoryMap,
    pub hashes: Option<Vec<RegionHashes>>,
    known_zero: Vec<AtomicBitmap>,
    pub landed: AtomicU64,
    /// Injected crash: once this many bytes landed, every lane socket is shut down.
    die_after: Option<u64>,
    /// Lane sockets to shut down for an injected crash.
    pub crash_handles: Mutex<Vec<TcpStream>>,
    /// Set when the injected crash happened.
    pub crashed: AtomicBool,
}

impl DestSink {
    pub fn new(regions: &[Region], verify: bool, die_after: Option<u64>) -> Self {
        DestSink {
            map: MemoryMap::new(regions.iter().map(|r| r.mem).collect()),
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
            die_after,
            crash_handles: Mutex::new(Vec::new()),
            crashed: AtomicBool::new(false),
        }
    }

    fn maybe_crash(&self, landed: u64) {
        if self.die_after.is_some_and(|n| landed >= n) && !self.crashed.swap(true, Ordering::AcqRel)
        {
            for s in self
                .crash_handles
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
            {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }

    pub fn map(&self) -> &MemoryMap {
        &self.map
    }

    /// Records that pages `first..first+n` of `region` hold new data (their hashes are the
    /// caller's to set).
    fn landed(&self, region: usize, first: u64, n: u64) {
        let r = self.map.get(region).expect("lane checked the region");
        self.known_zero[region].clear_range(first, n);
        let b = n * r.page_size() as u64;
        let landed = self.landed.fetch_add(b, Ordering::Relaxed) + b;
        crate::metrics::received(b);
        self.maybe_crash(landed);
    }
}

impl PageSink for DestSink {
    fn reads_landed(&self) -> bool {
        self.hashes.is_some()
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
        if let Some(h) = &self.hashes {
            // The lane's staging buffer: ordinary memory, hashed as it is.
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
        self.landed(region, first, n);
    }

    fn zero_pages(&self, region: usize, first: u64, n: u64) {
        let r = self.map.get(region).expect("lane checked the region");
        let kz = &self.known_zero[region];
        if !kz.all_set(first, n) {
            for p in first..first + n {
                if !kz.test(p) {
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
