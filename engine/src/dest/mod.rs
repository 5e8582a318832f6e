//! The destination side: waits for a source, checks everything it is sent, receives the
//! data on its lanes, verifies, and hands over to its embedder only when all is well.
//!
//! A destination never reports completion unless every round was fenced, every checksum
//! matched (when verifying) and the source said `Complete`. On any error it tells the source
//! why, closes everything and returns the error; the guest is not resumed.

mod faults;
mod incoming;
mod landing;
mod lanes;
mod phase;
mod placer;
mod postcopy;
mod pull;
mod sink;
mod switch;
#[cfg(test)]
mod testmem;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rmig_transport::tcp::DestLaneSummary;
use tokio::net::TcpListener;

use crate::config::{RdmaConfig, TransportChoice};
use crate::control::handshake::{Agreed, DestAccept};
use crate::control::link::ControlLink;
use crate::embedder::DestEmbedder;
use crate::monitor::Monitor;
use crate::protocol::codec::Limits;
use crate::protocol::{Message, TransportKind};
use crate::region::{self, Region};
use crate::stats::{MigrationStats, MigrationStatus};
use crate::verify::CHUNK_PAGES;
use crate::{DestConfig, EngineError};
use incoming::{Door, Incoming};
use lanes::{LaneResult, LaneSocket, LaneThreads};
use phase::{Failure, Receiving};
use rmig_transport::rdma::{LocalMemory, RdmaDestLane, RdmaDevice};
use rmig_transport::{DestLane, MemoryMap};
use sink::DestSink;

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

/// A source that passed the handshake: the door it came through (with the lane claims that
/// came before it) and its running control link.
struct Accepted {
    door: Door,
    early: Vec<incoming::LaneClaim>,
    link: ControlLink,
    agreed: Agreed,
    device: Option<Arc<RdmaDevice>>,
    /// When the handshake ended (the setup time counts from here).
    connected: Instant,
    /// Frame limits of the control connection.
    limits: Limits,
}

/// The door's task during the session, and what it hands on.
struct Admission {
    /// Lanes admitted while running (lane number, socket).
    more: crossbeam_channel::Receiver<(u16, lanes::LaneSocket)>,
    /// The task: admits fallback and rejoining lanes, refuses everything else.
    admit: tokio::task::JoinHandle<()>,
    /// Lane numbers that may join while running.
    slots: lanes::Slots,
    /// Proven reconnects of the session's source.
    rejoins: crossbeam_channel::Receiver<lanes::Rejoin>,
}

/// A session's lanes once set up: the threads that run them, their results, the sink they
/// write to, and the door's task for the rest of the session.
struct Opened {
    lanes: LaneThreads,
    results: crossbeam_channel::Receiver<LaneResult>,
    sink: Arc<DestSink>,
    admission: Admission,
}

impl DestListener {
    /// Listens on `addr` (`host:port`; port 0 picks one).
    pub fn bind(addr: &str, cfg: DestConfig) -> Result<DestListener, EngineError> {
        crate::control::auth::check_key(&cfg.key, &cfg.encryption)?;
        let rt = crate::control::runtime()?;
        let listener = rt
            .block_on(TcpListener::bind(addr))
            .map_err(|e| EngineError::io(e.kind(), format!("cannot listen on {addr}: {e}")))?;
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

    /// Waits for one source and receives its migration into `regions`. Connections that fail
    /// the handshake are dropped and counted; the wait ends with a source, a cancel, or the
    /// configured incoming timeout.
    ///
    /// The listener stays bound afterwards: call `serve` again for the next source, which
    /// may already have connected (the kernel holds it in the listen backlog meanwhile), like
    /// `iperf3 -s`.
    pub fn serve(
        &self,
        regions: Vec<Region>,
        mut embedder: Box<dyn DestEmbedder>,
        monitor: Arc<Monitor>,
    ) -> Result<DestOutcome, EngineError> {
        let started = Instant::now();
        let r = self.serve_inner(&regions, embedder.as_mut(), &monitor);
        let total = started.elapsed().as_secs_f64() * 1e3;
        match r {
            Ok(lanes) => {
                monitor.update(|s| {
                    s.status = MigrationStatus::Completed;
                    s.total_time_ms = total;
                });
                Ok(DestOutcome {
                    stats: monitor.stats(),
                    lanes,
                })
            }
            Err(e) => {
                // The pause so far, if the guest was paused here (the stop-and-copy began);
                // after post-copy's resume it was recorded then.
                let resumed = monitor.stats().postcopy.is_some();
                let paused = paused_since_device(&monitor).filter(|_| !resumed);
                monitor.update(|s| {
                    s.status = MigrationStatus::of_error(&e);
                    s.error = Some(e.to_string());
                    s.total_time_ms = total;
                    if let Some(d) = paused {
                        s.downtime_ms = d.as_secs_f64() * 1e3;
                    }
                });
                Err(e)
            }
        }
    }

    /// The session from the source's handshake to its end: the lanes join and open, the
    /// phases run, the lanes are collected and the control connection closed.
    fn serve_inner(
        &self,
        regions: &[Region],
        embedder: &mut dyn DestEmbedder,
        monitor: &Arc<Monitor>,
    ) -> Result<Vec<DestLaneSummary>, EngineError> {
        region::validate(regions)?;
        let Accepted {
            mut door,
            early,
            mut link,
            agreed,
            device,
            connected,
            limits,
        } = self.accept(regions, monitor)?;
        let mut kept = Vec::new();
        let joined = self.rt.block_on(lanes::join(
            &mut door,
            early,
            &agreed.auth,
            agreed.lanes,
            self.cfg.handshake_timeout,
            (link.inbox(), &mut kept),
        ));
        // Over RDMA, post-copy's missing pages are read with one-sided READs on this device.
        let postcopy_dev = device
            .clone()
            .filter(|_| agreed.transport == TransportKind::Rdma);
        let opened = joined.and_then(|sockets| {
            self.open_lanes(regions, &agreed, sockets, door, device, monitor, connected)
        });
        let opened = match opened {
            Ok(o) => o,
            Err(e) => {
                link.send(Message::Error {
                    message: e.to_string(),
                });
                return Err(e);
            }
        };
        let Opened {
            lanes,
            results,
            sink,
            admission:
                Admission {
                    more,
                    admit,
                    slots,
                    rejoins,
                },
        } = opened;
        let live = self.rt.spawn(live_bytes(sink.clone(), monitor.clone()));
        let mut session = Receiving {
            sink,
            monitor,
            link: &mut link,
            verify: agreed.verify,
            baseline: false,
            max_device_state: self.cfg.max_device_state,
            lanes,
            more,
            reconnect: self.reconnect(&agreed, slots, rejoins, limits),
            postcopy: postcopy::DestPostcopy::new(postcopy_dev, self.cfg.handshake_timeout),
        };
        let r = session.run(&results, kept, embedder);
        live.abort();
        // The session's door closes first: a next source that connects once this one has
        // its figures waits in the listener's backlog for the next `serve`, unrefused.
        admit.abort();
        if r.is_ok() {
            // `Done` is sent: the guest runs here. Then (not before) the figures go both ways.
            let figures = resumed(monitor, &session.sink, connected);
            let peer = session.link.exchange_figures(figures, FIGURES_WAIT);
            monitor.update(|s| s.peer = peer);
        }
        let summaries = collect_lanes(session.lanes, &results, r.is_ok());
        self.finish(&mut link, r).map(|()| summaries)
    }

    /// Waits for a source to pass the handshake (keeping the lane claims that came before
    /// it) and starts its control link.
    fn accept(&self, regions: &[Region], monitor: &Arc<Monitor>) -> Result<Accepted, EngineError> {
        let accept = DestAccept {
            versions: self.cfg.versions,
            key: self.cfg.key.clone(),
            regions: regions.iter().map(Region::desc).collect(),
            transports: Vec::new(),
            max_lanes: self.cfg.max_lanes,
            note: String::new(),
        };
        let mut door = Door::new(
            self.listener.clone(),
            self.cfg.clone(),
            accept,
            monitor.clone(),
        )?;
        let mut early = Vec::new();
        let incoming = self
            .rt
            .block_on(incoming::accept_source(&mut door, &mut early))?;
        let connected = Instant::now();
        let limits = Limits::for_chunks(regions.iter().map(|r| r.pages().div_ceil(CHUNK_PAGES)));
        let Incoming {
            stream,
            agreed,
            device,
        } = incoming;
        let link = ControlLink::start(self.rt.handle(), stream, self.cfg.liveness, limits);
        Ok(Accepted {
            door,
            early,
            link,
            agreed,
            device,
            connected,
            limits,
        })
    }

    /// What the session needs to take its source back after a broken control connection:
    /// the door's proven reconnects, the lane slots to reopen, the new link's settings.
    fn reconnect(
        &self,
        agreed: &Agreed,
        slots: lanes::Slots,
        rejoins: crossbeam_channel::Receiver<lanes::Rejoin>,
        limits: Limits,
    ) -> phase::Reconnect {
        // Reconnecting is for TCP lanes: RDMA queue pairs cannot be set up again mid-session.
        let window = match agreed.transport {
            TransportKind::Tcp => self.cfg.reconnect_window,
            TransportKind::Rdma => Duration::ZERO,
        };
        phase::Reconnect {
            window,
            rejoins,
            slots,
            lanes: agreed.lanes,
            auth: agreed.auth.clone(),
            last_attempt: None,
            rt: self.rt.handle().clone(),
            liveness: self.cfg.liveness,
            limits,
        }
    }

    /// Closes the control connection after the session: politely after success, with the
    /// reason when the peer still needs to hear it.
    fn finish(&self, link: &mut ControlLink, r: Result<(), Failure>) -> Result<(), EngineError> {
        match r {
            Ok(()) => {
                link.close(Duration::from_secs(1));
                Ok(())
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

    /// Sets up RDMA on the joined lane sockets if agreed, starts the lanes' threads, and
    /// hands the door to a task that admits fallback lanes and refuses everything else.
    #[allow(clippy::too_many_arguments)]
    fn open_lanes(
        &self,
        regions: &[Region],
        agreed: &Agreed,
        mut sockets: Vec<LaneSocket>,
        door: Door,
        device: Option<Arc<RdmaDevice>>,
        monitor: &Arc<Monitor>,
        connected: Instant,
    ) -> Result<Opened, EngineError> {
        let cfg = &self.cfg;
        let sink = Arc::new(DestSink::new(
            regions,
            agreed.verify.is_on(),
            sink::Crash::planned(cfg),
        ));
        // RDMA: register guest memory (pin-all: all of it, now) and connect each lane's queue
        // pair over its socket.
        let rdma = match (agreed.transport, &device) {
            (TransportKind::Rdma, Some(dev)) => Some(rdma_setup(
                dev,
                sink.map(),
                &cfg.rdma,
                &mut sockets,
                cfg.handshake_timeout,
            )?),
            _ => None,
        };
        if agreed.transport == TransportKind::Tcp {
            sink.start_landing(cfg.land_with_userfaultfd);
        }
        let landing = sink.landing_report();
        monitor.update(|s| {
            s.status = MigrationStatus::Active;
            s.landing = landing;
            if let (Some((mem, _)), Some(dev)) = (&rdma, &device) {
                s.rdma = Some(crate::stats::RdmaReport::of(dev, mem));
            }
            s.transport = agreed.transport.name().into();
            s.encryption = self.cfg.encryption.name().into();
            s.data_lanes_encrypted = self.cfg.encryption.is_on() && rdma.is_none();
            s.lanes = sockets.len();
            s.setup_time_ms = connected.elapsed().as_secs_f64() * 1e3;
            s.ram.total = regions.iter().map(Region::len).sum();
        });
        let admission = self.admit_in_session(door, agreed);
        let rdma_lanes = rdma.map(|(_, l)| l);
        let (lanes, results) = start_lanes(&sink, sockets, rdma_lanes)?;
        Ok(Opened {
            lanes,
            results,
            sink,
            admission,
        })
    }

    /// Hands the door to a task for the rest of the session. Over RDMA the source may replace
    /// failed lanes with TCP ones, and after a reconnect its lanes join again: the task admits
    /// them while running. Whatever else knocks is refused.
    fn admit_in_session(&self, door: Door, agreed: &Agreed) -> Admission {
        let (more_tx, more) = crossbeam_channel::unbounded();
        let (rejoin_tx, rejoins) = crossbeam_channel::bounded(4);
        let may_fall_back =
            agreed.transport == TransportKind::Rdma && self.cfg.transport == TransportChoice::Auto;
        let n = agreed.lanes as usize;
        let slots: lanes::Slots = Arc::new(std::sync::Mutex::new(
            // `0..n` rejoin after a reconnect, `n..2n` replace failed RDMA lanes, `2n` is
            // post-copy's fetch lane (joined once, if the source switches to post-copy).
            (0..=2 * n)
                .map(|i| i == 2 * n || (may_fall_back && i >= n))
                .collect(),
        ));
        let admit = self.rt.spawn(lanes::in_session(
            door,
            agreed.auth.clone(),
            slots.clone(),
            more_tx,
            rejoin_tx,
        ));
        Admission {
            more,
            admit,
            slots,
            rejoins,
        }
    }
}

/// How long each end waits for the other's figures after `Done` (they are sent at once).
const FIGURES_WAIT: Duration = Duration::from_secs(1);

/// How often the received bytes reach the monitor while lanes land data.
const LIVE_PERIOD: Duration = Duration::from_millis(50);

/// Copies the bytes landed so far into the monitor's live figures, so that a destination's
/// progress moves within a round (round 0 is most of a migration) rather than only when a
/// round closes.
async fn live_bytes(sink: Arc<DestSink>, monitor: Arc<Monitor>) {
    let mut tick = tokio::time::interval(LIVE_PERIOD);
    loop {
        tick.tick().await;
        let landed = sink.landed.load(std::sync::atomic::Ordering::Relaxed);
        monitor
            .bytes_acked
            .store(landed, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The pause as this end saw it so far: from entering the stop-and-copy round to now.
pub(super) fn paused_since_device(monitor: &Monitor) -> Option<Duration> {
    let t = monitor.timeline.lock().unwrap_or_else(|e| e.into_inner());
    let (made, steps) = (&t.0, &t.1);
    let device = steps.iter().find(|(s, _)| *s == MigrationStatus::Device)?.1;
    Some(made.elapsed().saturating_sub(device))
}

/// The guest runs here (`Done` was sent): records the completion and the pause as seen
/// here, and returns this end's figures for the source.
fn resumed(monitor: &Monitor, sink: &DestSink, connected: Instant) -> crate::stats::EndFigures {
    // After post-copy the pause ended at `Resumed`, recorded then.
    let paused = match monitor.stats().postcopy {
        Some(_) => Duration::from_secs_f64(monitor.stats().downtime_ms / 1e3),
        None => paused_since_device(monitor).unwrap_or_default(),
    };
    let landed = sink.landed.load(std::sync::atomic::Ordering::Relaxed);
    monitor
        .bytes_acked
        .store(landed, std::sync::atomic::Ordering::Relaxed);
    monitor.update(|s| {
        s.status = MigrationStatus::Completed;
        s.downtime_ms = paused.as_secs_f64() * 1e3;
        s.ram.normal_bytes = landed;
    });
    let s = monitor.stats();
    crate::stats::EndFigures::new(
        landed,
        u32::try_from(s.ram.dirty_sync_count).unwrap_or(u32::MAX),
        paused,
        Duration::from_secs_f64(s.setup_time_ms.max(0.0) / 1e3),
        connected.elapsed(),
        s.memory.unwrap_or_default(),
    )
}

/// Starts a thread for each joined lane: the RDMA lane set up on its socket when there is
/// one, else a TCP lane on the socket itself. Returns the threads and where they report.
fn start_lanes(
    sink: &Arc<DestSink>,
    sockets: Vec<LaneSocket>,
    rdma: Option<Vec<RdmaDestLane>>,
) -> Result<(LaneThreads, crossbeam_channel::Receiver<LaneResult>), EngineError> {
    let (mut lanes, results) = LaneThreads::new(sink.clone());
    let mut rdma_lanes = rdma.map(Vec::into_iter);
    for (i, s) in sockets.into_iter().enumerate() {
        let lane: Box<dyn DestLane> = match rdma_lanes.as_mut().and_then(Iterator::next) {
            Some(l) => Box::new(l),
            None => Box::new(
                s.into_lane(sink.map().clone())
                    .map_err(|e| EngineError::lane(i, e))?,
            ),
        };
        lanes.start(i, lane)?;
    }
    Ok((lanes, results))
}

/// Stops the lanes and gathers their figures. After success the source closes its lanes once
/// it has our `Done`, so their final figures are waited for (briefly).
fn collect_lanes(
    mut lanes: LaneThreads,
    results: &crossbeam_channel::Receiver<LaneResult>,
    success: bool,
) -> Vec<DestLaneSummary> {
    let mut summaries = Vec::new();
    let mut put = |(i, res): LaneResult| {
        if i >= summaries.len() {
            summaries.resize(i + 1, DestLaneSummary::default());
        }
        if let Ok(s) = res {
            summaries[i] = s;
        }
    };
    // Only the lane threads hold senders now: the channel closes when the last one ends.
    lanes.results = crossbeam_channel::bounded(0).0;
    if success {
        let deadline = Instant::now() + Duration::from_secs(2);
        while let Ok(r) = results.recv_deadline(deadline) {
            put(r);
        }
    }
    // No lane carries anything more now: stop whatever is still open.
    lanes.stop();
    drop(lanes);
    while let Ok(r) = results.try_recv() {
        put(r);
    }
    summaries
}

/// Registers the destination's memory and connects one queue pair per lane socket (the
/// transport's own exchange on each socket, inside its TLS session when it has one, bounded
/// by `timeout`).
fn rdma_setup(
    dev: &Arc<RdmaDevice>,
    map: &MemoryMap,
    cfg: &RdmaConfig,
    sockets: &mut [LaneSocket],
    timeout: Duration,
) -> Result<(Arc<LocalMemory>, Vec<RdmaDestLane>), EngineError> {
    let mem = Arc::new(LocalMemory::register(dev, map, cfg.registration, true)?);
    let lanes = sockets
        .iter_mut()
        .map(|s| s.accept_rdma(dev, &mem, timeout))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((mem, lanes))
}
