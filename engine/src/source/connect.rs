//! Opening a source session's data lanes: each joins the session over TCP and proves that it
//! belongs; an RDMA lane then exchanges queue pair addresses and memory keys on that same
//! socket, inside its TLS session when the session is encrypted (only an encrypted session that
//! opted into cleartext RDMA lanes gets here: its pages cross in clear, its keys do not).

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use rmig_transport::rdma::{LocalMemory, RdmaDevice, RdmaSourceLane};
use rmig_transport::tcp::fetch::FetchConn;
use rmig_transport::tcp::TcpSourceLane;
use rmig_transport::{MemoryMap, Pacer, SourceLane};

use crate::config::{SourceConfig, TransportChoice};
use crate::control::auth::SessionAuth;
use crate::protocol::{codec, Message, TransportKind};
use crate::EngineError;

/// The transports a source offers, best first, the device that makes RDMA possible, and why
/// RDMA is not offered when `auto` leaves it out.
pub(crate) struct Offer {
    pub kinds: Vec<TransportKind>,
    pub device: Option<Arc<RdmaDevice>>,
    pub fallback: Option<String>,
}

/// Why an encrypted session does not use RDMA unless both ends opted in (the destination
/// says the same in its note).
pub(crate) const RDMA_CLEAR: &str =
    "encryption is on and RDMA lanes cannot be encrypted (one-sided \
     WRITEs); to move pages over RDMA in clear (the control connection and the lanes' key \
     exchange stay TLS) set --rdma-cleartext-lanes (rdma_cleartext_lanes) on both ends, or \
     use --encryption off";

/// Decides what to offer for a control connection from `local`. An encrypted session offers
/// TCP only unless it opted into cleartext RDMA lanes: with `auto` the fallback reason says
/// why, with `rdma` it is an error.
pub(crate) fn offer(cfg: &SourceConfig, local: IpAddr) -> Result<Offer, EngineError> {
    let (choice, rdma) = (cfg.transport, &cfg.rdma);
    if cfg.encryption.is_on() && !cfg.rdma_cleartext_lanes && choice != TransportChoice::Tcp {
        if choice == TransportChoice::Rdma {
            return Err(EngineError::Config(RDMA_CLEAR.into()));
        }
        return Ok(Offer {
            kinds: vec![TransportKind::Tcp],
            device: None,
            fallback: Some(format!("source: {RDMA_CLEAR}")),
        });
    }
    if choice == TransportChoice::Tcp {
        return Ok(Offer {
            kinds: vec![TransportKind::Tcp],
            device: None,
            fallback: None,
        });
    }
    match RdmaDevice::open(rdma.device.as_deref(), local) {
        Ok(d) => Ok(Offer {
            kinds: if choice == TransportChoice::Rdma {
                vec![TransportKind::Rdma]
            } else {
                vec![TransportKind::Rdma, TransportKind::Tcp]
            },
            device: Some(Arc::new(d)),
            fallback: None,
        }),
        Err(e) if choice == TransportChoice::Auto => Ok(Offer {
            kinds: vec![TransportKind::Tcp],
            device: None,
            fallback: Some(format!("source: {e}")),
        }),
        Err(e) => Err(e.into()),
    }
}

/// A lane socket that joined its session, with its TLS session when it is encrypted. It
/// dereferences to the socket.
pub(crate) struct JoinedLane {
    sock: TcpStream,
    tls: Option<rustls::ClientConnection>,
}

impl std::ops::Deref for JoinedLane {
    type Target = TcpStream;

    fn deref(&self) -> &TcpStream {
        &self.sock
    }
}

/// Connects lane `lane` to `addr` and proves that it belongs to the session (inside a TLS
/// session bound into the proof when the session is encrypted).
pub(crate) fn join_lane(
    addr: SocketAddr,
    auth: &SessionAuth,
    lane: u16,
    timeout: Duration,
) -> Result<JoinedLane, EngineError> {
    let s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    match auth.lane_tls() {
        None => {
            let mut s = s;
            claim_lane(&mut s, auth, lane, None)?;
            s.set_write_timeout(None)?;
            Ok(JoinedLane { sock: s, tls: None })
        }
        Some(tls) => {
            let mut t = rustls::StreamOwned::new(tls.session()?, s);
            while t.conn.is_handshaking() {
                t.conn
                    .complete_io(&mut t.sock)
                    .map_err(|e| crate::control::tls::explain(&e))?;
            }
            let binding = crate::control::tls::binding(&t.conn)?;
            claim_lane(&mut t, auth, lane, Some(&binding)).map_err(crate::control::tls::surface)?;
            let (conn, sock) = t.into_parts();
            sock.set_write_timeout(None)?;
            Ok(JoinedLane {
                sock,
                tls: Some(conn),
            })
        }
    }
}

/// Sends lane `lane`'s claim on `s` and reads the destination's answer.
fn claim_lane(
    s: &mut (impl std::io::Read + std::io::Write),
    auth: &SessionAuth,
    lane: u16,
    binding: Option<&[u8; 32]>,
) -> Result<(), EngineError> {
    codec::write_sync(
        s,
        &Message::LaneJoin {
            session: auth.session_id(),
            lane,
            mac: auth.bound_lane_proof(lane, binding),
        },
    )?;
    match codec::read_sync(s)? {
        Message::LaneAccepted => {}
        Message::Error { message } => return Err(EngineError::PeerError(message)),
        m => {
            return Err(EngineError::Protocol(format!(
                "expected LaneAccepted, got {}",
                m.name()
            )))
        }
    }
    Ok(())
}

/// The post-copy fetch lane on a joined socket (inside its TLS session when encrypted).
pub(crate) fn fetch_conn(s: JoinedLane) -> Result<FetchConn, EngineError> {
    s.sock.set_read_timeout(None)?;
    // One small answer per request: Nagle would hold each for the peer's delayed ack.
    s.sock.set_nodelay(true)?;
    Ok(match s.tls {
        None => FetchConn::plain(s.sock),
        Some(conn) => FetchConn::tls_client(conn, s.sock),
    })
}

/// A TCP lane on a joined socket.
pub(crate) fn tcp_lane(
    s: JoinedLane,
    lane: u16,
    map: MemoryMap,
    pacer: Arc<Pacer>,
) -> Result<TcpSourceLane, EngineError> {
    s.sock.set_read_timeout(None)?;
    match s.tls {
        None => TcpSourceLane::new(s.sock, map, pacer),
        Some(conn) => TcpSourceLane::new_tls(s.sock, conn, map, pacer),
    }
    .map_err(|e| EngineError::lane(lane as usize, e))
}

/// An RDMA lane on a joined socket: the transport exchanges queue pair addresses and the
/// destination's memory keys on it, inside the lane's TLS session when it has one (only the
/// pages then cross in clear, on the queue pair). `wait` bounds the destination's answer (it
/// registers its memory first).
pub(crate) fn rdma_lane(
    s: JoinedLane,
    dev: &Arc<RdmaDevice>,
    mem: &Arc<LocalMemory>,
    pacer: Arc<Pacer>,
    wait: Duration,
) -> Result<RdmaSourceLane, EngineError> {
    Ok(rmig_transport::rdma::connect_source_lane(
        s.sock, s.tls, dev, mem, pacer, wait,
    )?)
}

/// Post-copy over RDMA: answers the destination's reader on the fetch lane `s` (inside its
/// TLS session when it has one: the answer carries this end's memory keys), within `wait`.
pub(crate) fn serve_reader(
    s: &mut JoinedLane,
    mem: &Arc<rmig_transport::rdma::ExposedMemory>,
    wait: Duration,
) -> Result<rmig_transport::rdma::ReadExposure, EngineError> {
    Ok(rmig_transport::rdma::serve_reader(
        &s.sock,
        s.tls.as_mut(),
        mem,
        wait,
    )?)
}

/// Lane `idx` of a session configured by `cfg`, wrapped in the faults the configuration
/// plans for it (tests).
#[cfg(feature = "fault-injection")]
pub(crate) fn with_faults<L>(lane: L, cfg: &SourceConfig, idx: usize) -> Box<dyn SourceLane>
where
    L: rmig_transport::Breakable + 'static,
{
    match cfg.lane_faults.get(idx) {
        Some(&plan) => Box::new(rmig_transport::FaultyLane::new(lane, plan)),
        None => Box::new(lane),
    }
}

/// Lane `idx` of a session configured by `cfg` (a build without fault injection: as it is).
#[cfg(not(feature = "fault-injection"))]
pub(crate) fn with_faults<L>(lane: L, _cfg: &SourceConfig, _idx: usize) -> Box<dyn SourceLane>
where
    L: SourceLane + 'static,
{
    Box::new(lane)
}
