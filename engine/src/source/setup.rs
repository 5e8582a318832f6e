//! The steps of [`SourceSession::setup`](super::SourceSession::setup): the control connection
//! and its handshake, the state the lane workers share, and the RDMA registration (the lanes
//! themselves are opened by the [`LaneSet`](super::lanes::LaneSet)).

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rmig_transport::rdma::{LocalMemory, RdmaDevice};
use rmig_transport::MemoryMap;
use tokio::net::TcpStream;

use super::connect::{self, Offer};
use super::worker::Shared;
use crate::bitmap::AtomicBitmap;
use crate::cancel::CancelToken;
use crate::control::handshake::{self, Agreed, SourceOffer};
use crate::control::link::{ControlLink, ControlStream};
use crate::control::tls::{self, ClientTls, TlsError};
use crate::monitor::Monitor;
use crate::protocol::codec::Limits;
use crate::protocol::{Message, TransportKind};
use crate::region::{self, Region};
use crate::stats::MigrationStatus;
use crate::verify::RegionHashes;
use crate::{EngineError, SourceConfig};

/// The control connection once the handshake is done, and what it settled.
pub(super) struct Handshake {
    pub link: ControlLink,
    /// The destination's address: the lanes connect to it too.
    pub peer: SocketAddr,
    /// Our end of the control connection (it picks the RDMA device and the NIC's node).
    pub local: SocketAddr,
    pub agreed: Agreed,
    /// What this source offered, and why it left RDMA out if it did.
    pub offered: Offer,
}

/// The RDMA device and the source's memory registered on it, when the lanes are RDMA.
pub(super) struct RdmaLanes {
    pub dev: Arc<RdmaDevice>,
    pub mem: Arc<LocalMemory>,
}

/// Records a setup failure in the monitor and hands the error back.
pub(super) fn record_failure(monitor: &Monitor, e: EngineError) -> EngineError {
    monitor.update(|s| {
        s.status = MigrationStatus::of_error(&e);
        s.error = Some(e.to_string());
    });
    e
}

/// Checks the region table and the lane count before anything connects.
pub(super) fn validate(cfg: &SourceConfig, regions: &[Region]) -> Result<(), EngineError> {
    region::validate(regions)?;
    crate::control::auth::check_key(&cfg.key, &cfg.encryption)?;
    if cfg.lanes == 0 || cfg.lanes > u16::MAX as usize {
        return Err(EngineError::Config("lanes must be 1..=65535".into()));
    }
    Ok(())
}

/// Connects to the destination, runs the handshake and starts the control link on `rt`. A
/// cancel that came meanwhile is told to the destination and ends the setup.
pub(super) fn connect_control(
    rt: &tokio::runtime::Runtime,
    cfg: &SourceConfig,
    regions: &[Region],
    cancel: &CancelToken,
) -> Result<Handshake, EngineError> {
    let mut offer = SourceOffer {
        versions: cfg.versions,
        key: cfg.key.clone(),
        regions: regions.iter().map(Region::desc).collect(),
        transports: Vec::new(),
        lanes: cfg.lanes as u16,
        verify: cfg.verify,
    };
    let timeout = cfg.handshake_timeout;
    let dest = cfg.dest.as_str();
    let tls = ClientTls::new(&cfg.encryption, dest)?;
    // RDMA is offered when a device serves the address this connection uses (and the session
    // is not encrypted, RDMA WRITEs cannot be, unless it opted into cleartext RDMA lanes).
    // The device is opened before connecting, for the address the route gives: opening it can
    // take seconds (soft-RoCE in an emulated guest), which must not count against the
    // destination's deadline for our first frame.
    let early = match route_local_ip(dest) {
        Some(ip) => Some((ip, connect::offer(cfg, ip)?)),
        None => None,
    };
    let (stream, peer, local, agreed, offered) = rt.block_on(async {
        let s = tcp_connect(dest, timeout).await?;
        let peer = s.peer_addr()?;
        let local = s.local_addr()?;
        let offered = match early {
            Some((ip, o)) if ip == local.ip() => o,
            _ => connect::offer(cfg, local.ip())?,
        };
        offer.transports = offered.kinds.clone();
        let (mut s, binding) = secure(s, tls.as_deref(), timeout).await?;
        let a = handshake::source_bound(&mut s, &offer, binding, timeout)
            .await
            .map_err(tls::surface)?;
        Ok::<_, EngineError>((s, peer, local, a, offered))
    })?;
    let agreed = Agreed {
        auth: agreed.auth.with_lane_tls(tls),
        ..agreed
    };
    let link = ControlLink::start(rt.handle(), stream, cfg.liveness, Limits::default());
    if cancel.is_cancelled() {
        link.send(Message::Cancel {
            reason: cancel.reason(),
        });
        return Err(EngineError::Cancelled(cancel.reason()));
    }
    Ok(Handshake {
        link,
        peer,
        local,
        agreed,
        offered,
    })
}

/// The address this host would use towards `dest`: connecting a UDP socket only picks the
/// route, it sends nothing. `None` when `dest` is a name (resolving it here would be a wait
/// without a deadline; `tcp_connect` resolves it under one) or has no route.
fn route_local_ip(dest: &str) -> Option<std::net::IpAddr> {
    let addr: std::net::SocketAddr = dest.parse().ok()?;
    let any = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let probe = std::net::UdpSocket::bind(any).ok()?;
    probe.connect(addr).ok()?;
    Some(probe.local_addr().ok()?.ip())
}

/// Connects to `dest` within `timeout`.
async fn tcp_connect(dest: &str, timeout: Duration) -> Result<TcpStream, EngineError> {
    let connect = TcpStream::connect(dest);
    let s = match tokio::time::timeout(timeout, connect).await {
        Err(_) => {
            let what = format!("connecting to {dest} timed out");
            return Err(EngineError::io(ErrorKind::TimedOut, what));
        }
        Ok(r) => r.map_err(|e| EngineError::io(e.kind(), format!("connecting to {dest}: {e}")))?,
    };
    s.set_nodelay(true)?;
    Ok(s)
}

/// Runs the TLS handshake on `s` when the session is encrypted (within `timeout`); returns
/// the connection to speak on and its channel binding.
pub(super) async fn secure(
    s: TcpStream,
    tls: Option<&ClientTls>,
    timeout: Duration,
) -> Result<(ControlStream, Option<[u8; 32]>), EngineError> {
    let Some(tls) = tls else {
        return Ok((Box::new(s), None));
    };
    let (connector, name) = tls.connector();
    let t = match tokio::time::timeout(timeout, connector.connect(name, s)).await {
        Err(_) => {
            let why = format!("no TLS handshake within {} ms", timeout.as_millis());
            return Err(TlsError::Handshake(why).into());
        }
        Ok(r) => r.map_err(|e| tls::explain(&e))?,
    };
    let binding = tls::binding(t.get_ref().1)?;
    Ok((Box::new(t), Some(binding)))
}

/// The round and pending sets, the page hashes (when verifying) and the abort flag, shared by
/// the session and its lane workers.
pub(super) fn shared_state(
    cfg: &SourceConfig,
    regions: &[Region],
    monitor: &Arc<Monitor>,
) -> Arc<Shared> {
    let bitmaps = || -> Vec<AtomicBitmap> {
        regions
            .iter()
            .map(|r| AtomicBitmap::new(r.pages()))
            .collect()
    };
    Arc::new(Shared {
        map: MemoryMap::new(regions.iter().map(|r| r.mem).collect()),
        round: bitmaps(),
        pending: bitmaps(),
        hashes: cfg.verify.is_on().then(|| {
            regions
                .iter()
                .map(|r| RegionHashes::new(r.pages(), r.page_size()))
                .collect()
        }),
        ack_timeout: cfg.liveness.peer_timeout * 2,
        abort: Default::default(),
        monitor: monitor.clone(),
    })
}

/// Why the session runs over TCP although RDMA was wanted (`None` if it was not, or if RDMA
/// was agreed).
pub(super) fn fallback_reason(hs: &Handshake) -> Option<String> {
    match (&hs.offered.fallback, hs.agreed.transport) {
        (Some(f), _) => Some(f.clone()),
        (None, TransportKind::Tcp) if hs.offered.kinds[0] == TransportKind::Rdma => {
            Some(if hs.agreed.note.is_empty() {
                "destination: RDMA not offered".to_string()
            } else {
                format!("destination: {}", hs.agreed.note)
            })
        }
        _ => None,
    }
}

/// Over RDMA, registers the source's memory before the lanes open (pin-all registers all of
/// it, and the time counts in the setup time). `None` over TCP.
pub(super) fn register_rdma(
    cfg: &SourceConfig,
    hs: &Handshake,
    map: &MemoryMap,
) -> Result<Option<RdmaLanes>, EngineError> {
    match (hs.agreed.transport, &hs.offered.device) {
        (TransportKind::Rdma, Some(dev)) => {
            let mem = LocalMemory::register(dev, map, cfg.rdma.registration, false)?;
            Ok(Some(RdmaLanes {
                dev: dev.clone(),
                mem: Arc::new(mem),
            }))
        }
        (TransportKind::Rdma, None) => Err(EngineError::Protocol(
            "destination picked RDMA, which was not offered".into(),
        )),
        _ => Ok(None),
    }
}

impl super::SourceSession {
    /// Publishes the setup's figures (its time, transport, lanes, placement) and marks the
    /// migration active.
    pub(super) fn record_setup(
        &self,
        total: u64,
        fallback: Option<String>,
        rdma: Option<&RdmaLanes>,
    ) {
        let setup_ms = self.started.elapsed().as_secs_f64() * 1e3;
        let lanes = self.lanes.count();
        crate::metrics::setup_done(setup_ms / 1e3, lanes, total);
        self.monitor.update(|s| {
            s.status = MigrationStatus::Active;
            s.setup_time_ms = setup_ms;
            s.transport = self.lanes.transport().name().into();
            s.encryption = self.cfg.encryption.name().into();
            s.data_lanes_encrypted = self.cfg.encryption.is_on() && rdma.is_none();
            s.fallback_reason = fallback;
            if let Some(r) = rdma {
                s.rdma = Some(crate::stats::RdmaReport::of(&r.dev, &r.mem));
            }
            s.lanes = lanes;
            s.ram.total = total;
            s.ram.page_size = self.regions[0].page_size();
            s.numa = Some(self.lanes.placement().report(&[]));
        });
    }
}
