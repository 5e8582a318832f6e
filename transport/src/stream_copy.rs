//! Copying into guest memory without reading it first.
//!
//! A plain copy into memory that is not in cache first reads every line it writes (the CPU's
//! read-for-ownership), so landing a page in cold guest memory costs a read and a write of
//! DRAM, and it pushes out of cache what the lane is about to use. Non-temporal stores write
//! whole lines straight to memory: half the DRAM traffic, and the cache keeps the staging
//! buffer the lane reads from and hashes. Guest pages are written once per round and not read
//! again by the destination, which is exactly the case these stores are for.

use crate::mem::GuestPages;

/// Copies `src` into `dst` (same length) with non-temporal stores where the CPU has them and
/// both are 16-byte aligned, else with an ordinary copy. The stores are fenced before return,
/// so the bytes are visible to other threads as after any copy.
///
/// # Safety
/// As for [`GuestPages::copy_from`]: `dst` is writable and has no other writer during the
/// call.
pub unsafe fn copy_streaming(dst: GuestPages<'_>, src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "copy_streaming needs equal lengths");
    #[cfg(target_arch = "x86_64")]
    {
        let aligned = (dst.as_ptr() as usize | src.as_ptr() as usize).is_multiple_of(16);
        if aligned && dst.len().is_multiple_of(64) {
            // SAFETY: `dst` is valid and writable for `len` bytes with no other writer (this
            // function's contract) and is written through its raw pointer only; `src` is
            // ordinary memory valid for `len` reads, which cannot overlap guest memory; both
            // are 16-byte aligned (checked). SSE2 is part of x86_64's baseline.
            unsafe { stream_sse2(dst.as_ptr(), src.as_ptr(), dst.len()) };
            return;
        }
    }
    // SAFETY: this function's contract is `copy_from`'s.
    unsafe { dst.copy_from(src) };
}

/// # Safety
/// `dst` and `src` valid for `len` bytes, 16-byte aligned, not overlapping; `len % 64 == 0`.
#[cfg(target_arch = "x86_64")]
unsafe fn stream_sse2(dst: *mut u8, src: *const u8, len: usize) {
    use core::arch::x86_64::{__m128i, _mm_load_si128, _mm_sfence, _mm_stream_si128};
    let mut off = 0;
    while off < len {
        // SAFETY: `off + 64 <= len`, so each 16-byte access is in bounds; both pointers are
        // 16-byte aligned (caller's contract) and `off` is a multiple of 64.
        unsafe {
            let s = src.add(off) as *const __m128i;
            let d = dst.add(off) as *mut __m128i;
            let a = _mm_load_si128(s);
            let b = _mm_load_si128(s.add(1));
            let c = _mm_load_si128(s.add(2));
            let e = _mm_load_si128(s.add(3));
            _mm_stream_si128(d, a);
            _mm_stream_si128(d.add(1), b);
            _mm_stream_si128(d.add(2), c);
            _mm_stream_si128(d.add(3), e);
        }
        off += 64;
    }
    // SAFETY: a store fence has no memory-safety preconditions.
    unsafe { _mm_sfence() };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_aligned_and_unaligned() {
        let src: Vec<u8> = (0..8192u32).map(|i| (i * 31 % 251) as u8).collect();
        let mut dst = vec![0u64; 1026];
        let base = dst.as_mut_ptr().cast::<u8>();
        for off in [0usize, 1, 16] {
            // SAFETY: inside `dst` (8208 bytes), which only this view touches until the
            // comparison below.
            let d = unsafe { GuestPages::from_raw_parts(base.add(off), 4096) };
            // SAFETY: the test is the only user of `dst`.
            unsafe { copy_streaming(d, &src[..4096]) };
            let mut back = vec![0u8; 4096];
            d.copy_to(&mut back);
            assert_eq!(back, &src[..4096]);
        }
    }
}
