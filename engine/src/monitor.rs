//! A window on a running migration, shared with whoever watches or steers it: statistics,
//! live progress, the bandwidth ceiling and cancellation, all usable from any thread.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rmig_transport::Pacer;

use crate::stats::MigrationStats;
use crate::CancelToken;

/// Live figures cheap enough to read many times a second.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Progress {
    /// Current round.
    pub round: u32,
    /// Bytes put on the wire and acknowledged so far.
    pub transferred: u64,
    /// Dirty bytes known at the last sync, less what the current round has sent since.
    pub remaining: u64,
    /// Guest memory in bytes.
    pub total: u64,
    /// Bandwidth measured in the last round, bytes/s.
    pub bandwidth: f64,
    /// Dirty rate measured in the last round, bytes/s.
    pub dirty_rate: f64,
}

/// Shared state of one migration (either end).
#[derive(Debug)]
pub struct Monitor {
    pub(crate) stats: Mutex<MigrationStats>,
    pub(crate) cancel: CancelToken,
    pub(crate) pacer: Arc<Pacer>,
    pub(crate) bytes_acked: AtomicU64,
    pub(crate) round: AtomicU32,
    pub(crate) round_start_bytes: AtomicU64,
    pub(crate) round_dirty: AtomicU64,
    pub(crate) total: AtomicU64,
    pub(crate) bandwidth: Mutex<(f64, f64)>,
}

impl Default for Monitor {
    fn default() -> Self {
        Monitor {
            stats: Mutex::new(MigrationStats {
                status: "setup".into(),
                ..Default::default()
            }),
            cancel: CancelToken::default(),
            pacer: Arc::new(Pacer::new(0)),
            bytes_acked: AtomicU64::new(0),
            round: AtomicU32::new(0),
            round_start_bytes: AtomicU64::new(0),
            round_dirty: AtomicU64::new(0),
            total: AtomicU64::new(0),
            bandwidth: Mutex::new((0.0, 0.0)),
        }
    }
}

impl Monitor {
    /// A new monitor, ready to hand to a session.
    pub fn new() -> Arc<Monitor> {
        Arc::new(Monitor::default())
    }

    /// A copy of the statistics as they stand.
    pub fn stats(&self) -> MigrationStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut MigrationStats)) {
        f(&mut self.stats.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Live progress.
    pub fn progress(&self) -> Progress {
        let transferred = self.bytes_acked.load(Ordering::Relaxed);
        let since = transferred.saturating_sub(self.round_start_bytes.load(Ordering::Relaxed));
        let (bandwidth, dirty_rate) = *self.bandwidth.lock().unwrap_or_else(|e| e.into_inner());
        Progress {
            round: self.round.load(Ordering::Relaxed),
            transferred,
            remaining: self
                .round_dirty
                .load(Ordering::Relaxed)
                .saturating_sub(since),
            total: self.total.load(Ordering::Relaxed),
            bandwidth,
            dirty_rate,
        }
    }

    /// Cancels the migration; the peer is told `reason`.
    pub fn cancel(&self, reason: &str) {
        self.cancel.cancel(reason);
    }

    /// The cancellation handle.
    pub fn cancel_token(&self) -> CancelToken {
        self.cancel.clone()
    }

    /// Changes the bandwidth ceiling (bytes/s, 0 = unlimited) while the migration runs.
    pub fn set_max_bandwidth(&self, bytes_per_sec: u64) {
        self.pacer.set_rate(bytes_per_sec);
    }

    /// The current bandwidth ceiling.
    pub fn max_bandwidth(&self) -> u64 {
        self.pacer.rate()
    }
}
