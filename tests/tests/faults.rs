//! Migrations that must fail cleanly: a clear error on both ends, the destination never
//! complete, the source's memory untouched and able to migrate again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rmig_engine::{DestFault, EngineError, Key, NoConvergence, SharedDirtyLog, SourceEmbedder};
use rmig_tests::proxy::{LaneBreak, LaneFault, Proxy};
use rmig_tests::{assert_same, last_refusal, Deadline, Mem, Scripted, Setup, Writer};

const MIB: usize = 1 << 20;

/// After a failure the source can still migrate to a fresh destination.
fn migrate_again(src: &Mem, len: usize) {
    let dst = Mem::new(len);
    let (s, d) = Setup::new(src, &dst, len).run();
    s.expect("second migration");
    d.expect("second destination");
    assert_same(src.bytes(), dst.bytes());
}

fn snapshot(m: &Mem) -> Vec<u8> {
    m.bytes().to_vec()
}

#[test]
fn wrong_key_is_refused_on_both_ends() {
    let _deadline = Deadline::secs(120);
    let len = 4 * MIB;
    let src = Mem::random(len, 0.0, 1);
    let dst = Mem::new(len);
    let mut setup = Setup::new(&src, &dst, len);
    setup.src.key = Key::new(b"not the key, 16+ bytes").unwrap();
    setup.dst.incoming_timeout = Some(Duration::from_millis(1500));
    let (s, d) = setup.run();
    let de = last_refusal(d.unwrap_err());
    assert!(matches!(de, EngineError::Auth(_)), "{de}");
    let se = s.unwrap_err();
    assert!(se.to_string().contains("pre-shared key"), "{se}");
    assert!(dst.bytes().iter().all(|&b| b == 0), "nothing may land");
}

#[test]
fn version_mismatch_names_both_ranges() {
    let _deadline = Deadline::secs(120);
    let len = 4 * MIB;
    let src = Mem::random(len, 0.0, 1);
    let dst = Mem::new(len);
    let mut setup = Setup::new(&src, &dst, len);
    setup.src.versions = (7, 9);
    setup.dst.incoming_timeout = Some(Duration::from_millis(1500));
    let (s, d) = setup.run();
    let de = last_refusal(d.unwrap_err());
    assert!(
        matches!(
            de,
            EngineError::Version {
                peer_min: 7,
                peer_max: 9,
                ..
            }
        ),
        "{de}"
    );
    let se = s.unwrap_err();
    assert!(
        se.to_string().contains("no common protocol version"),
        "{se}"
    );
}

#[test]
fn region_table_mismatch_is_refused() {
    let _deadline = Deadline::secs(120);
    let len = 8 * MIB;
    let src = Mem::random(len, 0.0, 1);
    let dst = Mem::new(len);
    let mut setup = Setup::new(&src, &dst, len);
    setup.dst_regions = vec![dst.region(0, 0, 4 * MIB, 4096)];
    setup.dst.incoming_timeout = Some(Duration::from_millis(1500));
    let (s, d) = setup.run();
    let de = last_refusal(d.unwrap_err());
    assert!(matches!(de, EngineError::RegionMismatch(_)), "{de}");
    let se = s.unwrap_err();
    assert!(se.to_string().contains("region table mismatch"), "{se}");
}

#[test]
fn overlapping_regions_are_refused_before_connecting() {
    let _deadline = Deadline::secs(120);
    let len = 8 * MIB;
    let src = Mem::random(len, 0.0, 1);
    let dst = Mem::new(len);
    let mut setup = Setup::new(&src, &dst, len);
    setup.src_regions = vec![
        src.region(0, 0, 4 * MIB, 4096),
        src.region(1, 2 * MIB, 4 * MIB, 4096),
    ];
    let m = setup.dst_monitor.clone();
    let c = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        m.cancel("no source came");
    });
    let dm = setup.dst_monitor.clone();
    let (s, d) = setup.run();
    c.join().unwrap();
    let se = s.unwrap_err();
    assert!(
        matches!(se, EngineError::Config(ref m) if m.contains("regions 0 and 1 overlap in host memory")),
        "{se}"
    );
    // The source never connected: the destination saw no connection at all and ended only
    // on the cancellation.
    let de = d.unwrap_err();
    assert!(
        matches!(de, EngineError::Cancelled(ref r) if r == "no source came"),
        "{de}"
    );
    assert_eq!(dm.stats().connections_refused, 0);
    assert!(dst.bytes().iter().all(|&b| b == 0), "nothing landed");
}

#[test]
fn cancel_from_the_source() {
    let _deadline = Deadline::secs(120);
    let len = 64 * MIB;
    let src = Mem::random(len, 0.0, 2);
    let before = snapshot(&src);
    let dst = Mem::new(len);
    let mut setup = Setup::new(&src, &dst, len);
    setup.src.max_bandwidth = 20_000_000;
    let m = setup.src_monitor.clone();
    let c = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        m.cancel("operator said so");
    });
    let (s, d) = setup.run();
    c.join().unwrap();
    let se = s.unwrap_err();
    assert!(matches!(se, EngineError::Cancelled(_)), "{se}");
    let de = d.unwrap_err();
    assert!(
        matches!(de, EngineError::PeerCancelled(ref r) if r == "operator said so"),
        "{de}"
    );
    assert_same(&before, src.bytes());
    migrate_again(&src, len);
}

#[test]
fn cancel_from_the_destination() {
    let _deadline = Deadline::secs(120);
    let len = 64 * MIB;
    let src = Mem::random(len, 0.0, 3);
    let before = snapshot(&src);
    let dst = Mem::new(len);
    let mut setup = Setup::new(&src, &dst, len);
    setup.src.max_bandwidth = 20_000_000;
    let m = setup.dst_monitor.clone();
    let sm = setup.src_monitor.clone();
    let rec = setup.dest_embedder.clone();
    let c = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        m.cancel("destination host is going down");
    });
    let (s, d) = setup.run();
    c.join().unwrap();
    assert!(matches!(d.unwrap_err(), EngineError::Cancelled(_)));
    let se = s.unwrap_err();
    assert!(matches!(se, EngineError::PeerCancelled(_)), "{se}");
    assert_eq!(sm.stats().status, rmig_engine::MigrationStatus::Cancelled);
    assert!(
        !rec.resumed.load(Ordering::Acquire),
        "destination must not resume"
    );
    assert_same(&before, src.bytes());
    migrate_again(&src, len);
}

#[test]
fn destination_dying_mid_round_leaves_the_source_intact() {
    let _deadline = Deadline::secs(120);
    let len = 64 * MIB;
    let src = Mem::random(len, 0.0, 4);
    let before = snapshot(&src);
    let dst = Mem::new(len);
    let mut setup = Setup::new(&src, &dst, len);
    setup.dst.fault = DestFault {
        die_after_bytes: Some(16 * MIB as u64),
    };
    let rec = setup.dest_embedder.clone();
    let (s, d) = setup.run();
    assert!(d.is_err());
    let se = s.unwrap_err();
    assert!(
        matches!(
            se,
            EngineError::PeerClosed | EngineError::AllLanesFailed(_) | EngineError::Io(_)
        ),
        "{se}"
    );
    assert!(!rec.resumed.load(Ordering::Acquire));
    assert_same(&before, src.bytes());
    migrate_again(&src, len);
}

/// Wraps a source embedder: at the pause, marks the first `pages` pages of region 0 dirty, so
/// that the stop-and-copy has at least that much to send (the point of a fault placed by bytes
/// is then known to lie after the pause), and counts the pauses.
struct DirtyAtPause {
    inner: Box<dyn SourceEmbedder>,
    log: SharedDirtyLog,
    pages: u64,
    pauses: Arc<AtomicU64>,
}

impl SourceEmbedder for DirtyAtPause {
    fn pause(&mut self) -> Result<(), String> {
        self.inner.pause()?;
        self.pauses.fetch_add(1, Ordering::Relaxed);
        (0..self.pages).for_each(|p| self.log.mark(0, p));
        Ok(())
    }
    fn resume(&mut self) {
        self.inner.resume()
    }
    fn throttle(&mut self, percent: u8) {
        self.inner.throttle(percent)
    }
    fn device_state(&mut self) -> Result<Vec<u8>, String> {
        self.inner.device_state()
    }
}

#[test]
fn destination_dying_after_the_pause_resumes_the_guest() {
    let _deadline = Deadline::secs(60);
    let len = 32 * MIB;
    let src = Mem::random(len, 0.0, 5);
    let dst = Mem::new(len);
    let log = SharedDirtyLog::new(&[(len / 4096) as u64]);
    // A writer over 16 pages: a pre-copy round after round 0 sends at most 64 KiB.
    let mut w = Writer::start(&src, log.clone(), 16, 1);
    let mut setup = Setup::new(&src, &dst, len);
    setup.dirty = Box::new(log.clone());
    let pauses = Arc::new(AtomicU64::new(0));
    setup.embedder = Box::new(DirtyAtPause {
        inner: w.embedder(Vec::new()),
        log,
        pages: 1024,
        pauses: pauses.clone(),
    });
    setup.src.policy.max_rounds = 4;
    setup.src.policy.on_no_convergence = NoConvergence::ForceSwitchover;
    // Pre-copy lands at most `len` + 3 × 64 KiB; the stop-and-copy adds at least the 4 MiB
    // dirtied at the pause. So the destination dies after the pause, by construction.
    setup.dst.fault = DestFault {
        die_after_bytes: Some(len as u64 + MIB as u64),
    };
    let rec = setup.dest_embedder.clone();
    let (s, d) = setup.run();
    let se = s.unwrap_err();
    assert!(d.is_err());
    assert_eq!(
        pauses.load(Ordering::Relaxed),
        1,
        "the guest was paused: {se}"
    );
    assert_eq!(
        w.resumed.load(Ordering::Relaxed),
        1,
        "the source resumed its guest once: {se}"
    );
    assert!(
        !w.is_paused(),
        "a failed migration leaves the guest running"
    );
    assert!(!rec.resumed.load(Ordering::Acquire));
    w.stop();
}

#[test]
fn a_lane_failing_during_the_stop_and_copy_resumes_the_guest() {
    let _deadline = Deadline::secs(60);
    let len = 16 * MIB;
    let src = Mem::random(len, 0.0, 13);
    let before = snapshot(&src);
    let dst = Mem::new(len);
    let log = SharedDirtyLog::new(&[(len / 4096) as u64]);
    let mut setup = Setup::new(&src, &dst, len);
    setup.dirty = Box::new(log.clone());
    let emb = Scripted {
        dirty_on_pause: Some((log, 512)),
        ..Default::default()
    };
    setup.embedder = Box::new(emb.clone());
    // One lane: round 0 sends exactly `len` on it (nothing else writes), so the batch that
    // takes it past `len` belongs to the stop-and-copy.
    setup.src.lanes = 1;
    setup.src.lane_faults = vec![rmig_engine::fail_after(len as u64)];
    let rec = setup.dest_embedder.clone();
    let (s, d) = setup.run();
    let se = s.unwrap_err();
    assert!(matches!(se, EngineError::AllLanesFailed(_)), "{se}");
    assert!(d.is_err());
    assert_eq!(emb.pauses.load(Ordering::Relaxed), 1);
    assert_eq!(emb.resumes.load(Ordering::Relaxed), 1, "the guest runs on");
    assert!(!rec.resumed.load(Ordering::Acquire));
    assert_same(&before, src.bytes());
    migrate_again(&src, len);
}

#[test]
fn cancel_after_the_pause_resumes_the_guest_and_tells_the_destination() {
    let _deadline = Deadline::secs(60);
    let len = 16 * MIB;
    let src = Mem::random(len, 0.0, 14);
    let dst = Mem::new(len);
    let log = SharedDirtyLog::new(&[(len / 4096) as u64]);
    let mut setup = Setup::new(&src, &dst, len);
    setup.dirty = Box::new(log.clone());
    let emb = Scripted {
        dirty_on_pause: Some((log, 512)),
        cancel_on_pause: Some(setup.src_monitor.clone()),
        ..Default::default()
    };
    setup.embedder = Box::new(emb.clone());
    let rec = setup.dest_embedder.clone();
    let sm = setup.src_monitor.clone();
    let (s, d) = setup.run();
    let se = s.unwrap_err();
    assert!(
        matches!(se, EngineError::Cancelled(ref r) if r == "operator changed their mind"),
        "{se}"
    );
    let de = d.unwrap_err();
    assert!(
        matches!(de, EngineError::PeerCancelled(ref r) if r == "operator changed their mind"),
        "{de}"
    );
    assert_eq!(emb.pauses.load(Ordering::Relaxed), 1);
    assert_eq!(emb.resumes.load(Ordering::Relaxed), 1, "the guest runs on");
    assert_eq!(sm.stats().status, rmig_engine::MigrationStatus::Cancelled);
    assert!(!rec.resumed.load(Ordering::Acquire));
}

#[test]
fn dropping_a_session_between_rounds_cancels_the_destination() {
    let _deadline = Deadline::secs(60);
    let len = 16 * MIB;
    let src = Mem::random(len, 0.0, 15);
    let dst = Mem::new(len);
    let log = SharedDirtyLog::new(&[(len / 4096) as u64]);
    let mut w = Writer::start(&src, log.clone(), 2048, 20);
    let setup = Setup::new(&src, &dst, len);
    let rec = setup.dest_embedder.clone();
    let (d, port) = setup.spawn_dest("127.0.0.1:0").unwrap();
    let mut cfg = setup.src.clone();
    cfg.dest = format!("127.0.0.1:{port}");
    // However fast round 0 runs, the pages dirtied meanwhile are over this limit.
    cfg.policy.downtime_limit = Duration::from_micros(1);
    let mut s = rmig_engine::SourceSession::setup(
        cfg,
        setup.src_regions.clone(),
        Box::new(log),
        w.embedder(Vec::new()),
        rmig_engine::Monitor::new(),
    )
    .unwrap();
    // Round 0 sends everything; the writer keeps dirtying, so the policy asks for more.
    assert_eq!(s.iterate().unwrap(), rmig_engine::Step::Continue);
    drop(s);
    let de = d.join().unwrap().unwrap_err();
    assert!(
        matches!(de, EngineError::PeerCancelled(ref r) if r == "source session dropped"),
        "{de}"
    );
    assert!(!rec.resumed.load(Ordering::Acquire));
    assert!(!w.is_paused(), "the guest was never paused");
    assert_eq!(w.resumed.load(Ordering::Relaxed), 0);
    w.stop();
}

#[test]
fn a_lane_dying_mid_round_is_survived() {
    let _deadline = Deadline::secs(120);
    let len = 64 * MIB;
    let src = Mem::random(len, 0.0, 6);
    let dst = Mem::new(len);
    let mut setup = Setup::new(&src, &dst, len);
    setup.src.lanes = 3;
    setup.src.lane_faults = vec![Default::default(), rmig_engine::fail_after(2 * MIB as u64)];
    let (s, d) = setup.run();
    let s = s.expect("completes over the other lanes");
    d.expect("destination");
    assert_eq!(s.lanes_failed, 1);
    assert_eq!(s.verified, Some(true));
    assert_same(src.bytes(), dst.bytes());
}

#[test]
fn every_lane_dying_fails_cleanly() {
    let _deadline = Deadline::secs(120);
    let len = 32 * MIB;
    let src = Mem::random(len, 0.0, 7);
    let before = snapshot(&src);
    let dst = Mem::new(len);
    let mut setup = Setup::new(&src, &dst, len);
    setup.src.lanes = 2;
    setup.src.lane_faults = vec![rmig_engine::fail_after(MIB as u64); 2];
    // Without a reconnect window (with one, the source would open its lanes again).
    setup.src.reconnect_window = Duration::ZERO;
    let (s, d) = setup.run();
    let se = s.unwrap_err();
    assert!(matches!(se, EngineError::AllLanesFailed(_)), "{se}");
    assert!(d.is_err());
    assert_same(&before, src.bytes());
}

#[test]
fn a_lane_whose_peer_closes_is_survived() {
    let _deadline = Deadline::secs(120);
    let len = 64 * MIB;
    let src = Mem::random(len, 0.0, 10);
    let dst = Mem::new(len);
    let mut setup = Setup::new(&src, &dst, len);
    setup.src.lanes = 3;
    let fault = LaneFault {
        lane: 1,
        after: 2 * MIB as u64,
        action: LaneBreak::PeerCloses,
    };
    let (s, d) = setup.run_via(|dest| Proxy::with_lane_fault(dest, fault));
    let s = s.expect("completes over the other lanes");
    let d = d.expect("destination");
    assert_eq!(s.lanes_failed, 1);
    // The destination saw its end of that lane break too, and counts it.
    assert_eq!(d.stats.lanes_failed, 1, "{:?}", d.stats);
    assert_eq!(s.verified, Some(true));
    assert_same(src.bytes(), dst.bytes());
}

/// A lane whose destination stays connected, takes its data and never acknowledges it.
fn never_acked(lane: usize) -> LaneFault {
    LaneFault {
        lane,
        after: MIB as u64,
        action: LaneBreak::NeverAcks,
    }
}

#[test]
fn a_lane_never_acknowledged_times_out_while_the_others_carry_on() {
    let _deadline = Deadline::secs(120);
    let len = 64 * MIB;
    let src = Mem::random(len, 0.0, 11);
    let dst = Mem::new(len);
    let mut setup = Setup::new(&src, &dst, len);
    setup.src.lanes = 3;
    setup.src.liveness.peer_timeout = Duration::from_secs(1);
    let t = std::time::Instant::now();
    let (s, d) = setup.run_via(|dest| Proxy::with_lane_fault(dest, never_acked(1)));
    let s = s.expect("completes over the other lanes");
    d.expect("destination");
    assert_eq!(s.lanes_failed, 1);
    assert_eq!(s.verified, Some(true));
    assert_same(src.bytes(), dst.bytes());
    // A lane waits twice the peer timeout for its last acknowledgement.
    assert!(t.elapsed() >= Duration::from_secs(2), "{:?}", t.elapsed());
}

#[test]
fn a_lone_lane_never_acknowledged_fails_with_an_ack_timeout() {
    let _deadline = Deadline::secs(120);
    let len = 8 * MIB;
    let src = Mem::random(len, 0.0, 12);
    let before = snapshot(&src);
    let dst = Mem::new(len);
    let mut setup = Setup::new(&src, &dst, len);
    setup.src.lanes = 1;
    setup.src.liveness.peer_timeout = Duration::from_secs(1);
    // Without a reconnect window: with one, the source reopens its lane and completes.
    setup.src.reconnect_window = Duration::ZERO;
    let t = std::time::Instant::now();
    let (s, d) = setup.run_via(|dest| Proxy::with_lane_fault(dest, never_acked(0)));
    let se = s.unwrap_err();
    assert!(
        matches!(se, EngineError::AllLanesFailed(ref m) if m.contains("no acknowledgement")),
        "{se}"
    );
    assert!(d.is_err());
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert_same(&before, src.bytes());
}

#[test]
fn not_converging_fails_with_a_reason_and_the_guest_runs_on() {
    let _deadline = Deadline::secs(120);
    // The writer dirties all 8 MiB far faster than the 40 MB/s ceiling lets rounds send them.
    let len = 8 * MIB;
    let src = Mem::random(len, 0.0, 8);
    let dst = Mem::new(len);
    let log = SharedDirtyLog::new(&[(len / 4096) as u64]);
    let mut w = Writer::start(&src, log.clone(), 2048, 300);
    let mut setup = Setup::new(&src, &dst, len);
    setup.dirty = Box::new(log);
    setup.embedder = w.embedder(Vec::new());
    setup.src.max_bandwidth = 40_000_000;
    setup.src.policy.downtime_limit = Duration::from_millis(1);
    setup.src.policy.max_rounds = 5;
    let (s, d) = setup.run();
    let se = s.unwrap_err();
    assert!(matches!(se, EngineError::NotConverged(_)), "{se}");
    assert!(se.to_string().contains("after 5 rounds"), "{se}");
    assert!(d.is_err());
    assert!(!w.is_paused());
    assert!(
        w.throttle.load(Ordering::Relaxed) > 0,
        "auto-converge throttled the guest"
    );
    w.stop();
}

#[test]
fn a_silent_peer_is_detected_within_seconds() {
    let _deadline = Deadline::secs(120);
    let len = 64 * MIB;
    let src = Mem::random(len, 0.0, 9);
    let dst = Mem::new(len);
    let mut setup = Setup::new(&src, &dst, len);
    // The destination sends no heartbeat; the source waits at most one second for one.
    setup.dst.liveness.heartbeat = Duration::from_secs(3600);
    setup.src.liveness.peer_timeout = Duration::from_secs(1);
    setup.src.max_bandwidth = 10_000_000;
    // What is measured here is the detection itself, not the reconnect after it.
    setup.src.reconnect_window = Duration::ZERO;
    let t = std::time::Instant::now();
    let (s, _) = setup.run();
    let se = s.unwrap_err();
    assert!(matches!(se, EngineError::PeerSilent(_)), "{se}");
    assert!(t.elapsed() < Duration::from_secs(5));
}
