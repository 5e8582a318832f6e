//! Sessions behind checked handles: a C caller can pass a stale or made-up handle and get an
//! error, never a dangling pointer dereference.
//!
//! Every call on a handle holds a [`Call`] while it runs, which counts it as in flight on that
//! session. [`free`] takes the handle out of the table first (no new call can start on it),
//! cancels the migration, then waits until the calls in flight have all returned, and only then
//! drops the session: after `rmig_free` returns, no call of the library touches the session's
//! memory or callbacks any more.

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::ThreadId;

use rmig_engine::{DestListener, Monitor, Region, SourceConfig, SourceSession};

use crate::embedder::C;
use crate::status::{fail, RmigStatus};
use crate::types::{RmigRole, RmigSession};

/// Where a session stands.
pub(crate) enum Phase {
    /// Regions may be added. A destination is already listening.
    New(Option<Box<DestListener>>),
    /// A source between steps.
    Running(Box<SourceSession>),
    /// The link failed during the handover (`RMIG_ERR_HANDOVER_UNKNOWN`): the guest stays
    /// paused until `rmig_resolve_handover`. A source keeps its engine session for it.
    Unsettled(Option<Box<SourceSession>>),
    /// Finished (completed or failed); only statistics and `rmig_free` remain.
    Ended,
}

pub(crate) struct Inner {
    pub source_cfg: Option<SourceConfig>,
    pub callbacks: C,
    pub regions: Vec<Region>,
    pub phase: Phase,
}

pub(crate) struct Entry {
    pub role: RmigRole,
    pub monitor: Arc<Monitor>,
    pub inner: Mutex<Inner>,
}

/// The calls in flight on one session: the thread of each (a thread appears once per call it
/// is inside, e.g. twice for a callback that asks for statistics during `rmig_migrate`).
#[derive(Default)]
struct InFlight {
    threads: Mutex<Vec<ThreadId>>,
    /// Notified whenever `threads` becomes empty.
    idle: Condvar,
}

impl InFlight {
    fn threads(&self) -> MutexGuard<'_, Vec<ThreadId>> {
        self.threads.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until no call is in flight. Unbounded: it lasts as long as the slowest call takes
    /// to return once cancelled (see `rmig_free`).
    fn wait_idle(&self) {
        let mut t = self.threads();
        while !t.is_empty() {
            t = self.idle.wait(t).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// A session in the table.
struct Slot {
    entry: Arc<Entry>,
    calls: Arc<InFlight>,
}

fn table() -> &'static Mutex<HashMap<u64, Slot>> {
    static T: OnceLock<Mutex<HashMap<u64, Slot>>> = OnceLock::new();
    T.get_or_init(Default::default)
}

fn lock_table() -> MutexGuard<'static, HashMap<u64, Slot>> {
    table().lock().unwrap_or_else(|e| e.into_inner())
}

fn no_session(h: RmigSession) -> RmigStatus {
    fail(
        RmigStatus::RmigErrInvalidHandle,
        &format!("no session {h:#x}"),
    )
}

/// Registers a session; handles are never reused within a process.
pub(crate) fn insert(e: Entry) -> RmigSession {
    static NEXT: AtomicU64 = AtomicU64::new(0x524d_4947_0000_0001);
    let h = NEXT.fetch_add(1, Ordering::Relaxed);
    let slot = Slot {
        entry: Arc::new(e),
        calls: Arc::default(),
    };
    lock_table().insert(h, slot);
    h
}

/// A call in flight on a session: derefs to the session, and counts as in flight until
/// dropped.
pub(crate) struct Call {
    /// `None` only while dropping.
    entry: Option<Arc<Entry>>,
    calls: Arc<InFlight>,
    thread: ThreadId,
}

impl Deref for Call {
    type Target = Entry;

    fn deref(&self) -> &Entry {
        self.entry.as_ref().expect("taken only in drop")
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        // The session first: once the call no longer counts, `free` must hold the last
        // reference, so that the session ends inside `rmig_free`, not after it.
        drop(self.entry.take());
        let mut t = self.calls.threads();
        if let Some(i) = t.iter().position(|x| *x == self.thread) {
            t.swap_remove(i);
        }
        if t.is_empty() {
            self.calls.idle.notify_all();
        }
    }
}

/// The session behind `h`, registered as a call in flight on it until the `Call` is dropped.
pub(crate) fn get(h: RmigSession) -> Result<Call, RmigStatus> {
    let t = lock_table();
    let slot = t.get(&h).ok_or_else(|| no_session(h))?;
    let thread = std::thread::current().id();
    // Registered under the table lock, so `free` either sees this call or it never started.
    slot.calls.threads().push(thread);
    Ok(Call {
        entry: Some(slot.entry.clone()),
        calls: slot.calls.clone(),
        thread,
    })
}

/// Frees `h`: removes it from the table at once (later calls on it get
/// `RMIG_ERR_INVALID_HANDLE`), cancels its migration with `reason`, waits until every call in
/// flight on it has returned, and drops the session.
///
/// Refused with `RMIG_ERR_STATE` (and nothing done) when the calling thread is itself inside a
/// call on `h`, i.e. in one of its callbacks: it would wait for itself.
pub(crate) fn free(h: RmigSession, reason: &str) -> Result<(), RmigStatus> {
    let slot = {
        let mut t = lock_table();
        let slot = t.get(&h).ok_or_else(|| no_session(h))?;
        let me = std::thread::current().id();
        if slot.calls.threads().contains(&me) {
            return Err(fail(
                RmigStatus::RmigErrState,
                "rmig_free was called from inside a call on the same session (a callback); \
                 it would wait for itself",
            ));
        }
        t.remove(&h).expect("present")
    };
    slot.entry.monitor.cancel(reason);
    slot.calls.wait_idle();
    // Every `Call` dropped its reference before it stopped counting: this is the last one.
    debug_assert_eq!(Arc::strong_count(&slot.entry), 1);
    drop(slot);
    Ok(())
}

impl Entry {
    /// Locks the session for the calling thread, or says it is busy.
    pub fn lock(&self) -> Result<MutexGuard<'_, Inner>, RmigStatus> {
        match self.inner.try_lock() {
            Ok(g) => Ok(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Ok(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => Err(fail(
                RmigStatus::RmigErrState,
                "the session is in use by another thread (calls that drive it must not overlap)",
            )),
        }
    }
}
