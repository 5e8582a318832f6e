//! Cancellation from any thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// A handle that cancels a migration from any thread; clones share the state.
#[derive(Debug, Clone, Default)]
pub struct CancelToken {
    inner: Arc<(AtomicBool, Mutex<String>)>,
}

impl CancelToken {
    /// Asks the migration to stop; the peer is told `reason`.
    pub fn cancel(&self, reason: &str) {
        *self.inner.1.lock().unwrap_or_else(|e| e.into_inner()) = reason.to_string();
        self.inner.0.store(true, Ordering::Release);
    }

    /// Whether cancellation was asked for.
    pub fn is_cancelled(&self) -> bool {
        self.inner.0.load(Ordering::Acquire)
    }

    /// The reason given.
    pub fn reason(&self) -> String {
        self.inner
            .1
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
