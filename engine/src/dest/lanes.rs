//! Admitting data lanes on the destination, and the threads that run them.
//!
//! Each lane's connection must prove with its `LaneJoin` that it belongs to the session; the
//! [`Door`] classifies connections, and here each claim is checked against the session's keys
//! and the lane numbers still open. A connection that fails is refused with an error frame
//! and counted; a second source that completed its handshake is told that a migration is in
//! progress.
//!
//! Lanes `0..n` join during setup. When the session runs over RDMA, lanes `n..2n` may join
//! later: the source opens them as TCP lanes if every RDMA lane has failed.

use std::net::{Shutdown, TcpStream as StdStream};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;
use rmig_transport::tcp::{DestLaneSummary, TcpDestLane};
use rmig_transport::{DestLane, LaneError};

use super::incoming::{Arrival, Door, LaneClaim, RejoinClaim, Sock};
use super::sink::DestSink;
use crate::control::auth::SessionAuth;
use crate::control::handshake;
use crate::control::link::{ControlLink, INBOX};
use crate::protocol::Message;
use crate::EngineError;

/// An admitted lane's blocking socket, with its TLS session when it is encrypted. It
/// dereferences to the socket.
pub(crate) struct LaneSocket {
    sock: StdStream,
    tls: Option<rustls::ServerConnection>,
}

impl std::ops::Deref for LaneSocket {
    type Target = StdStream;

    fn deref(&self) -> &StdStream {
        &self.sock
    }
}

impl LaneSocket {
    /// The TCP lane that runs on this socket (inside its TLS session, if it has one).
    pub fn into_lane(self, map: rmig_transport::MemoryMap) -> Result<TcpDestLane, LaneError> {
        match self.tls {
            None => TcpDestLane::new(self.sock, map),
            Some(conn) => TcpDestLane::new_tls(self.sock, conn, map),
        }
    }
}

impl LaneSocket {
    /// The RDMA lane on this socket: the transport's queue pair exchange (which carries this
    /// end's memory addresses and keys) runs inside the lane's TLS session when it has one,
    /// then the lane runs on the socket and the queue pair. `wait` bounds the source's part.
    pub fn accept_rdma(
        &mut self,
        dev: &Arc<rmig_transport::rdma::RdmaDevice>,
        mem: &Arc<rmig_transport::rdma::LocalMemory>,
        wait: Duration,
    ) -> Result<rmig_transport::rdma::RdmaDestLane, rmig_transport::rdma::RdmaError> {
        rmig_transport::rdma::accept_dest_lane(&self.sock, self.tls.as_mut(), dev, mem, wait)
    }

    /// Post-copy over RDMA: connects a reader of the source's memory through this fetch lane
    /// (the exchange inside the lane's TLS session when it has one: the source's answer
    /// carries its memory keys), the answer within `wait`.
    pub fn connect_reader(
        &mut self,
        dev: &Arc<rmig_transport::rdma::RdmaDevice>,
        cfg: rmig_transport::rdma::ReaderConfig,
        wait: Duration,
    ) -> Result<rmig_transport::rdma::RdmaPageReader, rmig_transport::rdma::RdmaError> {
        rmig_transport::rdma::RdmaPageReader::connect(&self.sock, self.tls.as_mut(), dev, cfg, wait)
    }

    /// The post-copy fetch lane on this socket (inside its TLS session, if it has one).
    /// An answer that takes longer than `answer_within` ends the lane (the fault thread then
    /// waits for the lane of a reconnect, and the session decides), so a source that froze
    /// cannot hold the fault thread in a read for ever.
    pub fn into_fetch(
        self,
        answer_within: std::time::Duration,
    ) -> std::io::Result<rmig_transport::tcp::fetch::FetchConn> {
        self.sock.set_nodelay(true)?;
        self.sock.set_read_timeout(Some(answer_within))?;
        Ok(match self.tls {
            None => rmig_transport::tcp::fetch::FetchConn::plain(self.sock),
            Some(conn) => rmig_transport::tcp::fetch::FetchConn::tls_server(conn, self.sock),
        })
    }
}

/// Checks a claim: the lane number it proved (bound to its own TLS session when it has one),
/// or why it is refused.
fn verdict(claim: &LaneClaim, auth: &SessionAuth) -> Result<u16, String> {
    let binding = claim.binding.as_ref();
    if claim.session != auth.session_id() || !auth.check_lane(claim.lane, binding, &claim.mac) {
        return Err("lane could not prove that it belongs to the session".into());
    }
    Ok(claim.lane)
}

/// Answers a proven lane (its blocking socket), or refuses it with an error frame (`None`).
async fn answer(mut s: Sock, verdict: Result<u16, String>) -> Option<LaneSocket> {
    match verdict {
        Ok(_) => {
            handshake::write(&mut s, &Message::LaneAccepted)
                .await
                .ok()?;
            let (tcp, tls) = match s {
                Sock::Plain(t) => (t, None),
                Sock::Tls(t) => {
                    let (tcp, conn) = t.into_inner();
                    (tcp.into_inner(), Some(conn))
                }
            };
            let sock = tcp.into_std().ok()?;
            sock.set_nonblocking(false).ok()?;
            Some(LaneSocket { sock, tls })
        }
        Err(why) => {
            let _ = handshake::write(&mut s, &Message::Error { message: why }).await;
            None
        }
    }
}

/// Settles what the door let in during a session: a lane claim is checked (`want` decides
/// whether its number is expected) and answered; anything else is refused. Returns an
/// admitted lane.
async fn settle(
    door: &Door,
    arrival: Arrival,
    auth: &SessionAuth,
    want: &mut impl FnMut(u16) -> Result<(), String>,
) -> Option<(u16, LaneSocket)> {
    let claim = match arrival {
        Arrival::Lane(claim) => claim,
        Arrival::Source(mut other) => {
            let e = EngineError::Protocol("a migration is already in progress here".into());
            let _: Result<(), _> = crate::control::handshake::refuse(&mut other.stream, e).await;
            door.refused();
            return None;
        }
        Arrival::Refused(_) | Arrival::Rejoin(_) => {
            door.refused();
            return None;
        }
    };
    let v = verdict(&claim, auth).and_then(|lane| want(lane).map(|()| lane));
    match (answer(claim.stream, v.clone()).await, v) {
        (Some(std), Ok(l)) => Some((l, std)),
        _ => {
            door.refused();
            None
        }
    }
}

/// Keeps an eye on the control connection while lanes join: a failed connection or the
/// peer's `Error`/`Cancel` ends the join at once; other messages (the first round may start
/// as the last lane is answered) are kept for the session, at most [`INBOX`] of them.
fn watch_control(inbox: &Inbox, kept: &mut Vec<Message>) -> Result<(), EngineError> {
    while let Ok(m) = inbox.try_recv() {
        let m = ControlLink::screen(m)?;
        if kept.len() >= INBOX {
            return Err(EngineError::Protocol(
                "too many control messages before the data lanes joined".into(),
            ));
        }
        kept.push(m);
    }
    Ok(())
}

/// The control connection's inbox.
type Inbox = crossbeam_channel::Receiver<Result<Message, EngineError>>;

/// Admits lanes `0..n`: first the claims that arrived before the handshake ended
/// (`early`), then what comes through the door, while watching the control connection
/// (messages that arrive meanwhile go to `kept`). Fails if the lanes do not all join within
/// `timeout`.
pub(crate) async fn join(
    door: &mut Door,
    early: Vec<LaneClaim>,
    auth: &SessionAuth,
    n: u16,
    timeout: Duration,
    control: (&Inbox, &mut Vec<Message>),
) -> Result<Vec<LaneSocket>, EngineError> {
    let (inbox, kept) = control;
    let mut lanes: Vec<Option<LaneSocket>> = (0..n).map(|_| None).collect();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut early = early.into_iter();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    while lanes.iter().any(Option::is_none) {
        let arrival = match early.next() {
            Some(claim) => Arrival::Lane(claim),
            None => tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(EngineError::Protocol(format!(
                        "only {} of {n} data lanes joined within {} ms",
                        lanes.iter().filter(|l| l.is_some()).count(),
                        timeout.as_millis()
                    )))
                }
                _ = tick.tick() => {
                    watch_control(inbox, kept)?;
                    continue;
                }
                a = door.next() => a,
            },
        };
        let mut want = |lane: u16| match lanes.get(lane as usize) {
            Some(None) => Ok(()),
            _ => Err(format!("lane {lane} is not expected")),
        };
        if let Some((lane, s)) = settle(door, arrival, auth, &mut want).await {
            lanes[lane as usize] = Some(s);
        }
    }
    Ok(lanes.into_iter().map(|l| l.expect("all joined")).collect())
}

/// Lane numbers that may join while the session runs (`true`: open): the fallback lanes
/// `n..2n` over RDMA, and lanes `0..n` again after the source reconnected.
pub(crate) type Slots = Arc<std::sync::Mutex<Vec<bool>>>;

/// A checked reconnect: the new control connection (in its TLS session when encrypted), its
/// attempt number and its channel binding.
pub(crate) type Rejoin = (Sock, u32, Option<[u8; 32]>);

/// The door while the session runs: admits lanes whose slot is open (handing each to
/// `lanes`), passes proven reconnects to `rejoins`, and refuses everything else.
pub(crate) async fn in_session(
    mut door: Door,
    auth: SessionAuth,
    slots: Slots,
    lanes: Sender<(u16, LaneSocket)>,
    rejoins: Sender<Rejoin>,
) {
    let mut want = |lane: u16| {
        let mut open = slots.lock().unwrap_or_else(|e| e.into_inner());
        match open.get_mut(lane as usize) {
            Some(o) if *o => {
                *o = false;
                Ok(())
            }
            _ => Err(format!("lane {lane} is not expected")),
        }
    };
    loop {
        match door.next().await {
            Arrival::Rejoin(claim) => match proven_rejoin(claim, &auth) {
                Some(r) => {
                    if rejoins.send(r).is_err() {
                        return;
                    }
                }
                None => door.refused(),
            },
            arrival => {
                if let Some((n, lane)) = settle(&door, arrival, &auth, &mut want).await {
                    if lanes.send((n, lane)).is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// A reconnect whose proof holds (bound to its own TLS session when it has one), or `None`.
fn proven_rejoin(c: RejoinClaim, auth: &SessionAuth) -> Option<Rejoin> {
    let proven =
        c.session == auth.session_id() && auth.check_rejoin(c.attempt, c.binding.as_ref(), &c.mac);
    proven.then_some((c.stream, c.attempt, c.binding))
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
    /// No lanes yet; their threads will run on `sink` and report to the receiver returned.
    pub fn new(sink: Arc<DestSink>) -> (LaneThreads, crossbeam_channel::Receiver<LaneResult>) {
        let (results, rx) = crossbeam_channel::unbounded();
        let threads = LaneThreads {
            pool: rmig_numa::WorkerPool::flat(),
            sink,
            results,
            joins: Vec::new(),
            shutdowns: Vec::new(),
        };
        (threads, rx)
    }

    /// Runs lane `i` on a thread of its own; its result goes to `results`.
    pub fn start(&mut self, i: usize, mut lane: Box<dyn DestLane>) -> Result<(), EngineError> {
        self.shutdowns.push(lane.shutdown_handle()?);
        self.sink.crash.watch(lane.as_ref())?;
        // A lane that ends in error (refused, broken, hostile) is closed at once, so that its
        // sender learns it then and not when the session ends (the handle above keeps the
        // socket open until then).
        let own = lane.shutdown_handle()?;
        let sink = self.sink.clone();
        let tx = self.results.clone();
        self.joins
            .push(self.pool.spawn(rmig_numa::Role::DestLane, i, move || {
                let r = lane.run(sink.as_ref());
                if r.is_err() {
                    let _ = own.shutdown(Shutdown::Both);
                }
                let _ = tx.send((i, r));
            })?);
        Ok(())
    }

    /// Ends every lane that is still open and waits for its thread.
    pub fn stop(&mut self) {
        for s in self.shutdowns.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        for j in self.joins.drain(..) {
            let _ = j.join();
        }
    }
}
