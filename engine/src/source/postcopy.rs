//! Post-copy on the source: hand the guest over before all of its memory has moved, then
//! send the rest while the destination's guest runs.
//!
//! Pre-copy cannot end while the guest dirties memory faster than the wire moves it. Here the
//! pause carries no final copy: the source sends the set of pages still dirty
//! (`PostcopyPages`) and the device state, the two-phase handover runs as always (`Ready`,
//! `Commit`), and the destination answers `Resumed` once its guest runs. The downtime is
//! that exchange, whatever the dirty set's size. The pages then go two ways at once: the data
//! lanes send the whole set in rounds as in pre-copy (the background), and the fetch lane, a
//! connection of its own, answers the destination's requests for the pages its guest touched
//! ahead of everything else. A page served on request is taken out of the background set
//! (unless a lane took it already; the destination keeps whichever copy lands first, and
//! both hold the same bytes: this guest never runs again).
//!
//! From `Resumed` on the guest's memory is split between the hosts, so this end never
//! resumes its copy: a failure from then on is `guest-lost`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use rmig_transport::tcp::fetch::{self, Fetch};

use super::connect;
use super::worker::Shared;
use super::SourceSession;
use crate::protocol::codec::MAX_POSTCOPY_RUNS;
use crate::protocol::Message;
use crate::stats::{MigrationStatus, PostcopyReport};
use crate::EngineError;

/// The fetch lane's server thread and its count of pages served.
pub(super) struct FetchServer {
    served: Arc<AtomicU64>,
    join: std::thread::JoinHandle<Result<u64, String>>,
    shutdown: std::net::TcpStream,
}

impl FetchServer {
    /// Joins the fetch lane of `session` and serves it on a thread, counting into `served`.
    fn start(session: &SourceSession, served: Arc<AtomicU64>) -> Result<FetchServer, EngineError> {
        let kit = session.lanes.kit();
        let lane = 2 * kit.lanes;
        let timeout = session.cfg.handshake_timeout;
        let sock = connect::join_lane(kit.peer, &kit.auth, lane, timeout)?;
        let shutdown = sock.try_clone()?;
        let conn = connect::fetch_conn(sock)?;
        let (shared, s) = (session.shared.clone(), served.clone());
        let join = std::thread::Builder::new()
            .name("rmig-fetch".into())
            .spawn(move || serve(conn, shared, s))?;
        Ok(FetchServer {
            served,
            join,
            shutdown,
        })
    }

    /// After a reconnect: ends the old lane and joins a new one, keeping the count.
    fn rejoin(&mut self, session: &SourceSession) -> Result<(), EngineError> {
        let _ = self.shutdown.shutdown(std::net::Shutdown::Both);
        let fresh = FetchServer::start(session, self.served.clone())?;
        let old = std::mem::replace(self, fresh);
        let _ = old.join.join();
        Ok(())
    }

    /// Pages served so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Ends the lane (the destination closes its end once every page has landed) and
    /// returns the pages served.
    pub fn finish(self) -> u64 {
        let _ = self.shutdown.shutdown(std::net::Shutdown::Both);
        let _ = self.join.join();
        self.served.load(Ordering::Relaxed)
    }
}

/// What serves the destination's missing pages after the switch.
pub(super) enum PageServer {
    /// TCP: a thread answers the fetch lane's requests; the data lanes push the rest.
    Fetch(FetchServer),
    /// RDMA: the destination reads every page itself with one-sided READs; this end only
    /// keeps its memory registered for it (no thread of ours serves anything).
    Exposed {
        exposure: rmig_transport::rdma::ReadExposure,
        _sock: Box<connect::JoinedLane>,
    },
}

impl PageServer {
    /// Ends serving; returns the pages a source thread served.
    fn finish(self) -> u64 {
        match self {
            PageServer::Fetch(f) => f.finish(),
            PageServer::Exposed { exposure, .. } => exposure.source_completions(),
        }
    }
}

/// Serves fetches from the paused guest's memory: each answer's pages leave the background
/// set and get their hashes (when verifying) before they go out.
fn serve(
    mut conn: fetch::FetchConn,
    shared: Arc<Shared>,
    served: Arc<AtomicU64>,
) -> Result<u64, String> {
    let map = shared.map.clone();
    let r = fetch::serve(&mut conn, &map, &mut |f: &Fetch, bytes: &[u8]| {
        let (region, first, n) = (f.region as usize, f.first_page, f.pages as u64);
        shared.round[region].clear_range(first, n);
        shared.pending[region].clear_range(first, n);
        if let Some(h) = &shared.hashes {
            let ps = bytes.len() / n as usize;
            for (i, page) in bytes.chunks_exact(ps).enumerate() {
                h[region].set(first + i as u64, crate::verify::hash_page(page));
            }
        }
        served.fetch_add(n, Ordering::Relaxed);
    });
    r.map_err(|e| e.to_string())
}

impl SourceSession {
    /// Joins the fetch lane (lane number `2n`, after the fallback lanes). Over TCP a thread
    /// serves it; requests come only once the destination's guest runs. Over RDMA the lane
    /// only carries the setup of a queue pair through which the destination reads this
    /// end's memory, registered for remote reads.
    pub(super) fn open_fetch_lane(&mut self) -> Result<PageServer, EngineError> {
        let dev = match (self.lanes.transport(), &self.rdma_dev) {
            (crate::protocol::TransportKind::Rdma, Some(dev)) => dev.clone(),
            _ => {
                let served = Arc::new(AtomicU64::new(0));
                return Ok(PageServer::Fetch(FetchServer::start(self, served)?));
            }
        };
        // Registered first: the destination waits for the answer to its reader's setup.
        let mem = rmig_transport::rdma::ExposedMemory::register(&dev, &self.shared.map)?;
        let kit = self.lanes.kit();
        let timeout = self.cfg.handshake_timeout;
        let mut sock = connect::join_lane(kit.peer, &kit.auth, 2 * kit.lanes, timeout)?;
        let exposure = connect::serve_reader(&mut sock, &mem, timeout)?;
        Ok(PageServer::Exposed {
            exposure,
            _sock: Box::new(sock),
        })
    }

    /// Post-copy's `complete`: the pause hands the guest over at once, then every page it
    /// left behind follows. See the module documentation.
    pub(super) fn complete_postcopy(&mut self) -> Result<(), EngineError> {
        self.check_cancel()?;
        let expected = self.monitor.stats().expected_downtime_ms;
        self.verify_baseline()?;
        let mut server = self.open_fetch_lane()?;
        self.monitor.update(|s| s.status = MigrationStatus::Device);
        let t0 = Instant::now();
        self.embedder.pause().map_err(EngineError::Embedder)?;
        self.paused_at = Some(t0);
        self.fill_round_set()?;
        let at_switch = self.send_postcopy_pages();
        self.send_device_state()?;
        self.hand_over_expecting(Message::Resumed)?;
        let downtime = t0.elapsed();
        self.resumed_there = true;
        self.monitor.update(|s| {
            s.status = MigrationStatus::Postcopy;
            s.downtime_ms = downtime.as_secs_f64() * 1e3;
            s.expected_downtime_ms = expected;
        });
        let acked_at_switch = self.monitor.bytes_acked.load(Ordering::Relaxed);
        let r = self.finish_postcopy(&mut server, at_switch, t0 + downtime);
        let served = server.finish();
        let sent = self.monitor.bytes_acked.load(Ordering::Relaxed) - acked_at_switch;
        let background = sent / self.regions[0].page_size();
        self.record_postcopy(at_switch, served, background, t0 + downtime);
        let verified = r.map_err(|e| EngineError::GuestLost(format!("post-copy failed: {e}")))?;
        self.finish_completed(downtime, expected, verified);
        Ok(())
    }

    /// After `Resumed`: sends the rest in the background until every page is confirmed,
    /// then says so and waits for the destination's `Done` (its verdict first, when
    /// verifying).
    fn finish_postcopy(
        &mut self,
        server: &mut PageServer,
        at_switch: u64,
        resumed: Instant,
    ) -> Result<Option<bool>, EngineError> {
        match server {
            PageServer::Fetch(fetch) => self.push_rest(fetch, at_switch, resumed)?,
            PageServer::Exposed { .. } => self.hash_remaining(),
        }
        self.link.send(Message::PostcopyEnd);
        let verified = match &self.shared.hashes {
            Some(h) => {
                let chunks = crate::verify::touched_digests(h);
                self.link.send(Message::Digests { chunks });
                let (ok, mism) = self.await_patiently("Verified", |m| match m {
                    Message::Verified { ok, mismatches } => Ok((ok, mismatches)),
                    m => Err(m),
                })?;
                self.monitor.update(|s| s.verified = Some(ok));
                if !ok {
                    return Err(EngineError::VerifyFailed(format!(
                        "destination differs in {}",
                        crate::verify::describe(&mism)
                    )));
                }
                Some(true)
            }
            None => None,
        };
        self.await_patiently("Done", |m| match m {
            Message::Done => Ok(()),
            m => Err(m),
        })?;
        Ok(verified)
    }

    /// Waits for the message `want` accepts for as long as the link lives: the destination
    /// answers once every page has landed, and bounds that wait itself (it gives up when no
    /// page lands for twice the peer timeout), while a dead link ends this wait.
    fn await_patiently<T>(
        &self,
        what: &str,
        want: impl FnOnce(Message) -> Result<T, Message>,
    ) -> Result<T, EngineError> {
        loop {
            if let Some(m) = self.link.recv_timeout(std::time::Duration::from_secs(1))? {
                return want(m).map_err(|m| {
                    EngineError::Protocol(format!("expected {what}, got {}", m.name()))
                });
            }
        }
    }

    /// Over RDMA the pages leave without passing a source thread, so their checksums are
    /// taken here, from the paused guest's memory (while the destination reads them).
    fn hash_remaining(&self) {
        let Some(h) = &self.shared.hashes else { return };
        let mut scratch = crate::verify::HashScratch::new();
        for (ri, b) in self.shared.round.iter().enumerate() {
            let r = self.shared.map.get(ri).expect("region");
            for p in b.take_set() {
                match scratch.hash_guest(r.guest_pages(p, 1)) {
                    Some(x) => h[ri].set(p, x),
                    None => h[ri].set_zero(p, 1),
                }
            }
        }
    }

    /// TCP: sends the rest in rounds until every page is confirmed (reconnecting after a
    /// broken link, the fetch lane too).
    fn push_rest(
        &mut self,
        server: &mut FetchServer,
        at_switch: u64,
        resumed: Instant,
    ) -> Result<(), EngineError> {
        loop {
            match self.run_round(true) {
                Ok(_) => self.round += 1,
                Err(e) if self.may_reconnect(&e) => {
                    self.reconnect(&e)?;
                    server.rejoin(self)?;
                }
                Err(e) => return Err(e),
            }
            self.monitor.update(|s| {
                s.postcopy = Some(PostcopyReport {
                    duration_ms: resumed.elapsed().as_secs_f64() * 1e3,
                    pages_at_switch: at_switch,
                    pages_on_fault: server.served(),
                    ..Default::default()
                })
            });
            // No dirty log after the switch: the guest is not ours to write any more. What
            // is pending is what a failed lane could not confirm.
            if self.refill_from_pending() == 0 {
                return Ok(());
            }
        }
    }

    /// Moves the pending pages into the round set; returns how many there are.
    fn refill_from_pending(&mut self) -> u64 {
        let mut n = 0;
        for (b, p) in self.shared.round.iter().zip(&self.shared.pending) {
            b.clear_all();
            n += b.take_from(p);
        }
        n
    }

    /// Sends the round set (the pages still dirty in the pause) in pieces; returns its pages.
    fn send_postcopy_pages(&mut self) -> u64 {
        let mut runs = Vec::new();
        let mut total = 0;
        for (ri, b) in self.shared.round.iter().enumerate() {
            let mut start: Option<(u64, u64)> = None;
            for p in 0..b.len() {
                if !b.test(p) {
                    continue;
                }
                total += 1;
                start = match start {
                    Some((f, n)) if f + n == p => Some((f, n + 1)),
                    Some((f, n)) => {
                        runs.push((ri as u32, f, n));
                        Some((p, 1))
                    }
                    None => Some((p, 1)),
                };
            }
            if let Some((f, n)) = start {
                runs.push((ri as u32, f, n));
            }
        }
        let mut pieces = runs.chunks(MAX_POSTCOPY_RUNS).peekable();
        if pieces.peek().is_none() {
            self.link.send(Message::PostcopyPages {
                runs: Vec::new(),
                last: true,
            });
        }
        while let Some(p) = pieces.next() {
            self.link.send(Message::PostcopyPages {
                runs: p.to_vec(),
                last: pieces.peek().is_none(),
            });
        }
        total
    }

    /// The post-copy figures as this end saw them.
    fn record_postcopy(&self, at_switch: u64, served: u64, background: u64, resumed: Instant) {
        let duration_ms = resumed.elapsed().as_secs_f64() * 1e3;
        self.monitor.update(|s| {
            s.postcopy = Some(PostcopyReport {
                duration_ms,
                pages_at_switch: at_switch,
                pages_on_fault: served,
                pages_background: background,
                ..Default::default()
            })
        });
    }
}
