//! The guest stand-in: writer threads that dirty pages at a set rate over a hot set, marking
//! a dirty log as KVM's would (write first, then set the bit), and that stop for a pause.
//!
//! The guest goes on where it resumes: what its writers do travels in its device state (as a
//! real guest's CPU state carries what it was doing), so a destination starts the same
//! writers after the handover without being told the workload on its command line. After a
//! post-copy switch that is what makes the destination fault as a real guest would.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rmig_engine::{SharedDirtyLog, SourceEmbedder};

use crate::mem::Rng;

/// What the writers do.
#[derive(Debug, Clone, Copy)]
pub struct WorkloadSpec {
    /// Bytes dirtied per second (pages × page size), over all writers.
    pub dirty_rate: f64,
    /// Fraction of memory the writers touch (a window at the start of memory).
    pub hot_set: f64,
    /// Writer threads.
    pub writers: usize,
    /// Seed.
    pub seed: u64,
}

struct Gate {
    paused: AtomicBool,
    /// Writers hold it shared while writing; the pause takes it exclusively to wait them out.
    inflight: RwLock<()>,
    resume: (Mutex<bool>, Condvar),
    stop: AtomicBool,
    throttle: AtomicU8,
    pages_written: AtomicU64,
}

/// What a device state starts with: this magic, then the spec's fields (little endian).
const GUEST_MAGIC: &[u8; 16] = b"rmig-bench-gst/1";
/// Bytes of the header: the magic and four 8-byte fields.
const GUEST_HEADER: usize = 16 + 4 * 8;

impl WorkloadSpec {
    /// The bench guest's device state: the spec in a header, then `len` bytes in all of
    /// data derived from the seed (checked at the far end in `loopback`).
    pub fn device_state(&self, len: usize) -> Vec<u8> {
        let mut r = Rng::new(self.seed ^ 0xdead_beef);
        let mut v: Vec<u8> = (0..len.max(GUEST_HEADER))
            .map(|_| r.next_u64() as u8)
            .collect();
        v[..16].copy_from_slice(GUEST_MAGIC);
        v[16..24].copy_from_slice(&self.dirty_rate.to_le_bytes());
        v[24..32].copy_from_slice(&self.hot_set.to_le_bytes());
        v[32..40].copy_from_slice(&(self.writers as u64).to_le_bytes());
        v[40..48].copy_from_slice(&self.seed.to_le_bytes());
        v
    }

    /// The spec a device state carries; `None` for one the bench did not make.
    pub fn of_device_state(state: &[u8]) -> Option<WorkloadSpec> {
        if state.len() < GUEST_HEADER || &state[..16] != GUEST_MAGIC {
            return None;
        }
        let word = |i: usize| <[u8; 8]>::try_from(&state[i..i + 8]).ok();
        let spec = WorkloadSpec {
            dirty_rate: f64::from_le_bytes(word(16)?),
            hot_set: f64::from_le_bytes(word(24)?),
            writers: usize::try_from(u64::from_le_bytes(word(32)?)).ok()?,
            seed: u64::from_le_bytes(word(40)?),
        };
        let sane = spec.dirty_rate.is_finite()
            && spec.dirty_rate >= 0.0
            && spec.hot_set > 0.0
            && spec.hot_set <= 1.0
            && spec.writers <= 1024;
        sane.then_some(spec)
    }
}

/// Running writers.
pub struct Workload {
    gate: Arc<Gate>,
    joins: Vec<JoinHandle<()>>,
}

/// The memory the writers dirty.
#[derive(Clone, Copy)]
struct Target {
    ptr: *mut u8,
    pages: u64,
    page: u64,
}
// SAFETY: a plain address range of guest memory that outlives the writers (the bench joins
// them before unmapping).
unsafe impl Send for Target {}

impl Workload {
    /// Starts the writers over `pages` pages of `page` bytes at `ptr`.
    ///
    /// The memory must outlive the workload (it is stopped on drop).
    pub fn start(
        ptr: *mut u8,
        pages: u64,
        page: u64,
        spec: WorkloadSpec,
        log: SharedDirtyLog,
    ) -> Workload {
        let gate = Arc::new(Gate {
            paused: AtomicBool::new(false),
            inflight: RwLock::new(()),
            resume: (Mutex::new(false), Condvar::new()),
            stop: AtomicBool::new(false),
            throttle: AtomicU8::new(0),
            pages_written: AtomicU64::new(0),
        });
        let mut joins = Vec::new();
        if spec.dirty_rate > 0.0 && spec.writers > 0 {
            let hot = ((pages as f64 * spec.hot_set.clamp(0.0, 1.0)) as u64).max(1);
            let per_writer = spec.dirty_rate / spec.writers as f64 / page as f64; // pages/s
            for w in 0..spec.writers {
                let g = gate.clone();
                let log = log.clone();
                let t = Target { ptr, pages, page };
                let seed = spec.seed.wrapping_add(w as u64 * 7919);
                joins.push(
                    std::thread::Builder::new()
                        .name(format!("bench-writer-{w}"))
                        .spawn(move || writer(t, hot, per_writer, seed, &g, &log))
                        .expect("spawn writer"),
                );
            }
        }
        Workload { gate, joins }
    }

    /// Pages written so far.
    pub fn pages_written(&self) -> u64 {
        self.gate.pages_written.load(Ordering::Relaxed)
    }

    /// Whether the guest runs (is not paused), as a VMM would report it.
    pub fn guest_running(&self) -> bool {
        !self.gate.paused.load(Ordering::Acquire)
    }

    /// An embedder handle for the engine.
    pub fn embedder(&self, device_state: Vec<u8>) -> BenchEmbedder {
        BenchEmbedder {
            gate: self.gate.clone(),
            device_state,
        }
    }

    /// Stops the writers for good.
    pub fn stop(&mut self) {
        self.gate.stop.store(true, Ordering::Release);
        resume(&self.gate);
        for j in self.joins.drain(..) {
            let _ = j.join();
        }
    }
}

impl Workload {
    /// Stops the writers without waiting for them: after a lost post-copy, a writer that
    /// touched a page still on the lost source stays blocked in the kernel for good, so it
    /// cannot be joined. The memory they write must then stay mapped for the life of the
    /// process (forget its mapping too).
    pub fn abandon(mut self) {
        self.gate.stop.store(true, Ordering::Release);
        resume(&self.gate);
        // Detached: dropping a handle does not wait for its thread.
        self.joins.clear();
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.stop();
    }
}

fn resume(g: &Gate) {
    g.paused.store(false, Ordering::Release);
    let (m, cv) = &g.resume;
    *m.lock().unwrap_or_else(|e| e.into_inner()) = true;
    cv.notify_all();
}

fn writer(t: Target, hot: u64, pages_per_sec: f64, seed: u64, g: &Gate, log: &SharedDirtyLog) {
    let mut rng = Rng::new(seed);
    let hot = hot.min(t.pages);
    // Pages owed: grows with time at the rate the throttle allows now, so that a throttle
    // slows the writers to its share instead of stopping them until a pace counted from the
    // start catches up, and a pause owes nothing.
    let mut owed = 0f64;
    let mut last = Instant::now();
    let words = t.page / 8;
    while !g.stop.load(Ordering::Acquire) {
        if g.paused.load(Ordering::Acquire) {
            let (m, cv) = &g.resume;
            let mut r = m.lock().unwrap_or_else(|e| e.into_inner());
            while g.paused.load(Ordering::Acquire) && !g.stop.load(Ordering::Acquire) {
                r = cv
                    .wait_timeout(r, Duration::from_millis(50))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            last = Instant::now();
            continue;
        }
        let throttle = g.throttle.load(Ordering::Relaxed) as f64 / 100.0;
        let now = Instant::now();
        owed += (now - last).as_secs_f64() * pages_per_sec * (1.0 - throttle);
        last = now;
        let due = owed.min(4096.0);
        if due < 1.0 {
            std::thread::sleep(Duration::from_micros(500));
            continue;
        }
        let n = due as u64;
        {
            let _in = g.inflight.read().unwrap_or_else(|e| e.into_inner());
            if g.paused.load(Ordering::Acquire) {
                continue;
            }
            for _ in 0..n {
                let p = rng.below(hot);
                let off = p * t.page + rng.below(words) * 8;
                let v = rng.next_u64() | 1;
                // SAFETY: `off` is inside the mapping (p < pages, word < page/8) and 8-aligned;
                // the guest's writes race with the engine's reads by design (see the engine's
                // memory module), and a volatile store keeps the compiler from eliding it.
                unsafe { std::ptr::write_volatile(t.ptr.add(off as usize).cast::<u64>(), v) };
                log.mark(0, p);
            }
        }
        owed -= n as f64;
        g.pages_written.fetch_add(n, Ordering::Relaxed);
    }
}

/// The bench as the engine's embedder: pause and throttle the writers, give device state.
pub struct BenchEmbedder {
    gate: Arc<Gate>,
    device_state: Vec<u8>,
}

impl SourceEmbedder for BenchEmbedder {
    fn pause(&mut self) -> Result<(), String> {
        let (m, _) = &self.gate.resume;
        *m.lock().unwrap_or_else(|e| e.into_inner()) = false;
        self.gate.paused.store(true, Ordering::Release);
        // Wait out the writers that are in the middle of a burst.
        drop(
            self.gate
                .inflight
                .write()
                .unwrap_or_else(|e| e.into_inner()),
        );
        Ok(())
    }

    fn resume(&mut self) {
        resume(&self.gate);
    }

    fn throttle(&mut self, percent: u8) {
        self.gate.throttle.store(percent.min(99), Ordering::Relaxed);
    }

    fn device_state(&mut self) -> Result<Vec<u8>, String> {
        Ok(self.device_state.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_state_carries_the_workload() {
        let spec = WorkloadSpec {
            dirty_rate: 300e6,
            hot_set: 0.5,
            writers: 3,
            seed: 42,
        };
        let state = spec.device_state(64 * 1024);
        assert_eq!(state.len(), 64 * 1024);
        let back = WorkloadSpec::of_device_state(&state).expect("a bench guest's state");
        assert_eq!(
            (back.dirty_rate, back.hot_set, back.writers, back.seed),
            (300e6, 0.5, 3, 42)
        );
        assert_eq!(state, spec.device_state(64 * 1024), "deterministic");
        let mut other = state.clone();
        other[3] ^= 1;
        assert!(WorkloadSpec::of_device_state(&other).is_none());
        assert!(WorkloadSpec::of_device_state(&state[..20]).is_none());
    }

    /// Pages written over `secs` by writers at `rate` bytes/s under `throttle` percent.
    fn written(throttle: u8, secs: f64) -> f64 {
        let pages = 4096u64;
        let mut mem = vec![0u64; (pages * 4096 / 8) as usize];
        let log = SharedDirtyLog::new(&[pages]);
        let spec = WorkloadSpec {
            dirty_rate: 40e6,
            hot_set: 1.0,
            writers: 2,
            seed: 1,
        };
        let mut w = Workload::start(mem.as_mut_ptr().cast(), pages, 4096, spec, log);
        let mut e = w.embedder(Vec::new());
        // Run unthrottled first, as a migration does before auto-converge steps in: a pace
        // counted from the start would then owe nothing for a quarter of the throttled second.
        std::thread::sleep(Duration::from_secs(1));
        e.throttle(throttle);
        let before = w.pages_written();
        std::thread::sleep(Duration::from_secs_f64(secs));
        let n = w.pages_written() - before;
        w.stop();
        n as f64 * 4096.0 / secs
    }

    #[test]
    fn writers_keep_dirtying_at_the_throttled_rate() {
        let full = written(0, 0.5);
        assert!(
            (30e6..50e6).contains(&full),
            "unthrottled: {full} bytes/s for 40e6"
        );
        let throttled = written(20, 1.0);
        let share = throttled / 40e6;
        assert!(
            (0.7..0.9).contains(&share),
            "under a 20 % throttle the writers dirty {share:.2} of the rate, not 0.8"
        );
    }
}
