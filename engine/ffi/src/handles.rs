//! Sessions behind checked handles: a C caller can pass a stale or made-up handle and get an
//! error, never a dangling pointer dereference.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

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

fn table() -> &'static Mutex<HashMap<u64, Arc<Entry>>> {
    static T: OnceLock<Mutex<HashMap<u64, Arc<Entry>>>> = OnceLock::new();
    T.get_or_init(Default::default)
}

fn lock_table() -> MutexGuard<'static, HashMap<u64, Arc<Entry>>> {
    table().lock().unwrap_or_else(|e| e.into_inner())
}

/// Registers a session; handles are never reused within a process.
pub(crate) fn insert(e: Entry) -> RmigSession {
    static NEXT: AtomicU64 = AtomicU64::new(0x524d_4947_0000_0001);
    let h = NEXT.fetch_add(1, Ordering::Relaxed);
    lock_table().insert(h, Arc::new(e));
    h
}

/// The session behind `h`.
pub(crate) fn get(h: RmigSession) -> Result<Arc<Entry>, RmigStatus> {
    lock_table().get(&h).cloned().ok_or_else(|| {
        fail(
            RmigStatus::RmigErrInvalidHandle,
            &format!("no session {h:#x}"),
        )
    })
}

/// Removes `h` unless another thread is using it.
pub(crate) fn remove(h: RmigSession) -> Result<Arc<Entry>, RmigStatus> {
    let mut t = lock_table();
    let e = t.get(&h).ok_or_else(|| {
        fail(
            RmigStatus::RmigErrInvalidHandle,
            &format!("no session {h:#x}"),
        )
    })?;
    if e.inner.try_lock().is_err() {
        return Err(fail(
            RmigStatus::RmigErrState,
            "the session is in use by another thread; cancel it and wait first",
        ));
    }
    Ok(t.remove(&h).expect("present"))
}

impl Entry {
    /// Locks the session for the calling thread, or says it is busy.
    pub fn lock(&self) -> Result<MutexGuard<'_, Inner>, RmigStatus> {
        match self.inner.try_lock() {
            Ok(g) => Ok(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Ok(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => Err(fail(
                RmigStatus::RmigErrState,
                "the session is in use by another thread",
            )),
        }
    }
}
