//! A destination guest for post-copy tests: once resumed, it reads pages (faulting on the
//! ones still missing) and keeps what it saw, for the test to compare with the source.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rmig_engine::DestEmbedder;

use crate::{Mem, Rng};

/// A page the destination's guest read, and the bytes it saw.
type PageRead = (u64, Vec<u8>);

/// A destination guest: once resumed, a thread reads `reads` random pages of the first `hot`
/// pages, as a guest would, and keeps each page's bytes for the test to compare.
#[derive(Clone)]
pub struct ReadingGuest {
    addr: usize,
    hot: u64,
    reads: u64,
    seen: Arc<Mutex<Vec<PageRead>>>,
    done: Arc<AtomicBool>,
    /// Calls of `resume`.
    pub resumed: Arc<AtomicU64>,
}

impl ReadingGuest {
    /// A guest over `mem` (the destination's memory).
    pub fn new(mem: &Mem, hot: u64, reads: u64) -> Self {
        ReadingGuest {
            addr: mem.ptr() as usize,
            hot,
            reads,
            seen: Arc::default(),
            done: Arc::default(),
            resumed: Arc::default(),
        }
    }

    /// Waits for the guest's reads (at most 60 s) and checks that every page it read held the
    /// source's bytes (`src`, as it was at the pause).
    pub fn check_reads(&self, src: &Mem) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !self.done.load(Ordering::Acquire) {
            assert!(
                std::time::Instant::now() < deadline,
                "the guest's reads hang"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let seen = self.seen.lock().unwrap();
        assert_eq!(seen.len() as u64, self.reads);
        for (page, bytes) in seen.iter() {
            let p = *page as usize * 4096;
            assert!(
                bytes[..] == src.bytes()[p..p + 4096],
                "page {page} read wrong bytes"
            );
        }
    }
}

impl DestEmbedder for ReadingGuest {
    fn load_device_state(&mut self, _s: Vec<u8>) -> Result<(), String> {
        Ok(())
    }

    fn resume(&mut self) -> Result<(), String> {
        self.resumed.fetch_add(1, Ordering::Relaxed);
        let g = self.clone();
        std::thread::spawn(move || {
            let mut r = Rng(99);
            for _ in 0..g.reads {
                let page = r.next_u64() % g.hot;
                let mut bytes = vec![0u8; 4096];
                for (i, b) in bytes.iter_mut().enumerate() {
                    // SAFETY: inside the destination's memory, which the test keeps mapped;
                    // a missing page makes this read wait for the fault thread.
                    *b = unsafe {
                        std::ptr::read_volatile((g.addr + page as usize * 4096 + i) as *const u8)
                    };
                }
                g.seen.lock().unwrap().push((page, bytes));
            }
            g.done.store(true, Ordering::Release);
        });
        Ok(())
    }
}
