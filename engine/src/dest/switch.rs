//! The destination's post-copy phases: taking the page set in the pause, resuming the guest
//! with those pages missing, and ending once every one of them has landed.
//!
//! The session's phase machine (`phase.rs`) routes the post-copy messages here; the state
//! kept between them is `postcopy.rs`'s, the userfaultfd side (dropping pages, placing them)
//! `placer.rs`'s, and the threads that serve the guest's faults are in `faults.rs` (TCP) and
//! `pull.rs` (RDMA).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rmig_transport::tcp::fetch::FetchClient;

use super::faults::{percentiles, FaultThread, Fetcher};
use super::phase::{Failure, Phase, Receiving};
use super::placer::Placer;
use crate::embedder::DestEmbedder;
use crate::protocol::Message;
use crate::stats::{MigrationStatus, PostcopyReport};
use crate::EngineError;

/// How long the fetch lane may take to join after the page set arrived (the source joins
/// it before it pauses, so it is normally here already).
const FETCH_JOINS_WITHIN: Duration = Duration::from_secs(10);

impl Receiving<'_> {
    /// A piece of the page set; the last one arms the switch (the device state follows).
    pub(super) fn postcopy_piece(
        &mut self,
        next: u32,
        runs: Vec<(u32, u64, u64)>,
        last: bool,
    ) -> Result<Phase, Failure> {
        let pages: u64 = self.sink.map().regions().iter().map(|r| r.pages()).sum();
        if (self.postcopy.runs.len() + runs.len()) as u64 > pages {
            return Err((
                EngineError::Protocol("PostcopyPages lists more runs than we have pages".into()),
                true,
            ));
        }
        self.monitor.update(|s| s.status = MigrationStatus::Device);
        self.postcopy.runs.extend(runs);
        if !last {
            return Ok(Phase::Switching { next });
        }
        self.postcopy.armed = true;
        self.postcopy.next = next;
        Ok(Phase::Stopped { next })
    }

    /// In the pause, before `Ready`: drops the pages the source still holds, puts guest
    /// memory under userfaultfd and starts serving faults on the fetch lane. A failure here
    /// is an ordinary one: the source resumes its guest.
    pub(super) fn switch_to_postcopy(&mut self) -> Result<(), Failure> {
        let fetcher = self.await_fetcher().map_err(|e| (e, true))?;
        let runs = std::mem::take(&mut self.postcopy.runs);
        // Post-copy registers guest memory for itself.
        self.end_landing();
        let placer = Arc::new(Placer::switch(self.sink.map(), &runs).map_err(|e| (e, true))?);
        let _ = self.sink.placer.set(placer.clone());
        let faults = FaultThread::start(placer.clone(), fetcher, self.sink.clone())
            .map_err(|e| (EngineError::from(e), true))?;
        self.postcopy.placer = Some(placer);
        self.postcopy.faults = Some(faults);
        Ok(())
    }

    /// Waits for the fetch lane (admitting any other lane that comes meanwhile); returns what
    /// fetches pages through it: the TCP client, or the RDMA reader set up on it.
    fn await_fetcher(&mut self) -> Result<Fetcher, EngineError> {
        let deadline = Instant::now() + FETCH_JOINS_WITHIN;
        while self.postcopy.fetch.is_none() && self.postcopy.reader.is_none() {
            match self.more.recv_deadline(deadline) {
                Ok((lane, sock)) => self.admit(lane, sock)?,
                Err(_) => {
                    return Err(EngineError::Protocol(
                        "the source switched to post-copy without its fetch lane".into(),
                    ))
                }
            }
        }
        if let Some((reader, sock)) = self.postcopy.reader.take() {
            // The socket stays open as long as the reader's queue pair is used.
            return Ok(Fetcher::Rdma(Box::new(reader), Box::new(sock)));
        }
        let conn = self
            .postcopy
            .fetch
            .take()
            .expect("joined")
            .into_fetch(self.reconnect.liveness.peer_timeout * 2)?;
        Ok(Fetcher::Tcp(FetchClient::new(
            conn,
            self.sink.map().clone(),
        )))
    }

    /// `Commit` in post-copy: resumes our guest with pages missing and says `Resumed`; from
    /// here on the guest's memory is split between the hosts.
    pub(super) fn resume_postcopy(
        &mut self,
        embedder: &mut dyn DestEmbedder,
    ) -> Result<Phase, Failure> {
        embedder
            .resume()
            .map_err(|e| (EngineError::Embedder(e), true))?;
        self.link.send(Message::Resumed);
        self.postcopy.resumed_at = Some(Instant::now());
        let paused = super::paused_since_device(self.monitor).unwrap_or_default();
        let at_switch = self.postcopy.placer.as_ref().map_or(0, |p| p.at_switch);
        self.monitor.update(|s| {
            s.status = MigrationStatus::Postcopy;
            s.downtime_ms = paused.as_secs_f64() * 1e3;
            s.postcopy = Some(PostcopyReport {
                pages_at_switch: at_switch,
                ..Default::default()
            });
        });
        Ok(Phase::Postcopy {
            next: self.postcopy.next,
        })
    }

    /// `PostcopyEnd`: waits for the pages still in flight (as long as they keep landing:
    /// none for twice the peer timeout is a failure), then compares (when verifying) or
    /// finishes.
    pub(super) fn postcopy_end(&mut self) -> Result<Phase, Failure> {
        let placer = self.postcopy.placer.clone().expect("switched");
        let wait = self.reconnect.liveness.peer_timeout * 2;
        let left = placer.wait_all_landed(wait);
        if left > 0 {
            return Err((
                EngineError::Protocol(format!(
                    "the source says every page was sent, but {left} pages are still missing \
                     and none landed for {} ms",
                    wait.as_millis()
                )),
                true,
            ));
        }
        if self.verify.is_on() {
            return Ok(Phase::PostcopyVerifying);
        }
        self.finish_postcopy()
    }

    /// Every page is here (and matched, when verifying): stops the fault thread, records the
    /// phase's figures and says `Done`.
    pub(super) fn finish_postcopy(&mut self) -> Result<Phase, Failure> {
        self.record_postcopy();
        self.link.send(Message::Done);
        Ok(Phase::Done)
    }

    /// Stops the fault thread (if it runs) and records the phase's figures so far.
    fn record_postcopy(&mut self) {
        let figures = self
            .postcopy
            .faults
            .take()
            .map(FaultThread::finish)
            .unwrap_or_default();
        let Some(placer) = self.postcopy.placer.clone() else {
            return;
        };
        let mut lat = figures.latencies_us;
        let (p50, p99, max) = percentiles(&mut lat);
        let duration = self
            .postcopy
            .resumed_at
            .map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3);
        self.monitor.update(|s| {
            s.postcopy = Some(PostcopyReport {
                duration_ms: duration,
                pages_at_switch: placer.at_switch,
                pages_on_fault: placer.on_fault.load(std::sync::atomic::Ordering::Relaxed),
                pages_background: placer.background.load(std::sync::atomic::Ordering::Relaxed),
                faults: lat.len() as u64,
                fault_p50_us: p50,
                fault_p99_us: p99,
                fault_max_us: max,
            })
        });
    }

    /// The fetch lane joined: kept for the switch, or handed to the fault thread after a
    /// reconnect.
    pub(super) fn fetch_lane_joined(
        &mut self,
        mut sock: super::lanes::LaneSocket,
    ) -> Result<(), EngineError> {
        if let Some((dev, wait)) = &self.postcopy.rdma {
            // The source answers on this socket at once; the queue pair is ready before the
            // pause, so the switch costs no RDMA setup.
            let cfg = rmig_transport::rdma::ReaderConfig::default();
            let reader = sock.connect_reader(dev, cfg, *wait)?;
            self.postcopy.reader = Some((reader, sock));
            return Ok(());
        }
        match &self.postcopy.faults {
            None => self.postcopy.fetch = Some(sock),
            Some(faults) => {
                let conn = sock.into_fetch(self.reconnect.liveness.peer_timeout * 2)?;
                faults.replace_lane(FetchClient::new(conn, self.sink.map().clone()));
            }
        }
        Ok(())
    }

    /// A fault thread that ended on its own could not read fault reports: the guest's
    /// faults would wait forever.
    pub(super) fn check_faults(&mut self) -> Result<(), Failure> {
        let ended = self
            .postcopy
            .faults
            .as_ref()
            .is_some_and(FaultThread::is_finished);
        if !ended {
            return Ok(());
        }
        let figures = self
            .postcopy
            .faults
            .take()
            .map(FaultThread::finish)
            .unwrap_or_default();
        Err((
            EngineError::GuestLost(format!(
                "the fault thread failed: {}",
                figures.error.unwrap_or_else(|| "it ended".into())
            )),
            true,
        ))
    }

    /// The session's end after a switch to post-copy: a failure once our guest ran is
    /// `guest-lost` (the pages it lacks are on a source we lost), and its faulting threads
    /// stay blocked for good.
    pub(super) fn settle_postcopy(&mut self, r: Result<(), Failure>) -> Result<(), Failure> {
        let Err((e, tell)) = r else { return Ok(()) };
        if !self.postcopy.resumed() {
            return Err((e, tell));
        }
        if let Some(p) = &self.postcopy.placer {
            p.keep_blocked();
        }
        self.record_postcopy();
        let left = self.postcopy.placer.as_ref().map_or(0, |p| p.left());
        // Nothing was verified: the pages still on the source never arrived.
        self.monitor.update(|s| s.verified = None);
        let e = match e {
            e @ EngineError::GuestLost(_) => e,
            e => EngineError::GuestLost(format!(
                "post-copy broke with {left} pages still on the source ({e}); the guest's \
                 threads that touch them stay blocked"
            )),
        };
        Err((e, tell))
    }
}
