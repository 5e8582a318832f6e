//! Raw views of guest memory, the one place where the data plane touches foreign memory.
//!
//! Guest RAM belongs to the embedder (a VMM's mmap, the bench's allocation). rmig reads it on
//! the source and writes it on the destination through these views. Like every VMM, rmig
//! reads source pages while the guest may still write them: such a page is dirty again and is
//! sent again in a later round, so a torn read never survives to the end of a migration.

use std::io::IoSlice;

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
// SAFETY: sharing the address range is fine; the access rules are those of `new` and
// `pages_slice_mut`, whichever thread calls them.
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

    /// The bytes of pages `first..first+n`, for reading.
    pub fn pages_slice(&self, first: u64, n: u64) -> &[u8] {
        let (off, len) = self.span(first, n);
        // SAFETY: the range is inside the region (checked by `span`), which the constructor's
        // contract keeps mapped and readable. The guest may write it concurrently on a source;
        // such pages are dirty and re-sent, see the module doc.
        unsafe { std::slice::from_raw_parts(self.ptr.add(off), len) }
    }

    /// The bytes of pages `first..first+n` as an I/O slice for vectored writes.
    pub fn io_slice(&self, first: u64, n: u64) -> IoSlice<'_> {
        IoSlice::new(self.pages_slice(first, n))
    }

    /// The bytes of pages `first..first+n`, for writing.
    ///
    /// # Safety
    /// The caller must be the only one accessing these pages while the slice lives (on a
    /// destination, each page is written by one lane per round, and rounds are fenced).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn pages_slice_mut(&self, first: u64, n: u64) -> &mut [u8] {
        let (off, len) = self.span(first, n);
        // SAFETY: inside the region (checked), writable by the constructor's contract and
        // exclusive by this function's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(off), len) }
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

    #[test]
    fn bounds_are_checked() {
        let mut buf = vec![0u8; 4 * 4096];
        // SAFETY: buf outlives r and nothing else touches it.
        let r = unsafe { MemRegion::new(buf.as_mut_ptr(), buf.len(), 4096) };
        assert_eq!(r.pages(), 4);
        assert!(r.contains(0, 4));
        assert!(!r.contains(1, 4));
        assert!(!r.contains(0, 0));
        assert!(!r.contains(u64::MAX, 2));
        assert_eq!(r.pages_slice(3, 1).len(), 4096);
    }
}
