//! Guest memory for the destination's unit tests: fresh anonymous mappings, and a sink over
//! them.

use rmig_transport::{MemRegion, MemoryMap};

use super::sink::{Crash, DestSink};

/// The page size of the test memory.
pub(super) const PAGE: usize = 4096;

/// `pages` pages of fresh anonymous memory (`flags`: `MAP_PRIVATE` or `MAP_SHARED`) whose
/// first `filled` pages hold 0xa5 (the rest never touched), as a one-region map.
pub(super) fn memory(pages: usize, flags: i32, filled: usize) -> MemoryMap {
    let len = pages * PAGE;
    // SAFETY: a fresh anonymous mapping, leaked for the test process (a test that fails may
    // leave a thread blocked on it).
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: the mapping is ours, `len` bytes long, and `filled <= pages`.
    unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0xa5, filled.min(pages) * PAGE) };
    // SAFETY: mapped for the rest of the process, written only through the map.
    let r = unsafe { MemRegion::new(p.cast(), len, PAGE) };
    MemoryMap::new(vec![r])
}

/// Page `p` of the map's region 0, as it reads now.
pub(super) fn read_page(map: &MemoryMap, p: u64) -> Vec<u8> {
    let mut v = vec![0u8; PAGE];
    map.get(0).unwrap().guest_pages(p, 1).copy_to(&mut v);
    v
}

/// A destination sink over the map's region 0 (not known to be zero), hashing what lands
/// when `verify`.
pub(super) fn sink_over(map: &MemoryMap, verify: bool) -> DestSink {
    let region = crate::region::Region {
        id: 0,
        name: "ram".into(),
        gpa: None,
        mem: *map.get(0).unwrap(),
        known_zero: false,
    };
    DestSink::new(&[region], verify, Crash::default())
}
