//! The source side of a migration as a state machine an embedder drives step by step.
//!
//! `setup` connects and authenticates; each `iterate` runs one pre-copy round and says whether
//! the migration is ready to switch over; `complete` pauses the guest, copies the rest,
//! hands over device state and verifies. QEMU calls its `save_live_setup`,
//! `save_live_iterate` and `save_live_complete_precopy` handlers in the same order. Any
//! failure leaves the source's memory untouched and, past the pause, resumes the guest.

pub(crate) mod connect;
mod lanes;
mod placement;
mod postcopy;
mod rejoin;
mod round;
mod setup;
mod worker;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::control::link::ControlLink;
use crate::converge::{Converge, Decision};
use crate::dirty::DirtySource;
use crate::embedder::SourceEmbedder;
use crate::monitor::Monitor;
use crate::protocol::Message;
use crate::region::Region;
use crate::stats::{MigrationStats, MigrationStatus, RoundStats};
use crate::verify;
use crate::{EngineError, SourceConfig};
use lanes::LaneSet;
use worker::Shared;

/// Copies with the guest paused before a dirty log that still reports writes is an error: a
/// paused guest writes nothing, so only pages a failed lane left unconfirmed come back, and
/// each such pass loses a lane.
const MAX_PAUSED_PASSES: u32 = 8;

/// What `iterate` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Another round is worth it.
    Continue,
    /// Under the downtime limit and no longer shrinking: call `complete`.
    ReadyForSwitchover,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Iterating,
    Ready,
    Done,
    Failed,
}

/// Rounds smaller than this do not measure bandwidth well; the previous figure is kept.
const MIN_BW_SAMPLE: u64 = 4 << 20;
/// Device state travels in pieces of at most this size.
const DEVICE_PIECE: usize = 1 << 20;

/// A source migration in progress.
pub struct SourceSession {
    cfg: SourceConfig,
    regions: Vec<Region>,
    dirty: Box<dyn DirtySource>,
    embedder: Box<dyn SourceEmbedder>,
    link: ControlLink,
    /// The data lanes and their workers.
    lanes: LaneSet,
    // Field order matters for drop: the link and lanes go before the runtime.
    _rt: tokio::runtime::Runtime,
    shared: Arc<Shared>,
    monitor: Arc<Monitor>,
    converge: Converge,
    state: State,
    round: u32,
    bandwidth: f64,
    started: Instant,
    paused_at: Option<Instant>,
    /// `Commit` was sent: the guest may run on the destination, so this end never resumes
    /// it on its own.
    committed: bool,
    sync_count: u64,
    /// Reconnect attempts so far (each attempt number is used once).
    rejoins: u32,
    /// The protocol version agreed on (post-copy needs 3).
    version: u16,
    /// The policy or the embedder chose post-copy for `complete`.
    postcopy: bool,
    /// The destination said `Resumed`: its guest runs with pages still here, so this end
    /// never resumes.
    resumed_there: bool,
    /// The RDMA device of the lanes, when they are RDMA (post-copy exposes memory on it).
    rdma_dev: Option<Arc<rmig_transport::rdma::RdmaDevice>>,
}

impl SourceSession {
    /// Connects to the destination, authenticates, agrees on regions and transport and opens
    /// the data lanes. `monitor` lets other threads watch, steer and cancel the migration.
    pub fn setup(
        cfg: SourceConfig,
        regions: Vec<Region>,
        dirty: Box<dyn DirtySource>,
        embedder: Box<dyn SourceEmbedder>,
        monitor: Arc<Monitor>,
    ) -> Result<SourceSession, EngineError> {
        let started = Instant::now();
        let fail = |e: EngineError| setup::record_failure(&monitor, e);
        setup::validate(&cfg, &regions).map_err(fail)?;
        monitor.pacer.set_rate(cfg.max_bandwidth);
        let total: u64 = regions.iter().map(|r| r.len()).sum();
        monitor.total.store(total, Ordering::Relaxed);
        let rt = crate::control::runtime().map_err(fail)?;
        let hs = setup::connect_control(&rt, &cfg, &regions, &monitor.cancel).map_err(fail)?;
        let shared = setup::shared_state(&cfg, &regions, &monitor);
        let lane_count = hs.agreed.lanes as usize;
        let local_ip = Some(hs.local.ip());
        let placement = placement::Placement::new(cfg.numa, &regions, lane_count, local_ip);
        let fallback = setup::fallback_reason(&hs);
        let rdma = setup::register_rdma(&cfg, &hs, &shared.map).map_err(fail)?;
        let lanes = LaneSet::open(&cfg, &hs, rdma.as_ref(), &shared, placement).map_err(fail)?;
        let version = hs.agreed.version;
        let session = SourceSession {
            converge: Converge::new(cfg.policy),
            cfg,
            regions,
            dirty,
            embedder,
            link: hs.link,
            lanes,
            _rt: rt,
            shared,
            monitor,
            state: State::Iterating,
            round: 0,
            bandwidth: 0.0,
            started,
            paused_at: None,
            committed: false,
            sync_count: 0,
            rejoins: 0,
            version,
            postcopy: false,
            resumed_there: false,
            rdma_dev: rdma.as_ref().map(|r| r.dev.clone()),
        };
        session.record_setup(total, fallback, rdma.as_ref());
        Ok(session)
    }

    /// The monitor given at setup.
    pub fn monitor(&self) -> &Arc<Monitor> {
        &self.monitor
    }

    /// Runs one pre-copy round (round 0 sends everything) and applies the convergence policy.
    pub fn iterate(&mut self) -> Result<Step, EngineError> {
        match self.state {
            State::Iterating => {}
            State::Ready => return Ok(Step::ReadyForSwitchover),
            s => return Err(EngineError::State(format!("iterate called in state {s:?}"))),
        }
        let r = self.iterate_inner();
        r.map_err(|e| self.fail(e))
    }

    fn iterate_inner(&mut self) -> Result<Step, EngineError> {
        self.check_cancel()?;
        self.fill_round_set()?;
        let rs = match self.run_round(false) {
            Ok(rs) => rs,
            Err(e) if self.may_reconnect(&e) => {
                // The interrupted round is abandoned; the next one sends what it left.
                self.reconnect(&e)?;
                return Ok(Step::Continue);
            }
            Err(e) => return Err(e),
        };
        let remaining = rs.remaining;
        let sent_bytes = rs.memory_bytes;
        if let Some(limit) = self.monitor.take_downtime_limit() {
            self.converge.set_downtime_limit(limit);
        }
        let decision = self
            .converge
            .after_round(self.round, sent_bytes, remaining, self.bandwidth);
        self.round += 1;
        if self.postcopy_wanted(&decision) {
            self.postcopy = true;
            self.state = State::Ready;
            return Ok(Step::ReadyForSwitchover);
        }
        match decision {
            Decision::Iterate => Ok(Step::Continue),
            Decision::Throttle(p) => {
                self.embedder.throttle(p);
                crate::metrics::throttle(p);
                self.monitor.update(|s| s.cpu_throttle_percentage = p);
                Ok(Step::Continue)
            }
            Decision::Switchover => {
                self.state = State::Ready;
                Ok(Step::ReadyForSwitchover)
            }
            Decision::Postcopy => Err(EngineError::NotConverged(
                "post-copy is needed, but the destination does not speak protocol 3".into(),
            )),
            Decision::Fail(why) => Err(EngineError::NotConverged(why)),
        }
    }

    /// Whether this round's outcome (or the embedder's request) switches to post-copy: the
    /// policy allows it, the peer speaks protocol 3 and the lanes are TCP.
    fn postcopy_wanted(&self, decision: &Decision) -> bool {
        let requested = self.monitor.postcopy_requested.load(Ordering::Acquire);
        let asked = *decision == Decision::Postcopy || requested;
        asked && self.postcopy_possible()
    }

    /// Whether post-copy can run in this session: allowed, and the peer speaks protocol 3.
    /// (Over RDMA the destination reads the missing pages itself; over TCP the source sends
    /// them.)
    fn postcopy_possible(&self) -> bool {
        self.cfg.policy.postcopy.is_on() && self.version >= 3
    }

    /// Pauses the guest, copies what is left, hands over device state, verifies and finishes.
    /// May be called before the policy is ready (a forced switchover). With post-copy chosen
    /// (by the policy, or asked for with [`Monitor::start_postcopy`]), the guest is handed
    /// over in the pause and the rest follows it (see `source/postcopy.rs`).
    pub fn complete(&mut self) -> Result<MigrationStats, EngineError> {
        match self.state {
            State::Iterating | State::Ready => {}
            s => {
                return Err(EngineError::State(format!(
                    "complete called in state {s:?}"
                )))
            }
        }
        let requested = self.monitor.postcopy_requested.load(Ordering::Acquire);
        let r = if (self.postcopy || requested) && self.postcopy_possible() {
            self.complete_postcopy()
        } else {
            self.complete_inner()
        };
        match r {
            Ok(()) => Ok(self.monitor.stats()),
            Err(e) => Err(self.fail(e)),
        }
    }

    fn complete_inner(&mut self) -> Result<(), EngineError> {
        self.check_cancel()?;
        let expected = self.monitor.stats().expected_downtime_ms;
        self.verify_baseline()?;
        self.monitor.update(|s| s.status = MigrationStatus::Device);
        let t0 = Instant::now();
        self.embedder.pause().map_err(EngineError::Embedder)?;
        self.paused_at = Some(t0);
        self.stop_and_copy()?;
        self.send_device_state()?;
        let verified = self.verify()?;
        self.hand_over_expecting(Message::Done)?;
        self.finish_completed(t0.elapsed(), expected, verified);
        Ok(())
    }

    /// The migration completed: exchanges the figures, closes everything and records the
    /// outcome (`paused`: the downtime).
    fn finish_completed(&mut self, paused: Duration, expected: f64, verified: Option<bool>) {
        let downtime = paused.as_secs_f64() * 1e3;
        crate::metrics::finished("completed", Some(downtime / 1e3));
        // The total ends with the handover; the exchange of figures is not part of it.
        let total = self.started.elapsed().as_secs_f64() * 1e3;
        let peer = self.exchange_figures(paused);
        self.lanes.close();
        self.link.close(Duration::from_secs(1));
        self.state = State::Done;
        self.monitor.update(|s| {
            s.status = MigrationStatus::Completed;
            s.verified = verified;
            s.downtime_ms = downtime;
            s.expected_downtime_ms = expected;
            s.total_time_ms = total;
            s.ram.remaining = 0;
            s.peer = peer;
            let secs = (total - s.setup_time_ms) / 1e3;
            if secs > 0.0 {
                s.ram.mbps = s.ram.transferred as f64 * 8.0 / 1e6 / secs;
            }
        });
    }

    /// The final copy with the guest paused, repeated only if a lane failure left pages
    /// unconfirmed, or the dirty log still reports writes; a log that keeps doing so after
    /// [`MAX_PAUSED_PASSES`] passes fails the migration (the source then resumes) instead of
    /// holding the guest paused for ever.
    fn stop_and_copy(&mut self) -> Result<(), EngineError> {
        for _ in 0..MAX_PAUSED_PASSES {
            self.fill_round_set()?;
            self.run_round(true)?;
            self.round += 1;
            if self.sync_pending()? == 0 {
                return Ok(());
            }
        }
        Err(EngineError::Embedder(format!(
            "the dirty log still reported writes after {MAX_PAUSED_PASSES} copies with the \
             guest paused: `pause` must stop every writer of guest memory"
        )))
    }

    /// Sends the embedder's device state in pieces.
    fn send_device_state(&mut self) -> Result<(), EngineError> {
        let dev = self
            .embedder
            .device_state()
            .map_err(EngineError::Embedder)?;
        let mut pieces = dev.chunks(DEVICE_PIECE).peekable();
        if pieces.peek().is_none() {
            self.link.send(Message::DeviceState {
                data: Vec::new(),
                last: true,
            });
        }
        while let Some(p) = pieces.next() {
            self.link.send(Message::DeviceState {
                data: p.to_vec(),
                last: pieces.peek().is_none(),
            });
        }
        Ok(())
    }

    /// Before the pause, while the guest still runs: compares every chunk that holds no
    /// pending page (after a fresh sync) with the destination, so that the pause only has to
    /// compare what the final round changes. When verifying.
    fn verify_baseline(&mut self) -> Result<(), EngineError> {
        if self.shared.hashes.is_none() {
            return Ok(());
        }
        self.sync_pending()?;
        let h = self.shared.hashes.as_ref().expect("verifying");
        let digests = verify::baseline_digests(h, &self.shared.pending);
        self.link.send(Message::Checksums { regions: digests });
        self.await_verdict()
    }

    /// In the pause: sends the digests of the chunks changed since the baseline and waits
    /// for the destination's verdict (when verifying).
    fn verify(&mut self) -> Result<Option<bool>, EngineError> {
        let Some(h) = &self.shared.hashes else {
            return Ok(None);
        };
        let chunks = verify::touched_digests(h);
        self.link.send(Message::Digests { chunks });
        self.await_verdict()?;
        Ok(Some(true))
    }

    /// Waits for `Verified`; a mismatch is an error naming the chunks.
    fn await_verdict(&mut self) -> Result<(), EngineError> {
        let wait = self.cfg.liveness.peer_timeout * 2;
        let (ok, mism) = self.link.expect(wait, "Verified", |m| match m {
            Message::Verified { ok, mismatches } => Ok((ok, mismatches)),
            m => Err(m),
        })?;
        self.monitor.update(|s| s.verified = Some(ok));
        if ok {
            return Ok(());
        }
        Err(EngineError::VerifyFailed(format!(
            "destination differs in {}",
            verify::describe(&mism)
        )))
    }

    /// The two-phase handover: waits for the destination's `Ready` (its guest loaded and
    /// paused), sends `Commit`, and from then on never resumes on its own. `answer` (`Done`,
    /// or `Resumed` in post-copy) says the destination's guest runs; the destination's
    /// explicit refusal (`Error`, `Cancel`) means it will not run the guest, so we may;
    /// silence or a lost link leaves the outcome unknown.
    fn hand_over_expecting(&mut self, answer: Message) -> Result<(), EngineError> {
        self.link
            .expect(self.cfg.ready_timeout, "Ready", |m| match m {
                Message::Ready => Ok(()),
                m => Err(m),
            })?;
        // The last moment a cancel can still be honoured: the guest is ours until `Commit`.
        self.check_cancel()?;
        self.link.send(Message::Commit);
        self.committed = true;
        let wait = self.cfg.liveness.peer_timeout * 2;
        let name = answer.name();
        match self
            .link
            .expect(wait, name, |m| if m == answer { Ok(()) } else { Err(m) })
        {
            Ok(()) => Ok(()),
            Err(e @ (EngineError::PeerError(_) | EngineError::PeerCancelled(_))) => {
                // The destination said it will not run the guest: it is ours again.
                self.committed = false;
                Err(e)
            }
            Err(e) => Err(EngineError::HandoverUnknown(format!(
                "Commit was sent but no {name} came back ({e})"
            ))),
        }
    }

    /// After `Done` (the destination's guest runs): sends this end's figures and takes the
    /// destination's, waiting at most a second (it sent them right after `Done`).
    fn exchange_figures(&self, paused: Duration) -> Option<crate::stats::EndFigures> {
        let s = self.monitor.stats();
        let ms = |x: f64| Duration::from_secs_f64(x.max(0.0) / 1e3);
        let mine = crate::stats::EndFigures::new(
            s.ram.normal_bytes,
            self.round,
            paused,
            ms(s.setup_time_ms),
            self.started.elapsed(),
            s.memory.unwrap_or_default(),
        );
        self.link.exchange_figures(mine, Duration::from_secs(1))
    }

    /// Settles a `handover-unknown` outcome on the operator's word: `run_here` resumes the
    /// guest on this host (only if the destination is known not to run it); otherwise the
    /// guest is the destination's and this copy stays paused for good.
    pub fn resolve_handover(&mut self, run_here: bool) -> Result<MigrationStatus, EngineError> {
        if self.monitor.stats().status != MigrationStatus::HandoverUnknown {
            return Err(EngineError::State(
                "resolve_handover is only for a handover-unknown outcome".into(),
            ));
        }
        let status = if run_here {
            self.embedder.resume();
            MigrationStatus::Failed
        } else {
            MigrationStatus::Completed
        };
        let why = if run_here {
            "the operator resumed the guest on the source after an unknown handover"
        } else {
            "the operator gave the guest to the destination after an unknown handover"
        };
        self.monitor.update(|s| {
            s.status = status;
            s.error = Some(why.into());
        });
        Ok(status)
    }

    /// Moves what is pending into the round set (round 0: every page).
    fn fill_round_set(&mut self) -> Result<(), EngineError> {
        if self.round == 0 {
            for (b, r) in self.shared.round.iter().zip(&self.regions) {
                b.set_range(0, r.pages());
            }
            // Writes before round 0 are covered by it: drop what the log holds already.
            self.dirty.begin()?;
            for i in 0..self.regions.len() {
                let scratch = &self.shared.pending[i];
                self.dirty.sync(i, scratch)?;
                scratch.clear_all();
            }
            self.sync_count += 1;
        } else {
            self.sync_pending()?;
            for (b, p) in self.shared.round.iter().zip(&self.shared.pending) {
                b.clear_all();
                b.take_from(p);
            }
        }
        Ok(())
    }

    /// Syncs the dirty log into the pending set; returns the dirty bytes now pending.
    fn sync_pending(&mut self) -> Result<u64, EngineError> {
        let mut bytes = 0;
        self.dirty.begin()?;
        for (i, r) in self.regions.iter().enumerate() {
            self.dirty.sync(i, &self.shared.pending[i])?;
            bytes += self.shared.pending[i].count() * r.page_size();
        }
        self.sync_count += 1;
        Ok(bytes)
    }

    /// Sends the round set over every live lane; returns the round's figures.
    fn run_round(&mut self, last: bool) -> Result<RoundStats, EngineError> {
        let t0 = Instant::now();
        self.announce_round(t0, last);
        let queues = self.plan_round();
        let rs = self.drive_round(last, &queues)?;
        self.fence_round()?;
        self.account_round(rs, t0.elapsed().as_secs_f64(), last)
    }

    fn check_cancel(&mut self) -> Result<(), EngineError> {
        if self.monitor.cancel.is_cancelled() {
            return Err(EngineError::Cancelled(self.monitor.cancel.reason()));
        }
        if let Ok(m) = self.link.inbox().try_recv() {
            let m = ControlLink::screen(m)?;
            return Err(EngineError::Protocol(format!(
                "unexpected {} between rounds",
                m.name()
            )));
        }
        Ok(())
    }

    /// A failure that follows this end's own cancel is reported as that cancel: the peer's
    /// answer to it (its cancel, or a closed connection once it freed its session) often
    /// arrives first, and "cancelled by peer" would misname who asked. A failure that says
    /// something a user must act on (handover unknown, guest lost) is kept.
    fn as_local_cancel(&self, e: EngineError) -> EngineError {
        let cancel = &self.monitor.cancel;
        match e {
            EngineError::HandoverUnknown(_)
            | EngineError::GuestLost(_)
            | EngineError::Cancelled(_) => e,
            _ if cancel.is_cancelled() => EngineError::Cancelled(cancel.reason()),
            _ => e,
        }
    }

    /// Records a failure, tells the peer, stops the lanes and resumes the guest if paused.
    fn fail(&mut self, e: EngineError) -> EngineError {
        if self.state == State::Failed {
            return e;
        }
        self.state = State::Failed;
        let e = self.as_local_cancel(e);
        self.lanes.stop();
        match &e {
            EngineError::Cancelled(r) => self.link.send(Message::Cancel { reason: r.clone() }),
            // A silent peer may still be listening: it is told, like any other failure.
            EngineError::PeerCancelled(_)
            | EngineError::PeerError(_)
            | EngineError::PeerClosed
            | EngineError::HandoverUnknown(_) => {}
            other => self.link.send(Message::Error {
                message: other.to_string(),
            }),
        }
        self.link.close(Duration::from_millis(500));
        self.lanes.join();
        // Past `Commit` the guest may already run on the destination: never resume here.
        if self.paused_at.is_some() && !self.committed {
            self.embedder.resume();
        }
        let status = MigrationStatus::of_error(&e);
        crate::metrics::finished(status.name(), None);
        let total = self.started.elapsed().as_secs_f64() * 1e3;
        // The pause so far: up to the resumption, or (handover unknown) until now; after
        // post-copy's `Resumed` it was recorded then, and nothing was verified.
        let paused = self
            .paused_at
            .filter(|_| !self.resumed_there)
            .map(|t| t.elapsed().as_secs_f64() * 1e3);
        let lost = self.resumed_there;
        self.monitor.update(|s| {
            s.status = status;
            s.error = Some(e.to_string());
            s.total_time_ms = total;
            if let Some(d) = paused {
                s.downtime_ms = d;
            }
            if lost {
                s.verified = None;
            }
        });
        e
    }

    /// Gives up on purpose (from the driving thread; other threads use the monitor).
    pub fn cancel(&mut self, reason: &str) -> EngineError {
        self.fail(EngineError::Cancelled(reason.to_string()))
    }
}

impl Drop for SourceSession {
    fn drop(&mut self) {
        if matches!(self.state, State::Iterating | State::Ready) {
            self.cancel("source session dropped");
        }
    }
}
