//! Migrations over RDMA. The ones marked `ignore` need an RDMA device whose address is in
//! `RMIG_RDMA_IP`: `tests/vm/rdma.sh` brings soft-RoCE up (natively where the kernel has
//! `rdma_rxe`, else in a QEMU guest) and runs them with `--ignored`.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rmig_engine::{
    bad_rkey_after, fail_after, DestListener, DestOutcome, Encryption, EngineError, MigrationStats,
    Registration, SharedDirtyLog, TransportChoice,
};
use rmig_tests::capture::{lane_join, refusal, send_and_read, Capture};
use rmig_tests::{assert_same, Deadline, Mem, Setup, Writer};

const MIB: usize = 1 << 20;

fn rdma_setup(src: &Mem, dst: &Mem, len: usize) -> Setup {
    let ip = std::env::var("RMIG_RDMA_IP")
        .expect("RMIG_RDMA_IP must name an RDMA device's address (tests/vm/rdma.sh sets it)");
    let mut s = Setup::new(src, dst, len);
    s.bind = format!("{ip}:0");
    s.src.transport = TransportChoice::Rdma;
    s.dst.transport = TransportChoice::Rdma;
    s
}

#[test]
#[ignore = "needs an RDMA device: tests/vm/rdma.sh"]
fn live_writer_over_rdma_lands_every_write() {
    let _deadline = Deadline::secs(300);
    let len = 256 * MIB;
    let src = Mem::random(len, 0.1, 11);
    let dst = Mem::new(len);
    let log = SharedDirtyLog::new(&[(len / 4096) as u64]);
    let mut w = Writer::start(&src, log.clone(), 4096, 2);
    let mut setup = rdma_setup(&src, &dst, len);
    setup.dirty = Box::new(log);
    setup.embedder = w.embedder(b"device".to_vec());
    let (s, d) = setup.run();
    w.stop();
    let s = s.expect("source");
    d.expect("destination");
    assert_eq!(s.transport, "rdma");
    assert_eq!(s.verified, Some(true));
    assert!(
        s.rounds.iter().filter(|r| !r.last).count() >= 2,
        "the writer dirtied pages: more than one pre-copy round: {:?}",
        s.rounds
    );
    let r = s.rdma.expect("RDMA report");
    assert_eq!(r.registration, "pin-all");
    assert_same(src.bytes(), dst.bytes());
}

#[test]
#[ignore = "needs an RDMA device: tests/vm/rdma.sh"]
fn chunked_registration_with_three_lanes() {
    let _deadline = Deadline::secs(300);
    let len = 64 * MIB;
    let src = Mem::random(len, 0.3, 12);
    let dst = Mem::new(len);
    let mut setup = rdma_setup(&src, &dst, len);
    let c = Registration::Chunked {
        chunk_bytes: 256 << 10,
        max_chunks: 8,
    };
    setup.src.rdma.registration = c;
    setup.dst.rdma.registration = c;
    setup.src.lanes = 3;
    let (s, d) = setup.run();
    let s = s.expect("source");
    let d = d.expect("destination");
    assert_eq!((s.transport.as_str(), s.lanes), ("rdma", 3));
    assert_eq!(s.rdma.unwrap().registration, "chunked");
    assert_eq!(d.stats.rdma.unwrap().registration, "chunked");
    assert_eq!(s.verified, Some(true));
    assert_same(src.bytes(), dst.bytes());
}

/// Two lanes, the first with `fault` after 8 MiB: the migration must complete over the other
/// lane, verified, with the failed lane counted.
fn survives_a_lane_fault(fault: rmig_transport::FaultPlan, seed: u64) {
    let len = 64 * MIB;
    let src = Mem::random(len, 0.0, seed);
    let dst = Mem::new(len);
    let mut setup = rdma_setup(&src, &dst, len);
    setup.src.lane_faults = vec![fault];
    let (s, d) = setup.run();
    let s = s.expect("source");
    d.expect("destination");
    assert_eq!((s.transport.as_str(), s.lanes_failed), ("rdma", 1));
    assert_eq!(s.verified, Some(true));
    assert_same(src.bytes(), dst.bytes());
}

#[test]
#[ignore = "needs an RDMA device: tests/vm/rdma.sh"]
fn queue_pair_forced_into_error_mid_round_completes_over_the_other_lane() {
    let _deadline = Deadline::secs(300);
    survives_a_lane_fault(fail_after(8 * MIB as u64), 13);
}

#[test]
#[ignore = "needs an RDMA device: tests/vm/rdma.sh"]
fn wrong_rkey_fails_its_lane_and_the_pages_go_elsewhere() {
    let _deadline = Deadline::secs(300);
    survives_a_lane_fault(bad_rkey_after(8 * MIB as u64), 14);
}

#[test]
#[ignore = "needs an RDMA device: tests/vm/rdma.sh"]
fn the_only_rdma_lane_failing_mid_round_hands_over_to_tcp_lanes() {
    let _deadline = Deadline::secs(300);
    let len = 64 * MIB;
    let src = Mem::random(len, 0.1, 17);
    let dst = Mem::new(len);
    let mut setup = rdma_setup(&src, &dst, len);
    setup.src.transport = TransportChoice::Auto;
    setup.dst.transport = TransportChoice::Auto;
    setup.src.lanes = 1;
    setup.src.lane_faults = vec![fail_after(8 * MIB as u64)];
    let (s, d) = setup.run();
    let s = s.expect("source");
    let d = d.expect("destination");
    assert_eq!((s.transport.as_str(), s.lanes_failed), ("tcp", 1));
    let why = s.fallback_reason.expect("a fallback reason");
    assert!(why.contains("every RDMA lane failed"), "{why}");
    assert_eq!(d.stats.transport, "tcp");
    // The destination counts the TCP lane that replaced the RDMA one as an added lane (not
    // as a lane rejoining after a reconnect), and says why.
    assert_eq!((s.lanes, d.stats.lanes), (2, 2));
    let why = d.stats.fallback_reason.as_deref().unwrap_or("");
    assert!(why.contains("replaced its failed RDMA lanes"), "{why}");
    assert_eq!(s.verified, Some(true));
    assert_same(src.bytes(), dst.bytes());
}

#[test]
#[ignore = "needs an RDMA device: tests/vm/rdma.sh"]
fn destination_on_tcp_makes_auto_fall_back_and_say_why() {
    let _deadline = Deadline::secs(300);
    let len = 32 * MIB;
    let src = Mem::random(len, 0.2, 15);
    let dst = Mem::new(len);
    let mut setup = rdma_setup(&src, &dst, len);
    setup.src.transport = TransportChoice::Auto;
    setup.dst.transport = TransportChoice::Tcp;
    let (s, d) = setup.run();
    let s = s.expect("source");
    d.expect("destination");
    assert_eq!(s.transport, "tcp");
    let why = s.fallback_reason.expect("a fallback reason");
    assert!(
        why.contains("destination") && why.contains("TCP only"),
        "{why}"
    );
    assert_same(src.bytes(), dst.bytes());
}

#[test]
fn rdma_without_a_device_is_a_clear_error_and_auto_falls_back() {
    let _deadline = Deadline::secs(300);
    // 127.0.0.1 is in no GID table: no RDMA for it on any machine.
    let len = 8 * MIB;
    let src = Mem::random(len, 0.0, 16);
    let dst = Mem::new(len);
    let mut setup = Setup::new(&src, &dst, len);
    setup.src.transport = TransportChoice::Rdma;
    let (s, _) = setup.run();
    let e = s.unwrap_err().to_string();
    assert!(e.contains("no RDMA device"), "{e}");
    let src2 = snapshot_equal(&src);
    let dst = Mem::new(len);
    let (s, d) = Setup::new(&src, &dst, len).run();
    let s = s.expect("auto migrates over TCP");
    d.expect("destination");
    assert_eq!(s.transport, "tcp");
    assert!(s.fallback_reason.unwrap().contains("no RDMA device"));
    assert_same(&src2, dst.bytes());
}

fn snapshot_equal(m: &Mem) -> Vec<u8> {
    m.bytes().to_vec()
}

/// Post-copy over RDMA: the destination reads every missing page itself (one-sided READs of
/// the source's memory), the ones its guest touches first; no source thread serves any.
#[test]
#[ignore = "needs an RDMA device: tests/vm/rdma.sh"]
fn postcopy_over_rdma_reads_every_page_without_the_source() {
    let _deadline = Deadline::secs(300);
    let len = 32 * MIB;
    let hot = 4096;
    let src = Mem::random(len, 0.2, 21);
    let dst = Mem::new(len);
    let log = SharedDirtyLog::new(&[(len / 4096) as u64]);
    let mut w = Writer::start(&src, log.clone(), hot, 20);
    let mut setup = rdma_setup(&src, &dst, len);
    let guest = rmig_tests::guest::ReadingGuest::new(&dst, hot, 1000);
    setup.dest_guest = Some(Box::new(guest.clone()));
    setup.dirty = Box::new(log);
    setup.embedder = w.embedder(b"device".to_vec());
    // A limit the writer cannot meet: after round 0 the source switches to post-copy.
    setup.src.policy.downtime_limit = std::time::Duration::from_millis(1);
    setup.src.policy.auto_converge = false;
    setup.src.policy.postcopy = rmig_engine::Postcopy::AfterRounds(1);
    let (s, d) = setup.run();
    let s = s.expect("source");
    let d = d.expect("destination");
    assert_eq!(w.resumed.load(std::sync::atomic::Ordering::Relaxed), 0);
    w.stop();
    assert_eq!((s.transport.as_str(), s.verified), ("rdma", Some(true)));
    let theirs = d.stats.postcopy.clone().expect("destination post-copy");
    let ours = s.postcopy.clone().expect("source post-copy");
    eprintln!("post-copy over RDMA: destination {theirs:?}; source {ours:?}");
    assert!(theirs.pages_at_switch > 0, "{theirs:?}");
    assert!(
        theirs.faults > 0,
        "the guest touched missing pages: {theirs:?}"
    );
    assert_eq!(
        theirs.pages_on_fault + theirs.pages_background,
        theirs.pages_at_switch,
        "every page read once: {theirs:?}"
    );
    assert_eq!(
        ours.pages_on_fault, 0,
        "no source thread served a page: {ours:?}"
    );
    assert_eq!(
        ours.pages_background, 0,
        "the source sent nothing after the switch"
    );
    guest.check_reads(&src);
    assert_same(src.bytes(), dst.bytes());
}

// ---------------------------------------------------------------------------------------
// Encrypted sessions and RDMA: cleartext data lanes only when both ends opt in, and the
// lanes' key exchanges inside TLS.

/// Encryption on at both ends (pre-shared key), RDMA cleartext lanes as `src`/`dst` say.
fn encrypted(s: &mut Setup, src: bool, dst: bool) {
    s.src.encryption = Encryption::Psk;
    s.dst.encryption = Encryption::Psk;
    s.src.rdma_cleartext_lanes = src;
    s.dst.rdma_cleartext_lanes = dst;
    s.src.handshake_timeout = Duration::from_secs(5);
    s.dst.incoming_timeout = Some(Duration::from_secs(3));
}

#[test]
fn encryption_without_the_cleartext_lanes_opt_in_keeps_rdma_off_and_names_the_flag() {
    let _deadline = Deadline::secs(120);
    let len = 8 * MIB;
    let src = Mem::random(len, 0.1, 31);
    // `rdma` asked for, the source not opted in (the destination is): a clear error.
    let dst = Mem::new(len);
    let mut setup = Setup::new(&src, &dst, len);
    encrypted(&mut setup, false, true);
    setup.src.transport = TransportChoice::Rdma;
    let e = setup.run().0.unwrap_err().to_string();
    assert!(e.contains("--rdma-cleartext-lanes"), "{e}");
    // `auto`: TCP, encrypted, and the reason names the flag.
    let dst = Mem::new(len);
    let mut setup = Setup::new(&src, &dst, len);
    encrypted(&mut setup, false, false);
    let (s, d) = setup.run();
    let s = s.expect("auto migrates over TCP");
    let d = d.expect("destination");
    assert_eq!(
        (s.transport.as_str(), s.encryption.as_str()),
        ("tcp", "tls-psk")
    );
    assert!(s.data_lanes_encrypted && d.stats.data_lanes_encrypted);
    let why = s.fallback_reason.expect("a fallback reason");
    assert!(
        why.starts_with("source: ") && why.contains("--rdma-cleartext-lanes"),
        "{why}"
    );
    assert_same(src.bytes(), dst.bytes());
    // Opted in at both ends but no device here (127.0.0.1): TCP, still encrypted, and the
    // reason is the device.
    let dst = Mem::new(len);
    let mut setup = Setup::new(&src, &dst, len);
    encrypted(&mut setup, true, true);
    let (s, d) = setup.run();
    let s = s.expect("auto migrates over TCP");
    d.expect("destination");
    assert_eq!(s.transport, "tcp");
    assert!(s.data_lanes_encrypted);
    assert!(s.fallback_reason.unwrap().contains("no RDMA device"));
    assert_same(src.bytes(), dst.bytes());
}

/// A relay on the RDMA address in front of the destination: forwards every connection and
/// keeps every byte it saw, both ways.
struct Tap {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
}

impl Tap {
    fn start(target: SocketAddr) -> Tap {
        let l = TcpListener::bind((target.ip(), 0)).unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (keep, halt) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                let Ok((a, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                a.set_nonblocking(false).unwrap();
                let b = TcpStream::connect(target).unwrap();
                let there = (a.try_clone().unwrap(), b.try_clone().unwrap());
                for (from, to) in [there, (b, a)] {
                    pump(from, to, keep.clone());
                }
            }
        });
        Tap { addr, seen, stop }
    }

    fn saw(&self, needle: &[u8]) -> bool {
        let seen = self.seen.lock().unwrap();
        seen.windows(needle.len()).any(|w| w == needle)
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, keep: Arc<Mutex<Vec<u8>>>) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf) {
            keep.lock().unwrap().extend_from_slice(&buf[..n]);
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

/// Runs `s` with the source connecting through a tap; returns both ends' results and the tap.
fn run_tapped(
    mut s: Setup,
) -> (
    Result<MigrationStats, EngineError>,
    Result<DestOutcome, EngineError>,
    Tap,
) {
    let l = DestListener::bind(&s.bind, s.dst.clone()).expect("bind");
    let target = l.local_addr().unwrap();
    let emb: Box<dyn rmig_engine::DestEmbedder> = match s.dest_guest.take() {
        Some(g) => g,
        None => Box::new(s.dest_embedder.clone()),
    };
    let (regions, dm) = (s.dst_regions.clone(), s.dst_monitor.clone());
    let d = std::thread::spawn(move || l.serve(regions, emb, dm));
    let tap = Tap::start(target);
    s.src.dest = tap.addr.to_string();
    let r = rmig_engine::driver::migrate(s.src, s.src_regions, s.dirty, s.embedder, s.src_monitor);
    (r, d.join().expect("destination thread"), tap)
}

/// The destination's memory address, as its ACCEPT tells it (pin-all: the region's start).
fn address_of(m: &Mem) -> [u8; 8] {
    (m.ptr() as u64).to_le_bytes()
}

#[test]
#[ignore = "needs an RDMA device: tests/vm/rdma.sh"]
fn encrypted_session_with_cleartext_lanes_moves_pages_over_rdma_keys_inside_tls() {
    let _deadline = Deadline::secs(300);
    let len = 32 * MIB;
    let src = Mem::random(len, 0.2, 32);
    for enc in [Encryption::Off, Encryption::Psk] {
        let on = enc.is_on();
        let dst = Mem::new(len);
        let mut setup = rdma_setup(&src, &dst, len);
        encrypted(&mut setup, true, true);
        setup.src.encryption = enc.clone();
        setup.dst.encryption = enc;
        let (s, d, tap) = run_tapped(setup);
        let s = s.expect("source");
        let d = d.expect("destination");
        let want = if on { "tls-psk" } else { "off" };
        for st in [&s, &d.stats] {
            assert_eq!(
                (st.transport.as_str(), st.encryption.as_str()),
                ("rdma", want)
            );
            assert!(!st.data_lanes_encrypted, "the pages crossed in clear");
        }
        assert_eq!(s.verified, Some(true));
        assert_same(src.bytes(), dst.bytes());
        // The destination's ACCEPT names its memory's address (with its rkey): in clear
        // without encryption (so the tap can see it), never with.
        assert_eq!(tap.saw(&address_of(&dst)), !on, "encryption {want}");
    }
}

#[test]
#[ignore = "needs an RDMA device: tests/vm/rdma.sh"]
fn an_encrypted_destination_that_did_not_opt_in_refuses_cleartext_rdma_lanes() {
    let _deadline = Deadline::secs(300);
    let len = 16 * MIB;
    let src = Mem::random(len, 0.2, 33);
    let dst = Mem::new(len);
    let mut setup = rdma_setup(&src, &dst, len);
    encrypted(&mut setup, true, false);
    setup.dst.transport = TransportChoice::Auto;
    let e = setup.run().0.unwrap_err().to_string();
    assert!(e.contains("--rdma-cleartext-lanes"), "{e}");
    // With `auto`, TCP in TLS, and the reason is the destination's.
    let mut setup = rdma_setup(&src, &dst, len);
    encrypted(&mut setup, true, false);
    setup.src.transport = TransportChoice::Auto;
    setup.dst.transport = TransportChoice::Auto;
    let (s, d) = setup.run();
    let s = s.expect("source");
    d.expect("destination");
    assert_eq!(s.transport, "tcp");
    assert!(s.data_lanes_encrypted);
    let why = s.fallback_reason.expect("a fallback reason");
    assert!(
        why.starts_with("destination: ") && why.contains("--rdma-cleartext-lanes"),
        "{why}"
    );
    assert_same(src.bytes(), dst.bytes());
}

/// Post-copy over RDMA in an encrypted session with cleartext lanes: the reader's setup on
/// the fetch lane carries the source's memory keys, inside TLS.
#[test]
#[ignore = "needs an RDMA device: tests/vm/rdma.sh"]
fn encrypted_postcopy_over_rdma_keeps_the_source_keys_inside_tls() {
    let _deadline = Deadline::secs(300);
    let len = 16 * MIB;
    let src = Mem::random(len, 0.2, 34);
    let dst = Mem::new(len);
    let log = SharedDirtyLog::new(&[(len / 4096) as u64]);
    let mut w = Writer::start(&src, log.clone(), 4096, 20);
    let mut setup = rdma_setup(&src, &dst, len);
    encrypted(&mut setup, true, true);
    let guest = rmig_tests::guest::ReadingGuest::new(&dst, 4096, 1000);
    setup.dest_guest = Some(Box::new(guest.clone()));
    setup.dirty = Box::new(log);
    setup.embedder = w.embedder(b"device".to_vec());
    setup.src.policy.downtime_limit = Duration::from_millis(1);
    setup.src.policy.auto_converge = false;
    setup.src.policy.postcopy = rmig_engine::Postcopy::AfterRounds(1);
    let (s, d, tap) = run_tapped(setup);
    let s = s.expect("source");
    let d = d.expect("destination");
    w.stop();
    assert_eq!((s.transport.as_str(), s.verified), ("rdma", Some(true)));
    assert!(d.stats.postcopy.expect("post-copy").pages_at_switch > 0);
    assert!(!s.data_lanes_encrypted);
    assert_same(src.bytes(), dst.bytes());
    assert!(
        !tap.saw(&address_of(&src)),
        "the source's exposure in clear"
    );
    assert!(
        !tap.saw(&address_of(&dst)),
        "the destination's ACCEPT in clear"
    );
    // Also waits for the guest's reads: its thread reads `dst` until then.
    guest.check_reads(&src);
}

/// The only cleartext RDMA lane of an encrypted session fails: the TCP lanes that take over
/// join in TLS, and the statistics still say that pages crossed in clear.
#[test]
#[ignore = "needs an RDMA device: tests/vm/rdma.sh"]
fn encrypted_session_whose_rdma_lane_fails_hands_over_to_tls_tcp_lanes() {
    let _deadline = Deadline::secs(300);
    let len = 32 * MIB;
    let src = Mem::random(len, 0.1, 35);
    let dst = Mem::new(len);
    let mut setup = rdma_setup(&src, &dst, len);
    encrypted(&mut setup, true, true);
    setup.src.transport = TransportChoice::Auto;
    setup.dst.transport = TransportChoice::Auto;
    setup.src.lanes = 1;
    setup.src.lane_faults = vec![fail_after(8 * MIB as u64)];
    let (s, d) = setup.run();
    let s = s.expect("source");
    let d = d.expect("destination");
    assert_eq!((s.transport.as_str(), s.lanes_failed), ("tcp", 1));
    assert_eq!(
        (s.encryption.as_str(), d.stats.encryption.as_str()),
        ("tls-psk", "tls-psk")
    );
    assert!(!s.data_lanes_encrypted && !d.stats.data_lanes_encrypted);
    assert_eq!(s.verified, Some(true));
    assert_same(src.bytes(), dst.bytes());
}

/// Chunked registration with a cache of 4 chunks of 256 KiB a lane, on both ends.
const FOUR_CHUNKS: Registration = Registration::Chunked {
    chunk_bytes: 256 << 10,
    max_chunks: 4,
};

/// An RDMA session of one lane with [`FOUR_CHUNKS`], whose lane keeps one chunk more
/// than the destination advertised: its fifth request names no chunk to drop, which the
/// destination must refuse.
fn asking_beyond_the_chunk_limit(src: &Mem, dst: &Mem, len: usize) -> Setup {
    let mut setup = rdma_setup(src, dst, len);
    setup.src.rdma.registration = FOUR_CHUNKS;
    setup.dst.rdma.registration = FOUR_CHUNKS;
    setup.src.lanes = 1;
    setup.src.lane_faults = vec![rmig_transport::FaultPlan {
        chunks_beyond_limit: Some(1),
        ..Default::default()
    }];
    setup
}

/// The refusal as the source reports it: the chunk the destination would not register, and
/// why (ENOSPC: its cache for the lane is full).
fn names_the_chunk_refusal(text: &str) -> bool {
    text.contains("the destination could not register chunk") && text.contains("os error 28")
}

/// A source that asks for more chunk registrations than the destination advertised (only a
/// broken or hostile one can: an honest source sizes its cache from the advertised limit)
/// is refused. Over RDMA alone with one lane, the migration fails with that refusal named, the
/// source's guest was never paused (it runs on), and the destination neither resumes nor
/// reports success.
#[test]
#[ignore = "needs an RDMA device: tests/vm/rdma.sh"]
fn chunk_registration_beyond_the_limit_is_refused_and_the_migration_fails_cleanly() {
    let _deadline = Deadline::secs(300);
    let len = 32 * MIB;
    let src = Mem::random(len, 0.0, 31);
    let dst = Mem::new(len);
    let mut setup = asking_beyond_the_chunk_limit(&src, &dst, len);
    let guest = rmig_tests::Scripted::default();
    let (pauses, resumes) = (guest.pauses.clone(), guest.resumes.clone());
    setup.embedder = Box::new(guest);
    let dest = setup.dest_embedder.clone();
    let (s, d) = setup.run();
    let e = s
        .expect_err("the only lane was refused a chunk")
        .to_string();
    eprintln!("source: {e}");
    assert!(e.contains("all data lanes failed"), "{e}");
    assert!(names_the_chunk_refusal(&e), "the refusal is named: {e}");
    let de = d.expect_err("the destination does not complete");
    eprintln!("destination: {de}");
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(pauses.load(Relaxed), 0, "the source guest was never paused");
    assert_eq!(resumes.load(Relaxed), 0);
    assert_eq!(dest.resume_calls.load(Relaxed), 0, "no second guest");
    assert!(dest.device_state.lock().unwrap().is_none());
}

/// The same refusal with `auto` on both ends: the refused lane is written off and TCP lanes
/// take its place; the migration completes verified with the memories equal, and the fallback
/// reason names the refusal.
#[test]
#[ignore = "needs an RDMA device: tests/vm/rdma.sh"]
fn chunk_registration_refused_hands_the_lane_over_to_tcp() {
    let _deadline = Deadline::secs(300);
    let len = 32 * MIB;
    let src = Mem::random(len, 0.1, 32);
    let dst = Mem::new(len);
    let mut setup = asking_beyond_the_chunk_limit(&src, &dst, len);
    setup.src.transport = TransportChoice::Auto;
    setup.dst.transport = TransportChoice::Auto;
    let dest = setup.dest_embedder.clone();
    let (s, d) = setup.run();
    let s = s.expect("source");
    let d = d.expect("destination");
    assert_eq!((s.transport.as_str(), s.lanes_failed), ("tcp", 1));
    let why = s.fallback_reason.expect("a fallback reason");
    assert!(
        why.contains("every RDMA lane failed") && names_the_chunk_refusal(&why),
        "{why}"
    );
    assert_eq!(d.stats.transport, "tcp");
    assert_eq!(s.verified, Some(true));
    assert_eq!(
        dest.resume_calls.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_same(src.bytes(), dst.bytes());
}

/// A frame of a known type, within its size limit, whose body only the decoder can refuse
/// (an `Error` whose text is not UTF-8).
fn garbage_for_the_decoder() -> Vec<u8> {
    let body = [21u8, 3, 0, 0, 0, 0xff, 0xfe, 0xfd];
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(&body);
    f
}

/// The session id, lane number and MAC of a captured `LaneJoin`.
fn join_parts(m: &rmig_engine::protocol::Message) -> ([u8; 16], u16, [u8; 32]) {
    match m {
        rmig_engine::protocol::Message::LaneJoin { session, lane, mac } => (*session, *lane, *mac),
        other => unreachable!("filtered to LaneJoin: {other:?}"),
    }
}

/// Sends each hostile join to `addr` and checks the destination's answer names the refusal.
fn refused_each(addr: std::net::SocketAddr, cases: &[(Vec<u8>, &str)]) {
    for (bytes, why) in cases {
        let said = refusal(&send_and_read(addr, bytes));
        assert!(
            said.contains(why),
            "expected a refusal with {why:?}, got {said:?}"
        );
    }
}

/// The only RDMA lane fails mid-round, so the source opens a TCP lane in its place (lane 1,
/// a slot the destination keeps open for the session). Hostile joins arrive before that
/// fallback lane (a forged MAC on its slot, a real join on a wrong session id, garbage for the
/// decoder, a replay of the RDMA lane's join) and after it (a replay of the fallback lane's
/// join, which now takes a closed slot; its join on a wrong session id; its MAC on the next
/// lane number). Each is refused with its reason and counted; the honest fallback lane is
/// admitted and the migration completes over it, verified, with the memories equal.
#[test]
#[ignore = "needs an RDMA device: tests/vm/rdma.sh"]
fn fallback_tcp_lane_joins_mid_session_while_hostile_joins_are_refused() {
    use std::time::Duration;
    let _deadline = Deadline::secs(300);
    let ip = std::env::var("RMIG_RDMA_IP").expect("RMIG_RDMA_IP (tests/vm/rdma.sh sets it)");
    let len = 64 * MIB;
    let src = Mem::random(len, 0.1, 33);
    let dst = Mem::new(len);
    let mut setup = rdma_setup(&src, &dst, len);
    setup.src.transport = TransportChoice::Auto;
    setup.dst.transport = TransportChoice::Auto;
    setup.src.lanes = 1;
    // 8 MB/s: the RDMA lane fails about 2 s in, the TCP lane then runs about 6 s.
    setup.src.max_bandwidth = 8_000_000;
    setup.src.lane_faults = vec![fail_after(16 * MIB as u64)];
    let dm = setup.dst_monitor.clone();
    let dest_emb = setup.dest_embedder.clone();
    let (d, port) = setup.spawn_dest(&format!("{ip}:0")).unwrap();
    let addr: std::net::SocketAddr = format!("{ip}:{port}").parse().unwrap();
    // The relay listens on the RDMA address, so the source's connections leave from it and
    // the source opens the device that serves it.
    let cap = Capture::start_on(&format!("{ip}:0"), addr);
    setup.src.dest = cap.addr().to_string();
    let watch = setup.src_monitor.clone();
    let s = setup.spawn_source();
    // Data moving: lane 0 was admitted, the session runs over RDMA.
    let until = std::time::Instant::now() + Duration::from_secs(120);
    while watch.progress().transferred == 0 && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(watch.progress().transferred > 0, "the session started");
    let joins = cap.lane_joins(1);
    let (rdma_join, m) = joins
        .first()
        .expect("the RDMA lane joined through the relay");
    let (session, lane0, mac0) = join_parts(m);
    assert_eq!(lane0, 0);
    let mut other_session = session;
    other_session[0] ^= 1;
    let mut forged = mac0;
    forged[0] ^= 1;

    refused_each(
        addr,
        &[
            (lane_join(session, 1, forged), "could not prove"),
            (lane_join(other_session, 0, mac0), "could not prove"),
            (garbage_for_the_decoder(), "invalid UTF-8"),
            (rdma_join.clone(), "lane 0 is not expected"),
        ],
    );
    assert_eq!(
        (
            cap.lane_joins_within(2, Duration::ZERO).len(),
            watch.stats().transport.as_str()
        ),
        (1, "rdma"),
        "the hostile joins came before the fallback lane"
    );

    let joins = cap.lane_joins_within(2, Duration::from_secs(120));
    let (tcp_join, m) = joins.get(1).expect("a fallback lane joined");
    let (fb_session, lane1, mac1) = join_parts(m);
    assert_eq!(
        (fb_session, lane1),
        (session, 1),
        "the fallback lane is lane n = 1"
    );
    refused_each(
        addr,
        &[
            (tcp_join.clone(), "lane 1 is not expected"),
            (lane_join(other_session, 1, mac1), "could not prove"),
            (lane_join(session, 2, mac1), "could not prove"),
        ],
    );
    assert!(
        !s.is_finished(),
        "the hostile joins after the fallback came while the migration ran"
    );

    let stats = s.join().unwrap().expect("the source migrates");
    let out = d.join().unwrap().expect("the destination completes");
    drop(cap);
    assert_eq!((stats.transport.as_str(), stats.lanes_failed), ("tcp", 1));
    let why = stats.fallback_reason.expect("a fallback reason");
    assert!(why.contains("every RDMA lane failed"), "{why}");
    assert_eq!(out.stats.transport, "tcp");
    assert_eq!(stats.verified, Some(true));
    assert_eq!(
        dest_emb
            .resume_calls
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_same(src.bytes(), dst.bytes());
    let refused = dm.stats().connections_refused;
    assert!(refused >= 7, "each hostile join is counted: {refused}");
}
