//! Lanes that arrive while a session runs: hostile joins during a live migration are refused
//! and counted while the migration completes, and one page is never written by two lanes at
//! once (issue 17, fallback lanes admitted mid-session; issue 12 item 6, fenced lanes).
//!
//! The destination's door stays open for the whole session (fallback lanes may join late),
//! so everything that reaches it meanwhile must be judged without disturbing the lanes that
//! carry the migration.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rmig_engine::control::handshake::{self, Agreed, SourceOffer};
use rmig_engine::protocol::{codec, Message, TransportKind, PROTOCOL_MAX, PROTOCOL_MIN};
use rmig_engine::{DestListener, EngineError, Monitor, NullDest, SharedDirtyLog};
use rmig_tests::capture::{lane_join, refusal, send_and_read, Capture};
use rmig_tests::{assert_same, key, Deadline, Mem, Setup, Writer};

const MIB: usize = 1 << 20;

/// A second source that holds the key and completes its own handshake while a migration
/// runs: returns what it was told.
fn second_source(addr: SocketAddr, regions: Vec<rmig_engine::RegionDesc>) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let offer = SourceOffer {
        versions: (PROTOCOL_MIN, PROTOCOL_MAX),
        key: key(),
        regions,
        transports: vec![TransportKind::Tcp],
        lanes: 1,
        verify: rmig_engine::VerifyMode::Received,
    };
    rt.block_on(async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        match handshake::source(&mut s, &offer, Duration::from_secs(5)).await {
            Err(e) => e.to_string(),
            Ok(_) => match codec::read_async(&mut s).await {
                Ok(Some(Message::Error { message })) => message,
                other => format!("not refused: {other:?}"),
            },
        }
    })
}

/// Lane 0's and lane 1's `LaneJoin`s as the source sent them, and the session id.
fn captured_joins(cap: &Capture) -> (Vec<u8>, [u8; 16], [u8; 32]) {
    let joins = cap.lane_joins(2);
    assert_eq!(
        joins.len(),
        2,
        "the source's two lanes joined through the relay"
    );
    match &joins[0] {
        (raw, Message::LaneJoin { session, mac, .. }) => (raw.clone(), *session, *mac),
        _ => unreachable!("filtered to LaneJoin"),
    }
}

#[test]
fn hostile_joins_during_a_live_migration_are_refused_and_it_completes() {
    let _deadline = Deadline::secs(120);
    let len = 32 * MIB;
    let src = Mem::random(len, 0.1, 41);
    let dst = Mem::new(len);
    let log = SharedDirtyLog::new(&[(len / 4096) as u64]);
    let mut w = Writer::start(&src, log.clone(), 64, 5);
    let mut setup = Setup::new(&src, &dst, len);
    setup.dirty = Box::new(log);
    setup.embedder = w.embedder(b"devices".to_vec());
    setup.src.policy.downtime_limit = Duration::from_millis(50);
    // 32 MiB at 16 MB/s: the session runs for about two seconds while the hostile peers act.
    setup.src.max_bandwidth = 16_000_000;
    let regions: Vec<_> = setup.src_regions.iter().map(|r| r.desc()).collect();
    let dm = setup.dst_monitor.clone();
    let (d, port) = setup.spawn_dest("127.0.0.1:0").unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let cap = Capture::start(addr);
    setup.src.dest = cap.addr().to_string();
    let s = setup.spawn_source();
    let (replay, session, mac) = captured_joins(&cap);
    let before = dm.stats().connections_refused;

    let mut wrong = mac;
    wrong[0] ^= 1;
    let why = refusal(&send_and_read(addr, &lane_join(session, 0, wrong)));
    assert!(why.contains("could not prove"), "wrong MAC: {why}");
    let why = refusal(&send_and_read(addr, &lane_join(session, 40, mac)));
    assert!(
        why.contains("could not prove"),
        "lane beyond the slots: {why}"
    );
    let why = refusal(&send_and_read(addr, &replay));
    assert!(
        why.contains("lane 0 is not expected"),
        "replayed join: {why}"
    );
    send_and_read(addr, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    let idle = TcpStream::connect(addr).unwrap();
    let why = second_source(addr, regions);
    assert!(why.contains("already in progress"), "second source: {why}");
    assert!(
        !s.is_finished(),
        "the hostile peers acted while the migration ran"
    );

    let stats = s.join().unwrap().expect("the source migrates");
    w.stop();
    drop(idle);
    assert_eq!(stats.verified, Some(true));
    d.join().unwrap().expect("the destination completes");
    assert_same(src.bytes(), dst.bytes());
    let refused = dm.stats().connections_refused - before;
    assert!(refused >= 5, "each refusal is counted: {refused}");
}

/// A destination for 4 MiB and a genuine (raw) source past the handshake, two lanes agreed.
struct Raw {
    addr: SocketAddr,
    dest: JoinHandle<Result<rmig_engine::DestOutcome, EngineError>>,
    ctl: tokio::net::TcpStream,
    agreed: Agreed,
    mem: Mem,
    rt: tokio::runtime::Runtime,
    monitor: Arc<Monitor>,
}

/// Starts the destination of a [`Raw`] session and passes its handshake.
fn authenticated_two_lanes() -> Raw {
    let dst = Mem::new(4 * MIB);
    let setup = Setup::new(&dst, &dst, 4 * MIB);
    let l = DestListener::bind("127.0.0.1:0", setup.dst.clone()).unwrap();
    let addr = l.local_addr().unwrap();
    let regions = setup.dst_regions.clone();
    let offer = SourceOffer {
        versions: (PROTOCOL_MIN, PROTOCOL_MAX),
        key: key(),
        regions: setup.src_regions.iter().map(|r| r.desc()).collect(),
        transports: vec![TransportKind::Tcp],
        lanes: 2,
        verify: rmig_engine::VerifyMode::Received,
    };
    drop(setup);
    let dm = Monitor::new();
    let m = dm.clone();
    let d = std::thread::spawn(move || l.serve(regions, Box::new(NullDest::default()), m));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (ctl, agreed) = rt.block_on(async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let a = handshake::source(&mut s, &offer, Duration::from_secs(2))
            .await
            .unwrap();
        (s, a)
    });
    Raw {
        addr,
        dest: d,
        ctl,
        agreed,
        mem: dst,
        rt,
        monitor: dm,
    }
}

/// Joins `lane` of an authenticated session with a valid proof, as its source would.
fn join(addr: SocketAddr, agreed: &Agreed, lane: u16) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    let m = lane_join(agreed.auth.session_id(), lane, agreed.auth.lane_proof(lane));
    s.write_all(&m).unwrap();
    assert_eq!(codec::read_sync(&mut s).unwrap(), Message::LaneAccepted);
    s
}

/// The header of a data run of `count` pages from `first`, in region 0.
fn run_header(first: u64, count: u64) -> Vec<u8> {
    rmig_transport::tcp::wire::Header {
        kind: rmig_transport::tcp::wire::KIND_DATA,
        region: 0,
        first_page: first,
        count,
    }
    .encode()
    .to_vec()
}

/// Waits up to `within` for `done`, polling.
fn eventually(within: Duration, done: impl Fn() -> bool) -> bool {
    let until = Instant::now() + within;
    while !done() {
        if Instant::now() > until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

#[test]
fn one_page_sent_on_two_lanes_at_once_is_written_by_one_of_them() {
    let _deadline = Deadline::secs(60);
    // Two authenticated lanes of one session, a round open. Lane 0 starts a run of pages
    // 8..12 and stops halfway through its bytes, so the run is still being written; lane 1
    // then sends the same pages in full. Lane 1 must be refused before a byte of it lands,
    // and lane 0's run must land whole.
    let Raw {
        addr,
        dest: d,
        mut ctl,
        agreed,
        mem: dst,
        rt,
        monitor: dm,
    } = authenticated_two_lanes();
    let mut a = join(addr, &agreed, 0);
    let mut b = join(addr, &agreed, 1);
    let start = Message::RoundStart {
        round: 0,
        last: false,
    };
    rt.block_on(codec::write_async(&mut ctl, &start)).unwrap();
    let (first, pages, page) = (8u64, 4u64, 4096usize);
    let run = pages as usize * page;
    a.write_all(&run_header(first, pages)).unwrap();
    a.write_all(&vec![0xAA; run / 2]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    b.write_all(&run_header(first, pages)).unwrap();
    b.write_all(&vec![0xBB; run]).unwrap();
    let failed = || dm.stats().lanes_failed == 1;
    assert!(
        eventually(Duration::from_secs(5), failed),
        "lane 1 is refused"
    );

    a.write_all(&vec![0xAA; run - run / 2]).unwrap();
    // A batch end after the run: its acknowledgement says lane 0's run has landed.
    let mut end = run_header(0, 1);
    end[0] = rmig_transport::tcp::wire::KIND_BATCH_END;
    a.write_all(&end).unwrap();
    a.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut ack = [0u8; rmig_transport::tcp::wire::ACK_LEN];
    a.read_exact(&mut ack).expect("lane 0 carries on");
    assert_eq!(rmig_transport::tcp::wire::decode_ack(&ack), Ok(1));
    assert_eq!(dm.stats().lanes_failed, 1, "lane 0 still runs");

    let at = first as usize * page;
    let bytes = dst.bytes();
    assert!(
        bytes[at..at + run].iter().all(|&x| x == 0xAA),
        "the pages hold lane 0's bytes alone"
    );
    assert!(
        bytes[..at]
            .iter()
            .chain(&bytes[at + run..])
            .all(|&x| x == 0),
        "nothing else lands"
    );
    drop((a, b, ctl));
    assert!(d.join().unwrap().is_err(), "the raw source never finishes");
}

#[test]
fn a_lane_refused_for_a_page_another_lane_writes_is_closed() {
    let _deadline = Deadline::secs(60);
    let Raw {
        addr,
        dest,
        mut ctl,
        agreed,
        rt,
        monitor,
        ..
    } = authenticated_two_lanes();
    let mut a = join(addr, &agreed, 0);
    let mut b = join(addr, &agreed, 1);
    let start = Message::RoundStart {
        round: 0,
        last: false,
    };
    rt.block_on(codec::write_async(&mut ctl, &start)).unwrap();
    a.write_all(&run_header(8, 4)).unwrap();
    a.write_all(&[0xAA; 4096]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    b.write_all(&run_header(8, 4)).unwrap();
    let failed = || monitor.stats().lanes_failed == 1;
    assert!(
        eventually(Duration::from_secs(5), failed),
        "lane 1 is refused"
    );
    // The control connection stays alive well past this wait (its peer timeout is 5 s).
    b.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut rest = Vec::new();
    let ended = b.read_to_end(&mut rest);
    assert!(ended.is_ok(), "the refused lane is closed: {ended:?}");
    drop((a, b, ctl));
    assert!(
        dest.join().unwrap().is_err(),
        "the raw source never finishes"
    );
}
