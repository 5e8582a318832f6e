//! What the destination does with each run as it lands: keep page hashes and the set of pages
//! known to be zero current, and zero pages only where needed.

use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use rmig_transport::{MemoryMap, PageSink};

use crate::bitmap::AtomicBitmap;
use crate::region::Region;
use crate::verify::{hash_page, is_zero, RegionHashes};

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

    /// Records that pages `first..first+n` of `region` hold new data, hashing each page from
    /// `bytes(page index within the run)` when verifying.
    fn landed<'a>(&self, region: usize, first: u64, n: u64, bytes: impl Fn(u64) -> &'a [u8]) {
        let r = self.map.get(region).expect("lane checked the region");
        if let Some(h) = &self.hashes {
            let h = &h[region];
            for i in 0..n {
                h.set(first + i, hash_page(bytes(i)));
            }
        }
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
        let r = *self.map.get(region).expect("lane checked the region");
        self.landed(region, first, n, |i| r.pages_slice(first + i, 1));
    }

    fn data_landed_from(&self, region: usize, first: u64, n: u64, bytes: &[u8]) {
        let ps = self
            .map
            .get(region)
            .expect("lane checked the region")
            .page_size();
        self.landed(region, first, n, |i| {
            &bytes[i as usize * ps..(i as usize + 1) * ps]
        });
    }

    fn zero_pages(&self, region: usize, first: u64, n: u64) {
        let r = self.map.get(region).expect("lane checked the region");
        let kz = &self.known_zero[region];
        if !kz.all_set(first, n) {
            for p in first..first + n {
                if !kz.test(p) {
                    // Read before writing: a page that is zero already stays untouched (and,
                    // if never faulted in, unallocated).
                    if !is_zero(r.pages_slice(p, 1)) {
                        // SAFETY: the page belongs to this round's run on the calling lane,
                        // which is its only writer while the round runs.
                        unsafe { r.pages_slice_mut(p, 1) }.fill(0);
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
