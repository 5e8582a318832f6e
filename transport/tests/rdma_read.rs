//! Post-copy's RDMA READs on a real device: a source exposes pattern-filled memory and a reader
//! fetches pages from it (soft-RoCE in CI: `tests/vm/rdma.sh` runs these with `--ignored`
//! where an rxe device is up and `RMIG_RDMA_IP` names its address). Without a device they are
//! skipped, with that reason; the frames' golden bytes are checked on every host
//! (`read_wire_golden.rs`).

use std::io::Write;
use std::net::{IpAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rmig_transport::rdma::read_wire::ExposedRegion;
use rmig_transport::rdma::{
    serve_reader, ExposedMemory, RdmaDevice, RdmaPageReader, ReadError, ReadExposure, ReaderConfig,
};
use rmig_transport::{MemRegion, MemoryMap};

const PAGE: usize = 4096;
/// `IBV_WC_REM_ACCESS_ERR`.
const REMOTE_ACCESS_ERROR: u32 = 10;
/// `IBV_WC_RETRY_EXC_ERR`.
const RETRY_EXCEEDED: u32 = 12;

fn rdma_ip() -> IpAddr {
    std::env::var("RMIG_RDMA_IP")
        .expect("RMIG_RDMA_IP must name the address of an RDMA device (tests/vm/rdma.sh sets it)")
        .parse()
        .expect("an IP address")
}

fn device() -> Arc<RdmaDevice> {
    Arc::new(RdmaDevice::open(None, rdma_ip()).expect("an RDMA device for RMIG_RDMA_IP"))
}

/// Byte `i` of region `r` of the source: different in every page and every region.
fn pattern(r: usize, i: usize) -> u8 {
    let x = (i as u64 ^ ((r as u64) << 40)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (x >> 56) as u8 ^ (i / PAGE) as u8
}

/// Source memory: regions of `sizes` bytes filled with [`pattern`].
struct Source {
    bufs: Vec<Vec<u8>>,
}

impl Source {
    fn new(sizes: &[usize]) -> Source {
        let bufs = sizes
            .iter()
            .enumerate()
            .map(|(r, &n)| (0..n).map(|i| pattern(r, i)).collect())
            .collect();
        Source { bufs }
    }

    fn map(&mut self) -> MemoryMap {
        MemoryMap::new(
            self.bufs
                .iter_mut()
                // SAFETY: the buffers outlive the exposure in every test, and nothing writes
                // them after they are filled.
                .map(|b| unsafe { MemRegion::new(b.as_mut_ptr(), b.len(), PAGE) })
                .collect(),
        )
    }

    fn pages(&self, r: usize, first: u64, n: u32) -> &[u8] {
        let o = first as usize * PAGE;
        &self.bufs[r][o..o + n as usize * PAGE]
    }
}

/// A connected TCP pair on loopback (the lane socket the engine would have authenticated).
fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (b, _) = l.accept().unwrap();
    (a, b)
}

/// Exposes `map` and connects a reader with `cfg` to it.
fn connect(
    map: &MemoryMap,
    cfg: ReaderConfig,
) -> (Arc<ExposedMemory>, ReadExposure, RdmaPageReader) {
    let dev_s = device();
    let dev_d = device();
    let mem = ExposedMemory::register(&dev_s, map).expect("register the source for remote read");
    let (src_sock, dst_sock) = pair();
    let wait = Duration::from_secs(30);
    let (exp, reader) = std::thread::scope(|s| {
        let m = mem.clone();
        let e = s.spawn(move || serve_reader(&src_sock, None, &m, wait));
        let r = RdmaPageReader::connect(&dst_sock, None, &dev_d, cfg, wait);
        (e.join().unwrap(), r)
    });
    (mem, exp.expect("exposure"), reader.expect("reader"))
}

/// A small xorshift generator: the tests are repeatable.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
#[ignore = "needs an RDMA device: tests/vm/rdma.sh"]
fn random_pages_and_runs_read_equal_the_source() {
    let mut src = Source::new(&[4 << 20, 1 << 20]);
    let map = src.map();
    let (mem, exp, mut reader) = connect(&map, ReaderConfig::default());
    let want: Vec<ExposedRegion> = mem.regions().to_vec();
    assert_eq!(reader.regions(), &want[..]);
    assert_eq!(want[1].len, 1 << 20);
    let mut rng = Rng(0x5eed);
    for i in 0..400 {
        let r = rng.below(2) as usize;
        let pages = (src.bufs[r].len() / PAGE) as u64;
        let n = if i % 4 == 0 {
            1 + rng.below(16) as u32
        } else {
            1
        };
        let first = rng.below(pages - n as u64 + 1);
        let got = reader.read(r as u32, first, n).expect("read");
        assert!(
            got == src.pages(r, first, n),
            "region {r} pages {first}+{n} differ from the source"
        );
    }
    // The last page of each region, and a whole slot.
    for (r, b) in src.bufs.iter().enumerate() {
        let last = (b.len() / PAGE - 1) as u64;
        assert!(reader.read(r as u32, last, 1).unwrap() == src.pages(r, last, 1));
    }
    assert!(reader.read(0, 0, 16).unwrap() == src.pages(0, 0, 16));
    assert_eq!(reader.posted(), 403);
    assert_eq!(
        exp.source_completions(),
        0,
        "the source did nothing for a read"
    );
}

#[test]
#[ignore = "needs an RDMA device: tests/vm/rdma.sh"]
fn many_reads_in_flight_land_intact_beside_the_fault_path() {
    let mut src = Source::new(&[8 << 20]);
    let map = src.map();
    let cfg = ReaderConfig::default();
    let per_slot = (cfg.slot_bytes / PAGE) as u32;
    let (_mem, exp, mut reader) = connect(&map, cfg);
    let runs = (src.bufs[0].len() / PAGE) as u64 / per_slot as u64;
    // Each slot's request; every run of the region is read twice, in two passes.
    let mut asked = vec![0u64; cfg.slots];
    let mut next = 0u64;
    for (slot, a) in asked.iter_mut().enumerate() {
        reader
            .post(slot, 0, next * per_slot as u64, per_slot)
            .unwrap();
        *a = next;
        next += 1;
    }
    assert_eq!(
        reader.posted(),
        cfg.slots as u64,
        "all slots in flight at once"
    );
    let (mut landed, mut faults) = (0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(120);
    while landed < 2 * runs {
        assert!(
            Instant::now() < deadline,
            "{landed} of {} runs landed",
            2 * runs
        );
        let done = reader.wait(Duration::from_secs(1)).expect("wait");
        for slot in done {
            let run = asked[slot] % runs;
            let first = run * per_slot as u64;
            assert!(
                reader.bytes(slot).unwrap() == src.pages(0, first, per_slot),
                "slot {slot} (run {run}) differs from the source"
            );
            landed += 1;
            if next < 2 * runs {
                reader
                    .post(slot, 0, (next % runs) * per_slot as u64, per_slot)
                    .unwrap();
                asked[slot] = next;
                next += 1;
            }
        }
        // A fault while background READs are in flight: served from its own slot.
        let page = (landed * 7919) % (src.bufs[0].len() / PAGE) as u64;
        assert!(reader.read(0, page, 1).unwrap() == src.pages(0, page, 1));
        faults += 1;
    }
    assert_eq!(reader.posted(), 2 * runs + faults);
    assert!(reader.poll().unwrap().is_empty(), "nothing left in flight");
    assert_eq!(
        exp.source_completions(),
        0,
        "the source did nothing for a read"
    );
}

#[test]
#[ignore = "needs an RDMA device: tests/vm/rdma.sh"]
fn out_of_range_requests_are_refused_before_posting() {
    let mut src = Source::new(&[64 * PAGE]);
    let map = src.map();
    let cfg = ReaderConfig {
        slots: 4,
        slot_bytes: 8 * PAGE,
        ..Default::default()
    };
    let (_mem, _exp, mut reader) = connect(&map, cfg);
    let out_of_range = |e: ReadError| assert!(matches!(e, ReadError::OutOfRange { .. }), "{e}");
    out_of_range(reader.read(1, 0, 1).unwrap_err());
    out_of_range(reader.read(0, 64, 1).unwrap_err());
    out_of_range(reader.read(0, 60, 5).unwrap_err());
    out_of_range(reader.read(0, u64::MAX, 2).unwrap_err());
    out_of_range(reader.read(0, 0, 0).unwrap_err());
    out_of_range(reader.read(0, 0, 9).unwrap_err());
    out_of_range(reader.post(0, 0, 63, 2).unwrap_err());
    let slot = |e: ReadError| assert!(matches!(e, ReadError::Slot { .. }), "{e}");
    slot(reader.post(4, 0, 0, 1).unwrap_err());
    assert_eq!(reader.posted(), 0, "nothing refused was posted");
    // A slot in flight cannot be posted again.
    reader.post(0, 0, 56, 8).unwrap();
    slot(reader.post(0, 0, 0, 1).unwrap_err());
    assert_eq!(reader.posted(), 1);
    assert_eq!(reader.wait(Duration::from_secs(30)).unwrap(), vec![0]);
    assert!(reader.bytes(0).unwrap() == src.pages(0, 56, 8));
    assert!(
        reader.bytes(1).is_none(),
        "a slot never posted has no bytes"
    );
    // The queue pair is intact: an invalid READ posted would have broken it.
    assert!(reader.read(0, 63, 1).unwrap() == src.pages(0, 63, 1));
}

#[test]
#[ignore = "needs an RDMA device: tests/vm/rdma.sh"]
fn a_reader_whose_source_exposure_is_gone_gets_an_error_completion_in_time() {
    let mut src = Source::new(&[16 * PAGE]);
    let map = src.map();
    let cfg = ReaderConfig {
        timeout: Duration::from_secs(60),
        ..Default::default()
    };
    let (mem, exp, mut reader) = connect(&map, cfg);
    assert!(reader.read(0, 3, 1).unwrap() == src.pages(0, 3, 1));
    // The source discards its copy: queue pair destroyed, registration dropped.
    drop(exp);
    drop(mem);
    let t0 = Instant::now();
    let e = reader.read(0, 4, 1).unwrap_err();
    let took = t0.elapsed();
    eprintln!("read after the exposure was dropped: {e} after {took:?}");
    assert!(took < cfg.timeout, "an error completion, not the deadline");
    assert!(
        matches!(e, ReadError::Completion { status, .. } if status == RETRY_EXCEEDED || status == REMOTE_ACCESS_ERROR),
        "{e}"
    );
    // Broken for good, and says why.
    let again = reader.read(0, 3, 1).unwrap_err();
    assert!(
        matches!(again, ReadError::Broken(ref why) if why == &e.to_string()),
        "{again}"
    );
    assert!(matches!(reader.post(0, 0, 0, 1), Err(ReadError::Broken(_))));
}

#[test]
#[ignore = "needs an RDMA device: tests/vm/rdma.sh"]
fn a_wrong_remote_key_fails_with_a_remote_access_error() {
    let mut src = Source::new(&[16 * PAGE]);
    let map = src.map();
    let (_mem, _exp, mut reader) = connect(&map, ReaderConfig::default());
    reader.post(2, 0, 0, 1).unwrap();
    assert_eq!(reader.wait(Duration::from_secs(30)).unwrap(), vec![2]);
    reader.corrupt_remote_keys();
    reader.post(1, 0, 0, 1).unwrap();
    let e = reader.wait(Duration::from_secs(30)).unwrap_err();
    assert_eq!(e.status(), Some(REMOTE_ACCESS_ERROR), "{e}");
    assert!(e.to_string().contains("slot 1"), "{e}");
    assert!(
        reader.bytes(1).is_none(),
        "a failed READ's bytes are never handed out"
    );
    // What landed before the failure stays readable.
    assert!(reader.bytes(2).unwrap() == src.pages(0, 0, 1));
}

#[test]
#[ignore = "needs an RDMA device: tests/vm/rdma.sh"]
fn a_refusal_reaches_the_reader_with_its_reason_and_a_stranger_is_refused() {
    use rmig_transport::rdma::ReadSetup;
    let dev = device();
    // A source that refuses (as serve_reader does when its queue pair cannot be made).
    let (src_sock, dst_sock) = pair();
    let fake = std::thread::spawn(move || {
        let mut len = [0u8; 4];
        std::io::Read::read_exact(&mut &src_sock, &mut len).unwrap();
        let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
        std::io::Read::read_exact(&mut &src_sock, &mut body).unwrap();
        assert!(matches!(
            ReadSetup::decode(&body),
            Ok(ReadSetup::Connect(..))
        ));
        let b = ReadSetup::Refuse("out of queue pairs".into()).encode();
        let mut f = (b.len() as u32).to_le_bytes().to_vec();
        f.extend_from_slice(&b);
        (&src_sock).write_all(&f).unwrap();
    });
    let e = RdmaPageReader::connect(
        &dst_sock,
        None,
        &dev,
        ReaderConfig::default(),
        Duration::from_secs(30),
    )
    .unwrap_err();
    fake.join().unwrap();
    assert!(e.to_string().contains("source: out of queue pairs"), "{e}");
    // A peer that sends the lane connector's CONNECT (kind 1) is refused, and told so.
    let mut src = Source::new(&[4 * PAGE]);
    let mem = ExposedMemory::register(&dev, &src.map()).unwrap();
    let (src_sock, dst_sock) = pair();
    (&dst_sock).write_all(&[1, 0, 0, 0, 1]).unwrap();
    let e = serve_reader(&src_sock, None, &mem, Duration::from_secs(10)).unwrap_err();
    assert!(e.to_string().contains("unknown kind"), "{e}");
    let mut len = [0u8; 4];
    std::io::Read::read_exact(&mut &dst_sock, &mut len).unwrap();
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    std::io::Read::read_exact(&mut &dst_sock, &mut body).unwrap();
    let told = ReadSetup::decode(&body).unwrap();
    assert!(
        matches!(told, ReadSetup::Refuse(ref why) if why.contains("unknown kind")),
        "{told:?}"
    );
    // Silence is bounded too.
    let (src_sock, _dst_sock) = pair();
    let t0 = Instant::now();
    let e = serve_reader(&src_sock, None, &mem, Duration::from_millis(300)).unwrap_err();
    assert!(e.to_string().contains("in time"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(5));
}
