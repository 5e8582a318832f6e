//! End-to-end verification that fails: a lane sends one page as a zero marker instead of its
//! bytes (`FaultPlan::zero_a_page_after_bytes`), so the destination holds something other than
//! the source while every byte "received equals sent" check on the lane passes. Only the
//! checksums can tell, and they must: the migration fails, the destination does not resume,
//! and a paused source guest runs on.
//!
//! And what each mode promises: a destination thread that flips one byte of destination memory
//! after its page landed (a page no later round sends again) is caught by
//! `VerifyMode::Memory`, and missed by `VerifyMode::Received`, which only proves that the
//! bytes received equal the bytes sent (the control case).

use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

use rmig_engine::SourceEmbedder;
use rmig_engine::{EngineError, MigrationStatus, SharedDirtyLog, VerifyMode};
use rmig_tests::{assert_same, Deadline, Mem, Scripted, Setup};
use rmig_transport::FaultPlan;

const MIB: usize = 1 << 20;

fn zero_a_page_after(bytes: u64) -> FaultPlan {
    FaultPlan {
        zero_a_page_after_bytes: Some(bytes),
        ..Default::default()
    }
}

#[test]
fn a_page_corrupted_in_round_0_fails_verification_before_the_pause() {
    let _deadline = Deadline::secs(60);
    let len = 16 * MIB;
    let src = Mem::random(len, 0.0, 31);
    let before = src.bytes().to_vec();
    let dst = Mem::new(len);
    let mut setup = Setup::new(&src, &dst, len);
    let emb = Scripted::default();
    setup.embedder = Box::new(emb.clone());
    setup.src.lanes = 1;
    setup.src.lane_faults = vec![zero_a_page_after(MIB as u64)];
    let rec = setup.dest_embedder.clone();
    let (dm, sm) = (setup.dst_monitor.clone(), setup.src_monitor.clone());
    let (s, d) = setup.run();
    let se = s.unwrap_err();
    assert!(matches!(se, EngineError::VerifyFailed(_)), "{se}");
    assert!(
        se.to_string().contains("region 0"),
        "names the region: {se}"
    );
    let de = d.unwrap_err();
    assert!(matches!(de, EngineError::VerifyFailed(_)), "{de}");
    assert_eq!(sm.stats().verified, Some(false));
    assert_eq!(sm.stats().status, MigrationStatus::Failed);
    assert_eq!(dm.stats().verified, Some(false));
    // Caught by the baseline, while the guest still ran: it was never paused.
    assert_eq!(emb.pauses.load(Ordering::Relaxed), 0);
    assert_eq!(emb.device_state_calls.load(Ordering::Relaxed), 0);
    assert!(!rec.resumed.load(Ordering::Acquire));
    assert!(rec.device_state.lock().unwrap().is_none());
    // The lie really happened: exactly one page differs, and it is zero.
    let differing: Vec<usize> = (0..len / 4096)
        .filter(|&p| src.bytes()[p * 4096..][..4096] != dst.bytes()[p * 4096..][..4096])
        .collect();
    assert_eq!(differing.len(), 1, "{differing:?}");
    let p = differing[0];
    assert!(dst.bytes()[p * 4096..][..4096].iter().all(|&b| b == 0));
    assert_same(&before, src.bytes());
}

#[test]
fn a_page_corrupted_in_the_stop_and_copy_fails_verification_and_resumes_the_source() {
    let _deadline = Deadline::secs(60);
    let len = 16 * MIB;
    let src = Mem::random(len, 0.0, 32);
    let dst = Mem::new(len);
    let log = SharedDirtyLog::new(&[(len / 4096) as u64]);
    let mut setup = Setup::new(&src, &dst, len);
    setup.dirty = Box::new(log.clone());
    let emb = Scripted {
        dirty_on_pause: Some((log, 256)),
        device_state: b"devices".to_vec(),
        ..Default::default()
    };
    setup.embedder = Box::new(emb.clone());
    // One lane, nothing writing: round 0 sends exactly `len` on it, so the page sent as zeros
    // is one of the 256 dirtied at the pause.
    setup.src.lanes = 1;
    setup.src.lane_faults = vec![zero_a_page_after(len as u64)];
    let rec = setup.dest_embedder.clone();
    let (dm, sm) = (setup.dst_monitor.clone(), setup.src_monitor.clone());
    let started = std::time::Instant::now();
    let (s, d) = setup.run();
    let wall_ms = started.elapsed().as_secs_f64() * 1e3;
    let se = s.unwrap_err();
    assert!(matches!(se, EngineError::VerifyFailed(_)), "{se}");
    let de = d.unwrap_err();
    assert!(matches!(de, EngineError::VerifyFailed(_)), "{de}");
    assert_eq!(sm.stats().verified, Some(false));
    assert_eq!(sm.stats().status, MigrationStatus::Failed);
    assert_eq!(dm.stats().verified, Some(false));
    // The failed destination still reports its pause (from the stop-and-copy to the failure)
    // and its whole time, in milliseconds: a pause of at least 10 µs, inside the run.
    let ds = dm.stats();
    assert!(
        ds.downtime_ms > 0.01 && ds.downtime_ms <= ds.total_time_ms && ds.total_time_ms <= wall_ms,
        "downtime {} ms, total {} ms, run {wall_ms} ms",
        ds.downtime_ms,
        ds.total_time_ms
    );
    assert_eq!(emb.pauses.load(Ordering::Relaxed), 1);
    assert_eq!(
        emb.resumes.load(Ordering::Relaxed),
        1,
        "the source's guest runs on"
    );
    assert!(!rec.resumed.load(Ordering::Acquire), "never resumed");
    assert_eq!(rec.resume_calls.load(Ordering::Relaxed), 0);
    let differing = (0..len / 4096)
        .filter(|&p| src.bytes()[p * 4096..][..4096] != dst.bytes()[p * 4096..][..4096])
        .count();
    assert_eq!(differing, 1);
}

#[test]
fn without_verification_the_same_corruption_goes_unseen() {
    // The control experiment: the lie is invisible to everything but the checksums.
    let _deadline = Deadline::secs(60);
    let len = 8 * MIB;
    let src = Mem::random(len, 0.0, 33);
    let dst = Mem::new(len);
    let mut setup = Setup::new(&src, &dst, len);
    setup.src.verify = VerifyMode::Off;
    setup.src.lanes = 1;
    setup.src.lane_faults = vec![zero_a_page_after(MIB as u64)];
    let (s, d) = setup.run();
    assert_eq!(s.expect("completes").verified, None);
    d.expect("destination completes");
    assert_ne!(src.bytes(), dst.bytes(), "one page differs");
}

/// A source embedder whose `pause` first has a destination thread write destination memory
/// (so the write comes after every pre-copy page landed and before the stop-and-copy), then
/// pauses as `inner` does.
struct StrayWriteAtPause {
    inner: Scripted,
    ask: mpsc::SyncSender<()>,
    done: mpsc::Receiver<()>,
}

impl SourceEmbedder for StrayWriteAtPause {
    fn pause(&mut self) -> Result<(), String> {
        if self.ask.send(()).is_ok() {
            self.done
                .recv_timeout(Duration::from_secs(30))
                .expect("the stray write happened");
        }
        self.inner.pause()
    }
    fn resume(&mut self) {
        self.inner.resume()
    }
    fn device_state(&mut self) -> Result<Vec<u8>, String> {
        self.inner.device_state()
    }
}

/// The page whose byte the stray write flips, in chunk 5, which the stop-and-copy (pages
/// 0..256, dirtied at the pause) does not touch.
const STRAY_PAGE: usize = 5 * 512 + 100;

/// Migrates 16 MiB with `mode` while a destination thread flips one byte of `STRAY_PAGE`
/// after it landed. Returns both results, the source embedder's counters, the destination
/// embedder's record, both monitors, and how many bytes differ between the memories.
fn migrate_with_a_stray_write(
    mode: VerifyMode,
    seed: u64,
) -> (
    Result<rmig_engine::MigrationStats, EngineError>,
    Result<rmig_engine::DestOutcome, EngineError>,
    Scripted,
    rmig_tests::RecordingDest,
    rmig_engine::MigrationStats,
    usize,
) {
    let len = 16 * MIB;
    let src = Mem::random(len, 0.0, seed);
    let dst = Mem::new(len);
    let log = SharedDirtyLog::new(&[(len / 4096) as u64]);
    let mut setup = Setup::new(&src, &dst, len);
    setup.src.verify = mode;
    setup.dirty = Box::new(log.clone());
    let inner = Scripted {
        dirty_on_pause: Some((log, 256)),
        device_state: b"devices".to_vec(),
        ..Default::default()
    };
    let (ask, asked) = mpsc::sync_channel(1);
    let (did, done) = mpsc::sync_channel(1);
    setup.embedder = Box::new(StrayWriteAtPause {
        inner: inner.clone(),
        ask,
        done,
    });
    let at = dst.ptr() as usize + STRAY_PAGE * 4096 + 7;
    // The stray writer: a destination thread other than the lanes, writing a page that
    // landed in round 0 and is never sent again.
    let stray = std::thread::spawn(move || {
        if asked.recv_timeout(Duration::from_secs(60)).is_ok() {
            let p = at as *mut u8;
            // SAFETY: `at` is inside `dst`, which outlives this thread (joined below); no lane
            // writes this page any more (round 0 is acknowledged and the page is clean).
            unsafe { p.write_volatile(p.read_volatile() ^ 0x5a) };
            did.send(()).expect("the source waits for the write");
        }
    });
    let rec = setup.dest_embedder.clone();
    let sm = setup.src_monitor.clone();
    let (s, d) = setup.run();
    stray.join().expect("stray writer");
    let differing = src
        .bytes()
        .iter()
        .zip(dst.bytes())
        .filter(|(a, b)| a != b)
        .count();
    (s, d, inner, rec, sm.stats(), differing)
}

#[test]
fn memory_verification_catches_a_write_after_a_page_landed() {
    let _deadline = Deadline::secs(60);
    let (s, d, emb, rec, stats, differing) = migrate_with_a_stray_write(VerifyMode::Memory, 34);
    assert_eq!(differing, 1, "the stray write really happened");
    let se = s.unwrap_err();
    assert!(matches!(se, EngineError::VerifyFailed(_)), "{se}");
    assert!(
        se.to_string().contains("region 0 chunk 5"),
        "names it: {se}"
    );
    let de = d.unwrap_err();
    assert!(matches!(de, EngineError::VerifyFailed(_)), "{de}");
    assert!(de.to_string().contains("no longer holds"), "{de}");
    assert_eq!(stats.verified, Some(false));
    assert_eq!(stats.status, MigrationStatus::Failed);
    // Caught in the pause: the source's guest runs on, the destination's never starts.
    assert_eq!(emb.pauses.load(Ordering::Relaxed), 1);
    assert_eq!(emb.resumes.load(Ordering::Relaxed), 1);
    assert!(!rec.resumed.load(Ordering::Acquire), "never resumed");
    assert_eq!(rec.resume_calls.load(Ordering::Relaxed), 0);
}

#[test]
fn received_verification_misses_a_write_after_a_page_landed() {
    // The control case: what was received equals what was sent, so this mode says "verified"
    // and the destination resumes with one byte different from the source.
    let _deadline = Deadline::secs(60);
    let (s, d, emb, rec, stats, differing) = migrate_with_a_stray_write(VerifyMode::Received, 35);
    assert_eq!(s.expect("completes").verified, Some(true));
    d.expect("destination completes");
    assert_eq!(stats.verified, Some(true));
    assert_eq!(differing, 1, "and yet one byte differs");
    assert_eq!(emb.pauses.load(Ordering::Relaxed), 1);
    assert_eq!(emb.resumes.load(Ordering::Relaxed), 0);
    assert!(rec.resumed.load(Ordering::Acquire));
}

#[test]
fn memory_verification_passes_when_nothing_strays() {
    let _deadline = Deadline::secs(60);
    let len = 16 * MIB;
    let src = Mem::random(len, 0.3, 36);
    let dst = Mem::new(len);
    let log = SharedDirtyLog::new(&[(len / 4096) as u64]);
    let mut setup = Setup::new(&src, &dst, len);
    setup.src.verify = VerifyMode::Memory;
    setup.dirty = Box::new(log.clone());
    setup.embedder = Box::new(Scripted {
        dirty_on_pause: Some((log, 300)),
        ..Default::default()
    });
    let (s, d) = setup.run();
    assert_eq!(s.expect("completes").verified, Some(true));
    d.expect("destination completes");
    assert_same(src.bytes(), dst.bytes());
}
