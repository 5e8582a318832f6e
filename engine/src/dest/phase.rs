//! The destination's side of a session after setup, as a state machine a reader can follow.
//!
//! [`Phase`] says where the session stands and owns what that phase has gathered (device
//! state, while it arrives); [`Receiving::step`] takes the phase and one control message and
//! returns the next phase. A message that is not legal in the current phase falls through to
//! one arm, so ordering is checked in one place.
//!
//! The handover is two-phase, so that exactly one guest ever runs: once verified, the
//! destination loads the device state and says `Ready` with its guest still paused; it resumes
//! only on the source's `Commit`. Before `Ready`, any failure means the source resumes and we
//! discard. Between `Ready` and `Commit` a lost link leaves us unable to know whether the
//! source committed: the guest stays paused and the session ends in `handover-unknown` for an
//! operator to decide.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{select, Receiver};
use rmig_transport::LaneError;

use super::lanes::{LaneResult, LaneThreads};
use super::sink::DestSink;
use crate::control::link::ControlLink;
use crate::embedder::DestEmbedder;
use crate::monitor::Monitor;
use crate::protocol::Message;
use crate::stats::MigrationStatus;
use crate::verify;
use crate::EngineError;

/// Where the destination's session stands.
#[derive(Debug)]
pub(crate) enum Phase {
    /// Between pre-copy rounds; the next `RoundStart` must carry round `next`.
    Between {
        /// The round the source must start next.
        next: u32,
    },
    /// A round is open: lanes land its pages.
    InRound {
        /// Its number.
        round: u32,
        /// Whether it is a stop-and-copy round (the source's guest is paused).
        last: bool,
    },
    /// A stop-and-copy round has ended: the source repeats it (a lane failed) or sends the
    /// device state.
    Stopped {
        /// The round the source starts if it repeats the copy.
        next: u32,
    },
    /// Device state is arriving in pieces.
    Device {
        /// What has arrived.
        state: Vec<u8>,
    },
    /// All device state is here; the source's digests of what changed since the baseline
    /// come next.
    Verifying {
        /// The whole device state.
        state: Vec<u8>,
    },
    /// Verified and loaded; our guest is paused until the source's `Commit`.
    Ready,
    /// The source paused for post-copy: the set of pages we lack is arriving in pieces.
    Switching {
        /// The round the source starts after the handover.
        next: u32,
    },
    /// Post-copy: our guest runs, and the pages it lacks arrive in rounds (and on request).
    Postcopy {
        /// The round the source must start next.
        next: u32,
    },
    /// Post-copy: every page was sent; the source's digests come next.
    PostcopyVerifying,
    /// Our guest runs.
    Done,
}

impl Phase {
    /// A short description for error messages.
    fn describe(&self) -> String {
        match self {
            Phase::Between { next } => format!("between rounds (next {next})"),
            Phase::InRound { round, .. } => format!("in round {round}"),
            Phase::Stopped { .. } => "after the stop-and-copy round".into(),
            Phase::Device { .. } => "while device state arrives".into(),
            Phase::Verifying { .. } => "while waiting for checksums".into(),
            Phase::Ready => "while ready for the handover".into(),
            Phase::Switching { .. } => "while the post-copy page set arrives".into(),
            Phase::Postcopy { next } => format!("in post-copy (next round {next})"),
            Phase::PostcopyVerifying => "after post-copy, while waiting for digests".into(),
            Phase::Done => "after the handover".into(),
        }
    }
}

/// How a session ended badly: the error, and whether the peer still needs to be told.
pub(crate) type Failure = (EngineError, bool);

/// Most mismatching chunks named in a verdict.
const MISMATCHES: usize = 16;

fn protocol(msg: String) -> Failure {
    (EngineError::Protocol(msg), true)
}

/// What the destination needs to take its source back after the control connection broke
/// during pre-copy.
pub(crate) struct Reconnect {
    /// How long to wait for the source; zero fails at once.
    pub window: Duration,
    /// Proven reconnects, from the door.
    pub rejoins: Receiver<super::lanes::Rejoin>,
    /// Lane numbers the door admits.
    pub slots: super::lanes::Slots,
    /// Lanes of the session.
    pub lanes: u16,
    /// The session's keys.
    pub auth: crate::control::auth::SessionAuth,
    /// The last attempt taken (each is taken once).
    pub last_attempt: Option<u32>,
    /// For the new control connection.
    pub rt: tokio::runtime::Handle,
    /// Heartbeats of the new control connection.
    pub liveness: crate::control::link::Liveness,
    /// Frame limits of the new control connection.
    pub limits: crate::protocol::codec::Limits,
}

/// The receiving part of a session: control messages, lane results, fallback lanes.
pub(crate) struct Receiving<'a> {
    pub sink: Arc<DestSink>,
    pub monitor: &'a Arc<Monitor>,
    pub link: &'a mut ControlLink,
    /// What the source asked us to verify.
    pub verify: crate::verify::VerifyMode,
    /// The comparison before the pause has been made (the one in the pause builds on it).
    pub baseline: bool,
    pub max_device_state: usize,
    pub lanes: LaneThreads,
    /// TCP lanes that replace failed RDMA lanes, or rejoin after a reconnect (lane number,
    /// socket).
    pub more: Receiver<(u16, super::lanes::LaneSocket)>,
    /// Taking the source back after a broken control connection.
    pub reconnect: Reconnect,
    /// Post-copy, when the source switches to it.
    pub postcopy: super::postcopy::DestPostcopy,
}

impl Receiving<'_> {
    /// Serves the session until our guest runs (`Ok`) or it fails. `kept` holds control
    /// messages that arrived while the lanes joined.
    pub fn run(
        &mut self,
        results: &Receiver<LaneResult>,
        kept: Vec<Message>,
        embedder: &mut dyn DestEmbedder,
    ) -> Result<(), Failure> {
        let r = self.serve(results, kept, embedder);
        self.end_landing();
        self.settle_postcopy(r)
    }

    /// Ends pre-copy landing with `UFFDIO_COPY` (idempotent) and records what it did.
    pub(super) fn end_landing(&mut self) {
        self.sink.end_landing();
        let report = self.sink.landing_report();
        self.monitor.update(|s| s.landing = report);
    }

    /// `run`'s loop.
    fn serve(
        &mut self,
        results: &Receiver<LaneResult>,
        kept: Vec<Message>,
        embedder: &mut dyn DestEmbedder,
    ) -> Result<(), Failure> {
        let never = crossbeam_channel::never();
        let mut results = results;
        let mut phase = Phase::Between { next: 0 };
        for m in kept {
            phase = self.step(phase, m, embedder)?;
        }
        loop {
            if self.sink.crash.happened() {
                // Injected crash: the control connection drops without a word too.
                self.link.close(Duration::ZERO);
                return Err((
                    EngineError::io(std::io::ErrorKind::ConnectionAborted, "injected crash"),
                    false,
                ));
            }
            select! {
                recv(results) -> r => match r {
                    Ok((i, r)) => self.lane_ended(i, r)?,
                    // Every lane has ended: wait for the control connection alone.
                    Err(_) => results = &never,
                },
                recv(self.more) -> m => match m {
                    Ok((lane, sock)) => self.admit(lane, sock).map_err(|e| (e, true))?,
                    // No fallback lanes in this session (or no more).
                    Err(_) => self.more = crossbeam_channel::never(),
                },
                recv(self.link.inbox()) -> m => {
                    phase = self.on_message(phase, m, embedder)?;
                    if matches!(phase, Phase::Done) {
                        return Ok(());
                    }
                }
                // The source saw the link break before we did (silence one way, or only its
                // lanes died): its proven reconnect wins over our old connection.
                recv(self.reconnect.rejoins) -> r => {
                    let Ok(rejoin) = r else { continue };
                    phase = self.source_came_back(phase, rejoin)?;
                }
                default(Duration::from_millis(20)) => {
                    self.check_cancel()?;
                    self.check_faults()?;
                }
            }
        }
    }

    /// Screens what the control connection delivered and steps the phase. A lost link in
    /// `Ready` is a handover whose outcome we cannot know.
    fn on_message(
        &mut self,
        phase: Phase,
        m: Result<Result<Message, EngineError>, crossbeam_channel::RecvError>,
        embedder: &mut dyn DestEmbedder,
    ) -> Result<Phase, Failure> {
        let m = m
            .map_err(|_| EngineError::PeerClosed)
            .and_then(ControlLink::screen);
        match (m, &phase) {
            (Ok(m), _) => self.step(phase, m, embedder),
            (
                Err(
                    e @ (EngineError::PeerClosed | EngineError::PeerSilent(_) | EngineError::Io(_)),
                ),
                Phase::Between { .. } | Phase::InRound { .. } | Phase::Postcopy { .. },
            ) if !self.reconnect.window.is_zero() => self.await_source(phase, e),
            (
                Err(
                    e @ (EngineError::PeerClosed | EngineError::PeerSilent(_) | EngineError::Io(_)),
                ),
                Phase::Ready,
            ) => Err((
                EngineError::HandoverUnknown(format!(
                    "the control connection failed after Ready ({e}), so the source may have \
                     committed"
                )),
                false,
            )),
            (Err(e), _) => Err((e, false)),
        }
    }

    /// The session's protocol: the next phase after `m` in `phase`.
    fn step(
        &mut self,
        phase: Phase,
        m: Message,
        embedder: &mut dyn DestEmbedder,
    ) -> Result<Phase, Failure> {
        match (phase, m) {
            (Phase::Between { next }, Message::RoundStart { round, last }) if round == next => {
                Ok(self.open_round(round, last))
            }
            (Phase::Stopped { next }, Message::RoundStart { round, last: true })
                if round == next =>
            {
                Ok(self.open_round(round, true))
            }
            (Phase::InRound { round, last }, Message::RoundEnd { round: r }) if r == round => {
                self.close_round(round);
                if last {
                    // No page lands in pre-copy after the last round.
                    self.end_landing();
                }
                let next = round + 1;
                Ok(if self.postcopy.resumed() {
                    Phase::Postcopy { next }
                } else if last {
                    Phase::Stopped { next }
                } else {
                    Phase::Between { next }
                })
            }
            (Phase::Stopped { .. }, Message::DeviceState { data, last }) => {
                self.device_piece(Vec::new(), data, last, embedder)
            }
            (Phase::Device { state }, Message::DeviceState { data, last }) => {
                self.device_piece(state, data, last, embedder)
            }
            (Phase::Between { next }, Message::Checksums { regions }) if self.verify.is_on() => {
                self.check_baseline(&regions)?;
                Ok(Phase::Between { next })
            }
            (Phase::Verifying { state }, Message::Digests { chunks }) if self.baseline => {
                self.check_digests(&chunks)?;
                self.get_ready(state, embedder)
            }
            (Phase::Ready, Message::Commit) if self.postcopy.armed() => {
                self.resume_postcopy(embedder)
            }
            (Phase::Ready, Message::Commit) => {
                embedder
                    .resume()
                    .map_err(|e| (EngineError::Embedder(e), true))?;
                self.link.send(Message::Done);
                Ok(Phase::Done)
            }
            (Phase::Between { next }, Message::PostcopyPages { runs, last })
            | (Phase::Switching { next }, Message::PostcopyPages { runs, last }) => {
                self.postcopy_piece(next, runs, last)
            }
            (Phase::Postcopy { next }, Message::RoundStart { round, last: true })
                if round == next =>
            {
                Ok(self.open_round(round, true))
            }
            (Phase::Postcopy { .. }, Message::PostcopyEnd) => self.postcopy_end(),
            (Phase::PostcopyVerifying, Message::Digests { chunks }) => {
                self.check_digests(&chunks)?;
                self.finish_postcopy()
            }
            (phase, m) => Err(protocol(format!(
                "{} is not expected {}",
                m.name(),
                phase.describe()
            ))),
        }
    }

    /// The control connection broke during pre-copy: abandons the round in progress, stops
    /// every lane (so nothing stale lands later), and waits up to the reconnect window for
    /// the source to prove it holds the session on a new connection. Its lanes then join
    /// again, and the session goes on from the next round.
    fn await_source(&mut self, phase: Phase, why: EngineError) -> Result<Phase, Failure> {
        let next = self.abandon(phase);
        let deadline = std::time::Instant::now() + self.reconnect.window;
        loop {
            select! {
                recv(self.reconnect.rejoins) -> r => {
                    let Ok((stream, attempt, binding)) = r else { break };
                    if self.reconnect.last_attempt.is_some_and(|a| attempt <= a) {
                        continue;
                    }
                    self.reconnect.last_attempt = Some(attempt);
                    if self.take_back(stream, attempt, next, binding.as_ref()) {
                        return Ok(self.going_on(next));
                    }
                }
                default(Duration::from_millis(50)) => {
                    self.check_cancel()?;
                    if std::time::Instant::now() >= deadline {
                        break;
                    }
                }
            }
        }
        Err((
            EngineError::SourceGone {
                cause: Box::new(why),
                window_ms: self.reconnect.window.as_millis() as u64,
            },
            false,
        ))
    }

    /// A proven reconnect while our control connection still seemed alive: taken during
    /// pre-copy (within the window's rules), refused later.
    fn source_came_back(
        &mut self,
        phase: Phase,
        (stream, attempt, binding): super::lanes::Rejoin,
    ) -> Result<Phase, Failure> {
        let pre_copy = matches!(
            phase,
            Phase::Between { .. } | Phase::InRound { .. } | Phase::Postcopy { .. }
        );
        let fresh = self.reconnect.last_attempt.is_none_or(|a| attempt > a);
        if !pre_copy || self.reconnect.window.is_zero() || !fresh {
            return Ok(phase); // dropped: the source's attempt fails and it gives up in time
        }
        self.reconnect.last_attempt = Some(attempt);
        let next = self.abandon(phase);
        if self.take_back(stream, attempt, next, binding.as_ref()) {
            Ok(self.going_on(next))
        } else {
            self.await_source(
                self.going_on(next),
                EngineError::io(
                    std::io::ErrorKind::BrokenPipe,
                    "the reconnect's answer could not be sent",
                ),
            )
        }
    }

    /// Abandons the pre-copy round in progress: closes the gate and stops every lane, so
    /// nothing stale lands later. Returns the round the source must start next.
    fn abandon(&mut self, phase: Phase) -> u32 {
        self.sink.set_round_open(false);
        self.lanes.stop();
        match phase {
            Phase::Between { next } | Phase::Postcopy { next } => next,
            Phase::InRound { round, .. } => round + 1,
            _ => unreachable!("only the phases with rounds reconnect"),
        }
    }

    /// The phase a session goes on in after a reconnect, with round `next`.
    fn going_on(&self, next: u32) -> Phase {
        if self.postcopy.resumed() {
            Phase::Postcopy { next }
        } else {
            Phase::Between { next }
        }
    }

    /// Answers a proven reconnect, makes its connection the session's control connection
    /// and lets the lanes join again. False if the answer could not be sent.
    fn take_back(
        &mut self,
        mut stream: super::incoming::Sock,
        attempt: u32,
        next: u32,
        binding: Option<&[u8; 32]>,
    ) -> bool {
        let rc = &self.reconnect;
        let ok = Message::RejoinOk {
            next_round: next,
            mac: rc.auth.rejoin_ok_proof(attempt, next, binding),
        };
        // Flushed: a TLS session holds what it sealed until then.
        let sent = rc
            .rt
            .block_on(crate::control::handshake::write(&mut stream, &ok));
        if sent.is_err() {
            return false;
        }
        {
            let mut slots = rc.slots.lock().unwrap_or_else(|e| e.into_inner());
            for s in slots.iter_mut().take(rc.lanes as usize) {
                *s = true;
            }
            if self.postcopy.resumed() {
                // The fetch lane joins again too.
                if let Some(s) = slots.get_mut(2 * rc.lanes as usize) {
                    *s = true;
                }
            }
        }
        *self.link = ControlLink::start(&rc.rt, stream, rc.liveness, rc.limits);
        self.monitor.update(|s| s.reconnects += 1);
        true
    }

    fn open_round(&mut self, round: u32, last: bool) -> Phase {
        self.sink.set_round_open(true);
        self.monitor.round.store(round, Ordering::Relaxed);
        if last && !self.postcopy.resumed() {
            self.monitor.update(|s| s.status = MigrationStatus::Device);
        }
        Phase::InRound { round, last }
    }

    /// Every batch of the round is acknowledged, so no lane is landing anything: the gate
    /// closes until the next round (and for good after the last).
    fn close_round(&mut self, round: u32) {
        self.sink.set_round_open(false);
        self.link.send(Message::RoundEndAck { round });
        let landed = self.sink.landed.load(Ordering::Relaxed);
        self.monitor.update(|s| {
            s.ram.dirty_sync_count += 1;
            s.ram.normal_bytes = landed;
        });
    }

    /// Adds a piece of device state; the last one moves on to verification (or straight to
    /// the handover when not verifying).
    fn device_piece(
        &mut self,
        mut state: Vec<u8>,
        data: Vec<u8>,
        last: bool,
        embedder: &mut dyn DestEmbedder,
    ) -> Result<Phase, Failure> {
        if state.len() + data.len() > self.max_device_state {
            return Err(protocol(format!(
                "device state larger than the limit of {} bytes",
                self.max_device_state
            )));
        }
        state.extend_from_slice(&data);
        if last && self.postcopy.armed() {
            // Post-copy: nothing to compare yet (the pages come after the handover).
            self.switch_to_postcopy()?;
            return self.get_ready(state, embedder);
        }
        match (last, self.verify.is_on()) {
            (false, _) => Ok(Phase::Device { state }),
            (true, true) => Ok(Phase::Verifying { state }),
            (true, false) => self.get_ready(state, embedder),
        }
    }

    /// Before the pause: compares the source's chunk digests with ours (chunks it skipped
    /// are compared at the end) and tells the source the verdict.
    fn check_baseline(&mut self, theirs: &[Vec<u64>]) -> Result<(), Failure> {
        let ours = self.sink.hashes.as_ref().expect("verifying");
        let mism = verify::check_baseline(ours, theirs, MISMATCHES).map_err(protocol)?;
        self.baseline = true;
        self.verdict(mism, "we differ from the source in")
    }

    /// In the pause: compares the digests of the chunks changed since the baseline; with
    /// [`VerifyMode::Memory`](crate::verify::VerifyMode::Memory) then checks that our memory
    /// still holds what we received (when what we received matched).
    fn check_digests(&mut self, theirs: &[(u32, u64, u64)]) -> Result<(), Failure> {
        let ours = self.sink.hashes.as_ref().expect("verifying");
        let mism = verify::check_touched(ours, theirs, MISMATCHES);
        // After post-copy our guest runs and writes its memory: only what landed compares.
        let rehash = self.verify == crate::verify::VerifyMode::Memory && !self.postcopy.resumed();
        if !mism.is_empty() || !rehash {
            return self.verdict(mism, "we differ from the source in");
        }
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let changed = verify::rehash_memory(ours, self.sink.map(), threads, MISMATCHES);
        self.verdict(
            changed,
            "our memory no longer holds what it received (written after it landed) in",
        )
    }

    /// Tells the source whether the chunks matched; a mismatch ends the session, with `what`
    /// and the chunks as our error.
    fn verdict(&mut self, mism: Vec<(u32, u64)>, what: &str) -> Result<(), Failure> {
        let ok = mism.is_empty();
        self.monitor.update(|s| s.verified = Some(ok));
        self.link.send(Message::Verified {
            ok,
            mismatches: mism.clone(),
        });
        if ok {
            return Ok(());
        }
        Err((
            EngineError::VerifyFailed(format!("{what} {}", verify::describe(&mism))),
            false,
        ))
    }

    /// Loads the device state and tells the source we are ready; our guest stays paused.
    fn get_ready(
        &mut self,
        state: Vec<u8>,
        embedder: &mut dyn DestEmbedder,
    ) -> Result<Phase, Failure> {
        embedder
            .load_device_state(state)
            .map_err(|e| (EngineError::Embedder(e), true))?;
        self.link.send(Message::Ready);
        Ok(Phase::Ready)
    }

    /// A lane ended: a malformed stream ends the session; a failed lane is the source's to
    /// replace (it re-sends that lane's pages elsewhere).
    fn lane_ended(
        &mut self,
        i: usize,
        r: Result<rmig_transport::tcp::DestLaneSummary, LaneError>,
    ) -> Result<(), Failure> {
        match r {
            Ok(_) => Ok(()),
            Err(LaneError::Malformed(m)) => Err(protocol(format!("lane {i}: {m}"))),
            Err(_) => {
                self.monitor.update(|s| s.lanes_failed += 1);
                Ok(())
            }
        }
    }

    /// Starts a TCP lane (in its TLS session when encrypted) that replaces the failed RDMA
    /// lanes or rejoins after a reconnect.
    pub(super) fn admit(
        &mut self,
        lane: u16,
        sock: super::lanes::LaneSocket,
    ) -> Result<(), EngineError> {
        if lane == 2 * self.reconnect.lanes {
            return self.fetch_lane_joined(sock);
        }
        let l = sock
            .into_lane(self.sink.map().clone())
            .map_err(|e| EngineError::lane(lane as usize, e))?;
        self.lanes.start(lane as usize, Box::new(l))?;
        if lane < self.reconnect.lanes {
            return Ok(()); // a lane that joined again after a reconnect
        }
        self.monitor.update(|s| {
            s.transport = "tcp".into();
            s.fallback_reason =
                Some("the source replaced its failed RDMA lanes with TCP lanes".into());
            s.lanes += 1;
        });
        Ok(())
    }

    fn check_cancel(&mut self) -> Result<(), Failure> {
        // Once our guest runs in post-copy there is nothing to go back to: a cancel cannot
        // be honoured.
        if !self.monitor.cancel.is_cancelled() || self.postcopy.resumed() {
            return Ok(());
        }
        let reason = self.monitor.cancel.reason();
        self.link.send(Message::Cancel {
            reason: reason.clone(),
        });
        Err((EngineError::Cancelled(reason), false))
    }
}
