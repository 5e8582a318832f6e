//! What the TCP lane tests share: a connected socket pair, a region over a test buffer, and a
//! sink that keeps what it is handed.

#![allow(dead_code)] // each test binary uses its own part

use std::net::{TcpListener, TcpStream};
use std::sync::Mutex;

use rmig_transport::{MemRegion, MemoryMap, PageSink};

/// Bytes in a page of the test regions.
pub const PAGE: usize = 4096;

/// A connected pair: (the connecting end, the accepted end). Reads on the accepted end (the
/// destination's) fail after 10 s, so no test hangs on a lane that stopped talking.
pub fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (b, _) = l.accept().unwrap();
    b.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    (a, b)
}

/// One region of 4 KiB pages over `buf`.
pub fn map_of(buf: &mut [u64]) -> MemoryMap {
    // SAFETY: the buffer outlives the lanes of each test, which end before it is read.
    let r = unsafe { MemRegion::new(buf.as_mut_ptr().cast(), buf.len() * 8, PAGE) };
    MemoryMap::new(vec![r])
}

/// A u64 slice viewed as its bytes.
pub fn bytes(v: &[u64]) -> &[u8] {
    // SAFETY: a u64 slice viewed as its bytes, borrowed as long as `v`.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), v.len() * 8) }
}

/// A sink that reads what lands, as a verifying destination does: it keeps a copy of the bytes
/// it is handed for each page.
pub struct Reader {
    /// Each page's bytes as handed over, if it was.
    pub pages: Mutex<Vec<Option<Vec<u8>>>>,
}

impl Reader {
    /// A reader for `pages` pages.
    pub fn new(pages: usize) -> Reader {
        Reader {
            pages: Mutex::new(vec![None; pages]),
        }
    }
}

impl PageSink for Reader {
    fn data_landed(&self, _: usize, _: u64, _: u64) {
        panic!("a reading sink is handed the bytes");
    }
    fn data_landed_from(&self, _: usize, first: u64, n: u64, bytes: &[u8]) {
        assert_eq!(bytes.len() as u64, n * PAGE as u64);
        let mut pages = self.pages.lock().unwrap();
        for (i, pg) in bytes.chunks(PAGE).enumerate() {
            pages[first as usize + i] = Some(pg.to_vec());
        }
    }
    fn zero_pages(&self, _: usize, _: u64, _: u64) {}
    fn reads_landed(&self) -> bool {
        true
    }
}
