//! Opening a source session's data lanes: each joins the session over TCP and proves that it
//! belongs; an RDMA lane then exchanges queue pair addresses on that same socket.

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use rmig_transport::rdma::{LocalMemory, RdmaDevice, RdmaSourceLane};
use rmig_transport::tcp::TcpSourceLane;
use rmig_transport::{MemoryMap, Pacer, SourceLane};

use crate::config::{RdmaConfig, SourceConfig, TransportChoice};
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

/// Decides what to offer for a control connection from `local`.
pub(crate) fn offer(
    choice: TransportChoice,
    rdma: &RdmaConfig,
    local: IpAddr,
) -> Result<Offer, EngineError> {
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

/// Connects lane `lane` to `addr` and proves that it belongs to the session.
pub(crate) fn join_lane(
    addr: SocketAddr,
    auth: &SessionAuth,
    lane: u16,
    timeout: Duration,
) -> Result<TcpStream, EngineError> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    codec::write_sync(
        &mut s,
        &Message::LaneJoin {
            session: auth.session_id(),
            lane,
            mac: auth.lane_proof(lane),
        },
    )?;
    match codec::read_sync(&mut s)? {
        Message::LaneAccepted => {}
        Message::Error { message } => return Err(EngineError::PeerError(message)),
        m => {
            return Err(EngineError::Protocol(format!(
                "expected LaneAccepted, got {}",
                m.name()
            )))
        }
    }
    Ok(s)
}

/// A TCP lane on a joined socket.
pub(crate) fn tcp_lane(
    s: TcpStream,
    lane: u16,
    map: MemoryMap,
    pacer: Arc<Pacer>,
) -> Result<TcpSourceLane, EngineError> {
    s.set_read_timeout(None)?;
    TcpSourceLane::new(s, map, pacer).map_err(|e| EngineError::lane(lane as usize, e))
}

/// An RDMA lane on a joined socket: the transport exchanges queue pair addresses and the
/// destination's memory keys on it. `wait` bounds the destination's answer (it registers its
/// memory first).
pub(crate) fn rdma_lane(
    s: TcpStream,
    dev: &Arc<RdmaDevice>,
    mem: &Arc<LocalMemory>,
    pacer: Arc<Pacer>,
    wait: Duration,
) -> Result<RdmaSourceLane, EngineError> {
    Ok(rmig_transport::rdma::connect_source_lane(
        s, dev, mem, pacer, wait,
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
