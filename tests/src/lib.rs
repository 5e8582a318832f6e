//! Helpers for rmig's end-to-end tests: guest memory, a live writer, and a function that runs
//! both ends of a migration over loopback.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

pub mod capture;
pub mod guest;
pub mod proxy;

use rmig_engine::{
    driver, DestConfig, DestEmbedder, DestListener, DestOutcome, DirtySource, EngineError, Key,
    MigrationStats, Monitor, Region, SharedDirtyLog, SourceConfig, SourceEmbedder, StaticSource,
};

/// Page-aligned anonymous memory standing in for guest RAM.
pub struct Mem {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: plain owned memory; tests coordinate access through the engine's rules.
unsafe impl Send for Mem {}
// SAFETY: as above.
unsafe impl Sync for Mem {}

impl Mem {
    /// `len` bytes of zeroed memory.
    pub fn new(len: usize) -> Mem {
        // SAFETY: a fresh anonymous mapping.
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
        assert_ne!(p, libc::MAP_FAILED, "mmap failed");
        Mem { ptr: p.cast(), len }
    }

    /// Memory filled with random bytes, with `zero_fraction` of its 4 KiB pages zero.
    pub fn random(len: usize, zero_fraction: f64, seed: u64) -> Mem {
        let mut m = Mem::new(len);
        let mut r = Rng(seed);
        for p in m.bytes_mut().chunks_mut(4096) {
            if (r.next_u64() % 1000) as f64 / 1000.0 < zero_fraction {
                continue;
            }
            for w in p.chunks_exact_mut(8) {
                w.copy_from_slice(&r.next_u64().to_ne_bytes());
            }
        }
        m
    }

    /// The bytes (only while nothing writes them).
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: valid for `len` bytes while `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The bytes, mutably.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: valid for `len` bytes; `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// Start address.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A region over part of this memory.
    pub fn region(&self, id: u32, offset: usize, len: usize, page: u64) -> Region {
        assert!(offset + len <= self.len);
        // SAFETY: the memory outlives every migration of a test (tests keep `Mem` alive until
        // both ends have returned), and nothing else writes a destination while it runs.
        unsafe {
            Region::new(
                id,
                format!("ram{id}"),
                self.ptr.add(offset),
                len as u64,
                page,
            )
        }
        .expect("valid region")
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A tiny deterministic generator.
pub struct Rng(pub u64);

impl Rng {
    /// Next value (splitmix64).
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// The key every test uses (unless it tests a wrong one).
pub fn key() -> Key {
    Key::new(b"rmig test key, 16+ bytes").unwrap()
}

/// A writer thread dirtying random pages of region 0, marking a shared dirty log.
pub struct Writer {
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    busy: Arc<Mutex<()>>,
    /// Pages written.
    pub written: Arc<AtomicU64>,
    /// Calls of `resume` (the source carried on after a failure).
    pub resumed: Arc<AtomicU64>,
    /// Last throttle asked for.
    pub throttle: Arc<AtomicU64>,
    join: Option<JoinHandle<()>>,
}

impl Writer {
    /// Starts writing `pages_per_ms` pages each millisecond over the first `hot_pages` pages.
    pub fn start(mem: &Mem, log: SharedDirtyLog, hot_pages: u64, pages_per_ms: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let busy = Arc::new(Mutex::new(()));
        let written = Arc::new(AtomicU64::new(0));
        let (s, p, b, w) = (stop.clone(), paused.clone(), busy.clone(), written.clone());
        let addr = mem.ptr() as usize;
        let join = std::thread::spawn(move || {
            let mut r = Rng(7);
            while !s.load(Ordering::Acquire) {
                {
                    let _g = b.lock().unwrap();
                    if !p.load(Ordering::Acquire) {
                        for _ in 0..pages_per_ms {
                            let page = r.next_u64() % hot_pages;
                            let off = page * 4096 + (r.next_u64() % 512) * 8;
                            // SAFETY: inside the test's memory, which outlives the writer;
                            // racing the engine's reads is what a guest does.
                            unsafe {
                                std::ptr::write_volatile(
                                    (addr + off as usize) as *mut u64,
                                    r.next_u64(),
                                )
                            };
                            log.mark(0, page);
                            w.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        Writer {
            stop,
            paused,
            busy,
            written,
            resumed: Arc::new(AtomicU64::new(0)),
            throttle: Arc::new(AtomicU64::new(0)),
            join: Some(join),
        }
    }

    /// The engine's embedder for this writer.
    pub fn embedder(&self, device_state: Vec<u8>) -> Box<dyn SourceEmbedder> {
        Box::new(WriterEmbedder {
            paused: self.paused.clone(),
            busy: self.busy.clone(),
            resumed: self.resumed.clone(),
            throttle: self.throttle.clone(),
            device_state,
        })
    }

    /// Whether the writer is paused now.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    /// Stops the writer.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(j) = self.join.take() {
            j.join().unwrap();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop();
    }
}

struct WriterEmbedder {
    paused: Arc<AtomicBool>,
    busy: Arc<Mutex<()>>,
    resumed: Arc<AtomicU64>,
    throttle: Arc<AtomicU64>,
    device_state: Vec<u8>,
}

impl SourceEmbedder for WriterEmbedder {
    fn pause(&mut self) -> Result<(), String> {
        self.paused.store(true, Ordering::Release);
        drop(self.busy.lock().unwrap()); // wait out a burst in progress
        Ok(())
    }
    fn resume(&mut self) {
        self.paused.store(false, Ordering::Release);
        self.resumed.fetch_add(1, Ordering::Relaxed);
    }
    fn throttle(&mut self, percent: u8) {
        self.throttle.store(percent as u64, Ordering::Relaxed);
    }
    fn device_state(&mut self) -> Result<Vec<u8>, String> {
        Ok(self.device_state.clone())
    }
}

/// A destination embedder that records what it was handed, and can refuse on purpose.
#[derive(Default, Clone)]
pub struct RecordingDest {
    /// Device state received.
    pub device_state: Arc<Mutex<Option<Vec<u8>>>>,
    /// Whether `resume` was called and succeeded.
    pub resumed: Arc<AtomicBool>,
    /// Calls of `resume`, failed ones included.
    pub resume_calls: Arc<AtomicU64>,
    /// `load_device_state` fails (after recording what it was given).
    pub fail_load: bool,
    /// `resume` fails.
    pub fail_resume: bool,
}

impl DestEmbedder for RecordingDest {
    fn load_device_state(&mut self, s: Vec<u8>) -> Result<(), String> {
        *self.device_state.lock().unwrap() = Some(s);
        if self.fail_load {
            return Err("device model refused the state".into());
        }
        Ok(())
    }
    fn resume(&mut self) -> Result<(), String> {
        self.resume_calls.fetch_add(1, Ordering::Relaxed);
        if self.fail_resume {
            return Err("vCPUs would not start".into());
        }
        self.resumed.store(true, Ordering::Release);
        Ok(())
    }
}

/// A source embedder whose callbacks can act or fail on purpose, for tests that need
/// something to happen exactly at the pause: pages dirtied there (so the stop-and-copy has
/// data to send), a cancellation, or a refusal.
#[derive(Clone, Default)]
pub struct Scripted {
    /// On `pause`, marks the first this-many pages of region 0 dirty in this log.
    pub dirty_on_pause: Option<(SharedDirtyLog, u64)>,
    /// On `pause`, cancels through this monitor.
    pub cancel_on_pause: Option<Arc<Monitor>>,
    /// `pause` fails.
    pub fail_pause: bool,
    /// `device_state` fails.
    pub fail_device_state: bool,
    /// Device state to hand over.
    pub device_state: Vec<u8>,
    /// Calls of `pause`.
    pub pauses: Arc<AtomicU64>,
    /// Calls of `resume`.
    pub resumes: Arc<AtomicU64>,
    /// Calls of `device_state`.
    pub device_state_calls: Arc<AtomicU64>,
}

impl SourceEmbedder for Scripted {
    fn pause(&mut self) -> Result<(), String> {
        self.pauses.fetch_add(1, Ordering::Relaxed);
        if self.fail_pause {
            return Err("vCPUs would not stop".into());
        }
        if let Some((log, pages)) = &self.dirty_on_pause {
            (0..*pages).for_each(|p| log.mark(0, p));
        }
        if let Some(m) = &self.cancel_on_pause {
            m.cancel("operator changed their mind");
        }
        Ok(())
    }
    fn resume(&mut self) {
        self.resumes.fetch_add(1, Ordering::Relaxed);
    }
    fn device_state(&mut self) -> Result<Vec<u8>, String> {
        self.device_state_calls.fetch_add(1, Ordering::Relaxed);
        if self.fail_device_state {
            return Err("device model could not save".into());
        }
        Ok(self.device_state.clone())
    }
}

/// A watchdog for one test: if it is still alive after its time, it names the test and
/// aborts the test process, so that a hang fails CI instead of stalling it. Keep it alive
/// for the whole test (`let _deadline = Deadline::secs(60);`); dropping it disarms it.
pub struct Deadline {
    disarm: Option<std::sync::mpsc::Sender<()>>,
    watchdog: Option<JoinHandle<()>>,
}

impl Deadline {
    /// A deadline `secs` seconds from now for the calling test.
    pub fn secs(secs: u64) -> Deadline {
        let name = std::thread::current()
            .name()
            .unwrap_or("an unnamed test")
            .to_string();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let limit = Duration::from_secs(secs);
        let watchdog = std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                eprintln!("{name}: still running after its deadline of {secs} s; aborting");
                std::process::abort();
            }
        });
        Deadline {
            disarm: Some(tx),
            watchdog: Some(watchdog),
        }
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        drop(self.disarm.take());
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
    }
}

/// Everything one test migration needs; defaults migrate with two lanes and verification.
pub struct Setup {
    /// Source configuration (its address is filled in).
    pub src: SourceConfig,
    /// Destination configuration.
    pub dst: DestConfig,
    /// Source regions.
    pub src_regions: Vec<Region>,
    /// Destination regions.
    pub dst_regions: Vec<Region>,
    /// Dirty tracking.
    pub dirty: Box<dyn DirtySource>,
    /// Source embedder.
    pub embedder: Box<dyn SourceEmbedder>,
    /// Destination embedder.
    pub dest_embedder: RecordingDest,
    /// A destination embedder to use instead of `dest_embedder` (a guest that runs).
    pub dest_guest: Option<Box<dyn DestEmbedder>>,
    /// Monitors of both ends.
    pub src_monitor: Arc<Monitor>,
    /// Destination monitor.
    pub dst_monitor: Arc<Monitor>,
    /// Where the destination listens (`127.0.0.1:0` unless a test needs an RDMA address).
    pub bind: String,
}

impl Setup {
    /// A migration of region 0 (`len` bytes) of `src` into `dst`.
    pub fn new(src: &Mem, dst: &Mem, len: usize) -> Setup {
        let mut s = SourceConfig::new("unset", key());
        s.lanes = 2;
        // The suite speaks the cleartext protocol to the engine (hostile peers, raw lanes);
        // tests/tls.rs turns encryption on.
        s.encryption = rmig_engine::Encryption::Off;
        let mut d = DestConfig::new(key());
        d.encryption = rmig_engine::Encryption::Off;
        // A deadline for every test: a destination that no source reaches gives up.
        d.incoming_timeout = Some(Duration::from_secs(20));
        Setup {
            src: s,
            dst: d,
            src_regions: vec![src.region(0, 0, len, 4096)],
            dst_regions: vec![dst.region(0, 0, len, 4096).with_known_zero(true)],
            dirty: Box::new(SharedDirtyLog::new(&[(len / 4096) as u64])),
            embedder: Box::new(StaticSource),
            dest_embedder: RecordingDest::default(),
            dest_guest: None,
            src_monitor: Monitor::new(),
            dst_monitor: Monitor::new(),
            bind: "127.0.0.1:0".into(),
        }
    }

    /// Starts the destination alone on `bind` (e.g. `localhost:0`); returns its thread and
    /// its port, for tests that drive the source themselves.
    pub fn spawn_dest(
        &self,
        bind: &str,
    ) -> Result<
        (
            std::thread::JoinHandle<Result<DestOutcome, EngineError>>,
            u16,
        ),
        EngineError,
    > {
        let l = DestListener::bind(bind, self.dst.clone())?;
        let port = l.local_addr()?.port();
        let regions = self.dst_regions.clone();
        let emb = Box::new(self.dest_embedder.clone());
        let dm = self.dst_monitor.clone();
        Ok((std::thread::spawn(move || l.serve(regions, emb, dm)), port))
    }

    /// Starts the source alone on a thread, towards `src.dest`, for tests that start the
    /// destination themselves ([`spawn_dest`](Self::spawn_dest)) and act while it runs.
    pub fn spawn_source(self) -> std::thread::JoinHandle<Result<MigrationStats, EngineError>> {
        let (cfg, regions, dirty, emb, monitor) = (
            self.src,
            self.src_regions,
            self.dirty,
            self.embedder,
            self.src_monitor,
        );
        std::thread::spawn(move || driver::migrate(cfg, regions, dirty, emb, monitor))
    }

    /// Runs both ends; returns the source's and the destination's results.
    pub fn run(
        mut self,
    ) -> (
        Result<MigrationStats, EngineError>,
        Result<DestOutcome, EngineError>,
    ) {
        let emb = self.dest_embedder();
        let l = DestListener::bind(&self.bind, self.dst).expect("bind");
        self.src.dest = l.local_addr().unwrap().to_string();
        let dm = self.dst_monitor.clone();
        let regions = self.dst_regions;
        let d = std::thread::spawn(move || l.serve(regions, emb, dm));
        let s = driver::migrate(
            self.src,
            self.src_regions,
            self.dirty,
            self.embedder,
            self.src_monitor,
        );
        (s, d.join().expect("destination thread"))
    }
}

impl Setup {
    /// The destination's embedder: `dest_guest` (taken) if set, else a clone of
    /// `dest_embedder`.
    fn dest_embedder(&mut self) -> Box<dyn DestEmbedder> {
        match self.dest_guest.take() {
            Some(g) => g,
            None => Box::new(self.dest_embedder.clone()),
        }
    }

    /// Runs both ends, the source connecting through the relay that `relay` starts in front
    /// of the destination's address; returns the source's and the destination's results.
    pub fn run_via(
        mut self,
        relay: impl FnOnce(std::net::SocketAddr) -> proxy::Proxy,
    ) -> (
        Result<MigrationStats, EngineError>,
        Result<DestOutcome, EngineError>,
    ) {
        let emb = self.dest_embedder();
        let l = DestListener::bind("127.0.0.1:0", self.dst.clone()).expect("bind");
        let port = l.local_addr().expect("bound").port();
        let (regions, dm) = (self.dst_regions.clone(), self.dst_monitor.clone());
        let d = std::thread::spawn(move || l.serve(regions, emb, dm));
        let relay = relay(([127, 0, 0, 1], port).into());
        self.src.dest = relay.addr().to_string();
        let s = driver::migrate(
            self.src,
            self.src_regions,
            self.dirty,
            self.embedder,
            self.src_monitor,
        );
        let d = d.join().expect("destination thread");
        drop(relay);
        (s, d)
    }
}

/// The error of the last connection a destination refused, from its `NoSource` error (a
/// destination keeps listening through failed handshakes, so that is where their reasons
/// end up). Panics on any other error.
pub fn last_refusal(e: EngineError) -> EngineError {
    match e {
        EngineError::NoSource {
            last: Some(last),
            refused,
            ..
        } if refused >= 1 => *last,
        e => panic!("expected a destination that refused a connection and gave up, got: {e}"),
    }
}

/// Asserts that two memories are equal, naming the first differing page.
pub fn assert_same(a: &[u8], b: &[u8]) {
    assert_eq!(a.len(), b.len());
    if a != b {
        let p = a
            .chunks(4096)
            .zip(b.chunks(4096))
            .position(|(x, y)| x != y)
            .unwrap();
        panic!("memories differ, first at page {p}");
    }
}

/// Starts a destination for 4 MiB, lets `peer` talk to it over a raw socket, and returns why
/// the destination refused that connection (it keeps listening, and gives up only at its
/// incoming timeout), whatever it sent back, and its memory.
pub fn against_raw_peer(
    peer: impl FnOnce(&mut std::net::TcpStream),
) -> (EngineError, Vec<u8>, Mem) {
    use std::io::Read;
    let dst = Mem::new(4 << 20);
    let src = Mem::new(4 << 20);
    let setup = Setup::new(&src, &dst, 4 << 20);
    let mut cfg = setup.dst.clone();
    cfg.handshake_timeout = Duration::from_secs(2);
    cfg.incoming_timeout = Some(Duration::from_secs(3));
    let l = DestListener::bind("127.0.0.1:0", cfg).unwrap();
    let addr = l.local_addr().unwrap();
    let regions = setup.dst_regions.clone();
    let d = std::thread::spawn(move || {
        l.serve(
            regions,
            Box::new(rmig_engine::NullDest::default()),
            Monitor::new(),
        )
    });
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    peer(&mut s);
    let mut back = Vec::new();
    let _ = s.read_to_end(&mut back);
    let e = last_refusal(d.join().unwrap().unwrap_err());
    (e, back, dst)
}

/// The text of the first `Error` message in `back` (what a destination told its peer), or
/// an empty string.
pub fn error_text(back: &[u8]) -> String {
    use rmig_engine::protocol::{codec, Message};
    let mut r = back;
    loop {
        match codec::read_sync(&mut r) {
            Ok(Message::Error { message }) => return message,
            Ok(_) => continue,
            Err(_) => return String::new(),
        }
    }
}
