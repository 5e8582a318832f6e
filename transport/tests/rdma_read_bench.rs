//! Figures of post-copy's RDMA READs, not a pass/fail test: the latency of one 4 KiB read on
//! the fault path (p50/p99/max) and the throughput of pipelined 64 KiB reads. Run by
//! `tests/vm/rdma-read-bench.sh` next to perftest's `ib_read_lat`/`ib_read_bw` on the same
//! device (not by `tests/vm/rdma.sh`, since it only measures). `READS` (default 2000) sets how
//! many 4 KiB reads are timed, `MIB` (default 128) how much memory the 64 KiB reads pull,
//! `SPIN_US` (default 2000) the spin of the second latency run (the first uses the default).

use std::net::{IpAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rmig_transport::rdma::{serve_reader, ExposedMemory, RdmaDevice, RdmaPageReader, ReaderConfig};
use rmig_transport::{MemRegion, MemoryMap};

const PAGE: usize = 4096;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1e6
}

/// Times `reads` single-page reads of random pages (after 100 untimed ones) and prints
/// p50/p99/max.
fn latency(reader: &mut RdmaPageReader, buf: &[u8], reads: usize, spin: Duration) {
    let pages = (buf.len() / PAGE) as u64;
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut lat = Vec::with_capacity(reads);
    for i in 0..reads + 100 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let page = x % pages;
        let t = Instant::now();
        let got = reader.read(0, page, 1).unwrap();
        let took = t.elapsed();
        assert!(got == &buf[page as usize * PAGE..][..PAGE]);
        if i >= 100 {
            lat.push(took);
        }
    }
    lat.sort();
    println!(
        "\nrmig read 4KiB x{reads}: p50 {:.1} us  p99 {:.1} us  max {:.1} us  (depth {}, spin {:?})",
        pct(&lat, 0.50),
        pct(&lat, 0.99),
        pct(&lat, 1.0),
        reader.depth(),
        spin
    );
}

#[test]
#[ignore = "needs an RDMA device: tests/vm/rdma-read-bench.sh"]
fn rdma_read_latency_and_throughput() {
    let ip: IpAddr = std::env::var("RMIG_RDMA_IP")
        .expect("RMIG_RDMA_IP")
        .parse()
        .unwrap();
    let reads = env_or("READS", 2000);
    let mib = env_or("MIB", 128);
    let mut buf: Vec<u8> = (0..mib << 20).map(|i| (i * 31 + i / PAGE) as u8).collect();
    // SAFETY: `buf` outlives the exposure and is not written after it is filled.
    let map = MemoryMap::new(vec![unsafe {
        MemRegion::new(buf.as_mut_ptr(), buf.len(), PAGE)
    }]);
    let dev_s = Arc::new(RdmaDevice::open(None, ip).unwrap());
    let dev_d = Arc::new(RdmaDevice::open(None, ip).unwrap());
    let mem = ExposedMemory::register(&dev_s, &map).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (b, _) = l.accept().unwrap();
    let cfg = ReaderConfig::default();
    let wait = Duration::from_secs(30);
    let (exp, mut reader) = std::thread::scope(|s| {
        let m = mem.clone();
        let e = s.spawn(move || serve_reader(&b, None, &m, wait).unwrap());
        let r = RdmaPageReader::connect(&a, None, &dev_d, cfg, wait).unwrap();
        (e.join().unwrap(), r)
    });
    let pages = (buf.len() / PAGE) as u64;
    latency(&mut reader, &buf, reads, cfg.spin);
    // Spinning for the whole READ, as ib_read_lat does (it never sleeps on an event).
    let spin = Duration::from_micros(env_or("SPIN_US", 2000) as u64);
    reader.set_spin(spin);
    latency(&mut reader, &buf, reads, spin);
    reader.set_spin(cfg.spin);
    // Pipelined 64 KiB reads: every slot in flight, reposted as soon as it lands.
    let per = (cfg.slot_bytes / PAGE) as u32;
    let runs = pages / per as u64;
    let t = Instant::now();
    let mut next = 0u64;
    for slot in 0..cfg.slots.min(runs as usize) {
        reader.post(slot, 0, next * per as u64, per).unwrap();
        next += 1;
    }
    let mut landed = 0u64;
    while landed < runs {
        for slot in reader.wait(Duration::from_secs(10)).unwrap() {
            landed += 1;
            if next < runs {
                reader.post(slot, 0, next * per as u64, per).unwrap();
                next += 1;
            }
        }
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "rmig read 64KiB x{runs} ({} in flight): {:.1} MB/s over {:.2} s",
        cfg.slots,
        (runs * cfg.slot_bytes as u64) as f64 / secs / 1e6,
        secs
    );
    assert_eq!(exp.source_completions(), 0);
}
