//! Every embedder callback failing, and what each end then does: a failure before the pause
//! leaves the guest running where it was; one after the pause resumes it on the source, as
//! long as the destination has not been told to run it; the destination never resumes a
//! guest it could not load.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rmig_engine::bitmap::AtomicBitmap;
use rmig_engine::{DirtySource, EngineError, MigrationStatus, SharedDirtyLog};
use rmig_tests::{assert_same, Deadline, Mem, Scripted, Setup};

const MIB: usize = 1 << 20;

/// A dirty log whose sync fails from the `fail_at`-th call on (counting from 1).
struct FailingDirty {
    log: SharedDirtyLog,
    calls: Arc<AtomicU64>,
    fail_at: u64,
}

impl DirtySource for FailingDirty {
    fn sync(&mut self, region: usize, into: &AtomicBitmap) -> Result<u64, EngineError> {
        let n = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= self.fail_at {
            return Err(EngineError::Embedder("KVM_GET_DIRTY_LOG failed".into()));
        }
        self.log.sync(region, into)
    }
}

/// A migration of `len` bytes with a scripted source embedder; returns both ends' results,
/// the embedder's counters and whether the destination resumed.
fn run(
    len: usize,
    seed: u64,
    emb: Scripted,
    edit: impl FnOnce(&mut Setup),
) -> (Result<(), EngineError>, Result<(), EngineError>, bool, Mem) {
    let src = Mem::random(len, 0.0, seed);
    let before = src.bytes().to_vec();
    let dst = Mem::new(len);
    let mut setup = Setup::new(&src, &dst, len);
    setup.embedder = Box::new(emb);
    edit(&mut setup);
    let rec = setup.dest_embedder.clone();
    let (s, d) = setup.run();
    assert_same(&before, src.bytes());
    let resumed = rec.resumed.load(Ordering::Acquire);
    (s.map(|_| ()), d.map(|_| ()), resumed, dst)
}

#[test]
fn a_failing_dirty_sync_fails_before_the_pause() {
    let _deadline = Deadline::secs(60);
    let len = 8 * MIB;
    let calls = Arc::new(AtomicU64::new(0));
    let emb = Scripted::default();
    let c = calls.clone();
    let (s, d, resumed, _) = run(len, 41, emb.clone(), |setup| {
        setup.dirty = Box::new(FailingDirty {
            log: SharedDirtyLog::new(&[(len / 4096) as u64]),
            calls: c,
            fail_at: 2,
        });
    });
    let se = s.unwrap_err();
    assert!(
        matches!(se, EngineError::Embedder(ref m) if m.contains("KVM_GET_DIRTY_LOG")),
        "{se}"
    );
    assert!(calls.load(Ordering::Relaxed) >= 2);
    let de = d.unwrap_err();
    assert!(
        matches!(de, EngineError::PeerError(ref m) if m.contains("KVM_GET_DIRTY_LOG")),
        "the destination is told why: {de}"
    );
    assert!(!resumed);
    assert_eq!(emb.pauses.load(Ordering::Relaxed), 0);
    assert_eq!(emb.resumes.load(Ordering::Relaxed), 0);
}

#[test]
fn a_failing_pause_fails_and_nothing_resumes() {
    let _deadline = Deadline::secs(60);
    let emb = Scripted {
        fail_pause: true,
        ..Default::default()
    };
    let (s, d, resumed, _) = run(8 * MIB, 42, emb.clone(), |_| {});
    let se = s.unwrap_err();
    assert!(
        matches!(se, EngineError::Embedder(ref m) if m.contains("would not stop")),
        "{se}"
    );
    let de = d.unwrap_err();
    assert!(
        matches!(de, EngineError::PeerError(ref m) if m.contains("would not stop")),
        "{de}"
    );
    assert!(!resumed);
    assert_eq!(emb.pauses.load(Ordering::Relaxed), 1);
    // The guest never stopped, so there is nothing to resume.
    assert_eq!(emb.resumes.load(Ordering::Relaxed), 0);
    assert_eq!(emb.device_state_calls.load(Ordering::Relaxed), 0);
}

#[test]
fn a_failing_device_state_save_resumes_the_source() {
    let _deadline = Deadline::secs(60);
    let emb = Scripted {
        fail_device_state: true,
        ..Default::default()
    };
    let (s, d, resumed, _) = run(8 * MIB, 43, emb.clone(), |_| {});
    let se = s.unwrap_err();
    assert!(
        matches!(se, EngineError::Embedder(ref m) if m.contains("could not save")),
        "{se}"
    );
    let de = d.unwrap_err();
    assert!(
        matches!(de, EngineError::PeerError(ref m) if m.contains("could not save")),
        "{de}"
    );
    assert!(!resumed);
    assert_eq!(emb.pauses.load(Ordering::Relaxed), 1);
    assert_eq!(emb.resumes.load(Ordering::Relaxed), 1);
}

#[test]
fn a_destination_that_cannot_load_the_device_state_refuses_and_the_source_resumes() {
    let _deadline = Deadline::secs(60);
    let emb = Scripted {
        device_state: b"devices".to_vec(),
        ..Default::default()
    };
    let (s, d, resumed, _) = run(8 * MIB, 44, emb.clone(), |setup| {
        setup.dest_embedder.fail_load = true;
    });
    let de = d.unwrap_err();
    assert!(
        matches!(de, EngineError::Embedder(ref m) if m.contains("refused the state")),
        "{de}"
    );
    let se = s.unwrap_err();
    assert!(
        matches!(se, EngineError::PeerError(ref m) if m.contains("refused the state")),
        "{se}"
    );
    assert!(!resumed);
    assert_eq!(emb.pauses.load(Ordering::Relaxed), 1);
    assert_eq!(emb.resumes.load(Ordering::Relaxed), 1, "the source runs on");
}

#[test]
fn a_destination_that_cannot_resume_after_the_commit_says_so_and_the_source_runs_on() {
    let _deadline = Deadline::secs(60);
    let emb = Scripted::default();
    let mut sm = None;
    let mut calls = None;
    let (s, d, resumed, _) = run(8 * MIB, 45, emb.clone(), |setup| {
        setup.dest_embedder.fail_resume = true;
        sm = Some(setup.src_monitor.clone());
        calls = Some(setup.dest_embedder.resume_calls.clone());
    });
    let de = d.unwrap_err();
    assert!(
        matches!(de, EngineError::Embedder(ref m) if m.contains("would not start")),
        "{de}"
    );
    assert!(!resumed);
    assert_eq!(
        calls.unwrap().load(Ordering::Relaxed),
        1,
        "after the Commit"
    );
    // The destination refused in words, so the guest is the source's again (not a
    // handover-unknown outcome, where neither end may run it).
    let se = s.unwrap_err();
    assert!(
        matches!(se, EngineError::PeerError(ref m) if m.contains("would not start")),
        "{se}"
    );
    assert_eq!(sm.unwrap().stats().status, MigrationStatus::Failed);
    assert_eq!(emb.pauses.load(Ordering::Relaxed), 1);
    assert_eq!(emb.resumes.load(Ordering::Relaxed), 1);
}
