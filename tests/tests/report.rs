//! What each end learns of the other after a migration, and a listener that serves one
//! source after another.
//!
//! Each end sends its own figures after the handover (`Figures`), so both statistics hold
//! both ends' views, as iperf3 shows sender and receiver on both sides. A destination that
//! serves again keeps its listener bound, so a source that connects between two migrations
//! waits in the backlog instead of being refused.

use std::sync::Arc;
use std::time::Duration;

use rmig_engine::{driver, DestListener, MemoryFacts, MigrationStatus};
use rmig_tests::{assert_same, Deadline, Mem, Setup};

const MIB: usize = 1 << 20;

fn facts(prefaulted: bool, huge: u64, note: &str) -> MemoryFacts {
    MemoryFacts {
        prefaulted: Some(prefaulted),
        huge_bytes: Some(huge),
        huge_pages: note.into(),
    }
}

#[test]
fn both_ends_hold_each_other_s_figures() {
    let _deadline = Deadline::secs(120);
    let len = 32 * MIB;
    let src = Mem::random(len, 0.0, 7);
    let dst = Mem::new(len);
    let setup = Setup::new(&src, &dst, len);
    let (src_facts, dst_facts) = (facts(true, 2 * MIB as u64, "src"), facts(false, 0, "dst"));
    setup.src_monitor.set_memory_facts(src_facts.clone());
    setup.dst_monitor.set_memory_facts(dst_facts.clone());
    let started = std::time::Instant::now();
    let (s, d) = setup.run();
    let wall_ms = started.elapsed().as_secs_f64() * 1e3;
    let (s, d) = (s.expect("source"), d.expect("destination").stats);
    assert_eq!(s.status, MigrationStatus::Completed);
    assert_eq!(d.status, MigrationStatus::Completed);
    assert_same(src.bytes(), dst.bytes());

    // The source holds what the destination saw and how its memory was prepared.
    let theirs = s
        .peer
        .clone()
        .expect("the destination's figures reach the source");
    assert_eq!(theirs.page_bytes, len as u64, "{theirs:?}");
    assert_eq!(theirs.rounds as usize, s.rounds.len(), "{theirs:?}");
    assert_eq!(theirs.memory, dst_facts);
    assert!(theirs.downtime_us > 0 && theirs.total_us > theirs.setup_us);
    assert!(theirs.rate > 0, "{theirs:?}");
    // And the reverse.
    let ours = d
        .peer
        .clone()
        .expect("the source's figures reach the destination");
    assert_eq!(ours.page_bytes, s.ram.normal_bytes, "{ours:?}");
    assert_eq!(ours.rounds as usize, s.rounds.len());
    assert_eq!(ours.memory, src_facts);
    assert_eq!(ours.downtime_us, (s.downtime_ms * 1e3) as u64, "{ours:?}");
    // Each end's own pause: the destination's is inside the source's (which waits for Done).
    assert!(
        d.downtime_ms > 0.0 && d.downtime_ms <= s.downtime_ms,
        "{d:?}"
    );
    assert_eq!(d.memory, Some(dst_facts));
    // Each end's whole time, in milliseconds: inside the run, and longer than its pause and
    // than the other end's setup.
    for (end, total, pause) in [
        ("source", s.total_time_ms, s.downtime_ms),
        ("destination", d.total_time_ms, d.downtime_ms),
    ] {
        assert!(
            total > pause && total <= wall_ms,
            "{end}: total {total} ms, pause {pause} ms, run {wall_ms} ms"
        );
    }
    assert!(d.total_time_ms * 1e3 > theirs.setup_us as f64, "{d:?}");
    // The destination's setup (handshake to lanes open), in milliseconds as its figures say.
    // (A handshake and lanes joining take well over 10 µs, even on loopback.)
    assert!(
        d.setup_time_ms > 0.01 && d.setup_time_ms < d.total_time_ms,
        "{d:?}"
    );
    assert!(
        theirs.setup_us.abs_diff((d.setup_time_ms * 1e3) as u64) <= 1,
        "{theirs:?}"
    );
    // Cleartext TCP: neither end claims encrypted data lanes.
    assert!(!s.data_lanes_encrypted && !d.data_lanes_encrypted);
}

#[test]
fn a_listener_serves_a_source_that_connected_between_two_migrations() {
    let _deadline = Deadline::secs(120);
    let len = 16 * MIB;
    let src = Mem::random(len, 0.0, 3);
    let dst = Mem::new(len);
    let first = Setup::new(&src, &dst, len);
    let listener = Arc::new(DestListener::bind("127.0.0.1:0", first.dst.clone()).expect("bind"));
    let addr = listener.local_addr().unwrap().to_string();

    // One migration: the listener is still ours when it ends.
    let serve = |s: &Setup| {
        let (l, regions) = (listener.clone(), s.dst_regions.clone());
        let (emb, m) = (s.dest_embedder.clone(), s.dst_monitor.clone());
        move || l.serve(regions, Box::new(emb), m)
    };
    let d = std::thread::spawn(serve(&first));
    let mut cfg = first.src;
    cfg.dest = addr.clone();
    let s = driver::migrate(
        cfg,
        first.src_regions,
        first.dirty,
        first.embedder,
        first.src_monitor,
    );
    assert_eq!(s.expect("first source").status, MigrationStatus::Completed);
    assert!(d.join().unwrap().is_ok());

    // The next source connects before anyone serves: it waits in the backlog.
    let mut second = Setup::new(&src, &dst, len);
    let serve_second = serve(&second);
    second.src.dest = addr;
    let s = second.spawn_source();
    std::thread::sleep(Duration::from_millis(300));
    let d = std::thread::spawn(serve_second);
    let s = s.join().unwrap().expect("second source");
    assert_eq!(s.status, MigrationStatus::Completed);
    assert_eq!(
        d.join().unwrap().expect("second migration").stats.status,
        MigrationStatus::Completed
    );
    assert_same(src.bytes(), dst.bytes());
}

#[test]
fn the_destination_shows_its_progress_within_round_0() {
    let _deadline = Deadline::secs(120);
    let len = 32 * MIB;
    let src = Mem::random(len, 0.0, 5);
    let dst = Mem::new(len);
    let mut setup = Setup::new(&src, &dst, len);
    // Round 0 at 32 MB/s takes about a second: its first 700 ms are all inside it.
    setup.src.max_bandwidth = 32_000_000;
    let dm = setup.dst_monitor.clone();
    let watch = std::thread::spawn(move || {
        let started = std::time::Instant::now();
        let mut seen = Vec::new();
        while started.elapsed() < Duration::from_millis(700) {
            seen.push(dm.progress().transferred);
            std::thread::sleep(Duration::from_millis(20));
        }
        seen
    });
    let (s, d) = setup.run();
    let seen = watch.join().unwrap();
    assert_eq!(s.expect("source").status, MigrationStatus::Completed);
    assert_eq!(
        d.expect("destination").stats.status,
        MigrationStatus::Completed
    );
    // What landed shows while the round still runs, not only when it closes.
    assert!(
        seen.iter().any(|&b| b > 0 && b < len as u64),
        "the destination's progress during round 0: {seen:?}"
    );
    assert_same(src.bytes(), dst.bytes());
}
