//! Frames too large for their type are refused before their body is allocated. This file is
//! its own test binary because it counts the process's allocations: a global allocator
//! records every request of at least [`WATCHED`] bytes.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use rmig_engine::protocol::codec;
use rmig_engine::EngineError;
use rmig_tests::{against_raw_peer, Deadline};

/// Requests at least this large are counted (nothing in a refused handshake needs one).
const WATCHED: usize = 4 << 20;

struct Counting;

static LARGE: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if l.size() >= WATCHED {
            LARGE.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if l.size() >= WATCHED {
            LARGE.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if new >= WATCHED {
            LARGE.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: as above.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `peer` against a destination and returns its refusal and the large allocations made
/// meanwhile.
fn large_allocations_while(frame: Vec<u8>) -> (EngineError, u64) {
    let before = LARGE.load(Ordering::Relaxed);
    let (e, _, _) = against_raw_peer(|s| s.write_all(&frame).unwrap());
    (e, LARGE.load(Ordering::Relaxed) - before)
}

// One test in this binary, so that no other test's allocations are counted.
#[test]
fn oversized_frames_are_refused_before_allocation() {
    let _deadline = Deadline::secs(60);
    // The instrument works: a body allocated at the size a frame claims is counted.
    let before = LARGE.load(Ordering::Relaxed);
    drop(std::hint::black_box(vec![0u8; codec::MAX_FRAME]));
    assert_eq!(LARGE.load(Ordering::Relaxed) - before, 1);

    // Above the frame limit: a 4 GiB length prefix.
    let mut huge = u32::MAX.to_le_bytes().to_vec();
    huge.extend_from_slice(&[1, 2, 3]);
    let (e, large) = large_allocations_while(huge);
    assert!(e.to_string().contains("exceeds the maximum"), "{e}");
    assert_eq!(large, 0, "nothing of the claimed size was allocated");

    // Within the frame limit but above its type's: a 16 MiB `Hello` (whose body is 5 bytes).
    let mut hello = (codec::MAX_FRAME as u32).to_le_bytes().to_vec();
    hello.push(1);
    hello.extend_from_slice(&[0; 64]);
    let (e, large) = large_allocations_while(hello);
    assert!(e.to_string().contains("exceeds its limit"), "{e}");
    assert_eq!(large, 0, "nothing of the claimed size was allocated");
}
