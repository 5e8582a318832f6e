//! End-to-end verification that fails: a lane sends one page as a zero marker instead of its
//! bytes (`FaultPlan::zero_a_page_after_bytes`), so the destination holds something other than
//! the source while every byte "received equals sent" check on the lane passes. Only the
//! checksums can tell, and they must: the migration fails, the destination does not resume,
//! and a paused source guest runs on.

use std::sync::atomic::Ordering;

use rmig_engine::{EngineError, MigrationStatus, SharedDirtyLog};
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
    let (s, d) = setup.run();
    let se = s.unwrap_err();
    assert!(matches!(se, EngineError::VerifyFailed(_)), "{se}");
    let de = d.unwrap_err();
    assert!(matches!(de, EngineError::VerifyFailed(_)), "{de}");
    assert_eq!(sm.stats().verified, Some(false));
    assert_eq!(sm.stats().status, MigrationStatus::Failed);
    assert_eq!(dm.stats().verified, Some(false));
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
    setup.src.verify = false;
    setup.src.lanes = 1;
    setup.src.lane_faults = vec![zero_a_page_after(MIB as u64)];
    let (s, d) = setup.run();
    assert_eq!(s.expect("completes").verified, None);
    d.expect("destination completes");
    assert_ne!(src.bytes(), dst.bytes(), "one page differs");
}
