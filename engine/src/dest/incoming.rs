//! Waiting for the source, like a VMM started with `-incoming`.
//!
//! A destination's port is open to anyone: port scanners, health checks, a source with the
//! wrong key or version, a connection that never says a word. Each connection gets its
//! handshake on a task of its own, so none of them can hold up the real source; one that fails
//! is told why (when it got that far), dropped and counted, and the destination goes on waiting
//! until a source completes the handshake, the embedder cancels, or the incoming timeout (if
//! any) passes.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use rmig_transport::rdma::RdmaDevice;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::config::TransportChoice;
use crate::control::handshake::{self, Agreed, DestAccept};
use crate::monitor::Monitor;
use crate::protocol::TransportKind;
use crate::{DestConfig, EngineError};

/// Most handshakes in progress at once; a connection beyond that is dropped at once (and
/// counted), so a flood of idle connections costs a bounded amount of memory.
const MAX_PENDING: usize = 64;

/// A source that passed the handshake.
pub(crate) struct Incoming {
    /// Its control connection.
    pub stream: TcpStream,
    /// What the handshake settled.
    pub agreed: Agreed,
    /// The RDMA device that serves the address the source reached us on, if any.
    pub device: Option<Arc<RdmaDevice>>,
}

/// Connections dropped so far, and why the last one was.
#[derive(Default)]
struct Refusals {
    count: u64,
    last: Option<EngineError>,
}

impl Refusals {
    fn add(&mut self, why: EngineError, monitor: &Monitor) {
        self.count += 1;
        self.last = Some(why);
        let n = self.count;
        monitor.update(|s| s.connections_refused = n);
    }
}

/// Accepts connections until one completes the handshake. Refusals are counted in the
/// monitor's `connections_refused`.
pub(crate) async fn accept_source(
    listener: &TcpListener,
    cfg: &DestConfig,
    accept: &DestAccept,
    monitor: &Monitor,
) -> Result<Incoming, EngineError> {
    let started = tokio::time::Instant::now();
    let deadline = cfg.incoming_timeout.map(|t| started + t);
    let mut pending = JoinSet::new();
    let mut refused = Refusals::default();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) if pending.len() < MAX_PENDING => {
                    pending.spawn(handshake_one(s, cfg.clone(), accept.clone()));
                }
                Ok(_) => refused.add(EngineError::Io("too many handshakes at once".into()), monitor),
                // Out of file descriptors and the like: wait a little rather than spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            },
            Some(done) = pending.join_next() => match done {
                Ok(Ok(incoming)) => return Ok(incoming),
                Ok(Err(e)) => refused.add(e, monitor),
                Err(e) => refused.add(EngineError::Io(format!("handshake task: {e}")), monitor),
            },
            _ = tick.tick() => {
                if monitor.cancel.is_cancelled() {
                    return Err(EngineError::Cancelled(monitor.cancel.reason()));
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

/// Runs the handshake on one connection.
async fn handshake_one(
    mut s: TcpStream,
    cfg: DestConfig,
    mut accept: DestAccept,
) -> Result<Incoming, EngineError> {
    s.set_nodelay(true)?;
    let device = offer_transports(&cfg, &mut accept, s.local_addr()?.ip());
    let agreed = handshake::dest(&mut s, &accept, cfg.handshake_timeout).await?;
    Ok(Incoming {
        stream: s,
        agreed,
        device,
    })
}

/// Fills in the transports this destination can serve for a connection that reached it on
/// `local`: RDMA when a device serves that address (unless TCP only), TCP unless RDMA only.
fn offer_transports(
    cfg: &DestConfig,
    accept: &mut DestAccept,
    local: IpAddr,
) -> Option<Arc<RdmaDevice>> {
    let mut device = None;
    if cfg.transport != TransportChoice::Tcp {
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
