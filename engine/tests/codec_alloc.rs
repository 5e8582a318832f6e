//! Decoding allocates no more than a small multiple of the frame it reads, whatever the
//! frame: measured with a counting global allocator (so in a test binary of its own).
//!
//! The bound is 8 bytes per body byte plus 1 KiB (error texts): the worst layout is a
//! `Checksums` list of empty regions, 24 bytes of `Vec` header per 4-byte count. A frame
//! whose length prefix exceeds its type's limit must fail before its body is allocated.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use proptest::prelude::*;
use rmig_engine::protocol::codec::{decode, encode, read_sync, tag, Limits, MAX_REGIONS};
use rmig_engine::protocol::Message;

mod codec_gen;
use codec_gen::{apply, damage, raw_body};

/// Bytes allocated per body byte, at most.
const PER_BYTE: usize = 8;
/// Bytes allocated besides, at most (error messages).
const SLACK: usize = 1024;

/// Counts the bytes this thread allocates while counting is on.
struct Counting;

thread_local! {
    static ON: Cell<bool> = const { Cell::new(false) };
    static BYTES: Cell<usize> = const { Cell::new(0) };
}

fn count(n: usize) {
    // `try_with`: thread-locals may be gone while a thread exits.
    let _ = ON.try_with(|on| {
        if on.get() {
            let _ = BYTES.try_with(|b| b.set(b.get() + n));
        }
    });
}

// SAFETY: every call is forwarded to the system allocator unchanged; counting touches only
// const-initialised thread-locals, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count(l.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        count(l.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` came from `System` with layout `l`.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        count(new);
        // SAFETY: `p` came from `System` with layout `l`.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns the bytes it allocated on this thread.
fn allocated<T>(f: impl FnOnce() -> T) -> (T, usize) {
    BYTES.with(|b| b.set(0));
    ON.with(|on| on.set(true));
    let r = f();
    ON.with(|on| on.set(false));
    (r, BYTES.with(|b| b.get()))
}

/// Decodes `body` and checks the allocation bound.
fn check(body: &[u8]) -> Result<(), TestCaseError> {
    let (r, n) = allocated(|| decode(body).map(drop));
    let max = PER_BYTE * body.len() + SLACK;
    prop_assert!(n <= max, "{n} bytes for a body of {} ({r:?})", body.len());
    Ok(())
}

#[test]
fn the_counter_sees_allocations() {
    let (v, n) = allocated(|| vec![0u8; 4096]);
    assert!(n >= 4096, "{n}");
    drop(v);
}

#[test]
fn the_worst_layouts_stay_within_the_bound() {
    // A Checksums frame of empty regions, a region table of the shortest regions, a
    // Digests frame claiming more items than fit.
    let mut checksums = vec![tag::CHECKSUMS];
    checksums.extend_from_slice(&(MAX_REGIONS as u32).to_le_bytes());
    checksums.resize(5 + 4 * MAX_REGIONS, 0);
    let mut table = vec![tag::REGION_TABLE];
    table.extend_from_slice(&(MAX_REGIONS as u32).to_le_bytes());
    table.resize(5 + 25 * MAX_REGIONS, 0);
    let mut digests = vec![tag::DIGESTS];
    digests.extend_from_slice(&u32::MAX.to_le_bytes());
    digests.resize(1 << 20, 0);
    for body in [checksums, table, digests] {
        check(&body).unwrap();
    }
    // Lists claiming from exactly as many items as fit to far more.
    for (t, item) in [
        (tag::DIGESTS, 20),
        (tag::CHECKSUMS, 4),
        (tag::REGION_TABLE, 25),
        (tag::TRANSPORT_OFFER, 1),
        (tag::DEVICE_STATE, 1),
        (tag::VERIFIED, 12),
    ] {
        for k in [1, 2, 3, 8, 64, 1000] {
            let mut body = vec![t];
            if t == tag::VERIFIED {
                body.push(0);
            }
            let fit = ((64 << 10) - body.len() - 4) / item;
            body.extend_from_slice(&(fit as u32).saturating_mul(k).to_le_bytes());
            body.resize(64 << 10, 0);
            check(&body).unwrap();
        }
    }
    let empty = Message::Checksums {
        regions: vec![vec![]; MAX_REGIONS],
    };
    check(&encode(&empty)[4..]).unwrap();
}

proptest! {
    #[test]
    fn decoding_arbitrary_bytes_allocates_little(body in raw_body()) {
        check(&body)?;
    }

    #[test]
    fn decoding_damaged_frames_allocates_little(
        m in codec_gen::message(),
        damages in proptest::collection::vec(damage(), 0..4),
    ) {
        let mut body = encode(&m)[4..].to_vec();
        for d in &damages {
            apply(&mut body, d);
        }
        check(&body)?;
    }

    /// A reader allocates a body only when its length is within its type's limit.
    #[test]
    fn a_frame_over_its_limit_is_refused_before_allocation(
        t in 0u8..=30,
        len in prop_oneof![0u32..64, any::<u32>(), Just(16 << 20)],
    ) {
        let mut frame = len.to_le_bytes().to_vec();
        frame.push(t);
        frame.resize(frame.len() + (len as usize).min(64), 0);
        let mut cursor = std::io::Cursor::new(&frame);
        let (r, n) = allocated(|| read_sync(&mut cursor).map(drop));
        let admitted = Limits::default()
            .check(t, len as usize)
            .is_ok();
        prop_assert!(r.is_err() || admitted);
        let body = if admitted { len as usize } else { 0 };
        prop_assert!(n <= (PER_BYTE + 1) * body + SLACK, "{n} bytes for a {len}-byte claim of type {t}");
    }
}
