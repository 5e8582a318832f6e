//! The destination side: waits for a source, checks everything it is sent, receives the
//! data on its lanes, verifies, and hands over to its embedder only when all is well.
//!
//! A destination never reports completion unless every round was fenced, every checksum
//! matched (when verifying) and the source said `Complete`. On any error it tells the source
//! why, closes everything and returns the error; the guest is not resumed.

mod lanes;
mod sink;

use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::select;
use rmig_transport::tcp::{DestLaneSummary, TcpDestLane};
use rmig_transport::LaneError;
use tokio::net::TcpListener;

use crate::config::{RdmaConfig, TransportChoice};
use crate::control::handshake::{self, DestAccept};
use crate::control::link::ControlLink;
use crate::embedder::DestEmbedder;
use crate::monitor::Monitor;
use crate::protocol::{Message, TransportKind};
use crate::region::{self, Region};
use crate::stats::MigrationStats;
use crate::verify::{self, RegionHashes};
use crate::{DestConfig, EngineError};
use rmig_transport::rdma::{DestPrepared, LocalMemory, RdmaDestLane, RdmaDevice};
use rmig_transport::{DestLane, MemoryMap};
use sink::DestSink;

/// Most device state a destination accepts.
const MAX_DEVICE_STATE: usize = 1 << 30;

/// A destination waiting for its source, like a VMM started with `-incoming`.
pub struct DestListener {
    listener: Arc<TcpListener>,
    cfg: DestConfig,
    // Dropped last: the listener needs the runtime.
    rt: tokio::runtime::Runtime,
}

/// What a completed incoming migration hands back.
#[derive(Debug, Clone)]
pub struct DestOutcome {
    /// Statistics of the destination's side.
    pub stats: MigrationStats,
    /// Per-lane figures.
    pub lanes: Vec<DestLaneSummary>,
}

impl DestListener {
    /// Listens on `addr` (`host:port`; port 0 picks one).
    pub fn bind(addr: &str, cfg: DestConfig) -> Result<DestListener, EngineError> {
        let rt = crate::control::runtime()?;
        let listener = rt
            .block_on(TcpListener::bind(addr))
            .map_err(|e| EngineError::Io(format!("cannot listen on {addr}: {e}")))?;
        Ok(DestListener {
            listener: Arc::new(listener),
            cfg,
            rt,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> Result<SocketAddr, EngineError> {
        Ok(self.listener.local_addr()?)
    }

    /// Waits for one source and receives its migration into `regions`.
    pub fn serve(
        self,
        regions: Vec<Region>,
        mut embedder: Box<dyn DestEmbedder>,
        monitor: Arc<Monitor>,
    ) -> Result<DestOutcome, EngineError> {
        let started = Instant::now();
        let r = self.serve_inner(&regions, embedder.as_mut(), &monitor, started);
        let total = started.elapsed().as_secs_f64() * 1e3;
        match r {
            Ok(lanes) => {
                monitor.update(|s| {
                    s.status = "completed".into();
                    s.total_time_ms = total;
                });
                Ok(DestOutcome {
                    stats: monitor.stats(),
                    lanes,
                })
            }
            Err(e) => {
                let status = if e.is_cancel() { "cancelled" } else { "failed" };
                monitor.update(|s| {
                    s.status = status.into();
                    s.error = Some(e.to_string());
                    s.total_time_ms = total;
                });
                Err(e)
            }
        }
    }

    fn serve_inner(
        &self,
        regions: &[Region],
        embedder: &mut dyn DestEmbedder,
        monitor: &Arc<Monitor>,
        started: Instant,
    ) -> Result<Vec<DestLaneSummary>, EngineError> {
        region::validate(regions)?;
        let cfg = &self.cfg;
        let mut accept = DestAccept {
            versions: cfg.versions,
            key: cfg.key.clone(),
            regions: regions.iter().map(Region::desc).collect(),
            transports: Vec::new(),
            max_lanes: cfg.max_lanes,
            note: String::new(),
        };
        let cancel = monitor.cancel.clone();
        let mut device = None;
        let (stream, agreed) = self.rt.block_on(async {
            // Wait for a source, but keep an eye on cancellation.
            let mut s = loop {
                tokio::select! {
                    r = self.listener.accept() => break r?.0,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {
                        if cancel.is_cancelled() {
                            return Err(EngineError::Cancelled(cancel.reason()));
                        }
                    }
                }
            };
            s.set_nodelay(true)?;
            // RDMA is possible when a device serves the address the source reached us on.
            if cfg.transport != TransportChoice::Tcp {
                match RdmaDevice::open(cfg.rdma.device.as_deref(), s.local_addr()?.ip()) {
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
            let a = handshake::dest(&mut s, &accept, cfg.handshake_timeout).await?;
            Ok((s, a))
        })?;
        let t_handshake = Instant::now();
        let mut link = ControlLink::start(self.rt.handle(), stream, cfg.liveness);
        let joined = self.rt.block_on(lanes::join(
            &self.listener,
            &agreed.auth,
            agreed.lanes,
            cfg.handshake_timeout,
        ));
        let sockets = match joined {
            Ok(s) => s,
            Err(e) => {
                link.send(Message::Error {
                    message: e.to_string(),
                });
                return Err(e);
            }
        };
        let sink = Arc::new(DestSink::new(
            regions,
            agreed.verify,
            cfg.fault.die_after_bytes,
        ));
        // RDMA: register guest memory (pin-all: all of it, now) and connect each lane's queue
        // pair over its socket.
        let rdma = match (agreed.transport, &device) {
            (TransportKind::Rdma, Some(dev)) => {
                match rdma_setup(dev, sink.map(), &cfg.rdma, &sockets, cfg.handshake_timeout) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        link.send(Message::Error {
                            message: e.to_string(),
                        });
                        return Err(e);
                    }
                }
            }
            _ => None,
        };
        monitor.update(|s| {
            s.status = "active".into();
            if let (Some((mem, _)), Some(dev)) = (&rdma, &device) {
                s.rdma = Some(crate::stats::RdmaReport::of(dev, mem));
            }
            s.transport = agreed.transport.name().into();
            s.lanes = sockets.len();
            s.setup_time_ms = (t_handshake - started).as_secs_f64() * 1e3;
            s.ram.total = regions.iter().map(Region::len).sum();
        });
        // Over RDMA the source may replace failed lanes with TCP ones: admit them while running.
        let (more_tx, more_rx) = crossbeam_channel::unbounded();
        let may_fall_back =
            agreed.transport == TransportKind::Rdma && cfg.transport == TransportChoice::Auto;
        let admit = may_fall_back.then(|| {
            self.rt.spawn(lanes::fallback(
                self.listener.clone(),
                agreed.auth.clone(),
                agreed.lanes,
                more_tx,
            ))
        });
        let (res_tx, res_rx) = crossbeam_channel::unbounded();
        let mut session = Receiving {
            sink: sink.clone(),
            monitor,
            link: &mut link,
            verify: agreed.verify,
            lanes: LaneThreads {
                pool: rmig_numa::WorkerPool::flat(),
                sink: sink.clone(),
                results: res_tx,
                joins: Vec::new(),
                shutdowns: Vec::new(),
            },
            more: more_rx,
        };
        let mut rdma_lanes = rdma.map(|(_, l)| l.into_iter());
        for (i, s) in sockets.into_iter().enumerate() {
            let lane: Box<dyn DestLane> = match rdma_lanes.as_mut().and_then(Iterator::next) {
                Some(l) => Box::new(l),
                None => Box::new(
                    TcpDestLane::new(s, sink.map().clone())
                        .map_err(|e| EngineError::lane(i, &e))?,
                ),
            };
            session.lanes.start(i, lane)?;
        }
        let r = session.run(&res_rx, embedder);
        if let Some(a) = admit {
            a.abort();
        }
        let Receiving {
            lanes:
                LaneThreads {
                    joins,
                    shutdowns,
                    results,
                    ..
                },
            ..
        } = session;
        drop(results);
        let mut summaries = Vec::new();
        let mut put = |i: usize, res: Result<DestLaneSummary, LaneError>| {
            if i >= summaries.len() {
                summaries.resize(i + 1, DestLaneSummary::default());
            }
            if let Ok(s) = res {
                summaries[i] = s;
            }
        };
        if r.is_ok() {
            // The source closes its lanes once it has our `Done`: collect their figures.
            let deadline = Instant::now() + Duration::from_secs(2);
            while let Ok((i, res)) = res_rx.recv_deadline(deadline) {
                put(i, res);
            }
        }
        // No lane carries anything more now: stop whatever is still open.
        for s in &shutdowns {
            let _ = s.shutdown(Shutdown::Both);
        }
        for j in joins {
            let _ = j.join();
        }
        while let Ok((i, res)) = res_rx.try_recv() {
            put(i, res);
        }
        match r {
            Ok(()) => {
                link.close(Duration::from_secs(1));
                Ok(summaries)
            }
            Err((e, tell_peer)) => {
                if tell_peer {
                    link.send(Message::Error {
                        message: e.to_string(),
                    });
                    link.close(Duration::from_millis(500));
                }
                Err(e)
            }
        }
    }
}

/// The threads that run a session's destination lanes.
struct LaneThreads {
    pool: rmig_numa::WorkerPool,
    sink: Arc<DestSink>,
    results: crossbeam_channel::Sender<LaneResult>,
    joins: Vec<std::thread::JoinHandle<()>>,
    /// Handles that end each lane's `run` (its socket, shut down).
    shutdowns: Vec<TcpStream>,
}

impl LaneThreads {
    /// Runs lane `i` on a thread of its own; its result goes to `results`.
    fn start(&mut self, i: usize, mut lane: Box<dyn DestLane>) -> Result<(), EngineError> {
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
}

/// The receiving phase of a session.
struct Receiving<'a> {
    sink: Arc<DestSink>,
    monitor: &'a Arc<Monitor>,
    link: &'a mut ControlLink,
    verify: bool,
    lanes: LaneThreads,
    /// TCP lanes that replace failed RDMA lanes (lane number, socket).
    more: crossbeam_channel::Receiver<(u16, TcpStream)>,
}

type LaneResult = (usize, Result<DestLaneSummary, LaneError>);

impl Receiving<'_> {
    /// Serves control messages until `Complete`. An error comes with whether the peer still
    /// needs to be told.
    fn run(
        &mut self,
        lanes: &crossbeam_channel::Receiver<LaneResult>,
        embedder: &mut dyn DestEmbedder,
    ) -> Result<(), (EngineError, bool)> {
        let proto = |s: String| (EngineError::Protocol(s), true);
        let mut device = Vec::new();
        let mut device_done = false;
        let mut verified: Option<bool> = None;
        let mut round: Option<u32> = None;
        let never = crossbeam_channel::never();
        let mut lanes = lanes;
        loop {
            if self.sink.crashed.load(Ordering::Acquire) {
                // Injected crash: the control connection drops without a word too.
                self.link.close(Duration::ZERO);
                return Err((EngineError::Io("injected crash".into()), false));
            }
            select! {
                recv(lanes) -> r => {
                    let Ok((i, r)) = r else {
                        // Every lane has ended: wait for the control connection alone.
                        lanes = &never;
                        continue;
                    };
                    match r {
                        Ok(_) => {}
                        Err(LaneError::Malformed(m)) => {
                            return Err(proto(format!("lane {i}: {m}")));
                        }
                        Err(_) => {
                            // The source lost this lane; it re-sends its pages elsewhere.
                            self.monitor.update(|s| s.lanes_failed += 1);
                        }
                    }
                }
                recv(self.more) -> m => {
                    let Ok((lane, sock)) = m else {
                        // No fallback lanes in this session (or no more): stop looking.
                        self.more = crossbeam_channel::never();
                        continue;
                    };
                    let start = TcpDestLane::new(sock, self.sink.map().clone())
                        .map_err(|e| EngineError::lane(lane as usize, &e))
                        .and_then(|l| self.lanes.start(lane as usize, Box::new(l)));
                    start.map_err(|e| (e, true))?;
                    self.monitor.update(|s| {
                        s.transport = "tcp".into();
                        s.fallback_reason = Some("the source replaced its failed RDMA lanes with TCP lanes".into());
                        s.lanes += 1;
                    });
                }
                recv(self.link.inbox()) -> m => {
                    let m = m
                        .map_err(|_| EngineError::PeerClosed)
                        .and_then(ControlLink::screen)
                        .map_err(|e| (e, false))?;
                    match m {
                        Message::RoundStart { round: r, .. } => {
                            if round.is_some() || device_done {
                                return Err(proto(format!("RoundStart {r} out of order")));
                            }
                            round = Some(r);
                            self.monitor.round.store(r, Ordering::Relaxed);
                        }
                        Message::RoundEnd { round: r } => {
                            if round != Some(r) {
                                return Err(proto(format!("RoundEnd {r} without its RoundStart")));
                            }
                            round = None;
                            self.link.send(Message::RoundEndAck { round: r });
                            let landed = self.sink.landed.load(Ordering::Relaxed);
                            self.monitor.update(|s| {
                                s.ram.dirty_sync_count += 1;
                                s.ram.normal_bytes = landed;
                            });
                        }
                        Message::DeviceState { data, last } => {
                            if round.is_some() || device_done {
                                return Err(proto("DeviceState out of order".into()));
                            }
                            if device.len() + data.len() > MAX_DEVICE_STATE {
                                return Err(proto("device state too large".into()));
                            }
                            device.extend_from_slice(&data);
                            device_done = last;
                        }
                        Message::Checksums { regions } => {
                            if !self.verify || !device_done || verified.is_some() {
                                return Err(proto("Checksums out of order".into()));
                            }
                            let ours: Vec<Vec<u64>> = self
                                .sink
                                .hashes
                                .as_ref()
                                .expect("verify on")
                                .iter()
                                .map(RegionHashes::chunk_digests)
                                .collect();
                            let mism = verify::mismatches(&ours, &regions, 16);
                            let ok = mism.is_empty();
                            verified = Some(ok);
                            self.monitor.update(|s| s.verified = Some(ok));
                            self.link.send(Message::Verified { ok, mismatches: mism.clone() });
                        }
                        Message::Complete => {
                            if !device_done || round.is_some() || (self.verify && verified != Some(true)) {
                                return Err(proto("Complete before the migration was verified".into()));
                            }
                            embedder
                                .load_device_state(std::mem::take(&mut device))
                                .map_err(|e| (EngineError::Embedder(e), true))?;
                            embedder.resume().map_err(|e| (EngineError::Embedder(e), true))?;
                            self.link.send(Message::Done);
                            return Ok(());
                        }
                        m => return Err(proto(format!("unexpected {}", m.name()))),
                    }
                }
                default(Duration::from_millis(20)) => {
                    if self.monitor.cancel.is_cancelled() {
                        let reason = self.monitor.cancel.reason();
                        self.link.send(Message::Cancel { reason: reason.clone() });
                        return Err((EngineError::Cancelled(reason), false));
                    }
                }
            }
        }
    }
}

/// Registers the destination's memory and connects one queue pair per lane socket: reads the
/// source's `RdmaConnect`, answers `RdmaAccept` with our queue pair and memory keys.
fn rdma_setup(
    dev: &Arc<RdmaDevice>,
    map: &MemoryMap,
    cfg: &RdmaConfig,
    sockets: &[TcpStream],
    timeout: Duration,
) -> Result<(Arc<LocalMemory>, Vec<RdmaDestLane>), EngineError> {
    let mem = Arc::new(LocalMemory::register(dev, map, cfg.registration, true)?);
    let memory = mem.remote();
    let mut lanes = Vec::new();
    for s in sockets {
        let mut s = s.try_clone()?;
        s.set_read_timeout(Some(timeout))?;
        let peer = match crate::protocol::codec::read_sync(&mut s)? {
            Message::RdmaConnect { endpoint } => endpoint,
            m => {
                return Err(EngineError::Protocol(format!(
                    "expected RdmaConnect, got {}",
                    m.name()
                )))
            }
        };
        s.set_read_timeout(None)?;
        let prep = DestPrepared::new(dev.clone(), mem.clone())?;
        let endpoint = prep.endpoint();
        let lane = prep.connect(&peer, s.try_clone()?)?;
        crate::protocol::codec::write_sync(
            &mut s,
            &Message::RdmaAccept {
                endpoint,
                memory: memory.clone(),
            },
        )?;
        lanes.push(lane);
    }
    Ok((mem, lanes))
}
