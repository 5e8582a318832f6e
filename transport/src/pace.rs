//! A bandwidth ceiling shared by all lanes of a session, changeable while they run.
//!
//! Pacing happens per batch (hundreds of KiB), which is fine-grained enough for a ceiling
//! measured in MB/s and costs one uncontended lock per batch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A token bucket over all lanes; a rate of 0 means unlimited.
#[derive(Debug)]
pub struct Pacer {
    rate: AtomicU64,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    /// When the bytes granted so far will have been "spent" at the current rate.
    next_free: Instant,
}

impl Pacer {
    /// A pacer limited to `bytes_per_sec` (0: unlimited).
    pub fn new(bytes_per_sec: u64) -> Self {
        Pacer {
            rate: AtomicU64::new(bytes_per_sec),
            state: Mutex::new(Bucket {
                next_free: Instant::now(),
            }),
        }
    }

    /// Changes the ceiling; takes effect for the next batch of every lane.
    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.rate.store(bytes_per_sec, Ordering::Relaxed);
    }

    /// The current ceiling in bytes per second (0: unlimited).
    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// Blocks until `bytes` may be sent under the ceiling.
    pub fn take(&self, bytes: u64) {
        let rate = self.rate();
        if rate == 0 || bytes == 0 {
            return;
        }
        let cost = Duration::from_secs_f64(bytes as f64 / rate as f64);
        let wait_until = {
            let mut b = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            // Allow a burst of at most 50 ms worth of bytes after an idle period.
            let floor = now.checked_sub(Duration::from_millis(50)).unwrap_or(now);
            if b.next_free < floor {
                b.next_free = floor;
            }
            let start = b.next_free;
            b.next_free = start + cost;
            start
        };
        let now = Instant::now();
        if wait_until > now {
            std::thread::sleep(wait_until - now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_waits() {
        let p = Pacer::new(0);
        let t = Instant::now();
        for _ in 0..1000 {
            p.take(1 << 30);
        }
        assert!(t.elapsed() < Duration::from_millis(100));
    }

    #[test]
    fn limited_rate_is_respected() {
        let p = Pacer::new(10 << 20); // 10 MiB/s
        let t = Instant::now();
        for _ in 0..20 {
            p.take(256 << 10); // 5 MiB in all
        }
        let el = t.elapsed().as_secs_f64();
        // 5 MiB at 10 MiB/s is 0.5 s, less the 50 ms burst allowance.
        assert!(el > 0.4, "took {el}");
    }
}
