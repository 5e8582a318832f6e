//! The destination's fault thread over TCP: it reads the guest's fault reports and fetches
//! each missing page on the fetch lane (a connection of its own, answered by the source ahead
//! of the background pages), every report gathered so far in one go. Over RDMA the fault
//! thread is `pull.rs`'s, which also pulls the background pages itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rmig_transport::tcp::fetch::{Fetch, FetchClient};
use rmig_transport::PageSink;

use super::placer::{gather, Arrival, FaultFigures, Placer, Waiting};
use super::sink::DestSink;

/// What fetches missing pages for the fault thread.
pub(crate) enum Fetcher {
    /// TCP: requests on the fetch lane, answered by a source thread.
    Tcp(FetchClient),
    /// RDMA: one-sided READs of the source's memory; the lane socket that set the reader up
    /// stays open as long as it is used.
    Rdma(
        Box<rmig_transport::rdma::RdmaPageReader>,
        Box<super::lanes::LaneSocket>,
    ),
}

/// The thread that serves the guest's faults.
pub(crate) struct FaultThread {
    stop: Arc<AtomicBool>,
    /// A new fetch lane after a reconnect.
    replace: crossbeam_channel::Sender<FetchClient>,
    join: std::thread::JoinHandle<FaultFigures>,
}

/// How often the fault thread looks at its stop flag while no fault comes.
const POLL_MS: i32 = 20;

impl FaultThread {
    /// Starts serving faults on `placer`'s memory, fetching missing pages with `fetcher`
    /// (over RDMA it also pulls every other missing page) and handing what lands to `sink`
    /// (hashes, counters).
    pub fn start(
        placer: Arc<Placer>,
        fetcher: Fetcher,
        sink: Arc<DestSink>,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (replace, replacements) = crossbeam_channel::bounded(1);
        let s = stop.clone();
        let join = std::thread::Builder::new()
            .name("rmig-faults".into())
            .spawn(move || match fetcher {
                Fetcher::Tcp(client) => serve_faults(&placer, client, &replacements, &sink, &s),
                Fetcher::Rdma(mut reader, _sock) => {
                    super::pull::serve_faults_rdma(&placer, &mut reader, &sink, &s)
                }
            })?;
        Ok(FaultThread {
            stop,
            replace,
            join,
        })
    }

    /// Hands the thread the fetch lane that joined again after a reconnect.
    pub fn replace_lane(&self, client: FetchClient) {
        let _ = self.replace.try_send(client);
    }

    /// Whether the thread ended on its own (it could not read fault reports).
    pub fn is_finished(&self) -> bool {
        self.join.is_finished()
    }

    /// Stops the thread (it closes the fetch lane) and returns its figures.
    pub fn finish(self) -> FaultFigures {
        self.stop.store(true, Ordering::Release);
        self.join.join().unwrap_or_default()
    }
}

/// The fault thread's loop: waits for fault reports, resolves what it can at once, fetches
/// the rest (every report gathered so far in one go) and places the answers. When the fetch
/// lane breaks, the faults wait (the guest's threads that touch missing pages stay blocked,
/// the others run on) until the session hands over a new lane after a reconnect; the session
/// decides when to give up.
fn serve_faults(
    placer: &Placer,
    client: FetchClient,
    replacements: &crossbeam_channel::Receiver<FetchClient>,
    sink: &DestSink,
    stop: &AtomicBool,
) -> FaultFigures {
    let mut figures = FaultFigures::default();
    let mut waiting: Vec<Waiting> = Vec::new();
    let mut buf = Vec::new();
    let mut lane = Some(client);
    while !stop.load(Ordering::Acquire) {
        if let Ok(c) = replacements.try_recv() {
            lane = Some(c);
        }
        if placer.wait_reports(POLL_MS) {
            if let Err(e) = gather(placer, &mut waiting) {
                figures.error = Some(e);
                break;
            }
        }
        let Some(client) = lane.as_mut().filter(|_| !waiting.is_empty()) else {
            continue;
        };
        match fetch(placer, client, sink, &mut waiting, &mut buf, &mut figures) {
            Ok(()) => {}
            // A broken connection: the faults wait for the lane of a reconnect.
            Err(FetchFailed::Broken(e)) => {
                figures.error = Some(e);
                lane = None;
            }
            // Answers that are not what was asked, or pages that cannot be placed: the
            // session ends.
            Err(FetchFailed::Fatal(e)) => {
                figures.error = Some(e);
                break;
            }
        }
    }
    if let Some(mut c) = lane {
        c.close();
    }
    figures
}

/// Fetches every waiting page (skipping those that landed meanwhile), places the answers and
/// records each fault's latency.
fn fetch(
    placer: &Placer,
    client: &mut FetchClient,
    sink: &DestSink,
    waiting: &mut Vec<Waiting>,
    buf: &mut Vec<u8>,
    figures: &mut FaultFigures,
) -> Result<(), FetchFailed> {
    let mut asked = std::mem::take(waiting).into_iter();
    let mut sent = Vec::new();
    while let Some(w) = asked.next() {
        if !placer.is_missing(w.region, w.page) {
            placer.wake(w.region, w.page);
            continue;
        }
        let f = Fetch {
            region: w.region as u32,
            first_page: w.page,
            pages: 1,
        };
        if let Err(e) = client.request(&f) {
            // Everything not answered is asked again on the next lane.
            waiting.extend(sent);
            waiting.push(w);
            waiting.extend(asked);
            return Err(FetchFailed::of(e));
        }
        sent.push(w);
    }
    let mut sent = sent.into_iter();
    while let Some(w) = sent.next() {
        let f = match client.answer(buf) {
            Ok(f) => f,
            Err(e) => {
                // Asked again on the next lane.
                waiting.push(w);
                waiting.extend(sent);
                return Err(FetchFailed::of(e));
            }
        };
        if (f.region as usize, f.first_page) != (w.region, w.page) {
            return Err(FetchFailed::Fatal(format!(
                "fetch lane: asked for page {} of region {}, got page {} of region {}",
                w.page, w.region, f.first_page, f.region
            )));
        }
        sink.place_as(w.region, w.page, 1, buf, Arrival::Fetched)
            .map_err(FetchFailed::Fatal)?;
        sink.data_landed_from(w.region, w.page, 1, buf);
        figures
            .latencies_us
            .push(w.since.elapsed().as_secs_f64() * 1e6);
    }
    Ok(())
}

/// Why a fetch failed.
enum FetchFailed {
    /// The connection broke: a reconnect brings a new one.
    Broken(String),
    /// The source broke the protocol, or a page could not be placed.
    Fatal(String),
}

impl FetchFailed {
    fn of(e: rmig_transport::LaneError) -> Self {
        match e {
            rmig_transport::LaneError::Malformed(m) => {
                FetchFailed::Fatal(format!("fetch lane: {m}"))
            }
            e => FetchFailed::Broken(format!("fetch lane: {e}")),
        }
    }
}

/// The median, 99th percentile and maximum of `v` (sorted here).
pub(crate) fn percentiles(v: &mut [f64]) -> (f64, f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99), v[v.len() - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_set() {
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentiles(&mut v), (51.0, 99.0, 100.0));
        assert_eq!(percentiles(&mut []), (0.0, 0.0, 0.0));
    }
}
