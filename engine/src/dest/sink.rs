//! What the destination does with each run as it lands: keep page hashes and the set of pages
//! known to be zero current, and zero pages only where needed.

use std::sync::atomic::{AtomicU64, Ordering};

use rmig_transport::{MemoryMap, PageSink};

use crate::bitmap::AtomicBitmap;
use crate::region::Region;
use crate::verify::{hash_page, RegionHashes};

pub(crate) struct DestSink {
    map: MemoryMap,
    pub hashes: Option<Vec<RegionHashes>>,
    known_zero: Vec<AtomicBitmap>,
    pub landed: AtomicU64,
}

impl DestSink {
    pub fn new(regions: &[Region], verify: bool) -> Self {
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
        }
    }

    pub fn map(&self) -> &MemoryMap {
        &self.map
    }
}

impl PageSink for DestSink {
    fn data_landed(&self, region: usize, first: u64, n: u64) {
        let r = self.map.get(region).expect("lane checked the region");
        if let Some(h) = &self.hashes {
            let h = &h[region];
            for p in first..first + n {
                h.set(p, hash_page(r.pages_slice(p, 1)));
            }
        }
        self.known_zero[region].clear_range(first, n);
        self.landed
            .fetch_add(n * r.page_size() as u64, Ordering::Relaxed);
    }

    fn zero_pages(&self, region: usize, first: u64, n: u64) {
        let r = self.map.get(region).expect("lane checked the region");
        let kz = &self.known_zero[region];
        if !kz.all_set(first, n) {
            for p in first..first + n {
                if !kz.test(p) {
                    // SAFETY: the page belongs to this round's run on the calling lane, which
                    // is its only writer while the round runs.
                    unsafe { r.pages_slice_mut(p, 1) }.fill(0);
                    kz.set(p);
                }
            }
        }
        if let Some(h) = &self.hashes {
            h[region].set_zero(first, n);
        }
    }
}
