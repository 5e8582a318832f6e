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
//!
//! What that proves is that the bytes *received* equal the bytes *sent* ([`VerifyMode::Received`]).
//! It says nothing about a write into destination memory after a page landed: a bug in the
//! copy out of the staging buffer, an RDMA WRITE with no descriptor, a device model writing
//! early. [`VerifyMode::Memory`] closes that gap: in the pause, after the last round, the
//! destination hashes its memory again ([`rehash_memory`]) and compares every page with the
//! hash of what it received. Why in the pause and not in the background during pre-copy: a
//! page re-hashed early proves nothing about a write that comes after the re-hash, which is
//! exactly what the mode is for; re-hashing in the pause is what makes the promise hold at
//! handover, and it costs downtime (one read of destination memory, spread over the CPUs).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::bitmap::AtomicBitmap;

use crc_fast::{checksum, CrcAlgorithm, Digest};
use rmig_transport::{GuestPages, MemoryMap};

/// What end-to-end verification proves at the handover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VerifyMode {
    /// No checksums: the destination's memory is trusted to hold what the lanes carried.
    Off,
    /// Every page the destination received equals the page the source sent last (checksums
    /// of both ends, compared before and in the pause). Cheap: each page is hashed while it
    /// passes through anyway. Blind to writes into destination memory after a page landed.
    #[default]
    Received,
    /// [`Received`](Self::Received), and in the pause the destination re-reads all of its
    /// memory and checks that every page still holds what it received, so that destination
    /// memory equals the source's at handover. Costs downtime: one pass over destination
    /// memory.
    Memory,
}

impl VerifyMode {
    /// Whether checksums are kept at all.
    pub fn is_on(self) -> bool {
        self != VerifyMode::Off
    }

    /// Its one-byte wire value (0, 1, 2; 0 and 1 are the `false`/`true` of protocol 2's
    /// boolean, so peers that only know those agree on them).
    pub fn wire(self) -> u8 {
        match self {
            VerifyMode::Off => 0,
            VerifyMode::Received => 1,
            VerifyMode::Memory => 2,
        }
    }

    /// The mode with wire value `b`, if any.
    pub fn from_wire(b: u8) -> Option<VerifyMode> {
        match b {
            0 => Some(VerifyMode::Off),
            1 => Some(VerifyMode::Received),
            2 => Some(VerifyMode::Memory),
            _ => None,
        }
    }
}

/// Pages folded into one chunk digest.
pub const CHUNK_PAGES: u64 = 512;

/// In the comparison made before the pause, the digest of a chunk that is not compared yet
/// (it holds pages the final round will send again); it is compared at the end instead.
pub const SKIP: u64 = u64::MAX;

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
        for off in (0..page.len()).step_by(COPY_CHUNK) {
            let n = COPY_CHUNK.min(page.len() - off);
            let buf = &mut self.0[..n];
            page.subrange(off, n).copy_to(buf);
            zero = zero && is_zero(buf);
            digest.update(buf);
        }
        (!zero).then(|| digest.finalize())
    }
}

impl Default for HashScratch {
    fn default() -> Self {
        Self::new()
    }
}

/// The page hashes of one region, and which chunks changed since they were last compared.
///
/// Why the chunks are tracked: the chunks are compared once before the pause, while the
/// guest still runs, and inside the pause only those that changed since, so the downtime
/// does not grow with the size of the guest.
#[derive(Debug)]
pub struct RegionHashes {
    hashes: Vec<AtomicU64>,
    zero_hash: u64,
    /// Chunks with a page hash set since the last [`RegionHashes::take_touched`].
    touched: AtomicBitmap,
}

impl RegionHashes {
    /// Hashes for `pages` pages of `page_size` bytes, all set to the zero page's hash.
    pub fn new(pages: u64, page_size: u64) -> Self {
        let zero_hash = hash_page(&vec![0u8; page_size as usize]);
        RegionHashes {
            hashes: (0..pages).map(|_| AtomicU64::new(zero_hash)).collect(),
            zero_hash,
            touched: AtomicBitmap::new(pages.div_ceil(CHUNK_PAGES)),
        }
    }

    /// Number of chunks.
    pub fn chunks(&self) -> u64 {
        self.touched.len()
    }

    /// Marks the chunk of `page` touched; a load first, so that the lanes writing one chunk
    /// do not fight over its cache line once the bit is set.
    #[inline]
    fn touch(&self, page: u64) {
        let c = page / CHUNK_PAGES;
        if !self.touched.test(c) {
            self.touched.set(c);
        }
    }

    /// Records the hash of page `page`.
    #[inline]
    pub fn set(&self, page: u64, h: u64) {
        self.hashes[page as usize].store(h, Ordering::Relaxed);
        self.touch(page);
    }

    /// Records that pages `first..first+n` are zero.
    pub fn set_zero(&self, first: u64, n: u64) {
        for h in &self.hashes[first as usize..(first + n) as usize] {
            h.store(self.zero_hash, Ordering::Relaxed);
        }
        let chunks = first / CHUNK_PAGES..(first + n).div_ceil(CHUNK_PAGES);
        self.touched
            .set_range(chunks.start, chunks.end - chunks.start);
    }

    /// Marks chunk `c` for the comparison at the end.
    pub fn mark_touched(&self, c: u64) {
        self.touched.set(c);
    }

    /// The chunks touched since the last call, in order; their marks are cleared.
    pub fn take_touched(&self) -> Vec<u64> {
        self.touched.take_set()
    }

    /// The digest of chunk `c`: the checksum of its pages' hashes.
    pub fn chunk_digest(&self, c: u64) -> u64 {
        let first = (c * CHUNK_PAGES) as usize;
        let end = (first + CHUNK_PAGES as usize).min(self.hashes.len());
        let mut buf = [0u8; CHUNK_PAGES as usize * 8];
        for (i, h) in self.hashes[first..end].iter().enumerate() {
            buf[i * 8..i * 8 + 8].copy_from_slice(&h.load(Ordering::Relaxed).to_le_bytes());
        }
        hash_page(&buf[..(end - first) * 8])
    }

    /// One digest per chunk of [`CHUNK_PAGES`] pages.
    pub fn chunk_digests(&self) -> Vec<u64> {
        (0..self.chunks()).map(|c| self.chunk_digest(c)).collect()
    }
}

/// Source, before the pause (every batch acknowledged, so both ends' page hashes describe
/// the same bytes, except for pages written while they were being sent, which are in
/// `pending` after a sync): every chunk's digest, [`SKIP`] for chunks with a pending page.
/// Touched marks are cleared first; a clean chunk whose digest happens to equal `SKIP` is
/// marked for the comparison at the end.
pub fn baseline_digests(hashes: &[RegionHashes], pending: &[AtomicBitmap]) -> Vec<Vec<u64>> {
    hashes
        .iter()
        .zip(pending)
        .map(|(h, p)| {
            h.take_touched();
            (0..h.chunks())
                .map(|c| {
                    let d = h.chunk_digest(c);
                    // The last chunk may be partial: `any_set` stops at the bitmap's end.
                    if p.any_set(c * CHUNK_PAGES, CHUNK_PAGES) {
                        SKIP
                    } else {
                        if d == SKIP {
                            h.mark_touched(c);
                        }
                        d
                    }
                })
                .collect()
        })
        .collect()
}

/// Destination, before the pause: compares the source's [`baseline_digests`] with ours.
/// Clears our touched marks, then marks the chunks the source skipped, so they are compared
/// at the end. Returns the chunks that differ (at most `limit`); `Err` if the shapes differ.
pub fn check_baseline(
    ours: &[RegionHashes],
    theirs: &[Vec<u64>],
    limit: usize,
) -> Result<Vec<(u32, u64)>, String> {
    let shape_ok = ours.len() == theirs.len()
        && ours
            .iter()
            .zip(theirs)
            .all(|(a, b)| a.chunks() == b.len() as u64);
    if !shape_ok {
        return Err("checksums do not match the region table".into());
    }
    let mut out = Vec::new();
    for (r, (h, t)) in ours.iter().zip(theirs).enumerate() {
        h.take_touched();
        for (c, &d) in t.iter().enumerate() {
            if d == SKIP {
                h.mark_touched(c as u64);
            } else if d != h.chunk_digest(c as u64) && out.len() < limit {
                out.push((r as u32, c as u64));
            }
        }
    }
    Ok(out)
}

/// Source, in the pause: (region, chunk, digest) of every chunk touched since the baseline.
pub fn touched_digests(hashes: &[RegionHashes]) -> Vec<(u32, u64, u64)> {
    let mut out = Vec::new();
    for (r, h) in hashes.iter().enumerate() {
        for c in h.take_touched() {
            out.push((r as u32, c, h.chunk_digest(c)));
        }
    }
    out
}

/// Destination, in the pause: compares the source's [`touched_digests`] with ours. A chunk
/// that only one end touched differs too (one end missed a change). Returns the chunks that
/// differ, at most `limit`.
pub fn check_touched(
    ours: &[RegionHashes],
    theirs: &[(u32, u64, u64)],
    limit: usize,
) -> Vec<(u32, u64)> {
    let mine = touched_digests(ours);
    let mut out = Vec::new();
    let (mut a, mut b) = (mine.iter().peekable(), theirs.iter().peekable());
    loop {
        // Which side holds the next chunk in (region, chunk) order; a chunk only one side
        // touched differs.
        let order = match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some(x), Some(y)) => (x.0, x.1).cmp(&(y.0, y.1)),
        };
        let next = match order {
            std::cmp::Ordering::Less => a.next().map(|x| (x.0, x.1)),
            std::cmp::Ordering::Greater => b.next().map(|y| (y.0, y.1)),
            std::cmp::Ordering::Equal => match (a.next(), b.next()) {
                (Some(x), Some(y)) => (x.2 != y.2).then_some((x.0, x.1)),
                _ => unreachable!("both sides peeked a chunk"),
            },
        };
        if let Some(at) = next {
            if out.len() < limit {
                out.push(at);
            }
        }
    }
    out
}

/// Destination, in the pause ([`VerifyMode::Memory`]): hashes every page of destination
/// memory again and compares it with the hash of what was received for it. Returns the
/// chunks holding a page that changed since it landed, at most `limit`, in order. The pages
/// are split among `threads` threads (at least one), each reading a contiguous share.
pub fn rehash_memory(
    ours: &[RegionHashes],
    map: &MemoryMap,
    threads: usize,
    limit: usize,
) -> Vec<(u32, u64)> {
    let total: u64 = ours.iter().map(|h| h.hashes.len() as u64).sum();
    let mut found: Vec<(u32, u64)> = std::thread::scope(|s| {
        let workers: Vec<_> = shares(total, threads)
            .map(|span| s.spawn(move || rehash_share(ours, map, span)))
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("a re-hash thread panicked"))
            .collect()
    });
    found.dedup();
    found.truncate(limit);
    found
}

/// Pages `0..total` cut into at most `threads` (at least one) contiguous shares of nearly
/// equal size, in order: the re-hash is in the pause, so every thread must get its part.
fn shares(total: u64, threads: usize) -> impl Iterator<Item = std::ops::Range<u64>> {
    let share = total.div_ceil(threads.max(1) as u64).max(1);
    (0..total)
        .step_by(share as usize)
        .map(move |first| first..total.min(first + share))
}

/// [`rehash_memory`]'s work on pages `span` of the concatenation of all regions: the chunks
/// whose pages differ from their hashes, in order.
fn rehash_share(
    ours: &[RegionHashes],
    map: &MemoryMap,
    span: std::ops::Range<u64>,
) -> Vec<(u32, u64)> {
    let mut scratch = HashScratch::new();
    let mut out: Vec<(u32, u64)> = Vec::new();
    let mut base = 0;
    for (r, h) in ours.iter().enumerate() {
        let pages = h.hashes.len() as u64;
        let (first, end) = (span.start.max(base), span.end.min(base + pages));
        let region = map.get(r).expect("one memory region per hash table");
        for p in first.saturating_sub(base)..end.saturating_sub(base) {
            let now = scratch
                .hash_guest(region.guest_pages(p, 1))
                .unwrap_or(h.zero_hash);
            let at = (r as u32, p / CHUNK_PAGES);
            if now != h.hashes[p as usize].load(Ordering::Relaxed) && out.last() != Some(&at) {
                out.push(at);
            }
        }
        base += pages;
    }
    out
}

/// The chunks of a verdict, for an error message: "region 0 chunk 3, region 1 chunk 0".
pub fn describe(mismatches: &[(u32, u64)]) -> String {
    let list: Vec<String> = mismatches
        .iter()
        .map(|(r, c)| format!("region {r} chunk {c}"))
        .collect();
    list.join(", ")
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
        // A view that ends inside a copy chunk: the last piece is short.
        assert_eq!(
            s.hash_guest(g.subrange(HUGE - 5000, 5000)),
            Some(hash_page(&last[HUGE - 5000..]))
        );
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

#[cfg(test)]
mod chunk_tests {
    use super::*;

    fn hashes(pages: u64) -> Vec<RegionHashes> {
        vec![RegionHashes::new(pages, 4096)]
    }

    #[test]
    fn baseline_skips_pending_chunks_and_the_end_compares_only_what_changed() {
        let (src, dst) = (hashes(4 * CHUNK_PAGES), hashes(4 * CHUNK_PAGES));
        for p in 0..4 * CHUNK_PAGES {
            src[0].set(p, p * 7);
            dst[0].set(p, p * 7);
        }
        // A page of chunk 2 was written while it was sent: pending at the source, and the
        // destination holds other bytes for it until the final round.
        dst[0].set(2 * CHUNK_PAGES + 5, 1);
        let pending = vec![AtomicBitmap::new(4 * CHUNK_PAGES)];
        pending[0].set(2 * CHUNK_PAGES + 5);
        let base = baseline_digests(&src, &pending);
        assert_eq!(base[0][2], SKIP);
        assert_eq!(check_baseline(&dst, &base, 16).unwrap(), vec![]);
        // The final round re-sends that page and one in chunk 3.
        for h in [&src, &dst] {
            h[0].set(2 * CHUNK_PAGES + 5, 99);
            h[0].set(3 * CHUNK_PAGES, 98);
        }
        let fin = touched_digests(&src);
        assert_eq!(fin.iter().map(|e| e.1).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(check_touched(&dst, &fin, 16), vec![]);
    }

    #[test]
    fn differences_are_found_before_and_after_the_pause() {
        let (src, dst) = (hashes(2 * CHUNK_PAGES), hashes(2 * CHUNK_PAGES));
        dst[0].set(3, 5); // a page only the destination has
        let pending = vec![AtomicBitmap::new(2 * CHUNK_PAGES)];
        let base = baseline_digests(&src, &pending);
        assert_eq!(check_baseline(&dst, &base, 16).unwrap(), vec![(0, 0)]);
        // After the baseline: a chunk only one end touched differs, and so does a digest.
        let (src, dst) = (hashes(2 * CHUNK_PAGES), hashes(2 * CHUNK_PAGES));
        src[0].set(CHUNK_PAGES, 1);
        assert_eq!(
            check_touched(&dst, &touched_digests(&src), 16),
            vec![(0, 1)]
        );
        src[0].set(0, 1);
        dst[0].set(0, 2);
        assert_eq!(
            check_touched(&dst, &touched_digests(&src), 16),
            vec![(0, 0)]
        );
        assert!(check_baseline(&dst, &[vec![0; 3]], 16).is_err());
    }

    #[test]
    fn zeroing_pages_touches_exactly_the_chunks_they_span() {
        let h = RegionHashes::new(8 * CHUNK_PAGES, 4096);
        h.take_touched();
        // Pages 517..1029: the end of chunk 1 and the start of chunk 2.
        h.set_zero(CHUNK_PAGES + 5, CHUNK_PAGES);
        assert_eq!(h.take_touched(), vec![1, 2]);
        h.set_zero(3 * CHUNK_PAGES, 1);
        assert_eq!(h.take_touched(), vec![3]);
    }

    #[test]
    fn a_chunk_skipped_at_the_baseline_is_compared_at_the_end_even_if_untouched() {
        let (src, dst) = (hashes(3 * CHUNK_PAGES), hashes(3 * CHUNK_PAGES));
        let pending = vec![AtomicBitmap::new(3 * CHUNK_PAGES)];
        pending[0].set(CHUNK_PAGES + 1);
        let base = baseline_digests(&src, &pending);
        assert_eq!(base[0][1], SKIP);
        assert_eq!(check_baseline(&dst, &base, 16).unwrap(), vec![]);
        // The final round never touched chunk 1 at the source (a source that forgot the
        // pending page): the destination still holds it open, so it is not silently trusted.
        assert_eq!(
            check_touched(&dst, &touched_digests(&src), 16),
            vec![(0, 1)]
        );
    }

    #[test]
    fn the_end_compares_the_touched_chunks_of_both_ends_in_order() {
        let ours = hashes(5 * CHUNK_PAGES);
        for c in [0, 2, 3] {
            ours[0].set(c * CHUNK_PAGES + 7, 0xabc + c);
        }
        // Chunk 2 agrees; 0 and 3 only we touched, 1 and 4 only the source.
        let same = ours[0].chunk_digest(2);
        let theirs = [(0, 1, 11), (0, 2, same), (0, 4, ours[0].chunk_digest(0))];
        assert_eq!(
            check_touched(&ours, &theirs, 16),
            vec![(0, 0), (0, 1), (0, 3), (0, 4)]
        );
    }

    #[test]
    fn every_comparison_names_at_most_its_limit() {
        let (src, dst) = (hashes(3 * CHUNK_PAGES), hashes(3 * CHUNK_PAGES));
        for c in 0..3 {
            dst[0].set(c * CHUNK_PAGES, 1);
        }
        let pending = vec![AtomicBitmap::new(3 * CHUNK_PAGES)];
        let base = baseline_digests(&src, &pending);
        assert_eq!(
            check_baseline(&dst, &base, 2).unwrap(),
            vec![(0, 0), (0, 1)]
        );
        for c in 0..3 {
            src[0].set(c * CHUNK_PAGES, 2);
            dst[0].set(c * CHUNK_PAGES, 3);
        }
        assert_eq!(
            check_touched(&dst, &touched_digests(&src), 2),
            vec![(0, 0), (0, 1)]
        );
        let (a, b) = (vec![vec![1, 2, 3]], vec![vec![4, 5, 6]]);
        assert_eq!(mismatches(&a, &b, 2), vec![(0, 0), (0, 1)]);
    }

    #[test]
    fn a_region_smaller_than_a_chunk_has_one_partial_chunk() {
        let h = hashes(100);
        let pending = vec![AtomicBitmap::new(100)];
        let clean = baseline_digests(&h, &pending);
        assert_eq!(clean, vec![vec![h[0].chunk_digest(0)]]);
        pending[0].set(99);
        assert_eq!(baseline_digests(&h, &pending), vec![vec![SKIP]]);
    }

    /// Two regions of guest memory (random, with some zero pages), their page hashes as a
    /// destination records them on landing, and the map over them.
    fn landed(pages: [usize; 2]) -> (Vec<Vec<u8>>, Vec<RegionHashes>, MemoryMap) {
        let mut mem: Vec<Vec<u8>> = pages
            .iter()
            .enumerate()
            .map(|(r, &n)| {
                (0..n * 4096)
                    .map(|i| ((i as u32 ^ r as u32).wrapping_mul(2654435761) >> 11) as u8)
                    .collect()
            })
            .collect();
        mem[0][4096..8192].fill(0);
        let hashes: Vec<RegionHashes> = mem
            .iter()
            .map(|m| {
                let h = RegionHashes::new((m.len() / 4096) as u64, 4096);
                for (p, page) in m.chunks(4096).enumerate() {
                    if !is_zero(page) {
                        h.set(p as u64, hash_page(page));
                    }
                }
                h
            })
            .collect();
        let map = MemoryMap::new(
            mem.iter_mut()
                // SAFETY: each buffer outlives the map (the tests keep `mem` alive) and is
                // only read through it.
                .map(|m| unsafe { rmig_transport::MemRegion::new(m.as_mut_ptr(), m.len(), 4096) })
                .collect(),
        );
        (mem, hashes, map)
    }

    #[test]
    fn the_rehash_gives_every_thread_a_contiguous_share() {
        let cut = |total, threads| shares(total, threads).collect::<Vec<_>>();
        assert_eq!(cut(10, 2), vec![0..5, 5..10]);
        assert_eq!(cut(7, 3), vec![0..3, 3..6, 6..7]);
        // Fewer pages than threads: one page each; no threads asked: one thread.
        assert_eq!(cut(2, 4), vec![0..1, 1..2]);
        assert_eq!(cut(5, 0), vec![0..5]);
        assert!(cut(0, 2).is_empty());
    }

    #[test]
    fn rehashing_memory_finds_every_page_changed_after_it_landed() {
        let (mut mem, hashes, map) = landed([3 * CHUNK_PAGES as usize + 10, 700]);
        for threads in [1, 2, 3, 8] {
            assert_eq!(
                rehash_memory(&hashes, &map, threads, 16),
                vec![],
                "{threads}"
            );
        }
        // One byte in the last page of region 0, in a zero page, two in one chunk of
        // region 1 (named once), and one in its partial last chunk.
        let last0 = mem[0].len() - 1;
        mem[0][last0] ^= 1;
        mem[0][4096 + 9] = 3;
        mem[1][5] ^= 0x80;
        mem[1][100 * 4096] ^= 1;
        mem[1][699 * 4096 + 4095] ^= 1;
        let want = vec![(0, 0), (0, 3), (1, 0), (1, 1)];
        for threads in [1, 2, 3, 5, 8, 64] {
            assert_eq!(rehash_memory(&hashes, &map, threads, 16), want, "{threads}");
        }
        assert_eq!(rehash_memory(&hashes, &map, 0, 16), want);
        assert_eq!(rehash_memory(&hashes, &map, 3, 2), want[..2]);
        // A page that became zero differs too.
        mem[1][..4096].fill(0);
        mem[1][100 * 4096] ^= 1;
        mem[1][699 * 4096 + 4095] ^= 1;
        mem[0][last0] ^= 1;
        mem[0][4096 + 9] = 0;
        assert_eq!(rehash_memory(&hashes, &map, 2, 16), vec![(1, 0)]);
    }

    #[test]
    fn verify_modes_travel_as_one_byte() {
        for m in [VerifyMode::Off, VerifyMode::Received, VerifyMode::Memory] {
            assert_eq!(VerifyMode::from_wire(m.wire()), Some(m));
        }
        assert_eq!(VerifyMode::Off.wire(), 0);
        assert_eq!(VerifyMode::Received.wire(), 1);
        assert_eq!(VerifyMode::Memory.wire(), 2);
        assert_eq!(VerifyMode::from_wire(3), None);
        assert!(!VerifyMode::Off.is_on());
        assert!(VerifyMode::Received.is_on() && VerifyMode::Memory.is_on());
        assert_eq!(VerifyMode::default(), VerifyMode::Received);
    }

    #[test]
    fn mismatches_are_described_by_region_and_chunk() {
        assert_eq!(
            describe(&[(0, 3), (1, 0)]),
            "region 0 chunk 3, region 1 chunk 0"
        );
        assert_eq!(describe(&[]), "");
    }
}
