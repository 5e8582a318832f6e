//! Admitting data lanes on the destination, and the threads that run them.
//!
//! Each connection must prove with its `LaneJoin` that it belongs to the session. The proof
//! is read on a task of its own, so an idle or slow connection opened by anyone cannot hold up
//! the real lanes; connections that fail are refused with an error frame and counted.
//!
//! Lanes `0..n` join during setup. When the session runs over RDMA, lanes `n..2n` may join
//! later: the source opens them as TCP lanes if every RDMA lane has failed.

use std::net::{Shutdown, TcpStream as StdStream};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;
use rmig_transport::tcp::DestLaneSummary;
use rmig_transport::{DestLane, LaneError};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use super::sink::DestSink;
use crate::control::auth::SessionAuth;
use crate::monitor::Monitor;
use crate::protocol::{codec, Message};
use crate::EngineError;

/// Most lane proofs being read at once; a connection beyond that is dropped at once.
const MAX_PENDING: usize = 64;
/// How long a connection has to send its `LaneJoin`.
const PROOF_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection and its claim: the lane number it proved, or why it is refused (`None`: it
/// closed without a word).
type Claim = (TcpStream, Option<Result<u16, String>>);

/// Reads a connection's `LaneJoin` and checks its proof.
async fn proof(mut s: TcpStream, auth: SessionAuth) -> Claim {
    let first = tokio::time::timeout(PROOF_TIMEOUT, codec::read_async(&mut s)).await;
    let verdict = match first {
        Ok(Ok(Some(Message::LaneJoin { session, lane, mac }))) => {
            if session != auth.session_id() || !auth.check_lane(lane, &mac) {
                Some(Err(
                    "lane could not prove that it belongs to the session".to_string()
                ))
            } else {
                Some(Ok(lane))
            }
        }
        Ok(Ok(Some(m))) => Some(Err(format!("expected LaneJoin, got {}", m.name()))),
        Ok(Ok(None)) => None,
        Ok(Err(e)) => Some(Err(e.to_string())),
        Err(_) => Some(Err("no LaneJoin in time".to_string())),
    };
    (s, verdict)
}

/// Answers a proven lane (its blocking socket), or refuses it with an error frame (`None`).
async fn answer(mut s: TcpStream, verdict: Result<u16, String>) -> Option<StdStream> {
    match verdict {
        Ok(_) => {
            codec::write_async(&mut s, &Message::LaneAccepted)
                .await
                .ok()?;
            let std = s.into_std().ok()?;
            std.set_nonblocking(false).ok()?;
            Some(std)
        }
        Err(why) => {
            let _ = codec::write_async(&mut s, &Message::Error { message: why }).await;
            None
        }
    }
}

/// Lane proofs being checked, each on its own task.
struct Doorman {
    auth: SessionAuth,
    checks: JoinSet<Claim>,
    monitor: Arc<Monitor>,
}

impl Doorman {
    fn new(auth: SessionAuth, monitor: Arc<Monitor>) -> Self {
        Doorman {
            auth,
            checks: JoinSet::new(),
            monitor,
        }
    }

    /// Starts checking a new connection (or drops it when too many are being checked).
    fn check(&mut self, s: TcpStream) {
        if self.checks.len() < MAX_PENDING {
            self.checks.spawn(proof(s, self.auth.clone()));
        } else {
            self.refused();
        }
    }

    fn refused(&self) {
        self.monitor.update(|s| s.connections_refused += 1);
    }

    /// Answers a checked connection (`done`, from `checks.join_next()`, the only part that
    /// may race in a `select!`: answering must not be cancelled half-way). `want` decides
    /// whether its lane number is expected. Returns an admitted lane, or `None` for a
    /// connection that was refused.
    async fn settle(
        &mut self,
        done: Result<Claim, tokio::task::JoinError>,
        want: &mut impl FnMut(u16) -> Result<(), String>,
    ) -> Option<(u16, StdStream)> {
        let Ok((s, Some(verdict))) = done else {
            self.refused();
            return None;
        };
        let verdict = verdict.and_then(|lane| want(lane).map(|()| lane));
        let lane = verdict.as_ref().ok().copied();
        match (answer(s, verdict).await, lane) {
            (Some(std), Some(l)) => Some((l, std)),
            _ => {
                self.refused();
                None
            }
        }
    }
}

/// Accepts lanes `0..n` on `listener`; connections that cannot prove membership are refused
/// with an error frame and do not count. Fails if the lanes do not all join within `timeout`.
pub(crate) async fn join(
    listener: &TcpListener,
    auth: &SessionAuth,
    n: u16,
    timeout: Duration,
    monitor: &Arc<Monitor>,
) -> Result<Vec<StdStream>, EngineError> {
    let mut lanes: Vec<Option<StdStream>> = (0..n).map(|_| None).collect();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut door = Doorman::new(auth.clone(), monitor.clone());
    while lanes.iter().any(Option::is_none) {
        let taken: Vec<bool> = lanes.iter().map(Option::is_some).collect();
        let mut want = |lane: u16| match taken.get(lane as usize) {
            Some(false) => Ok(()),
            _ => Err(format!("lane {lane} is not expected")),
        };
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                return Err(EngineError::Protocol(format!(
                    "only {} of {n} data lanes joined within {} ms",
                    lanes.iter().filter(|l| l.is_some()).count(),
                    timeout.as_millis()
                )))
            }
            r = listener.accept() => {
                if let Ok((s, _)) = r {
                    door.check(s);
                }
            }
            Some(done) = door.checks.join_next() => {
                if let Some((lane, s)) = door.settle(done, &mut want).await {
                    lanes[lane as usize] = Some(s);
                }
            }
        }
    }
    Ok(lanes.into_iter().map(|l| l.expect("all joined")).collect())
}

/// Admits the fallback lanes `n..2n` for as long as the session runs, handing each to `tx`.
pub(crate) async fn fallback(
    listener: Arc<TcpListener>,
    auth: SessionAuth,
    n: u16,
    tx: Sender<(u16, StdStream)>,
    monitor: Arc<Monitor>,
) {
    let mut taken = vec![false; n as usize];
    let mut door = Doorman::new(auth, monitor);
    let mut want = |lane: u16| match lane.checked_sub(n).and_then(|i| taken.get_mut(i as usize)) {
        Some(t) if !*t => {
            *t = true;
            Ok(())
        }
        _ => Err(format!("lane {lane} is not expected")),
    };
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => door.check(s),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            },
            Some(done) = door.checks.join_next() => {
                if let Some(lane) = door.settle(done, &mut want).await {
                    if tx.send(lane).is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// What a lane thread reports when its lane ends: lane number and result.
pub(crate) type LaneResult = (usize, Result<DestLaneSummary, LaneError>);

/// The threads that run a session's destination lanes.
pub(crate) struct LaneThreads {
    pub pool: rmig_numa::WorkerPool,
    pub sink: Arc<DestSink>,
    pub results: Sender<LaneResult>,
    pub joins: Vec<std::thread::JoinHandle<()>>,
    /// Handles that end each lane's `run` (its socket, shut down).
    pub shutdowns: Vec<StdStream>,
}

impl LaneThreads {
    /// Runs lane `i` on a thread of its own; its result goes to `results`.
    pub fn start(&mut self, i: usize, mut lane: Box<dyn DestLane>) -> Result<(), EngineError> {
        self.shutdowns.push(lane.shutdown_handle()?);
        self.sink
            .crash_handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(lane.shutdown_handle()?);
        let sink = self.sink.clone();
        let tx = self.results.clone();
        self.joins
            .push(self.pool.spawn(rmig_numa::Role::DestLane, i, move || {
                let r = lane.run(sink.as_ref());
                let _ = tx.send((i, r));
            })?);
        Ok(())
    }

    /// Ends every lane that is still open and waits for its thread.
    pub fn stop(&mut self) {
        for s in &self.shutdowns {
            let _ = s.shutdown(Shutdown::Both);
        }
        for j in self.joins.drain(..) {
            let _ = j.join();
        }
    }
}
