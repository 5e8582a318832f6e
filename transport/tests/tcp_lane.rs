//! A TCP lane end to end: runs land where they belong, acknowledgements come back, a hostile
//! header is refused before a byte of its payload is written, and a lane broken on purpose
//! mid-batch leaves the destination with a batch cut short.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{bytes, map_of, pair, Reader};
use rmig_transport::tcp::wire::{Header, KIND_DATA};
use rmig_transport::tcp::{TcpDestLane, TcpSourceLane};
use rmig_transport::{
    Batch, FaultPlan, FaultyLane, LaneError, Pacer, PageSink, Run, RunKind, SourceLane,
};

struct Count {
    data: AtomicU64,
    zero: AtomicU64,
}

impl PageSink for Count {
    fn data_landed(&self, _: usize, _: u64, n: u64) {
        self.data.fetch_add(n, Ordering::Relaxed);
    }
    fn zero_pages(&self, _: usize, _: u64, n: u64) {
        self.zero.fetch_add(n, Ordering::Relaxed);
    }
}

fn aligned(pages: usize) -> Vec<u64> {
    vec![0u64; pages * 512]
}

#[test]
fn runs_land_and_are_acknowledged() {
    let mut src = aligned(16);
    for (i, w) in src.iter_mut().enumerate() {
        *w = i as u64 * 0x0101_0101;
    }
    let mut dst = aligned(16);
    let (a, b) = pair();
    let smap = map_of(&mut src);
    let dmap = map_of(&mut dst);
    let count = Arc::new(Count {
        data: AtomicU64::new(0),
        zero: AtomicU64::new(0),
    });
    let c2 = count.clone();
    let recv = std::thread::spawn(move || TcpDestLane::new(b, dmap).unwrap().run(c2.as_ref()));
    let mut lane = TcpSourceLane::new(a, smap, Arc::new(Pacer::new(0))).unwrap();
    let batch = Batch {
        seq: 1,
        runs: vec![
            Run {
                region: 0,
                first_page: 0,
                npages: 10,
                kind: RunKind::Data,
            },
            Run {
                region: 0,
                first_page: 10,
                npages: 2,
                kind: RunKind::Zero,
            },
            Run {
                region: 0,
                first_page: 12,
                npages: 4,
                kind: RunKind::Data,
            },
        ],
        data_bytes: 14 * 4096,
    };
    lane.send(&batch).unwrap();
    lane.wait_acked(1, Duration::from_secs(5)).unwrap();
    assert_eq!(lane.acked(), 1);
    lane.close();
    let sum = recv.join().unwrap().unwrap();
    assert_eq!(sum.data_pages, 14);
    assert_eq!(sum.zero_pages, 2);
    assert_eq!(count.data.load(Ordering::Relaxed), 14);
    assert_eq!(count.zero.load(Ordering::Relaxed), 2);
    assert_eq!(&src[..10 * 512], &dst[..10 * 512]);
    assert_eq!(&src[12 * 512..], &dst[12 * 512..]);
}

/// A destination lane receiving into `dst` on its own thread; returns the sending socket.
fn receiver(
    dst: &mut [u64],
) -> (
    TcpStream,
    std::thread::JoinHandle<Result<rmig_transport::tcp::DestLaneSummary, LaneError>>,
) {
    let (a, b) = pair();
    let dmap = map_of(dst);
    let recv = std::thread::spawn(move || {
        let c = Count {
            data: AtomicU64::new(0),
            zero: AtomicU64::new(0),
        };
        TcpDestLane::new(b, dmap).unwrap().run(&c)
    });
    (a, recv)
}

#[test]
fn a_header_outside_the_region_is_refused_before_writing() {
    let mut dst = aligned(4);
    let (mut a, recv) = receiver(&mut dst);
    let h = Header {
        kind: KIND_DATA,
        region: 0,
        first_page: 3,
        count: 2,
    };
    a.write_all(&h.encode()).unwrap();
    a.write_all(&[0xff; 8192]).unwrap();
    let r = recv.join().unwrap();
    assert!(
        matches!(r, Err(LaneError::Malformed(ref m)) if m.contains("outside")),
        "{r:?}"
    );
    assert!(dst.iter().all(|&w| w == 0));
}

#[test]
fn unknown_regions_and_kinds_are_refused() {
    for bad in [
        Header {
            kind: KIND_DATA,
            region: 5,
            first_page: 0,
            count: 1,
        }
        .encode(),
        {
            let mut b = Header {
                kind: KIND_DATA,
                region: 0,
                first_page: 0,
                count: 1,
            }
            .encode();
            b[0] = 77;
            b
        },
    ] {
        let mut dst = aligned(4);
        let (mut a, recv) = receiver(&mut dst);
        a.write_all(&bad).unwrap();
        assert!(matches!(recv.join().unwrap(), Err(LaneError::Malformed(_))));
    }
}

#[test]
fn a_reading_sink_gets_the_staged_bytes_of_runs_longer_than_the_stage() {
    const PAGES: usize = 600; // one run of 2.3 MiB: three staged pieces
    let mut src = aligned(PAGES);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for w in src.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *w = x;
    }
    let mut dst = aligned(PAGES);
    let (a, b) = pair();
    let smap = map_of(&mut src);
    let dmap = map_of(&mut dst);
    let sink = Arc::new(Reader::new(PAGES));
    let s2 = sink.clone();
    let recv = std::thread::spawn(move || TcpDestLane::new(b, dmap).unwrap().run(s2.as_ref()));
    let mut lane = TcpSourceLane::new(a, smap, Arc::new(Pacer::new(0))).unwrap();
    let batch = Batch {
        seq: 1,
        runs: vec![Run {
            region: 0,
            first_page: 0,
            npages: PAGES as u32,
            kind: RunKind::Data,
        }],
        data_bytes: (PAGES * 4096) as u64,
    };
    lane.send(&batch).unwrap();
    lane.wait_acked(1, Duration::from_secs(5)).unwrap();
    lane.close();
    let sum = recv.join().unwrap().unwrap();
    assert_eq!(sum.data_pages, PAGES as u64);
    assert_eq!(src, dst);
    let bytes = bytes(&src);
    for (i, seen) in sink.pages.lock().unwrap().iter().enumerate() {
        assert_eq!(
            seen.as_deref(),
            Some(&bytes[i * 4096..(i + 1) * 4096]),
            "page {i}"
        );
    }
}

/// A batch of one data run of `npages` pages from `first`.
fn data_batch(seq: u64, first: u64, npages: u32) -> Batch {
    Batch {
        seq,
        runs: vec![Run {
            region: 0,
            first_page: first,
            npages,
            kind: RunKind::Data,
        }],
        data_bytes: npages as u64 * 4096,
    }
}

#[test]
fn a_faulty_lane_tears_the_batch_that_crosses_its_limit() {
    let mut src = aligned(8);
    for (i, w) in src.iter_mut().enumerate() {
        *w = !(i as u64);
    }
    let mut dst = aligned(8);
    let (a, recv) = receiver(&mut dst);
    let lane = TcpSourceLane::new(a, map_of(&mut src), Arc::new(Pacer::new(0))).unwrap();
    let plan = FaultPlan {
        fail_after_bytes: Some(4 * 4096),
        ..Default::default()
    };
    let mut lane = FaultyLane::new(lane, plan);
    lane.send(&data_batch(1, 0, 4)).unwrap();
    lane.wait_acked(1, Duration::from_secs(5)).unwrap();
    let e = lane.send(&data_batch(2, 4, 4)).unwrap_err();
    assert!(matches!(e, LaneError::Injected(_)), "{e}");
    let r = recv.join().unwrap();
    assert!(
        matches!(r, Err(LaneError::Closed)),
        "a batch cut short ends the destination's lane without a close: {r:?}"
    );
    assert_eq!(&src[..4 * 512], &dst[..4 * 512], "the first batch landed");
    assert!(
        dst[6 * 512..].iter().all(|&w| w == 0),
        "the torn batch's second half never left"
    );
}
