//! Properties of the lane wire formats and of a TCP destination lane fed generated streams.
//!
//! - RDMA requests and replies round-trip for any field values, and decoding any bytes never
//!   panics.
//! - TCP run headers and acknowledgements round-trip, and decoding any bytes never panics.
//! - A TCP destination lane fed a valid stream lands exactly what a simple model says (data
//!   in memory, zero runs and batch ends to the sink, one acknowledgement per batch end); fed
//!   a damaged stream it never panics, never writes outside the runs it admitted (`claim`),
//!   and every run it hands on lies inside its region.
//!
//! The case count comes from `PROPTEST_CASES` (256 by default); `scripts/fuzz.sh` runs
//! many more.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::Duration;

use proptest::prelude::*;
use rmig_transport::rdma::wire::{self as rdma, Reply, Request, MAX_DESC_RUNS, SLOT_BYTES};
use rmig_transport::tcp::wire::{self as tcp, Header, ACK_LEN, HEADER_LEN};
use rmig_transport::tcp::TcpDestLane;
use rmig_transport::{MemRegion, MemoryMap, PageSink, Run, RunKind};

fn run_kind() -> impl Strategy<Value = RunKind> {
    prop_oneof![Just(RunKind::Data), Just(RunKind::Zero)]
}

fn run() -> impl Strategy<Value = Run> {
    (
        any::<u32>(),
        any::<u64>(),
        prop_oneof![1u32..1024, any::<u32>(), rdma::MAX_ENTRY_PAGES..=u32::MAX],
        run_kind(),
    )
        .prop_map(|(region, first_page, npages, kind)| Run {
            region,
            first_page,
            npages,
            kind,
        })
}

/// Runs that fit one descriptor, sometimes exactly.
fn runs() -> impl Strategy<Value = Vec<Run>> {
    prop_oneof![
        proptest::collection::vec(run(), 0..16),
        proptest::collection::vec(run(), MAX_DESC_RUNS / 2..=MAX_DESC_RUNS / 2 + 2),
    ]
    .prop_filter("fits one descriptor", |r| rdma::entries(r) <= MAX_DESC_RUNS)
}

/// The runs a descriptor of `runs` decodes to: the pages of each run in the same order and
/// kind, in entries of at most `MAX_ENTRY_PAGES`.
fn as_entries(runs: &[Run]) -> Vec<Run> {
    let mut out = Vec::new();
    for r in runs {
        let (mut first, mut left) = (r.first_page, r.npages);
        loop {
            let take = left.min(rdma::MAX_ENTRY_PAGES);
            out.push(Run {
                first_page: first,
                npages: take,
                ..*r
            });
            first = first.wrapping_add(take as u64);
            left -= take;
            if left == 0 {
                break;
            }
        }
    }
    out
}

fn reply() -> impl Strategy<Value = Reply> {
    prop_oneof![
        any::<u64>().prop_map(Reply::Ack),
        (any::<u64>(), any::<u32>()).prop_map(|(addr, rkey)| Reply::Key { addr, rkey }),
        any::<u32>().prop_map(Reply::Refused),
    ]
}

proptest! {
    #[test]
    fn rdma_batches_round_trip(seq in any::<u64>(), runs in runs()) {
        let mut buf = vec![0u8; SLOT_BYTES];
        let n = rdma::encode_batch(&mut buf, seq, &runs);
        prop_assert_eq!(
            rdma::decode_request(&buf[..n]),
            Ok(Request::Batch { seq, runs: as_entries(&runs) })
        );
    }

    #[test]
    fn rdma_registrations_and_replies_round_trip(
        region in prop_oneof![any::<u32>(), Just(u32::MAX)],
        chunk in any::<u64>(),
        evict in proptest::option::of((prop_oneof![any::<u32>(), Just(u32::MAX)], any::<u64>())),
        r in reply(),
    ) {
        let mut buf = vec![0u8; SLOT_BYTES];
        let n = rdma::encode_register(&mut buf, region, chunk, evict);
        prop_assert_eq!(
            rdma::decode_request(&buf[..n]),
            Ok(Request::Register { region, chunk, evict })
        );
        prop_assert_eq!(rdma::decode_reply(&rdma::encode_reply(r)), Ok(r));
    }

    #[test]
    fn rdma_decoding_never_panics(
        b in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..64),
            proptest::collection::vec(any::<u8>(), 0..SLOT_BYTES + 16),
            // A batch head with a run count and a length that may disagree.
            (0u32..600, 0usize..SLOT_BYTES / 16).prop_map(|(n, runs)| {
                let mut b = vec![0u8; 16 + runs * 16];
                b[0] = 1;
                b[4..8].copy_from_slice(&n.to_le_bytes());
                b
            }),
        ],
        reply in any::<[u8; rdma::REPLY_LEN]>(),
    ) {
        if let Ok(Request::Batch { runs, .. }) = rdma::decode_request(&b) {
            prop_assert!(runs.len() <= MAX_DESC_RUNS);
            prop_assert_eq!(b.len(), 16 + 16 * runs.len());
        }
        let _ = rdma::decode_reply(&reply);
    }

    #[test]
    fn tcp_headers_and_acks_round_trip(
        kind in prop_oneof![Just(tcp::KIND_DATA), Just(tcp::KIND_ZERO), Just(tcp::KIND_BATCH_END), Just(tcp::KIND_CLOSE)],
        region in any::<u32>(),
        first_page in any::<u64>(),
        count in any::<u64>(),
        raw in any::<[u8; HEADER_LEN]>(),
        raw_ack in any::<[u8; ACK_LEN]>(),
    ) {
        let h = Header { kind, region, first_page, count };
        prop_assert_eq!(Header::decode(&h.encode()), Ok(h));
        prop_assert_eq!(tcp::decode_ack(&tcp::encode_ack(count)), Ok(count));
        if let Ok(h) = Header::decode(&raw) {
            prop_assert_eq!(h.encode(), raw);
        }
        if let Ok(seq) = tcp::decode_ack(&raw_ack) {
            prop_assert_eq!(tcp::encode_ack(seq), raw_ack);
        }
    }
}

// ---- A TCP destination lane against a model ----

/// Page size of the test regions.
const PAGE: usize = 4096;
/// Pages of each test region.
const REGION_PAGES: [u64; 2] = [8, 4];
/// Guard pages around each region (must never change).
const GUARD: usize = 1;
/// What memory holds before a stream lands (zero runs are the sink's business).
const FILL: u8 = 0xa5;

/// What a lane told its sink, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Claim(usize, u64, u64),
    Release(usize, u64, u64),
    Data(usize, u64, u64),
    Zero(usize, u64, u64),
}

/// A sink that records every call; it reads what lands (staged path) or not.
struct Recorder {
    events: Mutex<Vec<Event>>,
    staged: bool,
}

impl Recorder {
    fn push(&self, e: Event) {
        self.events.lock().unwrap().push(e);
    }
}

impl PageSink for Recorder {
    fn claim(&self, r: usize, first: u64, n: u64) -> Result<(), String> {
        self.push(Event::Claim(r, first, n));
        Ok(())
    }
    fn release(&self, r: usize, first: u64, n: u64) {
        self.push(Event::Release(r, first, n));
    }
    fn data_landed(&self, r: usize, first: u64, n: u64) {
        self.push(Event::Data(r, first, n));
    }
    fn data_landed_from(&self, r: usize, first: u64, n: u64, bytes: &[u8]) {
        assert_eq!(bytes.len() as u64, n * PAGE as u64);
        self.push(Event::Data(r, first, n));
    }
    fn zero_pages(&self, r: usize, first: u64, n: u64) {
        self.push(Event::Zero(r, first, n));
    }
    fn reads_landed(&self) -> bool {
        self.staged
    }
}

/// One item of a lane stream.
#[derive(Debug, Clone)]
enum Op {
    Data {
        region: usize,
        first: u64,
        count: u64,
        seed: u8,
    },
    Zero {
        region: usize,
        first: u64,
        count: u64,
    },
    End {
        seq: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let run = (0usize..2).prop_flat_map(|region| {
        let pages = REGION_PAGES[region];
        (Just(region), 0..pages)
            .prop_flat_map(move |(region, first)| (Just(region), Just(first), 1..=pages - first))
    });
    prop_oneof![
        3 => (run.clone(), any::<u8>()).prop_map(|((region, first, count), seed)| Op::Data {
            region,
            first,
            count,
            seed
        }),
        1 => run.prop_map(|(region, first, count)| Op::Zero { region, first, count }),
        1 => any::<u64>().prop_map(|seq| Op::End { seq }),
    ]
}

/// The byte at offset `i` of a data run's payload.
fn payload_byte(seed: u8, i: usize) -> u8 {
    seed.wrapping_add((i / 7) as u8) ^ (i as u8)
}

/// The bytes a source sends for `ops`, then a close.
fn stream(ops: &[Op]) -> Vec<u8> {
    let mut s = Vec::new();
    let header = |kind, region: usize, first_page, count| {
        Header {
            kind,
            region: region as u32,
            first_page,
            count,
        }
        .encode()
    };
    for op in ops {
        match *op {
            Op::Data {
                region,
                first,
                count,
                seed,
            } => {
                s.extend_from_slice(&header(tcp::KIND_DATA, region, first, count));
                s.extend((0..count as usize * PAGE).map(|i| payload_byte(seed, i)));
            }
            Op::Zero {
                region,
                first,
                count,
            } => s.extend_from_slice(&header(tcp::KIND_ZERO, region, first, count)),
            Op::End { seq } => s.extend_from_slice(&header(tcp::KIND_BATCH_END, 0, 0, seq)),
        }
    }
    s.extend_from_slice(&header(tcp::KIND_CLOSE, 0, 0, 0));
    s
}

/// Guest memory of the test: each region with guard pages around it, as 64-bit words (so the
/// buffer is aligned for the lane's streaming stores).
struct Guest {
    words: Vec<u64>,
}

impl Guest {
    fn new() -> Guest {
        let pages: usize = REGION_PAGES.iter().map(|&p| p as usize + 2 * GUARD).sum();
        Guest {
            words: vec![u64::from_ne_bytes([FILL; 8]); pages * PAGE / 8],
        }
    }

    /// Byte offset of region `r` in the buffer.
    fn offset(r: usize) -> usize {
        let before: usize = REGION_PAGES[..r]
            .iter()
            .map(|&p| p as usize + 2 * GUARD)
            .sum();
        (before + GUARD) * PAGE
    }

    fn map(&mut self) -> MemoryMap {
        let base = self.words.as_mut_ptr().cast::<u8>();
        let regions = (0..REGION_PAGES.len())
            .map(|r| {
                // SAFETY: the range lies inside `words`, which outlives the lane of each case
                // (the lane is dropped before the buffer is read or freed), and only that lane
                // writes it.
                unsafe {
                    MemRegion::new(
                        base.add(Self::offset(r)),
                        REGION_PAGES[r] as usize * PAGE,
                        PAGE,
                    )
                }
            })
            .collect();
        MemoryMap::new(regions)
    }

    fn bytes(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_ne_bytes()).collect()
    }
}

/// What a valid stream of `ops` leaves: memory, sink events (claims aside) and acks.
fn model(ops: &[Op]) -> (Vec<u8>, Vec<Event>, Vec<u64>) {
    let mut mem = Guest::new().bytes();
    let (mut events, mut acks) = (Vec::new(), Vec::new());
    for op in ops {
        match *op {
            Op::Data {
                region,
                first,
                count,
                seed,
            } => {
                let at = Guest::offset(region) + first as usize * PAGE;
                for i in 0..count as usize * PAGE {
                    mem[at + i] = payload_byte(seed, i);
                }
                events.push(Event::Data(region, first, count));
            }
            Op::Zero {
                region,
                first,
                count,
            } => events.push(Event::Zero(region, first, count)),
            Op::End { seq } => acks.push(seq),
        }
    }
    (mem, events, acks)
}

thread_local! {
    /// One loopback listener per test thread (tests run in parallel).
    static LISTENER: TcpListener = TcpListener::bind("127.0.0.1:0").expect("bind");
}

/// Feeds `bytes` to a TCP destination lane over loopback; returns the lane's result, what
/// memory holds afterwards, the sink's events and the acknowledgements sent back.
fn feed(bytes: Vec<u8>, staged: bool) -> (Result<(), String>, Vec<u8>, Vec<Event>, Vec<u64>) {
    let (mut src, dst) = LISTENER.with(|l| {
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    });
    // Deadlines: nothing here may wait for ever.
    for s in [&src, &dst] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    let mut writer = src.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        // The lane may stop reading (a refused header); then the write fails, as it should.
        let _ = writer.write_all(&bytes);
        let _ = writer.shutdown(Shutdown::Write);
    });
    let mut guest = Guest::new();
    let sink = Recorder {
        events: Mutex::new(Vec::new()),
        staged,
    };
    let result = {
        let mut lane = TcpDestLane::new(dst, guest.map()).unwrap();
        lane.run(&sink).map(drop).map_err(|e| e.to_string())
    };
    sender.join().expect("sender");
    let mut back = Vec::new();
    let _ = src.read_to_end(&mut back);
    let acks = back
        .chunks_exact(ACK_LEN)
        .map(|c| tcp::decode_ack(c.try_into().unwrap()).expect("well-formed ack"))
        .collect();
    (
        result,
        guest.bytes(),
        sink.events.into_inner().unwrap(),
        acks,
    )
}

/// Ways to damage a stream.
#[derive(Debug, Clone)]
enum Damage {
    Flip {
        at: usize,
        bit: u8,
    },
    /// A 64-bit word replaced (counts, pages, regions).
    Word {
        at: usize,
        value: u64,
    },
    Truncate {
        at: usize,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Damage::Flip { at, bit }),
        (
            any::<usize>(),
            prop_oneof![any::<u64>(), 0u64..16, Just(u64::MAX)]
        )
            .prop_map(|(at, value)| Damage::Word { at, value }),
        any::<usize>().prop_map(|at| Damage::Truncate { at }),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..32)
        )
            .prop_map(|(at, bytes)| Damage::Insert { at, bytes }),
    ]
}

fn apply(s: &mut Vec<u8>, d: &Damage) {
    let len = s.len();
    match d {
        Damage::Flip { at, bit } => s[at % len] ^= 1 << bit,
        Damage::Word { at, value } => {
            // Often on a header field: headers sit at multiples of 8 in short streams.
            let at = (at % len) & !7;
            for (i, b) in value.to_le_bytes().iter().enumerate() {
                if let Some(x) = s.get_mut(at + i) {
                    *x = *b;
                }
            }
        }
        Damage::Truncate { at } => s.truncate(at % len),
        Damage::Insert { at, bytes } => {
            let at = at % (len + 1);
            s.splice(at..at, bytes.iter().copied());
        }
    }
}

/// Every page that differs from the untouched buffer lies in a run the lane claimed, and
/// every run the lane claimed or handed on lies inside its region.
fn check_contained(mem: &[u8], events: &[Event]) -> Result<(), TestCaseError> {
    let inside = |r: usize, first: u64, n: u64| {
        r < REGION_PAGES.len()
            && first
                .checked_add(n)
                .is_some_and(|end| end <= REGION_PAGES[r])
    };
    let mut claimed = Vec::new();
    for e in events {
        let (Event::Claim(r, f, n)
        | Event::Release(r, f, n)
        | Event::Data(r, f, n)
        | Event::Zero(r, f, n)) = *e;
        prop_assert!(inside(r, f, n), "{:?} outside its region", e);
        if let Event::Claim(r, f, n) = *e {
            claimed.push((Guest::offset(r) + f as usize * PAGE, n as usize * PAGE));
        }
    }
    let untouched = Guest::new().bytes();
    for (page, (now, before)) in mem.chunks(PAGE).zip(untouched.chunks(PAGE)).enumerate() {
        if now != before {
            let at = page * PAGE;
            prop_assert!(
                claimed.iter().any(|&(o, n)| o <= at && at < o + n),
                "page at byte {} written without a claim",
                at
            );
        }
    }
    Ok(())
}

proptest! {
    #[test]
    fn a_valid_tcp_stream_lands_exactly(
        ops in proptest::collection::vec(op(), 0..12),
        staged in any::<bool>(),
    ) {
        let (result, mem, events, acks) = feed(stream(&ops), staged);
        prop_assert_eq!(result, Ok(()));
        let (want_mem, want_events, want_acks) = model(&ops);
        prop_assert!(mem == want_mem, "memory differs from the model");
        let handed: Vec<Event> = events
            .iter()
            .filter(|e| matches!(e, Event::Data(..) | Event::Zero(..)))
            .cloned()
            .collect();
        prop_assert_eq!(handed, want_events);
        prop_assert_eq!(acks, want_acks);
        check_contained(&mem, &events)?;
    }

    #[test]
    fn a_damaged_tcp_stream_is_refused_or_lands_inside_its_claims(
        ops in proptest::collection::vec(op(), 1..8),
        damages in proptest::collection::vec(damage(), 1..4),
        staged in any::<bool>(),
    ) {
        let mut bytes = stream(&ops);
        for d in &damages {
            if !bytes.is_empty() {
                apply(&mut bytes, d);
            }
        }
        let (_, mem, events, _) = feed(bytes, staged);
        check_contained(&mem, &events)?;
        // Every claim is released.
        let claims = events.iter().filter(|e| matches!(e, Event::Claim(..))).count();
        let releases = events.iter().filter(|e| matches!(e, Event::Release(..))).count();
        prop_assert_eq!(claims, releases);
    }
}
