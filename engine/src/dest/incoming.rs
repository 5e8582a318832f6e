//! The destination's door: every connection to its port, for the whole session.
//!
//! A destination's port is open to anyone: port scanners, health checks, a source with the
//! wrong key or version, a connection that never says a word, and the real source's control
//! connection and data lanes, which may arrive in any order (a lane can connect while the
//! handshake's last reply is still on its way to us). So one [`Door`] owns the listener from
//! start to end, and each connection is classified by its first frame on a task of its own:
//! `Hello` opens a handshake, `LaneJoin` is a lane's claim and `Rejoin` a source reconnecting
//! its session (both checked by whoever holds the session's keys), anything else is refused. No connection can hold up another; one that
//! fails is told why when it got that far, dropped and counted, and the destination goes on
//! waiting (like QEMU's `-incoming`) until a source completes the handshake, the embedder
//! cancels, or the incoming timeout passes.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rmig_transport::rdma::RdmaDevice;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::config::TransportChoice;
use crate::control::handshake::{self, Agreed, DestAccept};
use crate::control::tls::{self, ServerTls, TlsError};
use crate::monitor::Monitor;
use crate::protocol::{codec, Message, TransportKind};
use crate::{DestConfig, EngineError};

/// Most connections being classified at once; one beyond that is dropped at once (and
/// counted), so a flood of idle connections costs a bounded amount of memory.
const MAX_PENDING: usize = 64;
/// How long a connection has to send its first frame.
const FIRST_FRAME: Duration = Duration::from_secs(5);

/// A connection to the destination: cleartext, or a TLS session over TCP.
pub(crate) enum Sock {
    /// Cleartext.
    Plain(TcpStream),
    /// TLS.
    Tls(Box<tls::ServerStream>),
}

impl tokio::io::AsyncRead for Sock {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Sock::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Sock::Tls(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Sock {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Sock::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Sock::Tls(t) => Pin::new(t.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Sock::Plain(s) => Pin::new(s).poll_flush(cx),
            Sock::Tls(t) => Pin::new(t.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Sock::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Sock::Tls(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A source that passed the handshake.
pub(crate) struct Incoming {
    /// Its control connection.
    pub stream: Sock,
    /// What the handshake settled.
    pub agreed: Agreed,
    /// The RDMA device that serves the address the source reached us on, if any.
    pub device: Option<Arc<RdmaDevice>>,
}

/// A data lane's opening claim, not yet checked.
pub(crate) struct LaneClaim {
    /// Its connection.
    pub stream: Sock,
    /// The channel binding of its TLS session, when it has one.
    pub binding: Option<[u8; 32]>,
    /// The session it names.
    pub session: [u8; 16],
    /// The lane number it claims.
    pub lane: u16,
    /// Its proof of membership.
    pub mac: [u8; 32],
}

/// A source's claim to reconnect its session, not yet checked.
pub(crate) struct RejoinClaim {
    /// The new control connection.
    pub stream: Sock,
    /// The channel binding of its TLS session, when it has one.
    pub binding: Option<[u8; 32]>,
    /// The session it names.
    pub session: [u8; 16],
    /// The reconnect attempt.
    pub attempt: u32,
    /// Its proof.
    pub mac: [u8; 32],
}

/// What a connection turned out to be.
pub(crate) enum Arrival {
    /// A source that completed the handshake.
    Source(Box<Incoming>),
    /// A data lane's claim.
    Lane(LaneClaim),
    /// A source reconnecting its session.
    Rejoin(RejoinClaim),
    /// Dropped: why.
    Refused(EngineError),
}

/// The listener and the connections being classified.
pub(crate) struct Door {
    listener: Arc<TcpListener>,
    pending: JoinSet<Arrival>,
    cfg: DestConfig,
    accept: DestAccept,
    /// Set once a source has been chosen: later `Hello`s are refused.
    busy: Arc<AtomicBool>,
    monitor: Arc<Monitor>,
    /// TLS, when every connection must be encrypted.
    tls: Option<Arc<ServerTls>>,
}

impl Door {
    /// A door on `listener` for sessions described by `cfg` and `accept`.
    pub fn new(
        listener: Arc<TcpListener>,
        cfg: DestConfig,
        accept: DestAccept,
        monitor: Arc<Monitor>,
    ) -> Result<Door, EngineError> {
        let tls = ServerTls::new(&cfg.encryption)?;
        Ok(Door {
            listener,
            pending: JoinSet::new(),
            cfg,
            accept,
            busy: Arc::new(AtomicBool::new(false)),
            monitor,
            tls,
        })
    }

    /// The next classified connection. Cancel-safe: it may race other futures in a
    /// `select!` (accepting and joining tasks are both cancel-safe, and nothing is awaited
    /// after a result is in hand).
    pub async fn next(&mut self) -> Arrival {
        loop {
            tokio::select! {
                r = self.listener.accept() => match r {
                    Ok((s, _)) if self.pending.len() < MAX_PENDING => {
                        let task = classify(s, self.cfg.clone(), self.accept.clone(), self.busy.clone(), self.tls.clone());
                        self.pending.spawn(task);
                    }
                    Ok(_) => return Arrival::Refused(EngineError::io(std::io::ErrorKind::Other, "too many connections at once")),
                    // Out of file descriptors and the like: wait a little rather than spin.
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                },
                Some(done) = self.pending.join_next() => {
                    return done.unwrap_or_else(|e| {
                        Arrival::Refused(EngineError::io(std::io::ErrorKind::Other, format!("connection task: {e}")))
                    })
                }
            }
        }
    }

    /// Counts a refused connection in the statistics.
    pub fn refused(&self) {
        self.monitor.update(|s| s.connections_refused += 1);
    }
}

/// Connections dropped while waiting for the source, and why the last one was.
#[derive(Default)]
struct Refusals {
    count: u64,
    last: Option<EngineError>,
}

/// Waits until a source completes the handshake. Lane claims that arrive first (the source's
/// lanes racing its last handshake reply) are kept for the lane stage, at most
/// `MAX_PENDING` of them.
pub(crate) async fn accept_source(
    door: &mut Door,
    early: &mut Vec<LaneClaim>,
) -> Result<Incoming, EngineError> {
    let started = tokio::time::Instant::now();
    let deadline = door.cfg.incoming_timeout.map(|t| started + t);
    let mut refused = Refusals::default();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            a = door.next() => match a {
                Arrival::Source(incoming) => {
                    door.busy.store(true, Ordering::Release);
                    return Ok(*incoming);
                }
                Arrival::Lane(claim) if early.len() < MAX_PENDING => early.push(claim),
                Arrival::Lane(_) | Arrival::Rejoin(_) => {
                    door.refused();
                    refused.count += 1;
                }
                Arrival::Refused(e) => {
                    door.refused();
                    refused.count += 1;
                    refused.last = Some(e);
                }
            },
            _ = tick.tick() => {
                if door.monitor.cancel.is_cancelled() {
                    return Err(EngineError::Cancelled(door.monitor.cancel.reason()));
                }
                if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                    return Err(EngineError::NoSource {
                        waited_ms: started.elapsed().as_millis() as u64,
                        refused: refused.count,
                        last: refused.last.map(Box::new),
                    });
                }
            }
        }
    }
}

/// Reads a connection's first frame (inside TLS when the destination is encrypted) and acts
/// on it: a handshake for `Hello` (unless a source has been chosen), a claim for `LaneJoin`,
/// a refusal for anything else.
async fn classify(
    s: TcpStream,
    cfg: DestConfig,
    accept: DestAccept,
    busy: Arc<AtomicBool>,
    tls: Option<Arc<ServerTls>>,
) -> Arrival {
    let opened = tokio::time::timeout(FIRST_FRAME, open(s, tls.as_deref())).await;
    let (mut s, binding, local) = match opened {
        Err(_) => {
            let e = TlsError::Handshake("no TLS handshake in time".into());
            return Arrival::Refused(e.into());
        }
        Ok(Err(e)) => return Arrival::Refused(e),
        Ok(Ok(o)) => o,
    };
    let first = match tokio::time::timeout(FIRST_FRAME, codec::read_async(&mut s)).await {
        Err(_) => Err(EngineError::Protocol("no first frame in time".into())),
        Ok(Ok(Some(m))) => Ok(m),
        Ok(Ok(None)) => Err(EngineError::PeerClosed),
        Ok(Err(e)) => Err(e),
    };
    let r = match first {
        Ok(Message::LaneJoin { session, lane, mac }) => {
            return Arrival::Lane(LaneClaim {
                stream: s,
                binding,
                session,
                lane,
                mac,
            })
        }
        Ok(Message::Rejoin {
            session,
            attempt,
            mac,
        }) => {
            return Arrival::Rejoin(RejoinClaim {
                stream: s,
                binding,
                session,
                attempt,
                mac,
            })
        }
        Ok(Message::Hello { .. }) if busy.load(Ordering::Acquire) => {
            let e = EngineError::Protocol("a migration is already in progress here".into());
            handshake::refuse(&mut s, e).await
        }
        Ok(hello) => handshake_one(s, hello, cfg, accept, binding, local).await,
        Err(e @ EngineError::Protocol(_)) => handshake::refuse(&mut s, e).await,
        Err(e) => Err(e),
    };
    match r {
        Ok(incoming) => Arrival::Source(Box::new(incoming)),
        Err(e) => Arrival::Refused(e),
    }
}

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// Opens a connection as this destination requires: a TLS handshake when it is encrypted,
/// nothing more when not. A peer whose first byte says it does not match is told so (in
/// cleartext, which is all it could read). Returns the connection, its channel binding and
/// our address on it.
async fn open(
    s: TcpStream,
    tls: Option<&ServerTls>,
) -> Result<(Sock, Option<[u8; 32]>, IpAddr), EngineError> {
    s.set_nodelay(true)?;
    let local = s.local_addr()?.ip();
    let mut first = [0u8; 1];
    let mut s = s;
    if s.peek(&mut first).await? == 0 {
        return Err(EngineError::PeerClosed);
    }
    let is_tls = first[0] == TLS_HANDSHAKE;
    match tls {
        None if is_tls => {
            let e = EngineError::Protocol(
                "the source speaks TLS, but this destination's encryption is off \
                 (--encryption)"
                    .into(),
            );
            handshake::refuse(&mut s, e).await
        }
        None => Ok((Sock::Plain(s), None, local)),
        Some(_) if !is_tls => {
            let e = EngineError::Protocol(
                "this destination requires encryption (TLS), but the source's is off \
                 (--encryption)"
                    .into(),
            );
            handshake::refuse(&mut s, e).await
        }
        Some(tls) => {
            let t = tls
                .acceptor()
                .accept(s)
                .await
                .map_err(|e| tls::explain(&e))?;
            let binding = tls::binding(t.get_ref().1)?;
            Ok((Sock::Tls(Box::new(t)), Some(binding), local))
        }
    }
}

/// Runs the rest of the handshake on a connection whose first frame was `hello`.
async fn handshake_one(
    mut s: Sock,
    hello: Message,
    cfg: DestConfig,
    mut accept: DestAccept,
    binding: Option<[u8; 32]>,
    local: IpAddr,
) -> Result<Incoming, EngineError> {
    let device = offer_transports(&cfg, &mut accept, local);
    let timeout = cfg.handshake_timeout;
    let agreed = handshake::dest_after(&mut s, hello, &accept, binding, timeout)
        .await
        .map_err(tls::surface)?;
    Ok(Incoming {
        stream: s,
        agreed,
        device,
    })
}

/// Fills in the transports this destination can serve for a connection that reached it on
/// `local`: RDMA when a device serves that address (unless TCP only, or encrypted without
/// the cleartext-lanes opt-in), TCP unless RDMA only.
fn offer_transports(
    cfg: &DestConfig,
    accept: &mut DestAccept,
    local: IpAddr,
) -> Option<Arc<RdmaDevice>> {
    let mut device = None;
    if cfg.encryption.is_on() && !cfg.rdma_cleartext_lanes {
        accept.note = crate::source::connect::RDMA_CLEAR.into();
    } else if cfg.transport != TransportChoice::Tcp {
        match RdmaDevice::open(cfg.rdma.device.as_deref(), local) {
            Ok(d) => {
                accept.transports.push(TransportKind::Rdma);
                device = Some(Arc::new(d));
            }
            Err(e) => accept.note = e.to_string(),
        }
    } else {
        accept.note = "the destination uses TCP only".into();
    }
    if cfg.transport != TransportChoice::Rdma {
        accept.transports.push(TransportKind::Tcp);
    }
    device
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Encryption;
    use crate::control::auth::Key;

    fn accept() -> DestAccept {
        DestAccept {
            versions: (1, 1),
            key: Key::new(b"a test key of 16+ bytes").unwrap(),
            regions: Vec::new(),
            transports: Vec::new(),
            max_lanes: 2,
            note: String::new(),
        }
    }

    #[test]
    fn an_encrypted_destination_offers_rdma_only_when_it_opted_into_cleartext_lanes() {
        let mut cfg = DestConfig::new(Key::new(b"a test key of 16+ bytes").unwrap());
        cfg.encryption = Encryption::Psk;
        let local = IpAddr::from([127, 0, 0, 1]);
        let mut a = accept();
        assert!(offer_transports(&cfg, &mut a, local).is_none());
        assert_eq!(a.transports, vec![TransportKind::Tcp]);
        assert!(a.note.contains("--rdma-cleartext-lanes"), "{}", a.note);
        // Opted in, it looks for a device (127.0.0.1 has none anywhere) like a cleartext one.
        cfg.rdma_cleartext_lanes = true;
        let mut a = accept();
        assert!(offer_transports(&cfg, &mut a, local).is_none());
        assert_eq!(a.transports, vec![TransportKind::Tcp]);
        assert!(a.note.contains("no RDMA device"), "{}", a.note);
        cfg.encryption = Encryption::Off;
        let mut b = accept();
        assert!(offer_transports(&cfg, &mut b, local).is_none());
        assert_eq!(b.note, a.note);
    }
}
