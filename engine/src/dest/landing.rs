//! Pre-copy landing without first-touch page faults, where destination memory was never
//! touched (a VMM's default: QEMU allocates guest RAM and lets the migration fault it in).
//!
//! Why: the first write to a page of fresh anonymous memory faults; the kernel allocates a
//! page, zeroes it, and only then does the copy into it go on. On the nested-virtualised
//! development host that first touch was most of a QEMU migration into memory that was not
//! preallocated (`-mem-prealloc` took 1.96 s off 2.66 s), and placing 835 MB in 1 MiB pieces
//! into fresh memory took 0.48-1.23 s by `memcpy` (4 KiB pages) against 0.23-0.24 s by
//! userfaultfd's `UFFDIO_COPY`, which allocates each page and fills it in one step: no fault,
//! no zeroing.
//!
//! How: when a session starts on TCP lanes, guest memory that is not resident (`mincore`) is
//! registered with a userfaultfd in missing-page mode. A run that lands on pages not here yet
//! is placed with `UFFDIO_COPY` from the lane's staging buffer; pages already here (resident
//! from the start, or sent again in a later round) are copied in as before, and a page that
//! turned up meanwhile (`EEXIST`) too. Whatever else touches a page still missing (the VMM,
//! or our own zero-page check) stops in the kernel until the fault thread here maps the zero
//! page there, which is what its first touch would have found. Registration ends with the
//! last pre-copy round: before the device state, before post-copy registers the memory for
//! itself, before the guest can run. Pages never sent read as zero after it, as before.
//!
//! This is only a faster way to write: any page it cannot place (a `UFFDIO_COPY` that fails
//! for any reason, registration already ended) is copied in the ordinary way, which is always
//! correct in pre-copy, where the lane that claimed a run is its pages' only writer. Over RDMA
//! there is nothing to do: registering memory with the NIC pins, and so faults in, all of it
//! at setup.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rmig_transport::stream_copy::copy_streaming;
use rmig_transport::{MemRegion, MemoryMap};
use userfaultfd::{Event, Uffd, UffdBuilder};

use super::placer::{is_eexist, locate, wait_readable};
use crate::bitmap::AtomicBitmap;
use crate::stats::LandingReport;

/// The page size this works in: `UFFDIO_COPY` on private anonymous memory places base pages.
const BASE_PAGE: usize = 4096;

/// How often the fault thread looks whether it should stop (it also wakes for every fault).
const STOP_POLL: Duration = Duration::from_millis(20);

/// Destination memory registered for landing with `UFFDIO_COPY`.
pub(crate) struct Landing {
    shared: Arc<Shared>,
    /// Whether memory is still registered.
    on: AtomicBool,
}

/// What the landing and its fault thread share.
struct Shared {
    uffd: Uffd,
    map: MemoryMap,
    /// Which regions are registered.
    registered: Vec<bool>,
    /// Pages that are here, per region: resident at the start, placed, copied in, or given
    /// the zero page on a fault since. A page not marked is missing (it reads as zero).
    present: Vec<AtomicBitmap>,
    /// Set when registration ended: the fault thread stops.
    stop: AtomicBool,
    /// Pages placed with `UFFDIO_COPY`.
    placed: AtomicU64,
    /// Pages touched before they landed, given the zero page by the fault thread.
    zero_filled: AtomicU64,
}

impl Landing {
    /// Registers every region of `map` with 4 KiB pages that is not all resident, and starts
    /// the fault thread. `Err` says why there is nothing to gain or why it could not be done;
    /// the destination then writes pages in place as before.
    pub fn start(map: &MemoryMap) -> Result<Landing, String> {
        let present: Vec<AtomicBitmap> = map.regions().iter().map(resident_pages).collect();
        let registered: Vec<bool> = map
            .regions()
            .iter()
            .zip(&present)
            .map(|(r, p)| r.page_size() == BASE_PAGE && p.count() < r.pages())
            .collect();
        if !registered.contains(&true) {
            return Err("every page is resident already (or not in 4 KiB pages)".into());
        }
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
            .map_err(|e| format!("no userfaultfd ({e}): root or vm.unprivileged_userfaultfd=1"))?;
        for (r, _) in map.regions().iter().zip(&registered).filter(|(_, on)| **on) {
            // A region that cannot be registered (file-backed memory, say) makes the whole
            // thing moot: closing `uffd` on return unregisters what was.
            uffd.register(r.as_ptr().cast(), r.len())
                .map_err(|e| format!("cannot register guest memory with userfaultfd: {e}"))?;
        }
        let shared = Arc::new(Shared {
            uffd,
            map: map.clone(),
            registered,
            present,
            stop: AtomicBool::new(false),
            placed: AtomicU64::new(0),
            zero_filled: AtomicU64::new(0),
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name("rmig-land-faults".into())
            .spawn(move || serve_faults(&s))
            .map_err(|e| format!("cannot start the fault thread: {e}"))?;
        Ok(Landing {
            shared,
            on: AtomicBool::new(true),
        })
    }

    /// Whether memory is still registered (runs should be handed to [`place`](Self::place)).
    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::Acquire)
    }

    /// Whether page `p` of `region` is known to be missing: never here, so it reads as zero.
    /// Only while registered (afterwards anyone may write any page unseen).
    pub fn is_missing(&self, region: usize, p: u64) -> bool {
        self.is_on() && self.shared.registered[region] && !self.shared.present[region].test(p)
    }

    /// Puts `bytes` (pages `first..first+n` of `region`, received into ordinary memory) into
    /// guest memory: pages still missing with `UFFDIO_COPY`, the rest with a copy. The caller
    /// is these pages' only writer (a lane holding their claim).
    pub fn place(&self, region: usize, first: u64, n: u64, bytes: &[u8]) {
        let s = &*self.shared;
        let r = s.map.get(region).expect("lane checked the region");
        assert_eq!(bytes.len() as u64, n * r.page_size() as u64, "whole pages");
        if !self.is_on() || !s.registered[region] || s.present[region].all_set(first, n) {
            // SAFETY: destination memory is writable (the region's contract) and the caller
            // is these pages' only writer (this function's contract).
            unsafe { copy_streaming(r.guest_pages(first, n), bytes) };
            s.present[region].set_range(first, n);
            return;
        }
        let ps = r.page_size() as u64;
        let mut p = first;
        while p < first + n {
            // The longest stretch from `p` whose pages are all here, or all missing.
            let here = s.present[region].test(p);
            let mut q = p + 1;
            while q < first + n && s.present[region].test(q) == here {
                q += 1;
            }
            let src = &bytes[((p - first) * ps) as usize..((q - first) * ps) as usize];
            if here {
                // SAFETY: as above.
                unsafe { copy_streaming(r.guest_pages(p, q - p), src) };
            } else {
                s.copy_missing(region, r, p, src);
            }
            p = q;
        }
    }

    /// Ends registration (idempotent): pages never placed read as zero from now on, and
    /// nobody waits for the fault thread any more, which then stops.
    pub fn end(&self) {
        if !self.on.swap(false, Ordering::AcqRel) {
            return;
        }
        let s = &*self.shared;
        let mut all = true;
        for (r, _) in s
            .map
            .regions()
            .iter()
            .zip(&s.registered)
            .filter(|(_, on)| **on)
        {
            all &= s.uffd.unregister(r.as_ptr().cast(), r.len()).is_ok();
        }
        // Memory that stayed registered still needs the fault thread: it then runs on until
        // the process ends rather than leave a thread stuck on a page.
        if all {
            s.stop.store(true, Ordering::Release);
        }
    }

    /// What the landing did so far.
    pub fn report(&self) -> LandingReport {
        LandingReport {
            method: "userfaultfd".into(),
            why_not: None,
            placed_pages: self.shared.placed.load(Ordering::Relaxed),
            zero_filled_pages: self.shared.zero_filled.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Landing {
    fn drop(&mut self) {
        self.end();
    }
}

impl Shared {
    /// Places the pages from `first` of `region` (`r`) that `src` holds, all missing when
    /// looked at: with `UFFDIO_COPY` as far as it goes; a page that turned up meanwhile, and all
    /// that is left after any other failure, with a copy.
    fn copy_missing(&self, region: usize, r: &MemRegion, first: u64, src: &[u8]) {
        let ps = r.page_size();
        let mut done = 0usize;
        while done < src.len() {
            let dst = r.guest_pages(first + (done / ps) as u64, ((src.len() - done) / ps) as u64);
            // SAFETY: `dst` lies inside a registered region; UFFDIO_COPY writes there only
            // where no page is present (whole pages, atomically), and the caller is these
            // pages' only writer; `src` is ordinary memory, only read.
            let r_copy = unsafe {
                self.uffd.copy(
                    src[done..].as_ptr().cast(),
                    dst.as_ptr().cast(),
                    dst.len(),
                    true,
                )
            };
            let placed = match r_copy {
                Ok(k) | Err(userfaultfd::Error::PartiallyCopied(k)) if k <= dst.len() => k - k % ps,
                _ => 0,
            };
            self.present[region].set_range(first + (done / ps) as u64, (placed / ps) as u64);
            self.placed
                .fetch_add((placed / ps) as u64, Ordering::Relaxed);
            done += placed;
            if placed > 0 {
                // All of it, or up to a page that is here: try again from there.
                continue;
            }
            // Nothing placed: the first page is here already (copy it over, then try again
            // after it), or the copy failed otherwise (copy in all that is left).
            let here =
                matches!(r_copy, Err(userfaultfd::Error::CopyFailed(e)) if is_eexist(e as i32));
            let copy_len = if here { ps } else { src.len() - done };
            let at = first + (done / ps) as u64;
            // SAFETY: destination memory is writable (the region's contract) and the caller is
            // these pages' only writer; a page still missing faults in as it would unregistered.
            unsafe {
                copy_streaming(
                    r.guest_pages(at, (copy_len / ps) as u64),
                    &src[done..done + copy_len],
                )
            };
            self.present[region].set_range(at, (copy_len / ps) as u64);
            done += copy_len;
        }
    }
}

/// The pages of `r` that are resident now.
fn resident_pages(r: &MemRegion) -> AtomicBitmap {
    let bits = AtomicBitmap::new(r.pages());
    if r.page_size() != BASE_PAGE {
        return bits;
    }
    let mut resident = vec![0u8; r.pages() as usize];
    // SAFETY: `resident` has one byte per base page of the region, which is mapped (the
    // region's contract); mincore only reads the page tables.
    let rc = unsafe { libc::mincore(r.as_ptr().cast(), r.len(), resident.as_mut_ptr()) };
    if rc != 0 {
        // Not known: take every page as here, so the region is left alone.
        bits.set_range(0, r.pages());
        return bits;
    }
    for (p, _) in resident.iter().enumerate().filter(|(_, b)| *b & 1 != 0) {
        bits.set(p as u64);
    }
    bits
}

/// The fault thread: gives every page touched before it landed the zero page (what its first
/// touch would have found), until registration ends.
fn serve_faults(s: &Shared) {
    while !s.stop.load(Ordering::Acquire) {
        if !wait_readable(s.uffd.as_raw_fd(), STOP_POLL.as_millis() as i32) {
            continue;
        }
        while let Ok(Some(ev)) = s.uffd.read_event() {
            let Event::Pagefault { addr, .. } = ev else {
                continue;
            };
            if let Some((region, page)) = locate(&s.map, addr as usize) {
                zero_fill(s, region, page);
            }
        }
    }
}

/// Maps the zero page at page `page` of `region` where it is missing, and wakes whoever
/// waits for it either way.
fn zero_fill(s: &Shared, region: usize, page: u64) {
    let r = s.map.get(region).expect("located");
    let at = r.guest_pages(page, 1).as_ptr();
    // SAFETY: one page inside a registered region; UFFDIO_ZEROPAGE maps the zero page only
    // where no page is present, so nothing written is lost. An error means the page was
    // placed meanwhile, or is no longer registered: either way it needs nothing more.
    if unsafe { s.uffd.zeropage(at.cast(), r.page_size(), false) }.is_ok() {
        s.zero_filled.fetch_add(1, Ordering::Relaxed);
    }
    s.present[region].set(page);
    // Woken only now, so that whoever touched the page resumes with it counted and known
    // present (a wake costs nothing if nobody waits, or if the placing already woke it).
    let _ = s.uffd.wake(at.cast(), r.page_size());
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::dest::testmem::{read_page, sink_over};
    use rmig_transport::PageSink;

    /// `pages` pages of fresh private anonymous memory, never touched but for the first
    /// `touched`.
    fn memory(pages: usize, touched: usize) -> MemoryMap {
        crate::dest::testmem::memory(pages, libc::MAP_PRIVATE, touched)
    }

    /// `n` pages, page `i` filled with `base + i`.
    fn pages(n: usize, base: u8) -> Vec<u8> {
        (0..n * BASE_PAGE)
            .map(|i| (i / BASE_PAGE) as u8 + base)
            .collect()
    }

    fn placed(l: &Landing) -> (u64, u64) {
        let r = l.report();
        (r.placed_pages, r.zero_filled_pages)
    }

    #[test]
    fn missing_pages_are_placed_and_pages_already_here_copied_over() {
        let map = memory(16, 2);
        let l = Landing::start(&map).expect("registered");
        assert!(
            !l.is_missing(0, 1) && l.is_missing(0, 2),
            "pages 0 and 1 were resident"
        );
        // Pages 0..6: 0 and 1 are here (copied over), 2..6 are missing (placed).
        l.place(0, 0, 6, &pages(6, 1));
        for p in 0..6 {
            assert_eq!(read_page(&map, p), vec![p as u8 + 1; BASE_PAGE], "page {p}");
        }
        assert_eq!(placed(&l), (4, 0));
        assert!(!l.is_missing(0, 5) && l.is_missing(0, 6));
        // Sent again in a later round: copied over, nothing placed.
        l.place(0, 3, 2, &pages(2, 40));
        assert_eq!(read_page(&map, 3), vec![40; BASE_PAGE]);
        assert_eq!(read_page(&map, 4), vec![41; BASE_PAGE]);
        assert_eq!(placed(&l), (4, 0));
        l.end();
        assert!(
            !l.is_on() && !l.is_missing(0, 9),
            "nothing is known once it ended"
        );
        // Never sent: zero, read without anyone serving the fault.
        assert_eq!(read_page(&map, 9), vec![0; BASE_PAGE]);
        // After the end a run is copied in.
        l.place(0, 10, 1, &pages(1, 7));
        assert_eq!(read_page(&map, 10), vec![7; BASE_PAGE]);
        assert_eq!(placed(&l), (4, 0));
    }

    #[test]
    fn a_page_touched_before_it_lands_reads_zero_then_takes_its_bytes() {
        let map = memory(8, 0);
        let l = Landing::start(&map).expect("registered");
        // Someone reads page 3 before it lands: the fault thread gives it the zero page.
        let m = map.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(read_page(&m, 3)));
        // Bounded: a fault thread that never served it would leave the reader blocked for good.
        let seen = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the fault thread served the touch");
        assert_eq!(seen, vec![0; BASE_PAGE]);
        assert_eq!(placed(&l), (0, 1));
        assert!(!l.is_missing(0, 3));
        // The run 2..5 lands around it: 2 placed, 3 copied over the zero page, 4 placed.
        l.place(0, 2, 3, &pages(3, 20));
        for p in 2..5 {
            assert_eq!(
                read_page(&map, p),
                vec![p as u8 + 18; BASE_PAGE],
                "page {p}"
            );
        }
        assert_eq!(placed(&l), (2, 1));
    }

    #[test]
    fn a_page_that_turned_up_unseen_is_copied_over() {
        let map = memory(8, 0);
        let l = Landing::start(&map).expect("registered");
        // Page 5 is made present behind the landing's back (its bitmap still says missing):
        // `UFFDIO_COPY` refuses it, and it is copied over instead.
        let r = map.get(0).unwrap();
        // SAFETY: one page of the test's own mapping, inside a registered region, where no
        // page is present.
        unsafe {
            l.shared
                .uffd
                .zeropage(r.guest_pages(5, 1).as_ptr().cast(), BASE_PAGE, true)
                .expect("zero page");
        }
        assert!(l.is_missing(0, 5));
        l.place(0, 4, 3, &pages(3, 30));
        for p in 4..7 {
            assert_eq!(
                read_page(&map, p),
                vec![p as u8 + 26; BASE_PAGE],
                "page {p}"
            );
        }
        assert_eq!(placed(&l), (2, 0));
    }

    #[test]
    fn memory_that_is_all_resident_is_left_alone() {
        let map = memory(8, 8);
        let why = Landing::start(&map).err().expect("nothing to register");
        assert!(why.contains("resident"), "{why}");
    }

    /// The destination's sink hands runs here while registered, and a zero run on pages never
    /// here marks them known zero without touching them (a read would fault, for nothing).
    #[test]
    fn the_sink_places_through_it_and_zero_runs_leave_missing_pages_untouched() {
        let map = memory(8, 0);
        let sink = sink_over(&map, false);
        assert!(!sink.places() && sink.landing_report().is_none());
        sink.start_landing(true);
        assert!(sink.places());
        sink.zero_pages(0, 0, 4);
        sink.place(0, 4, 2, &pages(2, 50)).expect("placed");
        let report = sink.landing_report().expect("chosen");
        assert_eq!(
            (report.method.as_str(), report.placed_pages),
            ("userfaultfd", 2)
        );
        assert_eq!(report.zero_filled_pages, 0, "no page was touched");
        sink.end_landing();
        assert!(!sink.places());
        assert_eq!(read_page(&map, 1), vec![0; BASE_PAGE]);
        assert_eq!(read_page(&map, 5), vec![51; BASE_PAGE]);
    }

    #[test]
    fn a_sink_told_not_to_says_why() {
        let map = memory(8, 0);
        let sink = sink_over(&map, false);
        sink.start_landing(false);
        assert!(!sink.places());
        let report = sink.landing_report().expect("chosen");
        assert_eq!(report.method, "copy");
        assert!(report.why_not.expect("why").contains("turned off"));
    }
}
