//! One RDMA lane end to end on a real device (soft-RoCE in CI: `tests/vm/rdma.sh` runs these
//! with `--ignored` where an rxe device is up and `RMIG_RDMA_IP` names its address).

use std::net::{IpAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rmig_transport::rdma::{DestPrepared, LocalMemory, RdmaDevice, Registration, SourcePrepared};
use rmig_transport::{
    Batch, FaultPlan, FaultyLane, LaneError, MemRegion, MemoryMap, Pacer, PageSink, Run, RunKind,
    SourceLane,
};

const PAGE: usize = 4096;

fn rdma_ip() -> IpAddr {
    std::env::var("RMIG_RDMA_IP")
        .expect("RMIG_RDMA_IP must name the address of an RDMA device (tests/vm/rdma.sh sets it)")
        .parse()
        .expect("an IP address")
}

struct Sink {
    map: MemoryMap,
    landed: Mutex<u64>,
}

impl PageSink for Sink {
    fn data_landed(&self, _region: usize, _first: u64, n: u64) {
        *self.landed.lock().unwrap() += n;
    }
    fn zero_pages(&self, region: usize, first: u64, n: u64) {
        let r = self.map.get(region).unwrap();
        // SAFETY: destination memory is writable, and the lane is the only writer of these
        // pages in the test.
        unsafe { r.guest_pages(first, n).fill_zero() };
    }
}

fn map_of(buf: &mut [u8]) -> MemoryMap {
    // SAFETY: the buffers outlive the lanes of each test.
    MemoryMap::new(vec![unsafe {
        MemRegion::new(buf.as_mut_ptr(), buf.len(), PAGE)
    }])
}

fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (b, _) = l.accept().unwrap();
    (a, b)
}

/// Sends all of `src` into `dst` over one lane; returns the source's error, if any.
fn run(
    src: &mut [u8],
    dst: &mut [u8],
    src_mode: Registration,
    dst_mode: Registration,
    fault: FaultPlan,
) -> Result<(), LaneError> {
    run_both(src, dst, src_mode, dst_mode, fault).0
}

/// What both ends of a lane made of a transfer.
type BothEnds = (
    Result<(), LaneError>,
    Result<rmig_transport::DestLaneSummary, LaneError>,
    u64,
);

/// As [`run`]; returns the source's result, the destination lane's, and the data pages the
/// destination's sink was told had landed.
fn run_both(
    src: &mut [u8],
    dst: &mut [u8],
    src_mode: Registration,
    dst_mode: Registration,
    fault: FaultPlan,
) -> BothEnds {
    let ip = rdma_ip();
    let dev_s = Arc::new(RdmaDevice::open(None, ip).expect("device for the source"));
    let dev_d = Arc::new(RdmaDevice::open(None, ip).expect("device for the destination"));
    let smap = map_of(src);
    let dmap = map_of(dst);
    let smem = Arc::new(LocalMemory::register(&dev_s, &smap, src_mode, false).unwrap());
    let dmem = Arc::new(LocalMemory::register(&dev_d, &dmap, dst_mode, true).unwrap());
    let remote = dmem.remote();
    let sp = SourcePrepared::new(dev_s, smem).unwrap();
    let dp = DestPrepared::new(dev_d, dmem).unwrap();
    let (se, de) = (sp.endpoint(), dp.endpoint());
    let (ssock, dsock) = pair();
    let mut dlane = dp.connect(&se, dsock).unwrap();
    let slane = sp
        .connect(&de, remote, ssock, Arc::new(Pacer::new(0)))
        .unwrap();
    let mut slane = FaultyLane::new(slane, fault);
    let sink = Sink {
        map: dmap.clone(),
        landed: Mutex::new(0),
    };
    let pages = (src.len() / PAGE) as u64;
    std::thread::scope(|s| {
        let d = s.spawn(|| dlane.run(&sink));
        let r = (|| {
            let mut seq = 0;
            let mut first = 0u64;
            while first < pages {
                seq += 1;
                let mut b = Batch {
                    seq,
                    ..Default::default()
                };
                // Runs of 8 pages with a gap of one, the gaps sent as zero runs.
                for _ in 0..32 {
                    if first >= pages {
                        break;
                    }
                    let n = 8.min(pages - first);
                    b.runs.push(Run {
                        region: 0,
                        first_page: first,
                        npages: n as u32,
                        kind: RunKind::Data,
                    });
                    b.data_bytes += n * PAGE as u64;
                    first += n;
                    if first < pages {
                        b.runs.push(Run {
                            region: 0,
                            first_page: first,
                            npages: 1,
                            kind: RunKind::Zero,
                        });
                        first += 1;
                    }
                }
                slane.send(&b)?;
            }
            slane.wait_acked(seq, Duration::from_secs(30))?;
            slane.close();
            Ok(())
        })();
        if r.is_err() {
            drop(slane);
        }
        let d = d.join().unwrap();
        if r.is_ok() {
            assert!(d.is_ok(), "destination lane ends cleanly: {d:?}");
        }
        (r, d, *sink.landed.lock().unwrap())
    })
}

fn fill(len: usize) -> Vec<u8> {
    let mut x = 0x9e3779b97f4a7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn expected(src: &[u8]) -> Vec<u8> {
    let mut e = src.to_vec();
    for (i, p) in e.chunks_mut(PAGE).enumerate() {
        if i % 9 == 8 {
            p.fill(0);
        }
    }
    e
}

#[test]
#[ignore = "needs an RDMA device: tests/vm/rdma.sh"]
fn pin_all_lane_moves_every_byte() {
    let mut src = fill(8 << 20);
    let mut dst = vec![0xffu8; 8 << 20];
    run(
        &mut src,
        &mut dst,
        Registration::PinAll,
        Registration::PinAll,
        FaultPlan::default(),
    )
    .unwrap();
    assert!(dst == expected(&src), "destination differs from source");
}

#[test]
#[ignore = "needs an RDMA device: tests/vm/rdma.sh"]
fn chunked_lane_with_a_small_cache_moves_every_byte() {
    let mut src = fill(4 << 20);
    let mut dst = vec![0xffu8; 4 << 20];
    let c = Registration::Chunked {
        chunk_bytes: 64 << 10,
        max_chunks: 4,
    };
    run(&mut src, &mut dst, c, c, FaultPlan::default()).unwrap();
    assert!(dst == expected(&src), "destination differs from source");
}

/// One lane with `fault` injected after 1 MiB: its error.
fn faulty(fault: FaultPlan) -> LaneError {
    let mut src = fill(2 << 20);
    let mut dst = vec![0u8; 2 << 20];
    let pin = Registration::PinAll;
    run(&mut src, &mut dst, pin, pin, fault).unwrap_err()
}

#[test]
#[ignore = "needs an RDMA device: tests/vm/rdma.sh"]
fn wrong_rkey_fails_the_lane_with_a_remote_access_error() {
    let e = faulty(FaultPlan {
        bad_rkey_after_bytes: Some(1 << 20),
        ..Default::default()
    });
    assert!(e.to_string().contains("remote access error"), "{e}");
}

#[test]
#[ignore = "needs an RDMA device: tests/vm/rdma.sh"]
fn queue_pair_forced_into_error_fails_the_lane() {
    let mut src = fill(2 << 20);
    let mut dst = vec![0u8; 2 << 20];
    let pin = Registration::PinAll;
    let plan = FaultPlan {
        fail_after_bytes: Some(1 << 20),
        ..Default::default()
    };
    let (s, d, landed) = run_both(&mut src, &mut dst, pin, pin, plan);
    let e = s.unwrap_err();
    // Observed as a real failure is: a completion the device flushed, with its status
    // (IBV_WC_WR_FLUSH_ERR is 5), not an error the injection made up.
    assert!(matches!(e, LaneError::Rdma(_)), "{e}");
    assert!(
        e.to_string().contains("(status 5)"),
        "a flushed completion: {e}"
    );
    // The destination's lane does not end cleanly: the source died without a close.
    assert!(d.is_err(), "the destination lane must fail: {d:?}");
    // Of 2 MiB, the first MiB and at most half of the torn batch landed; the last page never.
    let pages = (src.len() / PAGE) as u64;
    assert!(landed < pages * 8 / 9, "{landed} of {pages} pages landed");
    assert!(dst[dst.len() - PAGE..].iter().all(|&b| b == 0));
}

#[test]
fn without_a_device_opening_says_why() {
    // 192.0.2.1 (TEST-NET-1) is on no device anywhere.
    let e = RdmaDevice::open(None, "192.0.2.1".parse().unwrap()).unwrap_err();
    assert!(e.to_string().starts_with("no RDMA device"), "{e}");
}
