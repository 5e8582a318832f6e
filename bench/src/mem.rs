//! Guest memory for the bench: anonymous mappings, filled the way the workload asks.

use std::thread;

use anyhow::{bail, Result};

/// `madvise` advice that faults a range in for writing (Linux 5.14).
const MADV_POPULATE_WRITE: libc::c_int = 23;

/// An anonymous private mapping, unmapped on drop.
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; threads that share it coordinate
// through the engine's and the workload's own rules.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes; with `populate`, every page is faulted in now (like QEMU's
    /// `-mem-prealloc`), otherwise on first touch. With `huge`, the mapping asks for
    /// transparent huge pages (`MADV_HUGEPAGE`), as QEMU does for guest RAM.
    pub fn new(len: usize, populate: bool, huge: bool) -> Result<Mapping> {
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        // SAFETY: a fresh anonymous mapping; no existing memory is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            bail!(
                "mmap of {len} bytes failed: {}",
                std::io::Error::last_os_error()
            );
        }
        let m = Mapping { ptr: p.cast(), len };
        if huge {
            // SAFETY: advice on our own fresh mapping; it changes no contents. A kernel
            // without THP refuses it, and the mapping keeps small pages.
            unsafe { libc::madvise(p, len, libc::MADV_HUGEPAGE) };
        }
        if populate {
            // SAFETY: populating our own mapping; contents stay zero.
            let r = unsafe { libc::madvise(p, len, MADV_POPULATE_WRITE) };
            if r != 0 {
                bail!(
                    "populating {len} bytes failed: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
        Ok(m)
    }

    /// Bytes of the mapping backed by transparent huge pages now (from `/proc/self/smaps`).
    pub fn huge_bytes(&self) -> u64 {
        let start = format!("{:x}-", self.ptr as usize);
        let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
            return 0;
        };
        // The first AnonHugePages line after the mapping's header is the mapping's own.
        smaps
            .lines()
            .skip_while(|l| !l.starts_with(&start))
            .find_map(|l| l.strip_prefix("AnonHugePages:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// Start address.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The bytes, for reading when nothing writes them (comparison after a migration).
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is valid for `len` bytes for the life of `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The bytes, for filling before a migration starts.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: valid for `len` bytes, and `&mut self` makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped; no reference outlives `self`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// How source memory is filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Fill {
    /// Random bytes in every page.
    Random,
    /// All zero.
    Zero,
    /// A fraction of pages zero, the rest random.
    Mixed,
}

/// A small, fast generator (wyrand); statistical quality is plenty for test data.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    /// Next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = (self.0 as u128).wrapping_mul((self.0 ^ 0xe703_7ed1_a0b4_28db) as u128);
        ((t >> 64) ^ t) as u64
    }

    /// Uniform in `0..n` (n > 0).
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// A float in `0..1`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Fills `mem` page by page on all CPUs.
pub fn fill(mem: &mut [u8], page: usize, fill: Fill, zero_fraction: f64, seed: u64) {
    if fill == Fill::Zero {
        return; // fresh anonymous memory is zero already
    }
    let threads = thread::available_parallelism().map_or(1, |n| n.get());
    let per = mem.len().div_ceil(threads).div_ceil(page) * page;
    thread::scope(|s| {
        for (i, part) in mem.chunks_mut(per.max(page)).enumerate() {
            s.spawn(move || {
                let mut rng = Rng::new(seed.wrapping_add(i as u64 * 0x1234_5678_9abc));
                for pg in part.chunks_mut(page) {
                    if fill == Fill::Mixed && rng.unit() < zero_fraction {
                        pg.fill(0);
                        continue;
                    }
                    for w in pg.chunks_exact_mut(8) {
                        w.copy_from_slice(&rng.next_u64().to_ne_bytes());
                    }
                }
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixed_fill_has_zero_and_random_pages() {
        let mut v = vec![0u8; 4096 * 1000];
        fill(&mut v, 4096, Fill::Mixed, 0.5, 1);
        let zeros = v.chunks(4096).filter(|p| p.iter().all(|&b| b == 0)).count();
        assert!((350..650).contains(&zeros), "{zeros}");
    }
}
