//! The destination side of post-copy over RDMA: fetching source pages with one-sided READs.
//!
//! After the switch the guest runs here while some of its pages are still only on the source.
//! A fault on such a page must be served quickly and without the source's CPU, so the
//! destination reads the page itself: [`RdmaPageReader`] connects an RC queue pair to the
//! source's exposure (`exposure.rs`) over a lane socket, learns the source's region table, and
//! posts RDMA READs from the source's registered memory into its own landing buffer. The
//! engine then installs the landed bytes (`UFFDIO_COPY`) and hashes them.
//!
//! Two ways to use it, on one queue pair:
//! - background pulls: [`post`](RdmaPageReader::post) into any of the reader's slots, several
//!   READs in flight, and [`poll`](RdmaPageReader::poll) / [`wait`](RdmaPageReader::wait) for
//!   the slots that finished;
//! - the fault path: [`read`](RdmaPageReader::read) posts into a slot of its own (never handed
//!   out, so a fault never waits for a free slot) and blocks until that READ completes.
//!
//! The landing buffer is written by the NIC, so it is not ordinary memory: a slot's bytes are
//! only handed out as `&[u8]` once the READ's completion has been taken from the completion
//! queue (the NIC is done with them) and only for as long as the reader is borrowed shared,
//! while reposting a slot needs the reader borrowed exclusively: the borrow checker ends every
//! view of a slot's bytes before the NIC may write them again.
//!
//! Every request is checked against the source's region table before it is posted: a READ
//! outside a region would fail at the source's NIC and break the queue pair for every read
//! after it. Every READ has a deadline ([`ReaderConfig::timeout`]); a READ that fails (its
//! completion's status: a wrong key, a source that is gone and so retries exceeded, or a
//! flush after an earlier error) or misses its deadline breaks the reader, which then refuses
//! everything with the first error's text: the queue pair cannot recover, and a new reader is
//! the way on.

use std::collections::VecDeque;
use std::net::TcpStream;
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::queue_pair::{
    PostSendGuard, QueuePair, SetScatterGatherEntry, WorkRequestFlags,
};
use sideway::ibverbs::AccessFlags;

use super::memory::register_with;
use super::queue::{Completion, QpEndpoint, Queue};
use super::read_wire::{self, ExposedRegion, ReadSetup};
use super::{RdmaDevice, RdmaError};

/// Sizes and deadlines of a reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReaderConfig {
    /// Slots for [`RdmaPageReader::post`] (the fault path's own slot comes on top).
    pub slots: usize,
    /// Bytes of one slot: the largest read (a multiple of 4096).
    pub slot_bytes: usize,
    /// Longest a READ may take before the reader gives up on it (and breaks).
    pub timeout: Duration,
    /// How long a wait polls the completion queue before it sleeps on the completion channel:
    /// spinning is what makes a single READ fast on a real NIC, sleeping leaves the CPU to the
    /// guest (and to soft-RoCE, which is the CPU).
    pub spin: Duration,
}

impl Default for ReaderConfig {
    /// 32 slots of 64 KiB, 10 s per READ, 20 µs of spinning.
    fn default() -> Self {
        ReaderConfig {
            slots: 32,
            slot_bytes: 64 << 10,
            timeout: Duration::from_secs(10),
            spin: Duration::from_micros(20),
        }
    }
}

/// Why a read could not be posted or did not land.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The request is outside the source's region table or larger than a slot; nothing was
    /// posted.
    #[error("read of {npages} pages at page {first_page} of region {region} refused: {why}")]
    OutOfRange {
        /// Region asked for.
        region: u32,
        /// First page asked for.
        first_page: u64,
        /// Pages asked for.
        npages: u32,
        /// What does not fit.
        why: String,
    },
    /// The slot does not exist or its READ is still in flight; nothing was posted.
    #[error("slot {slot}: {why}")]
    Slot {
        /// The slot.
        slot: usize,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A READ's completion came back with an error status.
    #[error("RDMA READ into slot {slot} failed: {name} (status {status})")]
    Completion {
        /// The slot whose READ failed.
        slot: usize,
        /// The completion's `ibv_wc_status`.
        status: u32,
        /// The status as verbs names it, e.g. "transport retry counter exceeded".
        name: String,
    },
    /// A READ did not complete within [`ReaderConfig::timeout`].
    #[error("RDMA READ into slot {slot} did not complete within {after:?}")]
    Timeout {
        /// The slot.
        slot: usize,
        /// The deadline it missed.
        after: Duration,
    },
    /// A verbs call failed (posting, arming the completion queue).
    #[error("{0}")]
    Verbs(String),
    /// The reader broke earlier (the first error's text); it refuses everything now.
    #[error("the reader is broken: {0}")]
    Broken(String),
}

impl ReadError {
    /// The `ibv_wc_status` of a failed completion, if that is what this is.
    pub fn status(&self) -> Option<u32> {
        match self {
            ReadError::Completion { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// What a slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Never posted.
    Free,
    /// A READ of `len` bytes is in flight (the NIC may write the slot), posted at `since`.
    Posted { len: usize, since: Instant },
    /// The READ's completion was taken: `len` bytes landed, and nothing writes them.
    Landed { len: usize },
}

/// The landing buffer: anonymous memory the NIC writes, never seen as a Rust reference except
/// a landed slot (see [`RdmaPageReader::bytes`]).
struct Landing {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned by the reader and reached only through it.
unsafe impl Send for Landing {}

impl Landing {
    fn new(len: usize) -> Result<Landing, RdmaError> {
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(RdmaError::verbs(
                format!("mmap of a {len}-byte landing buffer"),
                std::io::Error::last_os_error(),
            ));
        }
        let ptr = NonNull::new(p.cast()).expect("mmap returned a non-null address");
        Ok(Landing { ptr, len })
    }
}

impl Drop for Landing {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours; the registration over it and the queue pair that
        // wrote it were dropped before (field order of `RdmaPageReader`).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Checks a request against the source's regions and the slot size: the remote address, key
/// and byte length of the READ it becomes, or why it is refused.
fn plan(
    regions: &[ExposedRegion],
    slot_bytes: usize,
    region: u32,
    first_page: u64,
    npages: u32,
) -> Result<(u64, u32, usize), ReadError> {
    let refuse = |why: String| ReadError::OutOfRange {
        region,
        first_page,
        npages,
        why,
    };
    let r = regions
        .get(region as usize)
        .ok_or_else(|| refuse(format!("the source has {} regions", regions.len())))?;
    if npages == 0 {
        return Err(refuse("no pages".into()));
    }
    let end = first_page.checked_add(npages as u64);
    if end.is_none_or(|e| e > r.pages()) {
        return Err(refuse(format!("the region has {} pages", r.pages())));
    }
    let len = npages as u64 * r.page_size as u64;
    if len > slot_bytes as u64 {
        return Err(refuse(format!(
            "{len} bytes exceed a slot of {slot_bytes} bytes"
        )));
    }
    // first_page + npages <= pages, so the offset is inside the region and addr + len cannot
    // overflow (the table was checked when decoded).
    Ok((
        r.addr + first_page * r.page_size as u64,
        r.rkey,
        len as usize,
    ))
}

/// Reads source pages with RDMA READs into its own landing buffer.
pub struct RdmaPageReader {
    // Dropped in this order: the queue pair (the NIC stops writing), the registration, then
    // the landing buffer itself.
    queue: Queue,
    landing_mr: Arc<MemoryRegion>,
    landing: Landing,
    cfg: ReaderConfig,
    regions: Vec<ExposedRegion>,
    depth: u8,
    /// `cfg.slots` slots for `post`, then the fault path's own.
    slots: Vec<Slot>,
    /// Landed slots not yet returned by `poll`/`wait`.
    ready: VecDeque<usize>,
    posted: u64,
    broken: Option<String>,
    comps: Vec<Completion>,
}

impl std::fmt::Debug for RdmaPageReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaPageReader")
            .field("cfg", &self.cfg)
            .field("regions", &self.regions.len())
            .field("depth", &self.depth)
            .field("posted", &self.posted)
            .field("broken", &self.broken)
            .finish()
    }
}

/// Sends `connect` on `ch` (`sock` itself or its TLS session) and reads the source's ACCEPT
/// within `wait`: its queue pair, the READs it answers at once, its regions.
fn ask(
    sock: &TcpStream,
    ch: &mut (impl std::io::Read + std::io::Write),
    connect: &ReadSetup,
    wait: Duration,
) -> Result<(QpEndpoint, u8, Vec<ExposedRegion>), RdmaError> {
    read_wire::write_frame(ch, connect)?;
    match read_wire::read_frame(sock, ch, wait)? {
        ReadSetup::Accept(e, depth, regions) => Ok((e, depth, regions)),
        ReadSetup::Refuse(why) => Err(RdmaError::Setup(format!("source: {why}"))),
        other => Err(RdmaError::Setup(format!(
            "expected ACCEPT, got {}",
            other.name()
        ))),
    }
}

impl RdmaPageReader {
    /// Connects to the source's exposure over `sock` (a lane socket the engine has
    /// authenticated; `exposure::serve_reader` answers on the other end): registers the landing
    /// buffer, sends CONNECT and connects to the ACCEPT that comes within `wait`. The frames go
    /// inside the lane's TLS session `tls` when the session is encrypted (the ACCEPT carries
    /// the source's memory keys). A REFUSE is returned as an error with the source's reason.
    pub fn connect(
        sock: &TcpStream,
        tls: Option<&mut rustls::ServerConnection>,
        dev: &Arc<RdmaDevice>,
        cfg: ReaderConfig,
        wait: Duration,
    ) -> Result<RdmaPageReader, RdmaError> {
        let nslots = cfg
            .slots
            .checked_add(1)
            .filter(|&n| cfg.slots > 0 && n <= dev.max_qp_wr as usize);
        let Some(nslots) = nslots else {
            return Err(RdmaError::Setup(format!(
                "{} reader slots: between 1 and {} on this device",
                cfg.slots,
                dev.max_qp_wr.saturating_sub(1)
            )));
        };
        if cfg.slot_bytes == 0 || !cfg.slot_bytes.is_multiple_of(4096) || cfg.slot_bytes > 1 << 30 {
            return Err(RdmaError::Setup(format!(
                "a reader slot of {} bytes: a multiple of 4096, at most 1 GiB",
                cfg.slot_bytes
            )));
        }
        let bytes = nslots
            .checked_mul(cfg.slot_bytes)
            .ok_or_else(|| RdmaError::Setup("reader landing buffer size overflows".into()))?;
        let landing = Landing::new(bytes)?;
        let landing_mr = register_with(dev, landing.ptr.as_ptr(), bytes, AccessFlags::LocalWrite)?;
        let mut queue =
            Queue::with_access(dev.clone(), nslots as u32, 1, true, AccessFlags::LocalWrite)?;
        let want = dev
            .max_init_rd_atom
            .min(u8::try_from(nslots).unwrap_or(u8::MAX))
            .max(1);
        let connect = ReadSetup::Connect(queue.endpoint(), want);
        let (peer, granted, regions) =
            super::on_setup_channel(sock, tls, |mut ch| ask(sock, &mut ch, &connect, wait))?;
        if granted == 0 {
            return Err(RdmaError::Setup(
                "the source answers no READs (depth 0)".into(),
            ));
        }
        let depth = want.min(granted);
        queue.set_reads(depth, 0);
        // 6, not 7: soft-RoCE retries for ever at 7, and a source that is gone must fail a
        // READ (after 7 tries of about 67 ms, the queue pair's timeout) rather than hang it.
        queue.set_retries(6);
        queue.connect(&peer)?;
        Ok(RdmaPageReader {
            queue,
            landing_mr,
            landing,
            cfg,
            regions,
            depth,
            slots: vec![Slot::Free; nslots],
            ready: VecDeque::new(),
            posted: 0,
            broken: None,
            comps: Vec::new(),
        })
    }

    /// The source's regions, as its exposure described them.
    pub fn regions(&self) -> &[ExposedRegion] {
        &self.regions
    }

    /// READs the queue pair keeps outstanding at most (the rest wait in its send queue).
    pub fn depth(&self) -> u8 {
        self.depth
    }

    /// The configuration.
    pub fn config(&self) -> &ReaderConfig {
        &self.cfg
    }

    /// Changes how long waits spin before they sleep ([`ReaderConfig::spin`]).
    pub fn set_spin(&mut self, spin: Duration) {
        self.cfg.spin = spin;
    }

    /// READs posted so far (requests refused before posting are not counted).
    pub fn posted(&self) -> u64 {
        self.posted
    }

    /// Posts a READ of `npages` pages from page `first_page` of the source's region `region`
    /// into `slot` (below [`ReaderConfig::slots`]). The slot must not have a READ in flight;
    /// its earlier bytes are gone once this returns. Refused without posting when the request
    /// is outside the region table or larger than a slot.
    pub fn post(
        &mut self,
        slot: usize,
        region: u32,
        first_page: u64,
        npages: u32,
    ) -> Result<(), ReadError> {
        self.usable()?;
        if slot >= self.cfg.slots {
            return Err(ReadError::Slot {
                slot,
                why: "no such slot",
            });
        }
        if matches!(self.slots[slot], Slot::Posted { .. }) {
            return Err(ReadError::Slot {
                slot,
                why: "its READ is still in flight",
            });
        }
        let (addr, rkey, len) = plan(
            &self.regions,
            self.cfg.slot_bytes,
            region,
            first_page,
            npages,
        )?;
        self.ready.retain(|&s| s != slot);
        self.post_read(slot, addr, rkey, len)
    }

    /// The slots whose READs have landed since the last call (without waiting).
    pub fn poll(&mut self) -> Result<Vec<usize>, ReadError> {
        self.usable()?;
        self.reap()?;
        self.overdue()?;
        Ok(self.ready.drain(..).collect())
    }

    /// As [`poll`](Self::poll), but waits up to `timeout` for at least one slot to land
    /// (returns at once when none is in flight; an empty list when the time passed).
    pub fn wait(&mut self, timeout: Duration) -> Result<Vec<usize>, ReadError> {
        self.usable()?;
        let deadline = Instant::now() + timeout;
        let fault_slot = self.cfg.slots;
        self.wait_until(deadline, |s| {
            !s.ready.is_empty()
                || !s.slots[..fault_slot]
                    .iter()
                    .any(|x| matches!(x, Slot::Posted { .. }))
        })?;
        Ok(self.ready.drain(..).collect())
    }

    /// The bytes that landed in `slot` (`None` unless its READ has completed). The borrow
    /// ends before the slot can be posted again.
    pub fn bytes(&self, slot: usize) -> Option<&[u8]> {
        match self.slots.get(slot)? {
            Slot::Landed { len } => {
                // SAFETY: the slot is inside the landing mapping, which lives as long as
                // `self`. Its READ's completion has been taken, so the NIC has placed its bytes
                // and writes this slot no more until it is posted again, which needs
                // `&mut self` and so cannot happen while this shared borrow lives; nothing
                // else writes the landing buffer.
                Some(unsafe { std::slice::from_raw_parts(self.slot_ptr(slot), *len) })
            }
            _ => None,
        }
    }

    /// Reads `npages` pages from page `first_page` of region `region` and returns them: the
    /// fault path. Uses a slot of its own, so it never waits for a background slot; READs of
    /// other slots that land meanwhile are kept for the next [`poll`](Self::poll). Fails after
    /// [`ReaderConfig::timeout`].
    pub fn read(&mut self, region: u32, first_page: u64, npages: u32) -> Result<&[u8], ReadError> {
        self.usable()?;
        let slot = self.cfg.slots;
        let (addr, rkey, len) = plan(
            &self.regions,
            self.cfg.slot_bytes,
            region,
            first_page,
            npages,
        )?;
        self.post_read(slot, addr, rkey, len)?;
        let deadline = Instant::now() + self.cfg.timeout;
        self.wait_until(deadline, |s| matches!(s.slots[slot], Slot::Landed { .. }))?;
        if !matches!(self.slots[slot], Slot::Landed { .. }) {
            return Err(self.fail(ReadError::Timeout {
                slot,
                after: self.cfg.timeout,
            }));
        }
        Ok(self.bytes(slot).expect("the slot has landed"))
    }

    fn slot_ptr(&self, slot: usize) -> *mut u8 {
        // SAFETY: slot < slots.len(), so the offset is inside the landing mapping.
        unsafe { self.landing.ptr.as_ptr().add(slot * self.cfg.slot_bytes) }
    }

    fn usable(&self) -> Result<(), ReadError> {
        match &self.broken {
            Some(why) => Err(ReadError::Broken(why.clone())),
            None => Ok(()),
        }
    }

    /// Breaks the reader with `e` (the first error is the one kept) and returns `e`.
    fn fail(&mut self, e: ReadError) -> ReadError {
        self.broken.get_or_insert_with(|| e.to_string());
        e
    }

    /// Posts one signalled READ of `len` bytes at `addr` (`rkey`) into `slot`.
    fn post_read(
        &mut self,
        slot: usize,
        addr: u64,
        rkey: u32,
        len: usize,
    ) -> Result<(), ReadError> {
        let local = self.slot_ptr(slot) as u64;
        let lkey = self.landing_mr.lkey();
        let mut guard = self.queue.qp.start_post_send();
        let h = guard
            .construct_wr(slot as u64 + 1, WorkRequestFlags::Signaled)
            .setup_read(rkey, addr);
        // SAFETY: the entry is `len` bytes (at most a slot) of slot `slot` in the registered
        // landing buffer, which outlives the queue pair; the slot has no READ in flight and is
        // handed out again only after this READ's completion is taken.
        unsafe { h.setup_sge(lkey, local, len as u32) };
        if let Err(e) = guard.post() {
            return Err(ReadError::Verbs(format!(
                "ibv_post_send of an RDMA READ: {e}"
            )));
        }
        self.slots[slot] = Slot::Posted {
            len,
            since: Instant::now(),
        };
        self.posted += 1;
        Ok(())
    }

    /// Takes in what completed, without waiting.
    fn reap(&mut self) -> Result<(), ReadError> {
        let mut comps = std::mem::take(&mut self.comps);
        comps.clear();
        self.queue.poll(&mut comps);
        let r = self.take(&comps);
        self.comps = comps;
        r
    }

    /// Marks the slots of `comps` landed; the first failed one breaks the reader.
    fn take(&mut self, comps: &[Completion]) -> Result<(), ReadError> {
        for c in comps {
            let slot = (c.wr_id as usize).wrapping_sub(1);
            let Some(Slot::Posted { len, .. }) = self.slots.get(slot).copied() else {
                continue;
            };
            if !c.ok() {
                // The NIC may have written part of the slot: its bytes are never handed out.
                self.slots[slot] = Slot::Free;
                return Err(self.fail(ReadError::Completion {
                    slot,
                    status: c.status,
                    name: c.status_name(),
                }));
            }
            self.slots[slot] = Slot::Landed { len };
            if slot < self.cfg.slots {
                self.ready.push_back(slot);
            }
        }
        Ok(())
    }

    /// Fails (and breaks the reader) when a READ in flight has passed its deadline.
    fn overdue(&mut self) -> Result<(), ReadError> {
        let now = Instant::now();
        let late = self.slots.iter().position(|s| {
            matches!(s, Slot::Posted { since, .. } if now.duration_since(*since) > self.cfg.timeout)
        });
        match late {
            Some(slot) => Err(self.fail(ReadError::Timeout {
                slot,
                after: self.cfg.timeout,
            })),
            None => Ok(()),
        }
    }

    /// Takes in completions until `done` holds or `deadline` passes (then `Ok` too: the caller
    /// looks at what it waited for). Spins for [`ReaderConfig::spin`], then sleeps on the
    /// completion channel. Fails on a failed completion or a READ past its own deadline.
    fn wait_until(
        &mut self,
        deadline: Instant,
        done: impl Fn(&Self) -> bool,
    ) -> Result<(), ReadError> {
        let spin_until = Instant::now() + self.cfg.spin;
        loop {
            self.reap()?;
            self.overdue()?;
            let now = Instant::now();
            if done(self) || now >= deadline {
                return Ok(());
            }
            if now < spin_until {
                std::hint::spin_loop();
                continue;
            }
            let slice = deadline
                .saturating_duration_since(now)
                .min(Duration::from_millis(50));
            let mut early = std::mem::take(&mut self.comps);
            early.clear();
            let r = self.queue.wait(-1, slice, &mut early);
            let r = match r {
                Ok(_) => self.take(&early),
                Err(e) => Err(ReadError::Verbs(e.to_string())),
            };
            self.comps = early;
            if let Err(e) = r {
                return Err(self.fail(e));
            }
        }
    }
}

#[cfg(feature = "fault-injection")]
impl RdmaPageReader {
    /// Tests: spoils the remote key of every region, so that the next READ fails at the
    /// source's NIC with a remote access error.
    pub fn corrupt_remote_keys(&mut self) {
        for r in &mut self.regions {
            r.rkey ^= 0x5a;
        }
    }
}

/// The engine moves readers and exposures to the threads that use them.
const _: () = {
    const fn send<T: Send>() {}
    send::<RdmaPageReader>();
    send::<super::ReadExposure>();
    send::<Arc<super::ExposedMemory>>();
};

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Vec<ExposedRegion> {
        vec![
            ExposedRegion {
                addr: 0x1000_0000,
                len: 16 * 4096,
                rkey: 7,
                page_size: 4096,
            },
            ExposedRegion {
                addr: 0x4000_0000,
                len: 2 << 21,
                rkey: 9,
                page_size: 2 << 20,
            },
            ExposedRegion {
                addr: 0x9000_0000,
                len: 0,
                rkey: 0,
                page_size: 4096,
            },
        ]
    }

    #[test]
    fn a_request_inside_a_region_becomes_its_remote_span() {
        let t = table();
        assert_eq!(plan(&t, 65536, 0, 0, 1).unwrap(), (0x1000_0000, 7, 4096));
        assert_eq!(
            plan(&t, 65536, 0, 15, 1).unwrap(),
            (0x1000_0000 + 15 * 4096, 7, 4096)
        );
        assert_eq!(plan(&t, 65536, 0, 0, 16).unwrap(), (0x1000_0000, 7, 65536));
        assert_eq!(
            plan(&t, 4 << 20, 1, 1, 1).unwrap(),
            (0x4000_0000 + (2 << 20), 9, 2 << 20)
        );
    }

    #[test]
    fn a_request_outside_the_table_or_a_slot_is_refused() {
        let t = table();
        let refused = |r: u32, f: u64, n: u32, slot: usize, says: &str| {
            let e = plan(&t, slot, r, f, n).unwrap_err();
            assert!(matches!(e, ReadError::OutOfRange { .. }), "{e}");
            assert!(e.to_string().contains(says), "{e}");
        };
        refused(3, 0, 1, 65536, "3 regions");
        refused(u32::MAX, 0, 1, 65536, "3 regions");
        refused(0, 0, 0, 65536, "no pages");
        refused(0, 16, 1, 65536, "16 pages");
        refused(0, 15, 2, 65536, "16 pages");
        refused(0, u64::MAX, 1, 65536, "16 pages");
        refused(0, u64::MAX - 1, u32::MAX, 65536, "16 pages");
        refused(2, 0, 1, 65536, "0 pages");
        refused(0, 0, 2, 4096, "exceed a slot");
        refused(1, 0, 1, 1 << 20, "exceed a slot");
    }
}
