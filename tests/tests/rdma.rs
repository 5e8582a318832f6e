//! Migrations over RDMA. The ones marked `ignore` need an RDMA device whose address is in
//! `RMIG_RDMA_IP`: `tests/vm/rdma.sh` brings soft-RoCE up (natively where the kernel has
//! `rdma_rxe`, else in a QEMU guest) and runs them with `--ignored`.

use rmig_engine::{bad_rkey_after, fail_after, Registration, SharedDirtyLog, TransportChoice};
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
