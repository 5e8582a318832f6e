//! A window on a running migration, shared with whoever watches or steers it: statistics,
//! live progress, the bandwidth ceiling and cancellation, all usable from any thread.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rmig_transport::Pacer;

use crate::stats::{MigrationStats, MigrationStatus};
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
    /// Dirty bytes found by the last sync (what the next round will send).
    pub dirty_at_last_sync: u64,
    /// Estimated seconds until the switchover, from measured bandwidth and dirty rate; `None`
    /// while nothing is measured yet or while dirtying outpaces sending.
    pub eta_switchover_s: Option<f64>,
    /// Dirtying outpaces sending: the dirty set grows from round to round.
    pub growing: bool,
    /// Bytes the current round set out to send (round 0: all of guest memory).
    pub round_bytes: u64,
    /// Of those, bytes sent and acknowledged so far.
    pub round_sent: u64,
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
    pub(crate) dirty_bytes: AtomicU64,
    pub(crate) round_started: Mutex<Option<std::time::Instant>>,
    /// When the monitor was made, and each status it entered since, with when.
    pub(crate) timeline: Mutex<(std::time::Instant, Vec<(MigrationStatus, Duration)>)>,
    /// Set by [`Monitor::start_postcopy`]: switch to post-copy after the current round.
    pub(crate) postcopy_requested: std::sync::atomic::AtomicBool,
    /// Set by [`Monitor::set_downtime_limit`] (milliseconds; `u64::MAX`: not changed), taken
    /// by the source before its next convergence decision.
    pub(crate) downtime_limit_ms: AtomicU64,
}

impl Default for Monitor {
    fn default() -> Self {
        Monitor {
            stats: Mutex::new(MigrationStats::default()),
            cancel: CancelToken::default(),
            pacer: Arc::new(Pacer::new(0)),
            bytes_acked: AtomicU64::new(0),
            round: AtomicU32::new(0),
            round_start_bytes: AtomicU64::new(0),
            round_dirty: AtomicU64::new(0),
            total: AtomicU64::new(0),
            bandwidth: Mutex::new((0.0, 0.0)),
            dirty_bytes: AtomicU64::new(0),
            round_started: Mutex::new(None),
            timeline: Mutex::new((std::time::Instant::now(), Vec::new())),
            postcopy_requested: std::sync::atomic::AtomicBool::new(false),
            downtime_limit_ms: AtomicU64::new(u64::MAX),
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
        let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        let before = s.status;
        f(&mut s);
        if s.status != before {
            self.entered(s.status);
        }
    }

    /// Notes that the migration entered `status` now.
    fn entered(&self, status: MigrationStatus) {
        let mut t = self.timeline.lock().unwrap_or_else(|e| e.into_inner());
        let at = t.0.elapsed();
        t.1.push((status, at));
    }

    /// Every status the migration entered, with the time since the monitor was made, in
    /// order. Either end can read its own phases from it: the time from entering
    /// [`MigrationStatus::Device`] to [`MigrationStatus::Completed`] is the pause as this end
    /// saw it; entering [`MigrationStatus::Active`] ends the setup.
    pub fn timeline(&self) -> Vec<(MigrationStatus, Duration)> {
        self.timeline
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }

    /// Live progress.
    ///
    /// `remaining` is what the current round has still to send plus what the guest is
    /// estimated to have dirtied since the round began (last measured dirty rate times the
    /// round's age), so it can grow: when it does, `growing` says so and no time to switchover
    /// is promised.
    pub fn progress(&self) -> Progress {
        let transferred = self.bytes_acked.load(Ordering::Relaxed);
        let since = transferred.saturating_sub(self.round_start_bytes.load(Ordering::Relaxed));
        let (bandwidth, dirty_rate) = *self.bandwidth.lock().unwrap_or_else(|e| e.into_inner());
        let age = self
            .round_started
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map_or(0.0, |t| t.elapsed().as_secs_f64());
        let left = self
            .round_dirty
            .load(Ordering::Relaxed)
            .saturating_sub(since);
        let remaining = left + (dirty_rate * age) as u64;
        let growing = bandwidth > 0.0 && dirty_rate >= bandwidth;
        // Each round sends what the previous one left at bandwidth B while the guest dirties
        // at D: the remainder shrinks by D/B per round, so the rounds add up to R / (B - D).
        let eta_switchover_s =
            (bandwidth > 0.0 && !growing).then(|| remaining as f64 / (bandwidth - dirty_rate));
        Progress {
            round_bytes: self.round_dirty.load(Ordering::Relaxed),
            round_sent: since,
            round: self.round.load(Ordering::Relaxed),
            transferred,
            remaining,
            total: self.total.load(Ordering::Relaxed),
            bandwidth,
            dirty_rate,
            dirty_at_last_sync: self.dirty_bytes.load(Ordering::Relaxed),
            eta_switchover_s,
            growing,
        }
    }

    /// States how this end's guest memory was prepared (only the embedder knows): it shows
    /// in this end's statistics and travels to the other end with this end's figures after
    /// the handover. Call it before the migration ends.
    pub fn set_memory_facts(&self, facts: crate::stats::MemoryFacts) {
        self.update(|s| s.memory = Some(facts));
    }

    /// Cancels the migration; the peer is told `reason`.
    pub fn cancel(&self, reason: &str) {
        self.cancel.cancel(reason);
    }

    /// Asks the source to switch to post-copy once the current round ends (QEMU's
    /// `migrate-start-postcopy`). Only a session configured with post-copy on
    /// (`ConvergePolicy::postcopy`) honours it; see [`SourceSession::complete`].
    ///
    /// [`SourceSession::complete`]: crate::SourceSession::complete
    pub fn start_postcopy(&self) {
        self.postcopy_requested
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// The cancellation handle.
    pub fn cancel_token(&self) -> CancelToken {
        self.cancel.clone()
    }

    /// Changes the bandwidth ceiling (bytes/s, 0 = unlimited) while the migration runs.
    pub fn set_max_bandwidth(&self, bytes_per_sec: u64) {
        self.pacer.set_rate(bytes_per_sec);
    }

    /// Changes the downtime limit while the migration runs (QEMU's `downtime-limit` set during
    /// a migration): the source's next convergence decision, after the round in progress,
    /// uses it.
    pub fn set_downtime_limit(&self, limit: Duration) {
        let ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
        // u64::MAX means "not changed": the longest limit that can be set is one less.
        self.downtime_limit_ms
            .store(ms.min(u64::MAX - 1), Ordering::Release);
    }

    /// A downtime limit set since the last call, if any.
    pub(crate) fn take_downtime_limit(&self) -> Option<Duration> {
        match self.downtime_limit_ms.swap(u64::MAX, Ordering::AcqRel) {
            u64::MAX => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// The current bandwidth ceiling.
    pub fn max_bandwidth(&self) -> u64 {
        self.pacer.rate()
    }

    /// Records how an operator settled a `handover-unknown` outcome that the embedder acted
    /// on itself: on a destination, whose [`DestListener::serve`](crate::DestListener::serve)
    /// has returned, the embedder resumes its guest (or discards it) and then records the
    /// decision here. A source settles through
    /// [`SourceSession::resolve_handover`](crate::SourceSession::resolve_handover) instead,
    /// which resumes and records in one step.
    ///
    /// `status` is the outcome as either end names it: [`MigrationStatus::Completed`] when
    /// the destination runs the guest, [`MigrationStatus::Failed`] when the source does.
    /// `note` replaces the recorded error message, so that the statistics say who decided.
    ///
    /// Only a `HandoverUnknown` status changes, and only to `Completed` or `Failed`; checked
    /// and changed under one lock, so of two racing calls one alone succeeds. Returns whether
    /// the status changed (nothing changes when it returns `false`).
    #[must_use]
    pub fn settle_handover(&self, status: MigrationStatus, note: &str) -> bool {
        if !matches!(status, MigrationStatus::Completed | MigrationStatus::Failed) {
            return false;
        }
        let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        if s.status != MigrationStatus::HandoverUnknown {
            return false;
        }
        s.status = status;
        s.error = Some(note.to_string());
        self.entered(status);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settle_handover_changes_only_an_unknown_handover() {
        let m = Monitor::new();
        assert!(!m.settle_handover(MigrationStatus::Completed, "too early"));
        assert_eq!(m.stats().status, MigrationStatus::Setup);
        assert_eq!(m.stats().error, None);

        m.update(|s| {
            s.status = MigrationStatus::HandoverUnknown;
            s.error = Some("link lost after Ready".into());
        });
        for not_an_outcome in [
            MigrationStatus::Setup,
            MigrationStatus::Active,
            MigrationStatus::Device,
            MigrationStatus::Cancelled,
            MigrationStatus::HandoverUnknown,
        ] {
            assert!(!m.settle_handover(not_an_outcome, "no"), "{not_an_outcome}");
            assert_eq!(m.stats().status, MigrationStatus::HandoverUnknown);
            assert_eq!(m.stats().error.as_deref(), Some("link lost after Ready"));
        }

        assert!(m.settle_handover(MigrationStatus::Failed, "the source runs it"));
        let s = m.stats();
        assert_eq!(s.status, MigrationStatus::Failed);
        assert_eq!(s.error.as_deref(), Some("the source runs it"));

        let steps: Vec<MigrationStatus> = m.timeline().into_iter().map(|(s, _)| s).collect();
        assert_eq!(
            steps,
            [MigrationStatus::HandoverUnknown, MigrationStatus::Failed]
        );

        // Settled once: a second decision changes nothing.
        assert!(!m.settle_handover(MigrationStatus::Completed, "changed my mind"));
        let s = m.stats();
        assert_eq!(s.status, MigrationStatus::Failed);
        assert_eq!(s.error.as_deref(), Some("the source runs it"));
    }

    #[test]
    fn the_timeline_holds_each_status_once_in_order() {
        let m = Monitor::new();
        m.update(|s| s.status = MigrationStatus::Active);
        m.update(|s| s.ram.normal_bytes = 1);
        std::thread::sleep(Duration::from_millis(5));
        m.update(|s| s.status = MigrationStatus::Device);
        m.update(|s| s.status = MigrationStatus::Completed);
        let t = m.timeline();
        let steps: Vec<MigrationStatus> = t.iter().map(|(s, _)| *s).collect();
        assert_eq!(
            steps,
            [
                MigrationStatus::Active,
                MigrationStatus::Device,
                MigrationStatus::Completed
            ]
        );
        assert!(t[1].1 >= t[0].1 + Duration::from_millis(5));
        assert!(t[2].1 >= t[1].1);
    }
}
