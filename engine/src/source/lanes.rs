//! A source session's data lanes as one thing: the [`LaneSet`].
//!
//! Lanes come and go during a session: they join and prove their membership at setup, over
//! RDMA or TCP; a lane that fails is written off and the round finishes on the others; when
//! the last RDMA lane fails, TCP lanes take their place on the round's remaining work; after a
//! broken control connection every lane is stopped, its pages go back to the pending set, and
//! the lanes join again. Each of these touches the same state (the workers, their reports,
//! where they run, which transport is live, the failure counts), so it lives here, behind a
//! small API, and the session and its rounds only say what should happen.

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use rmig_numa::{Role, WorkerPool};
use rmig_transport::{MemoryMap, SourceLane};

use super::connect;
use super::placement::Placement;
use super::round::Queues;
use super::setup::{Handshake, RdmaLanes};
use super::worker::{Cmd, Report, Shared, Worker};
use crate::control::auth::SessionAuth;
use crate::monitor::Monitor;
use crate::protocol::TransportKind;
use crate::{EngineError, SourceConfig, TransportChoice};

/// One lane's worker thread, as the session sees it.
struct LaneWorker {
    cmd: Sender<Cmd>,
    join: Option<JoinHandle<()>>,
    /// Takes work: it has not failed and has not been closed.
    alive: bool,
    /// The lane's socket, to end a worker blocked on it when the session stops.
    kill: TcpStream,
}

/// The session's lanes' address and keys: what it takes to open TCP lanes (in place of RDMA
/// ones, or again after a reconnect) and to reconnect the session.
pub(super) struct TcpKit {
    /// The destination's address.
    pub peer: SocketAddr,
    /// The session's keys (lane and reconnect proofs).
    pub auth: SessionAuth,
    /// Lanes per set.
    pub lanes: u16,
    map: MemoryMap,
}

/// The lanes of a source session, their workers, and everything that happens to them.
pub(super) struct LaneSet {
    workers: Vec<LaneWorker>,
    /// Where the workers report at the end of each round (or when their lane fails).
    reports: Receiver<Report>,
    report_tx: Sender<Report>,
    pool: WorkerPool,
    shared: Arc<Shared>,
    placement: Placement,
    /// The CPUs each lane's worker was seen on, for the NUMA report.
    cpus_seen: Vec<Vec<usize>>,
    /// The transport of the live lanes.
    transport: TransportKind,
    kit: TcpKit,
    /// TCP lanes may still replace the RDMA ones when every one has failed (once).
    may_fall_back: bool,
    /// The latest lane failure of the round, for the error when no lane is left.
    last_error: String,
    monitor: Arc<Monitor>,
    handshake_timeout: Duration,
    peer_timeout: Duration,
}

impl LaneSet {
    /// Joins every lane to the session, then opens each one (RDMA if `rdma`, else TCP) and
    /// starts its worker, placed as `placement` says.
    pub fn open(
        cfg: &SourceConfig,
        hs: &Handshake,
        rdma: Option<&RdmaLanes>,
        shared: &Arc<Shared>,
        placement: Placement,
    ) -> Result<LaneSet, EngineError> {
        let timeout = cfg.handshake_timeout;
        let agreed = &hs.agreed;
        // Every lane joins first: the destination answers RDMA setup once all have joined.
        let sockets = (0..agreed.lanes)
            .map(|i| connect::join_lane(hs.peer, &agreed.auth, i, timeout))
            .collect::<Result<Vec<_>, _>>()?;
        let (report_tx, reports) = crossbeam_channel::unbounded();
        let mut set = LaneSet {
            workers: Vec::new(),
            reports,
            report_tx,
            pool: WorkerPool::flat(),
            shared: shared.clone(),
            placement,
            cpus_seen: Vec::new(),
            transport: agreed.transport,
            kit: TcpKit {
                peer: hs.peer,
                auth: agreed.auth.clone(),
                lanes: agreed.lanes,
                map: shared.map.clone(),
            },
            // Over RDMA with `auto`, TCP lanes take over once every RDMA lane has failed.
            may_fall_back: rdma.is_some() && cfg.transport == TransportChoice::Auto,
            last_error: String::new(),
            monitor: shared.monitor.clone(),
            handshake_timeout: timeout,
            peer_timeout: cfg.liveness.peer_timeout,
        };
        for (i, sock) in (0..agreed.lanes).zip(sockets) {
            let pacer = shared.monitor.pacer.clone();
            let kill = lane_deadline(&sock, set.peer_timeout)?;
            let idx = i as usize;
            let lane = match rdma {
                Some(r) => {
                    let lane = connect::rdma_lane(sock, &r.dev, &r.mem, pacer, timeout * 6)?;
                    connect::with_faults(lane, cfg, idx)
                }
                None => {
                    let lane = connect::tcp_lane(sock, i, shared.map.clone(), pacer)?;
                    connect::with_faults(lane, cfg, idx)
                }
            };
            set.start(idx, agreed.transport, lane, kill)?;
        }
        Ok(set)
    }

    /// Starts the worker of the next lane on `lane` (a `transport` lane), placed as lane
    /// `slot` of the NUMA plan.
    fn start(
        &mut self,
        slot: usize,
        transport: TransportKind,
        lane: Box<dyn SourceLane>,
        kill: TcpStream,
    ) -> Result<&LaneWorker, EngineError> {
        let idx = self.workers.len();
        let w = Worker {
            lane_idx: idx,
            order: self.placement.order_for(slot),
            metrics: crate::metrics::LaneMetrics::new(transport.name(), idx),
            lane,
            shared: self.shared.clone(),
            seq: 0,
            unacked: VecDeque::new(),
            scratch: Box::default(),
        };
        let (cmd, cmd_rx) = crossbeam_channel::unbounded();
        let reports = self.report_tx.clone();
        let cpus = self.placement.cpus_for(slot);
        let join = self.pool.spawn_on(Role::SourceLane, idx, &cpus, move || {
            w.main(cmd_rx, reports)
        })?;
        self.workers.push(LaneWorker {
            cmd,
            join: Some(join),
            alive: true,
            kill,
        });
        if self.cpus_seen.len() <= idx {
            self.cpus_seen.push(Vec::new());
        }
        Ok(&self.workers[idx])
    }

    /// Opens the session's number of TCP lanes, numbered from `first`, and starts their
    /// workers (set on `queues` at once, when a round is running).
    fn open_tcp(&mut self, first: u16, queues: Option<&Queues>) -> Result<(), EngineError> {
        for j in 0..self.kit.lanes {
            let n = first + j;
            let sock =
                connect::join_lane(self.kit.peer, &self.kit.auth, n, self.handshake_timeout)?;
            let kill = lane_deadline(&sock, self.peer_timeout)?;
            let pacer = self.monitor.pacer.clone();
            let lane = Box::new(connect::tcp_lane(sock, n, self.kit.map.clone(), pacer)?);
            let w = self.start(j as usize, TransportKind::Tcp, lane, kill)?;
            if let Some(q) = queues {
                let _ = w.cmd.send(Cmd::Round(q.clone()));
            }
        }
        Ok(())
    }

    /// The NUMA placement the lanes follow.
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// The transport of the live lanes.
    pub fn transport(&self) -> TransportKind {
        self.transport
    }

    /// The session's address and keys (for reconnecting the control connection).
    pub fn kit(&self) -> &TcpKit {
        &self.kit
    }

    /// Lanes opened so far, live or not.
    pub fn count(&self) -> usize {
        self.workers.len()
    }

    /// Lanes that take work.
    pub fn alive(&self) -> usize {
        self.workers.iter().filter(|w| w.alive).count()
    }

    /// Where the workers report.
    pub fn reports(&self) -> &Receiver<Report> {
        &self.reports
    }

    /// The NUMA report: the plan, and the CPUs each lane was seen on.
    pub fn numa_report(&self) -> crate::stats::NumaReport {
        self.placement.report(&self.cpus_seen)
    }

    /// Sets every live worker on the round's `queues`; returns how many took it.
    pub fn dispatch(&mut self, queues: &Queues) -> usize {
        self.last_error.clear();
        let mut took = 0;
        for w in self.workers.iter().filter(|w| w.alive) {
            took += w.cmd.send(Cmd::Round(queues.clone())).is_ok() as usize;
        }
        took
    }

    /// Takes in what a worker's report says about its lane: where it ran, and whether it
    /// failed. A lane that failed, other than by the session stopping it, is written off;
    /// when it was the last one, TCP lanes take over the rest of `queues` if the session may
    /// fall back. Returns how many workers joined the round (the fallback lanes); an error
    /// when they could not be opened (the lanes are stopped then).
    pub fn account(&mut self, r: &Report, queues: &Queues) -> Result<usize, EngineError> {
        let seen = &mut self.cpus_seen[r.lane];
        for c in &r.cpus {
            if !seen.contains(c) {
                seen.push(*c);
            }
        }
        let Some(error) = &r.error else {
            return Ok(0);
        };
        if self.shared.abort.load(Ordering::Relaxed) {
            return Ok(0);
        }
        self.workers[r.lane].alive = false;
        crate::metrics::lane_failed(self.transport.name());
        self.monitor.update(|s| s.lanes_failed += 1);
        self.last_error = format!("lane {}: {error}", r.lane);
        if self.alive() > 0 || !self.may_fall_back {
            return Ok(0);
        }
        self.fall_back_to_tcp(queues).inspect_err(|_| self.stop())
    }

    /// Every RDMA lane has failed: opens as many TCP lanes in their place and sets them on the
    /// round's remaining work (the failed lanes' unconfirmed pages are pending again). Returns
    /// how many lanes started. Used once.
    fn fall_back_to_tcp(&mut self, queues: &Queues) -> Result<usize, EngineError> {
        self.may_fall_back = false;
        let why = &self.last_error;
        let reason = format!("every RDMA lane failed (last: {why}); continued over TCP");
        let n = self.kit.lanes;
        self.open_tcp(n, Some(queues))?;
        self.transport = TransportKind::Tcp;
        self.monitor.update(|s| {
            s.transport = "tcp".into();
            s.fallback_reason = Some(reason);
            s.lanes += n as usize;
        });
        Ok(n as usize)
    }

    /// At the end of a round: an error if no lane is left, naming the last failure.
    pub fn ensure_alive(&self) -> Result<(), EngineError> {
        if self.alive() == 0 {
            return Err(EngineError::AllLanesFailed(self.last_error.clone()));
        }
        Ok(())
    }

    /// Stops every worker now: they see `abort` at their next batch, and a worker blocked
    /// on its socket (a destination that stopped reading) sees the socket shut down.
    pub fn stop(&self) {
        self.shared.abort.store(true, Ordering::Relaxed);
        for w in &self.workers {
            let _ = w.kill.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Closes every lane and waits for its worker (a finished migration, or a reconnect).
    pub fn close(&mut self) {
        for w in &mut self.workers {
            let _ = w.cmd.send(Cmd::Close);
        }
        for w in &mut self.workers {
            if let Some(j) = w.join.take() {
                let _ = j.join();
            }
            w.alive = false;
        }
    }

    /// Waits for every worker after a failure: dropping the command channels ends idle
    /// workers; busy ones see `abort` (call [`LaneSet::stop`] first).
    pub fn join(&mut self) {
        for w in &mut self.workers {
            let (dead, _) = crossbeam_channel::bounded(0);
            w.cmd = dead;
        }
        for w in &mut self.workers {
            if let Some(j) = w.join.take() {
                let _ = j.join();
            }
        }
    }

    /// After a broken link: stops and closes every lane, and puts the interrupted round's
    /// unsent pages back into the pending set (the workers put back what they could not
    /// confirm), ready for [`LaneSet::reopen`].
    pub fn stand_down(&mut self) {
        self.stop();
        self.close();
        while self.reports.try_recv().is_ok() {}
        for (p, r) in self.shared.pending.iter().zip(&self.shared.round) {
            p.take_from(r);
        }
        self.shared.abort.store(false, Ordering::Relaxed);
    }

    /// Once the session has reconnected: opens its TCP lanes again, numbered from 0.
    pub fn reopen(&mut self) -> Result<(), EngineError> {
        self.workers.clear();
        self.open_tcp(0, None)
    }
}

/// Gives a lane's socket a write deadline (a destination that takes no byte for the peer
/// timeout is gone) and returns a handle that can shut the socket down.
fn lane_deadline(sock: &TcpStream, d: Duration) -> Result<TcpStream, EngineError> {
    sock.set_write_timeout(Some(d))?;
    Ok(sock.try_clone()?)
}
