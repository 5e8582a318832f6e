//! A destination facing a hostile or broken peer: every malformed input gets a clear error and
//! a clean shutdown, and nothing lands in guest memory.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use rmig_engine::protocol::{codec, Message, PROTOCOL_MAX, PROTOCOL_MIN};
use rmig_engine::{DestListener, EngineError, Monitor, NullDest};
use rmig_tests::{against_raw_peer, error_text, key, Deadline, Mem, Setup};

const MIB: usize = 1 << 20;

#[test]
fn garbage_is_refused() {
    let _deadline = Deadline::secs(30);
    let (e, back, dst) = against_raw_peer(|s| {
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    });
    // "GET " read as a length is 542 MB: refused on the length prefix alone.
    assert!(e.to_string().contains("exceeds the maximum"), "{e}");
    assert!(!error_text(&back).is_empty(), "the peer is told why");
    assert!(dst.bytes().iter().all(|&b| b == 0));
}

/// A frame of a known type, within its size limit, whose body the decoder must refuse.
fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut f = ((body.len() + 1) as u32).to_le_bytes().to_vec();
    f.push(tag);
    f.extend_from_slice(body);
    f
}

#[test]
fn garbage_that_passes_the_frame_checks_is_refused_by_the_decoder() {
    let _deadline = Deadline::secs(30);
    // An `Error` frame (tag 21) whose text is not UTF-8, and a `RoundStart` (tag 11) whose
    // boolean is 7: both pass the length and type checks, only decoding can refuse them.
    let cases: [(Vec<u8>, &str); 2] = [
        (frame(21, &[3, 0, 0, 0, 0xff, 0xfe, 0xfd]), "invalid UTF-8"),
        (frame(11, &[0, 0, 0, 0, 7]), "bad boolean"),
    ];
    for (f, why) in cases {
        let (e, back, dst) = against_raw_peer(|s| s.write_all(&f).unwrap());
        assert!(
            matches!(e, EngineError::Protocol(ref m) if m.contains(why)),
            "{why}: {e}"
        );
        assert!(error_text(&back).contains(why), "the peer is told why");
        assert!(dst.bytes().iter().all(|&b| b == 0));
    }
}

#[test]
fn truncated_frames_are_refused() {
    let _deadline = Deadline::secs(120);
    let (e, _, _) = against_raw_peer(|s| {
        let f = codec::encode(&Message::Hello {
            min_version: PROTOCOL_MIN,
            max_version: PROTOCOL_MAX,
        });
        s.write_all(&f[..f.len() - 1]).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
    });
    assert!(e.to_string().contains("truncated"), "{e}");
}

#[test]
fn out_of_order_messages_are_refused() {
    let _deadline = Deadline::secs(120);
    let (e, back, _) = against_raw_peer(|s| {
        codec::write_sync(
            s,
            &Message::RoundStart {
                round: 0,
                last: false,
            },
        )
        .unwrap();
    });
    assert!(e.to_string().contains("expected Hello"), "{e}");
    assert!(error_text(&back).contains("expected Hello"));
}

#[test]
fn a_forged_auth_proof_is_refused() {
    let _deadline = Deadline::secs(120);
    let (e, back, _) = against_raw_peer(|s| {
        codec::write_sync(
            s,
            &Message::Hello {
                min_version: PROTOCOL_MIN,
                max_version: PROTOCOL_MAX,
            },
        )
        .unwrap();
        let m = codec::read_sync(s).unwrap();
        assert!(matches!(m, Message::HelloAck { .. }));
        codec::write_sync(
            s,
            &Message::AuthProof {
                nonce: [0; 32],
                mac: [0; 32],
            },
        )
        .unwrap();
    });
    assert!(matches!(e, EngineError::Auth(_)), "{e}");
    assert!(error_text(&back).contains("pre-shared key"));
}

/// A session past its handshake: the destination's address and serving thread, the source's
/// control connection and what it agreed, destination memory, and the runtime that drives
/// the connection.
type Authenticated = (
    std::net::SocketAddr,
    std::thread::JoinHandle<Result<rmig_engine::DestOutcome, EngineError>>,
    tokio::net::TcpStream,
    rmig_engine::control::handshake::Agreed,
    Mem,
    tokio::runtime::Runtime,
);

/// A destination for 4 MiB and a genuine source that has passed the handshake (one lane
/// agreed), for tests of what comes after.
fn authenticated() -> Authenticated {
    authenticated_with(|_| {})
}

/// As [`authenticated`], with the destination's configuration edited by `edit`.
fn authenticated_with(edit: impl FnOnce(&mut rmig_engine::DestConfig)) -> Authenticated {
    authenticated_offering(rmig_engine::VerifyMode::Received, edit)
}

/// As [`authenticated_with`], the source offering `verify`.
fn authenticated_offering(
    verify: rmig_engine::VerifyMode,
    edit: impl FnOnce(&mut rmig_engine::DestConfig),
) -> Authenticated {
    let dst = Mem::new(4 * MIB);
    let setup = Setup::new(&dst, &dst, 4 * MIB);
    let mut cfg = setup.dst.clone();
    cfg.handshake_timeout = Duration::from_millis(800);
    edit(&mut cfg);
    let l = DestListener::bind("127.0.0.1:0", cfg).unwrap();
    let addr = l.local_addr().unwrap();
    let regions = setup.dst_regions.clone();
    let offer = rmig_engine::control::handshake::SourceOffer {
        versions: (PROTOCOL_MIN, PROTOCOL_MAX),
        key: key(),
        regions: setup.src_regions.iter().map(|r| r.desc()).collect(),
        transports: vec![rmig_engine::protocol::TransportKind::Tcp],
        lanes: 1,
        verify,
    };
    drop(setup);
    let d =
        std::thread::spawn(move || l.serve(regions, Box::new(NullDest::default()), Monitor::new()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (ctl, agreed) = rt.block_on(async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let a = rmig_engine::control::handshake::source(&mut s, &offer, Duration::from_secs(2))
            .await
            .unwrap();
        (s, a)
    });
    (addr, d, ctl, agreed, dst, rt)
}

/// Joins lane `lane` of an authenticated session as its source would.
fn join_lane(
    addr: std::net::SocketAddr,
    agreed: &rmig_engine::control::handshake::Agreed,
    lane: u16,
) -> TcpStream {
    let (answer, sock) = claim_lane(addr, agreed, lane);
    assert_eq!(answer, Message::LaneAccepted, "lane {lane}");
    sock
}

/// Claims lane `lane` with a genuine proof; returns the destination's answer and the socket.
fn claim_lane(
    addr: std::net::SocketAddr,
    agreed: &rmig_engine::control::handshake::Agreed,
    lane: u16,
) -> (Message, TcpStream) {
    let join = Message::LaneJoin {
        session: agreed.auth.session_id(),
        lane,
        mac: agreed.auth.lane_proof(lane),
    };
    let (answer, sock) = first_words(addr, &join);
    (answer.unwrap(), sock)
}

/// Opens a new connection to `addr`, sends `m` and reads the answer (waiting at most 3 s);
/// returns the answer and the connection.
fn first_words(
    addr: std::net::SocketAddr,
    m: &Message,
) -> (Result<Message, EngineError>, TcpStream) {
    let mut sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    codec::write_sync(&mut sock, m).unwrap();
    (codec::read_sync(&mut sock), sock)
}

#[test]
fn a_tcp_session_takes_no_lane_beyond_its_own_but_one_fetch_lane() {
    let _deadline = Deadline::secs(30);
    // One lane agreed. Lane 1 would be a TCP lane replacing a failed RDMA lane: a TCP session
    // has none to replace, so even a genuine proof for it is refused. Lane 2 is post-copy's
    // fetch lane: taken once. A lane number taken already is refused too.
    let (addr, d, ctl, agreed, _dst, _rt) = authenticated();
    let _lane = join_lane(addr, &agreed, 0);
    let not_expected = |lane: u16| {
        let (answer, _) = claim_lane(addr, &agreed, lane);
        let why = format!("lane {lane} is not expected");
        assert_eq!(answer, Message::Error { message: why });
    };
    not_expected(1);
    not_expected(0);
    let _fetch = join_lane(addr, &agreed, 2);
    not_expected(2);
    not_expected(3);
    drop(ctl);
    assert!(d.join().unwrap().is_err());
}

#[test]
fn a_lane_that_cannot_prove_membership_is_refused() {
    let _deadline = Deadline::secs(120);
    // A genuine source authenticates; a stranger then tries to join as a lane.
    let (addr, d, _ctl, _agreed, _dst, _rt) = authenticated();
    let mut lane = TcpStream::connect(addr).unwrap();
    codec::write_sync(
        &mut lane,
        &Message::LaneJoin {
            session: [1; 16],
            lane: 0,
            mac: [2; 32],
        },
    )
    .unwrap();
    let reply = codec::read_sync(&mut lane).unwrap();
    assert!(
        matches!(&reply, Message::Error { message } if message.contains("could not prove")),
        "{reply:?}"
    );
    let e = d.join().unwrap().unwrap_err();
    assert!(e.to_string().contains("data lanes joined"), "{e}");
}

#[test]
fn an_authenticated_lane_sending_a_run_outside_the_region_ends_the_migration() {
    let _deadline = Deadline::secs(120);
    // A source that passes every check and then writes past the end of guest memory.
    let (addr, d, _ctl, agreed, dst, _rt) = authenticated();
    let mut lane = join_lane(addr, &agreed, 0);
    let h = rmig_transport::tcp::wire::Header {
        kind: rmig_transport::tcp::wire::KIND_DATA,
        region: 0,
        first_page: 1023,
        count: 2,
    };
    lane.write_all(&h.encode()).unwrap();
    lane.write_all(&[0xAB; 8192]).unwrap();
    let e = d.join().unwrap().unwrap_err();
    assert!(matches!(e, EngineError::Protocol(_)), "{e}");
    assert!(e.to_string().contains("outside region 0"), "{e}");
    assert!(dst.bytes().iter().all(|&b| b == 0), "nothing may land");
}

/// One bogus connection of kind `k`: garbage, a wrong key, a wrong version, a stranger's lane
/// claim, a half-open connection or an idle one. Idle ones are returned to be held open.
fn bogus(addr: std::net::SocketAddr, k: usize) -> Option<TcpStream> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    match k % 6 {
        0 => s
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .ok()?,
        1 => {
            let hello = Message::Hello {
                min_version: PROTOCOL_MIN,
                max_version: PROTOCOL_MAX,
            };
            codec::write_sync(&mut s, &hello).ok()?;
            let _ = codec::read_sync(&mut s).ok()?;
            let proof = Message::AuthProof {
                nonce: [7; 32],
                mac: [9; 32],
            };
            codec::write_sync(&mut s, &proof).ok()?;
        }
        2 => {
            let hello = Message::Hello {
                min_version: 40,
                max_version: 41,
            };
            codec::write_sync(&mut s, &hello).ok()?;
        }
        3 => {
            let join = Message::LaneJoin {
                session: [3; 16],
                lane: 0,
                mac: [4; 32],
            };
            codec::write_sync(&mut s, &join).ok()?;
        }
        4 => s.shutdown(std::net::Shutdown::Write).ok()?,
        _ => return Some(s),
    }
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
    None
}

#[test]
fn a_destination_keeps_listening_through_a_hundred_bogus_connections() {
    let _deadline = Deadline::secs(120);
    let len = 32 * MIB;
    let src = Mem::random(len, 0.1, 21);
    let dst = Mem::new(len);
    let mut setup = Setup::new(&src, &dst, len);
    setup.src.max_bandwidth = 100_000_000; // the session lasts while the bogus ones go on
    let dm = setup.dst_monitor.clone();
    let (d, port) = setup.spawn_dest("127.0.0.1:0").unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let stranger = std::thread::spawn(move || {
        let mut idle = Vec::new();
        for k in 0..100 {
            idle.extend(bogus(addr, k));
            std::thread::sleep(Duration::from_millis(5));
        }
        idle
    });
    // The real source arrives while the bogus connections keep coming, and its lanes join
    // among them.
    std::thread::sleep(Duration::from_millis(150));
    setup.src.dest = addr.to_string();
    let s = rmig_engine::driver::migrate(
        setup.src,
        setup.src_regions,
        setup.dirty,
        setup.embedder,
        setup.src_monitor,
    );
    let idle = stranger.join().unwrap();
    let s = s.expect("the real source migrates");
    assert_eq!(s.verified, Some(true));
    d.join().unwrap().expect("the destination completes");
    rmig_tests::assert_same(src.bytes(), dst.bytes());
    let refused = dm.stats().connections_refused;
    assert!(refused >= 20, "refused connections are counted: {refused}");
    drop(idle);
}

/// The process's resident memory in bytes.
fn rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = s.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[test]
fn a_flood_of_maximal_frames_ends_in_a_protocol_error_within_a_memory_cap() {
    let _deadline = Deadline::secs(120);
    // An authenticated source that never opens its lanes floods the control connection with
    // the largest frames a message may have: the destination (busy joining lanes, not
    // reading its inbox) must push back instead of buffering them.
    let (_addr, d, ctl, _agreed, _dst, rt) = authenticated();
    let before = rss();
    let piece = Message::DeviceState {
        data: vec![0x5a; codec::MAX_DEVICE_PIECE],
        last: false,
    };
    let frame = codec::encode(&piece);
    let sent = rt.block_on(async move {
        use tokio::io::AsyncWriteExt;
        let mut ctl = ctl;
        let mut sent = 0u64;
        let flood = async {
            while ctl.write_all(&frame).await.is_ok() {
                sent += frame.len() as u64;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(3), flood).await;
        sent
    });
    let e = d.join().unwrap().unwrap_err();
    let grown = rss().saturating_sub(before);
    assert!(matches!(e, EngineError::Protocol(_)), "{e}");
    assert!(
        grown < 64 * MIB as u64,
        "the destination grew by {} MiB while {} MiB were sent",
        grown >> 20,
        sent >> 20
    );
}

#[test]
fn a_frame_above_its_types_limit_is_refused_before_its_body_is_read() {
    let _deadline = Deadline::secs(120);
    // A Checksums frame larger than this destination's region table allows: refused on its
    // header alone (the body never arrives, so waiting for it would time out instead).
    let (_addr, d, mut ctl, _agreed, _dst, rt) = authenticated();
    rt.block_on(async {
        use tokio::io::AsyncWriteExt;
        let len: u32 = 1 << 20;
        ctl.write_all(&len.to_le_bytes()).await.unwrap();
        ctl.write_all(&[codec::encode(&Message::Checksums { regions: vec![] })[4]])
            .await
            .unwrap();
        // Hold the connection open without the body.
        tokio::time::sleep(Duration::from_millis(300)).await;
    });
    let e = d.join().unwrap().unwrap_err();
    assert!(
        e.to_string()
            .contains("Checksums frame of 1048576 bytes exceeds its limit"),
        "{e}"
    );
    drop(ctl);
}

#[test]
fn lane_data_outside_an_open_round_is_refused_and_never_lands() {
    let _deadline = Deadline::secs(120);
    // A genuine lane sends a well-formed run of pages inside the region, but no round was
    // started on the control connection: the destination waits briefly for the round, then
    // refuses the run and ends the lane without writing a byte.
    let (addr, d, ctl, agreed, dst, _rt) = authenticated();
    let mut lane = join_lane(addr, &agreed, 0);
    let h = rmig_transport::tcp::wire::Header {
        kind: rmig_transport::tcp::wire::KIND_DATA,
        region: 0,
        first_page: 3,
        count: 2,
    };
    lane.write_all(&h.encode()).unwrap();
    lane.write_all(&[0xAB; 8192]).unwrap();
    lane.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let t = std::time::Instant::now();
    let mut rest = Vec::new();
    let _ = lane.read_to_end(&mut rest);
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "the destination ends the refused lane"
    );
    assert!(dst.bytes().iter().all(|&b| b == 0), "nothing may land");
    drop(ctl);
    assert!(d.join().unwrap().is_err());
}

#[test]
fn without_a_reconnect_window_a_source_that_vanishes_mid_round_is_a_closed_peer() {
    let _deadline = Deadline::secs(30);
    // No window: the destination does not wait for the source to come back, and says the
    // peer closed (not "source gone after a window of 0 ms").
    let (addr, d, mut ctl, agreed, _dst, rt) =
        authenticated_with(|c| c.reconnect_window = Duration::ZERO);
    let _lane = join_lane(addr, &agreed, 0);
    rt.block_on(codec::write_async(&mut ctl, &round_start(0, false)))
        .unwrap();
    drop(ctl);
    let e = d.join().unwrap().unwrap_err();
    // (Closed or reset, as the kernel tells it.)
    assert!(
        matches!(e, EngineError::PeerClosed | EngineError::Io(_)),
        "{e}"
    );
}

/// Claims the session back on a new connection with reconnect attempt `attempt` and a
/// genuine proof, as a source whose control connection broke would; returns the round the
/// destination asks for next if it took the claim (answered `RejoinOk`), and the connection.
fn rejoin(
    addr: std::net::SocketAddr,
    agreed: &rmig_engine::control::handshake::Agreed,
    attempt: u32,
) -> (Option<u32>, TcpStream) {
    let claim = Message::Rejoin {
        session: agreed.auth.session_id(),
        attempt,
        mac: agreed.auth.rejoin_proof(attempt, None),
    };
    let (answer, s) = first_words(addr, &claim);
    let next = match answer {
        Ok(Message::RejoinOk { next_round, .. }) => Some(next_round),
        _ => None,
    };
    (next, s)
}

#[test]
fn a_reconnect_is_taken_once_per_attempt_and_never_without_a_window() {
    let _deadline = Deadline::secs(60);
    // With a window: a fresh attempt is taken even while the old link still lives (the
    // source saw it break first), and the round it broke in starts again as the next one;
    // the same attempt again (a replay) is not taken; a later one is.
    let (addr, d, mut ctl, agreed, _dst, rt) = authenticated();
    let _lane = join_lane(addr, &agreed, 0);
    rt.block_on(codec::write_async(&mut ctl, &round_start(0, false)))
        .unwrap();
    // (Nothing answers a RoundStart: give the destination time to take it first.)
    std::thread::sleep(Duration::from_millis(500));
    let (first, mut c1) = rejoin(addr, &agreed, 1);
    assert_eq!(
        first,
        Some(1),
        "a fresh, proven reconnect mid-round 0 goes on at 1"
    );
    let (replay, _) = rejoin(addr, &agreed, 1);
    assert_eq!(replay, None, "the same attempt twice is a replay");
    codec::write_sync(&mut c1, &round_start(1, false)).unwrap();
    // (Nothing answers a RoundStart: give the destination time to take it first.)
    std::thread::sleep(Duration::from_millis(500));
    let (later, c2) = rejoin(addr, &agreed, 2);
    assert_eq!(later, Some(2), "a later attempt mid-round 1 goes on at 2");
    drop((ctl, c1, c2));
    assert!(d.join().unwrap().is_err());

    // Without a window, the destination never takes its source back.
    let (addr, d, mut ctl, agreed, _dst, rt) =
        authenticated_with(|c| c.reconnect_window = Duration::ZERO);
    let _lane = join_lane(addr, &agreed, 0);
    rt.block_on(codec::write_async(&mut ctl, &round_start(0, false)))
        .unwrap();
    let (taken, _) = rejoin(addr, &agreed, 1);
    assert_eq!(taken, None, "no window: no reconnect");
    drop(ctl);
    assert!(d.join().unwrap().is_err());
}

/// An authenticated source (its one lane joined) sends `script` on the control connection;
/// returns the destination's error and what it sent back.
fn after_the_handshake(
    edit: impl FnOnce(&mut rmig_engine::DestConfig),
    script: &[Message],
) -> (EngineError, Vec<Message>) {
    after_offering(rmig_engine::VerifyMode::Received, edit, script)
}

/// As [`after_the_handshake`], the source offering `verify`.
fn after_offering(
    verify: rmig_engine::VerifyMode,
    edit: impl FnOnce(&mut rmig_engine::DestConfig),
    script: &[Message],
) -> (EngineError, Vec<Message>) {
    let (e, back, dst) = scripted(verify, edit, &[0], script);
    assert!(dst.bytes().iter().all(|&b| b == 0), "nothing may land");
    (e, back)
}

/// As [`after_offering`], the source joining the lanes `lanes` before its script; hands
/// destination memory back unread (after post-copy, reading a page that never came blocks).
fn scripted(
    verify: rmig_engine::VerifyMode,
    edit: impl FnOnce(&mut rmig_engine::DestConfig),
    lanes: &[u16],
    script: &[Message],
) -> (EngineError, Vec<Message>, Mem) {
    let (addr, d, mut ctl, agreed, dst, rt) = authenticated_offering(verify, edit);
    let _lanes: Vec<TcpStream> = lanes.iter().map(|&l| join_lane(addr, &agreed, l)).collect();
    let back = rt.block_on(async {
        for m in script {
            codec::write_async(&mut ctl, m).await.unwrap();
        }
        let mut back = Vec::new();
        let read = async {
            while let Ok(Some(m)) = codec::read_async(&mut ctl).await {
                back.push(m);
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
        back
    });
    (d.join().unwrap().unwrap_err(), back, dst)
}

fn round_start(round: u32, last: bool) -> Message {
    Message::RoundStart { round, last }
}

fn round_end(round: u32) -> Message {
    Message::RoundEnd { round }
}

fn device(n: usize, last: bool) -> Message {
    Message::DeviceState {
        data: vec![0xd5; n],
        last,
    }
}

/// Asserts a protocol error that names `what`, told to the peer too.
fn refused(e: &EngineError, back: &[Message], what: &str) {
    assert!(
        matches!(e, EngineError::Protocol(m) if m.contains(what)),
        "{what}: {e}"
    );
    assert_told(back, what);
}

/// Asserts that the destination sent the source an `Error` naming `what`.
fn assert_told(back: &[Message], what: &str) {
    assert!(
        back.iter()
            .any(|m| matches!(m, Message::Error { message } if message.contains(what))),
        "the source is told: {back:?}"
    );
}

#[test]
fn a_round_end_without_its_start_is_refused() {
    let _deadline = Deadline::secs(30);
    let (e, back) = after_the_handshake(|_| {}, &[round_end(0)]);
    refused(&e, &back, "RoundEnd is not expected");
}

#[test]
fn a_round_out_of_sequence_is_refused() {
    let _deadline = Deadline::secs(30);
    // The error names the phase it came in, so an operator can tell where the peer strayed.
    let (e, back) = after_the_handshake(|_| {}, &[round_start(3, false)]);
    refused(
        &e,
        &back,
        "RoundStart is not expected between rounds (next 0)",
    );
    let script = [round_start(0, false), round_end(1)];
    let (e, back) = after_the_handshake(|_| {}, &script);
    refused(&e, &back, "RoundEnd is not expected in round 0");
    // After the stop-and-copy round, only the next round may start (a further last round).
    let script = [round_start(0, true), round_end(0), round_start(5, true)];
    let (e, back) = after_the_handshake(|_| {}, &script);
    refused(
        &e,
        &back,
        "RoundStart is not expected after the stop-and-copy round",
    );
}

#[test]
fn device_state_before_the_stop_and_copy_is_refused() {
    let _deadline = Deadline::secs(30);
    let script = [round_start(0, false), round_end(0), device(10, true)];
    let (e, back) = after_the_handshake(|_| {}, &script);
    refused(
        &e,
        &back,
        "DeviceState is not expected between rounds (next 1)",
    );
}

#[test]
fn checksums_in_a_session_without_verification_are_refused() {
    let _deadline = Deadline::secs(30);
    let checksums = Message::Checksums {
        regions: vec![vec![0; 1]],
    };
    let script = [round_start(0, false), round_end(0), checksums];
    let (e, back) = after_offering(rmig_engine::VerifyMode::Off, |_| {}, &script);
    refused(
        &e,
        &back,
        "Checksums is not expected between rounds (next 1)",
    );
}

#[test]
fn device_state_over_its_cap_is_refused_even_in_pieces() {
    let _deadline = Deadline::secs(30);
    let script = [
        round_start(0, true),
        round_end(0),
        device(600, false),
        device(600, true),
    ];
    let (e, back) = after_the_handshake(|c| c.max_device_state = 1000, &script);
    refused(
        &e,
        &back,
        "device state larger than the limit of 1000 bytes",
    );
    // Exactly the limit is taken: the session moves on to verification, where a Commit is
    // then out of order.
    let script = [
        round_start(0, true),
        round_end(0),
        device(500, false),
        device(500, true),
        Message::Commit,
    ];
    let (e, back) = after_the_handshake(|c| c.max_device_state = 1000, &script);
    refused(
        &e,
        &back,
        "Commit is not expected while waiting for checksums",
    );
}

#[test]
fn a_commit_before_verification_is_refused() {
    let _deadline = Deadline::secs(30);
    let script = [
        round_start(0, true),
        round_end(0),
        device(10, true),
        Message::Commit,
    ];
    let (e, back) = after_the_handshake(|_| {}, &script);
    refused(&e, &back, "Commit is not expected");
    // Digests without the baseline's Checksums first are refused too.
    let script = [
        round_start(0, true),
        round_end(0),
        device(10, true),
        Message::Digests { chunks: vec![] },
    ];
    let (e, back) = after_the_handshake(|_| {}, &script);
    refused(&e, &back, "Digests is not expected");
}

#[test]
fn a_round_out_of_sequence_in_post_copy_is_refused() {
    let _deadline = Deadline::secs(60);
    // A source switches to post-copy after round 0 (every page still to come, its one lane
    // and its fetch lane, lane 2, joined) and has the destination's guest resumed; it must
    // then start round 1, and round 7 is refused. The guest already runs here, so that
    // failure loses it (its missing pages are on a source that strayed).
    let pages = (4 * MIB / 4096) as u64;
    let script = [
        round_start(0, false),
        round_end(0),
        Message::PostcopyPages {
            runs: vec![(0, 0, pages)],
            last: true,
        },
        device(10, true),
        Message::Commit,
        round_start(7, true),
    ];
    let (e, back, dst) = scripted(rmig_engine::VerifyMode::Off, |_| {}, &[0, 2], &script);
    assert!(back.contains(&Message::Resumed), "it switched: {back:?}");
    let what = "RoundStart is not expected in post-copy (next round 1)";
    assert!(
        matches!(&e, EngineError::GuestLost(m) if m.contains(what)),
        "{e}"
    );
    assert_told(&back, what);
    // Its pages never came: a read would block for good.
    std::mem::forget(dst);
}
