//! End-to-end verification that costs almost nothing at the end of a migration.
//!
//! Both ends keep a 64-bit checksum of every page, updated while the page passes through
//! anyway (the source hashes what it is about to send, the destination what just landed, both
//! still in cache). A page that a later round re-sends is simply re-hashed, so nothing is read
//! again after the last round. At the end each side folds its page hashes into one digest per
//! chunk of [`CHUNK_PAGES`] pages and compares them; a mismatch names the chunks that differ.
//! A zero page's hash is a constant and is never computed from memory.
//!
//! The checksum reads a `&[u8]`, which guest memory may never be (see `rmig_transport::mem`):
//! a page is hashed from a private copy made by [`HashScratch::hash_guest`], or, on a TCP
//! destination that verifies, from the staging buffer it was received into.

use std::sync::atomic::{AtomicU64, Ordering};

use crc_fast::{checksum, CrcAlgorithm, Digest};
use rmig_transport::GuestPages;

/// Pages folded into one chunk digest.
pub const CHUNK_PAGES: u64 = 512;

/// Whether every byte of `b` is zero. Exits at the first non-zero word, so random data costs
/// one load.
#[inline]
pub fn is_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(64);
    for c in &mut chunks {
        let mut acc = 0u64;
        for w in c.chunks_exact(8) {
            acc |= u64::from_ne_bytes(w.try_into().expect("8 bytes"));
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&x| x == 0)
}

/// The checksum of one page's bytes: CRC-64/NVME.
///
/// Why a CRC and not a hash such as xxh3: this runs on every byte at both ends while both CPUs
/// are busy with the transfer itself, so its speed sets how much verification costs. `crc-fast`
/// picks carry-less multiply folding at run time (VPCLMULQDQ with AVX-512, else PCLMULQDQ),
/// which on this project's test host does 60 GB/s on a cached 4 KiB page against xxh3's 36
/// (AVX2). A 64-bit CRC catches every burst of up to 64 bits and any other difference but
/// with probability 2^-64, which is what a check of accidental loss or corruption needs.
#[inline]
pub fn hash_page(b: &[u8]) -> u64 {
    checksum(CrcAlgorithm::Crc64Nvme, b)
}

/// Bytes of guest memory copied out at once to be checked and hashed: a 4 KiB page, which
/// stays in L1 between the copy and the hash.
pub const COPY_CHUNK: usize = 4096;

/// A lane's buffer for hashing guest memory from a copy (cache-line aligned).
#[repr(C, align(64))]
pub struct HashScratch([u8; COPY_CHUNK]);

impl HashScratch {
    /// A zeroed buffer.
    pub fn new() -> Self {
        HashScratch([0; COPY_CHUNK])
    }

    /// `None` if guest page `page` is all zero, else its checksum, both computed from a
    /// copy: the page is copied out [`COPY_CHUNK`] bytes at a time into this buffer, which
    /// the zero check and the CRC then read from L1. The copy costs little beside reading the
    /// page from memory at all; a page that the guest changes during it is dirty and is sent
    /// again (the bytes sent may then differ from those hashed, until that later round).
    pub fn hash_guest(&mut self, page: GuestPages<'_>) -> Option<u64> {
        if page.len() <= COPY_CHUNK {
            let buf = &mut self.0[..page.len()];
            page.copy_to(buf);
            return (!is_zero(buf)).then(|| hash_page(buf));
        }
        let mut digest = Digest::new(CrcAlgorithm::Crc64Nvme);
        let mut zero = true;
        let mut off = 0;
        while off < page.len() {
            let n = COPY_CHUNK.min(page.len() - off);
            if off + n < page.len() {
                page.subrange(off + n, page.len() - off - n)
                    .prefetch(COPY_CHUNK);
            }
            let buf = &mut self.0[..n];
            page.subrange(off, n).copy_to(buf);
            zero = zero && is_zero(buf);
            digest.update(buf);
            off += n;
        }
        (!zero).then(|| digest.finalize())
    }
}

impl Default for HashScratch {
    fn default() -> Self {
        Self::new()
    }
}

/// The page hashes of one region.
#[derive(Debug)]
pub struct RegionHashes {
    hashes: Vec<AtomicU64>,
    zero_hash: u64,
}

impl RegionHashes {
    /// Hashes for `pages` pages of `page_size` bytes, all set to the zero page's hash.
    pub fn new(pages: u64, page_size: u64) -> Self {
        let zero_hash = hash_page(&vec![0u8; page_size as usize]);
        RegionHashes {
            hashes: (0..pages).map(|_| AtomicU64::new(zero_hash)).collect(),
            zero_hash,
        }
    }

    /// Records the hash of page `page`.
    #[inline]
    pub fn set(&self, page: u64, h: u64) {
        self.hashes[page as usize].store(h, Ordering::Relaxed);
    }

    /// Records that pages `first..first+n` are zero.
    pub fn set_zero(&self, first: u64, n: u64) {
        for h in &self.hashes[first as usize..(first + n) as usize] {
            h.store(self.zero_hash, Ordering::Relaxed);
        }
    }

    /// One digest per chunk of [`CHUNK_PAGES`] pages.
    pub fn chunk_digests(&self) -> Vec<u64> {
        let mut buf = Vec::with_capacity(CHUNK_PAGES as usize * 8);
        self.hashes
            .chunks(CHUNK_PAGES as usize)
            .map(|c| {
                buf.clear();
                for h in c {
                    buf.extend_from_slice(&h.load(Ordering::Relaxed).to_le_bytes());
                }
                hash_page(&buf)
            })
            .collect()
    }
}

/// Compares per-region chunk digests; returns the (region, chunk) pairs that differ, at most
/// `limit` of them, and whether the shapes agree at all.
pub fn mismatches(ours: &[Vec<u64>], theirs: &[Vec<u64>], limit: usize) -> Vec<(u32, u64)> {
    let mut out = Vec::new();
    if ours.len() != theirs.len() {
        return vec![(u32::MAX, 0)];
    }
    for (r, (a, b)) in ours.iter().zip(theirs).enumerate() {
        if a.len() != b.len() {
            out.push((r as u32, u64::MAX));
            continue;
        }
        for (c, (x, y)) in a.iter().zip(b).enumerate() {
            if x != y && out.len() < limit {
                out.push((r as u32, c as u64));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut p = vec![0u8; 4096];
        assert!(is_zero(&p));
        p[4095] = 1;
        assert!(!is_zero(&p));
        p[4095] = 0;
        p[0] = 1;
        assert!(!is_zero(&p));
        assert!(is_zero(&[0u8; 70]));
        assert!(!is_zero(&[
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 9
        ]));
    }

    #[test]
    fn guest_pages_hash_from_a_copy_as_their_bytes_do() {
        const HUGE: usize = 2 << 20;
        let mut buf: Vec<u8> = (0..HUGE as u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let expect_small = hash_page(&buf[4096..8192]);
        let expect_huge = hash_page(&buf);
        // SAFETY: `buf` outlives the views and is not touched while they are used.
        let g = unsafe { GuestPages::from_raw_parts(buf.as_mut_ptr(), HUGE) };
        let mut s = HashScratch::new();
        assert_eq!(s.hash_guest(g.subrange(4096, 4096)), Some(expect_small));
        assert_eq!(s.hash_guest(g), Some(expect_huge));
        // SAFETY: as above; nothing else uses `buf`.
        unsafe { g.fill_zero() };
        assert_eq!(s.hash_guest(g.subrange(0, 4096)), None);
        assert_eq!(s.hash_guest(g), None);
        // SAFETY: as above.
        unsafe { g.subrange(HUGE - 1, 1).copy_from(&[5]) };
        let mut last = vec![0u8; HUGE];
        last[HUGE - 1] = 5;
        assert_eq!(s.hash_guest(g), Some(hash_page(&last)));
    }

    #[test]
    fn digests_change_with_one_page_and_name_its_chunk() {
        let a = RegionHashes::new(2000, 4096);
        let b = RegionHashes::new(2000, 4096);
        assert_eq!(a.chunk_digests(), b.chunk_digests());
        assert_eq!(a.chunk_digests().len(), 4);
        b.set(1500, hash_page(&[1u8; 4096]));
        let m = mismatches(&[a.chunk_digests()], &[b.chunk_digests()], 10);
        assert_eq!(m, vec![(0, 2)]);
        b.set_zero(1500, 1);
        assert!(mismatches(&[a.chunk_digests()], &[b.chunk_digests()], 10).is_empty());
    }
}
