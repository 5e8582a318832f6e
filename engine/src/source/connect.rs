//! Opening a source session: control connection, handshake, and one data lane per worker.

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use rmig_transport::tcp::TcpSourceLane;
use rmig_transport::{FaultPlan, MemoryMap, Pacer, SourceLane};

use crate::control::auth::SessionAuth;
use crate::protocol::{codec, Message};
use crate::EngineError;

/// Connects lane `lane` to `addr` and proves that it belongs to the session.
pub(crate) fn open_tcp_lane(
    addr: SocketAddr,
    auth: &SessionAuth,
    lane: u16,
    map: MemoryMap,
    pacer: Arc<Pacer>,
    fault: FaultPlan,
    timeout: Duration,
) -> Result<Box<dyn SourceLane>, EngineError> {
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
    s.set_read_timeout(None)?;
    let lane = TcpSourceLane::new(s, map, pacer, fault)
        .map_err(|e| EngineError::lane(lane as usize, &e))?;
    Ok(Box::new(lane))
}
