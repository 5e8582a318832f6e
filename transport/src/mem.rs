//! Raw views of guest memory, the one place where the data plane touches foreign memory.
//!
//! Guest RAM belongs to the embedder (a VMM's mmap, the bench's allocation). rmig reads it on
//! the source and writes it on the destination through these views. Like every VMM, rmig
//! reads source pages while the guest may still write them: such a page is dirty again and is
//! sent again in a later round, so a torn read never survives to the end of a migration.
//!
//! # Why not `&[u8]`
//!
//! A `&[u8]` promises the compiler that no one changes its bytes while it lives, and a
//! `&mut [u8]` that no one else even reads them. Guest memory keeps neither promise: guest
//! vCPUs write source pages while rmig reads them, and on a destination an RDMA NIC writes
//! pages that rmig then reads to hash. A reference over such memory is undefined behaviour
//! whether or not the code ever looks twice, so this module never creates one. Guest bytes
//! are reached only through [`GuestPages`], a pointer and a length whose methods copy out of
//! or into ordinary buffers with raw-pointer copies (`ptr::copy_nonoverlapping`), test for
//! zero with volatile word loads, and describe the range to the kernel as a `libc::iovec`
//! for `writev`/`readv` made with `libc` directly (the kernel's own copy is outside Rust's
//! model). What is hashed or compared is then a private copy, in ordinary memory, that no
//! one else writes.
//!
//! This is the approach of rust-vmm's `vm-memory` (`VolatileSlice`: raw pointers, volatile
//! accesses for single words, `copy_nonoverlapping` for bulk copies). rmig does not depend
//! on that crate: it needs half a dozen operations on page runs of a region table it already
//! has, and `vm-memory`'s address-space model (guest addresses, region lookup, bitmaps) would
//! sit beside rmig's own rather than replace it.
//!
//! What remains is the race itself, which no API removes: the writers are a guest, a NIC or
//! the embedder, not rmig. Without a reference the compiler assumes nothing about the bytes
//! beyond each access. Volatile loads are how `std::ptr::read_volatile`'s documentation says
//! memory outside any Rust allocation is read; stable Rust has no volatile bulk copy, so, as
//! in `vm-memory`, copies use `copy_nonoverlapping`, and their result is only ever used as
//! plain bytes. A copy torn by a racing write is the dirty-log argument above.

use std::marker::PhantomData;

/// One region of guest memory: a host address range split into pages of one size.
#[derive(Debug, Clone, Copy)]
pub struct MemRegion {
    ptr: *mut u8,
    len: usize,
    page_size: usize,
}

// SAFETY: a MemRegion is a plain address range; the constructor's contract keeps the memory
// valid for the whole session, from any thread.
unsafe impl Send for MemRegion {}
// SAFETY: sharing the address range is fine: the region only hands out `GuestPages` views,
// whose access rules (those of `new` and of the unsafe write methods) hold on any thread.
unsafe impl Sync for MemRegion {}

impl MemRegion {
    /// Wraps `len` bytes at `ptr`, split into pages of `page_size` bytes.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay mapped, readable (and, on a destination, writable) for as long
    /// as any copy of this value is used, and no one but rmig may write the destination range
    /// while a migration runs. `len` must be a multiple of `page_size`, which must be a power
    /// of two.
    pub unsafe fn new(ptr: *mut u8, len: usize, page_size: usize) -> Self {
        debug_assert!(page_size.is_power_of_two() && len.is_multiple_of(page_size));
        MemRegion {
            ptr,
            len,
            page_size,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Page size in bytes.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Number of pages.
    pub fn pages(&self) -> u64 {
        (self.len / self.page_size) as u64
    }

    /// Host address of the first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Whether `first..first+n` lies inside the region (and `n > 0`).
    pub fn contains(&self, first: u64, n: u64) -> bool {
        n > 0 && first.checked_add(n).is_some_and(|end| end <= self.pages())
    }

    /// Byte offset and length of a page range; the range must be inside the region.
    fn span(&self, first: u64, n: u64) -> (usize, usize) {
        assert!(self.contains(first, n), "page range outside the region");
        (first as usize * self.page_size, n as usize * self.page_size)
    }

    /// Pages `first..first+n` as a raw view; panics if the range is not inside the region.
    pub fn guest_pages(&self, first: u64, n: u64) -> GuestPages<'_> {
        let (off, len) = self.span(first, n);
        GuestPages {
            // SAFETY: `off + len <= self.len` (checked by `span`), so the pointer stays inside
            // the mapping that the constructor's contract keeps valid. No reference is made.
            ptr: unsafe { self.ptr.add(off) },
            len,
            _region: PhantomData,
        }
    }
}

/// A byte range of guest memory, reached only through raw pointers (see the module doc for
/// why there is no `&[u8]` over it).
///
/// Reading is safe: the bytes may change under a read, which then returns some mix of old and
/// new bytes, and the range is valid by the contract of the [`MemRegion`] it came from.
/// Writing is `unsafe`: the caller promises to be the range's only writer (a destination lane
/// in its round) and that the range is writable memory.
#[derive(Debug, Clone, Copy)]
pub struct GuestPages<'a> {
    ptr: *mut u8,
    len: usize,
    _region: PhantomData<&'a MemRegion>,
}

impl<'a> GuestPages<'a> {
    /// A view of `len` bytes at `ptr`.
    ///
    /// # Safety
    /// The contract of [`MemRegion::new`] for this range, for as long as `'a`: mapped and
    /// readable (writable, if a write method is used), and no `&`/`&mut` reference to these
    /// bytes is used while the view is.
    pub unsafe fn from_raw_parts(ptr: *mut u8, len: usize) -> Self {
        GuestPages {
            ptr,
            len,
            _region: PhantomData,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the view has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Host address of the first byte (for RDMA work requests and system calls).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// The bytes `off..off+len` of this view; panics if they are not inside it.
    pub fn subrange(&self, off: usize, len: usize) -> GuestPages<'a> {
        assert!(
            off.checked_add(len).is_some_and(|end| end <= self.len),
            "subrange outside the view"
        );
        GuestPages {
            // SAFETY: `off <= self.len`, so the pointer stays inside this view's range.
            ptr: unsafe { self.ptr.add(off) },
            len,
            _region: PhantomData,
        }
    }

    /// Copies the view's bytes into `dst`, which must have the same length.
    pub fn copy_to(&self, dst: &mut [u8]) {
        assert_eq!(dst.len(), self.len, "copy_to needs equal lengths");
        // SAFETY: the source is valid for `len` reads (constructor's contract) and is only
        // read through this raw pointer, never through a reference; `dst` is ordinary memory
        // borrowed exclusively, so the two cannot overlap. A concurrent write to guest memory
        // at most tears the copy (see the module doc).
        unsafe { std::ptr::copy_nonoverlapping(self.ptr, dst.as_mut_ptr(), self.len) };
    }

    /// Copies `src`, of the same length, into the view.
    ///
    /// # Safety
    /// The range is writable, and no one else writes or reads it through rmig while the call
    /// runs (on a destination: each page has one lane per round, and rounds are fenced).
    pub unsafe fn copy_from(&self, src: &[u8]) {
        assert_eq!(src.len(), self.len, "copy_from needs equal lengths");
        // SAFETY: valid and writable for `len` bytes, with no other writer (caller's
        // contract); `src` is ordinary memory, which guest memory cannot overlap while no
        // reference to guest memory exists. Only raw pointers touch the guest range.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr, self.len) };
    }

    /// Sets every byte of the view to zero.
    ///
    /// # Safety
    /// As for [`copy_from`](Self::copy_from).
    pub unsafe fn fill_zero(&self) {
        // SAFETY: valid and writable for `len` bytes, with no other writer (caller's
        // contract); written through the raw pointer only.
        unsafe { std::ptr::write_bytes(self.ptr, 0, self.len) };
    }

    /// Whether every byte is zero. Reads with volatile loads, a word at a time, and stops at
    /// the first non-zero cache line, so random data costs one line.
    pub fn is_zero(&self) -> bool {
        let (mut p, end) = (self.ptr as usize, self.ptr as usize + self.len);
        // Every address passed to `byte` and `word` below lies in `p..end`, inside the view.
        // SAFETY: `a` is inside the view, valid for reads by the constructor's contract; a
        // volatile load through a raw pointer is how memory that others write is read.
        let byte = |a: usize| unsafe { std::ptr::read_volatile(a as *const u8) };
        // SAFETY: as for `byte`, and `a..a+8` is inside the view and 8-byte aligned (the
        // loop below reaches alignment first).
        let word = |a: usize| unsafe { std::ptr::read_volatile(a as *const u64) };
        while p < end && !p.is_multiple_of(8) {
            if byte(p) != 0 {
                return false;
            }
            p += 1;
        }
        while end - p >= 64 {
            let mut acc = 0;
            for i in 0..8 {
                acc |= word(p + i * 8);
            }
            if acc != 0 {
                return false;
            }
            p += 64;
        }
        while end - p >= 8 {
            if word(p) != 0 {
                return false;
            }
            p += 8;
        }
        (p..end).all(|a| byte(a) == 0)
    }

    /// The view as an I/O vector entry for `writev`/`readv` called through `libc`. Making it
    /// is safe; a `readv` into it carries [`copy_from`](Self::copy_from)'s contract.
    pub fn as_iovec(&self) -> libc::iovec {
        libc::iovec {
            iov_base: self.ptr.cast(),
            iov_len: self.len,
        }
    }

    /// Asks the CPU to bring the first `bytes` bytes of the view into cache (a hint that
    /// never faults; hardware prefetchers stop at 4 KiB page boundaries).
    #[inline]
    pub fn prefetch(&self, bytes: usize) {
        #[cfg(target_arch = "x86_64")]
        for off in (0..bytes.min(self.len)).step_by(64) {
            // SAFETY: a prefetch is a hint that reads nothing and never faults; the address
            // is inside the view (`off < len`), computed with a raw-pointer offset.
            unsafe {
                core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
                    self.ptr.add(off).cast_const().cast(),
                )
            };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = bytes;
    }
}

/// The session's region table as the data plane sees it, indexed by wire region number.
#[derive(Debug, Clone, Default)]
pub struct MemoryMap {
    regions: Vec<MemRegion>,
}

impl MemoryMap {
    /// A map over these regions, in table order.
    pub fn new(regions: Vec<MemRegion>) -> Self {
        MemoryMap { regions }
    }

    /// The region with wire number `idx`, if any.
    pub fn get(&self, idx: usize) -> Option<&MemRegion> {
        self.regions.get(idx)
    }

    /// All regions in table order.
    pub fn regions(&self) -> &[MemRegion] {
        &self.regions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A region over `buf` (which the test then reads only through the region).
    fn region(buf: &mut [u64]) -> MemRegion {
        // SAFETY: buf outlives the region in every test and nothing else touches it while
        // the region is used.
        unsafe { MemRegion::new(buf.as_mut_ptr().cast(), buf.len() * 8, 4096) }
    }

    #[test]
    fn bounds_are_checked() {
        let mut buf = vec![0u64; 4 * 512];
        let r = region(&mut buf);
        assert_eq!(r.pages(), 4);
        assert!(r.contains(0, 4));
        assert!(!r.contains(1, 4));
        assert!(!r.contains(0, 0));
        assert!(!r.contains(u64::MAX, 2));
        assert_eq!(r.guest_pages(3, 1).len(), 4096);
        assert_eq!(r.guest_pages(1, 3).len(), 3 * 4096);
        let g = r.guest_pages(1, 2);
        assert_eq!(
            g.subrange(4096, 4096).as_ptr(),
            r.guest_pages(2, 1).as_ptr()
        );
        for bad in [
            std::panic::catch_unwind(|| r.guest_pages(3, 2).len()),
            std::panic::catch_unwind(|| r.guest_pages(4, 1).len()),
            std::panic::catch_unwind(|| g.subrange(4096, 4097).len()),
            std::panic::catch_unwind(|| g.subrange(usize::MAX, 2).len()),
        ] {
            assert!(bad.is_err());
        }
    }

    #[test]
    fn copies_round_trip() {
        let mut buf = vec![0u64; 2 * 512];
        let r = region(&mut buf);
        let g = r.guest_pages(0, 2);
        let src: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 253) as u8).collect();
        // SAFETY: the test is the only user of the buffer.
        unsafe { g.copy_from(&src) };
        let mut back = vec![0u8; 8192];
        g.copy_to(&mut back);
        assert_eq!(back, src);
        let mut one = vec![0u8; 100];
        g.subrange(4000, 100).copy_to(&mut one);
        assert_eq!(one, src[4000..4100]);
        let iov = r.guest_pages(1, 1).as_iovec();
        assert_eq!(
            (iov.iov_base.cast::<u8>(), iov.iov_len),
            (g.subrange(4096, 1).as_ptr(), 4096)
        );
        assert!(std::panic::catch_unwind(|| g.copy_to(&mut [0u8; 3])).is_err());
        // The views are no longer used: the buffer may be read directly again.
        assert_eq!(buf[0].to_ne_bytes(), src[..8]);
    }

    #[test]
    fn zero_check_sees_every_byte() {
        let mut buf = vec![0u64; 2 * 512];
        let r = region(&mut buf);
        let g = r.guest_pages(0, 2);
        assert!(g.is_zero());
        // Every position, through aligned and unaligned views of odd lengths.
        for pos in [0usize, 7, 8, 63, 64, 100, 4095, 8191] {
            let one = g.subrange(pos, 1);
            // SAFETY: the test is the only user of the buffer.
            unsafe { one.copy_from(&[1]) };
            assert!(!g.is_zero(), "byte {pos}");
            assert!(!g.subrange(pos.saturating_sub(3), 1 + pos.min(3)).is_zero());
            if pos > 0 {
                assert!(g.subrange(1, pos - 1).is_zero(), "before {pos}");
            }
            // SAFETY: as above.
            unsafe { one.fill_zero() };
            assert!(g.is_zero());
        }
        assert!(g.subrange(5, 0).is_zero());
        g.prefetch(8192);
    }
}
