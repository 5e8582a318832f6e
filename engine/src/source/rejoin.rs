//! Taking a session back after its control connection broke during pre-copy.
//!
//! A network blip longer than the peer timeout used to end the migration, and the next
//! attempt started from round 0. Before the pause nothing is lost by waiting: the guest runs
//! on the source, and the destination keeps what has landed. So within the reconnect window
//! the source stops its lanes (their unconfirmed pages, and the interrupted round's unsent
//! ones, become pending again), opens a new control connection that proves with `Rejoin` that
//! it holds the session, learns from `RejoinOk` which round comes next, opens its lanes again
//! and goes on. Verification is unaffected: every page the destination holds was hashed as it
//! landed, and every page sent again is hashed again on both ends. Post-copy reconnects the
//! same way while its background rounds run (the fetch lane joins again too; the guest's
//! faults on the destination wait meanwhile). Over RDMA, and between the pause and the
//! destination's `Resumed`, a broken link still ends the migration.

use std::io::ErrorKind;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::lanes::TcpKit;
use super::SourceSession;

/// Most reconnects in one migration: a link that keeps breaking is not a blip.
const MAX_RECONNECTS: u64 = 8;
use crate::control::handshake;
use crate::control::link::{ControlLink, ControlStream};
use crate::protocol::codec::{self, Limits};
use crate::protocol::{Message, TransportKind};
use crate::EngineError;

impl SourceSession {
    /// Whether `e`, met during a pre-copy round, is a broken link this session may reconnect
    /// from.
    pub(super) fn may_reconnect(&self, e: &EngineError) -> bool {
        let link_broke = matches!(
            e,
            EngineError::PeerClosed
                | EngineError::PeerSilent(_)
                | EngineError::Io(_)
                | EngineError::AllLanesFailed(_)
        );
        link_broke
            && !self.cfg.reconnect_window.is_zero()
            && self.monitor.stats().reconnects < MAX_RECONNECTS
            && self.lanes.transport() == TransportKind::Tcp
            && (self.paused_at.is_none() || self.resumed_there)
    }

    /// Reconnects within the window, or fails with `why` and the last attempt's error.
    pub(super) fn reconnect(&mut self, why: &EngineError) -> Result<(), EngineError> {
        // The interrupted round's unsent pages go back with the unconfirmed ones.
        self.lanes.stand_down();
        let deadline = Instant::now() + self.cfg.reconnect_window;
        loop {
            self.rejoins += 1;
            let e = match self.rejoin(self.rejoins) {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            self.check_cancel()?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(EngineError::NoReconnect {
                    cause: Box::new(why.clone()),
                    window_ms: self.cfg.reconnect_window.as_millis() as u64,
                    last: Box::new(e),
                });
            }
            std::thread::sleep(left.min(Duration::from_millis(300)));
        }
    }

    /// One reconnect attempt: the control connection, then every lane.
    fn rejoin(&mut self, attempt: u32) -> Result<(), EngineError> {
        let kit = self.lanes.kit();
        let (stream, next) =
            self._rt
                .block_on(rejoin_control(kit, attempt, self.cfg.handshake_timeout))?;
        self.link = ControlLink::start(
            self._rt.handle(),
            stream,
            self.cfg.liveness,
            Limits::default(),
        );
        self.lanes.reopen()?;
        self.round = next;
        // The statistics say so (`reconnects`); a library prints nothing.
        self.monitor.update(|s| s.reconnects += 1);
        Ok(())
    }
}

/// Opens a control connection to the session's destination (in a new TLS session when the
/// session is encrypted) and proves the session, bound to that connection; returns it with
/// the round the destination expects next.
async fn rejoin_control(
    kit: &TcpKit,
    attempt: u32,
    timeout: Duration,
) -> Result<(ControlStream, u32), EngineError> {
    let s = tokio::time::timeout(timeout, TcpStream::connect(kit.peer))
        .await
        .map_err(|_| EngineError::io(ErrorKind::TimedOut, "connecting timed out"))??;
    s.set_nodelay(true)?;
    let (mut s, binding) =
        super::setup::secure(s, kit.auth.lane_tls().map(|t| &**t), timeout).await?;
    let claim = Message::Rejoin {
        session: kit.auth.session_id(),
        attempt,
        mac: kit.auth.rejoin_proof(attempt, binding.as_ref()),
    };
    handshake::write(&mut s, &claim).await?;
    let answer = tokio::time::timeout(timeout, codec::read_async(&mut s)).await;
    match answer {
        Ok(Ok(Some(Message::RejoinOk { next_round, mac })))
            if kit
                .auth
                .check_rejoin_ok(attempt, next_round, binding.as_ref(), &mac) =>
        {
            Ok((s, next_round))
        }
        Ok(Ok(Some(Message::RejoinOk { .. }))) => Err(EngineError::Auth(
            "the destination could not prove the session".into(),
        )),
        Ok(Ok(Some(Message::Error { message }))) => Err(EngineError::PeerError(message)),
        Ok(Ok(Some(m))) => Err(EngineError::Protocol(format!(
            "expected RejoinOk, got {}",
            m.name()
        ))),
        Ok(Ok(None)) => Err(EngineError::PeerClosed),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(EngineError::io(ErrorKind::TimedOut, "no RejoinOk in time")),
    }
}
