//! Post-copy: a guest that dirties memory faster than the wire moves it still migrates. The
//! destination's guest runs before every page arrived, reads the source's bytes on every page
//! it touches (fetched on fault), and at the end the destination's memory equals the source's
//! as it was at the pause; the source never resumes its copy. A link lost after the switch
//! loses the guest at both ends, and nothing claims success.

use std::sync::atomic::Ordering;
use std::time::Duration;

use rmig_engine::protocol::codec::tag;
use rmig_engine::{EngineError, MigrationStatus, Postcopy, SharedDirtyLog, VerifyMode};
use rmig_tests::guest::ReadingGuest;
use rmig_tests::proxy::{Break, Proxy, Trigger};
use rmig_tests::{assert_same, Deadline, Mem, Setup, Writer};

const LEN: usize = 32 << 20;
const HOT: u64 = 2048; // 8 MiB rewritten all the time

/// A source whose writer rewrites 8 MiB about four times faster than its 20 MB/s ceiling,
/// with post-copy after two rounds.
fn outrun(src: &Mem, dst: &Mem) -> (Setup, Writer) {
    let log = SharedDirtyLog::new(&[(LEN / 4096) as u64]);
    let writer = Writer::start(src, log.clone(), HOT, 20);
    let mut setup = Setup::new(src, dst, LEN);
    setup.dirty = Box::new(log);
    setup.embedder = writer.embedder(b"device".to_vec());
    setup.src.max_bandwidth = 20_000_000;
    setup.src.policy.downtime_limit = Duration::from_millis(20);
    setup.src.policy.auto_converge = false;
    setup.src.policy.postcopy = Postcopy::AfterRounds(2);
    setup.src.verify = VerifyMode::Received;
    (setup, writer)
}

#[test]
fn a_guest_that_outruns_its_link_moves_with_postcopy_and_reads_the_source_bytes() {
    let _deadline = Deadline::secs(60);
    let src = Mem::random(LEN, 0.2, 1);
    let dst = Mem::new(LEN);
    let guest = ReadingGuest::new(&dst, HOT, 400);
    let (mut setup, mut writer) = outrun(&src, &dst);
    setup.dest_guest = Some(Box::new(guest.clone()));
    let (s, d) = setup.run();
    let s = s.expect("source");
    let d = d.expect("destination");
    assert!(writer.is_paused(), "the source's guest stays paused");
    assert_eq!(
        writer.resumed.load(Ordering::Relaxed),
        0,
        "the source never resumes"
    );
    writer.stop();
    assert_eq!(s.status, MigrationStatus::Completed);
    assert_eq!(s.verified, Some(true));
    assert_eq!(d.stats.verified, Some(true));
    let pc = d
        .stats
        .postcopy
        .clone()
        .expect("the destination ran post-copy");
    assert!(
        pc.pages_at_switch > 0,
        "pages were left for post-copy: {pc:?}"
    );
    assert_eq!(
        pc.pages_on_fault + pc.pages_background,
        pc.pages_at_switch,
        "every page left at the switch landed exactly once: {pc:?}"
    );
    assert!(pc.faults > 0, "the guest touched missing pages: {pc:?}");
    eprintln!(
        "post-copy figures: destination {pc:?}; source {:?}; downtime {} ms (source), {} ms \
         (destination)",
        s.postcopy, s.downtime_ms, d.stats.downtime_ms
    );
    assert!(s.postcopy.is_some(), "the source reports post-copy too");
    // The destination's pause ended at its resume, before post-copy ran: it is what the
    // source hears in the destination's figures, and a short time, not the whole transfer.
    let theirs = s
        .peer
        .clone()
        .expect("the destination's figures reach the source");
    assert!(
        theirs
            .downtime_us
            .abs_diff((d.stats.downtime_ms * 1e3) as u64)
            <= 1,
        "{theirs:?}"
    );
    assert!(
        d.stats.downtime_ms > 0.0 && d.stats.downtime_ms < d.stats.total_time_ms,
        "{:?}",
        d.stats
    );
    assert_eq!(guest.resumed.load(Ordering::Relaxed), 1);
    // The destination's guest ran before all its memory was there, and read what the
    // source held at the pause on every page it touched.
    guest.check_reads(&src);
    assert_same(src.bytes(), dst.bytes());
}

#[test]
fn a_link_lost_after_the_switch_loses_the_guest_at_both_ends() {
    let _deadline = Deadline::secs(60);
    let src = Mem::random(LEN, 0.2, 2);
    let dst = Mem::new(LEN);
    let guest = ReadingGuest::new(&dst, HOT, 400);
    let (mut setup, mut writer) = outrun(&src, &dst);
    setup.dest_guest = Some(Box::new(guest.clone()));
    // Everything is cut once `Resumed` reached the source, for good: the guest runs on the
    // destination with pages that will never come. Both ends wait out their reconnect window
    // (1 s here) before they say so.
    setup.src.reconnect_window = Duration::from_secs(1);
    setup.dst.reconnect_window = Duration::from_secs(1);
    let trigger = Trigger::Frame {
        to_dest: false,
        tag: tag::RESUMED,
        nth: 1,
    };
    let (sm, dm) = (setup.src_monitor.clone(), setup.dst_monitor.clone());
    let (s, d) = setup.run_via(|a| Proxy::start(a, trigger, Break::Cut));
    let se = s.expect_err("the source cannot succeed");
    let de = d.expect_err("the destination cannot succeed");
    assert!(matches!(se, EngineError::GuestLost(_)), "source: {se}");
    assert!(matches!(de, EngineError::GuestLost(_)), "destination: {de}");
    assert_eq!(
        writer.resumed.load(Ordering::Relaxed),
        0,
        "the source never resumes"
    );
    writer.stop();
    for (end, m) in [("source", sm), ("destination", dm)] {
        let st = m.stats();
        assert_eq!(st.status, MigrationStatus::GuestLost, "{end}");
        assert_eq!(st.verified, None, "{end}: nothing claims a verified copy");
        assert!(st.postcopy.is_some(), "{end} reports the post-copy phase");
        // The pause ended at `Resumed`; the failure came a reconnect window (1 s) later.
        assert!(
            st.downtime_ms < 1000.0,
            "{end}: downtime {} ms",
            st.downtime_ms
        );
    }
    // The destination's guest thread waits for pages that will not come: its memory stays
    // mapped (and its userfaultfd open) for the rest of the process.
    std::mem::forget(dst);
}

#[test]
fn a_two_second_outage_during_postcopy_is_ridden_out_and_verifies() {
    let _deadline = Deadline::secs(90);
    let src = Mem::random(LEN, 0.2, 3);
    let dst = Mem::new(LEN);
    let guest = ReadingGuest::new(&dst, HOT, 400);
    let (mut setup, mut writer) = outrun(&src, &dst);
    setup.dest_guest = Some(Box::new(guest.clone()));
    // Nothing moves for 2 s once `Resumed` reached the source, then every connection that
    // was open is reset: the source reconnects (control, lanes, fetch lane) and goes on; the
    // destination's faults wait meanwhile. Three lanes: the fetch lane's number follows the
    // lane count (twice it), and it must be let in again under that number.
    setup.src.lanes = 3;
    let trigger = Trigger::Frame {
        to_dest: false,
        tag: tag::RESUMED,
        nth: 1,
    };
    let outage = Break::Outage(Duration::from_secs(2));
    let (s, d) = setup.run_via(|a| Proxy::start(a, trigger, outage));
    let s = s.expect("source");
    let d = d.expect("destination");
    assert_eq!(
        writer.resumed.load(Ordering::Relaxed),
        0,
        "the source never resumes"
    );
    writer.stop();
    assert_eq!(s.status, MigrationStatus::Completed);
    assert!(
        s.reconnects >= 1,
        "the source reconnected: {}",
        s.reconnects
    );
    // The destination took back each reconnect (one more at most: a claim it answered that
    // the outage swallowed).
    assert!(
        (1..=s.reconnects + 1).contains(&d.stats.reconnects),
        "the destination counts {} reconnects, the source {}",
        d.stats.reconnects,
        s.reconnects
    );
    assert_eq!(d.stats.verified, Some(true));
    let pc = d.stats.postcopy.clone().expect("post-copy");
    assert!(
        pc.duration_ms >= 2000.0,
        "the outage was inside post-copy: {pc:?}"
    );
    guest.check_reads(&src);
    assert_same(src.bytes(), dst.bytes());
}

#[test]
fn a_source_that_freezes_after_the_switch_loses_the_guest_within_a_bound() {
    let _deadline = Deadline::secs(60);
    let src = Mem::random(LEN, 0.2, 4);
    let dst = Mem::new(LEN);
    let guest = ReadingGuest::new(&dst, HOT, 400);
    let (mut setup, mut writer) = outrun(&src, &dst);
    setup.dest_guest = Some(Box::new(guest.clone()));
    // Everything stays open but nothing moves once `Resumed` reached the source, as with a
    // source stopped by `kill -STOP`: the destination's faults get no answer. It must still
    // end (its fault thread's read has a deadline), saying the guest is lost.
    for live in [&mut setup.src.liveness, &mut setup.dst.liveness] {
        live.peer_timeout = Duration::from_secs(1);
        live.heartbeat = Duration::from_millis(200);
    }
    setup.src.reconnect_window = Duration::from_secs(1);
    setup.dst.reconnect_window = Duration::from_secs(1);
    let trigger = Trigger::Frame {
        to_dest: false,
        tag: tag::RESUMED,
        nth: 1,
    };
    let (s, d) = setup.run_via(|a| Proxy::start(a, trigger, Break::Freeze));
    let se = s.expect_err("the source cannot succeed");
    let de = d.expect_err("the destination cannot succeed");
    assert!(matches!(se, EngineError::GuestLost(_)), "source: {se}");
    assert!(matches!(de, EngineError::GuestLost(_)), "destination: {de}");
    assert_eq!(
        writer.resumed.load(Ordering::Relaxed),
        0,
        "the source never resumes"
    );
    writer.stop();
    std::mem::forget(dst);
}
