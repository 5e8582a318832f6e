//! Guest memory under userfaultfd on a post-copy destination: which pages are still missing,
//! and the only way pages get into place once the guest runs.
//!
//! At the switch the source names the pages that were dirty when it paused. We drop our stale
//! copies of them (`MADV_DONTNEED`, after which private anonymous memory reads as missing)
//! and register all guest memory with userfaultfd in missing-page mode, so that a guest
//! thread touching such a page stops in the kernel until we put the page in place. From then
//! on nothing writes guest memory directly: every page arrives with `UFFDIO_COPY`, which
//! places a whole page at once and wakes whoever waits for it, or refuses (`EEXIST`) when the
//! page is there already. Two arrivals of one page (the background lanes and a fault's fetch)
//! therefore cannot tear it or land it twice; both carry the source's final bytes.
//!
//! The fault reports are read here too ([`gather`]): a page still missing waits for a fetch
//! (the fault threads, `faults.rs` and `pull.rs`, do that); a page never written here and not
//! missing is zero on the source too (every other page was sent in pre-copy), so it gets
//! `UFFDIO_ZEROPAGE`; a page that landed meanwhile only needs a wake.
//!
//! If the source is lost after the switch, the pages it still held are lost with it. The
//! guest's faulting threads must then never be released onto a zero page (closing a
//! userfaultfd does exactly that), so a failed post-copy keeps the descriptor open for the
//! life of the process ([`Placer::keep_blocked`]) and the session ends in `guest-lost`.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rmig_transport::{MemRegion, MemoryMap};
use userfaultfd::{Event, Uffd, UffdBuilder};

use crate::bitmap::AtomicBitmap;
use crate::EngineError;

/// The page size post-copy works in: `UFFDIO_COPY` and `MADV_DONTNEED` on private anonymous
/// memory, in base pages.
const BASE_PAGE: usize = 4096;

/// Guest memory under userfaultfd, and which of its pages are still missing.
pub(crate) struct Placer {
    pub(super) uffd: Uffd,
    pub(super) map: MemoryMap,
    /// Pages dropped at the switch that have not landed since, per region.
    pub(super) missing: Vec<AtomicBitmap>,
    /// How many of them are left, with a condition to wait on until none is.
    left: Mutex<u64>,
    all_landed: Condvar,
    /// Pages at the switch.
    pub at_switch: u64,
    /// Pages that landed from the fetch lane (the guest touched them).
    pub on_fault: AtomicU64,
    /// Pages that landed from the background lanes.
    pub background: AtomicU64,
}

/// How a page arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// On the fetch lane, because the guest touched it.
    Fetched,
    /// On a data lane.
    Background,
}

fn uffd_error(what: &str, e: userfaultfd::Error) -> EngineError {
    EngineError::io(std::io::ErrorKind::Other, format!("post-copy: {what}: {e}"))
}

impl Placer {
    /// The switch: drops our copies of the source's `runs` (region, first page, pages),
    /// checks that they are really gone (memory that `MADV_DONTNEED` does not drop, such as
    /// shared memory, would keep serving stale pages), and registers every region with
    /// userfaultfd. Fails, before our guest runs, for memory post-copy cannot serve.
    pub fn switch(map: &MemoryMap, runs: &[(u32, u64, u64)]) -> Result<Placer, EngineError> {
        for r in map.regions() {
            if r.page_size() != BASE_PAGE {
                return Err(EngineError::Config(format!(
                    "post-copy needs {BASE_PAGE}-byte pages; a region has {}-byte pages",
                    r.page_size()
                )));
            }
        }
        let missing: Vec<AtomicBitmap> = map
            .regions()
            .iter()
            .map(|r| AtomicBitmap::new(r.pages()))
            .collect();
        let mut total = 0;
        // A region is one kind of memory: its first dropped run shows whether dropping works
        // (one `mincore` per region, not per run: in the pause, system calls are downtime).
        let mut checked = vec![false; missing.len()];
        for &(region, first, n) in runs {
            let r = map
                .get(region as usize)
                .filter(|r| r.contains(first, n))
                .ok_or_else(|| {
                    EngineError::Protocol(format!(
                        "PostcopyPages names {n} pages at {first} outside region {region}"
                    ))
                })?;
            let check = !std::mem::replace(&mut checked[region as usize], true);
            drop_pages(r, first, n, check)?;
            missing[region as usize].set_range(first, n);
            total += n;
        }
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
            .map_err(|e| {
                uffd_error(
                    "cannot create a userfaultfd (root or vm.unprivileged_userfaultfd=1 is needed)",
                    e,
                )
            })?;
        for r in map.regions() {
            uffd.register(r.as_ptr().cast(), r.len())
                .map_err(|e| uffd_error("cannot register guest memory", e))?;
        }
        Ok(Placer {
            uffd,
            map: map.clone(),
            missing,
            left: Mutex::new(total),
            all_landed: Condvar::new(),
            at_switch: total,
            on_fault: AtomicU64::new(0),
            background: AtomicU64::new(0),
        })
    }

    /// Whether page `p` of `region` is still missing.
    pub fn is_missing(&self, region: usize, p: u64) -> bool {
        self.missing[region].test(p)
    }

    /// Wakes whoever waits for page `p` of `region` (it is there already).
    pub fn wake(&self, region: usize, p: u64) {
        let r = self.map.get(region).expect("located");
        let _ = self
            .uffd
            .wake(r.guest_pages(p, 1).as_ptr().cast(), r.page_size());
    }

    /// Whether fault reports wait to be read ([`gather`]), waiting at most `ms` milliseconds.
    pub fn wait_reports(&self, ms: i32) -> bool {
        wait_readable(self.uffd.as_raw_fd(), ms)
    }

    /// Pages still missing.
    pub fn left(&self) -> u64 {
        *self.left.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts `bytes` (pages `first..first+n` of `region`) in place, page by page where some
    /// are there already; counts what it placed as `how`.
    pub fn place(
        &self,
        region: usize,
        first: u64,
        n: u64,
        bytes: &[u8],
        how: Arrival,
    ) -> Result<(), String> {
        let r = self.map.get(region).ok_or("unknown region")?;
        assert_eq!(bytes.len() as u64, n * r.page_size() as u64, "whole pages");
        let dst = r.guest_pages(first, n).as_ptr();
        // SAFETY: `dst..dst+len` lies inside a registered region (the lane checked the run);
        // UFFDIO_COPY writes there only where no page is present, atomically per page, so no
        // reader ever sees a partial page and nothing present is overwritten; `bytes` is
        // ordinary memory, only read.
        let whole = unsafe {
            self.uffd
                .copy(bytes.as_ptr().cast(), dst.cast(), bytes.len(), true)
        };
        if whole.is_ok() {
            self.landed(region, first, n, how);
            return Ok(());
        }
        let ps = r.page_size();
        for i in 0..n {
            let src = &bytes[i as usize * ps..(i as usize + 1) * ps];
            let d = r.guest_pages(first + i, 1).as_ptr();
            // SAFETY: as above, for one page of the run.
            match unsafe { self.uffd.copy(src.as_ptr().cast(), d.cast(), ps, true) } {
                Ok(_) => self.landed(region, first + i, 1, how),
                // There already: placed by the other arrival (or by the whole-run attempt,
                // which reports no partial count), with the same final bytes.
                Err(userfaultfd::Error::CopyFailed(e)) if is_eexist(e as i32) => {
                    self.landed(region, first + i, 1, how)
                }
                Err(e) => return Err(format!("UFFDIO_COPY failed: {e}")),
            }
        }
        Ok(())
    }

    /// The source says pages `first..first+n` of `region` are zero: maps the zero page where
    /// they are missing.
    pub fn zero(&self, region: usize, first: u64, n: u64, how: Arrival) -> Result<(), String> {
        let r = self.map.get(region).ok_or("unknown region")?;
        for p in first..first + n {
            self.zero_page(r, p)?;
            if self.missing[region].test(p) {
                self.landed(region, p, 1, how);
            }
        }
        Ok(())
    }

    fn zero_page(&self, r: &MemRegion, p: u64) -> Result<(), String> {
        let d = r.guest_pages(p, 1).as_ptr();
        // SAFETY: one page inside a registered region; UFFDIO_ZEROPAGE maps the zero page
        // only where no page is present.
        match unsafe { self.uffd.zeropage(d.cast(), r.page_size(), true) } {
            Ok(_) => Ok(()),
            Err(userfaultfd::Error::ZeropageFailed(e)) if is_eexist(e as i32) => Ok(()),
            Err(e) => Err(format!("UFFDIO_ZEROPAGE failed: {e}")),
        }
    }

    /// Marks pages landed (only those still missing count).
    fn landed(&self, region: usize, first: u64, n: u64, how: Arrival) {
        let m = &self.missing[region];
        let mut newly = 0;
        for p in first..first + n {
            if m.test(p) {
                m.clear(p);
                newly += 1;
            }
        }
        if newly == 0 {
            return;
        }
        match how {
            Arrival::Fetched => &self.on_fault,
            Arrival::Background => &self.background,
        }
        .fetch_add(newly, Ordering::Relaxed);
        let mut left = self.left.lock().unwrap_or_else(|e| e.into_inner());
        *left = left.saturating_sub(newly);
        self.all_landed.notify_all();
    }

    /// Waits until every missing page has landed, as long as pages keep landing: returns
    /// the pages left once none landed for `idle` (0 when all are here).
    pub fn wait_all_landed(&self, idle: Duration) -> u64 {
        let mut left = self.left.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let before = *left;
            if before == 0 {
                return 0;
            }
            let (l, _) = self
                .all_landed
                .wait_timeout_while(left, idle, |l| *l == before)
                .unwrap_or_else(|e| e.into_inner());
            left = l;
            if *left == before {
                return before;
            }
        }
    }

    /// Keeps the userfaultfd open for the life of the process: after a failed post-copy the
    /// guest's threads that touch a missing page must stay blocked, and closing the
    /// descriptor would let them run on zero pages instead.
    pub fn keep_blocked(self: &Arc<Self>) {
        std::mem::forget(self.clone());
    }
}

/// Where an address in `map` (a fault's) is: (region, page).
pub(super) fn locate(map: &MemoryMap, addr: usize) -> Option<(usize, u64)> {
    map.regions().iter().enumerate().find_map(|(i, r)| {
        let start = r.as_ptr() as usize;
        (addr >= start && addr < start + r.len())
            .then(|| (i, ((addr - start) / r.page_size()) as u64))
    })
}

pub(super) fn is_eexist(errno: i32) -> bool {
    errno == libc::EEXIST
}

/// Drops pages `first..first+n` of `r` and, with `check`, checks that they are gone.
fn drop_pages(r: &MemRegion, first: u64, n: u64, check: bool) -> Result<(), EngineError> {
    let g = r.guest_pages(first, n);
    // SAFETY: the range is inside the region, page aligned; our guest is paused and no round
    // is open, so nobody reads or writes it; afterwards it reads as missing (or zero).
    let rc = unsafe { libc::madvise(g.as_ptr().cast(), g.len(), libc::MADV_DONTNEED) };
    if rc != 0 {
        return Err(EngineError::io(
            std::io::Error::last_os_error().kind(),
            format!(
                "post-copy: madvise(MADV_DONTNEED): {}",
                std::io::Error::last_os_error()
            ),
        ));
    }
    if !check {
        return Ok(());
    }
    let mut resident = vec![0u8; n as usize];
    // SAFETY: `resident` has one byte per page of the range, which is mapped.
    let rc = unsafe { libc::mincore(g.as_ptr().cast(), g.len(), resident.as_mut_ptr()) };
    if rc == 0 && resident.iter().any(|b| b & 1 != 0) {
        return Err(EngineError::Config(
            "post-copy needs private anonymous destination memory: dropped pages stayed \
             resident (shared or file-backed memory keeps them)"
                .into(),
        ));
    }
    Ok(())
}

/// What the fault thread measured.
#[derive(Debug, Default, Clone)]
pub(crate) struct FaultFigures {
    /// Faults on missing pages that waited for a fetch, with their latencies (µs).
    pub latencies_us: Vec<f64>,
    /// Why the fetch lane ended, if it failed.
    pub error: Option<String>,
}

/// One fault waiting for its page.
pub(super) struct Waiting {
    pub region: usize,
    pub page: u64,
    pub since: Instant,
}

/// Whether `fd` became readable within `ms` milliseconds.
pub(super) fn wait_readable(fd: i32, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, for the duration of the call.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    n > 0 && p.revents & libc::POLLIN != 0
}

/// Reads every fault report queued: resolves at once what needs no fetch, and adds the rest
/// to `waiting` (one entry per page).
pub(super) fn gather(placer: &Placer, waiting: &mut Vec<Waiting>) -> Result<(), String> {
    loop {
        let ev = match placer.uffd.read_event() {
            Ok(Some(ev)) => ev,
            Ok(None) => return Ok(()),
            Err(e) => return Err(format!("reading fault reports: {e}")),
        };
        let Event::Pagefault { addr, .. } = ev else {
            continue;
        };
        let Some((region, page)) = locate(&placer.map, addr as usize) else {
            continue;
        };
        if placer.is_missing(region, page) {
            if !waiting.iter().any(|w| w.region == region && w.page == page) {
                waiting.push(Waiting {
                    region,
                    page,
                    since: Instant::now(),
                });
            }
            continue;
        }
        let r = placer.map.get(region).expect("located");
        // Not dropped at the switch: either it landed meanwhile (a wake is enough) or it was
        // never written here, which means zero on the source too.
        placer.zero_page(r, page)?;
        placer.wake(region, page);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::dest::testmem::{read_page, sink_over};

    /// `pages` pages of fresh memory (`flags`: private or shared), all filled with 0xa5.
    fn memory(pages: usize, flags: i32) -> MemoryMap {
        crate::dest::testmem::memory(pages, flags, pages)
    }

    #[test]
    fn dropped_pages_wait_for_their_bytes_and_land_once() {
        let map = memory(16, libc::MAP_PRIVATE);
        let placer = Arc::new(Placer::switch(&map, &[(0, 4, 3)]).expect("switch"));
        assert_eq!((placer.at_switch, placer.left()), (3, 3));
        assert!(placer.is_missing(0, 5) && !placer.is_missing(0, 3));
        // Page 3 was not dropped: it keeps its bytes and never waits.
        assert_eq!(read_page(&map, 3), vec![0xa5; BASE_PAGE]);
        // A reader of page 5 waits until the page is placed, then sees the placed bytes.
        let (m, started) = (map.clone(), Instant::now());
        let reader = std::thread::spawn(move || (read_page(&m, 5), started.elapsed()));
        std::thread::sleep(Duration::from_millis(100));
        let bytes: Vec<u8> = (0..3 * BASE_PAGE)
            .map(|i| (i / BASE_PAGE) as u8 + 1)
            .collect();
        placer
            .place(0, 4, 3, &bytes, Arrival::Background)
            .expect("place");
        let (seen, waited) = reader.join().unwrap();
        assert_eq!(seen, vec![2u8; BASE_PAGE]);
        assert!(
            waited >= Duration::from_millis(100),
            "the reader waited: {waited:?}"
        );
        // A second arrival of a page changes nothing and counts nothing.
        placer
            .place(0, 5, 1, &[9u8; BASE_PAGE], Arrival::Fetched)
            .expect("again");
        assert_eq!(read_page(&map, 5), vec![2u8; BASE_PAGE]);
        assert_eq!(placer.background.load(Ordering::Relaxed), 3);
        assert_eq!(placer.on_fault.load(Ordering::Relaxed), 0);
        assert_eq!(placer.wait_all_landed(Duration::from_millis(10)), 0);
    }

    #[test]
    fn a_run_around_a_page_that_arrived_first_lands_page_by_page() {
        let map = memory(16, libc::MAP_PRIVATE);
        let placer = Placer::switch(&map, &[(0, 4, 4)]).expect("switch");
        // Page 5 came on a fault first.
        placer
            .place(0, 5, 1, &[7u8; BASE_PAGE], Arrival::Fetched)
            .expect("fetched");
        // Then the background run 4..8: the whole-run copy stops at page 5, so every other
        // page is placed on its own, each with its own bytes.
        let run: Vec<u8> = (0..4 * BASE_PAGE)
            .map(|i| (i / BASE_PAGE) as u8 + 10)
            .collect();
        placer
            .place(0, 4, 4, &run, Arrival::Background)
            .expect("run");
        assert_eq!(read_page(&map, 4), vec![10u8; BASE_PAGE]);
        assert_eq!(
            read_page(&map, 5),
            vec![7u8; BASE_PAGE],
            "the first arrival stays"
        );
        assert_eq!(read_page(&map, 6), vec![12u8; BASE_PAGE]);
        assert_eq!(read_page(&map, 7), vec![13u8; BASE_PAGE]);
        assert_eq!(
            read_page(&map, 8),
            vec![0xa5; BASE_PAGE],
            "not dropped, not touched"
        );
        assert_eq!(placer.on_fault.load(Ordering::Relaxed), 1);
        assert_eq!(placer.background.load(Ordering::Relaxed), 3);
        assert_eq!(placer.left(), 0);
    }

    /// Placing the last missing page lets the session's end compare digests, so each page's
    /// hash must be recorded by the placing itself (before it counts as landed), whoever
    /// places it: a fault thread, a lane, or a zero run.
    #[test]
    fn placing_through_the_sink_records_the_hashes_of_what_it_placed() {
        use crate::verify::{hash_page, RegionHashes};
        let map = memory(8, libc::MAP_PRIVATE);
        let sink = sink_over(&map, true);
        let placer = Arc::new(Placer::switch(&map, &[(0, 2, 2), (0, 6, 1)]).expect("switch"));
        let _ = sink.placer.set(placer.clone());
        let run: Vec<u8> = (0..2 * BASE_PAGE)
            .map(|i| (i / BASE_PAGE) as u8 + 3)
            .collect();
        sink.place_as(0, 2, 2, &run, Arrival::Fetched)
            .expect("placed");
        rmig_transport::PageSink::zero_pages(&sink, 0, 6, 1);
        assert_eq!(placer.left(), 0);
        let expected = RegionHashes::new(8, BASE_PAGE as u64);
        expected.set(2, hash_page(&run[..BASE_PAGE]));
        expected.set(3, hash_page(&run[BASE_PAGE..]));
        let ours = &sink.hashes.as_ref().expect("verifying")[0];
        assert_eq!(ours.chunk_digest(0), expected.chunk_digest(0));
        assert_eq!(read_page(&map, 3), vec![4u8; BASE_PAGE]);
        assert_eq!(read_page(&map, 6), vec![0u8; BASE_PAGE]);
    }

    #[test]
    fn zero_runs_and_the_wait_for_the_rest() {
        let map = memory(8, libc::MAP_PRIVATE);
        let placer = Placer::switch(&map, &[(0, 0, 2), (0, 6, 2)]).expect("switch");
        placer.zero(0, 0, 2, Arrival::Background).expect("zero");
        assert_eq!(read_page(&map, 1), vec![0u8; BASE_PAGE]);
        // Two pages never arrive: the wait gives up once nothing lands, and says how many.
        assert_eq!(placer.wait_all_landed(Duration::from_millis(50)), 2);
    }

    #[test]
    fn runs_outside_the_regions_and_shared_memory_are_refused() {
        let map = memory(8, libc::MAP_PRIVATE);
        for runs in [[(0u32, 7u64, 2u64)], [(1, 0, 1)], [(0, u64::MAX, 1)]] {
            let e = Placer::switch(&map, &runs).err().expect("refused");
            assert!(e.to_string().contains("outside region"), "{e}");
        }
        let shared = memory(8, libc::MAP_SHARED);
        let e = Placer::switch(&shared, &[(0, 0, 1)])
            .err()
            .expect("refused");
        assert!(e.to_string().contains("private anonymous"), "{e}");
        assert_eq!(
            read_page(&shared, 0),
            vec![0xa5; BASE_PAGE],
            "left as it was"
        );
    }
}
